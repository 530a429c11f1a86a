"""Hydra callback: gather every job's record and write the report when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("attnbench")


def finish_sweep(sweep_dir: str | Path) -> None:
    """results.csv and the report of `sweep_dir`, from every record in it, under the folder's
    lock (concurrent sweeps into one folder: the last to finish writes the complete table).

    Called by the callback when a multirun ends, and by the attnbench sweeper when a job raised
    (Hydra then re-raises and skips `on_multirun_end`)."""
    from attnbench.harness.report.gather import gather, sweep_lock

    sweep_dir = Path(sweep_dir)
    with sweep_lock(sweep_dir):
        path = gather(sweep_dir)
        log.info("attnbench: gathered %s", path)
        try:
            from attnbench.harness.report.build import build_report

            rep = build_report(sweep_dir)
        except Exception:  # the records and results.csv are safe; `attnbench report` redoes it
            log.exception("attnbench: the report failed; rerun `attnbench report %s`", sweep_dir)
            return
    log.info("attnbench: report of %d points (%d bad records skipped): %s", rep.used,
             len(rep.skipped), rep.folder / "index.html")


class GatherRecords(Callback):
    """on_multirun_end: write `<sweep dir>/results.csv` and the report from the job records."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep(config.hydra.sweep.dir)
