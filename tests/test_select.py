"""MoBA and NSA against their definitions written from the papers, token by token in float64.

The loop references below share no code with the variants: they rebuild the selection per query
token (MoBA: q·mean(K_block), the own block forced; NSA: mean-pooled compression, eq. 9 by
overlap, eq. 10 over the k/v group, the first and 2 local blocks forced) and the attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import FORCE_GPU_PATHS, Shape
from attnbench.variants.reference import attention_reference, rel_error
from attnbench.variants.sparse import select, select_groups
from attnbench.variants.testing import assert_matches, random_qkv

MOBA = {"block": 16, "topk": 3}
NSA = {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_count": 4, "window": 20}
NSA_WIDE = {"cmp_block": 16, "cmp_stride": 8, "sel_block": 32, "sel_count": 3, "window": 40}
CASES = [("moba", MOBA), ("nsa", NSA), ("nsa", NSA_WIDE)]
IDS = ["moba", "nsa", "nsa-wide"]


def _softmax_over(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """q (D,), keys/vals (L, D) → (D,); zero when there is no key."""
    if len(keys) == 0:
        return torch.zeros_like(q)
    return torch.softmax(keys @ q / math.sqrt(len(q)), 0) @ vals


def moba_loop(q, k, v, block: int, topk: int) -> torch.Tensor:
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, nq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // (h // hkv)], v[bi, hi // (h // hkv)]
            for t in range(nq):
                p = n - nq + t
                own = p // block
                qt = q[bi, hi, t]
                past = [kk[j * block : (j + 1) * block].mean(0) @ qt for j in range(own)]
                chosen = sorted(range(own), key=lambda j: -float(past[j]))[: topk - 1]
                keys = [j for j in range(p + 1) if j // block in {own, *chosen}]
                out[bi, hi, t] = _softmax_over(qt, kk[keys], vv[keys])
    return out


def nsa_loop(q, k, v, lc: int, d: int, lp: int, count: int, w: int) -> torch.Tensor:
    b, h, nq, dim = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    a, c = lp // d, lc // d
    out = torch.zeros(b, h, nq, dim, dtype=torch.float64)
    for bi in range(b):
        for kh in range(hkv):
            kk, vv = k[bi, kh], v[bi, kh]
            for t in range(nq):
                p = n - nq + t
                blocks = [i for i in range(n) if i * d + lc <= p + 1]  # complete: i·d + l − 1 <= p
                kc = torch.stack([kk[i * d : i * d + lc].mean(0) for i in blocks]) if blocks \
                    else kk[:0]
                vc = torch.stack([vv[i * d : i * d + lc].mean(0) for i in blocks]) if blocks \
                    else vv[:0]
                own = p // lp
                imp = [0.0] * (own + 1)
                for hi in range(kh * g, (kh + 1) * g):
                    p_cmp = torch.softmax(kc @ q[bi, hi, t] / math.sqrt(dim), 0) if blocks \
                        else kc[:, 0]
                    for j in range(own + 1):  # eq. 9, aligned on block j's tokens (overlap)
                        for m in range(a):
                            for r in range(c):
                                i = a * j - (c - 1) + m + r
                                if 0 <= i < len(blocks):
                                    imp[j] += float(p_cmp[i])
                forced = {0, own, own - 1} & set(range(own + 1))
                rest = sorted(set(range(own + 1)) - forced, key=lambda j: -imp[j])
                chosen = forced | set(rest[: max(0, count - len(forced))])
                sel = [j for j in range(p + 1) if j // lp in chosen]
                win = list(range(max(0, p - w), p + 1))
                for hi in range(kh * g, (kh + 1) * g):
                    qt = q[bi, hi, t]
                    out[bi, hi, t] = (_softmax_over(qt, kc, vc)
                                      + _softmax_over(qt, kk[sel], vv[sel])
                                      + _softmax_over(qt, kk[win], vv[win])) / 3
    return out


def _loop(name: str, params: dict, q, k, v) -> torch.Tensor:
    if name == "moba":
        return moba_loop(q, k, v, params["block"], params["topk"])
    return nsa_loop(q, k, v, params["cmp_block"], params["cmp_stride"], params["sel_block"],
                    params["sel_count"], params["window"])


def _inputs(h=4, hkv=2, n=75, nq=75, seed=0, dtype=torch.float64, d=16):
    q, _, _ = random_qkv(1, h, n, d, dtype=dtype, seed=seed)
    _, k, v = random_qkv(1, hkv, n, d, dtype=dtype, seed=seed + 1)
    return q[:, :, n - nq :].contiguous(), k, v


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize(("hkv", "nq"), [(2, 75), (4, 75), (1, 23)], ids=["gqa", "mha", "mqa-q"])
def test_forward_and_reference_equal_the_paper_loop(name, params, hkv, nq):
    att = variants.build(name, **params)
    q, k, v = _inputs(hkv=hkv, nq=nq)  # n = 75: not a multiple of any block
    want = _loop(name, params, q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(att.reference(q, k, v, True), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(att(q, k, v, causal=True), want, rtol=1e-10, atol=1e-12)


@pytest.fixture
def gathered_calls(monkeypatch) -> list[int]:
    """One entry per call of the selected-block engine's gathered path (`select._gathered`)."""
    calls: list[int] = []
    real = select._gathered
    monkeypatch.setattr(select, "_gathered", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("hkv", [2, 4, 1], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "engine"])
