"""The answer first: which variant to pick at each n, for a given error budget, and its cost.

For every shape and setting of the sweep (n, mode, causal, dtype and whatever else varies) the
pick table names, among the points that ran:

- **fastest exact**: within rounding of full softmax attention: softmax_rel_error (against
  float64 full softmax attention on the same q, k, v) ≤ EXACT_TOL for the dtype (float32 1e-5,
  float16 5e-3, bfloat16 2e-2): the full backends, or a pattern that really is exact at that
  point (a local window ≥ n). A pattern exact only to its own mask is not exact;
- **within 1%**, **within 10%**: the fastest with softmax_rel_error ≤ 0.01, ≤ 0.1, whatever
  the family (a point with no softmax reference is never a candidate, and says so);
- **fastest**: the fastest whatever its error;
- **leanest**: the least memory (ties: the faster), as columns.memory_bytes counts it: in decode
  what a deployment holds, the cache or state plus the step's peak; otherwise the peak beyond q,
  k, v. A decode point whose record has no state_bytes is not ranked, and the pick says so;
- **fastest recurrent**, when the sweep has any: the recurrent family replaces softmax (no
  softmax error), so it is never "exact" nor "within x%" — it is ranked only here, under
  "fastest" and under "leanest", its error shown as not comparable.

A point whose implementation check failed (impl_ok false: impl_error, against its own float64
definition, over the variant's tolerance for the dtype) computes something else than it claims:
it is never picked; where it would have won, it is named beside the winner ("failed check").

Marked points (noisy ~: p10–p90 spread over 10% of the median; contended !: other processes took a
real share of the CPU) have a latency that may be inflated, or deflated by luck, so they never win
silently: a latency pick is made among the clean candidates, and a marked candidate that was
faster is named beside the winner ("marked, faster: …"). A marked candidate wins only when it is
faster beyond its noise — its 90th-percentile latency below the clean winner's 10th percentile
(linear attention's 0.12 ms step, noisy, against full attention's 34 ms: no spread explains
that) — or when every candidate is marked ("no clean candidate"); it is shown with its mark.
Memory is not affected by contention: the leanest pick uses every point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from attnbench.harness import units
from attnbench.harness.report import columns

EXACT_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
DEFAULT_TOL = 1e-5
BUDGETS = (0.01, 0.10)
NOT_COMPARABLE = ("recurrent",)  # families whose error is against their own definition
# What makes two points the same question (columns.SETTING), in pick.csv's column order; only
# the columns present in the frame are used.
KEYS = columns.setting(first=("seq_len", "mode", "causal", "dtype", "device"))
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
COLUMNS = ["pick", "label", "family", "latency_ms", "speedup", "peak_mem_mb", "memory_mb",
           "memory_ratio",
           "softmax_rel_error", "noisy", "contended", "baseline_marks", "candidates", "clean",
           "marked_faster", "marked_faster_ms", "marked_faster_marks", "impl_failed",
           "impl_failed_error", "note"]


def exact_tol(dtype: str) -> float:
    """The largest softmax_rel_error that still counts as rounding for `dtype`."""
    return EXACT_TOL.get(str(dtype), DEFAULT_TOL)


def budget_name(b: float) -> str:
    return f"within {b * 100:g}%"


def pick_kinds(df: pd.DataFrame) -> list[str]:
    """The picks, in table order; "fastest recurrent" only when the sweep has such a family."""
    kinds = ["fastest exact", *[budget_name(b) for b in BUDGETS], "fastest", "leanest"]
    if df.family.isin(NOT_COMPARABLE).any():
        kinds.append("fastest recurrent")
    return kinds


def impl_ok(g: pd.DataFrame) -> pd.Series:
    """Whether each point passed its implementation check (a frame without the column: yes)."""
    if "impl_ok" not in g:
        return pd.Series(True, index=g.index)
    return g.impl_ok.fillna(True).astype(bool)


def _candidates(g: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The points that qualify for `kind` by their error, impl-failed ones included (the
    choice leaves them out, and names one that would have won)."""
    comparable = ~g.family.isin(NOT_COMPARABLE)
    err = g.softmax_rel_error
    if kind == "fastest exact":
        return g[comparable & (err <= g.dtype.map(exact_tol))]
    if kind.startswith("within "):
        return g[comparable & (err <= float(kind.split()[1].rstrip("%")) / 100)]
    if kind == "fastest recurrent":
        return g[~comparable]
    return g


