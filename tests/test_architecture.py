"""The architecture is a checked contract: import-linter's contracts in pyproject.toml (layers of
harness, variants never importing harness, independent families, the Hydra plugin as a leaf),
and no import circle between any two modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("attnbench", "hydra_plugins", cache_dir=None)


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (pip install -e '.[test]')"
    proc = subprocess.run([exe, "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and " 0 broken" in proc.stdout


def test_the_graph_sees_every_module(graph):
    """A layout the linter cannot read would pass every contract: every .py file of harness/ and
    variants/ is a module of the graph."""
    for folder in ("harness", "variants"):
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(("attnbench", *parts)).removesuffix(".__init__")
            assert name in graph.modules, name


def test_no_import_circle(graph):
    """Tarjan's strongly connected components over module -> module imports (function-level
    imports included): a component of two or more modules is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    ours = sorted(m for m in graph.modules
                  if m.split(".")[0] == "attnbench" or m.startswith("hydra_plugins.attnbench"))
    for m in ours:
        if m not in index:
            visit(m)
    assert not circles, circles


def test_nothing_climbs_back_into_a_package_that_imports_it(graph):
    """`attnbench.variants` imports every family; a variant module importing it back (the old
    `from variants import register`) is the circle's first step. Same for the root package."""
    for package in ("attnbench", "attnbench.variants"):
        back = {m for m in graph.find_modules_that_directly_import(package)
                if m.startswith(package + ".") and m != package}
        assert not back, (package, sorted(back))


OLD_PLUGIN = """
from variants import register
from variants.base import Variant
"""


@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_plugin_on_the_old_import_names_gets_one_line(tmp_path, where):
    """A plugin written against `from variants import register` fails when attnbench loads it
    with one line naming the new import, both where no `variants` exists and in a checkout, whose
    own variants/ folder is importable under the old name from its root."""
    (tmp_path / "old_plugin.py").write_text(OLD_PLUGIN)
    info = tmp_path / "old_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: old_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnbench.variants]\nold = old_plugin\n")
    code = ("import sys, warnings; sys.path.insert(0, sys.argv[1]); "
            "from attnbench import variants; warnings.simplefilter('always'); "
            "variants.names(); "
            "from attnbench.variants.custom import load_target\n"
            "try:\n    load_target('old_plugin:f')\nexcept ValueError as e:\n    print(e)")
    cwd = REPO if where == "checkout" else tmp_path
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = [line for line in proc.stderr.splitlines() if "old_plugin" in line]
    assert warning and "from attnbench import register" in warning[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "attnbench.variants" in proc.stdout and "from attnbench import" in proc.stdout
