"""The example plugin package, installed into a fresh environment, is listed and runs in a sweep.

The environment is a new venv that also sees this interpreter's site-packages (torch, Hydra, pip,
setuptools: nothing is downloaded) and this repository on PYTHONPATH, in case attnbench itself is
not installed. The example is installed as a user would, with pip, from a copy of its folder.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "attnbench-plugin-example"
TINY = ["batch=1", "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1"]

pytestmark = pytest.mark.slow


def parent_site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), *(p for p in sys.path if p.endswith("-packages"))]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """(python, env) of a venv holding only the example package, on top of this interpreter's."""
    root = tmp_path_factory.mktemp("plugin")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = str(root / "venv" / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # A .pth `import` line runs addsitedir, so the parent's own .pth files (editable installs)
    # apply too; the venv's site-packages stays first.
    lines = [f"import site; site.addsitedir({d!r})" for d in parent_site_dirs()]
    Path(purelib, "zz_parent_site.pth").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PIP_DISABLE_PIP_VERSION_CHECK="1")
    # The offline build takes pip and setuptools from this interpreter (the `test` extra).
    if subprocess.run([python, "-c", "import setuptools, pip"], env=env).returncode:
        pytest.skip("pip and setuptools are needed to install the example offline")
    # A copy: pip's in-tree build leaves build/ and *.egg-info next to the sources.
    skip = shutil.ignore_patterns("build", "*.egg-info")
    source = shutil.copytree(EXAMPLE, root / "src", ignore=skip)
    proc = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return python, env, root


def attnbench(plugin_env, *args: str) -> subprocess.CompletedProcess:
    python, env, root = plugin_env
    return subprocess.run([python, "-m", "attnbench.harness.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_plugin_variant_is_listed(plugin_env):
    proc = attnbench(plugin_env, "list", "--device", "cpu", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(",")[1]: line for line in proc.stdout.splitlines()[1:]}
    assert "sigmoid" in rows and "full[sdpa]" in rows
    assert rows["sigmoid"].startswith("sigmoid,sigmoid,full,")
    assert ",O(n^2),O(n^2),×1,yes," in rows["sigmoid"]  # exec/algo: ×1 by default


def test_plugin_variant_runs_in_a_sweep(plugin_env):
    out = plugin_env[2] / "sweep"
    proc = attnbench(plugin_env, "-m", "variant=sigmoid,full", "seq_len=32,64",
                     "causal=false,true", *TINY, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    sig = df[df.variant == "sigmoid"]
    assert len(sig) == 4 and (sig.status == "ok").all(), sig[["label", "status", "reason"]]
    assert set(sig.label) == {"sigmoid"} and (sig.latency_ms > 0).all()
    assert set(df.variant) == {"sigmoid", "full"}


def test_plugin_not_visible_outside_its_environment():
    proc = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "list", "--format",
                           "csv"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "\nsigmoid," not in proc.stdout


def test_plugin_own_tests_pass_against_the_installed_package(plugin_env):
    python, env, root = plugin_env
    # cwd is not the source folder, so attnbench_sigmoid is the installed copy
    proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "src/tests"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
