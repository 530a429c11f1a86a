"""A variant that fails on purpose at one n, for the fault-handling tests (not a built-in), and
write faults injected by an environment variable (a full disk, on a machine whose disk is not).

    ATTNBENCH_TEST_NOSPACE=result.json:2   the third and later records: "No space left on device"
    ATTNBENCH_TEST_NOSPACE=results.csv:0   results.csv cannot be written (the gather at the end)
"""

from __future__ import annotations

import errno
import os
import signal
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
    # oom | cpu_oom | nonfinite | error | exit (os._exit(3)) | exit0 (os._exit(0)) | sysexit
    # (SystemExit(0)) | segv (SIGSEGV, as a crash in native code) | abort (SIGABRT) | subclass
    # (a tensor subclass made in every call, which a dispatch mode refuses; not a failure)
    how: str = "oom"
    fail_at: int = 64
    sleep_ms: float = 0.0

    def flops(self, shape, causal=False):
        return 4.0 * shape.bh * shape.seq_len**2 * shape.head_dim

    def forward(self, q, k, v, causal=False):
        time.sleep(self.sleep_ms / 1e3)
        if self.how == "subclass":
            from torch.nn.attention.bias import causal_lower_right

            causal_lower_right(q.shape[-2], k.shape[-2])
        out = naive_attention(q, k, v, causal)
        if q.shape[-2] != self.fail_at:
            return out
        if self.how == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 EiB (simulated)")
        if self.how == "cpu_oom":
            torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator really refuses this
        if self.how == "exit":
            os._exit(3)
        if self.how == "exit0":
            os._exit(0)
        if self.how == "sysexit":
            raise SystemExit(0)
        if self.how == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.how == "abort":
            os.abort()
        if self.how == "nonfinite":
            return out * float("nan")
        raise ValueError(f"boom at n={self.fail_at}")


def _inject_write_faults() -> None:
    spec = os.environ.get("ATTNBENCH_TEST_NOSPACE")
    if not spec:
        return
    from pathlib import Path

    from attnbench.harness import records
    from attnbench.harness.report import build, gather

    name, _, after = spec.partition(":")
    real, seen = records.atomic_write_text, [0]

    def write(path, text):
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] > int(after or 0):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    for module in (records, gather, build):
        module.atomic_write_text = write


_inject_write_faults()
