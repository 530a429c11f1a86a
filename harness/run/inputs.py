"""Seeded benchmark inputs q, k, v in (B, H, N, D), by input kind.

Kinds:
- ``gaussian``: i.i.d. standard normal q, k, v. At d=64 the scores q·k/√d have unit variance,
  so softmax attention is close to uniform: approximations look better than they are.
  Measured mean attention entropy (``attention_entropy``, B=1, H=8, d=64, seed 0): 7.13 nats
  at n=2048 (log n = 7.62), 8.51 at n=8192 (log n = 9.01).
- ``peaked``: queries and keys sharing low-dimensional structure. Per batch-head, 64 cluster
  centres lie in a random rank-8 subspace (norm ≈ √d); token i of cluster c(i) has
  q_i = μ_c + ε_i + 0.3·η_i and k_i = μ_c + ε_i + 0.3·η'_i with ε, η, η' ~ N(0, I): each query
  sees mostly its own key, then its cluster. Entries have std ≈ 1.45; v is standard normal.
  Measured mean attention entropy (same setting): 1.28 nats at n=2048 (log n = 7.62), 2.61 at
  n=8192 (log n = 9.01): far from uniform, where low-rank and random features struggle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from attnbench.variants.base import Shape

Generator = Callable[[Shape, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _gaussian(shape: Shape, g: torch.Generator):
    dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(torch.randn(dims, generator=g) for _ in range(3))


def _peaked(shape: Shape, g: torch.Generator, clusters: int = 64, rank: int = 8):
    b, h, n, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    r = min(rank, d)
    basis = torch.linalg.qr(torch.randn(b, h, d, r, generator=g))[0]  # (B, H, D, r) orthonormal
    centres = torch.randn(b, h, clusters, r, generator=g) @ basis.transpose(-2, -1)  # (B,H,C,D)
    centres *= math.sqrt(d / r)  # norm ≈ √d
    assign = torch.randint(clusters, (b, h, n, 1), generator=g).expand(b, h, n, d)
    shared = torch.gather(centres, 2, assign) + torch.randn(b, h, n, d, generator=g)  # μ_c + ε
    q = shared + 0.3 * torch.randn(b, h, n, d, generator=g)
    k = shared + 0.3 * torch.randn(b, h, n, d, generator=g)
    return q, k, torch.randn(b, h, n, d, generator=g)


KINDS: dict[str, Generator] = {"gaussian": _gaussian, "peaked": _peaked}


def make_inputs(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    kind: str = "gaussian",
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for one point, drawn in float32 on the CPU from `seed` (same on every device).

    Drawn at (B, H, seq_len, D) for all three; then q keeps its last q_len positions and k, v
    every (H/kv_heads)-th head, so k/v head j is the draw of q head j·H/kv_heads (for `peaked`
    inputs that head keeps its shared structure). With kv_heads = 0 and q_len = 0 the draw is
    the same as ever."""
    if kind not in KINDS:
        raise ValueError(f"inputs={kind!r}: expected one of {', '.join(KINDS)}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = KINDS[kind](dataclasses.replace(shape, kv_heads=0, q_len=0), g)
    q = q[:, :, shape.seq_len - shape.nq :]  # (B, H, Nq, D)
    k, v = k[:, :: shape.groups], v[:, :: shape.groups]  # (B, Hkv, N, D)
    return tuple(t.to(device=device, dtype=dtype).contiguous().requires_grad_(requires_grad)
                 for t in (q, k, v))


def attention_entropy(q: torch.Tensor, k: torch.Tensor, rows: int = 256, seed: int = 0) -> float:
    """Mean entropy (nats) of softmax(q·kᵀ/√d) over a sample of query rows, in float64.

    Compare with log(n), the entropy of uniform attention.
    """
    n = q.shape[-2]
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(rows, n)].to(q.device)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped k/v heads
    s = q[..., idx, :].double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    logp = torch.log_softmax(s, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())
