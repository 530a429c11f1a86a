"""The pick table on a synthetic sweep with known winners, and the report's first screen."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report_rules import _rec, _write

from attnbench.harness.report import build as report
from attnbench.harness.report import pick

EXACT = 3e-7


def _sweep() -> list:
    """n=1024: every pick has a known clean winner, one beaten by a faster noisy point;
    n=2048: nothing exact ran, so no exact and none within 1%; n=4096: every point marked."""
    e = dict(time_exponent=1.0, memory_exponent=1.0)
    return [
        # n = 1024
        _rec(n=1024, latency_ms=10.0, rel_error=EXACT, peak_mem_bytes=8e6),
        _rec("local[w=64]", 1024, family="local", latency_ms=4.0, rel_error=EXACT,
             peak_mem_bytes=4e6, **e),
        _rec("local[w=32]", 1024, family="local", latency_ms=2.0, rel_error=EXACT, noisy=True,
             peak_mem_bytes=3e6, **e),
        _rec("nystrom[m=64]", 1024, family="lowrank", latency_ms=3.0, rel_error=5e-3,
             peak_mem_bytes=2e6, **e),
        _rec("performer[m=64]", 1024, family="linear", latency_ms=1.0, rel_error=0.05,
             peak_mem_bytes=1.5e6, **e),
        _rec("linear", 1024, family="linear", latency_ms=0.5, rel_error=0.8, peak_mem_bytes=1e6,
             **e),
        _rec("retention", 1024, family="recurrent", latency_ms=0.8, rel_error=1e-8,
             peak_mem_bytes=1.2e6, causal=False, **e),
        # n = 2048: the exact ones did not run
        _rec(n=2048, status="oom", reason="x", latency_ms=math.nan),
        _rec("nystrom[m=64]", 2048, family="lowrank", latency_ms=6.0, rel_error=0.05,
             peak_mem_bytes=4e6, **e),
        _rec("linear", 2048, family="linear", latency_ms=1.0, rel_error=0.8, peak_mem_bytes=2e6,
             **e),
        # n = 4096: all marked
        _rec(n=4096, latency_ms=160.0, rel_error=EXACT, contended=True),
        _rec("local[w=64]", 4096, family="local", latency_ms=16.0, rel_error=EXACT, noisy=True,
             **e),
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = _write(tmp_path_factory.mktemp("pick") / "s", _sweep())
    report.build_report(folder)
    return folder


def _picks(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "pick.csv", keep_default_na=False).set_index(["seq_len", "pick"])


def test_known_winners_and_their_costs(folder):
    p = _picks(folder)
    assert list(p.loc[1024].index) == ["fastest exact", "within 1%", "within 10%", "fastest",
                                       "leanest", "fastest recurrent"]
    win = {k: p.loc[(1024, k), "label"] for k in p.loc[1024].index}
    assert win == {"fastest exact": "local[w=64]", "within 1%": "nystrom[m=64]",
                   "within 10%": "performer[m=64]", "fastest": "linear", "leanest": "linear",
                   "fastest recurrent": "retention"}
    exact = p.loc[(1024, "fastest exact")]
    assert float(exact.speedup) == pytest.approx(2.5)
    assert float(exact.latency_ms) == 4.0
    assert float(exact.peak_mem_mb) == pytest.approx(4e6 / 2**20)
    # the recurrent family's 1e-8 is against its own recurrence: never exact, never within 1%
    assert "retention" not in {p.loc[(1024, k), "label"] for k in ("fastest exact", "within 1%")}


def test_a_faster_noisy_point_never_wins_silently(folder):
    exact = _picks(folder).loc[(1024, "fastest exact")]
    assert exact.label == "local[w=64]"  # chosen among clean points
    assert exact.marked_faster == "local[w=32]" and exact.marked_faster_marks == "~"
    md = (folder / "summary.md").read_text()
    assert "marked, faster: local[w=32] 2.00 ms~" in md


def test_a_budget_without_candidate_says_so(folder):
    p = _picks(folder)
    assert p.loc[(2048, "fastest exact"), "label"] == ""
    assert p.loc[(2048, "fastest exact"), "note"] == "none exact"
    assert p.loc[(2048, "within 1%"), "note"] == "none within 1%"
    assert p.loc[(2048, "within 10%"), "label"] == "nystrom[m=64]"
    assert p.loc[(2048, "fastest recurrent"), "note"] == "no recurrent variant ran"


def test_only_marked_candidates_win_with_their_mark(folder):
    p = _picks(folder)
    exact = p.loc[(4096, "fastest exact")]
    assert exact.label == "local[w=64]" and exact.note == "no clean candidate"
    assert exact.noisy == "True" and exact.contended == "False"
    line = next(s for s in (folder / "summary.md").read_text().splitlines()
                if s.startswith("- At n=4096"))
    assert "local[w=64] 16.0 ms~" in line and "measure again" in line


def test_one_sentence_per_n_first_on_the_page(folder):
    md = (folder / "summary.md").read_text()
    first = md.index("## Which attention to use")
    assert first < md.index("## Plots") < md.index("## Headlines")
    line = next(s for s in md.splitlines() if s.startswith("- At n=1024"))
    assert line.startswith("- At n=1024 (fp32 fwd, CPU): fastest exact local[w=64] 4.00 ms "
                           "(2.50× full[sdpa])")
    assert "fastest within 1%: nystrom[m=64] 3.00 ms (3.33× full[sdpa], error 0.5%)" in line
    assert "fastest recurrent: retention 0.800 ms" in line and "error not comparable" in line
    assert "leanest: linear 0.954 MB (0.125× full[sdpa])" in line
    assert "none exact; none within 1%" in md
    page = (folder / "index.html").read_text()
    assert page.index("Which attention to use") < page.index("<img")
    assert page.index('<table class="pick">') < page.index("<img")
    assert page.index("How this was measured") > page.index("<img")


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 5e-3),
                                        ("bfloat16", 2e-2)])
def test_exact_is_rounding_level_for_the_dtype(dtype, tol):
    df = report.with_derived(pd.DataFrame([
        _rec(dtype=dtype, latency_ms=2.0, rel_error=tol / 2).to_dict(),
        _rec("approx", family="linear", dtype=dtype, latency_ms=1.0,
             rel_error=tol * 2).to_dict()]), "full[sdpa]")
    p = pick.pick_table(df).set_index("pick")
    assert p.loc["fastest exact", "label"] == "full[sdpa]"
    assert p.loc["fastest", "label"] == "approx"
