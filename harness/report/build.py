"""The report of one sweep folder: results.csv, pick.csv, scaling.csv, crossovers.csv, summary.md,
plots/, index.html. Written by the multirun callback and by `attnbench report DIR [--baseline
LABEL]`. It answers first: which variant to pick at each n for an error budget (report/pick.py).

results.csv is rewritten here in the schema gather.py writes (every record field, then speedup,
memory_ratio and the other derived columns: see report/gather.py), against the report's baseline.
Speedup = baseline latency / variant latency, memory ratio = variant peak / baseline peak, both at
the same shape and setting. Exponents and their two models, intervals, agreement, per-sequence
fits of token-budget sweeps and crossovers: see report/scaling.py. The report opens with how many
points ran noisy or contended; tables mark them (~, !), plots draw them hollow.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from attnbench.harness.records import atomic_write_text, find_records, make_writable_folder
from attnbench.harness.report import html, pick, plots, tables
from attnbench.harness.report.gather import (
    DEFAULT_BASELINE,
    RESULTS_CSV,
    BaselineError,
    choose_baseline,
    records_frame,
    with_derived,
)
from attnbench.harness.report.scaling import (
    AGREE_MARGIN,
    AGREE_WIDTH,
    CONST_MIN_POINTS,
    HEAD_FRACTION,
    MIN_POINTS,
    crossovers_table,
    fit_frame,
    scaling_table,
)

FILES = ["results.csv", "pick.csv", "scaling.csv", "crossovers.csv", "summary.md", "index.html"]

METHOD = (
    f"Exponents: with at least {CONST_MIN_POINTS} sizes, y = c + a·n^k (a constant for fixed "
    f"costs: workspaces, per-call overhead) fitted by least squares of relative residuals, used "
    f"when the constant is significant (F test, 95%), with a profile-likelihood 95% interval for "
    f"k; otherwise the least-squares slope of log(metric) on log(n) (a·n^k), 95% interval from "
    f"Student's t, leading points dropped while their local slope is under {HEAD_FRACTION:g}× "
    f"the slope between the two largest n; fewer than {MIN_POINTS} points give no exponent. The "
    f"'model' column says which. 'agrees': no if the declared exponent lies outside the interval "
    f"widened by {AGREE_MARGIN:g} each side; yes if inside and the half-width is at most "
    f"{AGREE_WIDTH:g}; inconclusive otherwise. Where batch varies with n (B·n held fixed), fits "
    f"and crossovers use latency and memory per sequence, grouped by the token budget. "
    f"Crossover 'from n≈X': the variant is better than the baseline (same n, same batch) at every "
    f"measured n from X on (X interpolated in log–log); otherwise the n where it is and is not."
)


@dataclass
class Report:
    folder: Path
    used: int
    skipped: list[str] = field(default_factory=list)
    baseline: str | None = None
    files: list[Path] = field(default_factory=list)


def sweep_command(folder: Path) -> str:
    """`attnbench -m <overrides>` rebuilt from Hydra's multirun.yaml ("" if there is none)."""
    path = folder / "multirun.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
        ov = cfg["hydra"]["overrides"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""
    hydra_ov = [o for o in ov.get("hydra") or [] if not o.startswith("hydra.mode=")]
    return shlex.join(["attnbench", "-m", *(ov.get("task") or []), *hydra_ov])


def machine(df: pd.DataFrame) -> dict[str, str]:
    def values(col: str) -> str:
        v = sorted({str(x) for x in df[col].dropna() if str(x) not in ("", "nan", "0")})
        return ", ".join(v) or "—"

    if df.empty:
        return {}
    return {
        "device": values("device_name"),
        "host": values("hostname"),
        "threads": values("threads"),
        "CPU allocator": values("allocator"),
        "torch": values("torch_version"),
        "CUDA": values("cuda_version"),
        "xformers": values("xformers_version"),
        "git sha": values("git_sha"),
        "measured": f"{df.timestamp.min()} … {df.timestamp.max()}",
    }


def _write(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)  # readable like any new file, never torn


def build_report(folder: str | os.PathLike, baseline: str | None = None,
                 out: str | os.PathLike | None = None) -> Report:
    """Write the whole report of the sweep in `folder` (into `out`, default the same folder).

    Bad records are skipped with a warning naming the file (re-issued here after counting).
    Raises BaselineError when an explicit `baseline` is not in the sweep.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = records_frame(folder)
    skipped = [str(w.message) for w in caught if "skipping record" in str(w.message)]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    base = choose_baseline(raw, baseline)
    df = with_derived(raw, base)  # results.csv: gather's schema, against this baseline
    rep = Report(out, used=len(df), skipped=skipped, baseline=base)

    picks = pick.pick_table(df)  # at the same shape: speedups as measured, never per sequence
    pts = fit_frame(df)  # per sequence where batch varies with n; what fits, tables, plots see
    scaling = scaling_table(pts)
    cross = crossovers_table(pts, base)
    for name, frame in [(RESULTS_CSV, df), ("pick.csv", picks), ("scaling.csv", scaling),
                        ("crossovers.csv", cross)]:
        rep.files.append(_write(out / name, frame.to_csv(index=False)))

    figs = plots.all_plots(pts, scaling, base, out / "plots", cross)
    rep.files += [p for _, paths in figs for p in paths]
    answer = pick.sentences(picks, base)
    pick_ts = tables.pick_tables(picks, base)
    sections = [
        ("Points", tables.point_tables(pts, base)),
        ("Scaling", tables.scaling_tables(scaling)),
        ("Crossovers and OOM frontier", tables.crossover_tables(cross, base)),
    ]
    warning = tables.marked_summary(df)
    intro = [p for p in [warning] if p] + [
        f"{len(df)} points from {folder} ({len(skipped)} bad records skipped); "
        f"baseline {base or 'none (no full-attention variant in the sweep)'}.",
        METHOD,
    ]
    heads = tables.headlines(pts, scaling, cross, base)
    command = sweep_command(folder)
    md = [f"# attnbench report: {folder.name}", ""]
    md += [f"{warning}\n"] if warning else []
    md += ["## Which attention to use", "", *[f"- {a}" for a in answer], ""]
    md += [tables.markdown(t) for t in pick_ts] + [pick.RULES, ""]
    md += ["## Plots", "", *[f"![{t}](plots/{paths[0].name})" for t, paths in figs], ""]
    md += ["## Headlines, variant by variant", "", *[f"- {h}" for h in heads], ""]
    for heading, ts in sections:
        md += [f"## {heading}", "", *[tables.markdown(t) for t in ts]]
    md += ["## How this was measured", "", *[f"{p}\n" for p in intro[1 if warning else 0:]]]
    if command:
        md += ["```", command, "```", ""]
    rep.files.append(_write(out / "summary.md", "\n".join(md) + "\n"))
    page = html.page(f"attnbench report: {folder.name}", intro, machine(df),
                     command or "(no multirun.yaml: command unknown)", sections, figs, heads,
                     answer=answer, picks=pick_ts, rules=pick.RULES)
    rep.files.append(_write(out / "index.html", page))
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnbench report",
                                description="Write the report of a sweep folder from its records.")
    p.add_argument("folder", type=Path, help="sweep folder (Hydra's hydra.sweep.dir)")
    p.add_argument("--baseline", default=None,
                   help=f"label to compare against (default {DEFAULT_BASELINE}, else any full)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: FOLDER)")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"attnbench: error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    if not find_records(args.folder):
        print(f"attnbench: error: no result.json records in {args.folder} (a sweep folder holds "
              f"one folder per point)", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.folder
    why = make_writable_folder(out)
    if why:
        flag = "--out" if args.out is not None else "the sweep folder"
        print(f"attnbench: error: {flag} {out}: cannot write there ({why})", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rep = build_report(args.folder, args.baseline, args.out)
        except BaselineError as exc:
            print(f"attnbench: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a full or read-only disk midway: the files written are whole
            print(f"attnbench: error: the report of {args.folder} could not be written into "
                  f"{out} ({exc.strerror or exc}); the records are untouched", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"attnbench: interrupted; the report of {args.folder} is incomplete (each "
                  f"file written is whole); run `attnbench report {args.folder}` again",
                  file=sys.stderr)
            return 130
    for w in caught:
        print(str(w.message), file=sys.stderr)
    print(f"attnbench: report of {args.folder}: used {rep.used} records, skipped "
          f"{len(rep.skipped)}; baseline {rep.baseline or 'none'}")
    print(f"attnbench: wrote {rep.folder / 'index.html'} (and {', '.join(FILES[:-1])}, plots/)")
    return 0
