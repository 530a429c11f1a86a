"""MoBA and NSA against causal full attention (sdpa) on this machine: latency by interleaved
rounds in one process, and each one's error against full softmax on sampled rows.

Target: at B=1, H=8, D=64, fp32, causal, n = 8192, MoBA and NSA (default parameters) at least 3×
faster than full[sdpa]. Prints each figure beside its target; commit no output.

    python benchmarks/bench_select.py [--n 2048 4096 8192 16384] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from attnbench import variants
from attnbench.variants.reference import attention_reference, rel_error
from attnbench.variants.testing import random_qkv

TARGET_N, TARGET_SPEEDUP = 8192, 3.0


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
        for name in ("moba", "nsa"):
            ms = statistics.median(times[name])
            speedup = full / ms
            met = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
            target = f"target >= {TARGET_SPEEDUP:g}x: {met}" if n == TARGET_N else "no target"
            err = rel_error(outs[name][:, :, rows], ref)
            print(f"  {name:5s} {ms:8.1f} ms  {speedup:5.2f}x vs full[sdpa] ({target}); "
                  f"error vs full softmax {err:.2e}, density {atts[name].density(n, True):.3f}")


if __name__ == "__main__":
    main()
