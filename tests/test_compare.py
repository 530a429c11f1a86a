"""`attnbench compare`: an injected 2× slowdown is flagged, a change inside the spread is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_sweep import tiny_sweep

from harness import compare
from harness.records import find_records

LATENCY = ("latency_ms", "latency_p10_ms", "latency_p90_ms")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> tuple[Path, Path]:
    """A: the tiny sweep with a known ±5% spread; B: full[naive] 2× slower, full[sdpa] +3%."""
    src, _ = tiny_sweep(tmp_path_factory)
    root = tmp_path_factory.mktemp("compare")
    a, b = root / "run A", root / "run<B>"
    for dest, scale in ((a, {}), (b, {"full[naive]": 2.0, "full[sdpa]": 1.03})):
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("plots", "*.csv", "*.html"))
        for path in find_records(dest):
            rec = json.loads(path.read_text())
            base = 10.0 * rec["seq_len"] / 64 * scale.get(rec["label"], 1.0)
            rec.update(latency_ms=base, latency_p10_ms=0.95 * base, latency_p90_ms=1.05 * base)
            path.write_text(json.dumps(rec))
    return a, b


def test_compare_flags_the_slowdown_and_ignores_noise(sweeps, capsys):
    a, b = sweeps
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "6 matched points (3 same, 3 slower)" in out
    folder = b / "compare-vs-run_A"
    df = pd.read_csv(folder / "compare.csv")
    naive, sdpa = df[df.label == "full[naive]"], df[df.label == "full[sdpa]"]
    assert (naive.verdict == "slower").all() and naive.ratio.tolist() == pytest.approx([2.0] * 3)
    assert (sdpa.verdict == "same").all()
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "compare.svg").exists() and (folder / "compare.md").exists()


def test_fail_on_regression_exit_code(sweeps, tmp_path, capsys):
    a, b = sweeps
    assert compare.main([str(a), str(b), "--fail-on-regression", "--out", str(tmp_path)]) == 1
    assert compare.main([str(b), str(a), "--fail-on-regression", "--out", str(tmp_path)]) == 0
    assert "3 faster" in capsys.readouterr().out


def test_a_sweep_against_itself_shows_no_change(sweeps, tmp_path, capsys):
    a, _ = sweeps
    assert compare.main([str(a), str(a), "--fail-on-regression", "--out", str(tmp_path)]) == 0
    assert "6 matched points (6 same)" in capsys.readouterr().out
