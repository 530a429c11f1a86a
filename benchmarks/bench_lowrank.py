"""Linear and low-rank variants on this machine: latency, memory, achieved rate, error, slope.

    python benchmarks/bench_lowrank.py [--quick] [--threads T]

n=8192, B=1, H=8, D=64, float32, forward, non-causal (m = k = 256). Targets: ≥ 5× faster than
full[sdpa]; ≥ 40 % of the measured fp32 matmul rate (or, when memory-bound, bandwidth stated
against the measured copy bandwidth); latency slope over n ≤ 1.2. Errors are relative Frobenius
on 256 sampled query rows against float64 softmax attention, on gaussian and peaked inputs.
Per variant also the work (algorithm and executed FLOPs) and the fraction of whichever bound
applies (its matmuls at the matmul rate or its traffic at the copy bandwidth); linear and
performer target ≥ 70 % of it. Their feature maps take exponentials beside the matmuls (elu + 1
on every q and k entry, or one per random feature): at the measured exp rate those give the
floor that binds there, printed with the share of the bound it leaves.
On a shared, oversubscribed machine multi-threaded small ops wait on the scheduler (an OpenMP
barrier per op); `--threads 1` then gives stable per-core figures. The load average is printed.
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
from attnbench.harness.run.inputs import attention_entropy, make_inputs
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.timing import measure_latency
from attnbench.variants.base import Shape
from attnbench.variants.reference import attention_reference, rel_error

TARGET_SPEEDUP, TARGET_RATE, TARGET_SLOPE = 5.0, 0.40, 1.2
TARGET_LIMIT = {"linear": 0.70, "performer": 0.70}  # of whichever bound applies
W = 34  # width of the label column
VARIANTS = [
    ("linear", {}),
    ("performer", {"features": 256}),
    ("linformer", {"k": 256}),
    ("linformer", {"k": 256, "projection": "mean"}),
    ("nystrom", {"landmarks": 256}),
]


def timed(fn, quick: bool) -> float:
    return measure_latency(fn, warmup=1, min_reps=2 if quick else 3, min_time_s=0.3).median_ms


def best(fn, quick: bool, rounds: int = 3) -> float:
    """Best of `rounds` medians, ms: on a shared machine the least-disturbed figure."""
    return min(timed(fn, quick) for _ in range(1 if quick else rounds))


def machine_rates(quick: bool) -> tuple[float, float]:
    """fp32 matmul GFLOP/s (2048² · 2048) and copy GB/s (256 MiB read + written), best of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = best(lambda: a @ b, quick, 5)
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    cms = best(lambda: dst.copy_(src), quick, 5)
    return 2 * 2048**3 / ms / 1e6, 2 * src.numel() * 4 / cms / 1e6


def exp_rate(quick: bool) -> float:
    """torch.exp elements/s on a cache-resident 2048×64 float32 tile (into a buffer), best of 5."""
    x, out = torch.randn(2048, 64), torch.empty(2048, 64)

    def run() -> None:
        for _ in range(16):
            torch.exp(x, out=out)

    return 16 * x.numel() / best(run, quick, 5) * 1e3


def feature_exps(att, shape: Shape) -> int:
    """Exponentials the feature map takes per call: elu + 1 on every q and k entry (linear),
    one per random feature of every q and k row (performer); 0 for the others."""
    rows = shape.batch * (shape.heads * shape.nq + shape.hkv * shape.seq_len)
    if att.name == "linear":
        return rows * shape.head_dim
    if att.name == "performer":
        return rows * att.features
    return 0


def sweep(att, ns: list[int], quick: bool) -> list[float]:
    """Latency per n: rounds interleaved over n, the best median of each kept (robust to load)."""
    qkv = {nn: make_inputs(Shape(1, 8, nn, 64), torch.float32, "cpu", 0, "gaussian") for nn in ns}
    best = dict.fromkeys(ns, math.inf)
    for _ in range(1 if quick else 3):  # interleaved, so a burst of load hits one n, not all
        for nn in ns:
            best[nn] = min(best[nn], timed(lambda nn=nn: att(*qkv[nn]), quick))
    return [best[nn] for nn in ns]


