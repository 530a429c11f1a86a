"""The report's figures (seaborn on the Agg backend), each written as PNG and SVG.

Colours are fixed per family (full: blues, local: greens, sparse: oranges, linear: purples,
lowrank: reds) with shades by label within a family, so a family reads the same in every plot and
every sweep. Panels split by setting (dtype / mode / device / causal / shape) when a sweep
varies it. Latency and speedup points that are noisy or contended (their latency may be inflated)
are drawn hollow. Where batch varies with n, latency and memory are per sequence, as fitted; the
dashed line is the fit, c + a·nᵏ or a·nᵏ (harness/scaling.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd
import seaborn as sns

from harness.scaling import SETTING
from harness.tables import setting_name

FAMILY_PALETTE = {"full": "Blues", "local": "Greens", "sparse": "Oranges", "linear": "Purples",
                  "lowrank": "Reds"}
OTHER_PALETTE = "Greys"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or folder name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "x"


def label_styles(df: pd.DataFrame) -> dict[str, dict]:
    """label → {color, marker}: family palette, shade by the label's rank within its family."""
    styles = {}
    pairs = df[["family", "label"]].drop_duplicates().sort_values(["family", "label"])
    for family, g in pairs.groupby("family"):
        labels = list(g.label)
        shades = sns.color_palette(FAMILY_PALETTE.get(family, OTHER_PALETTE), len(labels) + 1)
        shades = shades[1:][::-1]  # darkest first, skip the palest
        for i, label in enumerate(labels):
            styles[label] = dict(color=shades[i], marker=MARKERS[i % len(MARKERS)])
    return styles


def setting_names(df: pd.DataFrame) -> pd.Series:
    """One short name per row for the setting columns that vary in this sweep ("" if none)."""
    varying = [c for c in SETTING if c in df and df[c].nunique(dropna=False) > 1]
    if not varying:
        return pd.Series("", index=df.index)
    return df[varying].apply(
        lambda r: " ".join(setting_name(c, v) for c, v in zip(varying, r, strict=True)), axis=1)


