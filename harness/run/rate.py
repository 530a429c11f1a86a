"""The machine's limits a point is compared with (`Record.limit_fraction`): its matmul rate
(what `plan` also estimates times with) and the rate at which it reads a working set of the
point's size."""

from __future__ import annotations

import functools
import math
import time

import torch


def matmul_rate(device: str, dtype: str) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, measured for about 0.1 s (sized like
    attention's large matmuls; a small one measures dispatch overhead, not the rate). On CUDA
    after a warm-up, timed by events over a count of calls sized from one synced call (a
    host-timed loop would end with a queue of calls still pending)."""
    from attnbench.harness.run.config import DTYPES

    cuda = torch.device(device).type == "cuda"
    n = 4096 if cuda else 1024
    dt = DTYPES[dtype]
    if not cuda and dt != torch.float32:
        dt = torch.float32  # CPU variants compute half inputs in float32 (see compute_dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    if cuda:
        for _ in range(3):  # cuBLAS set-up, clocks up
            a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        reps = max(2, min(1000, math.ceil(0.1 / max(time.perf_counter() - t0, 1e-6))))
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        return 2.0 * n**3 * reps / (start.elapsed_time(end) * 1e-3)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < 0.1:
        a @ b
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


@functools.cache
def _rate_once(device: str, dtype: str, threads: int) -> float:
    return matmul_rate(device, dtype)


def process_matmul_rate(device: str, dtype: str) -> float:
    """`matmul_rate`, measured once per process for each (device, dtype, CPU threads): the
    machine's rate a point's executed FLOP/s is compared with (`limit_fraction`)."""
    return _rate_once(device, dtype, torch.get_num_threads())


def read_rate(device: str, nbytes: float) -> float:
    """Bytes/s at which `device` reads a warm float32 working set of about `nbytes` (a power
    of two from 64 KiB to 1 GiB at or above it, summed for about 0.05 s; on CUDA timed by
    events): the memory limit of a point that moves that many bytes each call, at the cache
    level a working set of that size lives in (a decode step re-reads the same cache)."""
    size = 1 << _bucket(nbytes)
    x = torch.ones(size // 4, device=device)
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):  # pages touched, clocks up, the working set where it lives
        x.sum()
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        reps = max(2, min(10000, math.ceil(0.05 / max(time.perf_counter() - t0, 1e-6))))
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(reps):
            x.sum()
        end.record()
        end.synchronize()
        return size * reps / (start.elapsed_time(end) * 1e-3)
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < 0.05:
        x.sum()
        reps += 1
    return size * reps / (time.perf_counter() - t0)


@functools.cache
def _read_once(device: str, bucket: int, threads: int) -> float:
    return read_rate(device, float(1 << bucket))


def process_read_rate(device: str, nbytes: float) -> float:
    """`read_rate`, measured once per process for each (device, power-of-two size, CPU
    threads)."""
    return _read_once(device, _bucket(nbytes), torch.get_num_threads())


def _bucket(nbytes: float) -> int:
    """log2 of the power of two `read_rate` reads for `nbytes`: at or above it, 64 KiB to 1 GiB."""
    return max(16, min(30, math.ceil(math.log2(max(nbytes, 1.0)))))
