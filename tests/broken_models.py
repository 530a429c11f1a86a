"""A variant whose memory model raises at one n: a failure outside the measure step (not a
built-in; registered by the CLI tests that import it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnbench import variants
from attnbench.variants.base import Variant
from attnbench.variants.full.full import naive_attention


@variants.register
@dataclass
class BrokenModel(Variant):
    """Exact attention whose `memory_bytes` raises at n == fail_at."""

    name: ClassVar[str] = "broken_model"
    fail_at: int = 32

    def flops(self, shape, causal=False):
        return 4.0 * shape.bh * shape.seq_len**2 * shape.head_dim

    def memory_bytes(self, shape, dtype, causal=False):
        if shape.seq_len == self.fail_at:
            raise RuntimeError(f"broken memory model at n={self.fail_at}")
        return super().memory_bytes(shape, dtype, causal)

    def forward(self, q, k, v, causal=False):
        return naive_attention(q, k, v, causal)
