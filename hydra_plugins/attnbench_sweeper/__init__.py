"""attnbench's Hydra sweeper (`hydra/sweeper=attnbench`): Hydra's basic sweeper, plus a check
of every point before any point runs.

`ValidatingSweeper` composes and type-checks the config of every job of the sweep (Hydra's own
sweeper composes them; we also run `from_dictconfig`) before launching the first one, so a bad
value in the 200th point stops the sweep at once, with one line naming the field. It also
checks that the sweep folder is writable and, for `resume=true`, that a folder was named.
"""

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from harness import progress
from harness.config import (
    ConfigError,
    check_writable,
    explain_hydra_error,
    fail,
    from_dictconfig,
)


@dataclass
class ValidatingSweeperConf:
    _target_: str = "hydra_plugins.attnbench_sweeper.ValidatingSweeper"
    # no `from __future__ import annotations` here: Hydra's plugin scan needs real types
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[dict[str, str]] = None  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="attnbench", node=ValidatingSweeperConf)


class ValidatingSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]):
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        existed = sweep_dir.exists()
        try:
            check_writable(sweep_dir, "hydra.sweep.dir")
            if self.config.get("resume") and not _named_sweep_dir(self.config):
                raise ConfigError(
                    "resume=true: name the sweep folder to resume with hydra.sweep.dir=DIR"
                )
            return super().sweep(arguments)
        except ConfigError as exc:  # Hydra would print a traceback hint; one line is enough
            if not existed:  # nothing ran: leave no empty sweep folder behind
                shutil.rmtree(sweep_dir, ignore_errors=True)
            fail(str(exc))

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        for overrides in batch:
            try:
                cfg = loader.load_sweep_config(self.config, list(overrides))
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(explain_hydra_error(exc)) from None
            from_dictconfig(cfg)
        if self.batch_index == 1:  # the first batch: the whole sweep's size, and its start
            progress.start(sum(len(b) for b in self.overrides or [batch]))


def _named_sweep_dir(config: DictConfig) -> bool:
    return any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
