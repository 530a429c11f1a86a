"""How records are stored: strict JSON, ordinary file modes, folders named by identity, temp files
of killed writers removed, gathers serialised."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from attnbench.harness.records import (
    STALE_TMP_S,
    Record,
    find_records,
    read_record,
    remove_stale_temps,
    write_record,
)
from attnbench.harness.report.gather import gather, sweep_lock
from attnbench.harness.run.compose import CONF_DIR
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.point import point_id
from attnbench.harness.run.task import point_folder_of

BASE = dict(variant="full", label="full[sdpa]", family="full", params="{}", batch=1, heads=1,
            seq_len=64, head_dim=8, dtype="float32", device="cpu", causal=False, mode="fwd",
            inputs="gaussian", seed=0, status="skipped", point_id="p", timestamp="t")


def _forbid(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def test_records_are_strict_json_and_null_reads_back_as_nan(tmp_path):
    rec = Record(**BASE, flops=math.inf, tflops=-math.inf)  # latency etc. stay NaN
    path = write_record(rec, tmp_path / "a")
    text = path.read_text()
    data = json.loads(text, parse_constant=_forbid)  # no NaN / Infinity literals
    assert data["latency_ms"] is None and data["flops"] is None
    back = read_record(path)
    assert math.isnan(back.latency_ms) and math.isnan(back.flops)
    assert back.status == "skipped" and back.seq_len == 64


def test_files_are_created_like_ordinary_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_record(Record(**BASE), tmp_path / "a")
        csv = gather(tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert csv.stat().st_mode & 0o777 == 0o644


def test_temp_files_of_killed_writers_are_removed_at_the_next_gather(tmp_path):
    write_record(Record(**BASE), tmp_path / "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / "a" / f".result.json~{host}~{dead.pid}~0badf00d.tmp"
    live = tmp_path / "b" / f".result.json~{host}~{os.getpid()}~0badf00d.tmp"
    old_style = tmp_path / "c" / ".result.abc123.tmp"  # an older writer's mkstemp name
    for p in (killed, live, old_style):
        p.parent.mkdir(exist_ok=True)
        p.write_text("{")
    stale = time.time() - STALE_TMP_S - 60
    os.utime(old_style, (stale, stale))
    gather(tmp_path)
    assert not killed.exists() and not old_style.exists()
    assert live.exists()  # a writer still at work keeps its temp file
    assert [p.parent.name for p in find_records(tmp_path)] == ["a"]
    assert remove_stale_temps(tmp_path) == []


def _run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return from_dictconfig(compose("config", overrides=list(overrides)))


def test_a_point_folder_is_named_by_what_it_measures():
    a = _run("variant=local", "seq_len=512", "causal=true")
    same = [
        _run("seq_len=512", "causal=true", "variant=local"),  # another order
        _run("variant=local", "variant.window=256", "seq_len=512", "causal=true"),  # defaults
        _run("variant=local", "seq_len=512", "causal=true", "threads=1", "max_memory=1GB",
             "timing.min_reps=9", "resume=true"),  # how, not what, it measures
    ]
    for run in same:
        assert point_id(run) == point_id(a) and point_folder_of(run) == point_folder_of(a)
    other = [_run("variant=local", "seq_len=512"), _run("variant=local", "seq_len=1024",
             "causal=true"), _run("variant=local", "variant.window=64", "seq_len=512",
             "causal=true"), _run("variant=local", "seq_len=512", "causal=true", "seed=1")]
    assert len({point_folder_of(r) for r in [a, *other]}) == 5
    name = point_folder_of(a)
    assert name.startswith("local_w=256-n512-float32-fwd-causal-") and name.endswith(point_id(a))
    assert "/" not in point_folder_of(_run("variant=full", "variant.backend=naive"))


def test_the_sweep_lock_is_exclusive_across_processes_and_reentrant(tmp_path):
    leaving = tmp_path / "leaving"
    holder = (f"import sys, time, pathlib; sys.path.insert(0, {str(Path.cwd())!r});"
              "from attnbench.harness.report.gather import sweep_lock\n"
              f"with sweep_lock({str(tmp_path)!r}):\n"
              "    print('held', flush=True); time.sleep(1)\n"
              f"    pathlib.Path({str(leaving)!r}).touch()\n")
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with sweep_lock(tmp_path), sweep_lock(tmp_path):  # waits for the other process; re-enters
        assert leaving.exists()  # we got the lock only once the other process was done with it
    assert proc.wait() == 0


@pytest.mark.parametrize("status", ["ok", "error"])
def test_gather_keeps_one_row_per_point(tmp_path, status):
    write_record(Record(**{**BASE, "status": status, "timestamp": "1"}), tmp_path / "old" / "x")
    write_record(Record(**{**BASE, "status": "ok", "timestamp": "2"}), tmp_path / "x")
    df = pd.read_csv(gather(tmp_path))
    assert len(df) == 1 and df.timestamp.iloc[0] == 2


def test_decode_is_one_point_whatever_causal_says():
    """Decode is causal by nature: the config is normalised before its identity is taken, so
    `mode=decode causal=true,false` is one point (measured once, one folder), not two."""
    a = _run("mode=decode", "causal=true", "seq_len=64")
    b = _run("mode=decode", "causal=false", "seq_len=64")
    assert a.causal and b.causal
    assert point_id(a) == point_id(b)
    assert point_folder_of(a) == point_folder_of(b)
    assert point_id(_run("causal=true", "seq_len=64")) != point_id(_run("seq_len=64"))


def _old(tmp_path, name, **fields) -> Record:
    """A result.json as written before impl_error: one rel_error, against error_ref."""
    data = dict(BASE, status="ok", latency_ms=1.0, **fields)
    (tmp_path / name).mkdir()
    (tmp_path / name / "result.json").write_text(json.dumps(data))
    return read_record(tmp_path / name / "result.json")


def test_old_records_with_rel_error_still_read(tmp_path):
    """rel_error was the implementation check for patterns, MoBA, NSA and the recurrent family,
    and the softmax error for linear and low-rank (error_ref says which); full's mask is every
    key, so its check is also its softmax error. A pattern has no softmax error then."""
    local = _old(tmp_path, "a", family="local", rel_error=3e-7, error_ref="masked softmax")
    assert local.impl_error == 3e-7 and local.impl_ok and local.error_ref == "masked softmax"
    assert math.isnan(local.softmax_rel_error) and "no softmax reference" in local.quality_note
    full = _old(tmp_path, "b", rel_error=4e-7, error_ref="masked softmax")
    assert full.impl_error == full.softmax_rel_error == 4e-7 and full.error_ref == "softmax"
    lin = _old(tmp_path, "c", family="linear", rel_error=0.8, max_abs_error=2.0,
               error_ref="softmax")
    assert lin.softmax_rel_error == 0.8 and math.isnan(lin.impl_error) and lin.error_ref == ""
    assert math.isnan(lin.max_abs_error) and lin.impl_ok
    moba = _old(tmp_path, "d", family="sparse", rel_error=0.3, error_ref="own definition",
                softmax_rel_error=0.4)
    assert moba.impl_error == 0.3 and not moba.impl_ok and moba.softmax_rel_error == 0.4
    rnn = _old(tmp_path, "e", family="recurrent", rel_error=1e-8, error_ref="own definition")
    assert rnn.impl_ok and "replaces softmax" in rnn.quality_note
    new = write_record(Record(**dict(BASE, impl_error=0.5, impl_ok=False)), tmp_path / "f")
    assert read_record(new).impl_error == 0.5 and not read_record(new).impl_ok


def test_a_sweep_reads_only_its_own_points_not_a_sweep_nested_in_it(tmp_path):
    """A sweep written into A/nested is another sweep: its record of the same point (newer)
    must not replace A's own."""
    from attnbench.harness.report.gather import records_frame

    own = Record(**{**BASE, "status": "ok", "latency_ms": 1.0, "timestamp": "1"})
    write_record(own, tmp_path / "full-n64-p")
    write_record(Record(**{**BASE, "status": "ok", "latency_ms": 99.0, "timestamp": "2"}),
                 tmp_path / "nested" / "full-n64-p")
    assert find_records(tmp_path) == [tmp_path / "full-n64-p" / "result.json"]
    df = records_frame(tmp_path)
    assert len(df) == 1 and df.latency_ms.iloc[0] == 1.0
    single = write_record(own, tmp_path / "run")  # a single run's folder holds its record
    assert find_records(single.parent) == [single]


