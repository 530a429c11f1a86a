"""The Hydra task: one job = one point. Composed by Hydra from conf/ (under any sweeper and
launcher), checked into a RunConfig, measured where `isolate` says (`job.measure`: no point can
end the sweep), written as one record in the folder named by what it measures, printed as one
progress line."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from attnbench.harness.records import Record
from attnbench.harness.run.compose import CONF_DIR
from attnbench.harness.run.config import ConfigError, RunConfig, fail, from_dictconfig

# A sweep or run with a point ending so exits 1 (the others are answers: a point too big, an
# out-of-memory, a variant that cannot run it).
FAILED = ("error", "invalid")
# resume=true keeps these outcomes; the others (skipped, oom, error, invalid) may change on a
# second try (another cap, a free machine, a fixed bug) and are measured again.
KEPT_ON_RESUME = ("ok", "unsupported")


def point_folder_of(run: RunConfig) -> str:
    """The folder of a point inside its sweep folder: readable + its identity (`point_id`)."""
    from attnbench.harness.records import point_folder
    from attnbench.harness.run.point import point_id, point_label

    return point_folder(point_label(run), run.seq_len, run.dtype, run.mode, run.causal,
                        point_id(run))


def _point_folder_resolver(*, _root_: DictConfig) -> str:
    return point_folder_of(from_dictconfig(_root_))


# `hydra.sweep.subdir: ${attnbench_point:}` (conf/config.yaml): each job's folder is named by what
# it measures, under any sweeper and launcher (jobs import this module to run `sweep_job`).
OmegaConf.register_new_resolver("attnbench_point", _point_folder_resolver, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def sweep_job(cfg: DictConfig) -> Record:
    """One Hydra job = one point: validate, measure, write the record, print one line.

    In a sweep the record goes to `<sweep folder>/<point folder>` whatever `hydra.sweep.subdir`
    says (the layout is attnbench's: `report` reads the point folders directly under the sweep
    folder). A record that cannot be written raises NotWritten, which ends the sweep. A single
    run whose point ends `error` or `invalid` exits 1 with a last line saying so."""
    from attnbench.harness.records import RECORD_FILE, NotWritten, read_record, write_record
    from attnbench.harness.run import interrupt, progress
    from attnbench.harness.run.job import measure
    from attnbench.harness.run.point import point_id

    interrupt.check()  # a Ctrl-C of the sweep that Python dropped: no further point starts
    try:
        run = from_dictconfig(cfg)
    except ConfigError as exc:
        fail(str(exc))
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # hydra.sweep.dir as Hydra reads it: from the folder the command started in (runtime.cwd)
    out_dir = Path(hc.runtime.cwd, str(hc.sweep.dir), point_folder_of(run)) if multirun else \
        Path(hc.runtime.output_dir)
    job_num = hc.job.num if multirun else None
    if run.resume and (out_dir / RECORD_FILE).exists():
        try:
            old = read_record(out_dir / RECORD_FILE)
        except ValueError:
            old = None
        if old is not None and old.point_id == point_id(run) and old.status in KEPT_ON_RESUME:
            print(f"{progress.line(old, job_num)} (kept from an earlier run)", flush=True)
            return old
    record = measure(run)
    try:
        write_record(record, out_dir)
    except OSError as exc:
        raise NotWritten(out_dir / RECORD_FILE, exc) from None
    print(progress.line(record, job_num), flush=True)
    if not multirun and record.status in FAILED:
        print(f"attnbench: the point failed: {record.label} n={record.seq_len} "
              f"({record.status})", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return record
