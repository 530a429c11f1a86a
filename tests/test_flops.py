"""Every built-in's FLOP models against FLOPs counted at dispatch level (harness.dispatch).

The counter sees every ATen matmul one call runs (in-place and out= forms, the fused SDPA ops),
so a model that forgets a matmul, or a backward that is not 2× its forward, is caught here.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import Shape

SHAPE = Shape(1, 2, 520, 32)  # n not a multiple of the blocks, chunks or landmarks
TOLERANCE = 0.10


def _points():
    for name in sorted(variants.names()):
        if not variants.get(name).__module__.startswith("attnbench.variants."):
            continue  # built-ins only
        for causal in (False, True):
            for mode in ("fwd", "fwd_bwd"):
                tag = f"{name}-{'causal' if causal else 'full'}-{mode}"
                yield pytest.param(name, causal, mode, id=tag)


def _count(att, causal: bool, grad: bool) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SHAPE.batch, SHAPE.heads, SHAPE.seq_len, SHAPE.head_dim, generator=g)
               .requires_grad_(grad) for _ in range(3))
    if not grad:
        with torch.no_grad():
            return count_call(lambda: att(q, k, v, causal=causal)).flops
    out = att(q, k, v, causal=causal)  # caches (layouts, projections) built outside the count
    out.sum().backward()

    def fwd_bwd():
        att(q, k, v, causal=causal).backward(torch.ones_like(out))

    return count_call(fwd_bwd).flops


@pytest.mark.parametrize(("name", "causal", "mode"), list(_points()))
def test_flop_models_match_dispatch_counts(name, causal, mode):
    att = variants.build(name)
    if getattr(att, "impl", "") == "flex" or getattr(att, "backend", "") in ("flex", "xformers"):
        pytest.skip("compiled or CUDA-only kernel: not countable at dispatch level on CPU")
    reasons = att.not_supported_reasons(SHAPE, torch.float32, "cpu", causal, mode)
    if reasons:
        pytest.skip("; ".join(reasons))
    grad = mode == "fwd_bwd"
    model = att.flops(SHAPE, causal) + (att.backward_flops(SHAPE, causal) if grad else 0.0)
    counted = _count(att, causal, grad)
    assert counted > 0
    assert abs(model - counted) <= TOLERANCE * counted, (
        f"{att.label} {mode} causal={causal}: model {model:.4g} vs counted {counted:.4g} "
        f"({model / counted:.3f}×)")


@pytest.mark.parametrize("nq, nk", [(5, 3), (3, 5), (4, 4)])
def test_cpu_flash_kernel_causal_count_is_top_left(nq, nk):
    """aten's CPU flash kernel with is_causal masks top-left (row i sees keys 0 … i, checked
    here against an explicit mask): the counter counts those pairs, also for more queries than
    keys (the selection engine's groups)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q, k, v = torch.randn(1, 1, nq, 8), torch.randn(1, 1, nk, 8), torch.randn(1, 1, nk, 8)
    seen = torch.ones(nq, nk, dtype=torch.bool).tril()
    ref = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~seen, -torch.inf), -1) @ v
    assert torch.allclose(flash(q, k, v, is_causal=True, scale=1.0)[0], ref, atol=1e-6)
    got = count_call(lambda: flash(q, k, v, is_causal=True, scale=1.0)).flops
    assert got == 2.0 * int(seen.sum()) * (8 + 8)
