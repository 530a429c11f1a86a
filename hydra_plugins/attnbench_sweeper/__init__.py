"""attnbench's Hydra sweeper (`hydra/sweeper=attnbench`): Hydra's basic sweeper (the same
cartesian product of the overrides, the same batches of `max_batch_size`), plus:

- every point of the sweep is composed and type-checked (`from_dictconfig`) before the first one
  runs, whatever the batch size, so a bad value in the 200th point stops the sweep at once with
  one line naming the field; then the sweep folder is checked writable (and, for `resume=true`,
  named). Nothing is created before these checks pass, and nothing is ever deleted.
- points that measure the same thing (same `point_id`) run once;
- a job that raises does not stop the later batches, and the records of every point that ran
  are gathered into results.csv and the report before the error is re-raised (Hydra skips
  `on_multirun_end` after a job error).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness import progress
from harness.config import (
    ConfigError,
    check_writable,
    explain_hydra_error,
    fail,
    from_dictconfig,
)

log = logging.getLogger("attnbench")


@dataclass
class ValidatingSweeperConf:
    _target_: str = "hydra_plugins.attnbench_sweeper.ValidatingSweeper"
    # no `from __future__ import annotations` in this file: Hydra's plugin scan needs real types
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[dict[str, str]] = None  # noqa: UP045

ConfigStore.instance().store(group="hydra/sweeper", name="attnbench", node=ValidatingSweeperConf)


class ValidatingSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            points = self._checked_points(arguments)
            if self.config.get("resume") and not _named_sweep_dir(self.config):
                raise ConfigError(
                    "resume=true: name the sweep folder to resume with hydra.sweep.dir=DIR"
                )
            check_writable(sweep_dir, "hydra.sweep.dir")  # the first thing that creates it
        except ConfigError as exc:  # Hydra would print a traceback hint; one line is enough
            fail(str(exc))
        size = self.max_batch_size if self.max_batch_size not in (None, -1) else len(points)
        self.overrides = [points[i : i + size] for i in range(0, len(points), size)]
        self.batch_index = 0
        _save_yaml(self.config, sweep_dir / "multirun.yaml")
        progress.start(len(points))
        returns: list[list[JobReturn]] = []
        failed: list[JobReturn] = []
        try:
            while not self.is_done():
                batch = self.get_job_batch()
                results = list(self.launcher.launch(batch, initial_job_idx=_done(returns)))
                failed += [r for r in results if r.status == JobStatus.FAILED]
                returns.append(results)
        except BaseException:
            _finish(sweep_dir)
            raise
        if failed:
            log.error("attnbench: %d of %d jobs raised; results.csv and the report hold every "
                      "point that wrote a record", len(failed), len(points))
            _finish(sweep_dir)
            _ = failed[0].return_value  # re-raises the first job's exception, as Hydra does
        return returns

    def _checked_points(self, arguments: list[str]) -> list[list[str]]:
        """Every point's overrides, each composed and checked; duplicates (same point id) once."""
        from harness.sweep import point_id

        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        everything = self.split_arguments(overrides, None)[0]
        points, seen = [], set()
        for point in everything:
            try:
                cfg = loader.load_sweep_config(self.config, list(point))
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(explain_hydra_error(exc)) from None
            pid = point_id(from_dictconfig(cfg))
            if pid not in seen:
                seen.add(pid)
                points.append(point)
        if len(points) < len(everything):
            log.info("attnbench: points that measure the same thing run once (%d distinct)",
                     len(points))
        return points


def _done(returns: list[list[JobReturn]]) -> int:
    return sum(len(r) for r in returns)


def _finish(sweep_dir: Path) -> None:
    """Gather and report what ran; never masks the error that brought us here."""
    from harness.callbacks import finish_sweep

    try:
        finish_sweep(sweep_dir)
    except Exception:
        log.exception("attnbench: gathering %s failed; run `attnbench report %s`",
                      sweep_dir, sweep_dir)


def _save_yaml(config: DictConfig, path: Path) -> None:
    from harness.records import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(config))  # concurrent sweeps: never torn


def _named_sweep_dir(config: DictConfig) -> bool:
    return any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
