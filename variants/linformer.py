"""Linformer (Wang et al. 2020, https://arxiv.org/abs/2006.04768): K, V projected to k rows.

softmax(Q (EK)ᵀ/√d)(FV) with E, F (k × n) i.i.d. N(0, 1/k), drawn from (seed, n) and shared
across batch and heads: the same projections for a given n on every call and device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants import register
from variants._prefix import compute_dtype
from variants.base import Shape, Variant


@register
@dataclass
class Linformer(Variant):
    """Low-rank attention along the sequence. Args: k (projected length), seed. Non-causal."""

    name: ClassVar[str] = "linformer"
    family: ClassVar[str] = "lowrank"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False
    no_causal: ClassVar[str] = "projecting along n mixes future keys"
    at_most_n: ClassVar[tuple[str, ...]] = ("k",)

    k: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k={self.k}: must be positive")

    @property
    def label(self) -> str:
        return self._label({"k": f"k={self.k}"})

    def projections(
        self, n: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """E, F: (k, n) each, a function of (seed, n, k) only."""
        return _projections(self.seed, n, self.k, str(torch.device(device)), dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if causal:
            raise ValueError("linformer has no causal form")
        ct = compute_dtype(q.dtype)
        e, f = self.projections(q.shape[-2], q.device, ct)
        kp = e @ k.to(ct)  # (k, N) @ (B, H, N, D) -> (B, H, k, D)
        vp = f @ v.to(ct)
        out = F.scaled_dot_product_attention(q.to(ct), kp, vp)  # (B, H, N, D)
        return out.to(q.dtype)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        bh, n, d = shape.bh, shape.seq_len, shape.head_dim
        return 2.0 * bh * (2 * self.k * n * d + 2 * n * self.k * d)  # E K, F V; QKᵀ, PV

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, n, d, k = shape.bh, shape.seq_len, shape.head_dim, self.k
        # copies of q, k, v; EK, FV; output, log-sum-exp; E, F
        words = bh * (3 * n * d + 2 * k * d + n * d + n) + 2 * k * n
        return words * el + (64 << 20)  # SDPA's tiled workspace, bounded

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


@functools.lru_cache(maxsize=8)
def _projections(
    seed: int, n: int, k: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn on the CPU in float32 (the same numbers on every device), cached where used."""
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + n) % (2**63))
    e = torch.randn(k, n, generator=g) / k**0.5
    f = torch.randn(k, n, generator=g) / k**0.5
    return e.to(device, dtype), f.to(device, dtype)
