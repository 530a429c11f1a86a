"""Sigmoid attention against its own float64 definition, with attnbench's test helpers."""

import math

import pytest
import torch
from attnbench_sigmoid.sigmoid import Sigmoid

from attnbench.variants.testing import assert_matches, random_qkv


def definition(bias):
    """The paper's formula written out independently of the implementation under test."""

    def reference(q, k, v, causal):
        n, d = q.shape[-2:]
        b = -math.log(n) if bias is None else bias
        s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d) + b
        if causal:
            keep = torch.ones(n, n, dtype=torch.bool).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return torch.einsum("bhij,bhjd->bhid", torch.sigmoid(s), v)

    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [None, -2.0], ids=["b=-log n", "b=-2"])
def test_matches_float64_definition(dtype, causal, bias):
    att = Sigmoid(bias=bias)
    q, k, v = random_qkv(2, 3, 37, 16, dtype=dtype)
    assert_matches(att, q, k, v, causal=causal, reference=definition(bias))


def test_causal_row_zero_sees_only_key_zero():
    q, k, v = random_qkv(1, 1, 5, 4)
    out = Sigmoid(bias=0.0)(q, k, v, causal=True)
    s = torch.sigmoid((q[..., 0, :] * k[..., 0, :]).sum(-1) / 2.0)
    torch.testing.assert_close(out[..., 0, :], s[..., None] * v[..., 0, :])
