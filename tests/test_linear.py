"""Linear-family variants (linear, performer) against their own exact formulas, in float64.

Performer is checked against FAVOR+ written here from the paper, not from the variant's helpers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.inputs import make_inputs
from attnbench.variants.base import compute_dtype
from attnbench.variants.linear.prefix import linear_attention
from attnbench.variants.reference import attention_reference, rel_error
from attnbench.variants.testing import assert_matches, random_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_reference(att, ct_of=compute_dtype):
    """normalise(φ(Q)φ(K)ᵀ, causal mask) V computed quadratically with the variant's features,
    in `ct_of(input dtype)` (default the CPU path's compute dtype; the identity for the naive
    same-dtype budget of the GPU path)."""

    def ref(q, k, v, causal):
        ct = ct_of(q.dtype)
        qf, kf = att.feature_map(q, k)
        a = qf.to(ct) @ kf.to(ct).transpose(-2, -1)  # (B, H, N, N)
        if causal:
            a = a.tril()
        out = (a @ v.to(ct)) / (a.sum(-1, keepdim=True) + att.eps)
        return out.to(q.dtype)

    return ref


def favor_reference(att, eps=0.0, ct_of=compute_dtype):
    """FAVOR+ from its definition (https://arxiv.org/abs/2009.14794, eq. (7) positive random
    features and Lemma 1), with the variant's random features w (rows ω₁..ω_m):

    φ(x) = exp(ωᵢᵀx − ‖x‖²/2)/√m for x = q/d^¼, k/d^¼, so E[φ(q)ᵀφ(k)] = exp(qᵀk/√d);
    out = φ(Q)(φ(K)ᵀV) / (φ(Q)(φ(K)ᵀ1) + eps); causal: both sums over j <= i (prefix sums).
    No max-shifts: float64 has the range at these sizes. Half inputs compute in `ct_of(dtype)`
    (default float32).
    """

    def ref(q, k, v, causal):
        dtype, ct = q.dtype, ct_of(q.dtype)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        d = q.shape[-1]
        w = att.projection(d, "cpu", torch.float64).to(ct)  # (m, D)
        m = w.shape[0]

        def phi(x):
            x = x / d**0.25
            return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

        qf, kf = phi(q), phi(k)  # (B, H, N, m)
        if causal:
            s = torch.cumsum(kf[..., :, None] * v[..., None, :], dim=2)  # (B, H, N, m, D)
            z = torch.cumsum(kf, dim=2)  # (B, H, N, m)
            num = (qf[..., None, :] @ s)[..., 0, :]  # (B, H, N, D)
            den = (qf * z).sum(-1, keepdim=True)
        else:
            num = qf @ (kf.transpose(-2, -1) @ v)
            den = qf @ kf.sum(-2).unsqueeze(-1)  # (B, H, N, 1)
        return (num / (den + eps)).to(dtype)

    return ref


VARIANTS = {
    "linear": lambda: variants.build("linear", chunk=16),
    "performer": lambda: variants.build("performer", features=48, chunk=16, seed=3),
}
REFERENCES = {"linear": kernel_reference, "performer": favor_reference}


def _qkv(kind, dtype, b=2, h=3, n=75, d=32, seed=None):
    """gaussian: N(0, 1) q, k, v; peaked: the harness's clustered q, k (large q·k/√d)."""
    if kind == "gaussian":
        return random_qkv(b, h, n, d, dtype, seed=seed)
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    return make_inputs(variants.Shape(b, h, n, d), torch.float64, "cpu", seed, "peaked")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_own_formula(name, causal, dtype):
    att = VARIANTS[name]()
    q, k, v = random_qkv(2, 3, 75, 16, dtype)  # 75: not a multiple of the chunk
    assert_matches(att, q, k, v, causal, reference=REFERENCES[name](att))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_no_grad_path_matches_own_formula(name, dtype):
    """Without autograd, non-causal performer takes its tiled path; same formula, same budget."""
    att = VARIANTS[name]()
    q, k, v = random_qkv(2, 3, 75, 16, dtype)
    assert_matches(att, q, k, v, False, reference=REFERENCES[name](att), grads=False)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
def test_causal_chunks_equal_quadratic(name, chunk):
    att = VARIANTS[name]()
    att.chunk = chunk
    q, k, v = random_qkv(1, 2, 64 + 13, 8)
    out = att(q, k, v, causal=True)
    ref = REFERENCES[name](att)(q, k, v, True)
    assert rel_error(out, ref) < 1e-12


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_prefix_kernel_against_cumulative_sums(n):
    """Independent of the variants: out_i = Σ_{j<=i} (qf_i·kf_j) v_j / Σ_{j<=i} qf_i·kf_j."""
    g = torch.Generator().manual_seed(n)
    qf, kf = (torch.rand(2, 2, n, 5, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, n, 3, generator=g, dtype=torch.float64)
    state = torch.cumsum(kf[..., :, None] * v[..., None, :], dim=2)  # (B, H, N, F, D) per position
    norm = torch.cumsum(kf, dim=2)
    ref = (qf[..., None, :] @ state)[..., 0, :] / ((qf * norm).sum(-1, keepdim=True) + 1e-6)
    assert rel_error(linear_attention(qf, kf, v, True, 16, 1e-6), ref) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["gaussian", "peaked"])
