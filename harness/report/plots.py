"""The report's figures (seaborn on the Agg backend), each written as PNG and SVG.

Latency, memory and speedup vs n are small multiples: one panel per family (per setting too when
the sweep varies dtype, mode, causal, …), the baseline drawn in every panel (grey) so each family
reads against it. Colours are fixed per family (full: blues, local: greens, sparse: oranges,
linear: purples, lowrank: reds, recurrent: browns), shades spread across the family's palette and
a marker of its own for every label, so a (colour, marker) pair names one label in every plot.
Error vs latency (the error against float64 full softmax attention, softmax_rel_error) is one
panel per n with the exact / 1% / 10% budgets of the pick table drawn as lines; a point that
failed its implementation check is crossed out in red. Every log axis gets a handful of ticks
(`log_ticks`), whatever its range. Points that are noisy or contended (their latency may be
inflated) are drawn hollow. Where batch varies with n,
latency and memory are per sequence, as fitted; the dashed line is the fit, c + a·nᵏ or a·nᵏ
(harness/scaling.py). Memory is what the report compares (columns.memory_bytes): in decode the
cache or state plus the step's peak, otherwise the peak beyond q, k, v; the axis says which.

A sweep whose every setting has one n (nothing to draw against n, nothing to fit) gets bar charts
instead (`bar_plot`): latency (p10–p90 whiskers), error against softmax (log, the budgets drawn
as lines), speedup and memory, one bar per label in its family colour, one panel per setting;
a point that did not run or has no such number is named where its bar would be. No exponent plot.
Figures are sized to show 1:1 in the report page (≤ 1200 px wide).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd
import seaborn as sns

from attnbench.harness import units
from attnbench.harness.report import columns
from attnbench.harness.report.pick import BUDGETS, NOT_COMPARABLE, exact_tol, impl_ok
from attnbench.harness.report.scaling import SETTING
from attnbench.harness.report.tables import memory_counts, setting_name

FAMILY_PALETTE = {"full": "Blues", "local": "Greens", "sparse": "Oranges", "linear": "Purples",
                  "lowrank": "Reds", "recurrent": "YlOrBr"}
OTHER_PALETTE = "Greys"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
BASELINE_COLOR = "0.45"
DPI = 110
PANEL = (3.5, 2.9)  # inches: three panels a row fit the page's 1200 px at DPI
MAX_TICKS = 6


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or folder name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "x"


def label_styles(df: pd.DataFrame) -> dict[str, dict]:
    """label → {color, marker}: a shade of the family palette (spread from dark to mid, so two
    labels of a family differ visibly) and a marker of its own across the whole sweep."""
    styles = {}
    pairs = df[["family", "label"]].drop_duplicates().sort_values(["family", "label"])
    i = 0
    for family, g in pairs.groupby("family"):
        labels = list(g.label)
        cmap = plt.get_cmap(FAMILY_PALETTE.get(family, OTHER_PALETTE))
        lo = 0.55 if family == "recurrent" else 0.45
        shades = np.linspace(0.95, lo, len(labels)) if len(labels) > 1 else [0.8]
        for label, shade in zip(labels, shades, strict=True):
            styles[label] = dict(color=cmap(float(shade)), marker=MARKERS[i % len(MARKERS)])
            i += 1
    return styles


def setting_names(df: pd.DataFrame) -> pd.Series:
    """One short name per row for the setting columns that vary in this sweep ("" if none)."""
    varying = columns.varying(df, SETTING)
    if not varying:
        return pd.Series("", index=df.index)
    return df[varying].apply(
        lambda r: " ".join(setting_name(c, v) for c, v in zip(varying, r, strict=True)), axis=1)


def _save(fig, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=DPI, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _panels(names: list[str], ncols_max: int = 3, size=PANEL, layout: str | None = None):
    k = max(1, len(names))
    ncols = min(k, ncols_max)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False, layout=layout)
    flat = list(axes.flat)
    for ax in flat[k:]:
        ax.set_visible(False)
    return fig, flat[:k]


def _legend(fig, axes, top: float = 0.92) -> None:
    """Tidy the layout (room for the suptitle), then one legend for all panels, below them."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and not lab.startswith("_"):
                handles[lab] = h
                labels.append(lab)
    rows = math.ceil(len(labels) / 4)
    bottom = (0.1 + 0.25 * rows) / fig.get_figheight() if labels else 0.0
    fig.tight_layout(rect=(0, bottom, 1, top))
    if handles:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)), frameon=False,
                   fontsize=9)


