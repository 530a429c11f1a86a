"""The record columns that name a setting, defined once, and which of them vary in a sweep.

SETTING: what a point measured apart from the variant — its shape and setting. Two points with
the same label and the same SETTING values are the same question. Every consumer derives its
list from it, so a setting column added to the record is added here once:

- speedup and memory ratio (gather.with_derived): the baseline at the same SETTING;
- `compare` (compare.KEY): POINT, i.e. label + SETTING + seed;
- the pick table (pick.KEYS): SETTING with seq_len, mode, causal, dtype, device first (pick.csv's
  column order, and the order its rows and sentences are sorted in);
- fits and crossovers (scaling.SETTING): SETTING less seq_len (fits run over n), dtype, mode,
  device, causal first, plus `tokens` (the budget B·n of a per-sequence fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from attnbench.harness.records import FIELDS

SETTING = ("batch", "heads", "kv_heads", "q_len", "seq_len", "head_dim", "dtype", "device", "mode",
           "causal", "inputs")
# A point as the records name it: its label, its setting and its seed (the inputs it drew). Two
# sweeps' points match on these columns (`compare`); seed 0 and seed 1 are two points.
POINT = ("label", *SETTING, "seed")
if not set(POINT) <= set(FIELDS):  # a renamed record field must be renamed here too
    raise ImportError(f"setting columns {sorted(set(POINT) - set(FIELDS))} are not record "
                      f"fields")


def setting(first: Sequence[str] = (), drop: Iterable[str] = (),
            extra: Sequence[str] = ()) -> list[str]:
    """SETTING reordered for a consumer: `first` leading, in that order, then the rest in
    SETTING's order, less `drop`, then `extra` (derived columns, e.g. tokens)."""
    unknown = [c for c in first if c not in SETTING]
    if unknown:
        raise ValueError(f"{unknown} are not setting columns")
    dropped = set(drop)
    rest = [c for c in SETTING if c not in first]
    return [c for c in (*first, *rest) if c not in dropped] + list(extra)


def varying(df: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    """The `columns` present in `df` that take more than one value there (a missing value counts
    as one), in the order given."""
    return [c for c in columns if c in df and df[c].nunique(dropna=False) > 1]
