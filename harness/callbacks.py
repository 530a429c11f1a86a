"""Hydra callback: gather every job's record and write the report when a multirun ends."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("attnbench")
_finished: set[Path] = set()  # sweep folders this process has gathered (the sweeper's)


def finish_sweep(sweep_dir: str | Path) -> str:
    """results.csv and the report of `sweep_dir`, from every record in it, under the folder's
    lock (concurrent sweeps into one folder: the last to finish writes the complete table).
    Returns "" when both were written, else one line saying what was not (a full or read-only
    disk, a report that failed) and how to redo it; the records are never touched.

    Called by the attnbench sweeper when its jobs are done (or stopped), and by the callback
    under another sweeper."""
    from attnbench.harness.report.gather import gather, sweep_lock

    sweep_dir = Path(sweep_dir)
    _finished.add(sweep_dir.resolve())
    redo = f"the records are kept: run `attnbench report {sweep_dir}` once that is fixed"
    try:
        with sweep_lock(sweep_dir):
            path = gather(sweep_dir)
            log.info("attnbench: gathered %s", path)
            from attnbench.harness.report.build import build_report

            try:
                rep = build_report(sweep_dir)
            except OSError:
                raise
            except Exception as exc:  # results.csv is written; `attnbench report` redoes it
                log.exception("attnbench: the report failed")
                return f"the report of {sweep_dir} failed ({type(exc).__name__}: {exc}); {redo}"
    except OSError as exc:
        return f"results.csv and the report could not be written in {sweep_dir} " \
               f"({exc.strerror or exc}); {redo}"
    log.info("attnbench: report of %d points (%d bad records skipped): %s", rep.used,
             len(rep.skipped), rep.folder / "index.html")
    return ""


class GatherRecords(Callback):
    """on_multirun_end: write `<sweep dir>/results.csv` and the report from the job records
    (unless the attnbench sweeper has done it); exit 1 when they could not be written."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.resolve() in _finished:
            return
        problem = finish_sweep(sweep_dir)
        if problem:  # a SystemExit passes Hydra's callback guard, which would only warn
            print(f"attnbench: error: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(1)
