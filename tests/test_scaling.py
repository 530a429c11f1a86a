"""Scaling fits, crossovers and the OOM frontier on synthetic records with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.scaling import crossover_n, crossovers_table, fit_exponent, scaling_table, t975

NS = [256, 512, 1024, 2048, 4096, 8192]


def _points(exponent, noise=0.03, seed=0, ns=NS, scale=1e-6):
    rng = np.random.default_rng(seed)
    n = np.asarray(ns, float)
    return n, scale * n**exponent * np.exp(rng.normal(0, noise, len(n)))


@pytest.mark.parametrize("exponent", [1.0, 2.0, 1.5])
def test_fit_recovers_known_exponent_with_interval(exponent):
    n, y = _points(exponent, seed=0)
    fit = fit_exponent(n, y)
    assert fit["ci_low"] <= exponent <= fit["ci_high"]
    assert abs(fit["exponent"] - exponent) < 0.05
    assert 0 < fit["ci_high"] - fit["ci_low"] < 0.3
    assert fit["points"] == len(NS) and fit["dropped"] == 0


def test_flat_head_is_dropped_by_its_rule():
    n = np.asarray(NS, float)
    y = 0.02 + 1e-7 * n**2  # a fixed 0.02 ms dominates up to n ≈ 450
    fit = fit_exponent(n, y)
    assert fit["dropped"] >= 1 and fit["n_min"] >= 512
    assert fit["exponent"] > 1.8
    naive = np.polyfit(np.log(n), np.log(y), 1)[0]
    assert naive < fit["exponent"]


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    hits = 0
    for seed in range(200):
        fit = fit_exponent(*_points(2.0, noise=0.05, seed=seed, ns=NS[:4]))
        hits += fit["ci_low"] <= 2.0 <= fit["ci_high"]
    assert 0.90 <= hits / 200 <= 0.99


def test_two_points_are_insufficient():
    fit = fit_exponent([1024, 2048], [1.0, 4.0])
    assert math.isnan(fit["exponent"]) and fit["note"] == "insufficient points"
    assert math.isnan(fit_exponent([1024, 1024, 2048], [1, 1.1, 4])["exponent"])


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706)
    assert t975(30) == pytest.approx(2.042)
    assert t975(60) == pytest.approx(2.000, abs=2e-3)
    assert t975(1000) == pytest.approx(1.962, abs=2e-3)


def test_crossover_interpolates_in_log_log():
    # ratio = n / 2048: equal to 1 exactly at 2048, crossing between 1024 (2) and 4096 (0.5)
    n = np.array([512, 1024, 4096, 8192], float)
    cross, text = crossover_n(n, 2048 / n)
    assert cross == pytest.approx(2048) and text == "≈ 2048"
    assert crossover_n(n, np.full(4, 1.5)) == (pytest.approx(math.nan, nan_ok=True),
                                               "none within the sweep")
    assert crossover_n(n, np.full(4, 0.5))[1].startswith("below the sweep")


def _frame(rows):
    base = dict(family="full", dtype="float32", mode="fwd", device="cpu", causal=False, batch=1,
                heads=2, head_dim=16, inputs="gaussian", time_exponent=2.0,
                memory_exponent=2.0)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_crossovers_and_oom_frontier():
    rows = []
    for n in NS:
        rows.append(dict(label="full[sdpa]", seq_len=n, status="ok", latency_ms=1e-6 * n**2,
                         peak_mem_bytes=4.0 * n**2))
        # linear variant: slower than full below 2048, faster above; memory always smaller
        lin = dict(label="lin", family="linear", seq_len=n, time_exponent=1.0,
                   memory_exponent=1.0)
        rows.append(dict(lin, status="ok", latency_ms=2048e-6 * n, peak_mem_bytes=n * 1.0))
        # never faster; runs out of memory at 4096
        status = "ok" if n < 4096 else ("oom" if n == 4096 else "skipped")
        rows.append(dict(label="slow", seq_len=n, status=status, latency_ms=2e-6 * n**2,
                         peak_mem_bytes=8.0 * n**2, memory_exponent=1.0))  # declared wrongly
    df = _frame(rows)
    cross = crossovers_table(df, "full[sdpa]").set_index("label")
    assert cross.loc["lin", "latency_crossover_n"] == pytest.approx(2048)
    assert cross.loc["lin", "memory_crossover"].startswith("below the sweep")
    assert cross.loc["slow", "latency_crossover"] == "none within the sweep"
    assert cross.loc["slow", "max_ok_n"] == 2048 and cross.loc["slow", "first_oom_n"] == 4096
    assert cross.loc["slow", "first_oom_status"] == "oom"
    assert math.isnan(cross.loc["lin", "first_oom_n"]) and cross.loc["lin", "max_ok_n"] == 8192
    assert cross.loc["full[sdpa]", "latency_crossover"] == "baseline"

    sc = scaling_table(df).set_index(["label", "metric"])
    assert sc.loc[("lin", "latency"), "exponent"] == pytest.approx(1.0, abs=1e-6)
    assert sc.loc[("lin", "latency"), "declared"] == 1.0
    assert sc.loc[("full[sdpa]", "memory"), "agrees"]
    assert not sc.loc[("slow", "memory"), "agrees"]
    assert sc.loc[("slow", "latency"), "points"] == 4  # oom / skipped points are not fitted