def marks(r) -> str:
    return ("~" if bool(r.noisy) else "") + ("!" if bool(r.contended) else "")


def _choose(cands: pd.DataFrame, kind: str) -> dict:
    """The winner of one pick among `cands` (see the module docstring), as a row dict."""
    out = dict.fromkeys(COLUMNS, math.nan) | dict(pick=kind, label="", family="", note="",
                                                  marked_faster="", marked_faster_marks="",
                                                  impl_failed="")
    if kind == "leanest":
        unknown = cands[cands.memory_bytes.isna() & columns.missing_state(cands)]
        cands = cands[cands.memory_bytes.notna()]
        every = cands.sort_values(["memory_bytes", "latency_ms"], kind="stable")
    else:
        every = cands.sort_values(["latency_ms", "label"], kind="stable")
    passed = impl_ok(every)
    order = every[passed]
    clean = order if kind == "leanest" else order[
        ~(order.noisy.astype(bool) | order.contended.astype(bool))]
    out["candidates"], out["clean"] = len(order), len(clean)
    win = None if order.empty else clean.iloc[0] if not clean.empty else order.iloc[0]
    if kind != "leanest" and not clean.empty:
        sure = order[order.latency_p90_ms < win.latency_p10_ms]  # faster beyond their noise
        if not sure.empty:
            win = sure.iloc[0]
    ahead = every if win is None else every.iloc[: every.index.get_loc(win.name)]
    failed = ahead[~impl_ok(ahead)]
    if not failed.empty:  # would have won, but computes something else than it claims
        out.update(impl_failed=failed.iloc[0].label,
                   impl_failed_error=failed.iloc[0].get("impl_error", math.nan))
    if kind == "leanest" and not unknown.empty:
        out["note"] = ("not ranked, no state recorded: "
                       + ", ".join(sorted(unknown.label.astype(str).unique())))
    if win is None:
        out["note"] = out["note"] or _none(kind)
        return out
    if kind != "leanest":
        if clean.empty:
            out["note"] = "no clean candidate"
        elif order.iloc[0].latency_ms < win.latency_ms:
            fast = order.iloc[0]
            out.update(marked_faster=fast.label, marked_faster_ms=fast.latency_ms,
                       marked_faster_marks=marks(fast))
    own = win.label == win.get("baseline", "")
    base_marks = "" if own else (("~" if bool(win.get("baseline_noisy", False)) else "")
                                 + ("!" if bool(win.get("baseline_contended", False)) else ""))
    out.update(label=win.label, family=win.family, latency_ms=win.latency_ms,
               speedup=win.speedup, peak_mem_mb=units.to_mb(win.peak_mem_bytes),
               memory_mb=units.to_mb(win.memory_bytes), memory_ratio=win.memory_ratio,
               softmax_rel_error=win.softmax_rel_error,
               noisy=bool(win.noisy), contended=bool(win.contended), baseline_marks=base_marks)
    return out


def _none(kind: str) -> str:
    if kind == "fastest exact":
        return "none exact"
    if kind.startswith("within "):
        return f"none {kind}"
    if kind == "fastest recurrent":
        return "no recurrent variant ran"
    return "none ran"


def key_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in KEYS if c in df]