def _panel_legend(ax) -> None:
    """The panel's own legend, under it: it never hides a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False,
                  ncol=1, handlelength=2.2)


def _suptitle(fig, text: str) -> float:
    """The figure's title, wrapped to the figure's width (about 14 characters an inch); returns
    the top of the room left for the panels (a figure fraction)."""
    text = textwrap.fill(text, max(40, int(fig.get_figwidth() * 14)))
    fig.suptitle(text, fontsize=10)
    return 1 - (0.15 + 0.18 * (text.count("\n") + 1)) / fig.get_figheight()


def n_label(n: float) -> str:
    """512, 1k, 2k, …, 32k: short enough that eight sizes fit a small panel."""
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else units.count(n)


def log_ticks(lo: float, hi: float, max_ticks: int = MAX_TICKS) -> list[float]:
    """At most `max_ticks` (≥ 2 when the range allows) readable ticks on a log axis [lo, hi]:
    1-2-5 steps, else 1-3, else decades, else every k-th decade; a range under a 1-2-5 step gets
    plain linear steps."""
    if not (lo > 0 and hi > lo and math.isfinite(hi)):
        return [lo] if lo > 0 and math.isfinite(lo) else []
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    eps = 1e-9
    for subs in ((1, 2, 5), (1, 3), (1,)):
        t = [m * 10.0**d for d in range(d0, d1 + 1) for m in subs
             if lo * (1 - eps) <= m * 10.0**d <= hi * (1 + eps)]
        if len(t) <= max_ticks:
            if len(t) >= 2:
                return t
            if subs == (1, 2, 5):  # a narrow range: linear steps inside it
                lin = ticker.MaxNLocator(nbins=3, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                return [float(x) for x in lin if lo <= x <= hi and x > 0][:max_ticks]
    exps = list(range(d0, d1 + 1))
    stride = 2
    while len([e for e in exps if e % stride == 0 and lo <= 10.0**e <= hi]) > max_ticks:
        stride += 1
    return [10.0**e for e in exps if e % stride == 0 and lo <= 10.0**e <= hi]


def _fix_axis(ax, which: str, ticks: list[float], labels: list[str] | None = None) -> None:
    axis = ax.xaxis if which == "x" else ax.yaxis
    lim = ax.get_xlim() if which == "x" else ax.get_ylim()
    axis.set_major_locator(ticker.FixedLocator(ticks))
    if labels is None:
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: units.tick(v)))
    else:
        axis.set_major_formatter(ticker.FixedFormatter(labels))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=(2, 3, 4, 5, 6, 7, 8, 9)))
    axis.set_minor_formatter(ticker.NullFormatter())
    (ax.set_xlim if which == "x" else ax.set_ylim)(*lim)


def tidy_log(ax, ns=None) -> None:
    """A handful of plain-number ticks on both log axes (the sweep's n on the x axis when given,
    as 512, 1k, 2k …; a sparser subset when there are many)."""
    ax.autoscale_view()
    lo, hi = ax.get_xlim()
    ns = sorted(n for n in (ns if ns is not None else []) if lo <= n <= hi)
    if ns:
        step = math.ceil(len(ns) / 8)
        pick = ns[::step]
        _fix_axis(ax, "x", pick, [n_label(n) for n in pick])
    else:
        _fix_axis(ax, "x", log_ticks(lo, hi))
    _fix_axis(ax, "y", log_ticks(*ax.get_ylim()))


def _empty(ax, text="no points ran") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _hollow(ax, x, y, st, marked) -> None:
    """Hollow markers over the `marked` points (white inside, the label's colour around)."""
    ax.scatter(x[marked], y[marked], marker=st["marker"], s=34, zorder=4, lw=1.3,
               edgecolors=[st["color"]], facecolors="white")


def _is_marked(g, speedup: bool = False) -> pd.Series:
    marked = g.noisy.astype(bool) | g.contended.astype(bool)
    if speedup and "baseline_noisy" in g:
        mine = g.label != g.baseline
        marked |= mine & (g.baseline_noisy.astype(bool) | g.baseline_contended.astype(bool))
    return marked


def family_panels(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(setting, family) for every panel of the small multiples, in page order."""
    keys = df[["setting", "family"]].drop_duplicates().sort_values(["setting", "family"])
    return [(s, f) for s, f in zip(keys.setting, keys.family, strict=True)] or [("", "")]


def _title(setting: str, family: str) -> str:
    return f"{family} — {setting}" if setting else family

def _line(ax, g, y, st, label, marked, lw=1.4, **kw) -> None:
    ax.plot(g.seq_len, g[y], marker=st["marker"], color=st["color"], label=label, lw=lw, ms=5,
            **kw)
    _hollow(ax, g.seq_len, g[y], st, marked.to_numpy())


def scaling_plot(df, scaling, styles, metric, folder: Path, baseline: str | None = None,
                 ) -> list[Path]:
    """Latency (or memory) vs n on log–log axes, one panel per family (× setting), the
    baseline in grey in every panel, p10–p90 band and the fitted line."""
    col, unit = ("latency_ms", "median latency (ms)") if metric == "latency" else \
        ("mem_mb", memory_unit(df))
    ok = df[(df.status == "ok") & (df[col] > 0)]
    keys = family_panels(df)
    fig, axes = _panels([_title(*k) for k in keys])
    for ax, (name, family) in zip(axes, keys, strict=True):
        sub = ok[(ok.setting == name) & (ok.family == family)]
        base = ok[(ok.setting == name) & (ok.label == baseline) & (ok.family != family)]
        if not base.empty:
            g = base.sort_values("seq_len")
            ax.plot(g.seq_len, g[col], color=BASELINE_COLOR, lw=2.2, alpha=0.7, marker=".",
                    label=f"{baseline} (baseline)", zorder=1)
        for label, g in sub.groupby("label"):
            g = g.sort_values("seq_len")
            st = styles[label]
            text = f"{label} (baseline)" if label == baseline else label
            marked = _is_marked(g) if metric == "latency" else pd.Series(False, index=g.index)
            _line(ax, g, col, st, text, marked)
            if metric == "latency":
                ax.fill_between(g.seq_len, g.latency_p10_ms, g.latency_p90_ms, color=st["color"],
                                alpha=0.15, lw=0)
            fit = scaling[(scaling.label == label) & (scaling.metric == metric)
                          & (scaling.setting == name)]
            for _, f in fit.iterrows():
                if not math.isfinite(f.exponent):
                    continue
                xs = np.geomspace(f.n_min, f.n_max, 20)
                const = f.const if math.isfinite(f.const) else 0.0
                ys = const + np.exp(f.intercept) * xs**f.exponent
                if metric == "memory":
                    ys = units.to_mb(ys)
                ax.plot(xs, ys, ls="--", color=st["color"], lw=1, alpha=0.8,
                        label=f"_fit {label}")
        if sub.empty:
            _empty(ax)
        per = not sub.empty and (sub.per == "sequence").all()
        ax.set(xscale="log", yscale="log", xlabel="",
               ylabel=unit.replace(" (", " per sequence (") if per else unit)
        ax.set_title(_title(name, family), fontsize=10, fontweight="bold")
        tidy_log(ax, df.seq_len.unique())
        _panel_legend(ax)
    notes = ["per sequence where batch varies with n"] if (df.per == "sequence").any() else []
    notes += ["hollow: noisy or contended"] if metric == "latency" else []
    notes += [memory_note(df)] if metric == "memory" else []
    notes += ["grey: the baseline", "dashed: the fit"]
    top = _suptitle(fig, f"{unit.split(' (')[0]} vs sequence length n, by family "
                         f"({'; '.join(notes)})")
    fig.tight_layout(rect=(0, 0, 1, top))
    return _save(fig, folder, metric)


def speedup_plot(df, styles, baseline: str, folder: Path,
                 cross: pd.DataFrame | None = None) -> list[Path]:
    """Speedup over the baseline vs n, one panel per family; each label's legend entry says
    where it is faster (the crossover rules of harness/scaling.py), a dotted line marks
    "from n≈X"."""
    ok = df[(df.status == "ok") & np.isfinite(df.speedup) & (df.label != baseline)]
    keys = [k for k in family_panels(ok)] if not ok.empty else [("", "")]
    fig, axes = _panels([_title(*k) for k in keys])
    for ax, (name, family) in zip(axes, keys, strict=True):
        sub = ok[(ok.setting == name) & (ok.family == family)]
        for label, g in sub.groupby("label"):
            g = g.sort_values("seq_len")
            st = styles[label]
            text, at = label, math.nan
            if cross is not None and not cross.empty:
                c = cross[(cross.label == label) & (cross.setting == name)]
                if len(c):
                    at = c.latency_crossover_n.iloc[0]
                    where = str(c.latency_crossover.iloc[0]).split(" (")[0]
                    text = f"{label}: faster {where}"
            _line(ax, g, "speedup", st, text, _is_marked(g, speedup=True))
            if math.isfinite(at):
                ax.axvline(at, color=st["color"], lw=1, ls=":")
        if sub.empty:
            _empty(ax, "no baseline points")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="", ylabel=f"speedup vs {baseline} (×)")
        ax.set_title(_title(name, family), fontsize=10, fontweight="bold")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.8), max(hi, 1.25))  # the line at 1 always inside
        tidy_log(ax, df.seq_len.unique())
        _panel_legend(ax)
    top = _suptitle(fig, f"speedup over {baseline} vs sequence length n (above 1: faster; "
                         f"dotted: the crossover when it stays faster; hollow: noisy or "
                         f"contended, either side)")
    fig.tight_layout(rect=(0, 0, 1, top))
    return _save(fig, folder, "speedup")


def _budget_lines(ax, dtype: str) -> None:
    """The pick table's budgets as horizontal lines, named at the right edge."""
    for y, text in ((exact_tol(dtype), "exact"), *((b, f"{b * 100:g}%") for b in BUDGETS)):
        ax.axhline(y, color="0.6", lw=0.8, ls=":", zorder=0)
        ax.annotate(text, xy=(1, y), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", fontsize=7.5, color="0.4")


def pareto_plot(df, styles, folder: Path) -> list[Path]:
    """Error against exact attention (softmax_rel_error) vs latency, one panel per setting × n:
    lower-left is better. Recurrent variants are left out (they replace softmax), so are points
    without a softmax reference (counted in the title); a point that failed its implementation
    check is crossed out in red (never picked)."""
    ran = df[(df.status == "ok") & (df.latency_ms > 0) & ~df.family.isin(NOT_COMPARABLE)]
    ok = ran[np.isfinite(ran.softmax_rel_error)]
    unref = len(ran) - len(ok)
    keys = sorted({(s, n) for s, n in zip(df.setting, df.seq_len, strict=True)}) or [("", 0)]
    names = [f"{s} n={n}".strip() for s, n in keys]
    fig, axes = _panels(names, size=(PANEL[0], 3.7))
    for ax, (name, n) in zip(axes, keys, strict=True):
        sub = ok[(ok.setting == name) & (ok.seq_len == n)]
        for label, g in sub.groupby("label"):
            st = styles[label]
            err = g.softmax_rel_error.clip(lower=1e-12)
            marked = _is_marked(g).to_numpy()
            ax.scatter(g.latency_ms[~marked], err[~marked], color=st["color"],
                       marker=st["marker"], s=46, label=label, zorder=3)
            ax.scatter(g.latency_ms[marked], err[marked], facecolors="white", lw=1.4,
                       edgecolors=[st["color"]], marker=st["marker"], s=46, zorder=3,
                       label=label if marked.all() else f"_{label}")
            bad = ~impl_ok(g).to_numpy()
            ax.scatter(g.latency_ms[bad], err[bad], marker="x", color="red", s=70, lw=1.6,
                       zorder=5)
        if sub.empty:
            _empty(ax, "no error measured")
            ax.set(xscale="log", yscale="log")
        else:
            dtype = str(sub.dtype.iloc[0])
            err = sub.softmax_rel_error.clip(lower=1e-12)
            ax.set_ylim(min(err.min(), exact_tol(dtype)) / 4, max(err.max(), max(BUDGETS)) * 4)
            lat = sub.latency_ms
            ax.set_xlim(lat.min() / 1.6, lat.max() * 1.6)
            _budget_lines(ax, dtype)
            ax.set(xscale="log", yscale="log")
        ax.set(xlabel="median latency (ms)", ylabel="error vs exact attention")
        ax.set_title(f"{name} n={n_label(n)}".strip(), fontsize=10, fontweight="bold")
        tidy_log(ax)
    skipped = df[(df.status == "ok") & df.family.isin(NOT_COMPARABLE)]
    note = "; recurrent variants not shown: they replace softmax" if len(skipped) else ""
    note += f"; {unref} point(s) without a softmax reference not shown" if unref else ""
    note += ("; red ×: failed its implementation check, never picked"
             if (~impl_ok(ok)).any() else "")
    top = _suptitle(fig, "relative error vs float64 full softmax attention, vs latency (lower "
                         "left is better; dotted: the pick table's exact, 1% and 10% budgets; "
                         f"hollow: noisy or contended{note})")
    _legend(fig, axes, top=top)
    return _save(fig, folder, "pareto")


def memory_unit(df: pd.DataFrame) -> str:
    """The memory axis: "peak memory (MB)", in decode "memory held (MB)" (columns.MEMORY)."""
    modes = set(df["mode"].astype(str)) if "mode" in df and not df.empty else set()
    if modes == {columns.DECODE}:
        return "memory held (MB)"
    return "memory (MB)" if columns.DECODE in modes else "peak memory (MB)"


def memory_note(df: pd.DataFrame) -> str:
    """What the memory drawn counts: "memory held: cache or state + step peak", "memory: peak
    beyond q, k, v"."""
    counts = memory_counts(df)
    return counts if counts.startswith("memory") else f"memory: {counts}"


def single_n(df: pd.DataFrame) -> bool:
    """Whether every setting of the sweep has one n only (then the report draws bars)."""
    if df.empty:
        return False
    return bool((df.groupby("setting", sort=False).seq_len.nunique() <= 1).all())


def _bar_value(r, metric: str, col: str) -> tuple[float, str]:
    """(the bar's value, or NaN and why it has none)."""
    if r.status != "ok":
        return math.nan, str(r.status)
    if metric == "error" and r.family in NOT_COMPARABLE:
        return math.nan, "not softmax"
    v = float(r[col]) if pd.notna(r[col]) else math.nan
    if math.isfinite(v) and v > 0:
        return v, ""
    if metric == "error":
        return math.nan, "no reference"
    if metric == "memory" and r.get("mode") == columns.DECODE and pd.isna(r.get("state_bytes")):
        return math.nan, columns.NO_STATE
    return math.nan, "not measured" if metric != "speedup" else "no baseline"


def bar_plot(df, styles, metric: str, folder: Path, baseline: str | None = None) -> list[Path]:
    """One n per setting: `metric` (latency, error, speedup, memory) per label as bars on a log
    axis, one panel per setting, each bar in its label's family colour with its value on top;
    hollow: noisy or contended (latency, speedup); a red ×: failed its implementation check."""
    col, unit = {"latency": ("latency_ms", "median latency (ms)"),
                 "error": ("softmax_rel_error", "error vs exact attention"),
                 "speedup": ("speedup", f"speedup vs {baseline} (×)"),
                 "memory": ("mem_mb", memory_unit(df))}[metric]
    pairs = df[["family", "label"]].drop_duplicates().sort_values(["family", "label"])
    labels = list(pairs.label)
    keys = sorted({(s, n) for s, n in zip(df.setting, df.seq_len, strict=True)}) or [("", 0)]
    width = max(PANEL[0], 0.42 * len(labels) + 1.3)
    fig, axes = _panels([f"{s} n={n}" for s, n in keys], max(1, min(3, int(10.9 // width))),
                        size=(width, 3.9), layout="constrained")
    for ax, (name, n) in zip(axes, keys, strict=True):
        sub = df[(df.setting == name) & (df.seq_len == n)]
        ax.set_yscale("log")
        trans = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
        drawn = []
        for i, label in enumerate(labels):
            rows = sub[sub.label == label]
            if rows.empty:
                continue
            r = rows.iloc[0]
            v, why = _bar_value(r, metric, col)
            if why:
                ax.text(i, 0.03, why, rotation=90, ha="center", va="bottom", fontsize=7.5,
                        color="0.4", transform=trans)
                continue
            st = styles[label]
            marked = metric in ("latency", "speedup") and bool(
                _is_marked(rows.iloc[:1], speedup=metric == "speedup").iloc[0])
            ax.bar(i, v, width=0.7, color="white" if marked else st["color"],
                   edgecolor=st["color"], lw=1.4)
            if metric == "latency" and pd.notna(r.latency_p10_ms) and pd.notna(r.latency_p90_ms):
                ax.errorbar(i, v, yerr=[[max(v - r.latency_p10_ms, 0)],
                                        [max(r.latency_p90_ms - v, 0)]],
                            color="0.25", capsize=2, lw=0.8)
            if not bool(impl_ok(rows.iloc[:1]).iloc[0]):
                ax.scatter([i], [v], marker="x", color="red", s=70, lw=1.6, zorder=5)
            ax.annotate(units.cell(v, 2), (i, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
            drawn.append(v)
        if drawn:
            lo, hi = min(drawn), max(drawn)
            if metric == "error":
                dtype = str(sub.dtype.iloc[0])
                lo, hi = min(lo, exact_tol(dtype)), max(hi, max(BUDGETS))
                _budget_lines(ax, dtype)
            if metric == "speedup":
                ax.axhline(1.0, color="black", lw=0.8)
                lo, hi = min(lo, 0.8), max(hi, 1.25)
            ax.set_ylim(lo / 3, hi * 4)  # room for the values above the bars
            _fix_axis(ax, "y", log_ticks(*ax.get_ylim()))
        else:
            ax.set_ylim(0.1, 10)
            ax.set_yticks([])
            _empty(ax, "no points ran" if metric != "error" else "no error measured")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        ax.grid(axis="x", visible=False)
        per = not sub.empty and (sub.per == "sequence").all()
        ax.set_ylabel(unit.replace(" (", " per sequence (") if per and metric in (
            "latency", "memory") else unit)
        ax.set_title(f"{name} n={n_label(n)}".strip(), fontsize=10, fontweight="bold")
    what = {"latency": "median latency (whiskers: p10–p90; hollow: noisy or contended)",
            "error": ("relative error vs float64 full softmax attention (dotted: the pick "
                      "table's exact, 1% and 10% budgets)"),
            "speedup": f"speedup over {baseline} (above 1: faster; hollow: noisy or "
                       f"contended, either side)",
            "memory": memory_note(df)}[metric]
    fig.suptitle(textwrap.fill(f"{what}, per variant at the sweep's one n (colours: families)",
                               max(40, int(fig.get_figwidth() * 14))), fontsize=10)
    return _save(fig, folder, metric)


def exponent_plot(scaling, styles, folder: Path) -> list[Path]:
    """Fitted exponents with 95% intervals (dots, bars) against declared ones (crosses)."""
    rows = max(1, int((scaling.metric == "latency").sum()))
    fig, axes = _panels(["latency", "memory"], ncols_max=2, size=(5.4, 1.2 + 0.3 * rows))
    for ax, metric in zip(axes, ["latency", "memory"], strict=True):
        sub = scaling[scaling.metric == metric].reset_index(drop=True)
        ticks = []
        for i, r in sub.iterrows():
            st = styles.get(r.label, dict(color="grey", marker="o"))
            tick = f"{r.label} {r.setting}".strip()
            ticks.append(tick)
            if math.isfinite(r.exponent):  # an unbounded interval drawn to the plot's edge
                lo, hi = max(r.ci_low, r.exponent - 5), min(r.ci_high, r.exponent + 5)
                ax.errorbar([r.exponent], [i], xerr=[[r.exponent - lo], [hi - r.exponent]],
                            fmt=st["marker"], color=st["color"], capsize=3)
            if math.isfinite(r.declared):
                ax.scatter([r.declared], [i], marker="x", color="black", zorder=3)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=8)
        if ticks:
            ax.set_ylim(len(ticks) - 0.5, -0.5)
        if sub.empty:
            _empty(ax, "nothing fitted")
        ax.set(xlabel=f"{metric} exponent (n^k)", title=f"{metric}: fitted (95% CI) vs declared ×")
    fig.tight_layout()
    return _save(fig, folder, "exponents")


def all_plots(df: pd.DataFrame, scaling: pd.DataFrame, baseline: str | None,
              folder: Path, cross: pd.DataFrame | None = None) -> list[tuple[str, list[Path]]]:
    """Write every figure into `folder`; returns (title, [png, svg]) pairs in page order."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    # labels are text: a `$` in a plugin's label must not start matplotlib's mathtext
    df, scaling = (f.assign(label=f.label.astype(str).str.replace("$", r"\$", regex=False))
                   for f in (df, scaling))
    if cross is not None and not cross.empty:
        cross = cross.assign(label=cross.label.astype(str).str.replace("$", r"\$", regex=False))
    if "memory_bytes" not in df:  # a frame of records only
        df = df.assign(memory_bytes=columns.memory_bytes(df))
    df = df.assign(setting=setting_names(df), mem_mb=units.to_mb(df.memory_bytes))
    names = setting_names(scaling) if not scaling.empty else pd.Series(dtype=str)
    scaling = scaling.assign(setting=names)
    styles = label_styles(df)
    if cross is not None and not cross.empty:
        cross = cross.assign(setting=setting_names(cross))
    if single_n(df):  # nothing to draw against n nor to fit: bars
        out = [("Latency per variant (one n)", bar_plot(df, styles, "latency", folder)),
               ("Error vs exact attention per variant (one n)",
                bar_plot(df, styles, "error", folder))]
        if baseline:
            out.append((f"Speedup vs {baseline} per variant (one n)",
                        bar_plot(df, styles, "speedup", folder, baseline)))
        out.append((f"Memory per variant (one n; {memory_counts(df)})",
                     bar_plot(df, styles, "memory", folder)))
        return out
    out = [("Latency vs n, by family", scaling_plot(df, scaling, styles, "latency", folder,
                                                     baseline)),
           ("Error vs latency, per n", pareto_plot(df, styles, folder))]
    if baseline:
        out.append((f"Speedup vs {baseline}, by family",
                    speedup_plot(df, styles, baseline, folder, cross)))
    out.append((f"{memory_unit(df).split(' (')[0].capitalize()} vs n, by family",
                scaling_plot(df, scaling, styles, "memory", folder, baseline)))
    out.append(("Fitted vs declared exponents", exponent_plot(scaling, styles, folder)))
    return out
