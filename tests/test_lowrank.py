"""Linformer and Nyström against their own exact formulas; O(n) memory for every linear variant."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.variants.base import compute_dtype
from attnbench.variants.lowrank.nystrom import iterative_pinv
from attnbench.variants.reference import rel_error
from attnbench.variants.testing import assert_matches, random_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = variants.Shape(1, 2, 64, 16)


def linformer_reference(att, ct_of=compute_dtype):
    """softmax(Q (EK)ᵀ/√d)(FV) with the variant's projections over the keys, dense, in
    `ct_of(input dtype)`."""

    def ref(q, k, v, causal):
        ct = ct_of(q.dtype)
        e, f = att.projections(k.shape[-2], q.device, ct)
        scores = q.to(ct) @ (e @ k.to(ct)).transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B,H,N,k)
        return (torch.softmax(scores, -1) @ (f @ v.to(ct))).to(q.dtype)

    return ref


def linformer_mean_reference(k_proj):
    """Linformer with E = F = mean-pooling: softmax(Q K̄ᵀ/√d) V̄, K̄ and V̄ the means of k_proj
    contiguous segments of K and V (torch.tensor_split's: the first n mod k one longer)."""

    def ref(q, k, v, causal):
        ct = compute_dtype(q.dtype)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        kbar, vbar = (torch.stack([s.mean(-2) for s in x.tensor_split(k_proj, dim=-2)], dim=-2)
                      for x in (k, v))  # (B, H, k, D)
        scores = q @ kbar.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return (torch.softmax(scores, -1) @ vbar).to(q.dtype)

    return ref


def segment_means(x, m):
    """Landmarks written out segment by segment (the last one averages in zero padding)."""
    n = x.shape[-2]
    seg = math.ceil(n / m)
    rows = [x[..., i * seg : (i + 1) * seg, :].sum(-2) / seg for i in range(m)]
    return torch.stack(rows, dim=-2)  # (B, H, m, D)


def nystrom_reference(m, pinv, ct_of=compute_dtype):
    def ref(q, k, v, causal):
        ct = ct_of(q.dtype)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        s = 1 / math.sqrt(q.shape[-1])
        ql, kl = segment_means(q, m), segment_means(k, m)
        k1 = torch.softmax(q @ kl.transpose(-2, -1) * s, -1)
        k2 = torch.softmax(ql @ kl.transpose(-2, -1) * s, -1)
        k3 = torch.softmax(ql @ k.transpose(-2, -1) * s, -1)
        return (k1 @ pinv(k2) @ k3 @ v).to(q.dtype)

    return ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 77])
def test_linformer_matches_own_formula(n, dtype):
    att = variants.build("linformer", k=24, seed=5)
    q, k, v = random_qkv(2, 3, n, 16, dtype)
    assert_matches(att, q, k, v, False, reference=linformer_reference(att))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 77])
def test_linformer_mean_projection_matches_definition(n, dtype):
    att = variants.build("linformer", k=24, projection="mean")
    q, k, v = random_qkv(2, 3, n, 16, dtype)
    assert_matches(att, q, k, v, False, reference=linformer_mean_reference(24))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linformer_uniform_projection_matches_own_formula(dtype):
    att = variants.build("linformer", k=24, projection="uniform", seed=3)
    q, k, v = random_qkv(2, 3, 77, 16, dtype)
    assert_matches(att, q, k, v, False, reference=linformer_reference(att))


def test_linformer_projection_distributions():
    """gaussian: N(0, 1/k) (unchanged default); uniform: U(−1/√k, 1/√k) as lucidrains/linformer
    initialises its (n, k) parameters; mean: rows average contiguous segments."""
    k, n = 16, 4096
    e_g, _ = variants.build("linformer", k=k).projections(n, "cpu", torch.float64)
    e_u, f_u = variants.build("linformer", k=k, projection="uniform").projections(
        n, "cpu", torch.float64)
    e_m, f_m = variants.build("linformer", k=k, projection="mean").projections(
        n - 3, "cpu", torch.float64)
    assert abs(float(e_g.var()) * k - 1) < 0.05
    assert float(e_u.abs().max()) <= k**-0.5 and abs(float(e_u.var()) * 3 * k - 1) < 0.05
    assert not torch.equal(e_u, f_u) and torch.equal(e_m, f_m)
    torch.testing.assert_close(e_m.sum(-1), torch.ones(k, dtype=torch.float64))
    assert ((e_m > 0).sum(0) == 1).all()  # every position in exactly one segment


