"""`attnbench list`: every registered variant, a row per full backend, availability and reasons."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import typing
from pathlib import Path

import torch

from attnbench import variants
from attnbench.harness import listing
from attnbench.variants.base import Family

REPO = Path(__file__).resolve().parent.parent


def csv_rows(capsys, *args: str) -> list[dict[str, str]]:
    assert listing.main(["--format", "csv", *args]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_every_variant_listed_and_full_per_backend(capsys):
    rows = csv_rows(capsys, "--device", "cpu")
    assert {r["name"] for r in rows} == set(variants.names())
    full = {r["label"]: r for r in rows if r["name"] == "full"}
    for label in ("full[naive]", "full[sdpa]", "full[xformers]", "full[flex]", "full[sdpa:flash]"):
        assert label in full
    assert full["full[naive]"]["noncausal"] == full["full[naive]"]["causal"] == "yes"
    assert full["full[naive]"]["decode"] == "yes"
    assert full["full[naive]"]["time"] == "O(n^2)" and full["full[naive]"]["memory"] == "O(n^2)"
    assert full["full[sdpa]"]["memory"] == "O(n)"
    assert "backend=sdpa" in full["full[sdpa]"]["params"]
    xf = full["full[xformers]"]
    assert xf["noncausal"] == xf["causal"] == xf["decode"] == "no" and "xformers" in xf["reason"]
    assert full["full[flex]"]["noncausal"] == "fwd only"
    assert full["full[sdpa:cudnn]"]["causal"] == "no"
    for r in rows:
        assert r["family"] in typing.get_args(Family), r
        every = all(r[m] == "yes" for m in listing.MODES)
        assert every == (r["reason"] == ""), r


def test_causal_only_families_say_they_run_causal_on_a_cpu(capsys):
    """The recurrent family, MoBA and NSA have no non-causal form but run causal here: the list
    must not call them unavailable."""
    rows = {r["name"]: r for r in csv_rows(capsys, "--device", "cpu")}
    for name in ("retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "moba", "nsa"):
        assert rows[name]["noncausal"] == "no" and rows[name]["causal"] == "yes", rows[name]
        assert "noncausal:" in rows[name]["reason"], rows[name]


def test_markdown_table_and_a_broken_variant_is_a_row(capsys, monkeypatch):
    real = variants.build

    def build(name, **params):
        if params.get("backend") == "flex":
            raise RuntimeError("cannot build")
        return real(name, **params)

    monkeypatch.setattr(variants, "build", build)
    assert listing.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= set("|- ")
    assert "| full[naive]" in out
    assert "RuntimeError: cannot build" in out
    assert "support on cpu" in out


def test_cli_subcommand():
    proc = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "list", "--format",
                           "csv"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("name,label,family,params,time,memory,exec/algo,noncausal,"
                                  "causal,decode,gqa,q_len,reason")
    assert "full[sdpa]" in proc.stdout


def test_exec_over_algo_is_stated_at_its_reference_point():
    """full[naive] executes the whole square of a causal point (×2.00 of the triangle at
    n=8192: 8192² over 8192·8193/2); fused sdpa only the triangle (×1)."""
    rows = {r.label: r for r in listing.rows("cpu", torch.float32)}
    n = listing.FLOPS_SHAPE.seq_len
    assert rows["full[naive]"].exec_algo == f"×{n * n / (n * (n + 1) / 2):.2f}"
    assert rows["full[sdpa]"].exec_algo == "×1"
