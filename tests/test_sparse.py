"""Block-sparse patterns: exact under their masks, masks of the documented structure, O(pairs)."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.variants.testing import assert_matches, random_qkv

PATTERNS = ["strided", "fixed", "bigbird", "longformer"]
# Small blocks so that awkward n (prime, not a multiple of anything) spans many blocks.
SMALL = {
    "strided": dict(block=4, window_blocks=1, stride=3),
    "fixed": dict(block=4, stride=3, summary=1),
    "bigbird": dict(block=4, window_blocks=3, globals=1, random=2),
    "longformer": dict(block=4, window=5, global_tokens=3),
}


def small(name: str, **kw) -> variants.Variant:
    return variants.build(name, **{**SMALL[name], **kw})


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", [41, 67])
@pytest.mark.parametrize("name", PATTERNS)
def test_blocked_matches_dense_under_mask(name, n, causal):
    q, k, v = random_qkv(2, 2, n, 16)
    assert_matches(small(name), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PATTERNS)
def test_dtypes_and_inference_path(name, dtype):
    q, k, v = random_qkv(1, 2, 53, 16, dtype=dtype)
    assert_matches(small(name), q, k, v, causal=True)
    with torch.no_grad():
        assert_matches(small(name), q, k, v, causal=False, grads=False)


def token_mask(att, n, causal=False):
    return att.key_mask(torch.arange(n), n, causal)


def blocks_of(mask, b):  # (n, n) -> (nb, nb): block (I, J) entirely True / any True
    nb = mask.shape[0] // b
    m = mask.view(nb, b, nb, b)
    return m.all(3).all(1), m.any(3).any(1)


def test_strided_structure():
    att, b, n = small("strided"), 4, 80
    full_blocks, any_blocks = blocks_of(token_mask(att, n), b)
    assert torch.equal(full_blocks, any_blocks)  # whole blocks only
    for i in range(20):
        seen = {j for j in range(20) if full_blocks[i, j]}
        assert seen == {j for j in range(20) if abs(i - j) <= 1 or (i - j) % 3 == 0}


def test_fixed_structure():
    att, b, n = small("fixed"), 4, 72  # 18 blocks, chunks of 3, summary = last block of each
    full_blocks, _ = blocks_of(token_mask(att, n), b)
    for i in range(18):
        seen = {j for j in range(18) if full_blocks[i, j]}
        assert seen == {j for j in range(18) if j // 3 == i // 3 or j % 3 == 2}


def test_bigbird_structure_and_seed():
    att, b, n = small("bigbird"), 4, 96  # 24 blocks, global block 0, 3-block window, 2 random
    mask = token_mask(att, n)
    full_blocks, any_blocks = blocks_of(mask, b)
    assert torch.equal(full_blocks, any_blocks)
    assert mask[:b].all() and mask[:, :b].all()  # global rows and columns
    for i in range(1, 24):
        for j in (i - 1, i, i + 1):
            if 0 <= j < 24:
                assert full_blocks[i, j]
        fixed = {j for j in (0, i - 1, i, i + 1) if 0 <= j < 24}
        assert full_blocks[i].sum() == len(fixed) + 2  # plus exactly `random` other blocks
    assert torch.equal(token_mask(att, n), token_mask(small("bigbird"), n))  # seeded
    assert not torch.equal(token_mask(att, n), token_mask(small("bigbird", seed=1), n))


def test_longformer_structure():
    att, n = small("longformer"), 50
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = ((i - j).abs() <= 5) | (i < 3) | (j < 3)
    assert torch.equal(token_mask(att, n), want)
    assert torch.equal(token_mask(att, n, True), want & (j <= i))


@pytest.mark.parametrize("name", ["strided", "fixed", "bigbird"])
def test_density_is_the_mask_fraction_for_whole_block_patterns(name):
    att, n = small(name), 96
    assert att.density(n) == pytest.approx(token_mask(att, n).float().mean().item())
    # causal computes whole diagonal blocks: at least the causal mask, at most a block more/row
    causal = token_mask(att, n, True).float().mean().item()
    assert causal <= att.density(n, True) <= causal + 4 / n


@pytest.mark.parametrize("name", PATTERNS)
def test_defaults_near_six_percent_at_8192(name):
    att = variants.build(name)
    assert 0.03 < att.density(8192) < 0.08
    shape = variants.Shape(1, 8, 8192, 64)
    assert att.flops(shape) == pytest.approx(4 * 8 * 64 * 8192**2 * att.density(8192))


@pytest.mark.parametrize("name", ["bigbird", "longformer"])
def test_memory_grows_linearly_not_quadratically(name):
    att = variants.build(name, block=32)

    def peak(n):
        q, k, v = random_qkv(1, 2, n, 32, dtype=torch.float32, seed=0)
        with torch.no_grad():
            return peak_memory(lambda: att(q, k, v))

    assert peak(8192) / peak(2048) < 5  # quadratic would be 16


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_flops_linear_in_n(name):
    att = variants.build(name)
    f = [att.flops(variants.Shape(1, 1, n, 64)) for n in (8192, 32768)]
    assert f[1] / f[0] < 5


def test_strided_and_fixed_cost_follows_their_columns():
    # n²/stride: 4× n gives 4× rows, each with 4× the column blocks (plus the constant window).
    shape = [variants.Shape(1, 1, n, 64) for n in (8192, 32768)]
    att = variants.build("strided", block=64, window_blocks=2, stride=32)
    rows = [(5 + n // 64 / 32 - 1) * n for n in (8192, 32768)]  # window ∪ columns, per block row
    assert att.flops(shape[1]) / att.flops(shape[0]) == pytest.approx(rows[1] / rows[0], rel=0.02)
    att = variants.build("fixed", block=32, stride=16, summary=1)
    rows = [(16 + n // 32 / 16 - 1) * n for n in (8192, 32768)]
    assert att.flops(shape[1]) / att.flops(shape[0]) == pytest.approx(rows[1] / rows[0], rel=0.02)


def test_whole_pattern_equals_full_attention():
    full = variants.build("full", backend="naive")
    q, k, v = random_qkv(1, 2, 37, 8)
    for att in (small("longformer", window=40), small("strided", window_blocks=10)):
        assert_matches(att, q, k, v, causal=True, reference=full)


@pytest.mark.parametrize("name,field", [
    ("strided", "stride"), ("strided", "block"), ("strided", "window_blocks"),
    ("fixed", "summary"),
    ("bigbird", "random"), ("bigbird", "window_blocks"), ("longformer", "window"),
])
def test_invalid_params_name_the_field(name, field):
    with pytest.raises(ValueError, match=field):
        variants.build(name, **{field: -1})


def test_bigbird_too_short_is_unsupported():
    att = variants.build("bigbird")
    reasons = att.not_supported_reasons(variants.Shape(1, 1, 256, 64), torch.float32, "cpu", False)
    assert reasons and "blocks" in reasons[0]
    assert not att.not_supported_reasons(variants.Shape(1, 1, 8192, 64), torch.float32, "cpu", 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bigbird", "longformer"])
def test_flex_matches_dense_under_mask(name):
    att = small(name, impl="flex", block=16)
    q, k, v = random_qkv(1, 2, 200, 16, dtype=torch.float32)
    assert_matches(att, q, k, v, causal=True, grads=False)
    assert att.not_supported_reasons(variants.Shape(1, 2, 200, 16), torch.float32, "cpu", True,
                                     "fwd_bwd")


@pytest.mark.parametrize("name", ["local", *PATTERNS])
def test_memory_model_is_an_upper_bound(name):
    att = variants.build(name)
    q, k, v = random_qkv(1, 4, 4096, 64, dtype=torch.float32, seed=0)
    with torch.no_grad():
        peak = peak_memory(lambda: att(q, k, v))
    predicted = att.memory_bytes(variants.Shape(1, 4, 4096, 64), torch.float32)
    assert peak <= predicted <= 3 * peak, (peak, predicted)
