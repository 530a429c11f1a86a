"""`attnbench capture` and `inputs=file:`: a tiny random Llama (built from a config, nothing
downloaded) reads a text; the capture holds what the model computed (checked against RoPE
applied by hand to its projections, and against its attention output recomputed in float64),
and a point replays it exactly, in the point's shape."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from attnbench.harness.cli import main as cli_main
from attnbench.harness.run.inputs import inputs_problem, make_inputs, parse_inputs
from attnbench.harness.run.replay import read_layout
from attnbench.variants.base import Shape

pytest.importorskip("transformers", reason="needs the `real` extra (transformers)")
pytest.importorskip("safetensors", reason="needs the `real` extra (safetensors)")

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")
HEADS, KV, D, LAYERS, THETA = 4, 2, 16, 3, 10000.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, text file, number of tokens): a random 3-layer Llama, 4 query / 2 k/v
    heads of 16, and a byte-level tokenizer, saved like any local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import decoders as dec
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = dec.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(root / "model")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, head_dim=D, max_position_embeddings=1024,
                         rope_theta=THETA)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    return root / "model", text, len((TEXT * 3).encode())


@pytest.fixture(scope="module")
def captured(tiny, tmp_path_factory):
    """The capture of layers 0 and 2, written by the command."""
    folder, text, _ = tiny
    out = tmp_path_factory.mktemp("capture") / "tiny.safetensors"
    with pytest.raises(SystemExit) as done:
        cli_main(["capture", str(folder), str(text), "-o", str(out), "--layers", "0+2"])
    assert done.value.code == 0
    return out


def _reference(folder, text: str):
    """Independently of the capture: each layer's q/k/v projections and its attention output
    (the input of o_proj), from hooks on a fresh load of the same model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder, local_files_only=True)(
        text, return_tensors="pt").input_ids
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            hooks.append(getattr(att, name).register_forward_hook(
                lambda m, a, out, i=i, name=name: seen.__setitem__((i, name), out.detach())))
        hooks.append(att.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__((i, "attn"), a[0].detach())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen, ids.shape[1]


def _rope(x: torch.Tensor) -> torch.Tensor:
    """RoPE of x (1, H, N, D) by its definition, float64: pairs (i, i + D/2) turned by
    position · θ^(-2i/D)."""
    n, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x = x.double()
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.reshape(1, t.shape[1], h, D).transpose(1, 2)  # (1, N, h·D) -> (1, h, N, D)


def test_capture_holds_what_the_model_computed(tiny, captured):
    from safetensors import safe_open

    folder, text, _ = tiny
    seen, n = _reference(folder, text.read_text())
    with safe_open(str(captured), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(f"layers.{i}.{x}" for i in (0, 2) for x in "qkv")
        for i in (0, 2):
            q, k, v = (f.get_tensor(f"layers.{i}.{x}") for x in "qkv")
            assert q.shape == (1, HEADS, n, D) and k.shape == v.shape == (1, KV, n, D)
            want_q = _rope(_heads(seen[i, "q_proj"], HEADS))
            want_k = _rope(_heads(seen[i, "k_proj"], KV))
            torch.testing.assert_close(q.double(), want_q, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k.double(), want_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, _heads(seen[i, "v_proj"], KV), rtol=0, atol=0)
            # the model's attention output, recomputed from the capture: causal softmax, f64
            kk, vv = (t.double().repeat_interleave(HEADS // KV, 1) for t in (k, v))
            s = q.double() @ kk.transpose(-2, -1) / math.sqrt(D)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            out = torch.softmax(s, -1) @ vv  # (1, H, N, D)
            got = seen[i, "attn"].double().reshape(1, n, HEADS, D).transpose(1, 2)
            torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)
    assert meta["format"] == "attnbench-capture/1" and meta["layers"] == "0,2"
    assert (meta["heads"], meta["kv_heads"], meta["head_dim"]) == (str(HEADS), str(KV), str(D))
    assert meta["positions"] == meta["tokens"] == str(n)
    assert meta["text"] == "text.txt" and meta["model_type"] == "llama"
    assert meta["text_sha256"] == hashlib.sha256(text.read_text().encode()).hexdigest()
    assert float(meta["scaling"]) == pytest.approx(D ** -0.5)


def _layers(captured):
    from safetensors.torch import load_file

    t = load_file(str(captured))
    return {i: tuple(t[f"layers.{i}.{x}"][0] for x in "qkv") for i in (0, 2)}


def test_a_point_replays_the_capture_in_its_own_shape(captured):
    cap = _layers(captured)
    n = read_layout(captured).positions
    # the model's layout, layer 2: exactly the capture
    q, k, v = make_inputs(Shape(1, HEADS, n, D, kv_heads=KV), torch.float32, "cpu",
                          kind=f"file:{captured}@layers:2")
    for got, want in zip((q, k, v), cap[2], strict=True):
        assert torch.equal(got[0], want)
    # the first 100 positions; the queries the last 40 of them; in float64
    q, k, v = make_inputs(Shape(1, HEADS, 100, D, kv_heads=KV, q_len=40), torch.float64,
                          "cpu", kind=f"file:{captured}@layers:2")
    assert q.shape == (1, HEADS, 40, D) and k.shape == (1, KV, 100, D) and q.dtype == torch.float64
    assert torch.equal(q[0], cap[2][0][:, 60:100].double())
    assert torch.equal(k[0], cap[2][1][:, :100].double())
    # two layers make a batch of two: layer 0, then layer 2
    q, k, _ = make_inputs(Shape(2, HEADS, 64, D, kv_heads=KV), torch.float32, "cpu",
                          kind=f"file:{captured}")
    assert torch.equal(q[1], cap[2][0][:, :64]) and torch.equal(k[0], cap[0][1][:, :64])


def test_every_replayed_head_is_a_query_head_with_its_own_kv_head(captured):
    """Whatever the point's heads: each of its (q head, k/v head) pairs is a captured query
    head with the k/v head the model gave it (head h uses k/v head h // (H/Hkv))."""
    cap = _layers(captured)
    for b, h, hkv in [(1, 4, 0), (1, 2, 1), (3, 6, 3), (5, 1, 0)]:
        shape = Shape(b, h, 32, D, kv_heads=hkv)
        q, k, v = make_inputs(shape, torch.float32, "cpu", kind=f"file:{captured}")
        g = shape.groups
        for bi in range(b):
            for hi in range(h):
                kv = hi // g
                hits = [(layer, ch) for layer, (cq, ck, cv) in cap.items() for ch in range(HEADS)
                        if torch.equal(q[bi, hi], cq[ch, :32])
                        and torch.equal(k[bi, kv], ck[ch // (HEADS // KV), :32])
                        and torch.equal(v[bi, kv], cv[ch // (HEADS // KV), :32])]
                assert hits, (b, h, hkv, bi, hi)


def test_heads_and_layers_are_selected_and_tiled(captured):
    cap = _layers(captured)
    q, k, _ = make_inputs(Shape(3, 1, 16, D), torch.float32, "cpu",
                          kind=f"file:{captured}@layers:0@heads:3")
    for b in range(3):  # one slot in the pool, tiled over the batch
        assert torch.equal(q[b, 0], cap[0][0][3, :16]) and torch.equal(k[b, 0], cap[0][1][1, :16])
    q, _, _ = make_inputs(Shape(1, 2, 16, D), torch.float32, "cpu",
                          kind=f"file:{captured}@layers:2@heads:2+0")
    assert torch.equal(q[0, 0], cap[2][0][0, :16]) and torch.equal(q[0, 1], cap[2][0][2, :16])


def test_a_sweep_point_runs_on_a_capture(captured):
    from attnbench.harness.run.config import from_dictconfig
    from attnbench.harness.run.job import run_point

    spec = f"file:{captured}@layers:2"
    run = from_dictconfig({"variant": {"name": "full"}, "batch": 1, "heads": HEADS,
                           "kv_heads": KV, "head_dim": D, "seq_len": 128, "causal": True,
                           "inputs": spec, "timing": {"min_reps": 2, "min_time_s": 0,
                                                      "warmup": 1}})
    rec = run_point(run)
    assert rec.status == "ok", rec.reason
    assert rec.inputs == spec and rec.softmax_rel_error < 1e-5


@pytest.mark.parametrize(("shape", "spec", "word"), [
    (Shape(1, HEADS, 64, 32, kv_heads=KV), "", "head_dim 16"),
    (Shape(1, HEADS, 10_000, D, kv_heads=KV), "", "positions"),
    (Shape(1, HEADS, 64, D, kv_heads=KV), "@layers:1", "layer 1 is not in"),
    (Shape(1, HEADS, 64, D, kv_heads=KV), "@heads:7", "query head 7"),
    (Shape(1, HEADS, 64, D, kv_heads=1), "", "at most 2 selected query heads"),
])
def test_a_point_the_capture_cannot_feed_is_one_line(captured, shape, spec, word):
    problem = inputs_problem(f"file:{captured}{spec}", shape, shape.seq_len)
    assert problem.startswith("inputs='file:") and word in problem, problem
    assert "\n" not in problem


def test_not_a_capture_is_one_line(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    shape = Shape(1, 2, 8, D)
    assert "not an attnbench capture" in inputs_problem(f"file:{other}", shape, 8)
    assert "no such file" in inputs_problem(f"file:{tmp_path}/nope.safetensors", shape, 8)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    assert "not a safetensors file" in inputs_problem(f"file:{junk}", shape, 8)


@pytest.mark.parametrize(("args", "word"), [
    (["{folder}", "{tmp}/none.txt", "-o", "{tmp}/x.safetensors"], "TEXT"),
    (["{folder}", "{text}", "-o", "{tmp}/x.safetensors", "--layers", "1-"], "--layers"),
    (["{folder}", "{text}", "-o", "{tmp}/x.safetensors", "--layers", "5"], "layers 0-2"),
    (["{tmp}/no-model", "{text}", "-o", "{tmp}/x.safetensors"], "MODEL"),
    (["{folder}", "{text}", "-o", "{tmp}/x.safetensors", "--tokens", "99999"], "--tokens"),
])
def test_capture_refuses_bad_input_in_one_line(tiny, tmp_path, capsys, args, word):
    folder, text, _ = tiny
    argv = [a.format(folder=folder, text=text, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as done:
        cli_main(["capture", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("attnbench: error: ") and word in err[0], err
    assert not (tmp_path / "x.safetensors").exists()


def test_capture_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["capture", "--help"])
    page = capsys.readouterr().out
    assert done.value.code == 0
    assert "inputs=file:" in page and "local_files_only" not in page and "MODEL" in page


def test_parse_keeps_the_path_and_the_selection():
    spec = parse_inputs("file:runs/a@b/x.safetensors@layers:0-2+7@heads:1")
    assert dataclasses.astuple(spec) == ("file", "runs/a@b/x.safetensors", (0, 1, 2, 7), (1,))
