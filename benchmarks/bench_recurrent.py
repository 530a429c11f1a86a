"""Recurrent variants on this machine: latency against causal full[sdpa], the slope over n, peak
memory, the chunked form against its own per-step form, and the work behind each number.

    python benchmarks/bench_recurrent.py [--quick] [--threads T] [--rounds R]

B=1, H=8, D=64, float32, causal, forward, CPU. Targets: at n=8192 ≥ 8× faster than causal
full[sdpa]; latency slope over n = 2K…16K ≤ 1.12 (log-log least squares); peak memory ∝ n (slope
≤ 1.12); the chunked form ≥ 20× faster than impl=recurrent at n=4096.

One run, interleaved rounds: every entry (each variant at each n, full[sdpa], a batched-matmul
probe, a fresh-output probe) is timed once per round, in the same order, and the best median of
each is kept, so ratios within the run compare like with like on a shared machine. The per-step
forms take seconds per call: two repeats per round, the best of the same number of rounds
(a single round let their time, and so the chunked-vs-per-step ratio, move by 2x between runs).

Beside each variant's n=8192 latency, the page faults per call of its best round: fresh pages
the allocator mapped, a cost of its state (it differs between processes), not of the method.

Per variant, the work: algorithm FLOPs (the least matmul work of the chunked algorithm: causal
triangles once, no padding), executed FLOPs (what runs: the variant's `flops`, checked against a
dispatch count in tests/test_flops.py), the executed rate as a fraction of the measured matmul rate
(torch.bmm on the engine's shapes, (128, 64, 64) × (128, 64, 64), 30 calls back to back, timed
in the same rounds), and
the speed-ups. Where a target is missed the output says what binds, in numbers:
- speed-ups: the floor of the chunked form is its algorithm FLOPs at the measured matmul rate. If
  the target asks for less time than that floor, it cannot be met on this machine by any engine
  doing this algorithm's matmuls; otherwise the engine is what misses (its fraction of the rate).
- slope: a fresh output of the point's size must be written (allocations of 32 MiB and more are
  fresh pages on every call: 16K·8·64·4 B is 32 MiB). Its measured cost per n is printed, and the
  slope of the latency less that cost: when that one meets the target, the output's pages bind.
"""

from __future__ import annotations

import argparse
import math
import os
import platform

import torch

from attnbench import variants
from attnbench.harness.report.scaling import loglog_slope
from attnbench.harness.run.allocator import keep_freed_memory
from attnbench.harness.run.contention import CONTENDED_SHARE, contention, snapshot
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.timing import measure_latency
from attnbench.variants.base import Shape

TARGET_SPEEDUP, TARGET_SLOPE, TARGET_CHUNKED = 8.0, 1.12, 20.0
N_VS_SDPA, N_VS_RECURRENT = 8192, 4096
B, H, D = 1, 8, 64
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096  # bytes per page
PROBE = (128, 64, 64)  # the matmul probe: one segment's scores at B·H = 8, chunk 64
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


def shape(n: int) -> Shape:
    return Shape(B, H, n, D)


def timed(fn, quick: bool):
    return measure_latency(fn, warmup=1, min_reps=2 if quick else 3, min_time_s=0.3)


def interleaved(fns: dict, rounds: int, quick: bool) -> tuple[dict, dict]:
    """Best median per entry over `rounds` rounds, the entries alternating inside each round,
    and the page faults per call of that round."""
    best, faults = dict.fromkeys(fns, math.inf), dict.fromkeys(fns, math.nan)
    for _ in range(rounds):
        for key, fn in fns.items():
            got = timed(fn, quick)
            if got.median_ms < best[key]:
                best[key], faults[key] = got.median_ms, got.faults_per_call
    return best, faults


