"""Linformer (Wang et al. 2020, https://arxiv.org/abs/2006.04768): K, V projected to k rows.

softmax(Q (EK)ᵀ/√d)(FV) with E, F (k × n) shared across batch and heads, a function of
(projection, seed, n, k): the same projections for a given n on every call and device.
`projection` says how E, F are set, since this benchmark does not train them:

- ``gaussian`` (default): i.i.d. N(0, 1/k), the random projection of the paper's Theorem 1.
- ``uniform``: i.i.d. U(−1/√k, 1/√k), the initialisation of lucidrains/linformer.
- ``mean``: E = F = mean-pooling of n into k contiguous segments (⌈n/k⌉ positions in the first
  n mod k, ⌊n/k⌋ in the rest), what a user would try first. Stored dense and applied as a
  matmul, as a learned E is: the cost is Linformer's, not that of pooling.

The error against softmax attention (softmax_rel_error) measures these untrained projections,
not Linformer as trained: with random E, F each row of FV sums n random-signed values, so its
norm, and the output's, grows like √(n/k) (error 217 at n=8192, k=256 for ``gaussian``); read the
error of an approximation with untrained parameters as that of its initialisation only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, Variant, compute_dtype, fused_workspace, mm_dtype
from attnbench.variants.registry import register


@register
@dataclass
class Linformer(Variant):
    """Low-rank attention along the sequence. Args: k (projected length), seed, projection
    (gaussian | uniform | mean: how E, F are set). Non-causal."""

    name: ClassVar[str] = "linformer"
    family: ClassVar[str] = "lowrank"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False
    no_causal: ClassVar[str] = "projecting along n mixes future keys"
    at_most_n: ClassVar[tuple[str, ...]] = ("k",)
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    k: int = 256
    seed: int = 0
    projection: str = "gaussian"

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k={self.k}: must be positive")
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"projection={self.projection!r}: expected one of {', '.join(PROJECTIONS)}"
            )

    @property
    def label(self) -> str:
        return self._label({"k": f"k={self.k}"})

    def projections(
        self, n: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """E, F: (k, n) each, a function of (projection, seed, n, k) only."""
        dev = str(torch.device(device))
        return _projections(self.projection, self.seed, n, self.k, dev, dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        """q (B, H, Nq, D) against the k rows E K, F V of k, v (B, Hkv, Nk, D): E, F are over
        the Nk keys, so any Nq ≤ Nk queries are rows of the same attention (the last Nq rows of
        the square call). The G query heads of a group are rows against its one E K, F V."""
        if causal:
            raise ValueError("linformer has no causal form")
        b, h, nq, d = q.shape
        ct = mm_dtype(q.dtype, q.device)  # GPU path: the input dtype (SDPA keeps fp32 stats)
        e, f = self.projections(k.shape[-2], q.device, ct)
        kp = e @ k.to(ct)  # (k, Nk) @ (B, Hkv, Nk, D) -> (B, Hkv, k, D)
        vp = f @ v.to(ct)
        rows = q.to(ct).reshape(b, k.shape[1], -1, d)  # (B, Hkv, G·Nq, D)
        out = F.scaled_dot_product_attention(rows, kp, vp)  # (B, Hkv, G·Nq, D)
        return out.view(b, h, nq, d).to(q.dtype)

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        return "project+sdpa"

    def flops(self, shape: Shape, causal: bool = False) -> float:
        b, d, kp = shape.batch, shape.head_dim, self.k
        project = 2 * shape.hkv * shape.seq_len * kp * d  # E K, F V
        return 2.0 * b * (project + 2 * shape.heads * shape.nq * kp * d)  # + QK̃ᵀ, PṼ

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        """E, F are constants: E K and F V need only Eᵀ dK̃, Fᵀ dṼ (1× forward). SDPA's backward
        recomputes QK̃ᵀ, then dP = dO Ṽᵀ, dṼ = Pᵀ dO, dQ = dS K̃, dK̃ = dSᵀ Q: 5 of 2·nq·k·d."""
        b, d, kp = shape.batch, shape.head_dim, self.k
        project = 2 * shape.hkv * shape.seq_len * kp * d
        return 2.0 * b * (project + 5 * shape.heads * shape.nq * kp * d)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     device: torch.device | str = "cpu") -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        b, h, hkv, d, kp = shape.batch, shape.heads, shape.hkv, shape.head_dim, self.k
        nq, nk = shape.nq, shape.seq_len
        # copies of q, k, v (casts, k and v transposed for the projection); E K, F V;
        # output, log-sum-exp; E, F
        words = b * (2 * h * nq * d + 4 * hkv * nk * d + 2 * hkv * kp * d + h * nq) + 2 * kp * nk
        return words * el + fused_workspace(device, d)  # SDPA's tiled workspace, bounded

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


PROJECTIONS = ("gaussian", "uniform", "mean")


@functools.lru_cache(maxsize=8)
def _projections(
    kind: str, seed: int, n: int, k: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Made on the CPU in float32 (the same numbers on every device), cached where used."""
    if kind == "mean":
        sizes = torch.full((k,), n // k).add_(torch.arange(k) < n % k)  # first n mod k: +1
        seg = torch.repeat_interleave(torch.arange(k), sizes)  # (n,): segment of each position
        e = torch.zeros(k, n).index_put_((seg, torch.arange(n)), 1.0 / sizes[seg].float())
        e = e.to(device, dtype)
        return e, e
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + n) % (2**63))
    if kind == "uniform":
        e, f = (torch.rand(k, n, generator=g).mul_(2).sub_(1).div_(k**0.5) for _ in range(2))
    else:
        e = torch.randn(k, n, generator=g) / k**0.5
        f = torch.randn(k, n, generator=g) / k**0.5
    return e.to(device, dtype), f.to(device, dtype)
