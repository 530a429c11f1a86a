"""Linear and low-rank variants on every path and model shape: the GPU path's half-precision
error budget (forced on the CPU), FLOP models against the dispatch counter with grouped heads and
fewer queries on both paths, the decode states of linear and performer, the memory grouped heads
save, and no per-call copy of a cached constant."""

from __future__ import annotations

import pytest
import torch
from test_linear import _qkv, favor_reference, kernel_reference
from test_lowrank import linformer_reference, nystrom_reference

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import FORCE_GPU_PATHS, Shape
from attnbench.variants.lowrank.nystrom import iterative_pinv
from attnbench.variants.testing import assert_matches, random_qkv

NAMES = ["linear", "linformer", "nystrom", "performer"]
SMALL = {"linear": {"chunk": 32}, "performer": {"features": 64, "chunk": 32},
         "linformer": {"k": 32}, "nystrom": {"landmarks": 16}}
PATHS = ["default", "gpu"]


def build(name: str):
    return variants.build(name, **SMALL[name])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, "1" if request.param == "gpu" else "0")
    return request.param


def _same_dtype(x: torch.dtype) -> torch.dtype:
    return x


def _states_dtype(x: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if x == torch.float16 else x


def naive_reference(att):
    """The variant's own formula with every matmul in the GPU path's matmul dtype (the input
    dtype; bfloat16 for the linear family's float16: `_prefix.mm_dtype`): the naive same-dtype
    reference whose error sets the GPU path's budget (Nyström's pseudo-inverse in float32, as
    the variant's: a Newton iteration in half precision does not converge)."""
    if att.name == "linear":
        return kernel_reference(att, _states_dtype)
    if att.name == "performer":
        return favor_reference(att, att.eps, _states_dtype)
    if att.name == "linformer":
        return linformer_reference(att, _same_dtype)
    return nystrom_reference(att.landmarks, lambda a: iterative_pinv(a.float()).to(a.dtype),
                             _same_dtype)


def _runs(att, shape: Shape, causal: bool, mode: str = "fwd") -> bool:
    return not att.not_supported_reasons(shape, torch.float32, "cpu", causal, mode)


@pytest.mark.parametrize("kind", ["gaussian", "peaked"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_path_bf16_within_budget(name, causal, kind, monkeypatch):
    """Forced GPU path, bf16: matmuls in bf16, statistics in fp32. Output and gradients within
    5x the error of the naive bf16 reference (every matmul in bf16), against float64."""
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = build(name)
    if not _runs(att, Shape(2, 4, 150, 32), causal):
        pytest.skip(f"{name}: no causal form")
    q, k, v = (t.bfloat16() for t in _qkv(kind, torch.float64, 2, 4, 150, 32))
    assert_matches(att, q, k, v, causal, reference=naive_reference(att))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_path_fp16_within_budget(name, causal, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = build(name)
    if not _runs(att, Shape(2, 4, 150, 32), causal):
        pytest.skip(f"{name}: no causal form")
    q, k, v = random_qkv(2, 4, 150, 32, torch.float16)
    assert_matches(att, q, k, v, causal, reference=naive_reference(att))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_gpu_path_runs_matmuls_in_half_precision(name, dtype, monkeypatch):
    """Half inputs: the GPU path's matmul FLOPs are in the input dtype (the linear family's
    float16 in bfloat16, for the range of its sums), a CPU path's in float32."""
    q, k, v = random_qkv(1, 2, 256, 32, dtype, seed=0)
    att = build(name)
    gpu = _states_dtype(dtype) if att.family == "linear" else dtype
    for forced, want in (("1", gpu), ("0", torch.float32)):
        monkeypatch.setenv(FORCE_GPU_PATHS, forced)
        for causal in (False, True):
            if not _runs(att, Shape(1, 2, 256, 32), causal):
                continue
            with torch.no_grad():
                c = count_call(lambda causal=causal: att(q, k, v, causal=causal))
            assert c.compute_dtype == str(want).removeprefix("torch."), dict(c.flops_by_dtype)


MODEL_SHAPES = [Shape(1, 4, 300, 32, kv_heads=2), Shape(1, 4, 300, 32, kv_heads=1, q_len=120),
                Shape(2, 2, 256, 16, q_len=1)]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=["gqa", "mqa+q_len", "one_query"])
@pytest.mark.parametrize("name", NAMES)
def test_flop_models_match_dispatch_on_model_shapes(name, shape, causal, mode, path):
    """flops() (+ backward_flops()) against the matmul FLOPs counted at dispatch level, with
    grouped heads and fewer queries, on the default and the GPU path."""
    att = build(name)
    if not _runs(att, shape, causal, mode):
        pytest.skip("; ".join(att.not_supported_reasons(shape, torch.float32, "cpu", causal)))
    grad = mode == "fwd_bwd"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.nq, shape.head_dim, generator=g)
    k, v = (torch.randn(shape.batch, shape.hkv, shape.seq_len, shape.head_dim, generator=g)
            for _ in range(2))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
        att(q, k, v, causal=causal).sum().backward()  # caches outside the count
        counted = count_call(lambda: att(q, k, v, causal=causal).sum().backward()).flops
    else:
        with torch.no_grad():
            counted = count_call(lambda: att(q, k, v, causal=causal)).flops
    model = att.flops(shape, causal) + (att.backward_flops(shape, causal) if grad else 0.0)
    assert model == pytest.approx(counted, rel=0.01), (model / counted)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_names_the_path(name, monkeypatch):
    att = build(name)
    s = Shape(1, 2, 256, 16)
    monkeypatch.setenv(FORCE_GPU_PATHS, "0")
    cpu = {att.kernel(s, "cpu", c, g) for c in (False, True) for g in (False, True)
           if _runs(att, s, c)}
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    gpu = {att.kernel(s, "cpu", c, g) for c in (False, True) for g in (False, True)
           if _runs(att, s, c)}
    assert gpu == {att.kernel(s, "cuda", c, g) for c in (False, True) for g in (False, True)
                   if _runs(att, s, c)}
    assert "tiled" not in gpu and not any("loop" in k for k in gpu)
    if name != "linformer":
        assert "tiled" in cpu


@pytest.mark.parametrize("name", NAMES)
def test_no_per_call_copy_of_a_cached_constant(name, path):
    """float32 inputs need no cast: a `_to_copy` in a call would be a projection or feature
    matrix copied to the device each call (a host-to-device copy on a GPU)."""
    att = variants.build(name)
    q, k, v = random_qkv(1, 2, 512, 64, torch.float32, seed=0)
    for causal in (False, True):
        if not _runs(att, Shape(1, 2, 512, 64), causal):
            continue
        with torch.no_grad():
            att(q, k, v, causal=causal)
            c = count_call(lambda causal=causal: att(q, k, v, causal=causal))
        assert c.by_op["_to_copy"] == 0 and c.host_syncs == 0, dict(c.by_op)


# -- decode -------------------------------------------------------------------------------------

DECODERS = ["linear", "performer"]


def _decode_inputs(b=2, h=4, hkv=2, n=80, d=16, seed=0):
    q, _, _ = random_qkv(b, h, n, d, torch.float64, seed=seed)
    _, k, v = random_qkv(b, hkv, n, d, torch.float64, seed=seed + 1)
    return q, k, v


@pytest.mark.parametrize("name", DECODERS)
def test_decode_step_leaves_its_state_as_it_was(name):
    att = build(name)
    q, k, v = _decode_inputs()
    state = att.decode_init(k[:, :, :64], v[:, :, :64], heads=4)
    before = [t.clone() for t in state]
    step = (q[:, :, 64:65], k[:, :, 64:65], v[:, :, 64:65])
    a, _ = att.decode_step(*step, state)
    b_, _ = att.decode_step(*step, state)
    assert torch.equal(a, b_)
    assert all(torch.equal(x, y) for x, y in zip(before, state, strict=True))


@pytest.mark.parametrize("name", DECODERS)
def test_decode_init_is_batched_and_steps_are_launch_light(name):
    """decode_init's ops do not grow with the context (no step loop); a step's do not grow
    with batch·heads; neither syncs the host."""
    att = build(name)
    counts = []
    for b, h, n in ((1, 2, 64), (1, 2, 512), (3, 8, 64)):
        q, k, v = random_qkv(b, h, n + 1, 16, torch.float32, seed=0)
        kv = k[:, : h // 2], v[:, : h // 2]
        with torch.no_grad():
            # once before counting: a first call draws parameters the variant then caches
            # (Performer's features), which a test run alone would count for n = 64 only
            att.decode_init(kv[0][:, :, :n], kv[1][:, :, :n])
            init = count_call(lambda kv=kv, n=n: att.decode_init(kv[0][:, :, :n],
                                                                 kv[1][:, :, :n]))
            state = att.decode_init(kv[0][:, :, :n], kv[1][:, :, :n])
            step = count_call(lambda q=q, kv=kv, n=n, state=state: att.decode_step(
                q[:, :, n:], kv[0][:, :, n:], kv[1][:, :, n:], state))
        assert init.host_syncs == 0 and step.host_syncs == 0
        counts.append((init.ops, step.ops))
    assert counts[0][0] == counts[1][0], counts  # context 64 → 512
    assert abs(counts[2][1] - counts[0][1]) <= 2, counts  # B·H 2 → 24 (size-1 shortcuts)


@pytest.mark.parametrize("name", DECODERS)
def test_decode_flops_match_dispatch(name):
    att = build(name)
    q, k, v = _decode_inputs(b=2, h=4, hkv=2, n=65, d=16)
    state = att.decode_init(k[:, :, :64], v[:, :, :64], heads=4)
    with torch.no_grad():
        c = count_call(lambda: att.decode_step(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], state))
    model = att.decode_flops(Shape(2, 4, 64, 16, kv_heads=2))
    assert model == pytest.approx(c.flops, rel=0.01)


@pytest.mark.parametrize("along", [1.0, 0.7])
def test_performer_decode_follows_keys_larger_than_its_context(along):
    """Keys after the context along the longest random feature ω (k = along·d^¼·ω), whose
    log-feature (along − along²/2)·|ω|² (~ 100 at d = 256) is far above any context key's
    (~ 6): the running max-shift rises and the state is rescaled, so the steps equal the causal
    forward's rows (float64), and in float32 stay finite and close to them (an outdated shift
    would overflow: e^100 > float32's max)."""
    att = variants.build("performer", features=64, seed=1)
    d = 256
    q, k, v = _decode_inputs(n=80, d=d, seed=3)
    w = att.projection(d, "cpu", torch.float64)  # (m, D)
    big = along * d**0.25 * w[w.norm(dim=1).argmax()]
    k[:, :, 70:] = big + 0.01 * k[:, :, 70:]
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        with torch.no_grad():
            rows = att(q, k, v, causal=True)  # float64 forward
            state = att.decode_init(kd[:, :, :70], vd[:, :, :70], heads=4)
            c0 = state.c
            for t in range(70, 80):
                out, state = att.decode_step(qd[:, :, t : t + 1], kd[:, :, t : t + 1],
                                             vd[:, :, t : t + 1], state)
                assert torch.isfinite(out).all()
                torch.testing.assert_close(out.double(), rows[:, :, t : t + 1], rtol=tol,
                                           atol=tol)
        assert (state.c > c0 + 30).all(), (c0, state.c)


def test_performer_decode_with_eps_equals_the_forward():
    """eps is scaled by the running shift as by the forward's: the same rows with eps > 0."""
    att = variants.build("performer", features=32, eps=0.5)
    q, k, v = _decode_inputs(n=40, d=16, seed=5)
    with torch.no_grad():
        rows = att(q, k, v, causal=True)
        state = att.decode_init(k[:, :, :39], v[:, :, :39], heads=4)
        out, _ = att.decode_step(q[:, :, 39:], k[:, :, 39:], v[:, :, 39:], state)
    torch.testing.assert_close(out, rows[:, :, 39:], rtol=1e-9, atol=1e-9)


def test_unsupported_decode_and_q_len_reasons():
    s = Shape(1, 4, 256, 16, kv_heads=2)
    for name in ("linformer", "nystrom"):
        reasons = build(name).not_supported_reasons(s, torch.float32, "cpu", True, "decode")
        assert any("no decode form" in r for r in reasons), reasons
    few = Shape(1, 4, 256, 16, q_len=32)
    assert not build("linformer").not_supported_reasons(few, torch.float32, "cpu", False)
    reasons = build("nystrom").not_supported_reasons(few, torch.float32, "cpu", False)
    assert any("query landmarks" in r for r in reasons), reasons
    for name in DECODERS:
        assert not build(name).not_supported_reasons(s, torch.float32, "cpu", True, "decode")


# -- grouped heads: the memory they save --------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_grouped_heads_use_less_memory_than_repeating_them(name, causal, path):
    """k, v with one head for 8 query heads: the peak is below that of the same call on repeated
    k, v by at least 90 % of the repeated copies (never materialised), within the prediction,
    and the prediction shows the saving too."""
    att = variants.build(name)
    b, h, hkv, n, d = 1, 8, 1, 2048, 64
    if not _runs(att, Shape(b, h, n, d), causal):
        pytest.skip(f"{name}: no causal form")
    q = torch.randn(b, h, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    with torch.no_grad():
        att(q, k, v, causal=causal)  # caches outside the measurement
        grouped = peak_memory(lambda: att(q, k, v, causal=causal))
        repeated = peak_memory(lambda: att(q, k.repeat_interleave(h, 1),
                                           v.repeat_interleave(h, 1), causal=causal))
    saved = 2 * b * (h - hkv) * n * d * 4  # the repeated k and v
    assert grouped <= repeated - 0.9 * saved, (grouped, repeated, saved)
    gqa, mha = Shape(b, h, n, d, kv_heads=hkv), Shape(b, h, n, d)
    assert grouped <= att.memory_bytes(gqa, torch.float32, causal)
    assert att.memory_bytes(gqa, torch.float32, causal) < att.memory_bytes(mha, torch.float32,
                                                                           causal)
