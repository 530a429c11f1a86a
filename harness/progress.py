"""One progress line per finished point: `[k/N] label n=… → median ms (p10–p90), peak MB, status`
followed by an estimate of the time left.

k is Hydra's job number + 1. N is counted once, in the multirun callback's `on_multirun_start`,
the way Hydra's BasicSweeper counts its jobs: the sweeper's `params` and the command-line
overrides are parsed with Hydra's own OverridesParser (glob() and range() expanded through the
config loader) and split with `BasicSweeper.split_arguments`. The count and the start time live
in this process, which is where the basic launcher runs its jobs; under a launcher that runs jobs
elsewhere (joblib, submitit) or another sweeper, N and the estimate are left out and the line
starts with `[k]`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from harness.records import Record

log = logging.getLogger("attnbench")
BASIC_SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.attnbench_sweeper.ValidatingSweeper",  # the basic sweeper + checks
)
_state: dict[str, Any] = {"total": None, "start": None}


def count_jobs(config: Any) -> int | None:
    """How many jobs the basic sweeper will launch for this multirun config (None: unknown)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if config.hydra.sweeper.get("_target_") not in BASIC_SWEEPERS:
            return None
        params = config.hydra.sweeper.get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()]
        args += list(config.hydra.overrides.task)
        loader = GlobalHydra.instance().config_loader() if \
            GlobalHydra.instance().is_initialized() else None
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(args)
        batches = BasicSweeper.split_arguments(overrides, None)
        return sum(len(b) for b in batches)
    except Exception as exc:  # progress is a nicety: never let it break a sweep
        log.debug("attnbench: could not count the sweep's jobs: %s", exc)
        return None


def start(config: Any) -> None:
    _state.update(total=count_jobs(config), start=time.monotonic())


def _duration(s: float) -> str:
    s = max(0, round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def line(record: Record, job_num: int | None) -> str:
    """The progress line of a finished point (job_num: Hydra's 0-based job number)."""
    if job_num is None:
        return record.line()
    k, total = job_num + 1, _state["total"]
    if not total or _state["start"] is None or k > total:
        return f"[{k}] {record.line()}"
    elapsed = time.monotonic() - _state["start"]
    left = elapsed / k * (total - k)
    eta = ", done" if k == total else f", ~{_duration(left)} left"
    return f"[{k}/{total}] {record.line()}{eta}"
