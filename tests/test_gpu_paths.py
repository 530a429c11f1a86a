"""The paths every variant takes on a GPU, checked on the CPU (ATTNBENCH_FORCE_GPU_PATHS=1):
launch-light (ops per call do not grow with batch·heads or n), no host syncs, and the same
results as the default path, forward and gradients; bf16 within its error budget."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import FORCE_GPU_PATHS
from attnbench.variants.testing import random_qkv

# Small parameters so every pattern fits n = 1024.
SMALL = {"bigbird": {"block": 32}, "nystrom": {"landmarks": 32}, "linformer": {"k": 64},
         "performer": {"features": 64}}


def builtins() -> list:
    out = []
    for name in sorted(variants.names()):
        cls = variants.get(name)
        if not cls.__module__.startswith("attnbench.variants."):
            continue
        for causal in (False, True):
            out.append(pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'full'}"))
    return out


def _att(name: str, causal: bool):
    att = variants.build(name, **SMALL.get(name, {}))
    if getattr(att, "impl", "") == "flex" or (getattr(att, "backend", "") != "sdpa" and \
            name == "full"):
        pytest.skip("compiled or other backends: not counted")
    from attnbench.variants.base import Shape

    reasons = att.not_supported_reasons(Shape(1, 1, 1024, 32), torch.float32, "cpu", causal)
    if reasons:
        pytest.skip("; ".join(reasons))
    return att


def _ops(att, b: int, h: int, n: int, causal: bool) -> tuple[int, int]:
    q, k, v = random_qkv(b, h, n, 32, dtype=torch.float32, seed=0)
    with torch.no_grad():
        att(q, k, v, causal=causal)  # caches (layouts, projections) outside the count
        c = count_call(lambda: att(q, k, v, causal=causal))
    return c.ops, c.host_syncs


@pytest.mark.parametrize(("name", "causal"), builtins())
def test_gpu_path_is_launch_light_and_sync_free(name, causal, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = _att(name, causal)
    small, syncs = _ops(att, 1, 1, 1024, causal)
    wide, _ = _ops(att, 2, 8, 1024, causal)
    wider, _ = _ops(att, 4, 16, 1024, causal)
    long, long_syncs = _ops(att, 1, 1, 4096, causal)
    assert syncs == 0 and long_syncs == 0, "host syncs inside a call"
    # Size-1 batch and head dims let torch skip a copy here and there (einsum, reshape): allow
    # a difference of 2 ops against B=H=1, none between two wider shapes. A loop over heads
    # would add at least 8 ops.
    assert abs(wide - small) <= 2, f"ops grow with batch·heads: {small} → {wide}"
    assert wider == wide, f"ops grow with batch·heads: {wide} → {wider}"
    growth = getattr(att, "ops_grow_with_n", False)  # a chunked recurrence's loop, declared
    if not growth:
        assert long <= small, f"ops grow with n: {small} → {long}"


@pytest.mark.parametrize(("name", "causal"), builtins())
def test_gpu_path_equals_the_default_path(name, causal, monkeypatch):
    att = _att(name, causal)
    q, k, v = random_qkv(2, 3, 300, 16, dtype=torch.float32, seed=1, requires_grad=True)
    go = torch.randn(2, 3, 300, 16, generator=torch.Generator().manual_seed(2))
    outs = []
    for forced in ("0", "1"):
        monkeypatch.setenv(FORCE_GPU_PATHS, forced)
        for t in (q, k, v):
            t.grad = None
        with torch.no_grad():
            fast = att(q, k, v, causal=causal)  # the no-grad path
        out = att(q, k, v, causal=causal)
        out.backward(go)
        outs.append((fast, out.detach(), *(t.grad.clone() for t in (q, k, v))))
    for a, b_ in zip(*outs, strict=True):
        torch.testing.assert_close(b_, a, rtol=2e-4, atol=2e-5)
