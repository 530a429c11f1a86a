"""threads=0 computes with the cores other processes leave free (measured from /proc/stat when a
process starts), every record says how many threads it used, and a contended point's progress
line says `contended`, not `ok`."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench.harness.records import Record
from attnbench.harness.run import contention, progress
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.contention import CpuSnapshot, others_leave
from attnbench.harness.run.job import DEFAULT_THREADS, auto_threads, run_point

REPO = Path(__file__).resolve().parent.parent
TINY = {"batch": 1, "heads": 2, "head_dim": 16, "seq_len": 64,
        "timing": {"min_reps": 2, "min_time_s": 0, "warmup": 1}}


def test_others_leave_the_cores_they_do_not_use():
    assert others_leave(2, 0.05) == 2  # an idle machine's background takes no core
    assert others_leave(2, 0.5) == 1
    assert others_leave(2, 1.9) == 1 and others_leave(2, 7.0) == 1  # never fewer than one
    assert others_leave(8, 1.3) == 6  # a core used more than a quarter is taken
    assert others_leave(8, 1.2) == 7
    assert others_leave(4, math.nan) == 4  # no /proc/stat: every core


def test_free_cores_reads_what_others_took_over_its_window(monkeypatch):
    # 1 s on 4 CPUs: the machine was busy 2.5 CPU-s, of which this process 0.5: others took 2
    snaps = iter([CpuSnapshot(0.0, 0.0, 100.0, 4), CpuSnapshot(1.0, 0.5, 102.5, 4)])
    monkeypatch.setattr(contention, "snapshot", lambda: next(snaps))
    monkeypatch.setattr(contention.time, "sleep", lambda s: None)
    assert contention.free_cores(4) == 2


def test_every_record_says_its_threads():
    auto = run_point(from_dictconfig({**TINY, "variant": {"name": "local"}}))
    assert auto.status == "ok" and auto.threads == auto_threads()
    assert 1 <= auto.threads <= DEFAULT_THREADS
    one = run_point(from_dictconfig({**TINY, "threads": 1, "variant": {"name": "local"}}))
    assert one.threads == 1
    unsupported = run_point(from_dictconfig({**TINY, "variant": {"name": "retnet"}}))
    assert unsupported.status == "unsupported" and unsupported.threads == auto_threads()
    there = run_point(from_dictconfig({**TINY, "threads": 1, "isolate": True,
                                       "variant": {"name": "full"}}))
    assert there.status == "ok" and there.threads == 1


def _hog(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


@pytest.mark.skipif(DEFAULT_THREADS < 2 or not os.path.exists("/proc/stat"),
                    reason="needs 2 or more cores and /proc/stat")
def test_auto_threads_leave_out_the_cores_others_keep_busy():
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-c", "from attnbench.harness.run.job import "
                               "auto_threads; print(auto_threads())"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        for h in hogs:
            h.join(5)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) <= DEFAULT_THREADS - 1


def _record(**kw) -> Record:
    base = dict(variant="local", label="local[w=256]", family="local", params="{}", batch=1,
                heads=2, seq_len=64, head_dim=16, dtype="float32", device="cpu", causal=False,
                mode="fwd", inputs="gaussian", seed=0, status="ok", latency_ms=1.0,
                latency_p10_ms=0.9, latency_p90_ms=1.1, peak_mem_bytes=2**20, tflops=0.01)
    return Record(**{**base, **kw})


def test_the_progress_line_says_contended_instead_of_ok():
    assert _record().line().endswith(", ok")  # what the substitution below relies on
    quiet = progress.line(_record(), None)
    assert quiet.endswith(", ok") and "contended" not in quiet
    busy = progress.line(_record(contended=True), None)
    assert busy.endswith(", contended") and ", ok" not in busy
    both = progress.line(_record(contended=True, noisy=True), 3)
    assert "contended (noisy)" in both and ", ok" not in both and both.startswith("[4]")
    failed = progress.line(_record(status="error", reason="boom", contended=True), None)
    assert failed.endswith("error: boom")
