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

MEMORY: what the report's memory (the memory table and plot, memory ratio, the leanest pick, the
memory fit and crossover, `compare`) and `attnbench pick`'s max_memory count, defined here once
(`memory_bytes` for a frame, `held_bytes` for one row): in mode=decode what a deployment holds,
the cache or recurrent state (state_bytes) plus the step's peak beyond its inputs; in every other
mode the call's peak beyond q, k, v (peak_mem_bytes). A decode point without state_bytes (a
record from before it was measured) has no memory (NaN): said, never guessed as its peak alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

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


DECODE = "decode"
MEMORY_WHAT = {DECODE: "memory held: cache or state + step peak"}
PEAK_WHAT = "peak beyond q, k, v"
NO_STATE = "no state"  # a decode point whose record has no state_bytes


def memory_what(mode: str) -> str:
    """What the memory of a point in `mode` counts, as the report's titles and sentences say."""
    return MEMORY_WHAT.get(str(mode), PEAK_WHAT)


def memory_bytes(df: pd.DataFrame) -> pd.Series:
    """The memory of each row (MEMORY in the module docstring): state_bytes + peak_mem_bytes in
    decode, peak_mem_bytes otherwise; NaN for a decode row without state_bytes."""
    peak = pd.to_numeric(df["peak_mem_bytes"], errors="coerce").astype(float)
    state = (pd.to_numeric(df["state_bytes"], errors="coerce").astype(float) if "state_bytes"
             in df else pd.Series(math.nan, index=df.index))
    decode = (df["mode"] == DECODE) if "mode" in df else pd.Series(False, index=df.index)
    return peak.where(~decode, peak + state)


def held_bytes(row: Mapping) -> float:
    """`memory_bytes` of one row (a dict, e.g. a results.csv row)."""
    peak = _num(row.get("peak_mem_bytes"))
    return peak + _num(row.get("state_bytes")) if row.get("mode") == DECODE else peak


def missing_state(df: pd.DataFrame) -> pd.Series:
    """Decode rows that ran with a peak but no state_bytes: their memory is unknown."""
    if "mode" not in df:
        return pd.Series(False, index=df.index)
    state = (pd.to_numeric(df["state_bytes"], errors="coerce") if "state_bytes" in df
             else pd.Series(math.nan, index=df.index))
    return (df["mode"] == DECODE) & state.isna()


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
