"""retnet, gla, mamba2 against float64 definitions written here from the papers (not from the
variants' helpers), and their chunked, per-step and decode forms against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.variants.recurrent.decay_chunk import chunk_decay
from attnbench.variants.recurrent.decay_recurrent import recurrent_decay
from attnbench.variants.reference import rel_error
from attnbench.variants.testing import assert_matches, random_qkv

NAMES = ["retnet", "gla", "mamba2"]


def _heads(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def retnet_ref(att):
    """Parallel retention (Sun et al. eq. 5): (QKᵀ/√d ⊙ D) V, D_ts = γ_h^(t−s) for s ≤ t."""

    def ref(q, k, v, causal):
        k, v = _heads(q, k, v)
        h, nq, nk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
        gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float64))
        t = torch.arange(nk - nq, nk, dtype=torch.float64)[:, None]  # query positions
        s = torch.arange(nk, dtype=torch.float64)[None, :]
        dist = (t - s)[None]  # (1, Nq, Nk)
        dmat = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp_min(0), 0.0)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        return (scores * dmat.to(q.dtype)) @ v

    return ref


def gla_ref(att):
    """GLA recurrence (Yang et al. eq. 3): S_t = Diag(α_t) S_{t−1} + k_tᵀv_t, o_t = q_t S_t,
    α_t = σ(k_t W)^(1/τ), W ~ N(0, 1/d) from the documented generator."""

    def ref(q, k, v, causal):
        d = k.shape[-1]
        g = torch.Generator().manual_seed(att.seed)
        w = (torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(q.dtype)
        alpha = torch.sigmoid(k @ w) ** (1 / att.tau)  # per k/v head
        k, v = _heads(q, k, v)
        alpha, _ = _heads(q, alpha, alpha)
        nq, nk = q.shape[2], k.shape[2]
        s = q.new_zeros(*q.shape[:2], d, v.shape[-1])
        out = []
        for t in range(nk):
            s = alpha[:, :, t, :, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
            if t >= nk - nq:
                out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t - nk + nq], s))
        return torch.stack(out, 2)

    return ref


def mamba2_ref(att):
    """SSD quadratic form (Dao & Gu, eq. 16): y = (L ∘ C Bᵀ) (Δ x), L_ts = exp(A Σ_{s<u≤t} Δ_u)."""

    def ref(q, k, v, causal):
        h, nq, d, nk = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
        g = torch.Generator().manual_seed(att.seed)
        a = -torch.exp(torch.linspace(0, math.log(16), h, dtype=torch.float64))
        u = torch.rand(h, generator=g, dtype=torch.float64)
        dt0 = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))
        bias = torch.log(torch.expm1(dt0))  # softplus⁻¹
        w = torch.randn(h, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        k, v = _heads(q, k, v)
        dt = F.softplus(torch.einsum("bhnd,hd->bhn", k, w.to(q.dtype)) + bias[:, None].to(q.dtype))
        cum = torch.cumsum(dt * a[:, None].to(q.dtype), -1)  # (B, H, Nk)
        seg = cum[..., nk - nq:, None] - cum[..., None, :]  # (B, H, Nq, Nk)
        t = torch.arange(nk - nq, nk)[:, None]
        causal_mask = torch.arange(nk)[None, :] <= t
        lmat = torch.where(causal_mask, seg, -math.inf).exp()
        return ((q @ k.transpose(-2, -1)) * lmat) @ (dt[..., None] * v)

    return ref


REFS = {"retnet": retnet_ref, "gla": gla_ref, "mamba2": mamba2_ref}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_paper_definition(name, dtype):
    att = variants.build(name, chunk=16)
    q, k, v = random_qkv(2, 3, 75, 16, dtype)  # 75: not a multiple of the chunk
    assert_matches(att, q, k, v, causal=True, reference=REFS[name](att))


@pytest.mark.parametrize("name", NAMES)
def test_own_reference_is_the_papers(name):
    att = variants.build(name)
    q, k, v = random_qkv(1, 4, 40, 8)
    k, v = k[:, :2], v[:, :2]
    assert rel_error(att.reference(q, k, v, True), REFS[name](att)(q, k, v, True)) < 1e-12
    assert rel_error(att.reference(q[:, :, -7:], k, v, True),
                     REFS[name](att)(q[:, :, -7:], k, v, True)) < 1e-12


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_recurrent(name, chunk):
    q, k, v = random_qkv(2, 2, 64 + 13, 8)
    out = variants.build(name, chunk=chunk)(q, k, v, causal=True)
    rec = variants.build(name, impl="recurrent")(q, k, v, causal=True)
    assert rel_error(out, rec) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_grouped_query_heads_equal_repeated_kv(name):
    att = variants.build(name, chunk=16)
    q, _, _ = random_qkv(2, 6, 50, 8)
    _, k, v = random_qkv(2, 2, 50, 8)
    out = att(q, k, v, causal=True)
    assert rel_error(out, att(q, *_heads(q, k, v), causal=True)) < 1e-12
    assert rel_error(out, REFS[name](att)(q, k, v, True)) < 1e-12
    rec = variants.build(name, impl="recurrent")(q, k, v, causal=True)
    assert rel_error(rec, out) < 1e-12


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", NAMES)
def test_fewer_queries_are_the_last_rows(name, impl):
    att = variants.build(name, chunk=16, impl=impl)
    q, k, v = random_qkv(1, 4, 83, 8)
    full = att(q, k, v, causal=True)
    for nq in (1, 16, 30):
        assert rel_error(att(q[:, :, -nq:], k, v, causal=True), full[:, :, -nq:]) < 1e-12


@pytest.mark.parametrize("kv_heads", [3, 1])
@pytest.mark.parametrize("name", NAMES)
def test_decode_steps_equal_the_causal_rows(name, kv_heads):
    att = variants.build(name, chunk=16)
    q, _, _ = random_qkv(2, 3, 60, 8)
    _, k, v = random_qkv(2, kv_heads, 60, 8)
    full = att(q, k, v, causal=True)
    start = 50
    state = att.decode_init(k[:, :, :start], v[:, :, :start], heads=3)
    for t in range(start, 60):  # ten consecutive steps
        out, state = att.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        assert rel_error(out, full[:, :, t:t + 1]) < 1e-12, t


def test_decode_init_without_heads_says_what_is_missing():
    att = variants.build("retnet")
    q, _, _ = random_qkv(1, 4, 5, 8)
    _, k, v = random_qkv(1, 2, 5, 8)
    state = att.decode_init(k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="heads=4"):
        att.decode_step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)


def _float64_recurrence(q, k, v, log_a):
    s = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1]).double()
    out = []
    for t in range(q.shape[2]):
        s = log_a[:, :, t, :, None].double().exp() * s + \
            k[:, :, t, :, None].double() * v[:, :, t, None, :].double()
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t].double(), s))
    return torch.stack(out, 2), s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_dim", [True, False], ids=["per_dim", "scalar"])
def test_engine_stable_for_decays_near_zero(per_dim, dtype):
    """Log-decays from −1e-3 to −1e3 mixed inside chunks (gates near 0 next to gates near 1):
    every exponent of the chunked form is ≤ 0 and a same-sign sum, so nothing overflows and the
    mild segments after a strong decay keep their precision."""
    g = torch.Generator().manual_seed(0)
    n, d = 150, 8
    q, k, v = (torch.randn(1, 2, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    shape = (1, 2, n, d if per_dim else 1)
    strong = torch.rand(shape, generator=g, dtype=torch.float64) < 0.1
    log_a = torch.where(strong, -1e3, -1e-3 * torch.rand(shape, generator=g, dtype=torch.float64))
    gold, gold_state = _float64_recurrence(q, k, v, log_a)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, log_a)]
    out, state = chunk_decay(*leaves, chunk=64)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_error(out, gold) < tol and rel_error(state, gold_state) < tol
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_gla_with_gates_near_zero_matches_reference():
    att = variants.build("gla", tau=1.0)  # τ = 1: σ(k W) itself, near 0 for large negative kW
    q, k, v = random_qkv(1, 2, 90, 16, torch.float32)
    k = k * 40  # |k W| ~ 40: gates from e^-40 to 1
    assert_matches(att, q, k, v, causal=True, reference=gla_ref(att))


def test_recurrent_engine_without_queries_gives_the_state():
    q, k, v = random_qkv(1, 2, 20, 4)
    log_a = -torch.rand(1, 2, 20, 4, dtype=torch.float64)
    _, state = recurrent_decay(q, k, v, log_a)
    out, only = recurrent_decay(None, k, v, log_a)
    assert out is None and rel_error(only, state) < 1e-14


@pytest.mark.parametrize("name", NAMES)
def test_what_is_supported(name):
    att = variants.build(name)
    shape = variants.Shape(1, 4, 256, 16, kv_heads=2, q_len=8)
    assert att.not_supported_reasons(shape, torch.float32, "cpu", True) == []
    assert att.not_supported_reasons(shape, torch.float32, "cpu", True, "decode") == []
    assert any("causal only" in r for r in att.not_supported_reasons(
        shape, torch.float32, "cpu", False))
    fla = variants.build(name, impl="fla")
    assert any("CUDA" in r for r in fla.not_supported_reasons(shape, torch.float32, "cpu", True))
    assert att.has_decode and att.family == "recurrent" and not att.exact
    assert att.kernel(shape, "cpu", True, False).startswith("chunk")


@pytest.mark.parametrize("name", NAMES)
def test_launch_light_and_no_host_syncs(name):
    """Ops per call do not grow with batch or heads (only with n / chunk), no host syncs."""
    att = variants.build(name, chunk=32)

    def ops(b, h, n):
        q, _, _ = random_qkv(b, h, n, 16, torch.float32, seed=0)
        _, k, v = random_qkv(b, max(1, h // 2), n, 16, torch.float32, seed=1)
        with torch.no_grad():
            att(q, k, v, causal=True)  # caches built outside the count
            count = count_call(lambda: att(q, k, v, causal=True))
        assert count.host_syncs == 0
        return count.ops

    assert ops(2, 4, 256) == ops(3, 8, 256)  # (size-1 dims let einsum skip a view or two)


@pytest.mark.parametrize("name", NAMES)
def test_memory_model_bounds_the_peak(name):
    att = variants.build(name)
    for shape in (variants.Shape(1, 4, 1000, 32), variants.Shape(1, 4, 1000, 32, kv_heads=2,
                                                                  q_len=300)):
        q, _, _ = random_qkv(1, shape.heads, shape.nq, 32, torch.float32, seed=0)
        _, k, v = random_qkv(1, shape.hkv, shape.seq_len, 32, torch.float32, seed=1)
        with torch.no_grad():
            measured = peak_memory(lambda q=q, k=k, v=v: att(q, k, v, causal=True))
        predicted = att.memory_bytes(shape, torch.float32, True)
        assert measured <= predicted <= 6 * measured, (shape, measured, predicted)


def test_linear_in_n():
    for name in NAMES:
        att = variants.build(name)
        f1, f2 = (att.flops(variants.Shape(1, 8, n, 64), True) for n in (4096, 8192))
        assert math.isclose(f2 / f1, 2, rel_tol=0.01)


def test_gates_are_seeded():
    k = random_qkv(1, 2, 10, 8)[1]
    for name in ("gla", "mamba2"):
        a, b, c = (variants.build(name, seed=s).gates(k, 2)[0] for s in (0, 0, 1))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_params_validated_and_labelled():
    for name, field, bad in [("retnet", "chunk", 0), ("gla", "tau", 0.0), ("mamba2", "impl", "x")]:
        with pytest.raises(ValueError, match=field):
            variants.build(name, **{field: bad})
    assert variants.build("retnet").label == "retnet"
    assert variants.build("gla", impl="recurrent").label == "gla[recurrent]"
    assert variants.build("mamba2", chunk=128).label == "mamba2[chunk=128]"


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_flops_count_the_causal_triangles(name):
    """The least work of the chunked form, counted here position by position: each query
    against the keys of its chunk up to itself (scores and A·V), each position's state update
    per state head and read per query head; the context only updates. Never above what runs."""
    att = variants.build(name, chunk=16)
    for shape in (variants.Shape(2, 4, 100, 8), variants.Shape(1, 4, 90, 8, kv_heads=2, q_len=37)):
        L, d = 16, shape.head_dim
        ha = shape.heads if att.per_query_head else shape.hkv
        pairs = sum(t % L + 1 for t in range(shape.nq))  # keys s ≤ t in t's chunk
        want = shape.batch * (shape.heads * pairs * 2 * 2 * d
                              + 2 * (ha * shape.seq_len + shape.heads * shape.nq) * d * d)
        got = att.algorithm_flops(shape) - att.gate_flops(shape)
        assert got == want and att.algorithm_flops(shape) <= att.flops(shape, True)
