"""Nyströmformer (Xiong et al. 2021, https://arxiv.org/abs/2102.03902): landmark attention.

softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V, with Q̃, K̃ the means of m
contiguous segments of Q, K and pinv the paper's iterative Moore–Penrose approximation
(Z₀ = Aᵀ/(‖A‖₁‖A‖∞) per matrix). When m does not divide n, Q and K are zero-padded at the end to
the next multiple of m before the segment means (so the last landmark averages in zeros), as the
official code (mlpen/Nystromformer) does with its padded, masked inputs; padded keys get no
weight and padded queries are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants import register
from variants._prefix import compute_dtype
from variants.base import Shape, Variant


@register
@dataclass
class Nystrom(Variant):
    """Nyström approximation of softmax attention. Args: landmarks (m), iters. Non-causal."""

    name: ClassVar[str] = "nystrom"
    family: ClassVar[str] = "lowrank"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False
    no_causal: ClassVar[str] = "segment-mean landmarks mix future keys"
    at_most_n: ClassVar[tuple[str, ...]] = ("landmarks",)

    landmarks: int = 64
    iters: int = 6

    def __post_init__(self) -> None:
        if self.landmarks <= 0:
            raise ValueError(f"landmarks={self.landmarks}: must be positive")
        if self.iters < 0:
            raise ValueError(f"iters={self.iters}: must be non-negative")

    @property
    def label(self) -> str:
        return self._label({"landmarks": f"m={self.landmarks}"})

    def kernels(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three softmax kernels (B,H,N,m), (B,H,m,m), (B,H,m,N), in q's dtype."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        ql, kl = landmarks(q, self.landmarks), landmarks(k, self.landmarks)  # (B, H, m, D)
        ql, kls = ql * scale, kl * scale  # scale the small factors, not the (n, m) scores
        k1 = torch.softmax(q @ kls.transpose(-2, -1), dim=-1)
        k2 = torch.softmax(ql @ kl.transpose(-2, -1), dim=-1)
        k3 = torch.softmax(ql @ k.transpose(-2, -1), dim=-1)
        return k1, k2, k3

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if causal:
            raise ValueError("nystrom has no causal form")
        ct = compute_dtype(q.dtype)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            k1, k2, k3 = self.kernels(q.to(ct), k.to(ct))
            out = k1 @ (iterative_pinv(k2, self.iters) @ (k3 @ v.to(ct)))  # cheapest association
        else:
            out = _forward_tiled(q.to(ct), k.to(ct), v.to(ct), self.landmarks, self.iters)
        return out.to(q.dtype)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.landmarks
        # k1, k3 scores, k3 V, k1 (.): 4 of 2nmd; k2 and pinv·(k3 V): 2 of 2m²d; pinv: 4 m³ matmuls
        return 2.0 * bh * (4 * n * m * d + 2 * m * m * d + 4 * self.iters * m**3)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.landmarks
        words = 3 * n * d + 4 * n * m + 8 * m * m + 3 * m * d + 2 * n * d  # copies, kernels, out
        return bh * words * el

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _forward_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, iters: int
) -> torch.Tensor:
    """The same products as `forward`'s autograd path, without autograd: the (n, m) and (m, n)
    kernels are made, softmaxed in place and consumed one cache-sized tile at a time, so they
    never go through main memory (2.3x faster at n=8192, m=256 on a 2-core CPU)."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    ql, kl = landmarks(q, m) * scale, landmarks(k, m)  # (B, H, m, D)
    k2 = torch.softmax(ql @ kl.transpose(-2, -1), dim=-1)  # (B, H, m, m)
    qf, kf, vf = (t.reshape(b * h, n, d) for t in (q, k, v))  # (BH, N, D)
    qlf, klt = ql.reshape(b * h, m, d), (kl * scale).reshape(b * h, m, d).transpose(1, 2)
    k3v = q.new_empty(b * h, m, d)
    for i in range(b * h):  # kernel 3 of one head, (m, N): softmax over all keys, then · V
        s = qlf[i] @ kf[i].T
        torch.mm(torch.softmax(s, dim=-1, out=s), vf[i], out=k3v[i])
    w = iterative_pinv(k2, iters).view(b * h, m, m) @ k3v  # (BH, m, D)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // m)
    for i in range(b * h):  # kernel 1 in row tiles of (rows, m), each times w
        for r in range(0, n, rows):
            s = qf[i, r : r + rows] @ klt[i]
            torch.mm(torch.softmax(s, dim=-1, out=s), w[i], out=out[i, r : r + rows])
    return out.view(b, h, n, d)


_TILE = 1 << 19  # elements of one kernel-1 score tile (2 MiB in float32: the L2 of one core)


def landmarks(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of m contiguous segments of x (B, H, N, D) after zero-padding N to a multiple of m."""
    b, h, n, d = x.shape
    seg = -(-n // m)
    x = F.pad(x, (0, 0, 0, m * seg - n))  # (B, H, m·seg, D)
    return x.reshape(b, h, m, seg, d).mean(dim=-2)  # (B, H, m, D)


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """The paper's iterative Moore–Penrose pseudo-inverse of each (m, m) matrix in `a`."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True)[..., None]  # max column sum, per matrix
    norm_inf = a.abs().sum(-1).amax(-1, keepdim=True)[..., None]  # max row sum
    z = a.transpose(-2, -1) / (norm1 * norm_inf)
    for _ in range(iters):  # Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))
        az = a @ z
        t = az.neg().add_(eye, alpha=7)
        t = (az @ t).neg_().add_(eye, alpha=15)
        t = (az @ t).neg_().add_(eye, alpha=13)
        z = (z @ t).mul_(0.25)
    return z