def test_a_few_queries_equal_the_paper_loop(name, params, hkv, gathered, gathered_calls,
                                          monkeypatch):
    """A decode step or a few queries (fewer than a block): each item's keys gathered and one
    attention call (`select.gathers`), or, forced, the engine's tiles; both the paper loop."""
    if not gathered:
        monkeypatch.setattr(select, "GATHER_ITEMS", 0)
    att = variants.build(name, **params)
    q, k, v = _inputs(hkv=hkv, nq=5, seed=9)
    with torch.no_grad():
        got = att(q, k, v, causal=True)
    torch.testing.assert_close(got, _loop(name, params, q, k, v), rtol=1e-10, atol=1e-12)
    assert bool(gathered_calls) == gathered


@pytest.mark.parametrize(("name", "params"), [("moba", {}), ("nsa", {})], ids=["moba", "nsa"])
@pytest.mark.parametrize(("h", "hkv", "n"), [(8, 8, 1000), (8, 1, 300), (80, 1, 40)])
def test_decode_kernel_names_the_path_a_step_takes(name, params, h, hkv, n, gathered_calls):
    """`decode_kernel` says gathered exactly where a step gathers its keys (MoBA with 80 query
    heads per k/v head: more items than GATHER_ITEMS, the engine's tiles)."""
    att = variants.build(name, **params)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, 1, 16, generator=g)
    k, v = (torch.randn(1, hkv, n + 1, 16, generator=g) for _ in range(2))
    with torch.no_grad():
        state = att.decode_init(k[:, :, :n], v[:, :, :n], heads=h)
        att.decode_step(q, k[:, :, n:], v[:, :, n:], state)
    named = att.decode_kernel(Shape(1, h, n, 16, kv_heads=hkv), "cpu")
    assert ("gathered" in named) == bool(gathered_calls), (named, len(gathered_calls))


@pytest.mark.parametrize(("name", "params"), [("moba", {}), ("nsa", {})], ids=["moba", "nsa"])
@pytest.mark.parametrize(("b", "h", "hkv", "n"), [(1, 8, 8, 4096), (1, 8, 2, 3000),
                                                  (2, 4, 2, 100), (1, 32, 1, 200)])
def test_decode_flop_model_matches_the_dispatch_count(name, params, b, h, hkv, n):
    att = variants.build(name, **params)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, 1, 32, generator=g)
    k, v = (torch.randn(b, hkv, n + 1, 32, generator=g) for _ in range(2))
    with torch.no_grad():
        state = att.decode_init(k[:, :, :n], v[:, :, :n], heads=h)
        counted = count_call(lambda: att.decode_step(q, k[:, :, n:], v[:, :, n:], state)).flops
    assert att.decode_flops(Shape(b, h, n, 32, kv_heads=hkv)) == counted


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize(("hkv", "nq", "joined"), [(4, 75, True), (4, 43, True), (4, 37, False),
                                                   (2, 43, None)], ids=["all", "aligned-q",
                                                                        "offset-q", "gqa"])
def test_groups_equal_the_paper_loop(name, params, hkv, nq, joined, monkeypatch):
    """The CPU forward without autograd runs the selection by groups (`select_groups`), the own
    blocks joined where G = 1 and the first query starts a block (75 − 43 = 32: blocks before
    it hold no own rows; 75 − 37 = 38: off the boundary, the diagonal apart)."""
    seen = []
    real = select_groups.Groups.__init__

    def spy(self, rest, own, *args):
        seen.append(own is not None)
        real(self, rest, own, *args)

    monkeypatch.setattr(select_groups.Groups, "__init__", spy)
    att = variants.build(name, **params)
    q, k, v = _inputs(hkv=hkv, nq=nq, seed=5)
    with torch.no_grad():
        got = att(q, k, v, causal=True)
    torch.testing.assert_close(got, _loop(name, params, q, k, v), rtol=1e-10, atol=1e-12)
    want = joined if joined is not None else name == "moba"  # MoBA's G is 1: runs per head
    assert seen == [want], seen


