"""attnbench's Hydra sweeper (`hydra/sweeper=attnbench`): Hydra's basic sweeper (the same
cartesian product of the overrides, the same batches of `max_batch_size`), plus:

- every point of the sweep is composed and type-checked (`from_dictconfig`) before the first one
  runs, whatever the batch size, so a bad value in the 200th point stops the sweep at once with
  one line naming the field; then the sweep folder is checked writable (and, for `resume=true`,
  named). Nothing is created before these checks pass, and nothing is ever deleted.
- a variant parameter (`variant.window=64,256`) applies to each selected variant that has it; a
  variant without it ignores it, and a parameter that none of them has is a one-line error;
- points that measure the same thing (same `point_id`) run once;
- a job that raises does not stop the later batches, and the records of every point that ran
  are gathered into results.csv and the report before the error is re-raised (Hydra skips
  `on_multirun_end` after a job error).

`checked_points` and `check_sweep_folder` are what `attnbench plan` runs too.
"""

import dataclasses
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
    RunConfig,
    check_writable,
    explain_hydra_error,
    fail,
    from_dictconfig,
    unknown_key,
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
            _interrupted(sweep_dir)
        except BaseException:
            _finish(sweep_dir)
            raise
        if failed:
            log.error("attnbench: %d of %d jobs raised; results.csv and the report hold every "
                      "point that wrote a record", len(failed), len(points))
            _finish(sweep_dir)
            _ = failed[0].return_value  # re-raises the first job's exception, as Hydra does
        return returns


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the overrides its job is launched with, and its checked config."""

    overrides: list[str]
    run: RunConfig
    point_id: str


def checked_points(config: DictConfig, loader: Any, arguments: list[str]) -> list[Point]:
    """Every point of the sweep `arguments` (the sweeper's params, then the command line),
    composed and checked, in order; points that measure the same thing once. Raises ConfigError
    (one line) for the first bad point.

    Args:
        config: the sweep's master config (Hydra's, or one composed the same way).
        loader: Hydra's config loader (globs need the config groups).
        arguments: overrides, sweeps included (`seq_len=512,1024`, `variant=glob(*)`).
    """
    from harness.sweep import point_id

    parser = OverridesParser.create(config_loader=loader)
    try:
        overrides = parser.parse_overrides(arguments)
        everything = BasicSweeper.split_arguments(overrides, None)[0]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_hydra_error(exc)) from None
    everything = fit_variant_params(config, loader, everything)
    points, seen = [], set()
    for point in everything:
        try:
            cfg = loader.load_sweep_config(config, list(point))
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(explain_hydra_error(exc)) from None
        run = from_dictconfig(cfg)
        pid = point_id(run)
        if pid not in seen:
            seen.add(pid)
            points.append(Point(list(point), run, pid))
    if len(points) < len(everything):
        log.info("attnbench: points that measure the same thing run once (%d distinct)",
                 len(points))
    return points


def is_variant_param(override: str) -> bool:
    """`variant.window=64` (a plain override of a variant's parameter, not `variant.name`)."""
    key = override.split("=", 1)[0]
    return key.startswith("variant.") and key != "variant.name" and "@" not in key


def fit_variant_params(config: DictConfig, loader: Any,
                       points: list[list[str]]) -> list[list[str]]:
    """Each point without the variant parameters its variant does not have: in
    `variant=local,strided,full variant.window=64,256`, `window` sets local's and strided's window
    and full ignores it (its otherwise identical points then measure the same thing: run once).
    Raises ConfigError naming a parameter that no selected variant has."""
    if not any(is_variant_param(o) for point in points for o in point):
        return points
    default = str(config.hydra.runtime.choices.get("variant", ""))
    params: dict[str, Optional[set[str]]] = {}  # noqa: UP045 - option → its parameters
    used: set[str] = set()
    asked: dict[str, None] = {}
    out = []
    for point in points:
        choice = next((o.split("=", 1)[1] for o in reversed(point)
                       if o.split("=", 1)[0] == "variant"), default)
        if choice not in params:
            params[choice] = _params_of(config, loader, choice)
        have = params[choice]
        kept = []
        for o in point:
            if is_variant_param(o):
                key = o.split("=", 1)[0].removeprefix("variant.")
                asked[key] = None
                if have is not None and key not in have:
                    continue
                used.add(key)
            kept.append(o)
        out.append(kept)
    for key in asked:
        if key not in used:
            allowed = set().union(*(p for p in params.values() if p is not None))
            names = ", ".join(sorted(c for c, p in params.items() if p is not None))
            raise ConfigError(unknown_key(f"variant.{key}", allowed, f"parameter of {names}"))
    return out


def _params_of(config: DictConfig, loader: Any, choice: str) -> Optional[set[str]]:  # noqa: UP045
    """The parameters of the variant config `variant/<choice>.yaml` (None: it does not compose,
    and the point's own check will say why)."""
    import variants

    try:
        cfg = loader.load_sweep_config(config, [f"variant={choice}"] if choice else [])
        node = OmegaConf.to_container(cfg.variant, resolve=False)
        name = node.pop("name")
        try:
            return {f.name for f in dataclasses.fields(variants.get(name))}
        except KeyError:
            return set(node)
    except Exception:  # a bad option: left to the point's own composition and check
        return None


def check_sweep_folder(config: DictConfig, create: bool = True) -> Path:
    """The sweep folder, checked: `resume=true` needs it named; it must be writable (`create`:
    by creating it and writing a probe; otherwise only looked at, nothing created)."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if config.get("resume") and not _named_sweep_dir(config):
        raise ConfigError("resume=true: name the sweep folder to resume with hydra.sweep.dir=DIR")
    check_writable(sweep_dir, "hydra.sweep.dir", create=create)
    return sweep_dir


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


def _interrupted(sweep_dir: Path) -> None:
    """After Ctrl-C: results.csv and the report of what was measured, how many points were
    kept and the exact command that resumes; exit 130 (128 + SIGINT), no traceback."""
    import shlex
    import signal
    import sys

    from harness.cli import USER_ARGV
    from harness.records import find_records

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not tear the gather
    _finish(sweep_dir)
    kept = len(find_records(sweep_dir))
    typed = USER_ARGV or sys.argv[1:]
    args = [a for a in typed if not a.startswith(("resume=", "hydra.sweep.dir="))]
    if "-m" not in args and "--multirun" not in args:
        args.insert(0, "-m")
    command = shlex.join(["attnbench", *args, "resume=true", f"hydra.sweep.dir={sweep_dir}"])
    print(f"attnbench: interrupted; {kept} point(s) kept in {sweep_dir} (results.csv and the "
          f"report are written). Resume with:\n  {command}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _save_yaml(config: DictConfig, path: Path) -> None:
    from harness.records import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(config))  # concurrent sweeps: never torn


def _named_sweep_dir(config: DictConfig) -> bool:
    return any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
