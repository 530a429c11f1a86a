"""The `attnbench` command: a Hydra app for sweeps, plus `report`, `compare` and `list`.

    attnbench                                  # the default sweep for this machine
    attnbench -m variant=full variant.backend=naive,sdpa seq_len=1024,2048
    attnbench seq_len=4096 variant=local       # one point, printed as a line
    attnbench report DIR | compare A B | list
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, RunConfig, fail, from_dictconfig

log = logging.getLogger("attnbench")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# `attnbench <name> ...` runs `<module>.main(argv) -> int` instead of a sweep.
SUBCOMMANDS = {"report": "harness.report", "compare": "harness.compare", "list": "harness.listing"}
# resume=true keeps these outcomes; the others (skipped, oom, error, invalid) may change on a
# second try (another cap, a free machine, a fixed bug) and are measured again.
KEPT_ON_RESUME = ("ok", "unsupported")


def point_folder_of(run: RunConfig) -> str:
    """The folder of a point inside its sweep folder: readable + its identity (`point_id`)."""
    import variants
    from harness.records import point_folder
    from harness.sweep import point_id

    try:
        label = variants.build(run.variant, **run.params).label
    except Exception:  # a point that fails to build still gets its folder (and an error row)
        label = run.variant
    return point_folder(label, run.seq_len, run.dtype, run.mode, run.causal, point_id(run))


def _point_folder_resolver(*, _root_: DictConfig) -> str:
    return point_folder_of(from_dictconfig(_root_))


# `hydra.sweep.subdir: ${attnbench_point:}` (conf/config.yaml): each job's folder is named by what
# it measures, under any sweeper and launcher (jobs import this module to run `sweep_job`).
OmegaConf.register_new_resolver("attnbench_point", _point_folder_resolver, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def sweep_job(cfg: DictConfig) -> None:
    """One Hydra job = one point: validate, measure, write the record, print one line."""
    from harness import progress
    from harness.records import RECORD_FILE, read_record, write_record
    from harness.sweep import point_id, run_point

    try:
        run = from_dictconfig(cfg)
    except ConfigError as exc:
        fail(str(exc))
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    job_num = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    if run.resume and (out_dir / RECORD_FILE).exists():
        try:
            old = read_record(out_dir / RECORD_FILE)
        except ValueError:
            old = None
        if old is not None and old.point_id == point_id(run) and old.status in KEPT_ON_RESUME:
            print(f"{progress.line(old, job_num)} (kept from an earlier run)", flush=True)
            return
    record = run_point(run)
    write_record(record, out_dir)
    print(progress.line(record, job_num), flush=True)


def precheck(overrides: list[str], multirun: bool = False) -> None:
    """Compose and check a config before Hydra starts: one line per problem. For a multirun,
    the first point of the sweep (each swept key at its first value): Hydra composes that
    config before the sweeper runs, and would fail on it with a dump; the sweeper checks
    every point afterwards."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import check_writable, explain_hydra_error

    try:
        if multirun:
            overrides = first_point(overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        fail(explain_hydra_error(exc))
    try:
        from_dictconfig(cfg)
        if not multirun:  # the sweeper checks the sweep folder
            check_writable(Path(str(cfg.hydra.run.dir)).parent, "hydra.run.dir")
    except ConfigError as exc:
        fail(str(exc))


def first_point(overrides: list[str]) -> list[str]:
    """The overrides with every sweep (a,b,c / glob / range) replaced by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()), None)
            except Exception:  # glob() needs the group's options: the sweeper checks it
                continue
            if first is not None:
                out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def default_sweep() -> str:
    import torch

    return "default_gpu" if torch.cuda.is_available() else "default_cpu"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        raise SystemExit(module.main(argv[1:]))
    if not argv:
        argv = ["--multirun", f"+sweep={default_sweep()}"]
    flags = [a for a in argv if a.startswith("-")]
    if not flags:  # a single run: check before Hydra starts
        precheck(argv)
    elif set(flags) <= {"-m", "--multirun"}:
        precheck([a for a in argv if a not in flags], multirun=True)
    sys.argv = [sys.argv[0], *argv]
    sweep_job()


if __name__ == "__main__":
    main()
