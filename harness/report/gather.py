"""Gather the records of a sweep folder into one tidy `results.csv`.

results.csv has one schema, whoever writes it: one row per point, every record field (`FIELDS`, in
the record's order), then the derived columns `DERIVED`:

- spread: (p90 − p10) / median latency; peak_mem_mb: peak memory in MB (2**20 bytes);
- memory_bytes, memory_mb: the memory the report compares (columns.memory_bytes): in decode the
  cache or state plus the step's peak (what a deployment holds), otherwise the peak; NaN for a
  decode point whose record has no state_bytes;
- speedup = baseline latency / latency and memory_ratio = memory / baseline memory, against the
  baseline at the same shape and setting (columns.SETTING); NaN for a point that did not run, or
  with no baseline point to compare with;
- baseline_noisy, baseline_contended: that baseline point's marks; baseline: its label ("" when
  the sweep has none).

`gather` (after every sweep, before the report) writes it against the default baseline
(full[sdpa], else the first full-attention label); the report (build.py) rewrites it, the same
columns, against the baseline it was given. So a report step that fails still leaves a complete
results.csv, and the `baseline` column says what the ratios are against.

Several sweeps may write into one folder at once (each point into its own folder, atomically);
whoever gathers holds the folder's lock, so the last one to gather writes a `results.csv` read
after every record that was written before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from attnbench.harness.records import (
    FIELDS,
    Record,
    atomic_write_text,
    load_records,
    remove_stale_temps,
)
from attnbench.harness.report.columns import SETTING, memory_bytes
from attnbench.harness.units import to_mb

RESULTS_CSV = "results.csv"
DEFAULT_BASELINE = "full[sdpa]"
DERIVED = ["spread", "peak_mem_mb", "memory_bytes", "memory_mb", "speedup", "memory_ratio",
           "baseline_noisy", "baseline_contended", "baseline"]
LOCK_FILE = ".attnbench.lock"
_held: dict[Path, int] = {}  # folders this process holds the lock of (re-entrant)


@contextlib.contextmanager
def sweep_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of sweep folder `root` (blocking; re-entrant in one process)."""
    root = Path(root).resolve()
    if root in _held:
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[root] = 1
        try:
            yield
        finally:
            del _held[root]
    finally:
        os.close(fd)  # releases the lock


def records_frame(root: str | os.PathLike) -> pd.DataFrame:
    """Every valid record below `root` as a DataFrame, one row per point (latest kept): the
    record fields only (FIELDS), numeric columns numeric even with no rows."""
    rows = [r.to_dict() for r in load_records(root)]
    df = pd.DataFrame(rows, columns=FIELDS)
    if df.empty:
        return df.astype({f.name: f.type for f in dataclasses.fields(Record)
                          if f.type in ("int", "float", "bool")})
    # One folder per point id, so a point appears once; records copied in from elsewhere (or
    # folders of an older layout) may repeat one: the newest record wins.
    df = df.sort_values("timestamp").drop_duplicates("point_id", keep="last")
    df = df.sort_values(["variant", "label", "dtype", "mode", "causal", "seq_len"])
    return df.reset_index(drop=True)


class BaselineError(ValueError):
    """The baseline asked for is not in the sweep."""


def choose_baseline(df: pd.DataFrame, wanted: str | None) -> str | None:
    """`wanted` if given (must be in the sweep); else full[sdpa], else the first full label."""
    labels = set(df.label) if not df.empty else set()
    if wanted is not None:
        if wanted not in labels:
            known = ", ".join(sorted(labels)) or "none"
            raise BaselineError(f"baseline {wanted!r} is not in this sweep (labels: {known})")
        return wanted
    if DEFAULT_BASELINE in labels:
        return DEFAULT_BASELINE
    full = sorted(df.label[df.family == "full"].unique()) if not df.empty else []
    return full[0] if full else None


def with_derived(df: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """`df` (records) with the DERIVED columns added, against `baseline` at the same SETTING."""
    df = df.copy()
    df["spread"] = (df.latency_p90_ms - df.latency_p10_ms) / df.latency_ms
    df["peak_mem_mb"] = to_mb(df.peak_mem_bytes)
    df["memory_bytes"] = memory_bytes(df)
    df["memory_mb"] = to_mb(df.memory_bytes)
    df["speedup"] = math.nan
    df["memory_ratio"] = math.nan
    df["baseline_noisy"] = df["baseline_contended"] = False
    if baseline and not df.empty:
        key = list(SETTING)
        base = df[(df.label == baseline) & (df.status == "ok")][
            [*key, "latency_ms", "memory_bytes", "noisy", "contended"]
        ].drop_duplicates(key).rename(columns={"noisy": "noisy_b", "contended": "contended_b"})
        m = df[key].merge(base, on=key, how="left", suffixes=("", "_b"))
        ok = (df.status == "ok").to_numpy()
        df.loc[ok, "speedup"] = (m.latency_ms.to_numpy() / df.latency_ms.to_numpy())[ok]
        df.loc[ok, "memory_ratio"] = (df.memory_bytes.to_numpy()
                                      / m.memory_bytes.to_numpy())[ok]
        for flag in ("noisy", "contended"):
            df[f"baseline_{flag}"] = m[f"{flag}_b"].fillna(False).astype(bool).to_numpy()
    df["baseline"] = baseline or ""
    return df


def gather(root: str | os.PathLike) -> Path:
    """Write `root/results.csv` (the schema of the module docstring, against the default
    baseline) atomically from every record below `root`, under the folder's lock, after removing
    temp files left by killed writers; returns its path."""
    root = Path(root)
    with sweep_lock(root):
        remove_stale_temps(root)
        raw = records_frame(root)
        df = with_derived(raw, choose_baseline(raw, None))
        return atomic_write_text(root / RESULTS_CSV, df.to_csv(index=False))
