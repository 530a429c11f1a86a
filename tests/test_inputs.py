"""Input kinds: seeded, shaped (grouped heads, q_len), and each kind's attention looks like what
its docstring says, measured with a float64 softmax written here."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.harness.run import inputs as inputs_module
from attnbench.harness.run.inputs import (
    KINDS,
    attention_entropy,
    attention_stats,
    inputs_problem,
    make_inputs,
    parse_inputs,
)
from attnbench.variants.base import Shape

SHAPE = Shape(1, 4, 2048, 64)
GQA = Shape(2, 9, 2048, 64, kv_heads=3)  # SmolLM2-135M's heads, two batch elements
STRUCTURED = ("local", "sink", "heavy", "realistic")

# What each kind's docstring promises, causal at n=2048 (harness/run/inputs.py, README
# "Inputs"): (low, high) per statistic. realistic: the real sample's statistics (all 30 layers:
# entropy 2.55, sink 0.30, local64 0.41, local256 0.56, heavy 0.33) within ±0.35 nats and ±0.07.
RANGES = {
    "gaussian": {"entropy": (5.5, 7.0), "sink": (0, 0.02), "heavy": (0, 0.1)},
    "local": {"entropy": (2.5, 3.6), "sink": (0, 0.02), "local64": (0.6, 0.9),
              "local256": (0.75, 0.95)},
    "sink": {"sink": (0.25, 0.35), "local64": (0, 0.15)},
    "heavy": {"heavy": (0.26, 0.40), "sink": (0, 0.02), "local64": (0, 0.2)},
    "realistic": {"entropy": (2.2, 2.9), "sink": (0.23, 0.37), "local64": (0.34, 0.48),
                  "local256": (0.48, 0.64), "heavy": (0.26, 0.40)},
}


def _stats(q: torch.Tensor, k: torch.Tensor, rows: int = 256) -> dict[str, float]:
    """The statistics by their definitions, float64, causal: means over batch, heads and 256
    evenly spaced query rows."""
    n, d = k.shape[-2], k.shape[-1]
    idx = [round(i * (n - 1) / (rows - 1)) for i in range(rows)]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("bhrd,bhnd->bhrn", q[:, :, idx].double(), kk) / math.sqrt(d)
    pos = torch.tensor(idx)[:, None]
    key = torch.arange(n)[None, :]
    s[..., key.expand(rows, n) > pos] = -math.inf
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    near = lambda w: ((pos - key >= 0) & (pos - key < w))  # noqa: E731
    far = p * ~near(64)
    far[..., 0] = 0
    col = far.sum(-2)  # (B, H, N)
    top = col.sort(-1, descending=True).values[..., : n // 100].sum(-1)
    return {"entropy": ent.mean().item(), "sink": p[..., 0].mean().item(),
            "local64": (p * near(64)).sum(-1).mean().item(),
            "local256": (p * near(256)).sum(-1).mean().item(),
            "heavy": (top / col.sum(-1)).mean().item()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_seeded_and_shaped(kind):
    a = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=3, kind=kind)
    b = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=3, kind=kind)
    c = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=4, kind=kind)
    for x, y, z in zip(a, b, c, strict=True):
        assert x.shape == (1, 4, 2048, 64) and x.dtype == torch.bfloat16
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert 0.5 < float(x.float().std()) < 2.5  # unit scale, within a factor of 2.5


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_grouped_heads_and_q_len(kind):
    """q (B, H, q_len, D), the last q_len positions of the q_len=0 draw; k, v (B, Hkv, N, D)."""
    shape = Shape(2, 6, 300, 32, kv_heads=2, q_len=100)
    q, k, v = make_inputs(shape, torch.float32, "cpu", seed=1, kind=kind)
    assert q.shape == (2, 6, 100, 32) and k.shape == v.shape == (2, 2, 300, 32)
    q0, k0, v0 = make_inputs(Shape(2, 6, 300, 32, kv_heads=2), torch.float32, "cpu", seed=1,
                             kind=kind)
    assert torch.equal(q, q0[:, :, 200:]) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("kind", STRUCTURED)
def test_grouped_query_heads_share_their_kv_heads_structure(kind):
    """Every query head of a group sees the structure of its own k/v head: its statistics are
    those of the kind, not of unrelated q and k."""
    floors = {"local": {"local64": 0.6}, "sink": {"sink": 0.2}, "heavy": {"heavy": 0.2},
              "realistic": {"local64": 0.25, "sink": 0.15, "heavy": 0.15}}[kind]
    q, k, _ = make_inputs(GQA, torch.float32, "cpu", seed=0, kind=kind)
    for h in range(GQA.heads):  # each query head alone, with its k/v head
        s = _stats(q[:, h:h + 1], k[:, h // GQA.groups:h // GQA.groups + 1])
        for name, floor in floors.items():
            assert s[name] > floor, (kind, h, s)


@pytest.mark.parametrize("kind", sorted(RANGES))
def test_statistics_land_in_the_documented_ranges(kind):
    q, k, _ = make_inputs(GQA, torch.float32, "cpu", seed=0, kind=kind)
    mine = _stats(q, k)
    for name, (lo, hi) in RANGES[kind].items():
        assert lo <= mine[name] <= hi, (kind, name, mine)
    # attention_stats (what benchmarks/input_stats.py prints) agrees with the definition
    theirs = attention_stats(q, k)
    for name, value in mine.items():
        assert theirs[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_locality_decays_with_distance():
    """local: mean weight per key falls with distance: 0–15 > 16–63 > 64–255 > beyond."""
    q, k, _ = make_inputs(Shape(1, 4, 2048, 64), torch.float32, "cpu", kind="local")
    idx = list(range(1024, 2048, 16))
    s = q[:, :, idx].double() @ k.double().transpose(-2, -1) / 8
    dist = torch.tensor(idx)[:, None] - torch.arange(2048)[None, :]
    s[..., dist < 0] = -math.inf
    p = torch.softmax(s, -1)
    bands = [(0, 16), (16, 64), (64, 256), (256, 1024)]
    per_key = [float((p * ((dist >= a) & (dist < b))).sum(-1).mean()) / (b - a)
               for a, b in bands]
    assert per_key == sorted(per_key, reverse=True), per_key
    assert per_key[0] > 20 * per_key[-1], per_key


def test_sink_is_key_zero_with_a_small_value_and_heavy_hitters_are_few():
    q, k, v = make_inputs(GQA, torch.float32, "cpu", kind="sink")
    s = q.double() @ k.double().repeat_interleave(3, 1).transpose(-2, -1) / 8
    s[..., torch.ones(2048, 2048, dtype=torch.bool).triu(1)] = -math.inf
    col = torch.softmax(s, -1).sum(-2)  # (B, H, N): mass each key takes
    assert bool((col.argmax(-1) == 0).all())
    assert float(v[:, :, 0].norm(dim=-1).mean()) < 0.3 * float(v[:, :, 1:].norm(dim=-1).mean())
    q, k, _ = make_inputs(GQA, torch.float32, "cpu", kind="heavy")
    s = q.double() @ k.double().repeat_interleave(3, 1).transpose(-2, -1) / 8
    col = torch.softmax(s, -1).sum(-2)  # non-causal: every query sees every hitter
    top = col.sort(-1, descending=True).values
    assert float((top[..., :8].sum(-1) / col.sum(-1)).min()) > 0.3  # 2048/256 = 8 hitters
    assert float((top[..., 8:16].sum(-1) / col.sum(-1)).max()) < 0.05


def test_entropy_peaked_far_below_uniform_gaussian_near():
    log_n = math.log(SHAPE.seq_len)
    q, k, _ = make_inputs(SHAPE, torch.float32, "cpu", seed=0, kind="gaussian")
    h_gauss = attention_entropy(q, k)
    q, k, _ = make_inputs(SHAPE, torch.float32, "cpu", seed=0, kind="peaked")
    h_peaked = attention_entropy(q, k)
    assert h_gauss > 0.9 * log_n, (h_gauss, log_n)
    assert h_peaked < 0.3 * log_n, (h_peaked, log_n)


def test_entropy_follows_the_points_mask():
    """The record's `entropy` is of the attention the point computes: under its causal mask
    (grouped heads, the last Nq positions as queries), checked row by row against a float64
    softmax written here; causal rows see fewer keys, so gaussian entropy drops."""
    shape = Shape(1, 4, 96, 16, kv_heads=2, q_len=40)
    q, k, _ = make_inputs(shape, torch.float32, "cpu", seed=3, kind="gaussian")
    got = attention_entropy(q, k, rows=40, causal=True)
    kk = k.double().repeat_interleave(2, dim=1)
    want = []
    for h in range(4):
        for i in range(40):
            pos = 96 - 40 + i
            s = q[0, h, i].double() @ kk[0, h, : pos + 1].T / 4.0
            p = torch.softmax(s, -1)
            want.append(float(-(p * p.log()).sum()))
    assert got == pytest.approx(sum(want) / len(want), rel=1e-12)
    assert attention_entropy(q, k, rows=40) > got


def test_gaussian_and_peaked_draws_are_unchanged():
    """The draw of the two old kinds at kv_heads = 0, q_len = 0 is what it always was: three
    standard normal draws from the seed, in order."""
    g = torch.Generator().manual_seed(7)
    want = [torch.randn(1, 2, 16, 8, generator=g) for _ in range(3)]
    got = make_inputs(Shape(1, 2, 16, 8), torch.float32, "cpu", seed=7, kind="gaussian")
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="peaked"):
        make_inputs(SHAPE, torch.float32, "cpu", kind="nope")


@pytest.mark.parametrize(("text", "kind", "path", "layers", "heads"), [
    ("gaussian", "gaussian", "", None, None),
    ("real", "real", "", None, None),
    ("real@layers:3", "real", "", (3,), None),
    ("real@layers:0-2+9@heads:4", "real", "", (0, 1, 2, 9), (4,)),
    ("file:a/b.safetensors", "file", "a/b.safetensors", None, None),
    ("file:me@host/x.safetensors@heads:1+0", "file", "me@host/x.safetensors", None, (1, 0)),
])
def test_parse_inputs(text, kind, path, layers, heads):
    spec = parse_inputs(text)
    assert (spec.kind, spec.path, spec.layers, spec.heads) == (kind, path, layers, heads)


@pytest.mark.parametrize(("text", "word"), [
    ("nope", "expected one of gaussian"),
    ("real@layer:3", "unknown selection @layer:"),
    ("real@layers:3-1", "not a list"),
    ("real@layers:a", "not a list"),
    ("real@layers:1@layers:2", "given twice"),
    ("gaussian@layers:1", "synthetic"),
    ("file:", "needs a path"),
])
def test_bad_inputs_are_one_line_naming_inputs(text, word):
    problem = inputs_problem(text, SHAPE, SHAPE.seq_len)
    assert problem.startswith(f"inputs={text!r}: ") and word in problem, problem
    assert "\n" not in problem


def test_structured_kinds_need_an_even_head_dim():
    assert "even head_dim" in inputs_problem("local", Shape(1, 2, 64, 7), 64)
    assert inputs_problem("gaussian", Shape(1, 2, 64, 7), 64) == ""


def test_real_without_the_extra_says_how_to_get_it(monkeypatch):
    from attnbench.harness.run import capture

    monkeypatch.setattr(capture, "missing_packages", lambda names: ["transformers"])
    problem = inputs_problem("real", Shape(1, 9, 64, 64, kv_heads=3), 64)
    assert problem.startswith("inputs='real': real needs the optional `real` extra"), problem
    assert "transformers" in problem and "EXTRAS=test,real" in problem
    assert inputs_module.REPLAYED == ("real", "file")


def test_realistic_values_share_a_direction_like_the_real_samples():
    """15% of v's energy in its k/v head's mean (the real sample: 0.05–0.24 by layer)."""
    _, _, v = make_inputs(GQA, torch.float64, "cpu", kind="realistic")
    v = v[:, :, 1:]  # the sink's value is scaled down
    share = v.mean(2).square().sum(-1) / v.square().sum(-1).mean(-1)  # (B, Hkv)
    assert float(share.min()) > 0.12 and float(share.max()) < 0.18, share
    _, _, v = make_inputs(GQA, torch.float64, "cpu", kind="local")
    share = v.mean(2).square().sum(-1) / v.square().sum(-1).mean(-1)
    assert float(share.max()) < 0.01, share