def _save(fig, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _panels(names: list[str], ncols_max: int = 3, size=(5.2, 3.8)):
    k = max(1, len(names))
    ncols = min(k, ncols_max)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    flat = list(axes.flat)
    for ax in flat[k:]:
        ax.set_visible(False)
    return fig, flat[:k]


def _legend(fig, axes) -> None:
    """Tidy the layout (room for the suptitle), then one legend for all panels, to the right."""
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and not lab.startswith("_"):
                handles[lab] = h
                labels.append(lab)
    if handles:
        fig.legend([handles[lab] for lab in labels], labels, loc="upper left",
                   bbox_to_anchor=(1.0, 0.92), frameon=False, fontsize=8)


def _num(v: float) -> str:
    return f"{v:.0f}" if 10 <= abs(v) < 1e6 else f"{v:.3g}"


def tidy_log(ax, ns=None) -> None:
    """Plain numbers at 1-2-5 steps on log axes (the sweep's n on the x axis when given)."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _num(v)))
        axis.set_minor_formatter(ticker.NullFormatter())
    if ns is not None and 0 < len(ns) <= 12:
        ax.set_xticks(sorted(ns), [f"{n:g}" for n in sorted(ns)])


def _empty(ax, text="no points ran") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _hollow(ax, g, y, st, marked) -> None:
    """Hollow markers over the `marked` points of a line."""
    sel = g[marked]
    ax.scatter(sel.seq_len, sel[y], marker=st["marker"], s=30, zorder=3, lw=1.2,
               edgecolors=[st["color"]], facecolors="white")


def _is_marked(g, speedup: bool = False) -> pd.Series:
    marked = g.noisy.astype(bool) | g.contended.astype(bool)
    if speedup and "baseline_noisy" in g:
        mine = g.label != g.baseline
        marked |= mine & (g.baseline_noisy.astype(bool) | g.baseline_contended.astype(bool))
    return marked


def scaling_plot(df, scaling, styles, metric, folder: Path) -> list[Path]:
    """Latency (or peak memory) vs n on log–log axes, p10–p90 band and the fitted line."""
    col, unit = ("latency_ms", "median latency (ms)") if metric == "latency" else \
        ("peak_mb", "peak memory (MB)")
    ok = df[(df.status == "ok") & (df[col] > 0)]
    names = sorted(df.setting.unique()) or [""]
    fig, axes = _panels(names)
    for ax, name in zip(axes, names, strict=True):
        sub = ok[ok.setting == name]
        for label, g in sub.groupby("label"):
            g = g.sort_values("seq_len")
            st = styles[label]
            ax.plot(g.seq_len, g[col], marker=st["marker"], color=st["color"], label=label,
                    lw=1.2, ms=4)
            if metric == "latency":
                _hollow(ax, g, col, st, _is_marked(g))
            if metric == "latency":
                ax.fill_between(g.seq_len, g.latency_p10_ms, g.latency_p90_ms, color=st["color"],
                                alpha=0.2, lw=0)
            fit = scaling[(scaling.label == label) & (scaling.metric == metric)
                          & (scaling.setting == name)]
            for _, f in fit.iterrows():
                if not math.isfinite(f.exponent):
                    continue
                xs = np.geomspace(f.n_min, f.n_max, 20)
                const = f.const if math.isfinite(f.const) else 0.0
                ys = const + np.exp(f.intercept) * xs**f.exponent
                if metric == "memory":
                    ys = ys / 2**20
                ax.plot(xs, ys, ls="--", color=st["color"], lw=1, alpha=0.8,
                        label=f"_fit {label}")
        if sub.empty:
            _empty(ax)
        per = not sub.empty and (sub.per == "sequence").all()
        ax.set(xscale="log", yscale="log", xlabel="sequence length n",
               ylabel=unit.replace(" (", " per sequence (") if per else unit, title=name or None)
        tidy_log(ax, df.seq_len.unique())
    notes = ["per sequence where batch varies with n"] if (df.per == "sequence").any() else []
    notes += ["hollow: noisy or contended"] if metric == "latency" else []
    notes.append("dashed: the fit")
    fig.suptitle(f"{unit.split(' (')[0]} vs n\n({'; '.join(notes)})", fontsize=10)
    _legend(fig, axes)
    return _save(fig, folder, metric)


def speedup_plot(df, styles, baseline: str, folder: Path) -> list[Path]:
    ok = df[(df.status == "ok") & np.isfinite(df.speedup)]
    names = sorted(df.setting.unique()) or [""]
    fig, axes = _panels(names)
    for ax, name in zip(axes, names, strict=True):
        sub = ok[ok.setting == name]
        for label, g in sub.groupby("label"):
            g = g.sort_values("seq_len")
            st = styles[label]
            ax.plot(g.seq_len, g.speedup, marker=st["marker"], color=st["color"], label=label,
                    lw=1.2, ms=4)
            _hollow(ax, g, "speedup", st, _is_marked(g, speedup=True))
        if sub.empty:
            _empty(ax, "no baseline points")
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="sequence length n",
               ylabel=f"speedup vs {baseline} (×)", title=name or None)
        tidy_log(ax, df.seq_len.unique())
    fig.suptitle(f"speedup over {baseline} (above 1: faster; hollow: noisy or contended, either "
                 f"side)", fontsize=10)
    _legend(fig, axes)
    return _save(fig, folder, "speedup")


def pareto_plot(df, styles, folder: Path) -> list[Path]:
    """Relative error vs latency, one panel per setting × n: lower-left is better."""
    ok = df[(df.status == "ok") & np.isfinite(df.rel_error) & (df.latency_ms > 0)]
    keys = sorted({(s, n) for s, n in zip(df.setting, df.seq_len, strict=True)}) or [("", 0)]
    names = [f"{s} n={n}".strip() for s, n in keys]
    fig, axes = _panels(names, ncols_max=4, size=(4.2, 3.4))
    for ax, (name, n) in zip(axes, keys, strict=True):
        sub = ok[(ok.setting == name) & (ok.seq_len == n)]
        for label, g in sub.groupby("label"):
            st = styles[label]
            err = g.rel_error.clip(lower=1e-12)
            ax.scatter(g.latency_ms, err, color=st["color"], marker=st["marker"], label=label,
                       s=36)
        if sub.empty:
            _empty(ax, "no error measured")
        else:  # at least a decade, so a labelled tick shows
            err = sub.rel_error.clip(lower=1e-12)
            ax.set_ylim(err.min() / 3, err.max() * 3)
        ax.set(xscale="log", yscale="log", xlabel="median latency (ms)",
               ylabel="relative error", title=f"{name} n={n}".strip())
        tidy_log(ax)
    fig.suptitle("error vs latency (lower left is better)", fontsize=10)
    _legend(fig, axes)
    return _save(fig, folder, "pareto")


def exponent_plot(scaling, styles, folder: Path) -> list[Path]:
    """Fitted exponents with 95% intervals (dots, bars) against declared ones (crosses)."""
    rows = max(1, int((scaling.metric == "latency").sum()))
    fig, axes = _panels(["latency", "memory"], ncols_max=2, size=(6.0, 1.2 + 0.35 * rows))
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
              folder: Path) -> list[tuple[str, list[Path]]]:
    """Write every figure into `folder`; returns (title, [png, svg]) pairs in page order."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    df = df.assign(setting=setting_names(df), peak_mb=df.peak_mem_bytes / 2**20)
    names = setting_names(scaling) if not scaling.empty else pd.Series(dtype=str)
    scaling = scaling.assign(setting=names)
    styles = label_styles(df)
    out = [
        ("Latency vs n", scaling_plot(df, scaling, styles, "latency", folder)),
        ("Peak memory vs n", scaling_plot(df, scaling, styles, "memory", folder)),
    ]
    if baseline:
        out.append((f"Speedup vs {baseline}", speedup_plot(df, styles, baseline, folder)))
    out.append(("Error vs latency (Pareto view)", pareto_plot(df, styles, folder)))
    out.append(("Fitted vs declared exponents", exponent_plot(scaling, styles, folder)))
    return out
