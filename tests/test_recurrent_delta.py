"""deltanet and gated_deltanet against the delta rule as the papers write it, in float64.

`paper_reference` is written from the papers (Schlag et al. 2021, arXiv 2102.11174; Yang et al.
2025, arXiv 2412.06464), independently of the engine: the state in their d_v × d_k convention,
S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t, one step at a time with the
d×d transition matrix built explicitly. Only the fixed gate parameters (`gate_weights`, the
variants' documented draw) are shared.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import FORCE_GPU_PATHS, Shape
from attnbench.variants.recurrent import segments
from attnbench.variants.recurrent.decays import decay_matrix, decay_matrix_into, segsum
from attnbench.variants.recurrent.delta import gate_weights
from attnbench.variants.recurrent.delta_chunk import chunk_delta
from attnbench.variants.recurrent.delta_recurrent import recurrent_delta
from attnbench.variants.reference import rel_error
from attnbench.variants.testing import assert_matches, random_qkv

NAMES = ["deltanet", "gated_deltanet"]


def paper_reference(att):
    """The recurrence of the papers in the dtype of its inputs; grouped k/v heads repeated."""

    def ref(q, k, v, causal):
        assert causal
        b, h, nq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        w, a, bias = gate_weights(att.seed, hkv, d, q.device, q.dtype)
        x = torch.einsum("bhnd,hde->bhne", k, w)  # gates from the raw keys, per k/v head
        beta = torch.sigmoid(x[..., 0])
        alpha = torch.ones_like(beta)
        if att.name == "gated_deltanet":
            alpha = torch.exp(-a[:, None] * F.softplus(x[..., 1] + bias[:, None]))
        k, v, beta, alpha = (t.repeat_interleave(h // hkv, dim=1) for t in (k, v, beta, alpha))
        qn = q / q.norm(dim=-1, keepdim=True)
        kn = k / k.norm(dim=-1, keepdim=True)
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        s = q.new_zeros(b, h, d, d)  # d_v × d_k
        outs = []
        for t in range(n):
            kt, vt = kn[:, :, t, :, None], v[:, :, t, :, None]  # columns (B, H, D, 1)
            bt, at = beta[:, :, t, None, None], alpha[:, :, t, None, None]
            s = at * s @ (eye - bt * kt @ kt.transpose(-1, -2)) + bt * vt @ kt.transpose(-1, -2)
            if t >= n - nq:
                outs.append(s @ qn[:, :, t - (n - nq), :, None])  # S_t q_t, (B, H, D, 1)
        return torch.cat(outs, -1).transpose(-1, -2)  # (B, H, Nq, D)

    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_chunked_matches_paper_recurrence(name, dtype):
    att = variants.build(name, chunk=16)
    q, k, v = random_qkv(2, 3, 75, 16, dtype)  # 75: not a multiple of the chunk
    assert_matches(att, q, k, v, causal=True, reference=paper_reference(att))


@pytest.mark.parametrize("name", NAMES)
def test_recurrent_impl_matches_paper_recurrence(name):
    att = variants.build(name, impl="recurrent")
    q, k, v = random_qkv(1, 2, 29, 8, torch.float32)
    assert_matches(att, q, k, v, causal=True, reference=paper_reference(att))


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_the_paper_recurrence(name):
    att = variants.build(name)
    q, k, v = random_qkv(2, 2, 41, 8)
    assert rel_error(att.reference(q, k, v, True), paper_reference(att)(q, k, v, True)) < 1e-13


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_recurrent(name, chunk):
    q, k, v = random_qkv(2, 2, 77, 8)
    out = variants.build(name, chunk=chunk)(q, k, v, causal=True)
    rec = variants.build(name, impl="recurrent")(q, k, v, causal=True)
    assert rel_error(out, rec) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_grouped_heads_match_repeated_reference(name):
    att = variants.build(name, chunk=16)
    q = random_qkv(2, 6, 53, 16, torch.float32)[0]
    _, k, v = random_qkv(2, 2, 53, 16, torch.float32)
    assert_matches(att, q, k, v, causal=True, reference=paper_reference(att))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("name", NAMES)
def test_fewer_queries_are_the_last_rows(name, kv_heads):
    att = variants.build(name, chunk=16)
    q = random_qkv(2, 4, 70, 8)[0]
    _, k, v = random_qkv(2, kv_heads, 70, 8)
    full = att(q, k, v, causal=True)
    for m in (1, 13, 33):
        assert rel_error(att(q[:, :, -m:], k, v, causal=True), full[:, :, -m:]) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_fewer_queries_match_paper_recurrence(name):
    att = variants.build(name, chunk=16)
    q = random_qkv(1, 4, 21, 16, torch.float32)[0]
    _, k, v = random_qkv(1, 2, 60, 16, torch.float32)
    assert_matches(att, q, k, v, causal=True, reference=paper_reference(att))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_decode_continues_the_forward(name, dtype):
    """decode_init on the first n − 10 tokens, then ten steps: each equals its causal row."""
    att = variants.build(name, chunk=16)
    n = 75
    q = random_qkv(2, 4, n, 16, dtype)[0]
    _, k, v = random_qkv(2, 2, n, 16, dtype)
    full = att(q, k, v, causal=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    state = att.decode_init(k[:, :, : n - 10], v[:, :, : n - 10])
    for t in range(n - 10, n):
        out, state = att.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                                     state)
        assert out.shape == (2, 4, 1, 16) and out.dtype == dtype
        assert rel_error(out, full[:, :, t : t + 1]) < tol, t
    state = att.decode_init(k[:, :, : n - 1], v[:, :, : n - 1])  # the last row, from n − 1
    out, _ = att.decode_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
    assert rel_error(out, full[:, :, -1:]) < tol


@pytest.mark.parametrize("name", NAMES)
def test_noncausal_is_unsupported(name):
    att = variants.build(name)
    shape = Shape(1, 2, 64, 16)
    reasons = att.not_supported_reasons(shape, torch.float32, "cpu", causal=False)
    assert reasons and "causal only" in reasons[0]
    assert not att.not_supported_reasons(shape, torch.float32, "cpu", causal=True)
    assert not att.not_supported_reasons(shape, torch.float32, "cpu", False, mode="decode")
    q, k, v = random_qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="causal only"):
        att(q, k, v, causal=False)


@pytest.mark.parametrize("name", NAMES)
def test_fla_says_why_not_here(name):
    att = variants.build(name, impl="fla")
    reasons = att.not_supported_reasons(Shape(1, 4, 64, 16, kv_heads=2), torch.float32, "cpu",
                                        True)
    text = "; ".join(reasons)
    assert "CUDA" in text and "float32" in text and "k heads" in text
    assert att.kernel(Shape(1, 4, 64, 16), "cuda", True, False).startswith("fla:")
    assert variants.build(name).kernel(Shape(1, 4, 64, 16), "cpu", True, False) == "chunk-wy"


def _fake_fla(monkeypatch):
    """fla's chunk kernels as their docstrings define them, (B, T, H, ·) layout, o = scale·q S,
    state (B, H, K, V), g = log α: checks our call (layout, scale, context state) on the CPU."""

    def run(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False):
        assert scale == 1.0 and not use_qk_l2norm_in_kernel
        b, t, h, dk = q.shape
        s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state
        outs = []
        for i in range(t):
            if g is not None:
                s = s * g[:, i].exp()[..., None, None]
            u = beta[:, i, :, None] * (v[:, i] - (k[:, i, :, None, :] @ s)[..., 0, :])
            s = s + k[:, i, :, :, None] * u[..., None, :]
            outs.append(scale * (q[:, i, :, None, :] @ s)[..., 0, :])
        return torch.stack(outs, 1), (s if output_final_state else None)

    mods = {m: types.ModuleType(m) for m in
            ("fla", "fla.ops", "fla.ops.delta_rule", "fla.ops.gated_delta_rule")}
    mods["fla.ops.delta_rule"].chunk_delta_rule = run
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = (
        lambda q, k, v, g, beta, **kw: run(q, k, v, beta, g=g, **kw))
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("name", NAMES)
def test_fla_call_matches_chunked(name, monkeypatch):
    _fake_fla(monkeypatch)
    q, k, v = random_qkv(2, 3, 45, 8)
    want = variants.build(name)(q, k, v, causal=True)
    got = variants.build(name, impl="fla")(q[:, :, -20:], k, v, causal=True)  # context → state
    assert rel_error(got, want[:, :, -20:]) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_gates_are_fixed_by_the_seed(name):
    q, k, v = random_qkv(1, 2, 40, 8)
    a, b = variants.build(name), variants.build(name, seed=1)
    assert rel_error(a(q, k, v, causal=True), variants.build(name)(q, k, v, causal=True)) == 0
    assert rel_error(a(q, k, v, causal=True), b(q, k, v, causal=True)) > 1e-3
    w = gate_weights(0, 2, 8, torch.device("cpu"), torch.float32)
    assert w is gate_weights(0, 2, 8, torch.device("cpu"), torch.float32)  # cached per dtype
    beta, log_alpha = a.gates(k)
    assert ((beta > 0) & (beta < 1)).all()
    if name == "gated_deltanet":
        assert (log_alpha < 0).all()
    else:
        assert log_alpha is None


@pytest.mark.parametrize("name", NAMES)
def test_flops_model_counts_gqa_and_fewer_queries(name):
    """The FLOP model against the dispatch count where test_flops does not go."""
    att = variants.build(name, chunk=16)
    shape = Shape(2, 4, 150, 16, kv_heads=2, q_len=37)
    q = torch.randn(2, 4, 37, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 150, 16, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        fwd = count_call(lambda: att(q, k, v, causal=True))
    both = count_call(lambda: att(q, k, v, causal=True).sum().backward())
    model = att.flops(shape, True)
    assert abs(model - fwd.flops) <= 0.02 * fwd.flops
    assert abs(model + att.backward_flops(shape, True) - both.flops) <= 0.1 * both.flops


@pytest.mark.parametrize("name", NAMES)
def test_decode_flops_model(name):
    att = variants.build(name)
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 2, 40, 16).unbind(0)
    state = att.decode_init(k, v, heads=4)
    with torch.no_grad():
        counted = count_call(lambda: att.decode_step(q, k[:, :, :1], v[:, :, :1], state)).flops
    assert att.decode_flops(Shape(2, 4, 40, 16, kv_heads=2)) == counted


@pytest.mark.parametrize("name", NAMES)
def test_launch_light(name, monkeypatch):
    """No host syncs; ops per call independent of B·H (the only loop is over chunks): on the GPU
    path one op (a baddbmm, the carry form) per extra chunk, on the CPU 2 (deltanet) or 3 (the
    gated one's decay too: the values' form, fewer FLOPs)."""
    att = variants.build(name, chunk=16)
    per_chunk = {"0": 3 if att.gated else 2, "1": 1}

    def ops(b, h, n):
        q, k, v = random_qkv(b, h, n, 8, torch.float32)
        with torch.no_grad():
            att(q, k, v, causal=True)  # the gate parameters are drawn once, then cached
            c = count_call(lambda: att(q, k, v, causal=True))
        assert c.host_syncs == 0
        return c.ops

    for forced, per in per_chunk.items():
        monkeypatch.setenv(FORCE_GPU_PATHS, forced)
        assert ops(2, 2, 100) == ops(3, 4, 100)
        assert ops(2, 2, 200) - ops(2, 2, 100) == (13 - 7) * per


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", NAMES)
def test_memory_model_bounds_the_peak(name, impl):
    att = variants.build(name, impl=impl)
    for shape in (Shape(1, 4, 1000, 32, kv_heads=2), Shape(2, 4, 300, 32, q_len=100)):
        q = torch.randn(shape.batch, shape.heads, shape.nq, shape.head_dim)
        k, v = torch.randn(2, shape.batch, shape.hkv, shape.seq_len, shape.head_dim).unbind(0)
        with torch.no_grad():
            peak = peak_memory(lambda: att(q, k, v, causal=True))  # noqa: B023
        predicted = att.memory_bytes(shape, torch.float32, True)
        assert peak <= predicted <= 2.5 * peak, (shape, peak, predicted)


def test_labels_show_non_defaults():
    assert variants.build("deltanet").label == "deltanet"
    assert variants.build("gated_deltanet", impl="recurrent").label == "gated_deltanet[recurrent]"
    assert variants.build("deltanet", chunk=32).label == "deltanet[chunk=32]"
    with pytest.raises(ValueError):
        variants.build("deltanet", impl="nope")


def test_gated_strong_gates_keep_float32_precision():
    """Keys scaled ×20 drive A·softplus(k·w + b) from ~0 to hundreds: strong and mild decays mix
    inside a chunk. The decays are segment sums (differences of cumulative sums lost the mild
    segments after a strong one: 6.9e-6 at C=16, 3.8e-5 at C=64), so float32 stays near the
    error of Mamba-2 on the same inputs (1.9e-7)."""
    att = variants.build("gated_deltanet")
    q, k, v = random_qkv(1, 4, 300, 32, seed=3)
    k = k * 20
    gold = paper_reference(att)(q, k, v, True)  # float64
    for chunk in (16, 64):
        out = variants.build("gated_deltanet", chunk=chunk)(q.float(), k.float(), v.float(),
                                                           causal=True)
        assert rel_error(out.double(), gold) < 1e-6, chunk


def test_engine_exact_for_decays_near_zero():
    """Log-decays of −1e3 (gates near 0) next to −1e-3 inside each chunk, float32 against the
    float64 per-step form: every exponent is a same-sign segment sum."""
    g = torch.Generator().manual_seed(0)
    n, d = 150, 8
    q, k, v = (F.normalize(torch.randn(1, 2, n, d, generator=g, dtype=torch.float64), dim=-1)
               for _ in range(3))
    beta = torch.rand(1, 2, n, generator=g, dtype=torch.float64)
    strong = torch.rand(1, 2, n, generator=g, dtype=torch.float64) < 0.1
    log_a = torch.where(strong, -1e3, -1e-3 * torch.rand(1, 2, n, generator=g,
                                                         dtype=torch.float64))
    gold, gold_state = recurrent_delta(q[:, :, None], k, v, beta, log_a)
    out, state = chunk_delta(*(t.float() for t in (q[:, :, None], k, v, beta, log_a)), None, 64,
                             final=True)
    assert rel_error(out.double(), gold) < 1e-6 and rel_error(state.double(), gold_state) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_grouped_kv_heads_equal_repeated_kv_heads(name):
    """kv_heads = H/G is the kv_heads = H model with its k/v heads repeated: a k/v head's gates
    do not depend on how many heads there are (a kv_heads sweep compares one model)."""
    att = variants.build(name, chunk=16)
    q = random_qkv(2, 6, 53, 16)[0]
    _, k, v = random_qkv(2, 2, 53, 16)
    out = att(q, k, v, causal=True)
    rep = att(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True)
    assert rel_error(out, rep) < 1e-12
    assert rel_error(variants.build(name, impl="recurrent")(q, k, v, causal=True), rep) < 1e-12
    beta, log_alpha = att.gates(k[:, :1])  # head 0 alone: the same gates as among two heads
    both = att.gates(k)
    assert rel_error(beta, both[0][:, :1]) < 1e-14
    assert log_alpha is None or rel_error(log_alpha, both[1][:, :1]) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_buffered_segments_match_paper_recurrence(name, dtype, monkeypatch):
    """Without autograd the CPU engine writes into one set of buffers per call, shared by the
    segments: many short segments (two chunks each, the last one partial), a context before the
    queries and grouped k/v heads against the float64 recurrence of the papers, at the error
    of float32 (or float64) arithmetic."""
    monkeypatch.setattr(segments, "SEGMENT_WORDS", 2 * 16 * 2 * 4 * 16)  # 2 chunks of 16
    att = variants.build(name, chunk=16)
    q = random_qkv(1, 4, 61, 16, dtype)[0]
    _, k, v = random_qkv(1, 2, 83, 16, dtype)  # 22 context positions, then 61 queries
    if name == "gated_deltanet":
        k = k * 4  # decays from ~0 to strong inside the chunks
    assert att._span(1, 4, 61, 16, "cpu") == 32
    with torch.no_grad():
        out = att(q, k, v, causal=True)
        state = att.decode_init(k, v)
    gold = paper_reference(att)(q.double(), k.double(), v.double(), True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_error(out.double(), gold) < tol
    state_gold = att.decode_init(k.double(), v.double())  # one segment, the former engine
    monkeypatch.setattr(segments, "SEGMENT_WORDS", 1 << 19)
    assert rel_error(state.double(), state_gold) < tol


def test_decay_matrix_into_matches_float64_segment_sums():
    """Γ of float32 log-decays from differences of float64 cumulative sums: gates from −1e-4 to
    −1e3 and −inf (a zero gate) mixed in a chunk, against e^(segment sums) in float64: every
    entry to float32's precision, zeros across a closed gate, 0 above the diagonal."""
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(32, 64, generator=g, dtype=torch.float64) * 10 ** torch.randint(
        -4, 4, (32, 64), generator=g)
    x[0, 10] = -math.inf
    gold = segsum(x).exp()
    out = decay_matrix_into(x.float(), torch.full((32, 64, 64), math.nan))
    assert (out[0, 10:, :10] == 0).all() and (out.triu(1) == 0).all()
    # float32 holds the exponent Σ to ε32·|Σ|, e^Σ to ε32: relative error ε32·(2 + |Σ|)
    bound = 1.2e-7 * (2 + gold.log().abs().nan_to_num(posinf=0)) * gold + 1e-44  # least 1.4e-45
    assert ((out.double() - gold).abs() <= bound).all()
    assert torch.equal(decay_matrix_into(x, torch.empty(32, 64, 64, dtype=torch.float64)),
                       decay_matrix(x))  # float64: the exact tree


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_flops_count_the_triangles(name):
    """The least work of the chunked delta rule in the values' form (the CPU's), counted here
    chunk by chunk (Dv = D, [U | W] 2D wide): β K Kᵀ and the solve on the strict triangle, U − W S
    per chunk, K̃ᵀ V' for each state passed on (the context's last one too), P and P V' on the
    causal triangle and (e^γ Q) S per query head; gate projections. Never above what runs."""
    att = variants.build(name, chunk=16)
    for shape in (Shape(2, 4, 100, 8), Shape(1, 4, 90, 8, kv_heads=2, q_len=37)):
        d, bh, g = shape.head_dim, shape.batch * shape.hkv, shape.groups
        pre = shape.seq_len - shape.nq
        want = bh * (_delta_work(shape.nq, d, g) + (_delta_work(pre, d, 0) if pre else 0)
                     + 2 * shape.seq_len * d * (2 if att.gated else 1))
        assert att.algorithm_flops(shape) == want <= att.flops(shape, True)


