"""The plots of a sweep of exact, approximate and recurrent variants: files, panels, ticks."""

from __future__ import annotations

import contextlib
import math

import pytest
from test_report_rules import _rec, _write

from attnbench.harness.report import build as report
from attnbench.harness.report import plots

NS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def _sweep() -> list:
    e = dict(time_exponent=1.0, memory_exponent=1.0)
    exact = dict(impl_error=2e-7)  # patterns: exact to their own mask, not to softmax
    recs = []
    for n in NS:
        recs += [
            _rec(n=n, latency_ms=1e-5 * n**2, softmax_rel_error=3e-7),
            _rec("full[naive]", n, latency_ms=3e-5 * n**2, softmax_rel_error=4e-7),
            _rec("local[w=256]", n, family="local", latency_ms=0.01 * n, softmax_rel_error=0.3,
                 noisy=n == 4096, **exact, **e),
            _rec("local[w=64]", n, family="local", latency_ms=0.004 * n, softmax_rel_error=0.6,
                 **exact, **e),
            _rec("nystrom[m=64]", n, family="lowrank", latency_ms=0.003 * n,
                 softmax_rel_error=0.02, **e),
            _rec("performer[m=256]", n, family="linear", latency_ms=0.005 * n,
                 softmax_rel_error=1.8, contended=n == 1024, **e),
            _rec("linear", n, family="linear", latency_ms=0.001 * n, softmax_rel_error=0.8, **e),
            _rec("retention", n, family="recurrent", latency_ms=0.002 * n, impl_error=1e-9, **e),
            # no softmax reference (an old record); a failed implementation check
            _rec("local[w=32]", n, family="local", latency_ms=0.003 * n, **exact, **e),
            _rec("local[w=16]", n, family="local", latency_ms=0.002 * n, softmax_rel_error=0.5,
                 impl_error=0.2, impl_ok=False, **e),
        ]
    return recs


def build_keeping_figures(folder, around=contextlib.nullcontext) -> dict:
    """Build `folder`'s report inside `around()`, every figure kept (plots._save spied): stem →
    figure."""
    figs = {}
    save = plots._save

    def spy(fig, out, stem):
        figs[stem] = fig
        return save(fig, out, stem)

    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "_save", spy)
    try:
        with around():
            report.build_report(folder)
    finally:
        mp.undo()
    return figs


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The report of the sweep, with every figure kept (plots._save spied) for inspection."""
    folder = _write(tmp_path_factory.mktemp("plots") / "s", _sweep())
    return folder, build_keeping_figures(folder)


def _labels(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    locs = axis.get_majorticklocs()
    texts = [t.get_text() for t in axis.get_ticklabels()]
    return [t for x, t in zip(locs, texts, strict=True) if t and lo <= x <= hi]


def test_every_plot_written(drawn):
    folder, figs = drawn
    for stem in ("latency", "memory", "speedup", "pareto", "exponents"):
        assert (folder / "plots" / f"{stem}.png").stat().st_size > 1000
        assert (folder / "plots" / f"{stem}.svg").stat().st_size > 1000
    assert set(figs) == {"latency", "memory", "speedup", "pareto", "exponents"}


def test_small_multiples_by_family_with_the_baseline_in_each(drawn):
    _, figs = drawn
    axes = [ax for ax in figs["latency"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["full", "linear", "local", "lowrank", "recurrent"]
    for ax in axes:
        names = ax.get_legend_handles_labels()[1]
        assert "full[sdpa] (baseline)" in names, ax.get_title()
    linear = axes[1].get_legend_handles_labels()[1]
    assert set(linear) == {"full[sdpa] (baseline)", "linear", "performer[m=256]"}
    # within a panel, labels differ in colour and marker
    lines = {ln.get_label(): ln for ln in axes[2].get_lines()}
    a, b = lines["local[w=256]"], lines["local[w=64]"]
    assert a.get_color() != b.get_color() and a.get_marker() != b.get_marker()


def test_error_axis_has_few_readable_ticks(drawn):
    _, figs = drawn
    axes = [ax for ax in figs["pareto"].axes if ax.get_visible()]
    assert len(axes) == len(NS)  # one panel per n
    for ax in axes:
        ys, xs = _labels(ax.yaxis), _labels(ax.xaxis)
        assert 2 <= len(ys) <= 8, ys
        assert 2 <= len(xs) <= 8, xs
        # 1e-7 … 1 in one panel: exact and approximate variants both inside the axis
        lo, hi = ax.get_ylim()
        assert lo < 3e-7 and hi > 1.8
    # recurrent variants are not on the error plot: their error is not comparable
    names = {t.get_text() for t in figs["pareto"].legends[0].get_texts()}
    assert "retention" not in names and "linear" in names
    # neither is a point without a softmax reference: the title counts them
    assert "local[w=32]" not in names
    title = figs["pareto"]._suptitle.get_text().replace("\n", " ")
    assert f"{len(NS)} point(s) without a softmax reference not shown" in title
    assert "red ×: failed its implementation check" in title


def test_error_axis_is_the_error_against_softmax(drawn):
    """y is softmax_rel_error: a pattern exact to its own mask (impl_error 2e-7) sits at its
    softmax error (0.6), never at rounding level; the failed check is crossed out in red."""
    _, figs = drawn
    ax = next(ax for ax in figs["pareto"].axes if ax.get_visible())
    assert ax.get_ylabel() == "error vs exact attention"
    ys = {c.get_label(): list(c.get_offsets()[:, 1]) for c in ax.collections
          if len(c.get_offsets())}
    assert ys["local[w=64]"] == [pytest.approx(0.6)]
    crosses = [c for c in ax.collections if len(c.get_offsets())
               and tuple(c.get_edgecolor()[0][:3]) == (1.0, 0.0, 0.0)]
    assert [list(c.get_offsets()[:, 1]) for c in crosses] == [[pytest.approx(0.5)]]


def test_speedup_legend_names_the_crossover(drawn):
    _, figs = drawn
    names = [n for ax in figs["speedup"].axes for n in ax.get_legend_handles_labels()[1]]
    assert any(n.startswith("local[w=256]: faster from n≈") for n in names), names
    assert "full[naive]: faster at no n" in names


@pytest.mark.parametrize("lo, hi", [(1e-9, 3.0), (2e-7, 2.0), (0.5, 900.0), (70.0, 90.0),
                                    (1e-3, 1e6), (3.0, 30.0), (1e-30, 1e3)])
def test_log_ticks_are_few_and_inside(lo, hi):
    t = plots.log_ticks(lo, hi)
    assert 2 <= len(t) <= plots.MAX_TICKS, t
    assert all(lo * (1 - 1e-9) <= x <= hi * (1 + 1e-9) for x in t)
    assert t == sorted(t) and not any(math.isnan(x) for x in t)
