"""The report's claims on synthetic records with known answers, and its robustness."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from attnbench.harness.records import Record, write_record
from attnbench.harness.report import build as report

NAN = float("nan")


def _rec(label="full[sdpa]", n=1024, batch=1, family="full", **kw) -> Record:
    base = dict(variant=label.split("[")[0], label=label, family=family, params="{}", batch=batch,
                heads=2, seq_len=n, head_dim=16, dtype="float32", device="cpu", causal=False,
                mode="fwd", inputs="gaussian", seed=0, status="ok", reps=5,
                time_exponent=2.0, memory_exponent=2.0, threads=2, others_cpu=0.01,
                own_cpu=0.95, timestamp="2026-01-01T00:00:00", point_id=f"{label}-{n}-{batch}")
    base.update(kw)
    if base["status"] == "ok":
        lat = base.setdefault("latency_ms", 1.0)
        base.setdefault("latency_p10_ms", 0.98 * lat)
        base.setdefault("latency_p90_ms", 1.02 * lat)
        base.setdefault("peak_mem_bytes", 1e6)
    return Record(**base)


def _write(folder, records):
    for i, r in enumerate(records):
        write_record(r, folder / str(i))
    return folder


def _md(folder) -> str:
    return (folder / "summary.md").read_text()


def _headline(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"- {label} ("))


def test_unmeasured_contention_is_said_not_read_as_clean(tmp_path):
    recs = [_rec(n=n, others_cpu=NAN, own_cpu=NAN) for n in (1024, 2048, 4096)]
    report.build_report(_write(tmp_path / "s", recs))
    assert "Contention was not measured for 3 of them" in _md(tmp_path / "s")


def test_headlines_say_only_what_the_data_show(tmp_path):
    ns = [1024, 2048, 4096]
    recs = [_rec(n=n, latency_ms=1e-6 * n**2, noisy=True, kernel="sdpa:flash_cpu",
                 softmax_rel_error=1e-7 * n / 1024) for n in ns]
    # faster at 1024 and 4096, slower at 2048; three scattered points: a wide interval
    for n, lat in zip(ns, (0.5, 6.0, 8.0), strict=True):
        recs.append(_rec("local[w=64]", n, family="local", latency_ms=lat, time_exponent=1.0,
                         memory_exponent=1.0, contended=n == 2048, kernel="local:banded",
                         softmax_rel_error=2.5e-3 if n == 4096 else 1e-3))
    folder = _write(tmp_path / "s", recs)
    report.build_report(folder)
    md = _md(folder)
    line = _headline(md, "local[w=64]")
    assert "non-causal" in line
    assert "faster at n=1024, 4096; slower at n=2048" in line
    assert "from n" not in line and "below the sweep" not in line
    assert "declared 1: inconclusive" in line and "✓" not in line
    assert "error vs exact attention 2.5e-03 at n=4096" in line
    assert "fitted points include 1 contended (!)" in line
    sc = pd.read_csv(folder / "scaling.csv").set_index(["label", "metric"])
    assert sc.loc[("local[w=64]", "latency"), "agrees"] == "inconclusive"
    assert sc.loc[("local[w=64]", "latency"), "model"] == "a·n^k"
    cross = pd.read_csv(folder / "crossovers.csv").set_index("label")
    assert math.isnan(cross.loc["local[w=64]", "latency_crossover_n"])
    assert "! contended at n=2048" in cross.loc["local[w=64]", "latency_crossover"]
    # the baseline against itself: exactly 1, never noisy; the others carry its noise
    speed = md[md.index("### Speedup"):md.index("### Peak memory")]
    rows = {r.split(" | ")[0][2:]: r for r in speed.splitlines() if r.startswith("| ")}
    assert rows["full[sdpa]"] == "| full[sdpa] | 1 | 1 | 1 |"
    assert "~!" in rows["local[w=64]"]
    latency = md[md.index("### Median latency"):md.index("### Speedup")]
    assert "6~!" not in latency and "| 6! |" in latency and "1.05~" in latency
    assert "Warning: of 6 points that ran, 3 are noisy (~) and 1 contended (!)" in md
    assert "Clean numbers on a shared machine" in md
    assert "### Kernel that ran" in md and "local:banded" in md
    page = (folder / "index.html").read_text()
    assert 'class="contended"' in page and 'class="warn"' in page


def test_a_clean_sweep_has_no_warning_and_a_crossover_that_holds(tmp_path):
    recs = []
    for n in (512, 1024, 2048, 4096):
        recs.append(_rec(n=n, latency_ms=1e-6 * n**2, causal=True))
        recs.append(_rec("lin", n, family="linear", latency_ms=2048e-6 * n, causal=True,
                         time_exponent=1.0))
    folder = _write(tmp_path / "s", recs)
    report.build_report(folder)
    md = _md(folder)
    assert "Warning" not in md
    line = _headline(md, "lin")
    assert "(float32 fwd cpu causal)" in line and "faster from n≈2048" in line
    assert "declared 1: agrees" in line and "no softmax reference" in line


def _budget_records(tokens=16384):
    recs = []
    for n in (1024, 2048, 4096, 8192, 16384, 32768):
        b = max(1, tokens // n)
        recs.append(_rec(n=n, batch=b, latency_ms=b * 1e-6 * n**2, peak_mem_bytes=b * 4.0 * n**2))
        recs.append(_rec("lin", n, batch=b, family="linear", latency_ms=b * 2e-3 * n,
                         peak_mem_bytes=b * (16 * 2**20 + 64.0 * n), time_exponent=1.0,
                         memory_exponent=1.0))
    return recs


def test_token_budget_sweep_fits_per_sequence(tmp_path):
    folder = _write(tmp_path / "s", _budget_records())
    report.build_report(folder)
    sc = pd.read_csv(folder / "scaling.csv").set_index(["label", "metric"])
    assert len(sc) == 4 and (sc.per == "sequence").all() and (sc.points == 6).all()
    assert sc.loc[("lin", "latency"), "exponent"] == pytest.approx(1.0, abs=0.01)
    # a 16 MiB workspace next to memory linear in n: c + a·n^k, not n^0.4
    assert sc.loc[("lin", "memory"), "model"] == "c + a·n^k"
    assert sc.loc[("lin", "memory"), "exponent"] == pytest.approx(1.0, abs=0.01)
    assert sc.loc[("lin", "memory"), "agrees"] == "yes"
    assert "per sequence" in sc.loc[("lin", "latency"), "note"]
    cross = pd.read_csv(folder / "crossovers.csv").set_index("label")
    assert cross.loc["lin", "latency_crossover_n"] == pytest.approx(2000, rel=0.05)
    md = _md(folder)
    assert "per sequence (÷ batch)" in md and "per sequence at B·n=16384" in md
    results = pd.read_csv(folder / "results.csv")
    assert (results[results.label == "full[sdpa]"].speedup == 1).all()


@pytest.mark.parametrize("case", ["empty", "one point", "one point each", "all failed",
                                  "nan columns", "no baseline"])
def test_report_never_crashes(tmp_path, case):
    recs = {
        "empty": [],
        "one point": [_rec()],
        "one point each": [_rec(), _rec("lin", family="linear", latency_ms=0.5)],
        "all failed": [_rec(n=n, status=s, reason="x", latency_ms=NAN)
                       for n, s in ((256, "unsupported"), (512, "oom"), (1024, "skipped"))],
        "nan columns": [_rec(n=n, latency_ms=NAN, latency_p10_ms=NAN, latency_p90_ms=NAN,
                             peak_mem_bytes=NAN, time_exponent=NAN, memory_exponent=NAN)
                        for n in (256, 512, 1024, 2048)],
        "no baseline": [_rec("local[w=8]", n, family="local", noisy=True, contended=True,
                             latency_ms=1e-3 * n) for n in (256, 512, 1024, 2048)],
    }[case]
    folder = _write(tmp_path / "s", recs)
    folder.mkdir(exist_ok=True)
    rep = report.build_report(folder)
    assert rep.used == len(recs)
    for name in report.FILES:
        assert (folder / name).exists(), name
    assert _md(folder).startswith("# attnbench report")


def test_report_survives_hostile_values_and_labels_are_text(tmp_path):
    """Values the record reader accepts never crash the report: infinite latency, huge n,
    labels with plot markup ($, _, ^) and table markup (|, *)."""
    recs = [_rec(n=n, latency_ms=1e-6 * n ** 2) for n in (1024, 2048, 4096)]
    recs += [_rec("evil[$\\frac$_|*]", n, family="local", latency_ms=lat, time_exponent=1.0,
                  memory_exponent=1.0)
             for n, lat in ((1024, float("inf")), (2048, 2.0), (4096, 3.0))]
    recs += [_rec("huge", 2**40, family="linear", latency_ms=5.0, time_exponent=1.0,
                  memory_exponent=1.0, peak_mem_bytes=1e18)]
    folder = _write(tmp_path / "s", recs)
    report.build_report(folder)
    md = _md(folder)
    assert "evil[$\\frac$_\\|*]" in md  # a table cell escapes only what markdown needs
    assert (folder / "index.html").exists() and list((folder / "plots").glob("*.png"))


def test_report_files_are_readable_like_normal_files(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        folder = _write(tmp_path / "s", [_rec(n=n) for n in (1024, 2048, 4096)])
        report.build_report(folder)
    finally:
        os.umask(old)
    for name in ("results.csv", "pick.csv", "scaling.csv", "summary.md", "index.html"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


def test_fraction_of_the_limit_and_executed_over_algorithm(tmp_path):
    """The fraction table shows limit_fraction per label and n, "mem" beside the points whose
    bytes bind; the ratio table only the labels whose engine executes more than the method
    needs; neither for records without the fields."""
    recs = []
    for n in (1024, 2048):
        recs.append(_rec(n=n, algo_flops=1e9, executed_flops=1e9, limit_fraction=0.5,
                         matmul_gflops=100.0, limit_bound="matmul"))
        recs.append(_rec("local[w=64]", n, family="local", algo_flops=3e8, executed_flops=4e8,
                         limit_fraction=0.125, matmul_gflops=100.0,
                         limit_bound="memory" if n == 2048 else "matmul"))
    report.build_report(_write(tmp_path / "s", recs))
    md = _md(tmp_path / "s")
    part = md.split("### Fraction of the limit")[1].split("###")[0]
    assert "| full[sdpa] | 0.5 | 0.5 |" in part and "| local[w=64] | 0.12 | 0.12 mem |" in part
    part = md.split("### Executed / algorithm FLOPs (×)")[1].split("###")[0]
    assert "| local[w=64] | 1.33 | 1.33 |" in part and "full[sdpa]" not in part
    old = [_rec(n=n) for n in (1024, 2048)]
    report.build_report(_write(tmp_path / "o", old))
    md = _md(tmp_path / "o")
    assert "Fraction of the limit" not in md and "Executed / algorithm" not in md
