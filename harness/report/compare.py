"""`attnbench compare A B`: two sweeps side by side, point by point.

Points match on label, setting and seed (columns.POINT: label; batch, heads, kv_heads, q_len,
seq_len, head_dim, dtype, device, mode, causal, inputs; seed): seed 0 is not seed 1.
ratio = B latency / A latency (above 1: B is slower); memory ratio = B memory / A memory, the
memory the report compares (columns.memory_bytes: in decode the cache or state plus the step's
peak, otherwise the peak beyond q, k, v). A change counts only beyond the measured
spread: "slower" when B's p10 is above A's p90 (the p10–p90 intervals do not overlap), "faster"
when B's p90 is below A's p10; otherwise "same".
A point that ran in A and failed in B is "now <status>" and counts as a regression, as does a
point of A that B lacks ("missing in B"). `--fail-on-regression` exits 1 when any point
regressed; a folder that does not exist or holds no readable record is one line and exit 2.

Each point also shows its error against exact attention on each side (softmax_rel_error, against
float64 full softmax attention; "no reference" where none was computed, "not softmax" for the
recurrent family), the kernel that ran ("A → B" when it changed: a silent backend fallback, e.g.
sdpa:flash_cpu → sdpa:math, is a common cause of a regression) and a note when either side
failed its implementation check (impl_ok false: a point that passed in A and fails in B is a
regression, whatever its speed), was contended (other processes took a real share of the CPU:
its latency may be inflated) or noisy. Kernel changes, failed checks and contended points are
counted in the printed summary.

Everything is written into a new folder — `--out`, default `compare-<A>-vs-<B>-<timestamp>` beside
B — never into A or B (a sweep folder holds only its own records and report): compare.csv,
compare.md, the ratio plot (compare.png, .svg) and index.html, a page with the summary, the plot
and the table.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from datetime import datetime
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from attnbench.harness.records import make_writable_folder
from attnbench.harness.report import columns, html
from attnbench.harness.report.gather import records_frame
from attnbench.harness.report.pick import NOT_COMPARABLE
from attnbench.harness.report.plots import label_styles, safe_name, tidy_log
from attnbench.harness.report.tables import Table, markdown
from attnbench.harness.units import cell

KEY = list(columns.POINT)  # a point: its label, setting and seed (columns.py)
COLS = ["family", "status", "latency_ms", "latency_p10_ms", "latency_p90_ms", "peak_mem_bytes",
        "memory_bytes", "kernel", "noisy", "contended", "softmax_rel_error", "impl_error",
        "impl_ok"]


def verdict(r) -> str:
    if not isinstance(r.status_b, str):  # measured in A, absent from B
        return "missing in B"
    if r.status_a == "ok" and r.status_b != "ok":
        return f"now {r.status_b}"
    if r.status_a != "ok" and r.status_b == "ok":
        return "now ok"
    if r.status_a != "ok":
        return r.status_b
    if r.latency_p10_ms_b > r.latency_p90_ms_a:
        return "slower"
    if r.latency_p90_ms_b < r.latency_p10_ms_a:
        return "faster"
    return "same"


def _kernel(r) -> str:
    a, b = (k if isinstance(k, str) else "" for k in (r.kernel_a, r.kernel_b))
    return f"{a} → {b}" if a and b and a != b else b or a


def _true(v) -> bool:
    return isinstance(v, bool | np.bool_) and bool(v)  # NaN (a record without the flag): no


def _failed(v) -> bool:
    return isinstance(v, bool | np.bool_) and not bool(v)  # NaN (no such point): not failed


def _note(r) -> str:
    notes = ["kernel changed"] if r.kernel_changed else []
    sides = [s for s in ("A", "B") if _failed(getattr(r, f"impl_ok_{s.lower()}"))]
    if sides:
        notes.append(f"implementation check failed in {' and '.join(sides)}")
    for flag in ("contended", "noisy"):
        sides = [s for s in ("A", "B") if _true(getattr(r, f"{flag}_{s.lower()}"))]
        if sides:
            notes.append(f"{flag} in {' and '.join(sides)}")
    return ", ".join(notes)


def error_cell(r, side: str) -> str:
    """One side's error against exact attention (softmax_rel_error), or why it has none."""
    if getattr(r, f"status_{side}") != "ok":
        return ""
    if r.family in NOT_COMPARABLE:
        return "not softmax"
    e = getattr(r, f"softmax_rel_error_{side}")
    return cell(e, 2) if isinstance(e, float) and math.isfinite(e) else "no reference"


