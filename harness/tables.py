"""The report's tables as plain text cells, rendered to markdown (summary.md) and HTML.

Cells: a number for a point that ran, with `~` appended when the point is noisy (p10–p90 spread
over 10% of the median); the status (oom, skipped, unsupported, error, invalid) for one that did
not; blank where the sweep has no such point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from harness.scaling import SETTING


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def markdown(t: Table) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"### {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    lines.append("| " + " | ".join(cell(h) for h in t.header) + " |")
    lines.append("|" + "|".join("---" for _ in t.header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def settings(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split rows by the setting columns that vary ("" when the sweep has one setting)."""
    varying = [c for c in SETTING if df[c].nunique(dropna=False) > 1]
    if not varying:
        return [("", df)]
    return [(" ".join(f"{c}={v}" for c, v in zip(varying, key if isinstance(key, tuple)
                                                    else (key,), strict=True)), g)
            for key, g in df.groupby(varying, sort=True)]


def pivot(df: pd.DataFrame, title: str, value: Callable[[pd.Series], str],
          note: str = "") -> list[Table]:
    """label × n grid of `value(row)`; failed points show their status."""
    out = []
    for name, g in settings(df):
        ns = sorted(g.seq_len.unique())
        t = Table(f"{title} — {name}" if name else title, ["label", *[f"n={n}" for n in ns]],
                  note=note)
        for label, lg in g.groupby("label", sort=True):
            by_n = {r.seq_len: r for r in lg.itertuples()}
            cells = []
            for n in ns:
                r = by_n.get(n)
                if r is None:
                    cells.append("")
                elif r.status != "ok":
                    cells.append(r.status)
                else:
                    cells.append(value(r))
            t.rows.append([label, *cells])
        out.append(t)
    return out


def _noisy(r, text: str) -> str:
    return text + "~" if text and bool(r.noisy) else text


def point_tables(df: pd.DataFrame, baseline: str | None) -> list[Table]:
    mark = "~: noisy (p10–p90 spread over 10% of the median); failed points show their status."
    tables = pivot(df, "Median latency (ms)", lambda r: _noisy(r, fmt(r.latency_ms)), mark)
    if baseline:
        tables += pivot(df, f"Speedup vs {baseline} (×, above 1: faster)",
                        lambda r: _noisy(r, fmt(r.speedup)))
    tables += pivot(df, "Peak memory (MB)", lambda r: fmt(r.peak_mem_bytes / 2**20))
    if baseline:
        tables += pivot(df, f"Memory vs {baseline} (×, below 1: less)",
                        lambda r: fmt(r.memory_ratio))
    tables += pivot(df, "Relative error (vs float64)", lambda r: fmt(r.rel_error, 2))
    tables += pivot(df, "Achieved GFLOP/s", lambda r: fmt(r.tflops * 1e3))
    return tables


def scaling_tables(scaling: pd.DataFrame) -> list[Table]:
    out = []
    for name, g in settings(scaling) if not scaling.empty else []:
        t = Table(f"Fitted exponents — {name}" if name else "Fitted exponents",
                  ["label", "metric", "exponent", "95% CI", "n range", "points", "declared",
                   "agrees"])
        for r in g.itertuples():
            if math.isfinite(r.exponent):
                exp, ci = f"{r.exponent:.2f}", f"{r.ci_low:.2f} … {r.ci_high:.2f}"
                rng = f"{r.n_min:g}–{r.n_max:g}"
                agrees = {True: "yes", False: "no"}.get(r.agrees, "")
            else:
                exp, ci, rng, agrees = r.note, "", "", ""
            t.rows.append([r.label, r.metric, exp, ci, rng, str(r.points),
                           fmt(r.declared), agrees])
        out.append(t)
    return out


def crossover_tables(cross: pd.DataFrame, baseline: str | None) -> list[Table]:
    out = []
    for name, g in settings(cross) if not cross.empty else []:
        t = Table(f"Crossovers vs {baseline} and OOM frontier" + (f" — {name}" if name else ""),
                  ["label", "faster from n", "less memory from n", "largest n that ran",
                   "first oom/skipped n"])
        for r in g.itertuples():
            first = f"{r.first_oom_n:g} ({r.first_oom_status})" if math.isfinite(
                r.first_oom_n) else "none"
            t.rows.append([r.label, r.latency_crossover, r.memory_crossover, fmt(r.max_ok_n, 9),
                           first])
        out.append(t)
    return out


def _same(frame: pd.DataFrame, row) -> pd.Series:
    """Rows of `frame` with the label and setting of `row`."""
    mask = frame.label == row.label
    for c in SETTING:
        mask &= frame[c] == getattr(row, c)
    return mask


def headlines(df: pd.DataFrame, scaling: pd.DataFrame, cross: pd.DataFrame,
              baseline: str | None) -> list[str]:
    """One sentence per label × setting: exponents, speed at the largest common n, crossover,
    how far it ran."""
    out = []
    for r in cross.itertuples():
        name = r.label
        setting = " ".join(str(getattr(r, c)) for c in ("dtype", "mode", "device"))
        same = _same(scaling, r)
        parts = []
        for metric in ("latency", "memory"):
            f = scaling[same & (scaling.metric == metric)]
            if f.empty or not math.isfinite(f.exponent.iloc[0]):
                parts.append(f"{metric}: too few points for an exponent")
                continue
            f = f.iloc[0]
            decl = ""
            if math.isfinite(f.declared):
                decl = f", declared {f.declared:g} {'✓' if f.agrees else '✗'}"
            parts.append(f"{metric} ∝ n^{f.exponent:.2f} (95% CI {f.ci_low:.2f}–{f.ci_high:.2f}"
                         f"{decl})")
        mine = df[_same(df, r) & (df.status == "ok") & df.speedup.notna()]
        if baseline and r.label != baseline and not mine.empty:
            last = mine.sort_values("seq_len").iloc[-1]
            parts.append(f"{last.speedup:.2f}× the speed of {baseline} at n={last.seq_len}; "
                         f"faster from n: {r.latency_crossover}")
        if math.isfinite(r.first_oom_n):
            parts.append(f"ran up to n={fmt(r.max_ok_n, 9)}, {r.first_oom_status} at "
                         f"n={r.first_oom_n:g}")
        elif math.isfinite(r.max_ok_n):
            parts.append(f"ran up to n={r.max_ok_n:g}")
        out.append(f"{name} ({setting}): " + "; ".join(parts) + ".")
    return out
