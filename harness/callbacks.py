"""Hydra callback: gather every job's record when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("attnbench")


class GatherRecords(Callback):
    """on_multirun_end: write `<sweep dir>/results.csv` (and the report) from the job records."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.gather import gather

        sweep_dir = Path(config.hydra.sweep.dir)
        path = gather(sweep_dir)
        log.info("attnbench: gathered %s", path)
