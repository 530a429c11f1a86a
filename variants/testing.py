"""Test helpers for variant authors: compare a variant with its float64 definition.

The budget is relative, as in PyTorch's FlexAttention tests and flash-attention's: the variant's
error against the float64 answer may be at most `factor` times the error of a naive computation
of the same definition in the input dtype (plus a tiny floor), on fresh random inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnbench.variants.base import Variant
from attnbench.variants.reference import attention_reference, rel_error

Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]

_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random_qkv(
    b: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float64, device: str = "cpu",
    seed: int | None = None, requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh standard-normal q, k, v of shape (B, H, N, D); a new seed each call unless given."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    out = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(device, dtype)
           for _ in range(3)]
    return tuple(t.requires_grad_(requires_grad) for t in out)  # type: ignore[return-value]


def masked_reference(att: Variant) -> Reference:
    """The exact definition of a masked (exact-family) variant: dense softmax under its mask."""

    def ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        n = q.shape[-2]
        mask = att.key_mask(torch.arange(n, device=q.device), n, causal)
        return attention_reference(q, k, v, causal, mask, dtype=q.dtype)

    return ref


def assert_matches(
    att: Variant,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    reference: Reference | None = None,
    factor: float = 5.0,
    grads: bool = True,
) -> None:
    """Assert `att` equals `reference` (default: its masked softmax definition), forward and grads.

    `reference(q, k, v, causal)` must compute in the dtype of its inputs; it is run once in
    float64 (the golden answer) and once in the input dtype (the error budget).
    """
    ref_fn = reference or masked_reference(att)
    leaf = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    gold = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    same = [t.detach().requires_grad_(grads) for t in (q, k, v)]

    out = att(*leaf, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    out_gold = ref_fn(*gold, causal)
    out_same = ref_fn(*same, causal)
    _check("output", out, out_gold, out_same, factor, q.dtype)
    if not grads:
        return
    grad_out = torch.randn_like(out_gold)
    out.backward(grad_out.to(out.dtype))
    out_gold.backward(grad_out)
    out_same.backward(grad_out.to(out_same.dtype))
    for name, a, g, s in zip("qkv", leaf, gold, same, strict=True):
        _check(f"grad {name}", a.grad, g.grad, s.grad, factor, q.dtype)


def _check(what: str, out, gold, same, factor: float, dtype: torch.dtype) -> None:
    assert out is not None, f"{what}: no value (not differentiable?)"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, budget_err = rel_error(out, gold), rel_error(same, gold)
    budget = factor * budget_err + _FLOOR[dtype]
    assert err <= budget, (
        f"{what}: rel error {err:.3e} > budget {budget:.3e} (naive {budget_err:.3e})"
    )
