"""The report's tables as plain text cells, rendered to markdown (summary.md) and HTML.

Cells: a number for a point that ran, with `~` appended when the point is noisy (p10–p90 spread
over 10% of the median) and `!` when it is contended (other processes took a real share of the
CPU while it was timed); the status (oom, skipped, unsupported, error, invalid) for one that did
not; blank where the sweep has no such point. A speedup is marked when either of its two points
is; the baseline against itself is exactly 1 and never marked. Where batch varies with n
(token-budget presets) the tables show latency and memory per sequence, as the fits use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from attnbench.harness import units
from attnbench.harness.report import columns, pick
from attnbench.harness.report.scaling import AGREE_WIDTH, CONST, SETTING, same_setting


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    kind: str = ""  # "pick": cells of several lines, the first one the answer


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


def settings(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split rows by the setting columns that vary ("" when the sweep has one setting)."""
    varying = columns.varying(df, SETTING)
    if not varying:
        return [("", df)]
    return [(" ".join(setting_name(c, v) for c, v in zip(varying, key if isinstance(key, tuple)
                                                     else (key,), strict=True)), g)
            for key, g in df.groupby(varying, sort=True)]


def setting_name(column: str, value) -> str:
    """`column=value`, with the token budget of per-sequence fits spelled out."""
    if column == "tokens":
        return f"B·n={units.count(value)}" if value else "batch held"
    if column == "batch" and value == 0:
        return "batch varies"
    return f"{column}={value}"


def per_note(df: pd.DataFrame) -> str:
    """The note for tables of a setting fitted per sequence ("" otherwise)."""
    if "per" not in df or not (df.per == "sequence").any():
        return ""
    return ("Batch varies with n (B·n held fixed): latency and memory per sequence (÷ batch), as "
            "fitted.")


def pivot(df: pd.DataFrame, title: str | Callable[[pd.DataFrame], str],
          value: Callable[[pd.Series], str], note: str = "") -> list[Table]:
    """label × n grid of `value(row)`; failed points show their status. `title` may depend on
    the setting's rows (a callable of them)."""
    out = []
    for name, g in settings(df):
        ns = sorted(g.seq_len.unique())
        head = title(g) if callable(title) else title
        t = Table(f"{head} — {name}" if name else head, ["label", *[f"n={n}" for n in ns]],
                  note=" ".join(x for x in (note, per_note(g)) if x))
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


def _marked(r, text: str, speedup: bool = False) -> str:
    """`text` with ~ (noisy) and ! (contended) for the point, and for a speedup its baseline's;
    ✗ when the point failed its implementation check."""
    if not text:
        return text
    noisy, contended = bool(r.noisy), bool(r.contended)
    if speedup:
        if r.label == r.baseline:
            return text
        noisy |= bool(r.baseline_noisy)
        contended |= bool(r.baseline_contended)
    return text + ("~" if noisy else "") + ("!" if contended else "") + _failed(r)


def _failed(r) -> str:
    ok = getattr(r, "impl_ok", True)
    return "✗" if not pd.isna(ok) and not bool(ok) else ""


MARKS = ("~: noisy (p10–p90 spread over 10% of the median); !: contended (other processes took a "
         "real share of the CPU while it was timed); ✗: failed its implementation check (never "
         "picked); failed points show their status.")


def softmax_cell(r) -> str:
    """softmax_rel_error, or why a point has none: "not softmax" (recurrent), "no reference"."""
    if r.family in pick.NOT_COMPARABLE:
        return "not softmax"
    e = r.softmax_rel_error
    return units.cell(e, 2) if isinstance(e, float) and math.isfinite(e) else "no reference"


