"""Gather the records of a sweep folder into one tidy `results.csv`.

Several sweeps may write into one folder at once (each point into its own folder, atomically);
whoever gathers holds the folder's lock, so the last one to gather writes a `results.csv` read
after every record that was written before it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from harness.records import FIELDS, atomic_write_text, load_records, remove_stale_temps

RESULTS_CSV = "results.csv"
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
    """Every valid record below `root` as a DataFrame, one row per point (latest kept)."""
    rows = [r.to_dict() for r in load_records(root)]
    df = pd.DataFrame(rows, columns=FIELDS)
    if not df.empty:
        # One folder per point id, so a point appears once; records copied in from elsewhere
        # (or folders of an older layout) may repeat one: the newest record wins.
        df = df.sort_values("timestamp").drop_duplicates("point_id", keep="last")
        df = df.sort_values(["variant", "label", "dtype", "mode", "causal", "seq_len"])
    return df.reset_index(drop=True)


def gather(root: str | os.PathLike) -> Path:
    """Write `root/results.csv` atomically from every record below `root`, under the folder's
    lock, after removing temp files left by killed writers; returns its path."""
    root = Path(root)
    with sweep_lock(root):
        remove_stale_temps(root)
        df = records_frame(root)
        return atomic_write_text(root / RESULTS_CSV, df.to_csv(index=False))
