"""Numbers as text: one formatter per unit, shared by run/ (the plan, progress lines) and report/.

Each formatter takes the value in the unit it prints (`ms` milliseconds, `mb` MB, `gflops`
GFLOP/s; `to_mb` converts bytes); those of sentences and tables say "" for a missing value (None,
NaN, ±inf).

- `number`: a quantity in a sentence: 3 significant digits, zeros kept (4.00, 0.800, 16.0,
  3.33), whole from 100 on (160, 1235). `ms`, `mb`, `gflops` and `times` (a ratio, "2.50×") are
  `number` and their unit.
- `count`: a whole number (n, a batch, a token budget B·n): 1024, 1048576, never 1e+06.
- `cell`: a table cell, whose unit is in the column's title: compact, 3 significant digits (or
  `digits`), no trailing zeros (1, 1.05, 0.0123), whole from 10**digits on.
- `tick`: a label on a log axis: plain from 0.001 to below a million, else 10^k (mathtext) or
  2.5e7.
- `size`: bytes whose magnitude is not known in advance (the plan's predicted peaks), binary
  prefixes with one decimal: 512 B, 4.8 MiB, 2.8 GiB.
- `duration`: seconds, likewise: 12.3 s, 2 min 05 s, 1 h 03 min.

MB is 2**20 bytes (a MiB) throughout: the report's "Peak memory (MB)", the records' progress line
and the `peak_mem_mb` columns of results.csv and pick.csv.
"""

from __future__ import annotations

import math

MB = 2**20  # bytes in the report's MB (a MiB)


def to_mb(nbytes):
    """Bytes (a number, an array or a pandas column) in MB (2**20 bytes)."""
    return nbytes / MB


def _missing(x) -> bool:
    return x is None or not math.isfinite(x)


def number(x: float) -> str:
    """A quantity in a sentence: 4.00, 0.800, 16.0, 3.33, 160; "" when missing."""
    if _missing(x):
        return ""
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}".rstrip(".")


def count(x: float) -> str:
    """A whole number — a sequence length, a batch, a token budget: 1024, 1048576 (never
    1.04858e+06); "" when missing."""
    if _missing(x):
        return ""
    return f"{x:.0f}"


def cell(x: float, digits: int = 3) -> str:
    """A table cell: 1, 1.05, 0.0123, 1235 (`digits` significant digits, whole from
    10**digits on); "" when missing."""
    if _missing(x):
        return ""
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _with(x: float, unit: str) -> str:
    text = number(x)
    return f"{text}{unit}" if text else ""


def ms(x: float) -> str:
    """Milliseconds in a sentence: "4.00 ms"."""
    return _with(x, " ms")


def mb(x: float) -> str:
    """MB (2**20 bytes; see `to_mb`) in a sentence: "0.954 MB"."""
    return _with(x, " MB")


def gflops(x: float) -> str:
    """GFLOP/s in a sentence: "12.3 GFLOP/s"."""
    return _with(x, " GFLOP/s")


def times(x: float) -> str:
    """A ratio in a sentence: "2.50×"."""
    return _with(x, "×")


def tick(v: float) -> str:
    """A log axis label: 0.001 … 999999 plain (0.0123, 3, 13, 500000), else $10^{k}$ or 2.5e7."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e6:
        return f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}"
    exp = math.floor(math.log10(abs(v)) + 1e-9)
    mant = v / 10**exp
    if abs(mant - round(mant)) < 1e-6 and round(mant) == 1:
        return f"$10^{{{exp}}}$"
    return f"{mant:.2g}e{exp}"


def size(nbytes: float) -> str:
    """Bytes of any magnitude: 512 B, 1.0 KiB, 4.8 MiB, 2.8 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def duration(s: float) -> str:
    """Seconds of any magnitude: 12.3 s, 2 min 05 s, 1 h 03 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