def favor_plus(att, q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """FAVOR+ from its definition in float64 (no max-shifts) on the sampled query rows, with the
    variant's random features: φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1), φ(x) = exp(wᵀx − |x|²/2)/√m."""
    d = q.shape[-1]
    w = att.projection(d, "cpu", torch.float64)  # (m, D)

    def phi(x):
        x = x.double() / d**0.25
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    qf, kf = phi(q[..., rows, :]), phi(k)  # (B, H, R, m), (B, H, N, m)
    return (qf @ (kf.transpose(-2, -1) @ v.double())) / (qf @ kf.sum(-2).unsqueeze(-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller slope sweep")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, dt = 8192, torch.float32
    shape = Shape(1, 8, n, 64)
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads "
          f"of {os.cpu_count()} cores ({platform.platform()}), torch {torch.__version__}")
    print(f"CPU allocator: {keep_freed_memory()}")
    print("load average at start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    matmul_gfs, copy_gbs = machine_rates(args.quick)
    exps_per_s = exp_rate(args.quick)
    print(f"fp32 matmul rate {matmul_gfs:.1f} GFLOP/s; copy bandwidth {copy_gbs:.1f} GB/s; "
          f"exp {exps_per_s / 1e9:.2f} G elements/s (2048x64 tile in cache)")

    inputs = {kind: make_inputs(shape, dt, "cpu", 0, kind) for kind in ("gaussian", "peaked")}
    q, k, v = inputs["gaussian"]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256]
    golds = {kind: attention_reference(*qkv, rows=rows) for kind, qkv in inputs.items()}
    for kind, (qq, kk, _) in inputs.items():
        print(f"inputs {kind}: mean attention entropy {attention_entropy(qq, kk):.2f} nats "
              f"(log n = {math.log(n):.2f})")

    sdpa, naive = variants.build("full", backend="sdpa"), variants.build("full", backend="naive")
    sdpa_ms = best(lambda: sdpa(q, k, v), args.quick, 2)
    naive_mem = peak_memory(lambda: naive(q, k, v))
    sdpa_mem = peak_memory(lambda: sdpa(q, k, v))
    print(f"full[sdpa]: {sdpa_ms:.1f} ms, peak {sdpa_mem / 2**20:.0f} MiB; "
          f"full[naive] peak {naive_mem / 2**20:.0f} MiB\n")

    ns = [2048, 4096, 8192] if args.quick else [2048, 4096, 8192, 16384]
    head = (f"{'variant':<{W}}{'ms':>9}{'vs sdpa':>9}{'MiB':>8}{'vs naive':>10}{'GFLOP/s':>9}"
            f"{'%mm':>6}{'GB/s*':>7}{'err gauss':>11}{'err peak':>10}{'slope':>7}")
    print(head)
    misses = []
    for name, params in VARIANTS:
        att = variants.build(name, **params)
        att(q, k, v)  # caches (projections, features)
        lat = sweep(att, ns, args.quick)
        sl = loglog_slope(ns, lat)
        ms = lat[ns.index(n)]
        mem = peak_memory(lambda att=att: att(q, k, v))
        gfs = att.flops(shape) / ms / 1e6
        # traffic model: q, k, v read and output written, every allocated byte written and read
        traffic = 4 * shape.bh * n * 64 * 4 + 2 * att.memory_bytes(shape, dt)
        gbs = traffic / ms / 1e6
        errs = {kind: rel_error(att(*qkv)[..., rows, :], golds[kind])
                for kind, qkv in inputs.items()}
        print(f"{att.label:<{W}}{ms:>9.1f}{sdpa_ms / ms:>8.1f}x{mem / 2**20:>8.0f}"
              f"{naive_mem / mem:>9.0f}x{gfs:>9.1f}{100 * gfs / matmul_gfs:>5.0f}%"
              f"{gbs:>7.1f}{errs['gaussian']:>11.3f}{errs['peaked']:>10.3f}{sl:>7.2f}")
        print(f"{'':<{W}}n={ns} ms=[{', '.join(f'{t:.1f}' for t in lat)}]")
        algo, executed = att.algorithm_flops(shape), att.flops(shape)
        mm_ms, io_ms = executed / matmul_gfs / 1e6, traffic / copy_gbs / 1e6
        limit = max(mm_ms, io_ms) / ms  # the fraction of whichever bound applies
        print(f"{'':<{W}}work: algorithm {algo / 1e9:.2f} GFLOP, executed {executed / 1e9:.2f} "
              f"GFLOP ({executed / algo:.2f}x); bound: {'matmul' if mm_ms >= io_ms else 'copy'}"
              f" ({mm_ms:.1f} ms of matmuls at the matmul rate, {io_ms:.1f} ms of traffic at "
              f"the copy bandwidth): {limit:.0%} of it")
        exps = feature_exps(att, shape)
        if exps:  # the feature map's exponentials bind beside the matmuls
            exp_ms = exps / exps_per_s * 1e3
            floor = max(mm_ms, io_ms) + exp_ms
            print(f"{'':<{W}}feature map: {exps / 1e6:.1f} M exps at the exp rate take "
                  f"{exp_ms:.1f} ms beside the bound's {max(mm_ms, io_ms):.1f} ms: at most "
                  f"{max(mm_ms, io_ms) / floor:.0%} of the bound here; the engine runs at "
                  f"{floor / ms:.0%} of that floor")
        want = TARGET_LIMIT.get(name)
        if want is not None and limit < want:
            why = (f"; the feature map's exps alone cap it at "
                   f"{max(mm_ms, io_ms) / floor:.0%}" if exps else "")
            misses.append(f"{att.label}: {limit:.0%} of the bound that applies < {want:.0%}"
                          f"{why}")
        if name == "performer":  # the variant against its own definition, FAVOR+ in float64
            for kind, qkv in inputs.items():
                out, ref = att(*qkv)[..., rows, :], favor_plus(att, *qkv, rows)
                err = rel_error(out, ref)
                print(f"{'':<{W}}vs float64 FAVOR+ ({kind}): rel err {err:.1e}, "
                      f"output norm {float(out.norm()):.4g} vs {float(ref.norm()):.4g}")
        if sdpa_ms / ms < TARGET_SPEEDUP:
            misses.append(f"{att.label}: {sdpa_ms / ms:.1f}x vs sdpa < {TARGET_SPEEDUP}x")
        if gfs / matmul_gfs < TARGET_RATE:
            balance = matmul_gfs / copy_gbs  # FLOP per byte at which the two roofs meet
            intensity = att.flops(shape) / traffic
            bound = "memory" if intensity < balance else "compute"
            misses.append(
                f"{att.label}: {100 * gfs / matmul_gfs:.0f}% of matmul rate < "
                f"{100 * TARGET_RATE:.0f}%; intensity {intensity:.1f} FLOP/B vs machine balance "
                f"{balance:.1f} ({bound}-bound by the traffic model); achieved {gbs:.2f} GB/s "
                f"= {100 * gbs / copy_gbs:.0f}% of copy bandwidth {copy_gbs:.1f} GB/s"
            )
        if sl > TARGET_SLOPE:
            misses.append(f"{att.label}: latency slope {sl:.2f} > {TARGET_SLOPE}")

    print(f"\ntargets: speed-up >= {TARGET_SPEEDUP}x vs full[sdpa]; >= {100 * TARGET_RATE:.0f}% "
          f"of fp32 matmul rate (or bandwidth stated); latency slope <= {TARGET_SLOPE}; linear "
          f"and performer >= 70% of whichever bound applies (matmul rate or copy bandwidth)")
    print("* GB/s: traffic model = q, k, v read + output written + 2 x memory_bytes() (each "
          "intermediate written and read once), over the latency")
    print("latency (ms): best of 3 interleaved rounds of the median of repeats; full[sdpa] best "
          "of 2; machine rates best of 5")
    print("slope: least-squares log-log latency exponent over n; per n the best of 3 interleaved "
          "rounds (median of repeats each)")
    print("load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("missed:" if misses else "all targets met")
    for m in misses:
        print(f"  - {m}")


if __name__ == "__main__":
    main()
