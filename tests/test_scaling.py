"""Scaling fits, crossovers and the OOM frontier on synthetic records with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from attnbench.harness.report.scaling import (
    CONST,
    POWER,
    agreement,
    crossover_n,
    crossovers_table,
    drop_flat_head,
    fit_exponent,
    scaling_table,
    t975,
)

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


@pytest.mark.parametrize("c, a, k", [(16e6, 1000.0, 1.0), (5.0, 1e-6, 2.0), (0.02, 1e-7, 2.0)])
def test_a_constant_is_fitted_apart_from_the_growing_part(c, a, k):
    # e.g. the sparse engine's 16 MiB of score tiles next to memory linear in n: a log–log line
    # reads k ≈ 0.4 here
    n = np.asarray(NS, float)
    y = c + a * n**k
    assert np.polyfit(np.log(n), np.log(y), 1)[0] < k - 0.3
    fit = fit_exponent(n, y)
    assert fit["model"] == CONST and fit["dropped"] == 0
    assert fit["ci_low"] - 1e-3 <= k <= fit["ci_high"] + 1e-3
    assert fit["exponent"] == pytest.approx(k, abs=1e-3)
    assert fit["const"] == pytest.approx(c, rel=1e-3)
    assert math.exp(fit["intercept"]) == pytest.approx(a, rel=1e-2)


def test_constant_model_interval_on_noisy_data():
    n = np.geomspace(256, 32768, 8)
    hits, const = 0, 0
    for seed in range(100):
        y = (16e6 + 1000 * n) * np.exp(np.random.default_rng(seed).normal(0, 0.02, len(n)))
        fit = fit_exponent(n, y)
        const += fit["model"] == CONST
        hits += fit["ci_low"] <= 1.0 <= fit["ci_high"]
    assert const >= 90 and hits >= 85


def test_pure_power_laws_keep_the_log_log_fit():
    models = []
    for seed in range(40):
        n, y = _points(1.5, seed=seed)
        fit = fit_exponent(n, y)
        models.append(fit["model"])
        if fit["model"] == POWER:
            assert fit["exponent"] == pytest.approx(np.polyfit(np.log(n), np.log(y), 1)[0])
    assert models.count(POWER) >= 34  # the F test at 95%: a few false alarms at most
    assert fit_exponent(*_points(2.0, noise=0))["model"] == POWER


def test_flat_head_rule_of_the_power_law():
    assert drop_flat_head(NS, [1, 1.01, 1.02, 4, 16, 64]) == 2
    assert drop_flat_head(NS[:3], [1, 1, 4]) == 0


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
    assert cross == pytest.approx(2048) and text == "from n≈2048"
    assert crossover_n(n, np.full(4, 1.5))[1] == "at no n"
    assert crossover_n(n, np.full(4, 0.5))[1] == "at every n (from 512)"


def test_a_crossover_is_claimed_only_when_the_variant_stays_faster():
    cross, text = crossover_n([1024, 2048], [0.9, 1.1])
    assert math.isnan(cross) and text == "at n=1024; slower at n=2048"
    cross, text = crossover_n([512, 1024, 2048, 4096], [1.2, 0.8, 1.1, 0.7])
    assert math.isnan(cross) and text == "at n=1024, 4096; slower at n=512, 2048"
    assert crossover_n([1, 2], [1.5, 0.5], worse="more")[1].startswith("from n≈")
    assert crossover_n([1, 2, 3], [0.5, 2, 3], worse="more")[1] == "at n=1; more at n=2, 3"


def test_marked_points_are_named_with_the_crossover():
    _, text = crossover_n([1024, 2048, 4096], [1.5, 0.8, 0.5], ["", "!", "~"])
    assert text == "from n≈1601 (! contended at n=2048; ~ noisy at n=4096)"


@pytest.mark.parametrize("fit, declared, want", [
    (dict(exponent=3.80, ci_low=-15.0, ci_high=22.0), 1.0, "inconclusive"),
    (dict(exponent=1.02, ci_low=0.98, ci_high=1.06), 1.0, "yes"),
    (dict(exponent=1.02, ci_low=0.98, ci_high=1.06), 2.0, "no"),
    (dict(exponent=3.8, ci_low=2.5, ci_high=5.1), 1.0, "no"),  # wide, yet excludes 1
    (dict(exponent=1.2, ci_low=0.6, ci_high=1.8), 1.0, "inconclusive"),  # half-width 0.6
    (dict(exponent=math.nan, ci_low=math.nan, ci_high=math.nan), 2.0, "inconclusive"),
    (dict(exponent=2.0, ci_low=1.9, ci_high=2.1), math.nan, ""),
])
def test_agreement_has_three_answers(fit, declared, want):
    assert agreement(fit, declared) == want


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
    assert cross.loc["lin", "latency_crossover"] == "from n≈2048"
    assert cross.loc["lin", "memory_crossover"] == "at every n (from 256)"
    assert cross.loc["slow", "latency_crossover"] == "at no n"
    assert cross.loc["slow", "max_ok_n"] == 2048 and cross.loc["slow", "first_oom_n"] == 4096
    assert cross.loc["slow", "first_oom_status"] == "oom"
    assert math.isnan(cross.loc["lin", "first_oom_n"]) and cross.loc["lin", "max_ok_n"] == 8192
    assert cross.loc["full[sdpa]", "latency_crossover"] == "baseline"

    sc = scaling_table(df).set_index(["label", "metric"])
    assert sc.loc[("lin", "latency"), "exponent"] == pytest.approx(1.0, abs=1e-6)
    assert sc.loc[("lin", "latency"), "declared"] == 1.0
    assert sc.loc[("full[sdpa]", "memory"), "agrees"] == "yes"
    assert sc.loc[("slow", "memory"), "agrees"] == "no"
    assert sc.loc[("slow", "memory"), "model"] == POWER
    assert sc.loc[("slow", "latency"), "points"] == 4  # oom / skipped points are not fitted


def _token_budget_frame(tokens=16384, ns=(1024, 2048, 4096, 8192, 16384, 32768, 65536)):
    """The GPU presets: batch = max(1, tokens // n), so B·n is fixed up to n = tokens."""
    rows = []
    for n in ns:
        b = max(1, tokens // n)
        rows.append(dict(label="full[sdpa]", seq_len=n, batch=b, status="ok",
                         latency_ms=b * 1e-6 * n**2, peak_mem_bytes=b * 4.0 * n**2))
        rows.append(dict(label="lin", family="linear", seq_len=n, batch=b, status="ok",
                         latency_ms=b * 2e-3 * n, peak_mem_bytes=b * 64.0 * n,
                         time_exponent=1.0, memory_exponent=1.0, contended=n == 4096))
    return _frame(rows)


def test_fits_per_sequence_when_batch_varies_with_n():
    df = _token_budget_frame()
    sc = scaling_table(df).set_index(["label", "metric"])
    assert len(sc) == 4 and (sc.per == "sequence").all() and (sc.tokens == 16384).all()
    assert sc.loc[("lin", "latency"), "exponent"] == pytest.approx(1.0, abs=1e-3)
    assert sc.loc[("full[sdpa]", "latency"), "exponent"] == pytest.approx(2.0, abs=1e-3)
    assert sc.loc[("lin", "memory"), "points"] == 7
    assert "per sequence" in sc.loc[("lin", "latency"), "note"]
    assert "B·n = 16384" in sc.loc[("lin", "latency"), "note"]
    assert sc.loc[("lin", "latency"), "contended"] == 1
    assert sc.loc[("lin", "memory"), "contended"] == 0
    cross = crossovers_table(df, "full[sdpa]").set_index("label")
    assert len(cross) == 2
    assert cross.loc["lin", "latency_crossover_n"] == pytest.approx(2000, rel=0.05)
    assert cross.loc["lin", "latency_crossover"].endswith("(! contended at n=4096)")


def test_batch_crossed_with_n_still_groups_by_batch():
    rows = [dict(label="full[sdpa]", seq_len=n, batch=b, status="ok", latency_ms=b * 1e-6 * n**2,
                 peak_mem_bytes=b * 4.0 * n**2) for n in NS for b in (1, 4)]
    sc = scaling_table(_frame(rows))
    assert sorted(sc.batch.unique()) == [1, 4] and (sc.per == "call").all()
    assert (sc.points == len(NS)).all()
