"""Recurrent variants on this machine: latency vs full[sdpa], slope over n, peak memory, chunked
vs their own per-step recurrence.

    python benchmarks/bench_recurrent.py [--quick] [--threads T]

B=1, H=8, D=64, float32, causal, forward, CPU. Targets: at n=8192 ≥ 5× faster than causal
full[sdpa]; latency slope over n = 2K…16K ≤ 1.2 (log-log least squares); peak memory ∝ n (its
slope ≤ 1.2 too); the chunked form ≥ 20× faster than impl=recurrent at n=4096. A/B rounds are
interleaved (the VM drifts) and the best median of each is kept. One row per entry of VARIANTS.
"""

from __future__ import annotations

import argparse
import math
import os
import platform

import torch

from attnbench import variants
from attnbench.harness.report.scaling import loglog_slope
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.timing import measure_latency
from attnbench.variants.base import Shape

TARGET_SPEEDUP, TARGET_SLOPE, TARGET_CHUNKED = 5.0, 1.2, 20.0
N_VS_SDPA, N_VS_RECURRENT = 8192, 4096
VARIANTS = [  # (name, params): adding a recurrent variant is one line
    ("retnet", {}),
    ("gla", {}),
    ("mamba2", {}),
    ("deltanet", {}),
    ("gated_deltanet", {}),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inputs(n: int):
    return make_inputs(Shape(1, 8, n, 64), torch.float32, "cpu", 0, "gaussian")


def timed(fn, quick: bool) -> float:
    return measure_latency(fn, warmup=1, min_reps=2 if quick else 3, min_time_s=0.3).median_ms


def interleaved(fns: dict[str, object], rounds: int, quick: bool) -> dict[str, float]:
    """Best median per entry over `rounds` rounds, entries alternating inside each round."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for key, fn in fns.items():
            best[key] = min(best[key], timed(fn, quick))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one round, n up to 8K")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else 3
    ns = [2048, 4096, 8192] if args.quick else [2048, 4096, 8192, 16384]
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print("load average at start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    sdpa = variants.build("full", backend="sdpa")
    qkv = {n: inputs(n) for n in ns}
    misses = []
    with torch.no_grad():
        for name, params in VARIANTS:
            att = variants.build(name, **params)
            rec = variants.build(name, **{**params, "impl": "recurrent"})
            q8, q4 = qkv[N_VS_SDPA], qkv[N_VS_RECURRENT]
            att(*q8, causal=True)  # caches (projections) built before timing
            vs = interleaved({
                "chunk": lambda att=att, x=q8: att(*x, causal=True),
                "sdpa": lambda x=q8: sdpa(*x, causal=True),
            }, rounds, args.quick)
            vr = interleaved({
                "chunk": lambda att=att, x=q4: att(*x, causal=True),
                "recurrent": lambda rec=rec, x=q4: rec(*x, causal=True),
            }, 1, True)  # the per-step form takes seconds per call: one round, two repeats
            lat = interleaved({n: (lambda att=att, x=qkv[n]: att(*x, causal=True)) for n in ns},
                              rounds, args.quick)
            mem = [peak_memory(lambda att=att, x=qkv[n]: att(*x, causal=True)) for n in ns]
            speed, chunked = vs["sdpa"] / vs["chunk"], vr["recurrent"] / vr["chunk"]
            t_slope, m_slope = loglog_slope(ns, [lat[n] for n in ns]), loglog_slope(ns, mem)
            kernel = att.kernel(Shape(1, 8, N_VS_SDPA, 64), "cpu", True, False)
            print(f"\n{att.label}  (kernel {kernel})")
            print(f"  n={N_VS_SDPA}: {vs['chunk']:.1f} ms vs full[sdpa] causal {vs['sdpa']:.1f} ms"
                  f" -> {speed:.1f}x  (target >= {TARGET_SPEEDUP:g}x)")
            print(f"  latency over n={ns}: [{', '.join(f'{lat[n]:.1f}' for n in ns)}] ms, "
                  f"slope {t_slope:.2f}  (target <= {TARGET_SLOPE})")
            print(f"  peak memory: [{', '.join(f'{m / 2**20:.0f}' for m in mem)}] MiB, slope "
                  f"{m_slope:.2f}  (target: proportional to n, <= {TARGET_SLOPE})")
            print(f"  n={N_VS_RECURRENT}: chunked {vr['chunk']:.1f} ms vs per-step "
                  f"{vr['recurrent']:.0f} ms -> {chunked:.0f}x  (target >= {TARGET_CHUNKED:g}x)")
            for ok, what in [(speed >= TARGET_SPEEDUP, f"{speed:.1f}x vs sdpa"),
                             (t_slope <= TARGET_SLOPE, f"latency slope {t_slope:.2f}"),
                             (m_slope <= TARGET_SLOPE, f"memory slope {m_slope:.2f}"),
                             (chunked >= TARGET_CHUNKED, f"{chunked:.0f}x vs per-step")]:
                if not ok:
                    misses.append(f"{att.label}: {what}")
    print("\nlatency: best of the interleaved rounds of the median of repeats (>= 3 repeats, "
          f"0.3 s), {rounds} round(s); per-step form: one round")
    print("load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("missed:" if misses else "all targets met")
    for m in misses:
        print(f"  - {m}")


if __name__ == "__main__":
    main()
