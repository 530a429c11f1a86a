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
