"""The report of a real tiny sweep: every file, valid images, escaping, bad records, a browser."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from tiny_sweep import tiny_sweep

from attnbench.harness.records import read_record, write_record
from attnbench.harness.report import build as report

PLOTS = ["latency", "memory", "speedup", "pareto", "exponents"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    return tiny_sweep(tmp_path_factory)


def _copy(sweep_dir: Path, dest: Path) -> Path:
    shutil.copytree(sweep_dir, dest, ignore=shutil.ignore_patterns("plots", "*.csv", "*.md",
                                                                   "*.html", "compare-*"))
    return dest


def assert_report_files(folder: Path) -> None:
    for name in report.FILES:
        assert (folder / name).stat().st_size > 0, name
    for stem in PLOTS:
        png, svg = folder / "plots" / f"{stem}.png", folder / "plots" / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        assert mpimg.imread(png).shape[0] > 50
        assert ET.parse(svg).getroot().tag.endswith("svg")


def test_multirun_writes_the_whole_report_and_progress_lines(sweep):
    folder, stdout = sweep
    assert_report_files(folder)
    assert "[1/6] full[naive] n=64" in stdout and "[6/6] full[sdpa] n=256" in stdout
    assert "left" in stdout
    df = pd.read_csv(folder / "results.csv")
    assert len(df) == 6 and {"speedup", "memory_ratio", "tflops", "spread"} <= set(df.columns)
    assert (df[df.label == "full[sdpa]"].speedup == 1).all()
    sc = pd.read_csv(folder / "scaling.csv")
    need = {"label", "metric", "exponent", "ci_low", "ci_high", "n_min", "n_max", "points",
            "declared", "agrees"}
    assert need <= set(sc.columns) and len(sc) == 4
    assert set(sc.metric) == {"latency", "memory"} and (sc.points == 3).all()
    cross = pd.read_csv(folder / "crossovers.csv")
    assert set(cross.label) == {"full[naive]", "full[sdpa]"}
    md = (folder / "summary.md").read_text()
    for title in ("Median latency (ms)", "Speedup vs full[sdpa]",
                  "Peak memory (MB; peak beyond q, k, v)",
                  "Error vs exact attention (softmax_rel_error)", "Implementation check",
                  "Attention-mass recall", "per head (median / max)", "Fitted exponents",
                  "Crossovers"):
        assert title in md
    page = (folder / "index.html").read_text()
    assert "attnbench -m variant=full variant.backend=naive,sdpa seq_len=64,128,256" in page
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "torch" in page and "git sha" in page


def test_report_cli_redoes_it_offline(sweep, tmp_path, capsys):
    folder = _copy(sweep[0], tmp_path / "s")
    assert report.main([str(folder), "--baseline", "full[naive]"]) == 0
    out = capsys.readouterr().out
    assert "used 6 records, skipped 0" in out and "baseline full[naive]" in out
    assert_report_files(folder)
    df = pd.read_csv(folder / "results.csv")
    assert (df[df.label == "full[naive]"].speedup == 1).all()
    assert report.main([str(folder), "--baseline", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_records_skipped_labels_escaped_failed_points_shown(sweep, tmp_path, capsys):
    folder = _copy(sweep[0], tmp_path / "s")
    (folder / "corrupt").mkdir()
    (folder / "corrupt" / "result.json").write_text('{"variant": "full", "lab')
    (folder / "foreign").mkdir()
    (folder / "foreign" / "result.json").write_text(json.dumps({"loss": 0.1, "step": 3}))
    rec = read_record(sorted(folder.glob("full*/result.json"))[0])  # a point of the sweep
    odd = dataclasses.replace(rec, label="x<b>&y", family="local", point_id="odd")
    write_record(odd, folder / "odd")
    oom = dataclasses.replace(rec, seq_len=512, status="oom", reason="out of memory",
                              latency_ms=float("nan"), point_id="oom")
    write_record(oom, folder / "oom")

    assert report.main([str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "used 8 records, skipped 2" in out
    assert str(folder / "corrupt" / "result.json") in err
    assert str(folder / "foreign" / "result.json") in err
    assert_report_files(folder)
    page = (folder / "index.html").read_text()
    assert "x&lt;b&gt;&amp;y" in page and "x<b>&y" not in page
    md = (folder / "summary.md").read_text()
    naive_row = next(line for line in md.splitlines() if line.startswith("| full[naive] |"))
    assert naive_row.rstrip().endswith("oom |")
    cross = pd.read_csv(folder / "crossovers.csv").set_index("label")
    assert cross.loc["full[naive]", "max_ok_n"] == 256
    assert cross.loc["full[naive]", "first_oom_n"] == 512


def test_a_folder_of_only_bad_records_still_reports(tmp_path, capsys):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "result.json").write_text("{")
    assert report.main([str(tmp_path)]) == 0
    assert "used 0 records, skipped 1" in capsys.readouterr().out
    assert (tmp_path / "index.html").exists() and (tmp_path / "plots" / "latency.png").exists()


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


def rendered(page: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Render `page` in a headless browser: what its load script counted (html.SCRIPT), as
    name → (rendered, total); skips without a browser unless ATTNBENCH_REQUIRE_BROWSER is set."""
    if _browser() is None:  # CI sets ATTNBENCH_REQUIRE_BROWSER: there a missing browser fails
        if os.environ.get("ATTNBENCH_REQUIRE_BROWSER"):
            pytest.fail("no headless browser (chromium): `make browser` installs it as root")
        pytest.skip("no headless browser (chromium) installed")
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    counts = {m.group(1): (int(m.group(2)), int(m.group(3)))
              for m in re.finditer(r'data-(\w+(?:-\w+)*)-(?:loaded|rendered)="(\d+)/(\d+)"',
                                   dom)}
    assert set(counts) == {"images", "tables", "picks", "answers"}, dom[:500]
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    return counts


def assert_all_rendered(page: Path, tmp_path: Path, images: int) -> None:
    """Every plot decoded, every table laid out with rows, the pick's sentences and tables
    among them; the totals as many as the page's source holds."""
    src = page.read_text()
    answer = src[src.index('<ul class="answer">'):]
    want = {"images": images, "tables": src.count("<table"),
            "picks": src.count('<table class="pick">'),
            "answers": answer[:answer.index("</ul>")].count("<li>")}
    assert want["picks"] >= 1 and want["answers"] >= 1 and want["tables"] > want["picks"]
    got = rendered(page, tmp_path)
    assert got == {k: (v, v) for k, v in want.items()}


def test_html_renders_every_plot_and_table_in_a_headless_browser(sweep, tmp_path):
    assert_all_rendered(sweep[0] / "index.html", tmp_path, len(PLOTS))
