"""Sigmoid attention (Ramapuram et al. 2024, https://arxiv.org/abs/2409.04431).

out = sigmoid(QKᵀ/√d + b) V, each score squashed on its own instead of a softmax over the row;
b = -log(n) by default (the paper's choice, which keeps the row sums near those of softmax).
Causal: scores of keys j > i are dropped (sigmoid(-inf) = 0). Dense, O(n²) time and memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench import Shape, Variant, register


@register
@dataclass
class Sigmoid(Variant):
    """Args: bias: added to every score before the sigmoid; None means -log(n)."""

    name: ClassVar[str] = "sigmoid"
    family: ClassVar[str] = "full"  # dense: every query sees every key
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 2.0  # the n×n scores are materialised
    exact: ClassVar[bool] = False  # not softmax: the runner reports its error vs softmax

    bias: float | None = None

    def __post_init__(self) -> None:
        if self.bias is not None and not math.isfinite(self.bias):
            raise ValueError(f"bias={self.bias!r}: expected a finite number or None")

    @property
    def label(self) -> str:
        return "sigmoid" if self.bias is None else f"sigmoid[b={self.bias:g}]"

    # Nothing beyond the base dtype check: the dense formula runs wherever torch runs, and points
    # too big for memory are skipped by the runner from `memory_bytes`. A variant whose kernel
    # needs CUDA, a dtype or a head_dim limit returns those reasons here (see variants/full/).
    def not_supported_reasons(self, shape, dtype, device, causal, mode="fwd") -> list[str]:
        return super().not_supported_reasons(shape, dtype, device, causal, mode)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        return sigmoid_attention(q, k, v, causal, self.bias)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        # QKᵀ and PV over every score (causal masks after computing): 2·2·B·H·N²·D.
        return 4.0 * shape.bh * shape.seq_len * shape.seq_len * shape.head_dim

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        bh, n, d = shape.bh, shape.seq_len, shape.head_dim
        scores = 2 * bh * n * n * el + (n * n if causal else 0)  # scores, sigmoid, causal mask
        return scores + bh * n * d * el


def sigmoid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
    bias: float | None = None,
) -> torch.Tensor:
    """sigmoid(QKᵀ/√d + b)V on (B, H, N, D) tensors, in the dtype of the inputs."""
    n = q.shape[-2]
    b = -math.log(n) if bias is None else bias
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])) + b  # (B, H, N, N)
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.sigmoid(scores) @ v  # (B, H, N, D)
