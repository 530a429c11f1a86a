"""One progress line per finished point: `[k/N] label n=… → median ms (p10–p90), peak MB, status`
followed by an estimate of the time left. The status of a point that ran is `ok`, or `contended`
where other processes took a real share of the machine while it was timed (its latency is not a
measurement of the variant alone).

k is Hydra's job number + 1. N is the number of jobs the attnbench sweeper split the sweep into
(it calls `start` before launching). The count and the start time live in this process, which is
where the basic launcher runs its jobs; under a launcher that runs jobs elsewhere (joblib,
submitit) or another sweeper, N and the estimate are left out and the line starts with `[k]`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from attnbench.harness.records import Record

log = logging.getLogger("attnbench")
_state: dict[str, Any] = {"total": None, "start": None}


def start(total: int | None) -> None:
    """Called by the attnbench sweeper once it has split the sweep into its `total` jobs."""
    _state.update(total=total, start=time.monotonic())


def _duration(s: float) -> str:
    s = max(0, round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_line(record: Record) -> str:
    """The record's line, its `ok` said as `contended` where the record is contended."""
    text = record.line()
    if record.status == "ok" and record.contended:
        text, said = re.subn(r", ok( \(noisy\))?$", r", contended\1", text)
        text += "" if said else " (contended)"
    return text


def line(record: Record, job_num: int | None) -> str:
    """The progress line of a finished point (job_num: Hydra's 0-based job number)."""
    if job_num is None:
        return status_line(record)
    k, total = job_num + 1, _state["total"]
    if not total or _state["start"] is None or k > total:
        return f"[{k}] {status_line(record)}"
    elapsed = time.monotonic() - _state["start"]
    left = elapsed / k * (total - k)
    eta = ", done" if k == total else f", ~{_duration(left)} left"
    return f"[{k}/{total}] {status_line(record)}{eta}"
