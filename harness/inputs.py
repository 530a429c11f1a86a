"""Seeded benchmark inputs q, k, v in (B, H, N, D), by input kind.

Kinds:
- ``gaussian``: i.i.d. standard normal q, k, v. At d=64 the scores q·k/√d have unit variance,
  so softmax attention is close to uniform: approximations look better than they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from variants.base import Shape

Generator = Callable[[Shape, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _gaussian(shape: Shape, g: torch.Generator):
    dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(torch.randn(dims, generator=g) for _ in range(3))


KINDS: dict[str, Generator] = {"gaussian": _gaussian}


def make_inputs(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    kind: str = "gaussian",
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for one point, drawn in float32 on the CPU from `seed` (same on every device)."""
    if kind not in KINDS:
        raise ValueError(f"inputs={kind!r}: expected one of {', '.join(KINDS)}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = KINDS[kind](shape, g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in qkv)


def attention_entropy(q: torch.Tensor, k: torch.Tensor, rows: int = 256, seed: int = 0) -> float:
    """Mean entropy (nats) of softmax(q·kᵀ/√d) over a sample of query rows, in float64.

    Compare with log(n), the entropy of uniform attention.
    """
    n = q.shape[-2]
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(rows, n)].to(q.device)
    s = q[..., idx, :].double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    logp = torch.log_softmax(s, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())
