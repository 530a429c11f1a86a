"""Gather the job records of a sweep folder into one tidy `results.csv`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from harness.records import FIELDS, load_records

RESULTS_CSV = "results.csv"


def records_frame(root: str | os.PathLike) -> pd.DataFrame:
    """Every valid record below `root` as a DataFrame, one row per point (latest kept)."""
    rows = [r.to_dict() for r in load_records(root)]
    df = pd.DataFrame(rows, columns=FIELDS)
    if not df.empty:
        # A point measured twice (a resumed sweep) appears once: the newest record wins.
        df = df.sort_values("timestamp").drop_duplicates("point_id", keep="last")
        df = df.sort_values(["variant", "label", "dtype", "mode", "causal", "seq_len"])
    return df.reset_index(drop=True)


def gather(root: str | os.PathLike) -> Path:
    """Write `root/results.csv` atomically from the records below `root`; returns its path."""
    root = Path(root)
    df = records_frame(root)
    path = root / RESULTS_CSV
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        df.to_csv(f, index=False)
    os.replace(tmp, path)
    return path
