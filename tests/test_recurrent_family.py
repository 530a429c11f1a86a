"""What the whole recurrent family shares (retnet, gla, mamba2, deltanet, gated_deltanet): the
CPU's segments against one pass, and a decode state that holds only its own bytes."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.variants.base import FORCE_GPU_PATHS
from attnbench.variants.recurrent import segments
from attnbench.variants.reference import rel_error
from attnbench.variants.testing import random_qkv

FAMILY = ["retnet", "gla", "mamba2", "deltanet", "gated_deltanet"]


@pytest.mark.parametrize("name", FAMILY)
def test_segments_equal_one_pass(name, monkeypatch):
    """On the CPU the chunked form of every recurrent variant runs segment by segment (gates and
    norms too), the state carried across: one chunk per segment, the context included, equals
    one pass over the sequence (the GPU path), forward and gradients, and so does the decode
    state."""
    att = variants.build(name, chunk=8)
    q = random_qkv(2, 4, 50, 8, requires_grad=True)[0]
    _, k, v = random_qkv(2, 2, 133, 8, requires_grad=True)  # 83 context positions first
    results = []
    for words, forced in ((1, "0"), (1 << 19, "1")):
        monkeypatch.setattr(segments, "SEGMENT_WORDS", words)
        monkeypatch.setenv(FORCE_GPU_PATHS, forced)
        out = att(q, k, v, causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads, att.decode_init(k, v, heads=4)))
    for a, b in zip(*results, strict=True):
        assert rel_error(a, b) < 1e-12


@pytest.mark.parametrize("name", FAMILY)
def test_decode_state_holds_only_its_own_bytes(name):
    """The state after a context is what decode keeps per token (`state_bytes`, the leanest
    pick): its tensors must not be views that keep a larger buffer alive (the CPU delta engine's
    last state was one half of an alternating pair: twice the bytes)."""
    att = variants.build(name)
    _, k, v = random_qkv(1, 4, 300, 16, dtype=torch.float32, seed=5)
    tensors = list(_leaves(att.decode_init(k, v, heads=4)))
    assert tensors
    for x in tensors:
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size(), (x.shape, name)


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _leaves(y)
    elif hasattr(x, "__dict__"):
        for y in vars(x).values():
            yield from _leaves(y)
