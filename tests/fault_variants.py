"""A variant that fails on purpose at one n, for the fault-handling tests (not a built-in)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench import variants
from attnbench.variants.base import Variant
from attnbench.variants.full.full import naive_attention


@variants.register
@dataclass
class Faulty(Variant):
    """Exact attention that, at n == fail_at, fails as `how` says; sleeps `sleep_ms` per call."""

    name: ClassVar[str] = "faulty"
    how: str = "oom"  # oom | cpu_oom | nonfinite | error | exit (the process dies)
    fail_at: int = 64
    sleep_ms: float = 0.0

    def flops(self, shape, causal=False):
        return 4.0 * shape.bh * shape.seq_len**2 * shape.head_dim

    def forward(self, q, k, v, causal=False):
        time.sleep(self.sleep_ms / 1e3)
        out = naive_attention(q, k, v, causal)
        if q.shape[-2] != self.fail_at:
            return out
        if self.how == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 EiB (simulated)")
        if self.how == "cpu_oom":
            torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator really refuses this
        if self.how == "exit":
            os._exit(3)
        if self.how == "nonfinite":
            return out * float("nan")
        raise ValueError(f"boom at n={self.fail_at}")