def test_performer_is_favor_plus(kind, causal, dtype):
    """Output and gradients within rounding of FAVOR+ computed from its definition in float64,
    on inputs whose scores are O(1) (gaussian) and large (peaked: max-shifts far from 0)."""
    att = variants.build("performer", features=64, chunk=16, seed=1)
    q, k, v = (t.to(dtype) for t in _qkv(kind, torch.float64))
    assert_matches(att, q, k, v, causal, reference=favor_reference(att))


@pytest.mark.parametrize("kind", ["gaussian", "peaked"])
@pytest.mark.parametrize("grads", [False, True], ids=["tiled", "autograd"])
def test_performer_is_favor_plus_at_benchmark_width(kind, grads):
    """d=64, m=256 as in the benchmark; without autograd the tiled path (exp2, per-tile shifts)."""
    att = variants.build("performer", features=256)
    q, k, v = (t.float() for t in _qkv(kind, torch.float64, 1, 2, 512, 64))
    assert_matches(att, q, k, v, False, reference=favor_reference(att), grads=grads)
    out, ref = att(q, k, v), favor_reference(att)(q.double(), k.double(), v.double(), False)
    assert abs(out.norm() / ref.norm() - 1) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("grads", [False, True], ids=["no_grad", "grad"])
def test_performer_eps_is_in_unshifted_units(causal, grads):
    """eps is added to φ(q)·Σφ(k) itself: a large eps changes the output exactly as the formula
    says, whichever max-shifts the variant applies inside."""
    att = variants.build("performer", features=32, chunk=16, seed=2, eps=5.0)
    q, k, v = random_qkv(1, 2, 40, 16)
    assert_matches(att, q, k, v, causal, reference=favor_reference(att, eps=5.0), grads=grads)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_performer_extreme_scores_stay_bounded(causal, eps):
    """q, k scaled by 30: most features underflow in float32. FAVOR+ weights are positive, so
    each output is a convex combination of the v rows (shrunk towards 0 by eps): it must stay
    within their range, and no gradient may be NaN (no 0/0, no inf reaching autograd)."""
    att = variants.build("performer", features=64, chunk=16, eps=eps)
    q, k, v = random_qkv(1, 2, 64, 32, torch.float32, seed=4)
    q, k = (30 * t for t in (q, k))
    for t in (q, k, v):
        t.requires_grad_(True)
    for out in (att(q, k, v, causal), att(q.detach(), k.detach(), v.detach(), causal)):
        assert torch.isfinite(out).all()
        lo, hi = v.detach().amin(-2, keepdim=True), v.detach().amax(-2, keepdim=True)
        assert ((out >= lo.clamp_max(0) - 1e-5) & (out <= hi.clamp_min(0) + 1e-5)).all()
    att(q, k, v, causal).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_performer_features_are_positive_and_orthogonal():
    att = variants.build("performer", features=40, seed=1)
    w = att.projection(16, "cpu", torch.float64)
    assert w.shape == (40, 16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(w, att.projection(16, "cpu", torch.float64))  # deterministic
    assert not torch.allclose(w, variants.build("performer", features=40, seed=2).projection(
        16, "cpu", torch.float64))
    q, k, _ = random_qkv(1, 1, 32, 16)
    qf, kf = att.feature_map(q, k)
    assert (qf > 0).all() and (kf > 0).all()


def test_performer_error_falls_with_features():
    """Random-feature error against softmax ~ 1/√m: averaged over seeds it must fall.

    q, k are scaled by 0.5: the estimator's relative variance grows like exp(|q + k|²/√d), so at
    unit scale (d=16) even m=4096 leaves errors near 1, and the trend drowns in noise.
    """
    ms = [8, 32, 128, 512]
    errs = []
    for m in ms:
        e = []
        for seed in range(5):
            q, k, v = random_qkv(1, 2, 128, 16, seed=100 + seed)
            q, k = 0.5 * q, 0.5 * k
            out = variants.build("performer", features=m, seed=seed)(q, k, v)
            e.append(rel_error(out, attention_reference(q, k, v)))
        errs.append(sum(e) / len(e))
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 0.4 * errs[0], errs  # 1/√m predicts 1/8 from m=8 to m=512


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_no_overflow_in_half(dtype, causal):
    q, k, v = random_qkv(1, 2, 256, 64, dtype, seed=0)
    for scale in (1.0, 4.0):
        out = variants.build("performer", features=128)(q * scale, k * scale, v, causal)
        assert torch.isfinite(out).all()


def test_params_validated():
    for name, field in [("linear", "chunk"), ("performer", "features"), ("performer", "chunk")]:
        with pytest.raises(ValueError, match=field):
            variants.build(name, **{field: 0})


def test_labels():
    assert variants.build("linear").label == "linear"
    assert variants.build("performer", features=256).label == "performer[m=256]"


def test_linear_flops_count_the_matmuls():
    att = variants.build("linear", chunk=64)
    shape = variants.Shape(1, 1, 1024, 64)
    assert att.flops(shape) == 2 * (2 * 1024 * 64 * 64 + 1024 * 64)
    assert att.flops(shape, causal=True) > att.flops(shape)  # intra-chunk squares cost more
    assert math.isclose(att.flops(variants.Shape(1, 1, 2048, 64), True) / att.flops(shape, True),
                        2, rel_tol=0.02)