@pytest.mark.parametrize("forced", ["0", "1"], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_matches_its_definition_forward_and_gradients(name, params, dtype, forced, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, forced)
    att = variants.build(name, **params)
    q, k, v = _inputs(n=203, nq=203, seed=3, dtype=dtype)

    def definition(q, k, v, causal):  # selection in float64, the attention in q's dtype
        return att.definition(q, k, v, causal, dtype=q.dtype)

    assert_matches(att, q, k, v, True, reference=definition)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_decode_steps_equal_the_rows_of_the_forward(name, params):
    att = variants.build(name, **params)
    q, k, v = _inputs(n=90, nq=90, seed=5)
    with torch.no_grad():
        rows = att(q, k, v, causal=True)
        state = att.decode_init(k[:, :, :45], v[:, :, :45])
        for t in range(45, 90):  # crosses block and compression-block boundaries
            out, state = att.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1],
                                         v[:, :, t : t + 1], state)
            torch.testing.assert_close(out, rows[:, :, t : t + 1], rtol=1e-9, atol=1e-12)


def test_decode_state_is_not_advanced_by_a_step():
    for name, params in CASES:
        att = variants.build(name, **params)
        q, k, v = _inputs(n=64, nq=64, seed=6)  # the step completes a block and a cmp block
        state = att.decode_init(k[:, :, :63], v[:, :, :63])
        one = (x[:, :, 63:] for x in (q, k, v))
        a, _ = att.decode_step(*one, state)
        b_, _ = att.decode_step(*(x[:, :, 63:] for x in (q, k, v)), state)
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


