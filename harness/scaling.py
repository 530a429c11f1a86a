"""Measured scaling exponents, crossovers against the baseline and the out-of-memory frontier.

Exponent: least-squares slope of log(metric) against log(n) within one group (label, dtype,
mode, device, causal, batch, heads, head_dim, inputs), metric = median latency or peak memory of
the points that ran (`status == ok`). Its 95% interval is slope ± t(0.975, points − 2) · SE(slope)
(Student t, from a table; no scipy). Fewer than 3 points gives no exponent ("insufficient points")
— a line through two points has no error estimate.

Agreement: the declared exponent lies in the interval widened by AGREE_MARGIN (0.1) on each side.
Lower-order terms (the n·d inputs and outputs next to the n² scores) bend a log–log line a little
below its leading exponent, and a deterministic metric such as peak memory has an interval so
tight that this alone would read as disagreement.

Flat head rule: at small n fixed costs (kernel launch, Python, allocator granularity) dominate
and the curve is flat. Walking up from the smallest n, a leading point is dropped while the local
slope from it to the next point is below HEAD_FRACTION (one half) of the slope between the two
largest n; dropping stops when 3 points remain.

Crossover: the smallest n at which a variant becomes faster (smaller) than the baseline at the
same shape and setting, found where the measured ratio variant/baseline first falls below 1,
interpolated linearly in log n – log ratio between the two points on either side. "none within
the sweep" when it never does; "below the sweep" when it already is at the smallest common n.

OOM frontier: the largest n a variant ran before its first `oom` or `skipped` point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

HEAD_FRACTION = 0.5
AGREE_MARGIN = 0.1
MIN_POINTS = 3
METRICS = {"latency": "latency_ms", "memory": "peak_mem_bytes"}
DECLARED = {"latency": "time_exponent", "memory": "memory_exponent"}
# What makes two points comparable apart from n.
SETTING = ["dtype", "mode", "device", "causal", "batch", "heads", "head_dim", "inputs"]
GROUP = ["label", "family", *SETTING]
FAILED_BY_SIZE = ("oom", "skipped")

# Two-sided 95% Student t quantiles t(0.975, dof) for dof = 1..30.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom."""
    if dof < 1:
        return math.nan
    if dof <= len(_T975):
        return _T975[dof - 1]
    # Cornish–Fisher expansion around the normal quantile; error < 1e-4 for dof > 30.
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def drop_flat_head(n: Sequence[float], y: Sequence[float]) -> int:
    """How many leading points the flat-head rule drops (n ascending, y > 0)."""
    x, ly = np.log(np.asarray(n, float)), np.log(np.asarray(y, float))
    if len(x) <= MIN_POINTS:
        return 0
    slopes = np.diff(ly) / np.diff(x)
    final = slopes[-1]
    if not final > 0:
        return 0
    start = 0
    while len(x) - start > MIN_POINTS and slopes[start] < HEAD_FRACTION * final:
        start += 1
    return start


def fit_exponent(n: Sequence[float], y: Sequence[float]) -> dict:
    """Fit y ∝ n^exponent on log–log axes over the upper range of n (flat head dropped).

    Args:
        n: problem sizes, one per point (any order; repeated n are averaged in log space).
        y: the metric at each n; non-positive or non-finite values are ignored.

    Returns:
        dict with exponent, ci_low, ci_high, intercept (log space), n_min, n_max, points, dropped,
        note ("" or "insufficient points").
    """
    df = pd.DataFrame({"n": np.asarray(n, float), "y": np.asarray(y, float)})
    df = df[np.isfinite(df.y) & (df.y > 0) & (df.n > 0)]
    df = df.assign(ly=np.log(df.y)).groupby("n", as_index=False).ly.mean().sort_values("n")
    out = dict(exponent=math.nan, ci_low=math.nan, ci_high=math.nan, intercept=math.nan,
               n_min=math.nan, n_max=math.nan, points=len(df), dropped=0,
               note="insufficient points")
    if len(df) < MIN_POINTS:
        return out
    drop = drop_flat_head(df.n.to_numpy(), np.exp(df.ly.to_numpy()))
    df = df.iloc[drop:]
    x, ly = np.log(df.n.to_numpy()), df.ly.to_numpy()
    m = len(x)
    sxx = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (ly - ly.mean())).sum() / sxx)
    intercept = float(ly.mean() - slope * x.mean())
    resid = ly - (intercept + slope * x)
    se = math.sqrt(float((resid**2).sum()) / (m - 2) / sxx)
    half = t975(m - 2) * se
    out.update(exponent=slope, ci_low=slope - half, ci_high=slope + half, intercept=intercept,
               n_min=float(df.n.iloc[0]), n_max=float(df.n.iloc[-1]), points=m, dropped=drop,
               note="")
    return out


