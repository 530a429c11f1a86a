"""Measured scaling exponents, crossovers against the baseline and the out-of-memory frontier.

Memory is what the report compares everywhere (columns.memory_bytes): in decode the cache or
state plus the step's peak, otherwise the peak beyond q, k, v.

Groups: one fit per label × setting (SETTING: columns.SETTING less seq_len — dtype, mode, device,
causal, batch, heads, kv_heads, q_len, head_dim, inputs — plus tokens) over the points that ran
(`status == ok`). Where batch varies with n within a label × setting — the GPU presets hold the
token budget B·n fixed — fits use latency and memory per sequence (÷ batch) and group by the
token budget `tokens` = batch·n instead of batch; batch-1 points (the clamp
`max(1, tokens // n)`) join every budget below 2n. `per` says "call" or "sequence".

Exponent, two models. Fixed costs (a workspace of constant size, per-call overhead) bend a log–log
line, so with at least CONST_MIN_POINTS distinct n the fit first tries y = c + a·nᵏ (c ≥ 0, a > 0):
least squares of the relative residuals (c + a·nᵏ)/y − 1, profiled over k (for each k, c and a
are linear). It is used only when the constant earns its place — the nested-model F test against
c = 0 (F > t(0.975, m − 3)², i.e. c significantly > 0 at 95%) — and the best k lies inside the
searched range; its 95% interval is the profile interval {k : S(k) ≤ S(k̂)·(1 + t²/(m − 3))}.
Otherwise the plain power law: least-squares slope of log(metric) on log(n), interval slope ±
t(0.975, m − 2)·SE; leading points are dropped while the local slope to the next point is below
HEAD_FRACTION of the slope between the two largest n (at least 3 kept). Fewer than 3 points give
no exponent ("insufficient points"). `model` says which: "c + a·n^k" or "a·n^k".

Agreement (`agrees`): "no" when the declared exponent lies outside the interval widened by
AGREE_MARGIN (0.1) each side (lower-order terms bend the line slightly); "yes" when inside and
the interval's half-width is at most AGREE_WIDTH (0.5); "inconclusive" when inside a wider
interval, or with no exponent — a wide interval can reject a claim but not confirm it.

Crossover: compares a variant with the baseline at the same setting, n and batch. "from n≈X"
only when the variant is faster (smaller) at every measured n from some point on, X interpolated
in log n – log ratio between the last point where it is not and the first where it is; "at every
n" when it already is at the smallest; "at no n"; otherwise where it is and where not ("at
n=1024, 4096; slower at n=2048"). Noisy (~) or contended (!) latency points on either side are
named after the text.

OOM frontier: the largest n a variant ran before its first `oom` or `skipped` point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnbench.harness.report import columns
from attnbench.harness.units import count

HEAD_FRACTION = 0.5
AGREE_MARGIN = 0.1
AGREE_WIDTH = 0.5
MIN_POINTS = 3
CONST_MIN_POINTS = 4
K_RANGE = (0.05, 4.0)
REL_FLOOR = 1e-6  # relative residuals below this are rounding, not signal
POWER, CONST = "a·n^k", "c + a·n^k"
METRICS = {"latency": "latency_ms", "memory": "memory_bytes"}  # memory: columns.memory_bytes
DECLARED = {"latency": "time_exponent", "memory": "memory_exponent"}
PER_SEQUENCE = ["latency_ms", "latency_p10_ms", "latency_p90_ms", "peak_mem_bytes",
                "memory_bytes"]
# What makes two points comparable apart from n (columns.SETTING less seq_len, in the order of
# setting names and scaling.csv's columns), plus tokens: the budget B·n, 0 when batch is held.
SETTING = columns.setting(first=("dtype", "mode", "device", "causal"), drop=("seq_len",),
                          extra=("tokens",))
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


def fit_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The points as the fits, crossovers, tables and plots see them (idempotent).

    Adds `tokens`, `per` and `run_batch` (the batch that ran), fills missing noisy/contended
    flags with False, and where batch varies with n divides the latency and memory columns by
    batch and sets batch to 0 (see the module docstring). The result has a fresh index; a batch-1
    point may appear once per token budget.
    """
    if "per" in df:
        return df
    df = df.copy()
    if "memory_bytes" not in df:  # a frame of records only (gather.with_derived adds it)
        df["memory_bytes"] = columns.memory_bytes(df)
    for col in ("noisy", "contended"):
        df[col] = df[col].astype("boolean").fillna(False).astype(bool) if col in df else False
    for col in ("kv_heads", "q_len"):  # tables from before model shapes: 0 (= heads, seq_len)
        df[col] = df[col].fillna(0).astype(int) if col in df else 0
    df["run_batch"], df["tokens"], df["per"] = df["batch"], 0, "call"
    rest = [c for c in GROUP if c not in ("batch", "tokens")]
    parts = []
    for _, g in df.groupby(rest, sort=False, dropna=False):
        budgets = sorted(set((g.batch * g.seq_len)[g.batch > 1]))
        if g.batch.nunique() < 2 or len(budgets) >= g.batch.nunique():
            parts.append(g)  # batch held, or crossed with n: per call, grouped by batch
            continue
        used = pd.Series(False, index=g.index)
        for t in budgets:
            take = ((g.batch > 1) & (g.batch * g.seq_len == t)) | ((g.batch == 1)
                                                                   & (2 * g.seq_len > t))
            used |= take
            sub = g[take].copy()
            cols = [c for c in PER_SEQUENCE if c in sub]
            sub[cols] = sub[cols].div(sub.batch, axis=0)
            sub["batch"], sub["tokens"], sub["per"] = 0, t, "sequence"
            parts.append(sub)
        parts.append(g[~used])
    return pd.concat(parts).reset_index(drop=True) if parts else df.reset_index(drop=True)