def pick_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per shape × setting × pick. `df`: the report's frame (speedups at the same shape).

    Returns the key columns (KEYS present in `df`) then COLUMNS; a pick with no candidate has an
    empty label and a note ("none within 1%").
    """
    keys = key_columns(df)
    if "memory_bytes" not in df:  # a frame of records only (gather.with_derived adds it)
        df = df.assign(memory_bytes=columns.memory_bytes(df))
    ok = df[(df.status == "ok") & df.latency_ms.notna()]
    rows = []
    kinds = pick_kinds(df) if not df.empty else []
    for key, g in ok.groupby(keys, sort=True, dropna=False):
        for kind in kinds:
            rows.append(dict(zip(keys, key, strict=True)) | _choose(_candidates(g, kind), kind))
    return pd.DataFrame(rows, columns=[*keys, *COLUMNS])


# -- text --------------------------------------------------------------------------------------

def error_text(r) -> str:
    """softmax_rel_error as people read it: a percentage for approximations, 3e-07 near
    rounding; what a point without one lacks."""
    if r.family in NOT_COMPARABLE:
        return "error not comparable"
    e = r.softmax_rel_error
    if not isinstance(e, float) or not math.isfinite(e):
        return "no softmax reference"
    return f"error {e * 100:.2g}%" if e >= 1e-3 else f"error {e:.0e}"


def failed_text(r) -> str:
    """The point that would have won but failed its implementation check, as a line ("" when
    there is none)."""
    if not isinstance(r.impl_failed, str) or not r.impl_failed:
        return ""
    e = r.impl_failed_error
    err = f" (impl error {e:.1e})" if isinstance(e, float) and math.isfinite(e) else ""
    return f"failed its implementation check, not picked: {r.impl_failed}{err}"


def _speed(r, baseline: str | None) -> str:
    if not math.isfinite(r.speedup) or not baseline:
        return ""
    mark = r.baseline_marks if isinstance(r.baseline_marks, str) else ""
    return f"{units.times(r.speedup)} {baseline}{mark}" if r.label != baseline else "the baseline"


def cell(r, baseline: str | None) -> str:
    """One pick as a table cell: label, then its cost, then what to know (lines split by \\n)."""
    if not r.label:
        return "\n".join(x for x in (r.note, failed_text(r)) if x)
    m = marks(r)
    if r.pick == "leanest":
        mem = units.mb(r.memory_mb) + (f" ({units.times(r.memory_ratio)})"
                                       if math.isfinite(r.memory_ratio) else "")
        lines = [r.label, f"{mem} · {units.ms(r.latency_ms)}{m} · {error_text(r)}"]
    else:
        speed = _speed(r, baseline)
        lines = [f"{r.label} {m}".strip(),
                 " · ".join(x for x in (units.ms(r.latency_ms), speed,
                                        memory_text(r), error_text(r)) if x)]
    if r.marked_faster:
        lines.append(f"marked, faster: {r.marked_faster} {units.ms(r.marked_faster_ms)}"
                     f"{r.marked_faster_marks}")
    if failed_text(r):
        lines.append(failed_text(r))
    if r.note:
        lines.append(r.note)
    return "\n".join(lines)


def memory_text(r) -> str:
    """A pick's memory beside its latency: "0.954 MB", in decode "holds 539 MB"."""
    text = units.mb(r.memory_mb)
    return f"holds {text}" if text and getattr(r, "mode", "") == columns.DECODE else text


def setting_text(key: dict, varying: Sequence[str]) -> str:
    """"fp32 fwd, CPU" (+ causal, + the other setting columns that vary in the sweep)."""
    dtype = SHORT_DTYPE.get(str(key["dtype"]), str(key["dtype"]))
    text = f"{dtype} {key['mode']}" + (" causal" if bool(key["causal"]) else "")
    if "causal" in varying and not bool(key["causal"]):
        text += " non-causal"
    text += f", {str(key['device']).upper()}"
    extra = [f"{c}={key[c]}" for c in varying
             if c not in ("seq_len", "dtype", "mode", "causal", "device")]
    return ", ".join([text, *extra])


SAID = {"fastest exact": "fastest exact", "fastest": "fastest overall:",
        "leanest": "leanest:", "fastest recurrent": "fastest recurrent:"}


def said(kind: str, mode: str | None = None) -> str:
    """How a pick is named in a sentence: "fastest within 1%:", "leanest:"; with a `mode`,
    the leanest says what its memory counts ("leanest (peak beyond q, k, v):")."""
    if kind == "leanest" and mode is not None:
        return f"leanest ({columns.memory_what(mode)}):"
    return SAID.get(kind, f"fastest {kind}:")


