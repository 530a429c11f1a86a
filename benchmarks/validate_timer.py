"""Validate attnbench's timer and memory meter against the ecosystem's references.

Latency: the harness's median for full[sdpa] at several n, against
``torch.utils.benchmark.Timer.blocked_autorange`` (and ``triton.testing.do_bench`` on a GPU);
target: within 5%. Memory: the harness's peak for full[naive] and full[sdpa] against the
analytic minimum of what each must hold (output, plus the n² scores and probabilities for naive).

    python benchmarks/validate_timer.py [--device cpu|cuda] [--n 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.utils.benchmark as tbench

from attnbench import variants
from attnbench.harness.run.machine import machine_info
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.timing import measure_latency

TARGET = 0.05  # |ratio − 1| allowed for latency


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds per n")
    ap.add_argument("--round-s", type=float, default=0.3, help="seconds per timer per round")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    info = machine_info(dev)
    print(f"# attnbench timer validation — {info['device_name']}, torch {info['torch_version']}"
          f", {torch.get_num_threads()} threads, {platform.machine()}, git {info['git_sha']}")
    print(f"# full[sdpa], B={args.batch} H={args.heads} D={args.head_dim}, {dtype}, forward")
    sdpa = variants.build("full", backend="sdpa")
    naive = variants.build("full", backend="naive")
    misses = []
    print("\n## Latency: harness median vs reference timers (target: within ±5%)")
    print(f"ratio: median over {args.rounds} alternating rounds of (harness / reference),"
          f" {args.round_s} s per timer per round")
    cols = "| n | harness ms | blocked_autorange ms | ratio |"
    if dev == "cuda":
        cols += " do_bench ms | ratio |"
    print(cols + " verdict |")
    print("|" + "---|" * (cols.count("|") - 1) + "---|")
    for n in args.n:
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device=dev, dtype=dtype)
                   for _ in range(3))

        def call(q=q, k=k, v=v):
            return sdpa(q, k, v)

        # The timers alternate in short rounds and each round gives a ratio of two measurements
        # taken back to back: this machine's speed drifts by ±30% from one second to the next
        # (a shared VM), which a single long run of each timer would mistake for a timer error.
        ours, theirs, tri, ratios, tri_ratios = [], [], [], [], []
        for _ in range(args.rounds):
            h = measure_latency(call, dev, warmup=1, min_reps=5, min_time_s=args.round_s,
                                flush_l2=False).median_ms
            # Timer defaults to one thread; time with the threads the harness uses.
            timer = tbench.Timer("call()", globals={"call": call},
                                 num_threads=torch.get_num_threads())
            r = timer.blocked_autorange(min_run_time=args.round_s).median * 1e3
            ours.append(h)
            theirs.append(r)
            ratios.append(h / r)
            if dev == "cuda":
                from triton.testing import do_bench

                t = do_bench(call, warmup=25, rep=200, return_mode="median")
                tri.append(t)
                tri_ratios.append(h / t)
        ratio = statistics.median(ratios)
        row = (f"| {n} | {statistics.median(ours):.3f} | {statistics.median(theirs):.3f} |"
               f" {ratio:.3f} |")
        ok = abs(ratio - 1) <= TARGET
        if tri:
            t_ratio = statistics.median(tri_ratios)
            row += f" {statistics.median(tri):.3f} | {t_ratio:.3f} |"
            ok = ok and abs(t_ratio - 1) <= TARGET
        if not ok:
            misses.append(f"latency at n={n}")
        print(row + (" within 5%" if ok else " MISSED") + " |")

    print("\n## Memory: harness peak vs analytic minimum (inputs excluded: allocated before)")
    print("| backend | n | harness MiB | analytic MiB | ratio | what the minimum counts |")
    print("|---|---|---|---|---|---|")
    el = torch.empty((), dtype=dtype).element_size()
    for n in args.n:
        bh = args.batch * args.heads
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device=dev, dtype=dtype)
                   for _ in range(3))
        out = bh * n * args.head_dim * el
        for att, minimum, what in (
            (naive, out + 2 * bh * n * n * el, "output + scores + probabilities (n² each)"),
            (sdpa, out, "output"),
        ):
            peak = peak_memory(lambda att=att, q=q, k=k, v=v: att(q, k, v), dev)
            print(f"| {att.label} | {n} | {peak / 2**20:.2f} | {minimum / 2**20:.2f} |"
                  f" {peak / minimum:.3f} | {what} |")
            if peak < minimum:
                misses.append(f"memory below the analytic minimum for {att.label} at n={n}")
    print()
    print("MISSED: " + "; ".join(misses) if misses else "All targets met.")
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