def loglog_slope(n: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y on log n, nothing dropped and no constant separated (what
    the benchmark scripts print beside their targets); NaN when all n are equal."""
    x, ly = np.log(np.asarray(n, float)), np.log(np.asarray(y, float))
    sxx = float(((x - x.mean()) ** 2).sum())
    return float(((x - x.mean()) * (ly - ly.mean())).sum() / sxx) if sxx else math.nan


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


def _profile(x: np.ndarray, y: np.ndarray, k: np.ndarray, const: bool):
    """For each k: (S, c, a) minimising S = Σ((c + a·xᵏ)/y − 1)² with c ≥ 0 (c = 0 unless
    `const`), a > 0 (S = inf where impossible). x and y are scaled to at most 1."""
    k = np.atleast_1d(np.asarray(k, float))
    u = x[None, :] ** k[:, None] / y[None, :]  # (K, m)
    w = 1 / y
    su, suu, sw, sww, swu = u.sum(1), (u * u).sum(1), w.sum(), w @ w, u @ w
    a, c = su / suu, np.zeros_like(su)  # c = 0
    if const:
        det = sww * suu - swu**2
        with np.errstate(divide="ignore", invalid="ignore"):
            c2, a2 = (sw * suu - su * swu) / det, (sww * su - swu * sw) / det
        free = (det > 1e-12 * sww * suu) & (c2 > 0)
        c, a = np.where(free, c2, c), np.where(free, a2, a)
    r = c[:, None] * w[None, :] + a[:, None] * u - 1
    s = np.where(a > 0, (r * r).sum(1), np.inf)
    return s, c, a


def _argmin_k(x, y, const: bool) -> float:
    """Grid over K_RANGE, then golden-section refinement around the best grid point."""
    grid = np.arange(K_RANGE[0], K_RANGE[1] + 1e-9, 0.02)
    i = int(np.argmin(_profile(x, y, grid, const)[0]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        s1, s2 = _profile(x, y, np.array([m1, m2]), const)[0]
        lo, hi = (lo, m2) if s1 <= s2 else (m1, hi)
    return (lo + hi) / 2


def _crossing(f, k0: float, edge: float) -> float:
    """Where f (negative at k0) turns non-negative between k0 and edge; ±inf if it never does."""
    if f(edge) < 0:
        return math.copysign(math.inf, edge - k0)
    a, b = k0, edge
    for _ in range(50):
        mid = (a + b) / 2
        a, b = (mid, b) if f(mid) < 0 else (a, mid)
    return (a + b) / 2


def fit_const(n: np.ndarray, y: np.ndarray) -> dict | None:
    """The c + a·nᵏ fit of module docstring, or None when the data do not support it."""
    m = len(n)
    if m < CONST_MIN_POINTS:
        return None
    nmax, ymax = n.max(), y.max()
    x, ys = n / nmax, y / ymax
    kc, kp = _argmin_k(x, ys, True), _argmin_k(x, ys, False)
    s1, c, a = (float(v[0]) for v in _profile(x, ys, np.array([kc]), True))
    s0 = float(_profile(x, ys, np.array([kp]), False)[0][0])
    floor = m * REL_FLOOR**2
    t2 = t975(m - 3) ** 2
    inside = K_RANGE[0] + 0.02 < kc < K_RANGE[1] - 0.02
    if not (c > 0 and inside and (s0 - s1) / (max(s1, floor) / (m - 3)) > t2):
        return None
    limit = max(s1, floor) * (1 + t2 / (m - 3))

    def excess(k: float) -> float:
        return float(_profile(x, ys, np.array([k]), True)[0][0]) - limit

    lo, hi = _crossing(excess, kc, K_RANGE[0]), _crossing(excess, kc, K_RANGE[1])
    return dict(model=CONST, exponent=float(kc), ci_low=float(lo), ci_high=float(hi),
                const=float(c * ymax), intercept=float(math.log(a * ymax / nmax**kc)))


def fit_exponent(n: Sequence[float], y: Sequence[float]) -> dict:
    """Fit y = c + a·nᵏ or y = a·nᵏ, whichever the data support (see the module docstring).

    Args:
        n: problem sizes, one per point (any order; repeated n are averaged in log space).
        y: the metric at each n; non-positive or non-finite values are ignored.

    Returns:
        dict with model, exponent, ci_low, ci_high, const (c; 0 for a·nᵏ), intercept (log a),
        n_min, n_max, points, dropped, note ("" or "insufficient points").
    """
    df = pd.DataFrame({"n": np.asarray(n, float), "y": np.asarray(y, float)})
    df = df[np.isfinite(df.y) & (df.y > 0) & np.isfinite(df.n) & (df.n > 0)]
    df = df.assign(ly=np.log(df.y)).groupby("n", as_index=False).ly.mean().sort_values("n")
    out = dict(model="", exponent=math.nan, ci_low=math.nan, ci_high=math.nan, const=math.nan,
               intercept=math.nan, n_min=math.nan, n_max=math.nan, points=len(df), dropped=0,
               note="insufficient points")
    if len(df) < MIN_POINTS:
        return out
    const = fit_const(df.n.to_numpy(), np.exp(df.ly.to_numpy()))
    if const is not None:
        out.update(const, n_min=float(df.n.iloc[0]), n_max=float(df.n.iloc[-1]), note="")
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
    out.update(model=POWER, exponent=slope, ci_low=slope - half, ci_high=slope + half, const=0.0,
               intercept=intercept, n_min=float(df.n.iloc[0]), n_max=float(df.n.iloc[-1]),
               points=m, dropped=drop, note="")
    return out


def agreement(fit: dict, declared: float) -> str:
    """"yes", "no", "inconclusive", or "" when nothing is declared (see the module docstring)."""
    if not math.isfinite(declared):
        return ""
    if not math.isfinite(fit["exponent"]):
        return "inconclusive"
    if not fit["ci_low"] - AGREE_MARGIN <= declared <= fit["ci_high"] + AGREE_MARGIN:
        return "no"
    return "yes" if (fit["ci_high"] - fit["ci_low"]) / 2 <= AGREE_WIDTH else "inconclusive"


def _per_note(g: pd.DataFrame) -> str:
    if g.per.iloc[0] != "sequence":
        return ""
    return (f"per sequence: batch varies with n ({count(g.run_batch.max())}…"
            f"{count(g.run_batch.min())}), grouped by B·n = {count(g.tokens.iloc[0])} tokens")


def scaling_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per label × metric × setting: the fitted exponent and whether it agrees."""
    rows = []
    df = fit_frame(df)
    for key, g in df.groupby(GROUP, sort=True, dropna=False):
        good = g[g.status == "ok"]
        for metric, col in METRICS.items():
            fit = fit_exponent(good.seq_len, good[col])
            declared = g[DECLARED[metric]].dropna()
            declared = float(declared.iloc[0]) if len(declared) else math.nan
            used = good[np.isfinite(good[col]) & (good[col] > 0)]
            used = used[used.seq_len >= (fit["n_min"] if fit["points"] >= MIN_POINTS else 0)]
            latency = metric == "latency"
            note = "; ".join(s for s in (fit["note"], _per_note(g)) if s)
            rows.append({**dict(zip(GROUP, key, strict=True)), "metric": metric, **fit,
                         "declared": declared, "agrees": agreement(fit, declared),
                         "noisy": int(used.noisy.sum()) if latency else 0,
                         "contended": int(used.contended.sum()) if latency else 0,
                         "per": g.per.iloc[0], "note": note})
    cols = ["label", "metric", "model", "exponent", "ci_low", "ci_high", "n_min", "n_max",
            "points", "declared", "agrees", "dropped", "noisy", "contended", "per", "note",
            "const", "intercept", "family", *SETTING]
    return pd.DataFrame(rows, columns=cols)


def _ns(ns) -> str:
    return ", ".join(count(n) for n in ns)


def crossover_n(n: Sequence[float], ratio: Sequence[float], marks: Sequence[str] | None = None,
                worse: str = "slower") -> tuple[float, str]:
    """Where `ratio` (variant / baseline) stays below 1, as in the module docstring.

    Args:
        n, ratio: one value per common point.
        marks: per point, "" or a mix of "~" (noisy) and "!" (contended), named in the text.
        worse: the word for ratio ≥ 1 ("slower", "more").

    Returns (n, text): text is "from n≈N", "at every n (from N)", "at no n",
    "at n=…; slower at n=…" or "no common points", followed by any marked points; n is NaN
    unless the variant stays better from a crossing inside the sweep.
    """
    marks = list(marks) if marks is not None else [""] * len(np.asarray(n))
    d = pd.DataFrame({"n": np.asarray(n, float), "r": np.asarray(ratio, float), "m": marks})
    d = d[np.isfinite(d.r) & (d.r > 0)].sort_values("n")
    if d.empty:
        return math.nan, "no common points"
    ns, rs = d.n.to_numpy(), d.r.to_numpy()
    better = rs < 1
    cross = math.nan
    if better.all():
        text = f"at every n (from {count(ns[0])})"
    elif not better.any():
        text = "at no n"
    elif better[better.argmax():].all():  # better from the first better point on
        i = int(better.argmax())
        x0, x1 = math.log(ns[i - 1]), math.log(ns[i])
        y0, y1 = math.log(rs[i - 1]), math.log(rs[i])
        cross = math.exp(x0 - y0 * (x1 - x0) / (y1 - y0))
        text = f"from n≈{count(cross)}"
    else:
        text = f"at n={_ns(ns[better])}; {worse} at n={_ns(ns[~better])}"
    flagged = [(sym, word, d.n[d.m.str.contains(sym, regex=False)])
               for sym, word in (("!", "contended"), ("~", "noisy"))]
    extra = [f"{sym} {word} at n={_ns(f)}" for sym, word, f in flagged if len(f)]
    return cross, text + (f" ({'; '.join(extra)})" if extra else "")


def point_marks(frame: pd.DataFrame, suffix: str = "") -> pd.Series:
    """"~" for a noisy point, "!" for a contended one, from the columns noisy/contended+suffix."""
    noisy = frame[f"noisy{suffix}"].astype(bool)
    contended = frame[f"contended{suffix}"].astype(bool)
    return noisy.map({True: "~", False: ""}) + contended.map({True: "!", False: ""})


def oom_frontier(g: pd.DataFrame) -> dict:
    """Largest n that ran before the first oom/skipped point of one label × setting."""
    failed = g[g.status.isin(FAILED_BY_SIZE)]
    ok = g[g.status == "ok"]
    first = float(failed.seq_len.min()) if not failed.empty else math.nan
    below = ok[ok.seq_len < first] if math.isfinite(first) else ok
    status = failed.sort_values("seq_len").status.iloc[0] if not failed.empty else ""
    return dict(max_ok_n=float(below.seq_len.max()) if not below.empty else math.nan,
                first_oom_n=first, first_oom_status=status)


def same_setting(frame: pd.DataFrame, row: dict, label: str | None = None) -> pd.Series:
    """Rows of `frame` with the setting (and the label, default the row's) of `row`."""
    mask = frame.label == (row["label"] if label is None else label)
    for c in SETTING:
        mask &= frame[c] == row[c]
    return mask


def crossovers_table(df: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """One row per label × setting: latency and memory crossovers vs `baseline`, OOM frontier."""
    rows = []
    df = fit_frame(df)
    ok = df[df.status == "ok"]
    for key, g in df.groupby(GROUP, sort=True, dropna=False):
        row = dict(zip(GROUP, key, strict=True))
        mine = g[g.status == "ok"]
        b = ok[same_setting(ok, row, baseline)] if baseline else ok.iloc[0:0]
        for metric, col in METRICS.items():
            if baseline is None or row["label"] == baseline:
                n, text = math.nan, "baseline" if row["label"] == baseline else "no baseline"
            elif b.empty:
                n, text = math.nan, "no baseline"
            else:  # like with like: the same n and the same batch
                cols = ["seq_len", "run_batch", col, "noisy", "contended"]
                m = mine[cols].merge(b[cols], on=["seq_len", "run_batch"],
                                     suffixes=("", "_base"))
                marks = None
                if metric == "latency":
                    marks = (point_marks(m) + point_marks(m, "_base")).to_numpy()
                n, text = crossover_n(m.seq_len, m[col] / m[f"{col}_base"], marks,
                                      "slower" if metric == "latency" else "more")
            row[f"{metric}_crossover_n"] = n
            row[f"{metric}_crossover"] = text
        row.update(oom_frontier(g))
        row["per"] = g.per.iloc[0]
        rows.append(row)
    cols = ["label", "latency_crossover_n", "latency_crossover", "memory_crossover_n",
            "memory_crossover", "max_ok_n", "first_oom_n", "first_oom_status", "per", "family",
            *SETTING]
    return pd.DataFrame(rows, columns=cols)
