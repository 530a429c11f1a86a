"""Ops and host syncs per call for every built-in variant, on the paths a GPU takes.

    python benchmarks/ops_table.py [--label after] > results/benchmarks/ops-per-call.txt

Counted at dispatch level (harness/run/opcount) with ATTNBENCH_FORCE_GPU_PATHS=1, forward without
autograd, default parameters, D=64, fp32 on the CPU, at (B=1, H=1) and (B=4, H=8), n=1024 and
4096. On a GPU each dispatched op is (at least) one kernel launch of 5–10 µs and each host sync
stalls the launch queue: a variant is launch-light when its ops per call do not grow with B·H
(and, but for a chunked recurrence's loop, with n) and it makes no host syncs.
Target: ops equal across the four shapes (recurrent family: equal across B·H), 0 host syncs.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ["ATTNBENCH_FORCE_GPU_PATHS"] = "1"

import torch

from attnbench import variants
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import Shape

SHAPES = [(1, 1, 1024), (4, 8, 1024), (1, 1, 4096), (4, 8, 4096)]


def count(att, b: int, h: int, n: int, causal: bool) -> tuple[int, int] | None:
    if att.not_supported_reasons(Shape(b, h, n, 64), torch.float32, "cpu", causal):
        return None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 64, generator=g) for _ in range(3))
    with torch.no_grad():
        att(q, k, v, causal=causal)
        c = count_call(lambda: att(q, k, v, causal=causal))
    return c.ops, c.host_syncs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="")
    args = p.parse_args()
    print(f"# ops / host syncs per call {args.label} — torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, forced GPU paths, D=64, fp32, no grad")
    head = " ".join(f"B{b}H{h}n{n}".rjust(14) for b, h, n in SHAPES)
    print(f"{'variant':34} {'causal':6} {head}")
    for name in sorted(variants.names()):
        if not variants.get(name).__module__.startswith("attnbench.variants."):
            continue
        att = variants.build(name)
        if getattr(att, "impl", "") == "flex":
            continue
        for causal in (False, True):
            cells = []
            for b, h, n in SHAPES:
                r = count(att, b, h, n, causal)
                cells.append("—".rjust(14) if r is None else f"{r[0]} / {r[1]}".rjust(14))
            if all(c.strip() == "—" for c in cells):
                continue
            print(f"{att.label:34} {causal!s:6} {' '.join(cells)}")


if __name__ == "__main__":
    main()
