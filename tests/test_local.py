"""Local (sliding-window) attention: exact under its band, a band mask that is right, O(n·w)."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.variants.testing import assert_matches, random_qkv

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,window,block", [(37, 5, 4), (61, 16, 16), (53, 7, 32), (29, 0, 8)])
def test_blocked_matches_dense_under_band(n, window, block, causal):
    att = variants.build("local", window=window, block=block)
    q, k, v = random_qkv(2, 3, n, 16)
    assert_matches(att, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype):
    att = variants.build("local", window=9, block=8)
    q, k, v = random_qkv(1, 2, 45, 16, dtype=dtype)
    assert_matches(att, q, k, v, causal=True)
    with torch.no_grad():  # the in-place inference path
        assert_matches(att, q, k, v, causal=False, grads=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inference_band_path_matches(causal):
    # Without grad, interior query blocks read keys through strided windows (no gather).
    att = variants.build("local", window=13, block=8)
    assert any(band for *_, band in att.layout(151, causal).groups)
    q, k, v = random_qkv(2, 3, 151, 16, dtype=torch.float32)
    with torch.no_grad():
        assert_matches(att, q, k, v, causal=causal, grads=False)


@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_is_the_band(causal):
    n, w = 50, 7
    att = variants.build("local", window=w, block=8)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = (i - j <= w) & (j <= i) if causal else (i - j).abs() <= w
    rows = torch.tensor([0, 3, 17, 49])
    assert torch.equal(att.key_mask(torch.arange(n), n, causal), want)
    assert torch.equal(att.key_mask(rows, n, causal), want[rows])


def test_density_counts_the_computed_blocks():
    att = variants.build("local", window=16, block=16)
    n = 128  # 8 blocks; each query block computes its 3 neighbours (2 at the ends)
    assert att.density(n) == pytest.approx((8 * 3 - 2) * 16 * 16 / n**2)
    assert att.density(n) >= att.key_mask(torch.arange(n), n, False).float().mean()
    assert att.flops(variants.Shape(1, 2, n, 8)) == 4 * 2 * 8 * (8 * 3 - 2) * 256


@pytest.mark.parametrize("causal", [False, True])
def test_window_ge_n_is_full_attention(causal):
    full = variants.build("full", backend="naive")
    q, k, v = random_qkv(1, 2, 41, 8)
    for w in (40, 41, 1000):
        att = variants.build("local", window=w, block=16)
        assert_matches(att, q, k, v, causal=causal, reference=full)


def test_memory_grows_linearly_not_quadratically():
    att = variants.build("local", window=64, block=64)

    def peak(n):
        q, k, v = random_qkv(1, 2, n, 32, dtype=torch.float32, seed=0)
        with torch.no_grad():
            return peak_memory(lambda: att(q, k, v))

    small, large = peak(2048), peak(8192)
    assert large / small < 5, (small, large)  # quadratic would be 16


def test_flops_scale_with_window_not_n():
    att = variants.build("local", window=64, block=64)
    f = [att.flops(variants.Shape(1, 1, n, 64)) for n in (4096, 16384)]
    assert f[1] / f[0] == pytest.approx(4, rel=0.01)


@pytest.mark.parametrize("field,value", [("window", -1), ("block", 0), ("impl", "cuda")])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        variants.build("local", **{field: value})


def test_flex_has_no_cpu_backward():
    att = variants.build("local", impl="flex")
    shape = variants.Shape(1, 1, 256, 64)
    assert att.not_supported_reasons(shape, torch.float32, "cpu", False, "fwd") == []
    assert any("backward" in r for r in att.not_supported_reasons(
        shape, torch.float32, "cpu", False, "fwd_bwd"))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_matches_dense_under_band(causal):
    att = variants.build("local", window=40, impl="flex")
    q, k, v = random_qkv(1, 2, 200, 16, dtype=torch.float32)
    assert_matches(att, q, k, v, causal=causal, grads=False)
