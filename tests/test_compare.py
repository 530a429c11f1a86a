"""`attnbench compare`: an injected 2× slowdown is flagged, a change inside the spread is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_sweep import tiny_sweep

from attnbench.harness.records import find_records
from attnbench.harness.report import compare

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


def _tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_compare_flags_the_slowdown_and_ignores_noise(sweeps, capsys):
    a, b = sweeps
    before = _tree(a), _tree(b)
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "6 matched points (3 same, 3 slower)" in out
    assert (_tree(a), _tree(b)) == before  # nothing written into A or B
    made = sorted(b.parent.glob("compare-run_A-vs-run_B-*"))
    assert len(made) == 1 and str(made[0]) in out
    folder = made[0]
    df = pd.read_csv(folder / "compare.csv")
    naive, sdpa = df[df.label == "full[naive]"], df[df.label == "full[sdpa]"]
    assert (naive.verdict == "slower").all() and naive.ratio.tolist() == pytest.approx([2.0] * 3)
    assert (sdpa.verdict == "same").all()
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "compare.svg").exists() and (folder / "compare.md").exists()
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "run&lt;B&gt;" in page
    assert "6 matched points (3 same, 3 slower)" in page
    # a second run makes a new folder, never reuses or overwrites the first
    assert compare.main([str(a), str(b)]) == 0
    assert len(list(b.parent.glob("compare-run_A-vs-run_B-*"))) == 2


def test_compare_never_writes_into_a_or_b(sweeps, capsys):
    a, b = sweeps
    for inside in (b, b / "cmp", a / "x"):
        assert compare.main([str(a), str(b), "--out", str(inside)]) == 2
        assert "inside the sweep" in capsys.readouterr().err
    assert not (b / "cmp").exists() and not (a / "x").exists()
    assert not (b / "compare.csv").exists()


def test_fail_on_regression_exit_code(sweeps, tmp_path, capsys):
    a, b = sweeps
    assert compare.main([str(a), str(b), "--fail-on-regression", "--out", str(tmp_path)]) == 1
    assert compare.main([str(b), str(a), "--fail-on-regression", "--out", str(tmp_path)]) == 0
    assert "3 faster" in capsys.readouterr().out


def test_a_sweep_against_itself_shows_no_change(sweeps, tmp_path, capsys):
    a, _ = sweeps
    assert compare.main([str(a), str(a), "--fail-on-regression", "--out", str(tmp_path)]) == 0
    assert "6 matched points (6 same)" in capsys.readouterr().out


def _edit(folder: Path, change) -> None:
    for path in find_records(folder):
        rec = json.loads(path.read_text())
        rec["noisy"] = rec["contended"] = False  # the tiny sweep ran on a busy machine, maybe
        change(rec)
        path.write_text(json.dumps(rec))


def test_kernel_change_and_contended_points_are_pointed_out(sweeps, tmp_path, capsys):
    a, _ = sweeps
    c, d = tmp_path / "c", tmp_path / "d"
    shutil.copytree(a, c, ignore=shutil.ignore_patterns("compare-*"))
    shutil.copytree(a, d, ignore=shutil.ignore_patterns("compare-*"))
    _edit(c, lambda r: r.update(kernel="sdpa:flash_cpu" if r["label"] == "full[sdpa]" else ""))

    def fallback(rec):
        if rec["label"] == "full[sdpa]":
            rec["kernel"] = "sdpa:math" if rec["seq_len"] == 256 else "sdpa:flash_cpu"
        rec["contended"] = rec["label"] == "full[naive]" and rec["seq_len"] == 128

    _edit(d, fallback)
    assert compare.main([str(c), str(d), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 point(s) ran another kernel" in out
    assert "full[sdpa] n=256 sdpa:flash_cpu → sdpa:math" in out
    assert "1 point(s) contended in A or B" in out
    df = pd.read_csv(tmp_path / "out" / "compare.csv").set_index(["label", "seq_len"])
    assert df.kernel_changed.sum() == 1 and df.loc[("full[sdpa]", 256), "kernel_changed"]
    assert df.loc[("full[sdpa]", 128), "kernel"] == "sdpa:flash_cpu"
    assert df.loc[("full[naive]", 128), "note"] == "contended in B"
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| kernel | note |" in md and "kernel changed" in md


def test_a_point_missing_from_b_is_a_regression_and_an_empty_folder_is_exit_2(
        sweeps, tmp_path, capsys):
    a, _ = sweeps
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("compare-*"))
    gone = sorted(b.glob("*/result.json"))[0]
    gone.unlink()
    code = compare.main([str(a), str(b), "--out", str(tmp_path / "out"), "--fail-on-regression"])
    assert code == 1
    df = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert (df.verdict == "missing in B").sum() == 1 and df.regression.sum() >= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert compare.main([str(a), str(empty), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable records" in err[0]


def test_errors_side_by_side_and_a_broken_check_in_b_is_a_regression(sweeps, tmp_path, capsys):
    """Each side's error against exact attention is shown (or why it has none); a point that
    passed its implementation check in A and fails it in B regressed, whatever its speed."""
    a, _ = sweeps
    c, d = tmp_path / "c", tmp_path / "d"
    shutil.copytree(a, c, ignore=shutil.ignore_patterns("compare-*"))
    shutil.copytree(a, d, ignore=shutil.ignore_patterns("compare-*"))
    _edit(c, lambda r: None)

    def broken(rec):
        if rec["label"] == "full[naive]" and rec["seq_len"] == 128:
            rec.update(impl_ok=False, impl_error=0.2, softmax_rel_error=0.2)
        if rec["label"] == "full[sdpa]" and rec["seq_len"] == 64:
            rec["softmax_rel_error"] = None  # no reference computed

    _edit(d, broken)
    code = compare.main([str(c), str(d), "--out", str(tmp_path / "out"),
                         "--fail-on-regression"])
    assert code == 1
    out = capsys.readouterr().out
    assert "1 point(s) fail their implementation check in d and passed in c" in out
    assert "full[naive] n=128" in out
    df = pd.read_csv(tmp_path / "out" / "compare.csv").set_index(["label", "seq_len"])
    assert df.loc[("full[naive]", 128), "regression"] and df.loc[("full[naive]", 128),
                                                                 "verdict"] == "same"
    assert df.loc[("full[naive]", 128), "note"] == "implementation check failed in B"
    assert df.regression.sum() == 1
    md = (tmp_path / "out" / "compare.md").read_text()
    row = next(r for r in md.splitlines() if r.startswith("| full[naive] |") and "| 128 |" in r)
    assert "| 0.2 |" in row  # B's error against exact attention
    row = next(r for r in md.splitlines() if r.startswith("| full[sdpa] |") and "| 64 |" in r)
    assert "| no reference |" in row


def test_points_match_on_their_seed_too(sweeps, tmp_path, capsys):
    """Seed 0 and seed 1 are two points (other inputs): B measured at another seed has nothing
    in common with A, and A's seed-1 point is matched with B's seed-1 point only."""
    a, _ = sweeps
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("compare-*"))
    _edit(b, lambda rec: rec.update(seed=1))
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    assert "0 matched points (no common points); 6 only in" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert (df.verdict == "missing in B").all()
