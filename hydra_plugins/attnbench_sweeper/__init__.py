"""attnbench's Hydra sweeper (`hydra/sweeper=attnbench`), a thin adapter over
`attnbench.harness.run.compose`: Hydra's basic sweeper (the same cartesian product of the
overrides, the same batches of `max_batch_size`), plus:

- every point of the sweep is composed and checked before the first one runs (`checked_points`),
  whatever the batch size, so a bad value in the 200th point stops the sweep at once with one
  line naming the field; then the sweep folder is checked writable (and, for `resume=true`,
  named). Nothing is created before these checks pass, and nothing is ever deleted.
- points that measure the same thing (same point id) run once;
- a job that raises does not stop the later batches, and the records of every point that ran
  are gathered into results.csv and the report before the error is re-raised (Hydra skips
  `on_multirun_end` after a job error);
- Ctrl-C keeps what was measured and prints the command that resumes, built from the overrides
  Hydra saved with the sweep.

Nothing in attnbench imports this module; Hydra finds it through the `hydra_plugins` namespace.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from attnbench.harness.run import progress
from attnbench.harness.run.compose import check_sweep_folder, checked_points
from attnbench.harness.run.config import ConfigError, fail

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
        assert self.hydra_context is not None
        try:
            checked = checked_points(self.config, self.hydra_context.config_loader,
                                     [*self._parse_config(), *arguments])
            sweep_dir = check_sweep_folder(self.config)  # the first thing that creates it
        except ConfigError as exc:  # Hydra would print a traceback hint; one line is enough
            fail(str(exc))
        points = [p.overrides for p in checked]
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
        except KeyboardInterrupt:  # Ctrl-C: keep what was measured, say how to go on
            _interrupted(sweep_dir, self.config)
        except BaseException:
            _finish(sweep_dir)
            raise
        if failed:
            log.error("attnbench: %d of %d jobs raised; results.csv and the report hold every "
                      "point that wrote a record", len(failed), len(points))
            _finish(sweep_dir)
            _ = failed[0].return_value  # re-raises the first job's exception, as Hydra does
        return returns


def _done(returns: list[list[JobReturn]]) -> int:
    return sum(len(r) for r in returns)


def _finish(sweep_dir: Path) -> None:
    """Gather and report what ran; never masks the error that brought us here."""
    from attnbench.harness.callbacks import finish_sweep

    try:
        finish_sweep(sweep_dir)
    except Exception:
        log.exception("attnbench: gathering %s failed; run `attnbench report %s`",
                      sweep_dir, sweep_dir)


def _interrupted(sweep_dir: Path, config: DictConfig) -> None:
    """After Ctrl-C: results.csv and the report of what was measured, how many points were
    kept and the exact command that resumes; exit 130 (128 + SIGINT), no traceback."""
    import signal
    import sys

    from attnbench.harness.records import find_records

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not tear the gather
    _finish(sweep_dir)
    kept = len(find_records(sweep_dir))
    command = resume_command(config, sweep_dir)
    print(f"attnbench: interrupted; {kept} point(s) kept in {sweep_dir} (results.csv and the "
          f"report are written). Resume with:\n  {command}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _save_yaml(config: DictConfig, path: Path) -> None:
    from attnbench.harness.records import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(config))  # concurrent sweeps: never torn


def resume_command(config: DictConfig, sweep_dir: Path) -> str:
    """The command that resumes this sweep, from the overrides Hydra saved with it (the task's,
    presets included, and Hydra's own less the sweep folder): pastes into a shell as it is."""
    import shlex

    task = [str(o) for o in config.hydra.overrides.task]
    own = [str(o) for o in config.hydra.overrides.hydra
           if not str(o).startswith(("hydra.sweep.dir=", "hydra.mode="))]
    args = [o for o in [*task, *own] if not o.startswith("resume=")]
    return shlex.join(["attnbench", "-m", *args, "resume=true", f"hydra.sweep.dir={sweep_dir}"])
