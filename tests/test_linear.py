"""Linear-family variants (linear, performer) against their own exact formulas, in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import variants
from variants._prefix import compute_dtype, linear_attention
from variants.reference import attention_reference, rel_error
from variants.testing import assert_matches, random_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_reference(att):
    """normalise(φ(Q)φ(K)ᵀ, causal mask) V computed quadratically with the variant's features."""

    def ref(q, k, v, causal):
        ct = compute_dtype(q.dtype)
        qf, kf = att.feature_map(q, k)
        a = qf.to(ct) @ kf.to(ct).transpose(-2, -1)  # (B, H, N, N)
        if causal:
            a = a.tril()
        out = (a @ v.to(ct)) / (a.sum(-1, keepdim=True) + att.eps)
        return out.to(q.dtype)

    return ref


VARIANTS = {
    "linear": lambda: variants.build("linear", chunk=16),
    "performer": lambda: variants.build("performer", features=48, chunk=16, seed=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_own_formula(name, causal, dtype):
    att = VARIANTS[name]()
    q, k, v = random_qkv(2, 3, 75, 16, dtype)  # 75: not a multiple of the chunk
    assert_matches(att, q, k, v, causal, reference=kernel_reference(att))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_no_grad_path_matches_own_formula(name, dtype):
    """Without autograd, non-causal performer takes its tiled path; same formula, same budget."""
    att = VARIANTS[name]()
    q, k, v = random_qkv(2, 3, 75, 16, dtype)
    assert_matches(att, q, k, v, False, reference=kernel_reference(att), grads=False)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
def test_causal_chunks_equal_quadratic(name, chunk):
    att = VARIANTS[name]()
    att.chunk = chunk
    q, k, v = random_qkv(1, 2, 64 + 13, 8)
    out = att(q, k, v, causal=True)
    ref = kernel_reference(att)(q, k, v, True)
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
