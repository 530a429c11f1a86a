"""Linear attention, φ(x) = elu(x) + 1 (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants import register
from variants._prefix import compute_dtype, linear_attention, linear_flops, linear_memory
from variants.base import Shape, Variant


@register
@dataclass
class Linear(Variant):
    """φ(Q)φ(K)ᵀV / (φ(Q)Σφ(K) + eps): O(n·d²) time, causal by chunked prefix sums.

    Args: chunk (causal chunk length), eps (normaliser floor).
    """

    name: ClassVar[str] = "linear"
    family: ClassVar[str] = "linear"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False

    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError(f"chunk={self.chunk}: must be positive")
        if self.eps < 0:
            raise ValueError(f"eps={self.eps}: must be non-negative")

    @property
    def label(self) -> str:
        return self._label({})

    def feature_map(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(q), φ(k) = elu + 1, in the compute dtype (float32 for half inputs)."""
        ct = compute_dtype(q.dtype)
        return F.elu(q.to(ct)).add_(1), F.elu(k.to(ct)).add_(1)  # elu saves its input

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if not causal and not grad:
            ct = compute_dtype(q.dtype)
            return _forward_tiled(q.to(ct), k.to(ct), v.to(ct), self.eps).to(q.dtype)
        qf, kf = self.feature_map(q, k)  # (B, H, N, D)
        out = linear_attention(qf, kf, v.to(qf.dtype), causal, self.chunk, self.eps)
        return out.to(q.dtype)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        d = shape.head_dim
        return linear_flops(shape.bh, shape.seq_len, d, d, causal, self.chunk)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, n, d = shape.bh, shape.seq_len, shape.head_dim
        feats = 3 * bh * n * d * el  # φ(q), φ(k), v (copies in the compute dtype)
        return feats + linear_memory(bh, n, d, d, causal, self.chunk, el)

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _forward_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-causal `forward` without autograd, one head (and row tile) at a time: the same
    features and products, but q, k, v are read once and the output written once; features,
    numerator and normaliser stay in cache (memory-bound: traffic is what costs)."""
    b, h, n, d = q.shape
    qf, kf, vf = (t.reshape(b * h, n, d) for t in (q, k, v))  # (BH, N, D)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // d)
    for i in range(b * h):
        state, norm = q.new_zeros(d, d), q.new_zeros(d, 1)
        for r in range(0, n, rows):  # state Σ φ(k)vᵀ (D, D) and normaliser Σ φ(k) (D, 1)
            phi = F.elu(kf[i, r : r + rows]).add_(1)
            state += phi.T @ vf[i, r : r + rows]  # not addmm_: FLOP counters see a matmul
            norm.add_(phi.sum(0)[:, None])
        for r in range(0, n, rows):
            phi = F.elu(qf[i, r : r + rows]).add_(1)
            torch.div(phi @ state, (phi @ norm).add_(eps), out=out[i, r : r + rows])
    return out.view(b, h, n, d)


_TILE = 1 << 17  # elements of one row tile (512 KiB in float32)
