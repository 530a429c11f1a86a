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

from attnbench.variants.base import Shape, Variant, compute_dtype, gpu_path, mm_dtype
from attnbench.variants.registry import register


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
    supports_gqa: ClassVar[bool] = True
    no_q_len: ClassVar[str] = (
        "the query landmarks are means over all n queries, so the last q_len rows depend on "
        "queries not passed (landmarks over the passed queries alone would be another "
        "approximation, not these rows)")

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
        self, q: torch.Tensor, k: torch.Tensor, mm: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three softmax kernels (B,H,N,m), (B,H,m,m), (B,H,m,N) in the compute dtype; q
        (B, H, N, D), k (B, Hkv, N, D), the G query heads of a group as rows against its keys
        and key landmarks (no copy of k). Scores in `mm` (default q's dtype), softmax in the
        compute dtype."""
        b, h, n, d = q.shape
        hkv, ct = k.shape[1], compute_dtype(q.dtype)
        mm = mm or q.dtype
        scale = 1.0 / math.sqrt(d)
        ql, kl = (landmarks(x, self.landmarks, ct) for x in (q, k))  # (B, ·, m, D)
        # scale the small factors, not the (n, m) scores
        qls, kls, klm = (ql * scale).to(mm), (kl * scale).to(mm), kl.to(mm)
        qls = qls.reshape(b, hkv, -1, d)  # (B, Hkv, G·m, D)

        def softmax(s: torch.Tensor) -> torch.Tensor:
            return torch.softmax(s, dim=-1, dtype=ct)

        k1 = softmax(q.to(mm).reshape(b, hkv, -1, d) @ kls.transpose(-2, -1))  # (B,Hkv,G·N,m)
        k2 = softmax(qls @ klm.transpose(-2, -1))  # (B, Hkv, G·m, m)
        k3 = softmax(qls @ k.to(mm).transpose(-2, -1))  # (B, Hkv, G·m, N)
        m = self.landmarks
        return k1.view(b, h, n, m), k2.view(b, h, m, m), k3.view(b, h, m, -1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if causal:
            raise ValueError("nystrom has no causal form")
        ct = compute_dtype(q.dtype)
        if self._path(q.device, _grad(q, k, v)) == "tiled":
            out = _forward_tiled(q.to(ct), k.to(ct), v.to(ct), self.landmarks, self.iters)
            return out.to(q.dtype)
        b, h, n, d = q.shape
        hkv, mm = k.shape[1], mm_dtype(q.dtype, q.device)
        k1, k2, k3 = self.kernels(q, k, mm)
        k3v = k3.to(mm).reshape(b, hkv, -1, n) @ v.to(mm)  # (B, Hkv, G·m, D)
        # the pseudo-inverse in the compute dtype: a Newton iteration does not converge past
        # the precision it runs in
        w = iterative_pinv(k2, self.iters) @ k3v.view(b, h, -1, d).to(ct)  # (B, H, m, D)
        return (k1.to(mm) @ w.to(mm)).to(q.dtype)  # cheapest association: k1 (pinv (k3 V))

    def _path(self, device, grad: bool) -> str:
        """tiled (CPU, no autograd: kernels made and consumed in cache-sized tiles) | batched."""
        return "batched" if grad or gpu_path(device) else "tiled"

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        return self._path(device, grad)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        b, h, n, d, m = shape.batch, shape.heads, shape.seq_len, shape.head_dim, self.landmarks
        # k1, k3 scores, k3 V, k1 (.): 4 of 2nmd; k2 and pinv·(k3 V): 2 of 2m²d; pinv: 4 m³ matmuls
        return 2.0 * b * h * (4 * n * m * d + 2 * m * m * d + 4 * self.iters * m**3)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        b, h, hkv, n, d, m = (shape.batch, shape.heads, shape.hkv, shape.seq_len, shape.head_dim,
                              self.landmarks)
        # copies of q, k, v; kernels; pinv iterates; landmarks; output
        words = h * (n * d + 4 * n * m + 8 * m * m + 2 * m * d + 2 * n * d) + 2 * hkv * n * d
        return b * words * el

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _forward_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, iters: int
) -> torch.Tensor:
    """The same products as `forward`'s batched path, without autograd (CPU): the (n, m) and
    (m, n) kernels are made, softmaxed in place and consumed one cache-sized tile at a time, so
    they never go through main memory (2.3x faster at n=8192, m=256 on a 2-core CPU). Grouped
    heads: query head i reads k/v head i // G (no copy)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    ql, kl = landmarks(q, m) * scale, landmarks(k, m)  # (B, H, m, D), (B, Hkv, m, D)
    g = h // hkv
    qlf = ql.reshape(b * h, m, d)  # (B·H, m, D)
    k2 = torch.softmax(ql.reshape(b, hkv, -1, d) @ kl.transpose(-2, -1), dim=-1)  # (B,Hkv,G·m,m)
    kf, vf = (t.reshape(b * hkv, n, d) for t in (k, v))  # (B·Hkv, N, D)
    k3v = q.new_empty(b * h, m, d)
    for i in range(b * h):  # kernel 3 of one query head, (m, N): softmax over all keys, then · V
        s = qlf[i] @ kf[i // g].T
        torch.mm(torch.softmax(s, dim=-1, out=s), vf[i // g], out=k3v[i])
    w = iterative_pinv(k2.view(b, h, m, m), iters).view(b * h, m, m) @ k3v
    qf = q.reshape(b * h, n, d)
    klt = (kl * scale).reshape(b * hkv, m, d).transpose(1, 2)  # (B·Hkv, D, m)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // m)
    for i in range(b * h):  # kernel 1 in row tiles of (rows, m), each times w
        kt = klt[i // g]
        for r in range(0, n, rows):
            s = qf[i, r : r + rows] @ kt
            torch.mm(torch.softmax(s, dim=-1, out=s), w[i], out=out[i, r : r + rows])
    return out.view(b, h, n, d)


_TILE = 1 << 19  # elements of one kernel-1 score tile (2 MiB in float32: the L2 of one core)


def landmarks(x: torch.Tensor, m: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Means of m contiguous segments of x (B, H, N, D) after zero-padding N to a multiple of m,
    accumulated and returned in `dtype` (default x's)."""
    b, h, n, d = x.shape
    seg = -(-n // m)
    x = F.pad(x, (0, 0, 0, m * seg - n))  # (B, H, m·seg, D)
    return x.reshape(b, h, m, seg, d).mean(dim=-2, dtype=dtype)  # (B, H, m, D)


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
