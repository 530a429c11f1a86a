"""Decode on this machine: per-token latency and state bytes against the context length.

    python benchmarks/bench_decode.py [--ns 1024,4096,16384,65536] [--threads T]

Each point is the harness's own decode measurement (harness/run/job.py run_point, mode=decode): the
variant's cache or state for a context of n tokens is built once, then one step of the next
token is timed against that same state, repeatedly. B=1, H=8, D=64, fp32, CPU. Latencies are
the 10th percentile of the repeats (contention only adds time); contended points are named.

Targets (the issue's):
- full[sdpa] and full[naive]: per-token latency slope over 4K–64K >= 0.8, state ∝ n;
- linear and performer: slope <= 0.15, state constant;
- local: slope <= 0.15 once n > 4w, state constant there;
- at 64K, linear decode >= 20× faster per token than full[sdpa].
The block-sparse patterns are listed with their slope and state growth, no target.
Under each: the record's fraction of the limit that binds per n (`limit_fraction`: the bytes a
step must move, the keys it reads or the state it rewrites, at the machine's read rate for that
working set, or its FLOPs at the matmul rate; "mem" where the bytes bind).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from attnbench.harness.report.scaling import loglog_slope
from attnbench.harness.run.allocator import keep_freed_memory
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.job import run_point

CASES = [  # (variant, params, slope target (op, value), state target, slope from n >= ...)
    ("full", {"backend": "sdpa"}, (">=", 0.8), "∝ n", 4096),
    ("full", {"backend": "naive"}, (">=", 0.8), "∝ n", 4096),
    ("local", {"window": 256}, ("<=", 0.15), "constant", 4 * 256 + 1),
    ("linear", {}, ("<=", 0.15), "constant", 4096),
    ("performer", {}, ("<=", 0.15), "constant", 4096),
    ("strided", {}, None, "", 4096),
    ("fixed", {}, None, "", 4096),
    ("bigbird", {}, None, "", 4096),
    ("longformer", {}, None, "", 4096),
    ("moba", {}, None, "∝ n", 4096),  # routes over n/block block means: a small slope
    ("nsa", {}, None, "∝ n", 4096),  # the compressed branch reads n/stride block means
    ("retnet", {}, ("<=", 0.15), "constant", 4096),
    ("mamba2", {}, ("<=", 0.15), "constant", 4096),
    ("gated_deltanet", {}, ("<=", 0.15), "constant", 4096),
]


def point(name: str, params: dict, n: int, threads: int):
    return run_point(from_dictconfig({
        "variant": {"name": name, **params}, "mode": "decode", "seq_len": n, "batch": 1,
        "heads": 8, "head_dim": 64, "threads": threads, "error": {"rows": 1},
        "timing": {"warmup": 3, "min_reps": 20, "min_time_s": 0.3, "max_time_s": 5.0},
    }))


def verdict(value: float, target) -> str:
    if target is None or not math.isfinite(value):
        return ""
    op, ref = target
    ok = value >= ref if op == ">=" else value <= ref
    return f"target {op} {ref:g}: {'met' if ok else 'MISSED'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="1024,4096,16384,65536")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), platform.processor())
    print(f"# bench_decode — {cpu}, {args.threads or torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# CPU allocator: {keep_freed_memory()}")
    print("# B=1 H=8 D=64 fp32 CPU; per-token latency p10 (ms), state (MiB); '!' contended")
    print(f"{'variant':30} " + " ".join(f"n={n:>6}".rjust(20) for n in ns))
    results = {}
    for name, params, target, state_target, from_n in CASES:
        recs = [point(name, params, n, args.threads) for n in ns]
        label = next((r.label for r in recs if r.label), name)
        cells = []
        for r in recs:
            if r.status != "ok":
                cells.append(r.status.rjust(20))
                continue
            mark = "!" if r.contended else ""
            cells.append(f"{r.latency_p10_ms:8.3f}{mark} /{r.state_bytes / 2**20:8.2f}".rjust(20))
        print(f"{label:30} " + " ".join(cells))
        ok = [r for r in recs if r.status == "ok" and r.seq_len >= from_n]
        lat = loglog_slope([r.seq_len for r in ok], [r.latency_p10_ms for r in ok]) \
            if len(ok) >= 2 else math.nan
        st = loglog_slope([r.seq_len for r in ok], [r.state_bytes for r in ok]) \
            if len(ok) >= 2 else math.nan
        results[label] = recs
        print(f"{'':30} latency slope over n >= {from_n}: {lat:.2f} {verdict(lat, target)}; "
              f"state slope {st:.2f}" + (f" (target: {state_target})" if state_target else ""))
        limits = [f"{r.limit_fraction:.2f}" + (" mem" if r.limit_bound == "memory" else "")
                  if r.status == "ok" else r.status for r in recs]
        print(f"{'':30} fraction of the limit per n: {', '.join(limits)}")
    sdpa, lin = results.get("full[sdpa]"), results.get("linear")
    if sdpa and lin and sdpa[-1].status == lin[-1].status == "ok":
        ratio = sdpa[-1].latency_p10_ms / lin[-1].latency_p10_ms
        print(f"at n={ns[-1]}: linear decode {ratio:.1f}× faster per token than full[sdpa] "
              f"{verdict(ratio, ('>=', 20.0))}")
    print(f"# load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
