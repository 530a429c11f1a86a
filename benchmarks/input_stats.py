"""What each input kind's attention looks like, beside the real sample's: the numbers behind
the table in harness/run/inputs.py and the README ("Inputs").

    python benchmarks/input_stats.py [--n 2048] [--no-real] [--all-layers]

Causal, n=2048, H=9 query / 3 k/v heads, d=64 (SmolLM2-135M's layout), B=10: the real sample's
ten default layers (one batch element each, every head), and ten seeded draws of each synthetic
kind. Statistics (`attention_stats`, float64 softmax over 256 evenly spaced query rows, averaged
over batch and heads): mean entropy (nats), sink (mass on key 0), local64/local256 (mass on the
64/256 keys ending at the query), heavy (share of the mass beyond distance 64 and off key 0 that
the top 1% of keys take). What that does to an approximation: err w256 (+s4), the relative
error of causal attention over the last 256 keys (plus the first 4, StreamingLLM-style) against
full causal attention, float64, every query. `--all-layers` adds the real sample over all 30
layers (B=30) and one row per layer. Needs the `real` extra for the real rows (they are left out
without it).
"""

from __future__ import annotations

import argparse
import platform

import torch

from attnbench.harness.run import real
from attnbench.harness.run.inputs import KINDS, attention_stats, make_inputs
from attnbench.variants.base import Shape

COLUMNS = ("entropy", "sink", "local64", "local256", "heavy", "err w256", "err w256+s4")
WINDOW, SINKS = 256, 4


def window_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error, float64, of causal attention restricted to the last WINDOW keys
    (then also to the first SINKS keys) against full causal attention, one (b, h) at a time."""
    n, d, g = k.shape[-2], k.shape[-1], q.shape[1] // k.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masks = [(j <= i) & (i - j < WINDOW), (j <= i) & ((i - j < WINDOW) | (j < SINKS))]
    num, den = [0.0, 0.0], 0.0
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h].double() @ k[b, h // g].double().T / d**0.5  # (N, N)
            full = torch.softmax(s.masked_fill(j > i, -torch.inf), -1) @ v[b, h // g].double()
            den += float(full.square().sum())
            for m, mask in enumerate(masks):
                out = torch.softmax(s.masked_fill(~mask, -torch.inf), -1) @ v[b, h // g].double()
                num[m] += float((out - full).square().sum())
    return (num[0] / den) ** 0.5, (num[1] / den) ** 0.5


def stats(kind: str, shape: Shape) -> dict[str, float]:
    """Means over batch elements (one at a time: float64 rows × n per head stay small)."""
    q, k, v = make_inputs(shape, torch.float32, "cpu", seed=0, kind=kind)
    per = [attention_stats(q[b:b + 1], k[b:b + 1]) for b in range(shape.batch)]
    out = {c: sum(p[c] for p in per) / len(per) for c in COLUMNS[:5]}
    out["err w256"], out["err w256+s4"] = window_errors(q, k, v)
    return out


def row(label: str, s: dict[str, float]) -> str:
    return f"| {label} | " + " | ".join(f"{s[c]:.2f}" for c in COLUMNS) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--no-real", action="store_true", help="synthetic kinds only")
    p.add_argument("--all-layers", action="store_true", help="real: all 30 layers, and each")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or 'CPU'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"causal, n={args.n}, H=9, Hkv=3, d=64, B=10; log n = "
          f"{torch.log(torch.tensor(float(args.n))):.2f}\n")
    print("| kind | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    rows = {}
    has_real = not args.no_real
    if has_real:
        try:
            real.check_available()
        except ValueError as exc:
            print(f"(real rows left out: {exc})")
            has_real = False
    if has_real:
        shape = Shape(len(real.DEFAULT_LAYERS), 9, args.n, 64, kv_heads=3)
        rows["real"] = stats("real", shape)
        print(row(f"real ({len(real.DEFAULT_LAYERS)} layers: every third from 2)", rows["real"]),
              flush=True)
        if args.all_layers:
            every = f"real@layers:0-{real.LAYERS - 1}"
            rows["all"] = stats(every, Shape(real.LAYERS, 9, args.n, 64, kv_heads=3))
            print(row("real (all 30 layers)", rows["all"]), flush=True)
    for kind in KINDS:
        print(row(kind, stats(kind, Shape(10, 9, args.n, 64, kv_heads=3))), flush=True)
    if has_real and args.all_layers:
        print("\nthe real sample, layer by layer (B=1, its 9 query heads)\n")
        print("| layer | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for layer in range(real.LAYERS):
            s = stats(f"real@layers:{layer}", Shape(1, 9, args.n, 64, kv_heads=3))
            print(row(str(layer), s), flush=True)


if __name__ == "__main__":
    main()
