"""Mamba-2's state-space duality, SSD (Dao & Gu 2024, https://arxiv.org/abs/2405.21060), the scan.

S_t = a_t S_{t−1} + Δ_t k_tᵀ v_t, o_t = q_t S_t with k ↔ B, q ↔ C, v ↔ x, and Δ folded as in the
paper (B̄_t = Δ_t B_t: x_t enters scaled by Δ_t); a_t = exp(Δ_t A_h), one scalar per query head
and step. Δ_t = softplus(k_t·w_h + b_h). Fixed per head h = 0…H−1, as Mamba-2's initialisation:
A_h = −exp(linspace(0, ln 16, H))_h ∈ [−16, −1]; b_h = softplus⁻¹(dt_h) with dt_h log-uniform in
[0.001, 0.1]; w_h ~ N(0, I/d). dt and w are drawn in float64 on the CPU from
torch.Generator().manual_seed(seed) (dt first, then w). Left out: the D skip, the z gate and
the convolution of the Mamba-2 block. The chunked form is SSD's: (C Bᵀ ⊙ L) X inside a chunk with
L the segment-sum decay matrix, the states passed from chunk to chunk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape
from attnbench.variants.recurrent.decay import DecayRNN, fla_kwargs
from attnbench.variants.registry import register

DT_MIN, DT_MAX, A_MAX = 1e-3, 1e-1, 16.0


@register
@dataclass
class Mamba2(DecayRNN):
    """Args: chunk, impl (chunk | recurrent | fla), seed (dt and w)."""

    name: ClassVar[str] = "mamba2"
    fla_op: ClassVar[str] = "chunk_simple_gla"
    input_gain: ClassVar[bool] = True

    seed: int = 0

    def parameters(self, heads: int, d: int, device, dtype: torch.dtype):
        """A (H,), w (H, d), b (H,), cached per (seed, H, d, device, dtype)."""
        return _parameters(self.seed, heads, d, torch.device(device), dtype)

    def gates(self, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, hkv, n, d = k.shape
        a, w, bias = self.parameters(heads, d, k.device, k.dtype)
        z = k @ w.view(hkv, heads // hkv, d).transpose(-1, -2)  # (B, Hkv, N, G), contiguous
        dt = F.softplus(z.transpose(-1, -2).reshape(b, heads, n) + bias[:, None])  # Δ_t (B, H, N)
        return (dt * a[:, None]).unsqueeze(-1), dt  # log a_t = Δ_t A_h: (B, H, N, 1)

    def gate_flops(self, shape: Shape) -> float:
        return 2.0 * shape.batch * shape.heads * shape.seq_len * shape.head_dim

    def fla_call(self, q, k, v, log_a, gain, state):
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v * gain[..., None], g=log_a[..., 0], scale=1.0,
                                initial_state=state, output_final_state=False,
                                **fla_kwargs(chunk_simple_gla))


@functools.lru_cache(maxsize=32)
def _parameters(seed: int, heads: int, d: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = -torch.exp(torch.linspace(0.0, math.log(A_MAX), heads, dtype=torch.float64))
    u = torch.rand(heads, generator=g, dtype=torch.float64)
    dt = torch.exp(math.log(DT_MIN) + u * (math.log(DT_MAX) - math.log(DT_MIN)))
    bias = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
    w = torch.randn(heads, d, generator=g, dtype=torch.float64) / d**0.5
    return tuple(t.to(device, dtype) for t in (a, w, bias))
