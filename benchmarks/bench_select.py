"""MoBA and NSA against causal full attention (sdpa) on this machine: latency by interleaved
rounds in one process, and each one's error against full softmax on sampled rows.

Targets: at B=1, H=8, D=64, fp32, causal, n = 8192, MoBA at least 6× and NSA at least 3× faster
than full[sdpa] (default parameters). Beside each: the method's own FLOPs (`algorithm_flops`) and
the engine's executed ones, the executed FLOP/s as a fraction of this machine's fp32 matmul rate
(measured here, before and after), and two bounds on the speed-up: the method's own FLOPs at
the matmul rate, and the engine's own calls of aten's CPU flash kernel (their shapes, padding
and masks, recorded from one call) replayed alone, plus its other matmuls at the matmul rate,
beside what the rest of the engine (routing, gathers, merge) takes: a missed target says which
bound binds.

    python benchmarks/bench_select.py [--n 2048 4096 8192 16384] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnbench import variants
from attnbench.harness.run.allocator import keep_freed_memory
from attnbench.harness.run.opcount import count_call
from attnbench.harness.run.rate import matmul_rate
from attnbench.variants.base import Shape
from attnbench.variants.reference import attention_reference, rel_error
from attnbench.variants.testing import random_qkv

TARGET_N = 8192
TARGET_SPEEDUP = {"moba": 6.0, "nsa": 3.0}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f}")


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class _Calls(TorchDispatchMode):
    """Records every call of aten's CPU flash kernel with copies of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _FLASH:
            self.calls.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                               dict(kwargs)))
        return func(*args, **kwargs)


def kernel_bound(att, q, k, v, rounds: int) -> tuple[float, float, float, int]:
    """The engine's own calls of aten's CPU flash kernel (its call shapes, padding and masks),
    replayed alone: (ms, best of `rounds`; their FLOPs; the call's other matmul FLOPs, routing
    or the compressed branch; the number of calls)."""
    rec = _Calls()

    def record() -> None:
        with rec:
            att(q, k, v, causal=True)

    def replay() -> None:
        for args, kwargs in rec.calls:
            _FLASH(*args, **kwargs)

    with torch.no_grad():
        total = count_call(record).flops  # the forward counted as it is recorded
        flash = count_call(replay).flops
        other = total - flash
        best = math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            replay()
            best = min(best, time.perf_counter() - t0)
    return best * 1e3, flash, other, len(rec.calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--error-rows", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    atts = {"full[sdpa]": variants.build("full"), "moba": variants.build("moba"),
            "nsa": variants.build("nsa")}
    print(f"machine: {_machine()}")
    print(f"CPU allocator: {keep_freed_memory()}")
    rate = matmul_rate("cpu", "float32")
    print(f"fp32 matmul rate (1024³, 0.1 s): {rate / 1e9:.1f} GFLOP/s")
    print("B=1 H=8 D=64 fp32 causal; latency = median of interleaved rounds (ms)")
    for label in ("moba", "nsa"):
        print(f"  {label}: {atts[label].label}")
    for n in args.n:
        q, k, v = random_qkv(1, 8, n, 64, dtype=torch.float32, seed=0)
        times: dict[str, list[float]] = {name: [] for name in atts}
        outs = {}
        with torch.no_grad():
            for name, att in atts.items():  # warm-up (layout caches, allocator)
                outs[name] = att(q, k, v, causal=True)
            for r in range(args.rounds):
                order = list(atts)[r % len(atts):] + list(atts)[: r % len(atts)]
                for name in order:
                    t0 = time.perf_counter()
                    atts[name](q, k, v, causal=True)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            g = torch.Generator().manual_seed(1)
            rows = torch.randperm(n, generator=g)[: args.error_rows].sort().values
            ref = attention_reference(q, k, v, causal=True, rows=rows)
        full = statistics.median(times["full[sdpa]"])
        print(f"n={n}: full[sdpa] {full:.1f} ms")
        shape = Shape(1, 8, n, 64)
        for name in ("moba", "nsa"):
            att = atts[name]
            ms = statistics.median(times[name])
            speedup = full / ms
            want = TARGET_SPEEDUP[name]
            met = "met" if speedup >= want else "NOT met"
            target = f"target >= {want:g}x: {met}" if n == TARGET_N else "no target"
            err = rel_error(outs[name][:, :, rows], ref)
            algo, executed = att.algorithm_flops(shape, True), att.flops(shape, True)
            floor_ms = algo / rate * 1e3
            print(f"  {name:5s} {ms:8.1f} ms  {speedup:5.2f}x vs full[sdpa] ({target}); "
                  f"error vs full softmax {err:.2e}, density {att.density(n, True):.3f}")
            print(f"        work: algorithm {algo / 1e9:.2f} GFLOP, executed {executed / 1e9:.2f} "
                  f"GFLOP ({executed / algo:.2f}x) at {executed / ms / 1e6:.1f} GFLOP/s = "
                  f"{executed / ms / 1e6 / (rate / 1e9):.0%} of the matmul rate; at most "
                  f"{full / floor_ms:.1f}x here (the method's FLOPs at the matmul rate: "
                  f"{floor_ms:.1f} ms)")
            kms, kflops, other, calls = kernel_bound(att, q, k, v, args.rounds)
            bound_ms = kms + other / rate * 1e3
            print(f"        kernel: the engine's {calls} calls of aten's CPU flash kernel, "
                  f"replayed alone, take {kms:.1f} ms ({kflops / kms / 1e6:.0f} GFLOP/s = "
                  f"{kflops / kms / 1e6 / (rate / 1e9):.0%} of the matmul rate); with its other "
                  f"{other / 1e9:.2f} GFLOP at the matmul rate: at most {full / bound_ms:.1f}x "
                  f"here on this kernel; the rest of the engine (routing, gathers, merge) "
                  f"takes {max(0.0, ms - bound_ms):.1f} ms")
    again = matmul_rate("cpu", "float32")
    print(f"fp32 matmul rate again at the end: {again / 1e9:.1f} GFLOP/s; load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