def scaling_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per label × metric × setting: the fitted exponent and whether it agrees."""
    rows = []
    ok = df[df.status == "ok"]
    for key, g in df.groupby(GROUP, sort=True, dropna=False):
        good = ok.loc[ok.index.intersection(g.index)]
        for metric, col in METRICS.items():
            fit = fit_exponent(good.seq_len, good[col])
            declared = float(g[DECLARED[metric]].dropna().iloc[0]) if \
                g[DECLARED[metric]].notna().any() else math.nan
            agrees = (
                bool(fit["ci_low"] - AGREE_MARGIN <= declared <= fit["ci_high"] + AGREE_MARGIN)
                if math.isfinite(fit["exponent"]) and math.isfinite(declared) else None
            )
            rows.append({**dict(zip(GROUP, key, strict=True)), "metric": metric, **fit,
                         "declared": declared, "agrees": agrees})
    cols = ["label", "metric", "exponent", "ci_low", "ci_high", "n_min", "n_max", "points",
            "declared", "agrees", "dropped", "note", "intercept", "family", *SETTING]
    return pd.DataFrame(rows, columns=cols)


def crossover_n(n: Sequence[float], ratio: Sequence[float]) -> tuple[float, str]:
    """Smallest n where `ratio` (variant / baseline) falls below 1, interpolated in log–log.

    Returns (n, text): text is "≈ N", "below the sweep (< N)", "none within the sweep" or
    "no common points"; n is NaN unless a crossing lies inside the sweep.
    """
    d = pd.DataFrame({"n": np.asarray(n, float), "r": np.asarray(ratio, float)})
    d = d[np.isfinite(d.r) & (d.r > 0)].sort_values("n")
    if d.empty:
        return math.nan, "no common points"
    ns, rs = d.n.to_numpy(), d.r.to_numpy()
    if rs[0] < 1:
        return math.nan, f"below the sweep (< {ns[0]:g})"
    for i in range(1, len(ns)):
        if rs[i] < 1:
            x0, x1 = math.log(ns[i - 1]), math.log(ns[i])
            y0, y1 = math.log(rs[i - 1]), math.log(rs[i])
            x = x0 + (0 - y0) * (x1 - x0) / (y1 - y0)
            cross = math.exp(x)
            return cross, f"≈ {cross:.0f}"
    return math.nan, "none within the sweep"


def oom_frontier(g: pd.DataFrame) -> dict:
    """Largest n that ran before the first oom/skipped point of one label × setting."""
    failed = g[g.status.isin(FAILED_BY_SIZE)]
    ok = g[g.status == "ok"]
    first = float(failed.seq_len.min()) if not failed.empty else math.nan
    below = ok[ok.seq_len < first] if math.isfinite(first) else ok
    status = failed.sort_values("seq_len").status.iloc[0] if not failed.empty else ""
    return dict(max_ok_n=float(below.seq_len.max()) if not below.empty else math.nan,
                first_oom_n=first, first_oom_status=status)


def crossovers_table(df: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """One row per label × setting: latency and memory crossovers vs `baseline`, OOM frontier."""
    rows = []
    ok = df[df.status == "ok"]
    base = ok[ok.label == baseline] if baseline else ok.iloc[0:0]
    for key, g in df.groupby(GROUP, sort=True, dropna=False):
        row = dict(zip(GROUP, key, strict=True))
        mine = ok.loc[ok.index.intersection(g.index)]
        setting = dict(zip(SETTING, key[2:], strict=True))
        b = base
        for k, v in setting.items():
            b = b[b[k] == v]
        for metric, col in METRICS.items():
            if baseline is None or row["label"] == baseline:
                n, text = math.nan, "baseline" if row["label"] == baseline else "no baseline"
            elif b.empty:
                n, text = math.nan, "no baseline"
            else:
                m = mine[["seq_len", col]].merge(b[["seq_len", col]], on="seq_len",
                                                 suffixes=("", "_base"))
                n, text = crossover_n(m.seq_len, m[col] / m[f"{col}_base"])
            row[f"{metric}_crossover_n"] = n
            row[f"{metric}_crossover"] = text
        row.update(oom_frontier(g))
        rows.append(row)
    cols = ["label", "latency_crossover_n", "latency_crossover", "memory_crossover_n",
            "memory_crossover", "max_ok_n", "first_oom_n", "first_oom_status", "family",
            *SETTING]
    return pd.DataFrame(rows, columns=cols)
