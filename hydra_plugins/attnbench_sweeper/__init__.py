"""attnbench's Hydra sweeper (`hydra/sweeper=attnbench`), a thin adapter over
`attnbench.harness.run.compose`: Hydra's basic sweeper (the same cartesian product of the
overrides, the same batches of `max_batch_size`), plus:

- every point of the sweep is composed and checked before the first one runs (`checked_points`),
  whatever the batch size, so a bad value in the 200th point stops the sweep at once with one
  line naming the field; then the sweep folder is checked writable (and, for `resume=true`,
  named). Nothing is created before these checks pass, and nothing is ever deleted.
- points that measure the same thing (same point id) run once;
- the sweep ends with results.csv and the report, written here (the callback then has nothing to
  do), and its exit status: 1, with a last line naming them, when a point ended `error` or
  `invalid` or left no record (a job that raised: its traceback is logged) or when the results
  could not be written; 0 when every point is ok, oom, skipped or unsupported (`conclude`);
- a record that cannot be written (a full disk) stops the sweep at once: what was written is
  kept, and the resume command is printed (exit 1);
- Ctrl-C keeps what was measured and prints the command that resumes, built from the overrides
  Hydra saved with the sweep; one that Python drops (it landed in a weakref callback) still
  stops the sweep where the next point starts (`harness.run.interrupt`).

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

from attnbench.harness.records import NotWritten
from attnbench.harness.run import interrupt, progress, worker
from attnbench.harness.run.compose import Point, check_sweep_folder, checked_points
from attnbench.harness.run.config import ConfigError, fail
from attnbench.harness.run.task import FAILED

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
        try:
            _save_yaml(self.config, sweep_dir / "multirun.yaml")
        except OSError as exc:
            fail(f"hydra.sweep.dir={str(sweep_dir)!r}: cannot write there "
                 f"({exc.strerror or exc})", code=1)
        progress.start(len(points))
        returns: list[list[JobReturn]] = []
        failed: list[JobReturn] = []
        with interrupt.catching():  # a Ctrl-C that Python drops is raised again (`check`)
            try:
                while not self.is_done():
                    batch = self.get_job_batch()
                    results = list(self.launcher.launch(batch, initial_job_idx=_done(returns)))
                    failed += [r for r in results if r.status == JobStatus.FAILED]
                    returns.append(results)
                interrupt.check()  # one dropped while the last point ran
            except KeyboardInterrupt:  # Ctrl-C: keep what was measured, say how to go on
                _interrupted(sweep_dir, self.config)
            except (NotWritten, OSError) as exc:  # a full or read-only disk: stop, keep, say so
                _not_written(sweep_dir, self.config, exc)
            except BaseException:
                _finish(sweep_dir)
                raise
            finally:
                worker.shutdown()
            for r in failed:  # a job raised outside its point's guard: a bug of attnbench's
                log.error("attnbench: job %s raised", r.overrides, exc_info=_exception(r))
            try:
                problem = _finish(sweep_dir)
                interrupt.check()
            except KeyboardInterrupt:  # Ctrl-C during the report: every record is written
                _report_interrupted(sweep_dir)
        conclude(sweep_dir, checked, problem)
        return returns


def conclude(sweep_dir: Path, checked: list[Point], problem: str) -> None:
    """Exit 1, with a last line naming them, when a point of this sweep ended `error` or
    `invalid` or left no record, or when results.csv and the report could not be written;
    return (exit 0) when every point is ok, oom, skipped or unsupported."""
    import sys
    import warnings

    from attnbench.harness.records import load_records

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad records: the report names them
        records = {r.point_id: r for r in load_records(sweep_dir)}
    bad = []
    for p in checked:
        rec = records.get(p.point_id)
        if rec is None:
            bad.append(f"{p.point_id} ({' '.join(p.overrides)}): no record")
        elif rec.status in FAILED:
            bad.append(f"{rec.label} n={rec.seq_len} ({rec.status})")
    if problem:
        print(f"attnbench: error: {problem}", file=sys.stderr, flush=True)
    if bad:
        shown = "; ".join(bad[:MAX_NAMED]) + (f"; and {len(bad) - MAX_NAMED} more"
                                              if len(bad) > MAX_NAMED else "")
        print(f"attnbench: {len(bad)} of {len(checked)} points failed: {shown} (reasons in "
              f"{sweep_dir / 'results.csv'})", file=sys.stderr, flush=True)
    if bad or problem:
        raise SystemExit(1)


MAX_NAMED = 10  # failed points named in the last line


def _exception(r: JobReturn) -> BaseException | None:
    try:
        _ = r.return_value  # re-raises the job's exception
    except BaseException as exc:
        return exc
    return None


def _done(returns: list[list[JobReturn]]) -> int:
    return sum(len(r) for r in returns)


def _finish(sweep_dir: Path) -> str:
    """Gather and report what ran; "" or what could not be written (never raises)."""
    from attnbench.harness.callbacks import finish_sweep

    try:
        return finish_sweep(sweep_dir)
    except Exception as exc:
        log.exception("attnbench: gathering %s failed", sweep_dir)
        return f"gathering {sweep_dir} failed ({type(exc).__name__}: {exc}); run `attnbench " \
               f"report {sweep_dir}`"


def _interrupted(sweep_dir: Path, config: DictConfig) -> None:
    """After Ctrl-C: results.csv and the report of what was measured, how many points were
    kept and the exact command that resumes; exit 130 (128 + SIGINT), no traceback."""
    import signal
    import sys

    from attnbench.harness.records import find_records

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not tear the gather
    worker.shutdown()
    problem = _finish(sweep_dir)
    kept = len(find_records(sweep_dir))
    command = resume_command(config, sweep_dir)
    written = problem or "results.csv and the report are written"
    print(f"attnbench: interrupted; {kept} point(s) kept in {sweep_dir} ({written}). Resume "
          f"with:\n  {command}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _report_interrupted(sweep_dir: Path) -> None:
    import sys

    print(f"attnbench: interrupted while writing the report; every point is kept in "
          f"{sweep_dir} (each file written is whole): run `attnbench report {sweep_dir}`",
          file=sys.stderr, flush=True)
    raise SystemExit(130)


def _not_written(sweep_dir: Path, config: DictConfig, exc: BaseException) -> None:
    """A record (or Hydra's own files) could not be written: stop at once — every later point
    would be measured for nothing — keep what was written, say how to resume; exit 1."""
    import sys

    from attnbench.harness.records import find_records

    worker.shutdown()
    what = str(exc) if isinstance(exc, NotWritten) else \
        f"could not write in {sweep_dir} ({getattr(exc, 'strerror', None) or exc})"
    _finish(sweep_dir)  # on a full disk this fails too; the records are what counts
    kept = len(find_records(sweep_dir))
    print(f"attnbench: error: {what}; the sweep stopped with {kept} point(s) kept in "
          f"{sweep_dir}; free space, then resume with: {resume_command(config, sweep_dir)}",
          file=sys.stderr, flush=True)
    raise SystemExit(1)


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