def _pair(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return ""
    return f"{units.cell(a, 2)} / {units.cell(b, 2)}"


ERROR_NOTE = ("Against float64 full softmax attention on the same q, k, v and sampled query "
              "rows: how far from exact attention (the error the pick uses). 'no reference': "
              "none was computed (error.rows=0, or too big; see quality_note); recurrent "
              "variants replace softmax ('not softmax').")
IMPL_NOTE = ("Against the variant's own float64 definition (error_ref: softmax, masked softmax or "
             "own definition): an implementation check, not a quality. ✗: over the variant's "
             "tolerance for the dtype; blank: no definition of its own (linear, low-rank).")


def memory_counts(g: pd.DataFrame) -> str:
    """What the memory of these rows counts (columns.MEMORY), by their modes."""
    modes = set(g["mode"].astype(str)) if "mode" in g else set()
    if modes and modes == {columns.DECODE}:
        return columns.memory_what(columns.DECODE)
    if columns.DECODE in modes:
        return f"decode: {columns.memory_what(columns.DECODE)}; otherwise {columns.PEAK_WHAT}"
    return columns.PEAK_WHAT


def memory_title(g: pd.DataFrame) -> str:
    """The memory table's title for a setting's rows: "Peak memory (MB; peak beyond q, k, v)",
    in decode "Memory (MB; memory held: cache or state + step peak)"."""
    head = "Memory" if "mode" in g and (g["mode"] == columns.DECODE).any() else "Peak memory"
    return f"{head} (MB; {memory_counts(g)})"


def memory_cell(r) -> str:
    """The memory of a point (columns.memory_bytes), or "no state" for a decode point whose
    record has none."""
    text = units.cell(units.to_mb(r.memory_bytes))
    if not text and getattr(r, "mode", "") == columns.DECODE and math.isfinite(
            r.peak_mem_bytes):
        return columns.NO_STATE
    return text


def point_tables(df: pd.DataFrame, baseline: str | None) -> list[Table]:
    """The label × n grids; `df` is a fit frame (harness.scaling.fit_frame) with speedups."""
    cell = units.cell
    tables = pivot(df, "Median latency (ms)", lambda r: _marked(r, cell(r.latency_ms)), MARKS)
    if baseline:
        tables += pivot(df, f"Speedup vs {baseline} (×, above 1: faster)",
                        lambda r: _marked(r, cell(r.speedup), speedup=True))
    if "memory_bytes" not in df:  # a frame of records only
        df = df.assign(memory_bytes=columns.memory_bytes(df))
    tables += pivot(df, memory_title, memory_cell,
                    "'no state': a decode point recorded without its cache or state size."
                    if columns.missing_state(df[df.status == "ok"]).any() else "")
    if baseline:
        tables += pivot(df, lambda g: f"Memory vs {baseline} (×, below 1: less; "
                                      f"{memory_counts(g)})",
                        lambda r: cell(r.memory_ratio))
    tables += pivot(df, "Error vs exact attention (softmax_rel_error)", softmax_cell,
                    ERROR_NOTE)
    tables += pivot(df, "Implementation check (impl_error)",
                    lambda r: cell(r.impl_error, 2) + _failed(r), IMPL_NOTE)
    if "recall_mean" in df and df.recall_mean.notna().any():
        tables += pivot(df, "Attention-mass recall (mean / p10)",
                        lambda r: _pair(r.recall_mean, r.recall_p10),
                        "Share of each query's float64 softmax mass on the keys the variant "
                        "attends, over sampled rows and heads (NSA: selected blocks and window, "
                        "its compressed branch left out). Blank: no key set (linear, low-rank, "
                        "recurrent) or no reference.")
    if "head_error_max" in df and df.head_error_max.notna().any():
        tables += pivot(df, "Error vs exact attention per head (median / max)",
                        lambda r: _pair(r.head_error_median, r.head_error_max),
                        "softmax_rel_error of each (batch, head) over its sampled rows.")
    tables += pivot(df, "Achieved GFLOP/s", lambda r: cell(r.tflops * 1e3))
    tables += flop_tables(df)
    if (df.kernel.fillna("") != "").any():
        tables += pivot(df, "Kernel that ran", lambda r: r.kernel if isinstance(r.kernel, str)
                        else "", "A kernel that changes along a row is a backend fallback.")
    return tables


def flop_tables(df: pd.DataFrame) -> list[Table]:
    """"Fraction of the limit" (the point's time at the machine's binding limit over its
    latency: matmul rate or read rate, `limit_bound`; "mem" marks the memory-bound) and, for
    the labels whose engine executes more than the method needs, "Executed / algorithm FLOPs";
    none for records from before these fields."""
    out: list[Table] = []
    if "limit_fraction" in df and df.limit_fraction.notna().any():
        out += pivot(df, "Fraction of the limit", lambda r: _marked(r, _limit_cell(r)),
                     RATE_NOTE)
    if {"algo_flops", "executed_flops"} <= set(df.columns):
        ratio = df.executed_flops / df.algo_flops
        more = df.label.isin(df.label[ratio.notna() & ((ratio - 1).abs() > 5e-3)])
        if more.any():
            out += pivot(df[more], "Executed / algorithm FLOPs (×)",
                         lambda r: units.cell(r.executed_flops / r.algo_flops, 3), RATIO_NOTE)
    return out


RATE_NOTE = ("How close the point runs to what this machine allows: the larger of its "
             "executed FLOPs (padding and recomputation included) at a square matmul's rate in "
             "its dtype (`matmul_gflops`; a CPU's float32 for half inputs) and the bytes the "
             "method must move (`algo_bytes`: q, k, v and the output; in decode the keys a step "
             "reads or the state it rewrites) at the machine's read rate for a working set that "
             "size (`read_gbps`), over the latency. \"mem\": the bytes bind (`limit_bound`). "
             "Blank: not measured; an older record's is of the matmul rate alone.")


def _limit_cell(r) -> str:
    """limit_fraction, "mem" beside it where the memory limit binds."""
    text = units.cell(r.limit_fraction, 2)
    return f"{text} mem" if text and getattr(r, "limit_bound", "") == "memory" else text
RATIO_NOTE = ("FLOPs the engine executes (padding, masked halves of diagonal tiles, a router "
              "over every block, recomputation) over the method's own minimum "
              "(`Variant.algorithm_flops`); labels at 1 left out.")


def marked_summary(df: pd.DataFrame) -> str:
    """The report's first warning: how many points ran noisy or contended ("" when none)."""
    ok = df[df.status == "ok"]
    noisy, contended = int(ok.noisy.fillna(False).sum()), int(ok.contended.fillna(False).sum())
    # records from before contention was measured (or without /proc/stat) cannot say
    unknown = int(ok.others_cpu.isna().sum()) if "others_cpu" in ok else len(ok)
    if not noisy and not contended and not unknown:
        return ""
    unmeasured = (f" Contention was not measured for {unknown} of them (records from before "
                  f"it was, or no /proc/stat): they cannot be told clean.") if unknown else ""
    return (f"Warning: of {len(ok)} points that ran, {noisy} are noisy (~) and {contended} "
            f"contended (!): their latency may be inflated, and fits, speedups and crossovers "
            f"that use them say so.{unmeasured} For clean numbers see the README, 'Clean numbers "
            f"on a shared machine': a quiet machine, a fixed threads=, then the marked points "
            f"measured again (remove their folders, re-run with resume=true).")


def scaling_tables(scaling: pd.DataFrame) -> list[Table]:
    out = []
    for name, g in settings(scaling) if not scaling.empty else []:
        t = Table(f"Fitted exponents — {name}" if name else "Fitted exponents",
                  ["label", "metric", "model", "exponent", "95% CI", "n range", "points",
                   "declared", "agrees", "marked points"],
                  note=" ".join(x for x in (
                      f"agrees: yes / no / inconclusive (the declared exponent is inside an "
                      f"interval wider than ±{AGREE_WIDTH:g}, or too few points).",
                      per_note(g)) if x))
        for r in g.itertuples():
            if math.isfinite(r.exponent):
                exp, ci = f"{r.exponent:.2f}", f"{r.ci_low:.2f} … {r.ci_high:.2f}"
                rng = f"{units.count(r.n_min)}–{units.count(r.n_max)}"
            else:
                exp, ci, rng = r.note.split(";")[0], "", ""
            marked = ", ".join(f"{k} {w}" for k, w in ((r.noisy, "~"), (r.contended, "!")) if k)
            t.rows.append([r.label, r.metric, r.model, exp, ci, rng, str(r.points),
                           units.cell(r.declared), r.agrees, marked])
        out.append(t)
    return out


def crossover_tables(cross: pd.DataFrame, baseline: str | None) -> list[Table]:
    out = []
    for name, g in settings(cross) if not cross.empty else []:
        t = Table(f"Crossovers vs {baseline} and OOM frontier" + (f" — {name}" if name else ""),
                  ["label", "faster", "less memory", "largest n that ran",
                   "first oom/skipped n"],
                  note="'from n≈X': better at every measured n from X on; otherwise where it is "
                       "better and where not. Compared at the same n and batch.")
        for r in g.itertuples():
            first = f"{units.count(r.first_oom_n)} ({r.first_oom_status})" if math.isfinite(
                r.first_oom_n) else "none"
            t.rows.append([r.label, r.latency_crossover, r.memory_crossover,
                           units.count(r.max_ok_n), first])
        out.append(t)
    return out


def _exponent(f) -> str:
    if not math.isfinite(f.exponent):
        decl = f", declared {f.declared:g}: inconclusive" if math.isfinite(f.declared) else ""
        return f"{f.metric}: too few points for an exponent{decl}"
    const = units.mb(units.to_mb(f.const)) if f.metric == "memory" else units.ms(f.const)
    text = (f"{f.metric} ∝ n^{f.exponent:.2f} (95% CI {f.ci_low:.2f}–{f.ci_high:.2f}"
            + (f", plus a constant {const}" if f.model == CONST else ""))
    if f.agrees:
        word = {"yes": "agrees", "no": "disagrees",
                "inconclusive": "inconclusive (interval too wide to tell)"}[f.agrees]
        text += f"; declared {f.declared:g}: {word}"
    marked = [f"{k} {w}" for k, w in ((f.noisy, "noisy (~)"), (f.contended, "contended (!)"))
              if k]
    return text + (f"; fitted points include {' and '.join(marked)}" if marked else "") + ")"


def _versus(text: str, better: str) -> str:
    if text in ("baseline", "no baseline", "no common points"):
        return f"{text} for {better}" if text == "no common points" else ""
    return f"{better} {text}"


def headlines(df: pd.DataFrame, scaling: pd.DataFrame, cross: pd.DataFrame,
              baseline: str | None) -> list[str]:
    """One sentence per label × setting: exponents, speed at the largest common n, crossovers,
    error against float64 at the largest n, how far it ran. `df` is a fit frame."""
    out = []
    for r in cross.itertuples():
        row = r._asdict()
        setting = " ".join(str(row[c]) for c in ("dtype", "mode", "device"))
        setting += " causal" if r.causal else " non-causal"
        if r.per == "sequence":
            setting += f", per sequence at B·n={units.count(r.tokens)}"
        parts = [_exponent(f) for f in scaling[same_setting(scaling, row)].itertuples()]
        mine = df[same_setting(df, row) & (df.status == "ok")].sort_values("seq_len")
        fast = mine[mine.speedup.notna()]
        if baseline and r.label != baseline and not fast.empty:
            last = fast.iloc[-1]
            mark = _marked(last, "x", speedup=True)[1:]
            parts.append(f"{units.times(last.speedup)}{mark} the speed of {baseline} at "
                         f"n={last.seq_len}")
        parts += [p for p in (_versus(r.latency_crossover, "faster"),
                              _versus(r.memory_crossover, "less memory")) if p]
        parts.append(_error_headline(mine, r.label))
        if math.isfinite(r.first_oom_n):
            parts.append(f"ran up to n={units.count(r.max_ok_n)}, {r.first_oom_status} at "
                         f"n={units.count(r.first_oom_n)}")
        elif math.isfinite(r.max_ok_n):
            parts.append(f"ran up to n={units.count(r.max_ok_n)}")
        out.append(f"{r.label} ({setting}): " + "; ".join(parts) + ".")
    return out


def _error_headline(mine: pd.DataFrame, label: str) -> str:
    """Its error against exact attention at the largest n that has one (the recurrent family:
    against its own recurrence), and any failed implementation check."""
    recurrent = not mine.empty and mine.family.isin(pick.NOT_COMPARABLE).all()
    col, what = (("impl_error", "error vs its own recurrence") if recurrent else
                 ("softmax_rel_error", "error vs exact attention"))
    err = mine[mine[col].notna()]
    text = (f"{what} {err[col].iloc[-1]:.1e} at n={err.seq_len.iloc[-1]}" if not err.empty
            else f"{what} not measured" if recurrent else "no softmax reference")
    failed = mine[~pick.impl_ok(mine)]
    if not failed.empty:
        ns = ", ".join(str(n) for n in failed.seq_len)
        text += f"; failed its implementation check (✗) at n={ns}: never picked"
    return text


def pick_tables(picks: pd.DataFrame, baseline: str | None) -> list[Table]:
    """The pick table (harness/pick.py): one table per setting, one row per n, one column per
    pick; each cell the winner, its latency, speedup, memory and error, and any marked point."""
    if picks.empty:
        return []
    keys = [c for c in pick.key_columns(picks) if c != "seq_len"]
    varying = columns.varying(picks, keys)
    out = []
    for key, g in picks.groupby(keys, sort=True, dropna=False):
        k = dict(zip(keys, key, strict=True))
        kinds = list(dict.fromkeys(g.pick))
        tol = pick.exact_tol(k["dtype"])
        names = {"fastest exact": f"fastest exact (softmax error ≤ {tol:.0e})",
                 "fastest": "fastest (any error)",
                 "leanest": f"leanest ({columns.memory_what(k.get('mode', ''))}"
                            f"{', × ' + baseline if baseline else ''})",
                 "fastest recurrent": "fastest recurrent (error not comparable)"}
        t = Table(f"Pick — {pick.setting_text(k, varying)}",
                  ["n", *[names.get(kd, f"fastest {kd}") for kd in kinds]], kind="pick")
        for n, gn in g.groupby("seq_len", sort=True):
            by = {r.pick: r for r in gn.itertuples()}
            t.rows.append([units.count(n), *[pick.cell(by[kd], baseline) if kd in by else ""
                                       for kd in kinds]])
        out.append(t)
    return out
