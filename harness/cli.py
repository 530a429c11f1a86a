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
from omegaconf import DictConfig

from harness.config import ConfigError, from_dictconfig

log = logging.getLogger("attnbench")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# `attnbench <name> ...` runs `<module>.main(argv) -> int` instead of a sweep.
SUBCOMMANDS = {"report": "harness.report", "compare": "harness.compare", "list": "harness.listing"}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def sweep_job(cfg: DictConfig) -> None:
    """One Hydra job = one point: validate, measure, write the record, print one line."""
    from harness import progress
    from harness.records import write_record
    from harness.sweep import run_point

    try:
        run = from_dictconfig(cfg)
    except ConfigError as exc:
        fail(str(exc))
    record = run_point(run)
    hc = HydraConfig.get()
    write_record(record, Path(hc.runtime.output_dir))
    multirun = hc.mode == RunMode.MULTIRUN
    print(progress.line(record, hc.job.num if multirun else None), flush=True)


def fail(message: str, code: int = 2) -> None:
    """Bad input: one line on stderr naming the field, no traceback, non-zero exit."""
    print(f"attnbench: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


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
    sys.argv = [sys.argv[0], *argv]
    sweep_job()


if __name__ == "__main__":
    main()