@pytest.mark.parametrize(("field", "text"), [
    ("latency_ms", "Infinity"), ("impl_error", "-Infinity"), ("softmax_rel_error", "Infinity"),
    ("flops", "1e300"),
    ("seq_len", "1e300"), ("seq_len", "100000000000000000000000000000"), ("tflops", "-1"),
    ("reps", "-3")])
def test_a_record_holding_infinity_or_an_absurd_value_is_skipped(tmp_path, capsys, field, text):
    from attnbench.harness.report import build

    good = Record(**{**BASE, "status": "ok", "latency_ms": 1.0, "latency_p10_ms": 0.9,
                     "latency_p90_ms": 1.1})
    write_record(good, tmp_path / "good")
    data = json.loads((tmp_path / "good" / "result.json").read_text())
    data.update(point_id="bad", seq_len=128)
    path = tmp_path / "bad" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data).replace(f'"{field}": {json.dumps(data[field])}',
                                             f'"{field}": {text}'))
    with pytest.raises(ValueError, match=field):
        read_record(path)
    assert build.main([str(tmp_path)]) == 0  # the report of the good one; no traceback
    out, err = capsys.readouterr()
    assert "used 1 records, skipped 1" in out and str(path) in err


def test_points_are_filed_by_identity_whatever_hydra_s_subdir_says(tmp_path):
    """Under Hydra's own sweeper (no attnbench check of the override), a `hydra.sweep.subdir`
    shared by every job still cannot make one point overwrite another."""
    proc = subprocess.run(
        [sys.executable, "-m", "attnbench.harness.cli", "-m", "hydra/sweeper=basic",
         "hydra.sweep.subdir=same", "variant=full", "seq_len=32,64", "batch=1", "heads=1",
         "head_dim=8", "timing.min_reps=1", "timing.min_time_s=0", "timing.warmup=0",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(find_records(tmp_path)) == 2
    assert sorted(pd.read_csv(tmp_path / "results.csv").seq_len) == [32, 64]
