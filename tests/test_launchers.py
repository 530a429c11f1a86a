"""The launcher configs compose, and a multirun gathers the same rows under every launcher.

Records are written by each job (for submitit and joblib: in another process) into its own job
folder; the gather callback runs in the launching process when the multirun ends.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
PLUGIN = {"slurm": "hydra_plugins.hydra_submitit_launcher",
          "local": "hydra_plugins.hydra_submitit_launcher",
          "parallel": "hydra_plugins.hydra_joblib_launcher"}
SWEEP = ["variant=full", "variant.backend=naive,xformers", "seq_len=32,64", "batch=1", "heads=2",
         "device=cpu",  # xformers has no CPU kernels: unsupported here, on any machine
         "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0", "timing.warmup=1"]


def needs_plugin(name: str) -> None:
    if importlib.util.find_spec(PLUGIN[name]) is None:
        pytest.skip(f"{PLUGIN[name]} not installed (pip install attnbench[cluster])")


def multirun(out: Path, *args: str) -> set[tuple[str, int, str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "attnbench.harness.cli", "-m", *SWEEP, f"hydra.sweep.dir={out}",
         *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4, df
    return set(zip(df.label, df.seq_len, df.status, strict=True))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_composes_and_extends_the_plugin(name):
    needs_plugin(name)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.startswith(PLUGIN[name])
    if name == "slurm":
        assert launcher.gpus_per_node == 1 and launcher.array_parallelism > 0
    if name == "parallel":
        assert launcher.n_jobs == 1  # one point at a time unless asked


@pytest.fixture(scope="module")
def basic_rows(tmp_path_factory):
    return multirun(tmp_path_factory.mktemp("basic") / "sweep")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [("local", []), ("parallel", ["hydra.launcher.n_jobs=2"])],
    ids=["local", "parallel"],
)
def test_same_rows_as_the_basic_launcher(name, extra, basic_rows, tmp_path):
    needs_plugin(name)
    expected = {(f"full[{b}]", n, s) for b, s in (("naive", "ok"), ("xformers", "unsupported"))
                for n in (32, 64)}
    assert basic_rows == expected
    out = tmp_path / "sweep"
    assert multirun(out, f"hydra/launcher={name}", *extra) == basic_rows
    # each job wrote its own record in its own folder
    assert len(list(out.glob("*/result.json"))) == 4