def _mode(r) -> str | None:
    return getattr(r, "mode", None)


def _part(r, baseline: str | None) -> str:
    m = marks(r)
    if r.pick == "leanest":
        ratio = f" ({units.times(r.memory_ratio)} {baseline})" if math.isfinite(
            r.memory_ratio) and baseline and r.label != baseline else ""
        return f"{said(r.pick, _mode(r))} {r.label} {units.mb(r.memory_mb)}{ratio}"
    bits = [_speed(r, baseline)] + ([] if r.pick == "fastest exact" else [error_text(r)])
    inner = ", ".join(b for b in bits if b)
    return f"{said(r.pick)} {r.label} {units.ms(r.latency_ms)}{m}" + (f" ({inner})" if inner
                                                                        else "")


def sentences(picks: pd.DataFrame, baseline: str | None) -> list[str]:
    """One sentence per shape × setting: "At n=8192 (fp32 fwd, CPU): fastest exact …; …"."""
    if picks.empty:
        return []
    keys = key_columns(picks)
    varying = columns.varying(picks, keys)
    out = []
    for key, g in picks.groupby(keys, sort=True, dropna=False):
        k = dict(zip(keys, key, strict=True))
        parts, seen, same = [], set(), []
        for r in g.itertuples():
            if r.pick.startswith("within ") and r.label in seen:
                same.append(r.pick.split()[1])
                continue
            if same:
                parts.append(f"nothing faster within {' or '.join(same)}")
                same = []
            if not r.label:
                unranked = r.pick == "leanest" and r.note.startswith("not ranked")
                parts.append(f"{said(r.pick, _mode(r))} {r.note}" if unranked else r.note)
                continue
            if r.pick != "leanest" and r.label in seen:
                parts.append(f"{said(r.pick)} the same")
                continue
            seen.add(r.label)
            text = _part(r, baseline)
            if r.pick == "leanest" and r.note:
                text += f" [{r.note}]"
            if r.marked_faster:
                text += (f" [marked, faster: {r.marked_faster} {units.ms(r.marked_faster_ms)}"
                         f"{r.marked_faster_marks}]")
            parts.append(text)
        if same:
            parts.append(f"nothing faster within {' or '.join(same)}")
        failed = list(dict.fromkeys(x for x in g.impl_failed if isinstance(x, str) and x))
        timed = g[(g.pick != "leanest") & (g.label != "")]
        unclean = timed.note == "no clean candidate"
        if unclean.all() and len(timed):
            tail = " Every point at this n is noisy or contended: measure again."
        elif unclean.any():
            tail = (" No clean candidate for " + ", ".join(timed.pick[unclean])
                    + ": the marked point is shown.")
        else:
            tail = ""
        if failed:
            tail += (f" Not picked, failed its implementation check: {', '.join(failed)}.")
        out.append(f"At n={k['seq_len']} ({setting_text(k, varying)}): " + "; ".join(parts)
                   + "." + tail)
    return out


RULES = (
    "Error is softmax_rel_error: against float64 full softmax attention on the same inputs. "
    "Exact: within rounding of it — ≤ 1e-5 in fp32, 5e-3 in fp16, 2e-2 in bf16 (the full "
    "backends, or a pattern that covers every key at that n); a pattern exact only to its own "
    "mask is not exact. Within 1% / 10%: softmax_rel_error ≤ 0.01 / 0.1. A point without a "
    "softmax reference is never a candidate. A point that failed its implementation check "
    "(impl_error against its own float64 definition over its tolerance) is never picked. "
    "Recurrent variants replace softmax: their error is not comparable and they are ranked "
    "apart. Latency picks are made among clean "
    "points; a faster noisy (~) or contended (!) point is named beside the winner, and wins only "
    "when every candidate is marked ('no clean candidate'). Leanest: the least memory, all "
    "points (contention does not change memory): in decode the memory a deployment holds, the "
    "cache or state plus the step's peak; otherwise the peak beyond q, k, v."
)
