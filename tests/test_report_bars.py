"""A sweep with one n per setting draws bars (latency, error, speedup, memory), not lines over a
single point, and no warning reaches the terminal while the report is written."""

from __future__ import annotations

import contextlib
import math
import warnings

import matplotlib.colors as mcolors
import pytest
from test_report import assert_all_rendered
from test_report_plots import build_keeping_figures
from test_report_rules import _rec, _write

from attnbench.harness.report import build as report

N = 4096
BARS = ["latency", "error", "speedup", "memory"]
LIN = dict(time_exponent=1.0, memory_exponent=1.0)


def _sweep() -> list:
    recs = []
    for causal in (False, True):
        c = dict(causal=causal)
        recs += [
            _rec(n=N, latency_ms=40.0, softmax_rel_error=3e-7, peak_mem_bytes=8e6,
                 point_id=f"sdpa{causal}", **c),
            _rec("full[naive]", N, status="oom", reason="out of memory", latency_ms=math.nan,
                 point_id=f"naive{causal}", **c),
            _rec("linear", N, family="linear", latency_ms=4.0, softmax_rel_error=0.8,
                 peak_mem_bytes=1e6, point_id=f"lin{causal}", **LIN, **c),
            _rec("local[w=256]", N, family="local", latency_ms=8.0, softmax_rel_error=0.3,
                 peak_mem_bytes=2e6, noisy=True, point_id=f"loc{causal}", **LIN, **c),
            _rec("local[w=16]", N, family="local", latency_ms=2.0, softmax_rel_error=0.5,
                 impl_error=0.2, impl_ok=False, point_id=f"bad{causal}", **LIN, **c),
            _rec("local[w=32]", N, family="local", latency_ms=3.0,  # no softmax reference
                 point_id=f"noref{causal}", **LIN, **c),
            _rec("retention", N, family="recurrent", latency_ms=5.0, impl_error=1e-9,
                 point_id=f"ret{causal}", **LIN, **c),
        ]
    return recs


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The report of the one-n sweep, built with every warning an error, figures kept."""
    folder = _write(tmp_path_factory.mktemp("bars") / "s", _sweep())
    return folder, build_keeping_figures(folder, _errors)


@contextlib.contextmanager
def _errors():
    """Every warning raised as an error while the report is built (none may reach a terminal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_one_n_draws_bars_and_the_page_lists_them(drawn):
    folder, figs = drawn
    assert sorted(figs) == sorted(BARS)  # no exponent plot, no error-vs-latency scatter
    for stem in BARS:
        assert (folder / "plots" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (folder / "plots" / f"{stem}.svg").stat().st_size > 0
    assert not (folder / "plots" / "pareto.png").exists()
    assert not (folder / "plots" / "exponents.png").exists()
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(BARS)
    for title in ("Latency per variant (one n)", "Error vs exact attention per variant (one n)",
                  "Speedup vs full[sdpa] per variant (one n)",
                  "Memory per variant (one n; peak beyond q, k, v)"):
        assert title in page
    md = (folder / "summary.md").read_text()
    assert "(plots/error.png)" in md and "(plots/exponents.png)" not in md


def _bars(ax) -> dict[str, float]:
    """label → bar height, from the tick under each bar."""
    names = [t.get_text() for t in ax.get_xticklabels()]
    return {names[round(p.get_x() + p.get_width() / 2)]: p.get_height() for p in ax.patches
            if p.get_width() < 1}


def _texts(ax) -> set[str]:
    return {t.get_text() for t in ax.texts}


def test_bars_show_the_measured_values_and_say_why_one_is_missing(drawn):
    _, figs = drawn
    lat = [ax for ax in figs["latency"].axes if ax.get_visible()]
    assert len(lat) == 2  # one panel per setting (causal, non-causal)
    for ax in lat:
        assert _bars(ax) == pytest.approx({"full[sdpa]": 40.0, "linear": 4.0,
                                           "local[w=256]": 8.0, "local[w=16]": 2.0,
                                           "local[w=32]": 3.0, "retention": 5.0})
        assert "oom" in _texts(ax) and ax.get_yscale() == "log"
    err = next(ax for ax in figs["error"].axes if ax.get_visible())
    assert _bars(err) == pytest.approx({"full[sdpa]": 3e-7, "linear": 0.8, "local[w=256]": 0.3,
                                        "local[w=16]": 0.5})
    assert {"oom", "not softmax", "no reference", "exact", "1%", "10%"} <= _texts(err)
    speed = next(ax for ax in figs["speedup"].axes if ax.get_visible())
    assert _bars(speed)["linear"] == pytest.approx(10.0)  # 40 / 4
    mem = next(ax for ax in figs["memory"].axes if ax.get_visible())
    assert _bars(mem)["linear"] == pytest.approx(1e6 / 2**20)


def test_bars_wear_the_family_colours_and_marks(drawn):
    _, figs = drawn
    ax = next(ax for ax in figs["latency"].axes if ax.get_visible())
    names = [t.get_text() for t in ax.get_xticklabels()]
    by = {names[round(p.get_x() + p.get_width() / 2)]: p for p in ax.patches
          if p.get_width() < 1}
    # full: blues, linear: purples (plots.FAMILY_PALETTE); a noisy bar is hollow
    r, g, b, _ = by["full[sdpa]"].get_facecolor()
    assert b > r and b > g
    r, g, b, _ = by["linear"].get_facecolor()
    assert r > g and b > g
    assert mcolors.to_hex(by["local[w=256]"].get_facecolor()) == "#ffffff"


def test_a_multi_n_sweep_keeps_its_lines(tmp_path):
    recs = [r for n in (1024, 2048, 4096) for r in (
        _rec(n=n, latency_ms=1e-5 * n**2, softmax_rel_error=3e-7),
        _rec("linear", n, family="linear", latency_ms=1e-3 * n, softmax_rel_error=0.8, **LIN))]
    folder = _write(tmp_path / "s", recs)
    with _errors():
        report.build_report(folder)
    for stem in ("latency", "memory", "speedup", "pareto", "exponents"):
        assert (folder / "plots" / f"{stem}.png").exists()
    assert not (folder / "plots" / "error.png").exists()


def test_the_bars_page_renders_in_a_headless_browser(drawn, tmp_path):
    assert_all_rendered(drawn[0] / "index.html", tmp_path, len(BARS))