def test_linformer_random_projections_inflate_values():
    """Why rel_error against softmax is large for untrained random E, F: each row of FV sums n
    random-signed rows of V with weights of variance 1/k (uniform: 1/3k), so its norm is about
    √(n/k) (√(n/3k)) times a row's of V; mean-pooling keeps FV within the range of V."""
    n, k, d = 4096, 64, 16
    v = random_qkv(1, 1, n, d, seed=0)[2]
    row_norm = math.sqrt(d)  # of one row of V
    for proj, lo, hi in [("gaussian", 0.8, 1.2), ("uniform", 0.8 / 3**0.5, 1.2 / 3**0.5)]:
        _, f = variants.build("linformer", k=k, projection=proj).projections(n, "cpu", v.dtype)
        rows = (f @ v).norm(dim=-1) / row_norm  # (1, 1, k)
        assert lo * math.sqrt(n / k) < float(rows.mean()) < hi * math.sqrt(n / k), proj
    _, f = variants.build("linformer", k=k, projection="mean").projections(n, "cpu", v.dtype)
    assert float((f @ v).abs().max()) <= float(v.abs().max())


def test_linformer_labels():
    assert variants.build("linformer", k=256).label == "linformer[k=256]"
    assert variants.build("linformer", k=64, projection="mean").label == (
        "linformer[k=64,projection=mean]")


def test_linformer_projections_deterministic_per_n():
    att = variants.build("linformer", k=8, seed=1)
    e1, f1 = att.projections(32, "cpu", torch.float32)
    e2, _ = att.projections(32, "cpu", torch.float32)
    e3, _ = att.projections(33, "cpu", torch.float32)
    e4, _ = variants.build("linformer", k=8, seed=2).projections(32, "cpu", torch.float32)
    assert e1.shape == (8, 32) and torch.equal(e1, e2) and not torch.equal(e1, f1)
    assert not torch.equal(e1[:, :32], e3[:, :32]) and not torch.equal(e1, e4)
    assert abs(float(e1.var()) * 8 - 1) < 0.3  # N(0, 1/k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 70, 75])  # 70, 75: landmarks do not divide n
def test_nystrom_matches_own_formula(n, dtype):
    """Same iterative pinv as the variant (the paper's 6 iterations), everything else rewritten."""
    att = variants.build("nystrom", landmarks=8)
    q, k, v = random_qkv(2, 3, n, 16, dtype)
    assert_matches(att, 2 * q, 2 * k, v, False, reference=nystrom_reference(8, iterative_pinv))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 75])
def test_nystrom_tiled_path_matches_own_formula(n, dtype):
    """Without autograd the variant takes its tiled path; same formula, same budget."""
    att = variants.build("nystrom", landmarks=8)
    q, k, v = random_qkv(2, 3, n, 16, dtype)
    ref = nystrom_reference(8, iterative_pinv)
    assert_matches(att, 2 * q, 2 * k, v, False, reference=ref, grads=False)


def test_nystrom_converged_equals_exact_pinv():
    """With enough iterations the variant is the Nyström formula with the exact pseudo-inverse."""
    q, k, v = random_qkv(1, 2, 75, 16)
    q, k = 2 * q, 2 * k
    out = variants.build("nystrom", landmarks=8, iters=60)(q, k, v)
    ref = nystrom_reference(8, torch.linalg.pinv)(q, k, v, False)
    assert rel_error(out, ref) < 1e-8


def test_iterative_pinv_converges_to_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(2 * torch.randn(4, 16, 16, generator=g, dtype=torch.float64), -1)
    exact = torch.linalg.pinv(a)
    errs = [rel_error(iterative_pinv(a, i), exact) for i in (2, 6, 12, 40)]
    assert errs[0] > errs[1] > errs[2] and errs[-1] < 1e-10, errs


def test_nystrom_landmarks_pad_like_the_official_code():
    """n=10, m=4: segments of 3, the last holding one row and two zero rows."""
    from attnbench.variants.lowrank.nystrom import landmarks

    x = torch.arange(10.0).reshape(1, 1, 10, 1)
    torch.testing.assert_close(landmarks(x, 4).flatten(), torch.tensor([1.0, 4.0, 7.0, 3.0]))