def _delta_work(n: int, d: int, groups: int) -> int:
    chunks = [min(16, n - lo) for lo in range(0, n, 16)]
    passed = chunks[:-1] if groups else chunks
    f = sum(c * (c - 1) // 2 * 2 * 3 * d + 2 * c * d * d for c in chunks)
    f += sum(2 * d * c * d for c in passed)
    return f + groups * sum(c * (c + 1) // 2 * 2 * 2 * d + 2 * c * d * d for c in chunks)


@pytest.mark.parametrize("name", NAMES)
def test_ut_solve_on_collinear_keys_matches_paper_recurrence(name):
    """The CPU engine without autograd (its 16×16 block inverses by LAPACK, then the block
    rows) where the UT system is least benign: every key along one direction (β_i k_i·k_j the
    same for all pairs of a chunk), and the same with a little noise, against the float64
    recurrence at float32's error; chunks of 64, so each solve spans four blocks."""
    att = variants.build(name)
    g = torch.Generator().manual_seed(3)
    q, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(2))
    one = torch.randn(1, 2, 1, 16, generator=g) * 3
    for k in (one.expand(1, 2, 200, 16).contiguous(),
              one + 0.01 * torch.randn(1, 2, 200, 16, generator=g)):
        with torch.no_grad():
            out = att(q, k, v, causal=True)
        gold = paper_reference(att)(q.double(), k.double(), v.double(), True)
        assert rel_error(out.double(), gold) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_for_q_alone_over_many_segments(name, monkeypatch):
    """q needs a gradient, k and v do not, over many short segments: autograd keeps each
    segment's normalised keys (none may be a buffer the next segment overwrites), and dq is
    the float64 recurrence's."""
    monkeypatch.setattr(segments, "SEGMENT_WORDS", 2 * 16 * 2 * 4 * 16)  # 2 chunks of 16
    att = variants.build(name, chunk=16)
    q = random_qkv(1, 4, 61, 16, torch.float32)[0].requires_grad_()
    _, k, v = random_qkv(1, 2, 83, 16, torch.float32)
    att(q, k, v, causal=True).square().sum().backward()
    q64 = q.detach().double().requires_grad_()
    paper_reference(att)(q64, k.double(), v.double(), True).square().sum().backward()
    assert rel_error(q.grad.double(), q64.grad) < 1e-5
