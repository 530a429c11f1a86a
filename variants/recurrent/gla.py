"""Gated linear attention (Yang et al. 2024, https://arxiv.org/abs/2312.06635), the recurrence.

S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t (no 1/√d, as the paper), with data-dependent
per-key-dimension forget gates α_t = σ(x_t W)^{1/τ}, τ = 16 (the paper's temperature). Here the
gate input is x_t = k_t and W is one fixed (d × d) matrix (the paper: a learned low-rank
W_α1 W_α2 plus a bias, on the layer input): W_ij ~ N(0, 1/d) drawn in float64 on the CPU from
torch.Generator().manual_seed(seed), so a point is reproducible. One gate per k/v head (grouped
query heads share it, and the state). The chunked form builds its intra-chunk scores by the
halving tree of `decay_chunk` (secondary chunking), stable for gates arbitrarily close to 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape
from attnbench.variants.recurrent.decay import DecayRNN, fla_kwargs
from attnbench.variants.registry import register


@register
@dataclass
class GLA(DecayRNN):
    """Args: chunk (rounded up to a power of two), impl (chunk | recurrent | fla), seed (W),
    tau (gate temperature τ)."""

    name: ClassVar[str] = "gla"
    per_dim: ClassVar[bool] = True
    per_query_head: ClassVar[bool] = False
    fla_op: ClassVar[str] = "chunk_gla"
    intra: ClassVar[str] = "tree-matmul"

    seed: int = 0
    tau: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau}: must be positive")

    def projection(self, d: int, device, dtype: torch.dtype) -> torch.Tensor:
        """W (d, d), cached per (seed, d, device, dtype): no host→device copy per call."""
        return _projection(self.seed, d, torch.device(device), dtype)

    def gates(self, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, None]:
        w = self.projection(k.shape[-1], k.device, k.dtype)
        return F.logsigmoid(k @ w).div_(self.tau), None  # log α_t: (B, Hkv, N, D)

    def gate_flops(self, shape: Shape) -> float:
        return 2.0 * shape.batch * shape.hkv * shape.seq_len * shape.head_dim**2

    def fla_call(self, q, k, v, log_a, gain, state):
        from fla.ops.gla import chunk_gla

        return chunk_gla(q, k, v, log_a, scale=1.0, initial_state=state,
                         output_final_state=False, **fla_kwargs(chunk_gla))


@functools.lru_cache(maxsize=32)
def _projection(seed: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5).to(device, dtype)
