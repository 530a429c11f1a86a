"""Input kinds: seeded, shaped, and the peaked kind really is peaked."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.harness.run.inputs import KINDS, attention_entropy, make_inputs
from attnbench.variants.base import Shape

SHAPE = Shape(1, 4, 2048, 64)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_seeded_and_shaped(kind):
    a = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=3, kind=kind)
    b = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=3, kind=kind)
    c = make_inputs(SHAPE, torch.bfloat16, "cpu", seed=4, kind=kind)
    for x, y, z in zip(a, b, c, strict=True):
        assert x.shape == (1, 4, 2048, 64) and x.dtype == torch.bfloat16
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert 0.5 < float(x.float().std()) < 2  # unit scale, within a factor of 2


def test_entropy_peaked_far_below_uniform_gaussian_near():
    log_n = math.log(SHAPE.seq_len)
    q, k, _ = make_inputs(SHAPE, torch.float32, "cpu", seed=0, kind="gaussian")
    h_gauss = attention_entropy(q, k)
    q, k, _ = make_inputs(SHAPE, torch.float32, "cpu", seed=0, kind="peaked")
    h_peaked = attention_entropy(q, k)
    assert h_gauss > 0.9 * log_n, (h_gauss, log_n)
    assert h_peaked < 0.3 * log_n, (h_peaked, log_n)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="peaked"):
        make_inputs(SHAPE, torch.float32, "cpu", kind="nope")