@pytest.mark.parametrize("nq", [75, 20])
def test_moba_with_every_block_selected_is_full_causal_attention(nq):
    att = variants.build("moba", block=16, topk=5)  # n = 75: 5 blocks
    q, k, v = _inputs(nq=nq, seed=7)
    want = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(att(q, k, v, causal=True), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(att.reference(q, k, v, True), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_approximates_softmax_attention(name, params):
    """Not exact softmax: its error against full causal softmax is real but bounded."""
    att = variants.build(name, **params)
    q, k, v = _inputs(n=203, nq=203, seed=8)
    with torch.no_grad():
        err = rel_error(att(q, k, v, causal=True), attention_reference(q, k, v, causal=True))
    assert 1e-3 < err < 1.0


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_flop_model_matches_the_dispatch_count(name, params, monkeypatch):
    """The GPU path's static layout: its model is the count (the CPU path is below)."""
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = variants.build(name, **params)
    shape = Shape(2, 4, 203, 16, kv_heads=2)
    q, k, v = _inputs(h=4, hkv=2, n=203, nq=203, seed=9, dtype=torch.float32)
    q, k, v = (torch.cat([x, x]).requires_grad_() for x in (q, k, v))  # batch 2
    with torch.no_grad():
        fwd = count_call(lambda: att(q, k, v, causal=True)).flops
    both = count_call(lambda: att(q, k, v, causal=True).sum().backward()).flops
    model = att.flops(shape, True)
    assert abs(model - fwd) <= 0.1 * fwd, (model, fwd)
    model_bwd = att.backward_flops(shape, True)
    assert abs(model_bwd - (both - fwd)) <= 0.1 * (both - fwd), (model_bwd, both - fwd)


@pytest.mark.parametrize("name", ["moba", "nsa"])
@pytest.mark.parametrize(("hkv", "n", "nq"), [(8, 2048, 2048), (2, 2048, 2048), (8, 2048, 1024),
                                              (8, 2048, 1000), (2, 3000, 1500)],
                         ids=["mha", "gqa", "q-from-a-block", "q-off-a-block", "gqa-q"])
def test_cpu_flop_model_matches_the_dispatch_count(name, hkv, n, nq):
    """The CPU path without autograd runs the selection by groups (the own blocks joined where
    they can) and NSA's compressed branch scores only the blocks complete by each span's last
    query: it counts no more than the GPU path's static layout, and its model (no padding of a
    call counted) is within 10% of the count at defaults, grouped heads and fewer queries."""
    att = variants.build(name)
    shape = Shape(1, 8, n, 16, kv_heads=hkv, q_len=nq)
    q, k, v = _inputs(h=8, hkv=hkv, n=n, nq=nq, seed=11, dtype=torch.float32, d=16)
    with torch.no_grad():
        fwd = count_call(lambda: att(q, k, v, causal=True)).flops
    model, static = att.flops(shape, True), att.flops(shape, True, device="cuda")
    assert fwd < static, (fwd, static)
    assert abs(model - fwd) <= 0.1 * fwd, (model, fwd)


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_memory_model_bounds_the_measured_peak(name):
    att = variants.build(name)
    shape = Shape(1, 4, 2048, 64, kv_heads=2)
    q, k, v = _inputs(h=4, hkv=2, n=2048, nq=2048, seed=10, dtype=torch.float32, d=64)
    with torch.no_grad():
        att(q, k, v, causal=True)
        peak = peak_memory(lambda: att(q, k, v, causal=True))
    predicted = att.memory_bytes(shape, torch.float32, True)
    assert peak <= predicted <= 4 * peak, (peak, predicted)


def test_non_causal_is_a_reason_not_a_crash():
    for name in ("moba", "nsa"):
        att = variants.build(name)
        reasons = att.not_supported_reasons(Shape(1, 2, 256, 16), torch.float32, "cpu", False)
        assert reasons and "causal only" in reasons[0]
        with pytest.raises(ValueError, match="causal only"):
            att(*random_qkv(1, 2, 64, 16, seed=0), causal=False)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="topk"):
        variants.build("moba", topk=0)
    with pytest.raises(ValueError, match="cmp_stride"):
        variants.build("nsa", cmp_block=32, cmp_stride=12)


@pytest.mark.parametrize("n", [10, 16, 75, 200])
def test_moba_density_counts_the_scores_its_blocks_cover(n):
    """Token by token: the own block (clipped at n) and min(topk − 1, earlier blocks) whole
    blocks, over n². Never the engine's padded tiles: at n = 64 with blocks of 128 it once said
    12.0 (now 1.0)."""
    att = variants.build("moba", **MOBA)
    b = MOBA["block"]
    pairs = 0
    for p in range(n):
        own = p // b
        pairs += min(n, (own + 1) * b) - own * b + b * min(MOBA["topk"] - 1, own)
    assert att.density(n, True) == pytest.approx(pairs / n**2)
    assert variants.build("moba").density(64, True) == 1.0


@pytest.mark.parametrize(("params", "n"), [(NSA, 75), (NSA_WIDE, 200), (NSA, 200)])
def test_nsa_density_bounds_the_scores_its_blocks_cover(params, n):
    """An upper bound of the distinct query–key pairs its selected and window blocks cover
    (whole blocks clipped at n), counted token by token from a real selection; at most 1."""
    att = variants.build("nsa", **params)
    q, k, _ = _inputs(h=2, hkv=1, n=n, nq=n)
    lp, w = params["sel_block"], params["window"]
    qpos = torch.arange(n)
    qi = q.view(1, 1, 2, n, 16).transpose(2, 3).reshape(1, n, 2, 16)
    kz = k.reshape(1, n, 16)
    _, p_cmp = att._compressed(qi, att._compress(kz), att._compress(kz), qpos)
    rest = att._select(p_cmp, qpos, n)[0]  # (N, S) blocks besides the own one
    pairs = 0
    for p in range(n):
        window = {j // lp for j in range(max(0, p - w), p + 1)}
        chosen = {p // lp} | {int(j) for j in rest[p] if j >= 0} | window
        pairs += sum(min(n, (j + 1) * lp) - j * lp for j in chosen)
    assert pairs / n**2 <= att.density(n, True) <= 1.0
    assert variants.build("nsa").density(64, True) == 1.0


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize(("nq", "grad"), [(75, False), (75, True), (10, False)],
                         ids=["prefill", "training", "few-queries"])
def test_kernel_names_the_path_that_runs(name, params, nq, grad, monkeypatch):
    """`kernel` says groups exactly where the forward builds the key-block groups (the CPU
    without autograd, a block of queries or more), gather where the tiles run."""
    built = []
    real = select_groups.Groups.__init__

    def spy(self, *args):
        built.append(True)
        real(self, *args)

    monkeypatch.setattr(select_groups.Groups, "__init__", spy)
    att = variants.build(name, **params)
    q, k, v = _inputs(hkv=4, nq=nq, seed=6, dtype=torch.float32)
    for x in (q, k, v):
        x.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        att(q, k, v, causal=True)
    label = att.kernel(Shape(1, 4, 75, 16, kv_heads=4, q_len=nq), "cpu", True, grad)
    assert ("select:groups-" in label) == bool(built), (label, built)
    assert ("select:gather-" in label) == (not built), label