def probe():
    """The matmul rate probe: 30 calls back to back (timed as every entry; the best round's
    rate is one the machine reached, so the floor built on it is a lower bound)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*PROBE, generator=g) for _ in range(2))

    def best_of() -> None:
        for _ in range(30):
            torch.bmm(a, b)

    return best_of, 2.0 * PROBE[0] * PROBE[1] * PROBE[2] * PROBE[2]


def speedup_words(name: str, speed: float, target: float, floor_ms: float, base_ms: float,
                  executed: float, ms: float, rate: float, contended: bool) -> str:
    """Why a speed-up target is missed, the first that binds: the floor (the algorithm's FLOPs
    at the matmul rate), the executed FLOPs at that rate, or the engine (the fraction of the
    rate it reaches against the fraction the target needs)."""
    need_ms = base_ms / target
    at_rate = executed / rate * 1e3  # ms
    if floor_ms > need_ms:
        verdict = "out of reach in this contended run" if contended else "impossible here"
        return (f"{name}: {speed:.1f}x, target {target:g}x {verdict}: the algorithm's "
                f"FLOPs at the measured matmul rate take {floor_ms:.1f} ms > {base_ms:.0f} / "
                f"{target:g} = {need_ms:.1f} ms")
    if at_rate > need_ms:
        return (f"{name}: {speed:.1f}x, the executed FLOPs bind: at the measured matmul rate "
                f"they take {at_rate:.1f} ms > {need_ms:.1f} ms (the algorithm's: "
                f"{floor_ms:.1f} ms)")
    have, need = at_rate / ms, at_rate / need_ms
    return (f"{name}: {speed:.1f}x, the engine binds: it runs its matmuls at {have:.0%} of the "
            f"measured rate, {target:g}x needs {need:.0%} (floor {floor_ms:.1f} ms, target "
            f"{need_ms:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one round, n up to 8K")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    ns = [2048, 4096, 8192] if args.quick else [2048, 4096, 8192, 16384]
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print(f"CPU allocator: {keep_freed_memory()}")
    print("load average at start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    start = snapshot()
    sdpa = variants.build("full", backend="sdpa")
    qkv = {n: make_inputs(shape(n), torch.float32, "cpu", 0, "gaussian") for n in ns}
    built = [(variants.build(name, **params), variants.build(name, **params, impl="recurrent"))
             for name, params in VARIANTS]
    mm, mm_flops = probe()
    fns: dict = {"sdpa": lambda x=qkv[N_VS_SDPA]: sdpa(*x, causal=True), "matmul": mm}
    for n in ns:  # a fresh output of the point's size: allocated and written, as a call's is
        fns["out", n] = lambda n=n: torch.empty(B, H, n, D).fill_(1.0)
    for att, _ in built:
        for n in ns:
            fns[att.label, n] = lambda att=att, x=qkv[n]: att(*x, causal=True)
    with torch.no_grad():
        for att, _ in built:
            att(*qkv[ns[0]], causal=True)  # caches (projections) built before timing
        t, faults = interleaved(fns, rounds, args.quick)
        per_step = {att.label: (lambda r=rec, x=qkv[N_VS_RECURRENT]: r(*x, causal=True))
                    for att, rec in built}
        steps, _ = interleaved(per_step, rounds, True)
        mem = {(att.label, n): peak_memory(lambda att=att, x=qkv[n]: att(*x, causal=True))
               for att, _ in built for n in ns}
    rate = mm_flops * 30 / (t["matmul"] / 1e3)  # FLOP/s
    load = contention(start, snapshot(), torch.get_num_threads())
    contended = not load.others_cpu < CONTENDED_SHARE  # NaN (unknown) counts as contended
    print(f"others took {load.others_cpu:.0%} of the machine during the run"
          + (": CONTENDED, the numbers compare within this run only" if contended else ""))
    print(f"full[sdpa] causal at n={N_VS_SDPA}: {t['sdpa']:.1f} ms; matmul probe torch.bmm "
          f"{PROBE[0]}×({PROBE[1]}×{PROBE[2]} @ {PROBE[2]}×{PROBE[2]}): {rate / 1e9:.1f} GFLOP/s")
    outs = ", ".join(f"{t['out', n]:.1f}" for n in ns)
    print(f"a fresh output (B={B}, H={H}, D={D}, float32) allocated and written, per n: "
          f"[{outs}] ms")
    misses = []
    for att, _ in built:
        name = att.label
        lat = [t[name, n] for n in ns]
        speed, chunked = t["sdpa"] / t[name, N_VS_SDPA], steps[name] / t[name, N_VS_RECURRENT]
        t_slope, m_slope = loglog_slope(ns, lat), loglog_slope(ns, [mem[name, n] for n in ns])
        less = [max(1e-6, t[name, n] - t["out", n]) for n in ns]
        algo = {n: att.algorithm_flops(shape(n)) for n in (N_VS_SDPA, N_VS_RECURRENT)}
        done = {n: att.flops(shape(n), True) for n in (N_VS_SDPA, N_VS_RECURRENT)}
        floor = {n: algo[n] / rate * 1e3 for n in algo}  # ms
        print(f"\n{name}  (kernel {att.kernel(shape(N_VS_SDPA), 'cpu', True, False)})")
        print(f"  n={N_VS_SDPA}: {t[name, N_VS_SDPA]:.1f} ms vs full[sdpa] causal "
              f"{t['sdpa']:.1f} ms -> {speed:.1f}x  (target >= {TARGET_SPEEDUP:g}x); page "
              f"faults per call {faults[name, N_VS_SDPA]:.0f} "
              f"({faults[name, N_VS_SDPA] * PAGE / 2**20:.1f} MiB)")
        print(f"  latency over n={ns}: [{', '.join(f'{x:.1f}' for x in lat)}] ms, slope "
              f"{t_slope:.2f}  (target <= {TARGET_SLOPE}); less a fresh output's write: "
              f"slope {loglog_slope(ns, less):.2f}")
        print(f"  peak memory: [{', '.join(f'{mem[name, n] / 2**20:.0f}' for n in ns)}] MiB, "
              f"slope {m_slope:.2f}  (target: proportional to n, <= {TARGET_SLOPE})")
        print(f"  n={N_VS_RECURRENT}: chunked {t[name, N_VS_RECURRENT]:.1f} ms vs per-step "
              f"{steps[name]:.0f} ms -> {chunked:.1f}x  (target >= {TARGET_CHUNKED:g}x)")
        for n in (N_VS_SDPA, N_VS_RECURRENT):
            got = done[n] / (t[name, n] / 1e3)
            print(f"  work at n={n}: algorithm {algo[n] / 1e9:.2f} GFLOP, executed "
                  f"{done[n] / 1e9:.2f} GFLOP ({done[n] / algo[n]:.2f}x); executed at "
                  f"{got / 1e9:.1f} GFLOP/s = {got / rate:.0%} of the matmul rate; floor "
                  f"(algorithm FLOPs at that rate) {floor[n]:.1f} ms")
        print(f"  speed-up at most (floor): {t['sdpa'] / floor[N_VS_SDPA]:.0f}x vs sdpa, "
              f"{steps[name] / floor[N_VS_RECURRENT]:.0f}x vs per-step")
        if speed < TARGET_SPEEDUP:
            misses.append(speedup_words(name, speed, TARGET_SPEEDUP, floor[N_VS_SDPA],
                                        t["sdpa"], done[N_VS_SDPA], t[name, N_VS_SDPA], rate,
                                        contended))
        if t_slope > TARGET_SLOPE:
            s_less = loglog_slope(ns, less)
            why = (f"a fresh output's pages bind: {t['out', ns[-1]]:.1f} ms of "
                   f"{lat[-1]:.1f} at n={ns[-1]}, the slope less it {s_less:.2f}"
                   if s_less <= TARGET_SLOPE else f"the engine binds (less the output's write: "
                   f"{s_less:.2f})")
            misses.append(f"{name}: latency slope {t_slope:.2f}, {why}")
        if m_slope > TARGET_SLOPE:
            misses.append(f"{name}: memory slope {m_slope:.2f}")
        if chunked < TARGET_CHUNKED:
            misses.append(speedup_words(name + " vs per-step", chunked, TARGET_CHUNKED,
                                        floor[N_VS_RECURRENT], steps[name],
                                        done[N_VS_RECURRENT], t[name, N_VS_RECURRENT], rate,
                                        contended))
    print(f"\nlatency: best of {rounds} interleaved round(s) of the median of repeats (>= 3, "
          "0.3 s); per-step forms: best of as many rounds of two repeats")
    print("load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("missed:" if misses else "all targets met")
    for m in misses:
        print(f"  - {m}")


if __name__ == "__main__":
    main()
