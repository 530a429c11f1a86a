"""attnbench as a normal package: the wheel, installed into a fresh environment, runs from any
directory, its configs found inside the installed package (not beside a source tree).

The environment is a new venv that also sees this interpreter's site-packages (torch, Hydra, pip,
setuptools: nothing is downloaded); the wheel is built offline from a copy of the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.test_plugin_package import parent_site_dirs
from tests.test_sweep import ran_ok

REPO = Path(__file__).resolve().parent.parent
TINY = ["batch=1", "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, env, a work folder outside the repository) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", ".venv", "results", "build", "dist", "*.egg-info",
                                  "__pycache__", ".pytest_cache", ".ruff_cache")
    source = shutil.copytree(REPO, root / "src", ignore=skip)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(root / "dist"), str(source)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel = next((root / "dist").glob("attnbench-*.whl"))
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    bin_dir = root / "venv" / "bin"
    purelib = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # torch, Hydra, pandas from this interpreter; the venv's own site-packages stays first
    lines = [f"import site; site.addsitedir({d!r})" for d in parent_site_dirs()]
    Path(purelib, "zz_parent_site.pth").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, env, work, wheel, Path(purelib)


def test_wheel_ships_the_configs(installed):
    names = zipfile.ZipFile(installed[3]).namelist()
    assert "attnbench/conf/config.yaml" in names
    assert "attnbench/conf/variant/full.yaml" in names
    assert "attnbench/conf/sweep/cpu_quick.yaml" in names
    assert "attnbench/harness/run/data/sample_text.md" in names  # the real sample's text
    assert not any(n.startswith("conf/") for n in names)


def test_wheel_has_one_import_name_and_every_module(installed):
    """Only `attnbench` (and Hydra's plugin namespace) at the top; every module of harness/ and
    variants/ inside it (a package folder missing from pyproject.toml's list would be lost)."""
    names = zipfile.ZipFile(installed[3]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"attnbench", "hydra_plugins"}, tops
    repo = Path(__file__).resolve().parents[1]
    for folder in ("harness", "variants"):
        for module in (repo / folder).rglob("*.py"):
            assert f"attnbench/{module.relative_to(repo).as_posix()}" in names, module
    assert "attnbench/__init__.py" in names and "attnbench/setup.py" not in names


def test_installed_package_finds_its_configs_inside_itself(installed):
    bin_dir, env, work, _, purelib = installed
    proc = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import attnbench, attnbench.harness.run.compose as c, importlib.util as u; "
         "assert u.find_spec('harness') is None and u.find_spec('variants') is None; "
         "from attnbench import Variant, build, register; "
         "print(attnbench.__file__); print(c.CONF_DIR)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    module, conf = proc.stdout.split()
    assert Path(module).is_relative_to(purelib)
    assert Path(conf) == purelib / "attnbench" / "conf"


def test_installed_command_runs_a_point_and_a_sweep_from_another_folder(installed):
    bin_dir, env, work, _, _ = installed
    attnbench = str(bin_dir / "attnbench")
    version = subprocess.run([attnbench, "--version"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("attnbench 0."), version
    one = subprocess.run([attnbench, "variant=local", "seq_len=64", *TINY], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert ran_ok(one.stdout, "local[w=256] n=64"), one.stdout
    assert list((work / "results" / "runs").glob("*/result.json"))
    out = work / "sweep"
    sweep = subprocess.run([attnbench, "-m", "variant=full,linear", "seq_len=32,64", *TINY,
                            f"hydra.sweep.dir={out}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 4