def compare_frames(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per point of A (with B's, or "missing in B"), with ratios and a verdict; a point
    of A that B lacks, or that ran in A and not in B, is a regression."""
    a, b = (f.assign(memory_bytes=columns.memory_bytes(f)) for f in (a, b))
    m = a[KEY + COLS].merge(b[KEY + COLS], on=KEY, suffixes=("_a", "_b"), how="left")
    m["family"] = m.family_a
    m["ratio"] = m.latency_ms_b / m.latency_ms_a
    m["memory_ratio"] = m.memory_bytes_b / m.memory_bytes_a
    m["verdict"] = [verdict(r) for r in m.itertuples()] if not m.empty else []
    ka, kb = m.kernel_a.fillna("").astype(str), m.kernel_b.fillna("").astype(str)
    m["kernel_changed"] = (ka != "") & (kb != "") & (ka != kb)
    m["kernel"] = [_kernel(r) for r in m.itertuples()] if not m.empty else []
    m["note"] = [_note(r) for r in m.itertuples()] if not m.empty else []
    m["impl_broke"] = [not _failed(r.impl_ok_a) and _failed(r.impl_ok_b)
                       for r in m.itertuples()] if not m.empty else []
    m["regression"] = (m.verdict == "slower") | (m.verdict == "missing in B") | (
        m.verdict.str.startswith("now ") & (m.verdict != "now ok")) | m.impl_broke.astype(bool)
    return m.sort_values(KEY).reset_index(drop=True)


def ratio_table(m: pd.DataFrame, name_a: str, name_b: str) -> Table:
    t = Table(f"B = {name_b} vs A = {name_a}",
              ["label", "setting", "n", "A ms", "B ms", "ratio", "memory ratio", "verdict",
               "A error", "B error", "kernel", "note"],
              note="ratio = B/A latency (above 1: slower); verdict beyond the p10–p90 spread; "
                   "error: against float64 full softmax attention (softmax_rel_error; 'no "
                   "reference' where none was computed); memory ratio = B/A memory (decode: "
                   "cache or state + step peak; otherwise peak beyond q, k, v); an "
                   "implementation check that fails "
                   "in B and passed in A is a regression; kernel: the one that ran, A → B when "
                   "it changed; contended: other processes took a real share of the CPU, the "
                   "latency may be inflated.")
    for r in m.itertuples():
        setting = f"{r.dtype} {r.mode} {r.device}{' causal' if r.causal else ''} " \
                  f"b{r.batch} h{r.heads} d{r.head_dim}"
        t.rows.append([r.label, setting, str(r.seq_len), cell(r.latency_ms_a),
                       cell(r.latency_ms_b), cell(r.ratio), cell(r.memory_ratio), r.verdict,
                       error_cell(r, "a"), error_cell(r, "b"), r.kernel, r.note])
    return t


def ratio_plot(m: pd.DataFrame, name_a: str, name_b: str, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", font_scale=0.85)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ok = m[np.isfinite(m.ratio)]
    styles = label_styles(ok) if not ok.empty else {}
    for label, g in ok.groupby("label"):
        g = g.sort_values("seq_len")
        st = styles[label]
        ax.plot(g.seq_len, g.ratio, color=st["color"], marker=st["marker"], label=label, lw=1.2)
        flagged = g[g.verdict.isin(["slower", "faster"])]
        ax.scatter(flagged.seq_len, flagged.ratio, s=120, facecolors="none",
                   edgecolors="red", lw=1.5, zorder=3)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    if ok.empty:
        ax.text(0.5, 0.5, "no common points", ha="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1), frameon=False, fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="sequence length n",
           ylabel=f"latency {name_b} / {name_a}",
           title="ratio per point (circled: beyond the p10–p90 spread)")
    tidy_log(ax, m.seq_len.unique())
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def default_out(a: Path, b: Path) -> Path:
    """A new folder beside B: compare-<A>-vs-<B>-<timestamp>, with -2, -3 … if it exists."""
    a, b = a.resolve(), b.resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = b.parent / f"compare-{safe_name(a.name)}-vs-{safe_name(b.name)}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def page(name_a: str, name_b: str, lines: list[str], table: Table, plot: list[Path]) -> str:
    """index.html of a comparison: the summary lines, the ratio plot, the table."""
    title = f"attnbench compare: B = {name_b} vs A = {name_a}"
    body = [f"<h1>{escape(title)}</h1>", "<ul>"]
    body += [f"<li>{escape(x)}</li>" for x in lines]
    body.append("</ul>")
    body.append(html.image("B / A latency per point", plot))
    body.append(html.table_html(table))
    return html.document(title, "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnbench compare",
                                description="Compare two sweeps point by point (B against A).")
    p.add_argument("a", type=Path, help="the reference sweep folder")
    p.add_argument("b", type=Path, help="the sweep to judge")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: a new folder beside B, "
                        "compare-<A>-vs-<B>-<timestamp>); never inside A or B")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 1 when any point got slower beyond the spread (or now fails)")
    args = p.parse_args(argv)
    frames = []
    for folder in (args.a, args.b):
        if not folder.is_dir():
            print(f"attnbench: error: {folder} is not a folder", file=sys.stderr)
            return 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames.append(records_frame(folder))
        for w in caught:
            print(str(w.message), file=sys.stderr)
        if frames[-1].empty:
            print(f"attnbench: error: no readable records in {folder}", file=sys.stderr)
            return 2
    out = args.out or default_out(args.a, args.b)
    for folder in (args.a, args.b):
        if inside(out, folder):
            print(f"attnbench: error: --out {out} is inside the sweep {folder}: write the "
                  f"comparison elsewhere", file=sys.stderr)
            return 2
    why = make_writable_folder(out)
    if why:
        flag = "--out " if args.out is not None else ""
        hint = "" if args.out is not None else "; name another folder with --out"
        print(f"attnbench: error: {flag}{out}: cannot write there ({why}){hint}",
              file=sys.stderr)
        return 2
    try:
        return _write_comparison(args, frames, out)
    except OSError as exc:  # a full or read-only disk midway
        print(f"attnbench: error: the comparison could not be written into {out} "
              f"({exc.strerror or exc})", file=sys.stderr)
        return 1


def _write_comparison(args, frames: list[pd.DataFrame], out: Path) -> int:
    name_a, name_b = args.a.resolve().name, args.b.resolve().name
    m = compare_frames(*frames)
    m.to_csv(out / "compare.csv", index=False)
    table = ratio_table(m, name_a, name_b)
    text = markdown(table)
    (out / "compare.md").write_text(text, encoding="utf-8")
    plot = ratio_plot(m, name_a, name_b, out / "compare")
    print(text)
    only_a = int((m.verdict == "missing in B").sum())
    matched = len(m) - only_a
    only_b = len(frames[1]) - matched
    counts = m[m.verdict != "missing in B"].verdict.value_counts().to_dict()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no common points"
    lines = [f"{matched} matched points ({summary}); {only_a} only in {name_a}, {only_b} only in "
             f"{name_b}"]
    changed = m[m.kernel_changed]
    if len(changed):
        lines.append(f"{len(changed)} point(s) ran another kernel in {name_b} (a silent backend "
                     f"fallback is a common cause of a regression): " + "; ".join(
                         f"{r.label} n={r.seq_len} {r.kernel}" for r in changed.itertuples()))
    broke = m[m.impl_broke.astype(bool)]
    if len(broke):
        lines.append(f"{len(broke)} point(s) fail their implementation check in {name_b} and "
                     f"passed in {name_a} (a regression: B computes something else): " + "; ".join(
                         f"{r.label} n={r.seq_len}" for r in broke.itertuples()))
    contended = int((m.contended_a.fillna(False).astype(bool)
                     | m.contended_b.fillna(False).astype(bool)).sum())
    if contended:
        lines.append(f"{contended} point(s) contended in A or B: their latency may be inflated; "
                     f"measure them again on a quiet machine before trusting a verdict")
    geo = m.ratio[np.isfinite(m.ratio)]
    if len(geo):
        lines.append(f"geometric mean ratio {math.exp(np.log(geo).mean()):.3f}")
    (out / "index.html").write_text(page(name_a, name_b, lines, table, plot), encoding="utf-8")
    lines[0] += f"; wrote {out}"
    for line in lines:
        print(f"attnbench: {line}")
    regressions = int(m.regression.sum())
    if regressions and args.fail_on_regression:
        print(f"attnbench: {regressions} regression(s)", file=sys.stderr)
        return 1
    return 0
