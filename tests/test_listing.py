"""`attnbench list`: every registered variant, a row per full backend, availability and reasons."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import typing
from pathlib import Path

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
    assert full["full[naive]"]["available"] == "yes"
    assert full["full[naive]"]["time"] == "O(n^2)" and full["full[naive]"]["memory"] == "O(n^2)"
    assert full["full[sdpa]"]["memory"] == "O(n)"
    assert "backend=sdpa" in full["full[sdpa]"]["params"]
    xf = full["full[xformers]"]
    assert xf["available"] == "no" and "xformers" in xf["reason"]
    assert full["full[flex]"]["available"] == "fwd only"
    assert full["full[sdpa:cudnn]"]["available"] == "no"
    for r in rows:
        assert r["family"] in typing.get_args(Family), r
        assert (r["available"] == "yes") == (r["reason"] == ""), r


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
    assert "availability on cpu" in out


def test_cli_subcommand():
    proc = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "list", "--format",
                           "csv"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("name,label,family,params,time,memory,available,causal,gqa,"
                                  "q_len,decode,reason")
    assert "full[sdpa]" in proc.stdout
