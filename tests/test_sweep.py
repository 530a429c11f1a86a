"""End to end: Hydra multirun on tiny sizes → one record per point → results.csv."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnbench.harness.records import Record, load_records, read_record, write_record
from attnbench.harness.run.config import ConfigError, from_dictconfig
from attnbench.harness.run.job import run_point

REPO = Path(__file__).resolve().parent.parent
TINY = ["batch=1", "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1"]


def attnbench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attnbench.harness.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_multirun_gathers_exactly_the_expected_rows(tmp_path):
    out = tmp_path / "sweep"
    proc = attnbench(
        "-m", "variant=full", "variant.backend=naive,sdpa,xformers", "seq_len=64,96", "device=cpu",
        "causal=false,true", *TINY, f"hydra.sweep.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 3 * 2 * 2
    got = set(zip(df.label, df.seq_len, df.causal, strict=True))
    want = {(f"full[{b}]", n, c) for b in ("naive", "sdpa", "xformers") for n in (64, 96)
            for c in (False, True)}
    assert got == want
    ok = df[df.label != "full[xformers]"]
    assert (ok.status == "ok").all(), ok[["label", "status", "reason"]]
    assert (ok.latency_ms > 0).all() and (ok.peak_mem_bytes > 0).all()
    assert (ok.latency_p10_ms <= ok.latency_ms).all()
    assert (ok.latency_ms <= ok.latency_p90_ms).all()
    assert (ok.impl_error < 1e-5).all() and (ok.softmax_rel_error < 1e-5).all()
    xf = df[df.label == "full[xformers]"]
    assert (xf.status == "unsupported").all() and xf.reason.str.contains("xformers").all()
    # each job wrote its own record
    assert len(list(out.glob("*/result.json"))) == 12


def ran_ok(stdout: str, label: str) -> bool:
    """Whether a run printed the line of `label`'s point with its outcome `ok`, said
    `contended` where others took a share of the machine while it was timed (CI's VM is shared:
    which of the two is not a test's to decide)."""
    lines = [x for x in stdout.splitlines() if x.startswith(label)]
    return bool(lines) and re.search(r", (ok|contended)\b", lines[-1]) is not None


def test_single_run_prints_a_line_and_writes_a_record(tmp_path):
    proc = attnbench("seq_len=64", *TINY, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert ran_ok(proc.stdout, "full[sdpa] n=64"), proc.stdout
    rec = read_record(tmp_path / "result.json")
    assert rec.status == "ok" and rec.seq_len == 64 and rec.torch_version


def _run(**over):
    base = dict(variant={"name": "full", "backend": "sdpa"}, batch=1, heads=2, seq_len=32,
                head_dim=8, timing={"warmup": 0, "min_reps": 1, "min_time_s": 0})
    base.update(over)
    return from_dictconfig(base)


def test_fwd_bwd_point_measures_gradients():
    rec = run_point(_run(mode="fwd_bwd"))
    assert rec.status == "ok", rec.reason
    fwd = run_point(_run())
    assert rec.flops == pytest.approx(3.5 * fwd.flops)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="seqlen"):
        _run(seqlen=3)


def test_record_roundtrip_and_corrupt_record_skipped(tmp_path):
    rec = run_point(_run())
    write_record(rec, tmp_path / "a")
    same = read_record(tmp_path / "a" / "result.json")
    assert json.dumps(same.to_dict()) == json.dumps(rec.to_dict())  # NaN-safe equality
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result.json").write_text('{"variant": "full"')
    foreign = dict(json.loads((tmp_path / "a" / "result.json").read_text()), seq_len=-5)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text(json.dumps(foreign))
    with pytest.warns(UserWarning) as caught:
        recs = load_records(tmp_path)
    assert [r.point_id for r in recs] == [rec.point_id]
    text = " ".join(str(w.message) for w in caught)
    assert str(tmp_path / "b" / "result.json") in text and "seq_len" in text
    assert isinstance(recs[0], Record)


def test_decode_multirun_with_grouped_heads(tmp_path):
    out = tmp_path / "sweep"
    proc = attnbench("-m", "variant=full,linformer,retnet", "mode=decode", "kv_heads=1,2",
                     "seq_len=64,128", "heads=4", "batch=1", "head_dim=16",
                     "timing.min_reps=2", "timing.min_time_s=0", "timing.warmup=1",
                     f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 3 * 2 * 2 and set(df.kv_heads) == {1, 2}
    assert (df["mode"] == "decode").all() and df.causal.all()
    ok = df[df.variant != "linformer"]
    assert (ok.status == "ok").all(), ok[["label", "status", "reason"]]
    assert (ok.state_bytes > 0).all() and (ok.impl_error < 1e-4).all()
    full = ok[ok.variant == "full"].set_index(["kv_heads", "seq_len"]).state_bytes
    assert full[(2, 128)] > full[(2, 64)] and full[(1, 64)] < full[(2, 64)]  # cache ∝ n·Hkv
    rnn = ok[ok.variant == "retnet"].set_index(["kv_heads", "seq_len"]).state_bytes
    assert rnn[(2, 128)] == rnn[(2, 64)]  # a recurrent state does not grow with the context
    lf = df[df.variant == "linformer"]
    assert (lf.status == "unsupported").all() and lf.reason.str.contains("decode").all()
