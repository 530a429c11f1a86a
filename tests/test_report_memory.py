"""Memory in the report counts what a deployment holds: in decode the cache or state plus the
step's peak, otherwise the peak beyond q, k, v (columns.memory_bytes), checked on records built
to fool a peak-only report, against numbers worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report_rules import _rec, _write

from attnbench.harness import ask
from attnbench.harness.report import build as report
from attnbench.harness.report import columns, compare
from attnbench.harness.report.gather import records_frame

MB = 2**20
NS = (4096, 16384, 65536)
LIN = dict(time_exponent=1.0, memory_exponent=1.0)
# decode at n: full[sdpa]'s step peak is tiny, its KV cache huge (539 MB at 65536); linear's
# step peak is the largest of the three but its state is small and fixed; local holds a window.
FULL_PEAK, FULL_STATE_PER_N = 20_000, 539 * MB // 65536  # 8624 bytes a token
LIN_PEAK, LIN_STATE = 300_000, 200_000
LOC_PEAK, LOC_STATE = 50_000, 4 * MB


def _decode(n: int, **kw) -> list:
    return [
        _rec(n=n, mode="decode", latency_ms=2.0, softmax_rel_error=3e-7, peak_mem_bytes=FULL_PEAK,
             state_bytes=FULL_STATE_PER_N * n, **kw),
        _rec("linear", n, family="linear", mode="decode", latency_ms=1.0, softmax_rel_error=0.8,
             peak_mem_bytes=LIN_PEAK, state_bytes=LIN_STATE, **LIN),
        _rec("local[w=4096]", n, family="local", mode="decode", latency_ms=1.5,
             softmax_rel_error=0.3, peak_mem_bytes=LOC_PEAK, state_bytes=LOC_STATE, **LIN),
    ]


def _fwd(n: int) -> list:
    return [
        _rec(n=n, latency_ms=10.0, softmax_rel_error=3e-7, peak_mem_bytes=8e6),
        _rec("linear", n, family="linear", latency_ms=1.0, softmax_rel_error=0.8,
             peak_mem_bytes=1e6, **LIN),
    ]


def _with_ids(recs: list, tag: str) -> list:
    import dataclasses

    return [dataclasses.replace(r, point_id=f"{tag}-{r.point_id}") for r in recs]


@pytest.fixture(scope="module")
def fooled(tmp_path_factory):
    recs = _with_ids([r for n in NS for r in _decode(n)], "dec") + _with_ids(
        [r for n in NS for r in _fwd(n)], "fwd")
    folder = _write(tmp_path_factory.mktemp("mem") / "s", recs)
    report.build_report(folder)
    return folder


def _section(md: str, title: str) -> list[str]:
    start = md.index(f"### {title}")
    end = md.find("\n### ", start + 1)
    return md[start:end if end > 0 else None].splitlines()


def _row(lines: list[str], label: str) -> list[str]:
    line = next(x for x in lines if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_leanest_in_decode_is_the_small_state_not_the_small_peak(fooled):
    picks = pd.read_csv(fooled / "pick.csv")
    lean = picks[(picks.pick == "leanest") & (picks["mode"] == "decode")].set_index("seq_len")
    assert (lean.label == "linear").all()  # by peak alone it would be full[sdpa] at every n
    held_full = FULL_PEAK + FULL_STATE_PER_N * 65536  # 20000 + 565182464 bytes
    held_lin = LIN_PEAK + LIN_STATE  # 500000 bytes
    assert lean.loc[65536, "memory_mb"] == pytest.approx(500_000 / 1_048_576)
    assert lean.loc[65536, "memory_ratio"] == pytest.approx(held_lin / held_full)
    assert lean.loc[65536, "peak_mem_mb"] == pytest.approx(300_000 / 1_048_576)
    # forward: no state, the peak counts (1e6 vs 8e6 bytes)
    fwd = picks[(picks.pick == "leanest") & (picks["mode"] == "fwd")]
    assert (fwd.label == "linear").all()
    assert fwd.memory_ratio.tolist() == pytest.approx([0.125] * 3)
    line = next(s for s in (fooled / "summary.md").read_text().splitlines()
                if s.startswith("- At n=65536") and "decode" in s)
    assert ("leanest (memory held: cache or state + step peak): linear 0.477 MB "
            "(0.000885× full[sdpa])") in line
    assert "holds 539 MB" in (fooled / "summary.md").read_text()  # full's cost in its cells


def test_results_csv_memory_columns_by_hand(fooled):
    df = pd.read_csv(fooled / "results.csv")
    d = df[(df["mode"] == "decode") & (df.seq_len == 16384)].set_index("label")
    full = 20_000 + 8624 * 16384  # 141315616
    assert d.loc["full[sdpa]", "memory_bytes"] == full
    assert d.loc["linear", "memory_bytes"] == 500_000
    assert d.loc["local[w=4096]", "memory_bytes"] == 50_000 + 4_194_304
    assert d.loc["linear", "memory_ratio"] == pytest.approx(500_000 / 141_315_616)
    assert d.loc["local[w=4096]", "memory_mb"] == pytest.approx(4_244_304 / 1_048_576)
    f = df[df["mode"] == "fwd"]
    assert (f.memory_bytes == f.peak_mem_bytes).all()  # no state outside decode


def test_memory_tables_say_what_they_count_with_hand_values(fooled):
    md = (fooled / "summary.md").read_text()
    dec = _section(md, "Memory (MB; memory held: cache or state + step peak) — mode=decode")
    # MB = bytes / 1048576, 3 significant digits
    assert _row(dec, "full[sdpa]") == ["33.7", "135", "539"]  # 33.707, 134.77, 539.02
    assert _row(dec, "linear") == ["0.477"] * 3
    assert _row(dec, "local[w=4096]") == ["4.05"] * 3  # 4244304 / 1048576 = 4.0477
    fwd = _section(md, "Peak memory (MB; peak beyond q, k, v) — mode=fwd")
    assert _row(fwd, "linear") == ["0.954"] * 3
    ratio = _section(md, "Memory vs full[sdpa] (×, below 1: less; memory held: cache or state "
                         "+ step peak) — mode=decode")
    # 500000 / (20000 + 8624 n): 0.014147, 0.0035382, 0.00088464
    assert _row(ratio, "linear") == ["0.0141", "0.00354", "0.000885"]
    pick = _section(md, "Pick — fp32 decode, CPU")
    assert "leanest (memory held: cache or state + step peak, × full[sdpa])" in pick[2]


def test_memory_fit_and_crossover_use_what_is_held(fooled):
    sc = pd.read_csv(fooled / "scaling.csv")
    full = sc[(sc.label == "full[sdpa]") & (sc.metric == "memory") & (sc["mode"] == "decode")]
    # 20000 + 8624 n over n = 4096…65536: the cache dominates, slope ≈ 1 (peak alone: 0)
    assert full.exponent.iloc[0] == pytest.approx(1.0, abs=0.05)
    cross = pd.read_csv(fooled / "crossovers.csv")
    lin = cross[(cross.label == "linear") & (cross["mode"] == "decode")]
    assert lin.memory_crossover.iloc[0].startswith("at every n")


def test_a_decode_record_without_state_is_said_not_guessed(tmp_path):
    recs = _decode(4096)
    recs[0] = _rec(n=4096, mode="decode", latency_ms=2.0, softmax_rel_error=3e-7,
                   peak_mem_bytes=FULL_PEAK)  # an old record: no state_bytes
    folder = _write(tmp_path / "s", recs)
    report.build_report(folder)
    df = pd.read_csv(folder / "results.csv").set_index("label")
    assert math.isnan(df.loc["full[sdpa]", "memory_bytes"])
    assert math.isnan(df.loc["linear", "memory_ratio"])  # nothing to compare with
    lean = pd.read_csv(folder / "pick.csv").set_index("pick").loc["leanest"]
    assert lean.label == "linear" and "no state recorded: full[sdpa]" in lean.note
    md = (folder / "summary.md").read_text()
    assert _row(_section(md, "Memory (MB; memory held"), "full[sdpa]") == ["no state"]
    assert "[not ranked, no state recorded: full[sdpa]]" in md


def test_one_definition_for_the_report_and_the_pick_command(fooled):
    df = records_frame(fooled)
    mem = columns.memory_bytes(df)
    for (_, row), m in zip(df.iterrows(), mem, strict=True):
        assert ask.held_bytes(row.to_dict()) == m
    assert ask.held_bytes({"mode": "decode", "peak_mem_bytes": 10}) != 10  # NaN: not the peak


def test_compare_memory_ratio_counts_the_state(tmp_path):
    a = records_frame(_write(tmp_path / "a", _decode(4096)))
    recs = _decode(4096)
    import dataclasses

    recs[1] = dataclasses.replace(recs[1], state_bytes=4 * LIN_STATE)  # linear's state × 4
    b = records_frame(_write(tmp_path / "b", recs))
    m = compare.compare_frames(a, b).set_index("label")
    assert m.loc["linear", "memory_ratio"] == pytest.approx((300_000 + 800_000) / 500_000)
    assert m.loc["full[sdpa]", "memory_ratio"] == 1.0


@pytest.mark.parametrize(("option", "declared"), [
    ({"name": "full"}, (1.0, 1.0)), ({"name": "linear"}, (0.0, 0.0)),
    ({"name": "local"}, (0.0, 0.0)), ({"name": "retnet"}, (0.0, 0.0))])
def test_a_decode_record_declares_the_growth_of_a_step_and_of_what_it_holds(option, declared):
    """In decode the scaling table judges a step's time and the memory held (cache or state +
    step), not the forward's: full's cache grows as n (its forward's peak exponent is 1 or 2),
    a state or ring stays flat. A forward record keeps the forward's exponents."""
    from attnbench import variants
    from attnbench.harness.run.config import from_dictconfig
    from attnbench.harness.run.job import run_point

    base = dict(variant=option, batch=1, heads=2, seq_len=64, head_dim=8, device="cpu",
                timing={"warmup": 0, "min_reps": 1, "min_time_s": 0}, error={"rows": 4})
    rec = run_point(from_dictconfig({**base, "mode": "decode", "causal": True}))
    assert rec.status == "ok", rec.reason
    assert (rec.time_exponent, rec.memory_exponent) == declared
    fwd = run_point(from_dictconfig({**base, "mode": "fwd", "causal": True}))
    att = variants.build(option["name"])
    assert (fwd.time_exponent, fwd.memory_exponent) == (att.time_exponent, att.memory_exponent)