@pytest.mark.parametrize(
    "name, params, field",
    [("linformer", {"k": 0}, "k"), ("linformer", {"projection": "xavier"}, "projection"),
     ("nystrom", {"landmarks": 0}, "landmarks"), ("nystrom", {"iters": -1}, "iters")],
)
def test_params_validated(name, params, field):
    with pytest.raises(ValueError, match=field):
        variants.build(name, **params)


@pytest.mark.parametrize("name, big", [("linformer", {"k": 65}), ("nystrom", {"landmarks": 65})])
def test_unsupported_reasons(name, big):
    att = variants.build(name)
    assert any("causal" in r for r in att.not_supported_reasons(SHAPE, torch.float32, "cpu", True))
    assert variants.build(name, **big).not_supported_reasons(SHAPE, torch.float32, "cpu", False)
    assert not variants.build(name, **{next(iter(big)): 64}).not_supported_reasons(
        SHAPE, torch.float32, "cpu", False)


LINEAR_COST = {
    "linear": ({"chunk": 32}, [False, True]),
    "performer": ({"features": 32, "chunk": 32}, [False, True]),
    "linformer": ({"k": 32}, [False]),
    "nystrom": ({"landmarks": 32}, [False]),
}


@pytest.mark.parametrize("name", sorted(LINEAR_COST))
def test_contract(name):
    att = variants.build(name)
    assert att.exact is False and att.density(128) is None
    assert att.key_mask(torch.arange(4), 4, False) is None
    assert att.time_exponent == att.memory_exponent == 1.0
    assert att.family == ("linear" if name in ("linear", "performer") else "lowrank")
    shape = variants.Shape(1, 8, 8192, 64)
    ratio = att.flops(variants.Shape(1, 8, 16384, 64)) / att.flops(shape)
    assert 1.9 < ratio < 2.1  # linear in n
    assert att.memory_bytes(shape, torch.float32) > 0


_SDPA_CPU = {  # FlopCounterMode has no formula for the CPU flash kernels: torch's own conventions
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda go, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(go, q, k, v),
}


def _counted(fn):
    with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name, causal", [(n, c) for n, (_, cs) in sorted(LINEAR_COST.items()) for c in cs]
)
def test_flop_models_match_dispatch_count(name, causal):
    """flops() and backward_flops() against the matmuls torch dispatches, forward on both paths
    (autograd and no-grad); performer, linformer backward ≈ 1.5, 1.75 × forward (constant W, E)."""
    att = variants.build(name, **LINEAR_COST[name][0])
    shape = variants.Shape(1, 2, 256, 16)
    q, k, v = random_qkv(1, 2, 256, 16, torch.float32, requires_grad=True)
    outs = []
    fwd = _counted(lambda: outs.append(att(q, k, v, causal)))
    bwd = _counted(lambda: outs[0].backward(torch.randn_like(outs[0])))
    no_grad = _counted(lambda: att(q.detach(), k.detach(), v.detach(), causal))
    model_fwd, model_bwd = att.flops(shape, causal), att.backward_flops(shape, causal)
    assert fwd == pytest.approx(model_fwd, rel=0.01) and no_grad == pytest.approx(fwd, rel=0.01)
    assert bwd == pytest.approx(model_bwd, rel=0.01), (bwd / fwd, model_bwd / model_fwd)


def _peak(att, n, causal):
    q, k, v = random_qkv(1, 2, n, 16, torch.float32, seed=0)
    att(q, k, v, causal)  # warm caches (projections, features) outside the measurement
    return peak_memory(lambda: att(q, k, v, causal))


@pytest.mark.parametrize(
    "name, causal", [(n, c) for n, (_, cs) in sorted(LINEAR_COST.items()) for c in cs]
)
def test_memory_grows_linearly(name, causal):
    att = variants.build(name, **LINEAR_COST[name][0])
    small, big = _peak(att, 512, causal), _peak(att, 2048, causal)
    assert 2.5 < big / small < 6, (small, big)  # quadratic would be ~16
    assert big <= att.memory_bytes(variants.Shape(1, 2, 2048, 16), torch.float32, causal)


def test_memory_check_catches_quadratic():
    """The same measurement flags exact attention with materialised scores."""
    small, big = (_peak(variants.build("full", backend="naive"), n, False) for n in (512, 2048))
    assert big / small > 10, (small, big)
