"""A sweep over causal=true,false measures each variant in the forms it has: a point whose
variant has no form for its causal value is left out (one log line), while one causal value asked
explicitly still gives an `unsupported` row; the default sweeps measure every family, causal and
non-causal, with no `unsupported` point for a built-in on a CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_cli import REPO, TINY
from test_cli import attnbench as _cli

from attnbench import variants
from attnbench.harness.run.plan import plan


def attnbench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return _cli(*args, cwd=cwd, timeout=600)  # a default sweep's plan and points: slower


def forms(planned) -> set[tuple[str, bool]]:
    return {(p.label, p.run.causal) for p in planned}


def test_both_causal_values_keep_each_variants_own_forms():
    planned, _ = plan(["variant=linformer,retnet,local", "seq_len=256", "causal=true,false",
                       *TINY])
    assert forms(planned) == {("linformer[k=256]", False), ("retnet", True),
                              ("local[w=256]", True), ("local[w=256]", False)}
    assert all(p.outcome == "run" for p in planned), [(p.label, p.reason) for p in planned]


def test_one_causal_value_asked_is_an_unsupported_row():
    planned, _ = plan(["variant=linformer,retnet", "seq_len=256", "causal=true", *TINY])
    outcome = {p.label: p.outcome for p in planned}
    assert outcome == {"linformer[k=256]": "unsupported", "retnet": "run"}
    planned, _ = plan(["variant=retnet", "seq_len=256", "causal=false", *TINY])
    assert [p.outcome for p in planned] == ["unsupported"]
    assert "causal only" in planned[0].reason


def test_a_variant_unsupported_both_ways_keeps_its_rows():
    """linformer with k=256 > n=64 runs neither way: its rows say why, nothing is left out."""
    planned, _ = plan(["variant=linformer", "seq_len=64", "causal=true,false", *TINY])
    assert forms(planned) == {("linformer[k=256]", True), ("linformer[k=256]", False)}
    assert all(p.outcome == "unsupported" for p in planned)
    assert all("k=256 > seq_len=64" in p.reason for p in planned)


def test_a_causal_sweep_runs_only_the_forms_that_exist(tmp_path):
    out = tmp_path / "sweep"
    proc = attnbench("-m", "variant=nystrom,retnet,full", "seq_len=128", "causal=true,false",
                     *TINY, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert (df.status == "ok").all(), df[["label", "status", "reason"]]
    got = set(zip(df.label, df.causal, strict=True))
    assert got == {("nystrom[m=64]", False), ("retnet", True), ("full[sdpa]", True),
                   ("full[sdpa]", False)}
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if "left out" in x]
    assert len(said) == 1, said
    assert "non-causal only: nystrom[m=64]" in said[0] and "causal only: retnet" in said[0]


def test_the_default_cpu_sweep_measures_every_family_in_both_forms():
    planned, _ = plan(["+sweep=default_cpu", "device=cpu"])
    bad = [(p.label, p.run.seq_len, p.run.causal, p.reason) for p in planned
           if p.outcome != "run"]
    assert bad == []
    families = {variants.build(p.run.variant, **p.run.params).family for p in planned}
    assert families == {"full", "local", "sparse", "linear", "lowrank", "recurrent"}
    both = {label for label, _ in forms(planned)}
    for label in both:  # each variant in every form it has
        causal = {c for (x, c) in forms(planned) if x == label}
        att = next(p for p in planned if p.label == label)
        for c in (True, False):
            supported = not variants.build(att.run.variant, **att.run.params) \
                .not_supported_reasons(att.run.shape, att.run.torch_dtype, "cpu", c, "fwd")
            assert (c in causal) == supported, (label, c)
    assert len({p.run.seq_len for p in planned}) == 4


@pytest.mark.parametrize("preset", ["default_gpu"])
def test_the_default_gpu_sweep_sweeps_both_forms(preset):
    planned, _ = plan([f"+sweep={preset}", "device=cpu", "dtype=float32"])
    assert {p.run.causal for p in planned} == {True, False}
    assert not [p for p in planned if p.outcome == "unsupported"]
    assert ("retnet", False) not in forms(planned) and ("retnet", True) in forms(planned)
