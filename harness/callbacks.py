"""Hydra callback: gather every job's record and write the report when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("attnbench")


class GatherRecords(Callback):
    """on_multirun_end: write `<sweep dir>/results.csv` and the report from the job records."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.gather import gather

        sweep_dir = Path(config.hydra.sweep.dir)
        path = gather(sweep_dir)
        log.info("attnbench: gathered %s", path)
        try:
            from harness.report import build_report

            rep = build_report(sweep_dir)
        except Exception:  # the records and results.csv are safe; `attnbench report` redoes it
            log.exception("attnbench: the report failed; rerun `attnbench report %s`", sweep_dir)
            return
        log.info("attnbench: report of %d points (%d bad records skipped): %s", rep.used,
                 len(rep.skipped), rep.folder / "index.html")
