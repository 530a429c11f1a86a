"""`attnbench list`: every registered variant, its parameters, complexity and what runs here.

    attnbench list                      # markdown table, support on the default device
    attnbench list --device cuda --format csv

Support per mode is the variant's own `not_supported_reasons` for a small representative shape
(B=1, H=8, N=1024, D=64; float32 on CPU, bfloat16 on CUDA): `noncausal` and `causal` say `yes`
(forward and forward+backward), `fwd only` or `no`; `decode` says `yes` or `no`; `gqa` and
`q_len` whether grouped k/v heads and fewer queries than keys run (asked of the causal form where
there is one). `reason` gives, per mode that does not fully run, why. `full` gets one row per
backend, since what runs differs per backend. `exec/algo` is the forward FLOPs the engine executes
over the method's own (`Variant.algorithm_flops`) at B=1, H=8, N=8192, D=64 on the device's path,
causal where the variant has a causal form: ×1 where nothing is padded or recomputed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import sys
from dataclasses import dataclass
from typing import Any

import torch

from attnbench import variants
from attnbench.variants.base import Shape, Variant

COLUMNS = ("name", "label", "family", "params", "time", "memory", "exec/algo", "noncausal",
           "causal", "decode", "gqa", "q_len", "reason")
MODES = ("noncausal", "causal", "decode")
SHAPE = Shape(batch=1, heads=8, seq_len=1024, head_dim=64)
FLOPS_SHAPE = Shape(batch=1, heads=8, seq_len=8192, head_dim=64)  # where exec/algo is stated


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    family: str
    params: str
    time: str
    memory: str
    exec_algo: str  # executed / algorithm forward FLOPs at FLOPS_SHAPE: ×1, ×1.33
    noncausal: str  # yes | fwd only | no | error
    causal: str  # yes | fwd only | no | error
    decode: str  # yes | no | error: a decode form (cache or state)
    gqa: str  # yes | no: kv_heads < heads
    q_len: str  # yes | no: fewer queries than keys
    reason: str  # why, per mode that does not fully run


def flops_ratio(att: Variant, device: str) -> str:
    """The engine's executed forward FLOPs over the method's own (`algorithm_flops`) at
    FLOPS_SHAPE on `device`'s path, causal where the variant has a causal form: ``×1`` when it
    executes only what the method needs, ``×1.33`` a third more (padding, masked tiles)."""
    from attnbench.harness.run.point import on_device

    causal = not att.no_causal
    done = on_device(att.flops, device)(FLOPS_SHAPE, causal)
    algo = on_device(att.algorithm_flops, device)(FLOPS_SHAPE, causal)
    ratio = done / algo
    return "×1" if abs(ratio - 1) < 5e-3 else f"×{ratio:.2f}"


def configurations(name: str) -> list[dict[str, Any]]:
    """Parameter sets to list for `name`: the defaults, or one per backend for `full`."""
    if name != "full":
        return [{}]
    from attnbench.variants.full.full import BACKENDS, SDPA_BACKENDS

    rows: list[dict[str, Any]] = [{"backend": b} for b in BACKENDS]
    at = BACKENDS.index("sdpa") + 1
    rows[at:at] = [{"backend": "sdpa", "sdpa_backend": s} for s in SDPA_BACKENDS if s != "auto"]
    return rows


def support(att: Variant, device: str, dtype: torch.dtype) -> tuple[dict[str, str], str]:
    """Per mode ('noncausal', 'causal', 'decode'): 'yes' | 'fwd only' | 'no', from the variant's
    own not_supported_reasons; and the reasons: `mode: why` per mode that does not fully run."""
    out, why = {}, {}
    for mode, causal in (("noncausal", False), ("causal", True)):
        fwd = att.not_supported_reasons(SHAPE, dtype, device, causal, "fwd")
        bwd = [] if fwd else att.not_supported_reasons(SHAPE, dtype, device, causal, "fwd_bwd")
        out[mode] = "no" if fwd else "fwd only" if bwd else "yes"
        if fwd or bwd:
            why[mode] = "; ".join(fwd or [f"backward: {r}" for r in bwd])
    dec = att.not_supported_reasons(SHAPE, dtype, device, True, "decode")
    out["decode"] = "no" if dec else "yes"
    dec = [r for r in dec if r not in why.get("causal", "")]  # said once, under causal
    if dec:
        why["decode"] = "; ".join(dec)
    reasons = list(dict.fromkeys(why.values()))
    if len(reasons) == 1 and len(why) > 1:  # one cause for every mode (e.g. no CPU kernel)
        return out, reasons[0]
    return out, " · ".join(f"{m}: {r}" for m, r in why.items())


def shapes_supported(att: Variant, device: str, dtype: torch.dtype) -> tuple[str, str]:
    """(gqa, q_len) as yes | no, asked of the causal form where there is one."""
    def runs(shape: Shape, causal: bool) -> bool:
        return not att.not_supported_reasons(shape, dtype, device, causal, "fwd")

    c = runs(SHAPE, True)
    gqa = runs(dataclasses.replace(SHAPE, kv_heads=2), c)
    q_len = runs(dataclasses.replace(SHAPE, q_len=SHAPE.seq_len // 4), c)
    return ("yes" if gqa else "no"), ("yes" if q_len else "no")


def rows(device: str, dtype: torch.dtype) -> list[Row]:
    """One row per registered variant (per backend for `full`), in name order."""
    out = []
    for name in variants.names():
        for params in configurations(name):
            try:
                att = variants.build(name, **params)
                modes, reason = support(att, device, dtype)
                gqa, q_len = shapes_supported(att, device, dtype)
                ratio = flops_ratio(att, device)
            except Exception as exc:  # a broken (plugin) variant is a row, not a crash
                out.append(Row(name, name, "?", "", "?", "?", "?", "error", "error", "error",
                               "?", "?", f"{type(exc).__name__}: {exc}"))
                continue
            cx = att.complexity
            shown = ", ".join(f"{k}={v}" for k, v in att.params().items())
            out.append(Row(name, att.label, att.family, shown, cx["time"], cx["memory"], ratio,
                           modes["noncausal"], modes["causal"], modes["decode"], gqa, q_len,
                           reason))
    return out


def renamed_line() -> str:
    """'; renamed (…): strided window → window_blocks, …' from `Variant.renamed`."""
    done = [f"{n} {old} → {new}" for n in variants.names()
            for old, (new, _) in variants.get(n).renamed.items()]
    return f"; renamed (the old name is read for one release): {', '.join(done)}" if done else ""


def to_markdown(table: list[Row]) -> str:
    cells = [list(COLUMNS)] + [[_md(str(getattr(r, _attr(c)))) for c in COLUMNS] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def to_csv(table: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([getattr(r, _attr(c)) for c in COLUMNS] for r in table)
    return buf.getvalue().rstrip("\n")


def _attr(column: str) -> str:
    return column.replace("/", "_")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnbench list",
        description="Every registered attention variant and whether it can run on this machine.",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to check availability for (auto: cuda when present)")
    parser.add_argument("--format", choices=("md", "csv"), default="md", dest="fmt")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    table = rows(device, dtype)
    print(to_markdown(table) if args.fmt == "md" else to_csv(table))
    if args.fmt == "md":
        shape = f"B={SHAPE.batch} H={SHAPE.heads} N={SHAPE.seq_len} D={SHAPE.head_dim}"
        note = "" if device != "cuda" or torch.cuda.is_available() else " (no CUDA device here)"
        print(f"\nsupport on {device}{note}, {str(dtype).removeprefix('torch.')}, {shape}: "
              f"yes = forward and backward; `attnbench plan ARGS` checks a point exactly")
        print(f"units: `window` counts tokens in every variant that has one (a window "
              f"counted in blocks is `window_blocks`){renamed_line()}")
        f = FLOPS_SHAPE
        print(f"exec/algo: forward FLOPs the engine executes (padding, masked tiles, a router "
              f"over every block) over the method's own, at B={f.batch} H={f.heads} "
              f"N={f.seq_len} D={f.head_dim}, causal where there is a causal form")
    return 0


if __name__ == "__main__":
    sys.exit(main())
