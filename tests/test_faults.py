"""Faults become rows and nothing is lost: OOM, NaN, crashes, the memory cap, kill -9 and resume,
concurrent writers and sweeps, a job that raises, bad input before any work."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_cli import sigint_default

from attnbench.harness.records import load_records
from attnbench.harness.report.gather import gather
from attnbench.harness.run.job import run_point

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
FAST = ["batch=1", "heads=2", "head_dim=8", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1", f"hydra.searchpath=[file://{TESTS / 'conf'}]"]
# Run the CLI with the test-only `faulty` and `broken_model` variants registered.
BOOT = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fault_variants, broken_models; "
        "from attnbench.harness.cli import main; main()")


def attnbench(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kw)


def test_faults_become_rows_and_the_sweep_goes_on(tmp_path):
    proc = attnbench("-m", "variant=faulty", "variant.how=oom,cpu_oom,nonfinite,error",
                     "variant.fail_at=64", "seq_len=32,64,96", *FAST,
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]  # error and invalid points: exit 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("attnbench: 2 of 12 points failed:"), last
    assert "n=64 (error)" in last and "n=64 (invalid)" in last
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 12
    hows = df.params.str.extract(r'"how": "(\w+)"')[0]
    failed = df[df.seq_len == 64].assign(how=hows)
    assert dict(zip(failed.how, failed.status, strict=True)) == {
        "oom": "oom", "cpu_oom": "oom", "nonfinite": "invalid", "error": "error"}
    assert failed.reason.str.len().gt(0).all()
    assert "boom at n=64" in failed[failed.how == "error"].reason.iloc[0]
    assert (df[df.seq_len != 64].status == "ok").all()  # points after a failure still measured


def test_memory_cap_turns_a_too_large_point_into_skipped(tmp_path):
    proc = attnbench("-m", "variant=full", "variant.backend=naive", "seq_len=32,4096",
                     "max_memory=20MB", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv").set_index("seq_len")
    assert df.loc[32, "status"] == "ok"
    assert df.loc[4096, "status"] == "skipped"
    assert df.loc[4096, "predicted_mem_bytes"] > 20e6
    assert "max_memory" in df.loc[4096, "reason"]


def test_kill_9_then_resume_measures_only_the_missing_points(tmp_path):
    sweep = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
             "variant.sleep_ms=40", "seq_len=16,24,32,40,48,56,64,72", *FAST,
             f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-c", BOOT, *sweep], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*/result.json"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    assert 3 <= len(before) < 8, "the sweep was not interrupted mid-way"
    assert not (tmp_path / "results.csv").exists()

    done = attnbench(*sweep, "resume=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("(kept from an earlier run)") == len(before)
    assert "interrupted" not in done.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing re-measured
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df.seq_len) == [16, 24, 32, 40, 48, 56, 64, 72]  # each point exactly once
    assert (df.status == "ok").all()
    assert not list(tmp_path.rglob("*.tmp"))  # a write cut by the kill left nothing behind


def test_resume_with_the_overrides_in_another_order_keeps_every_point(tmp_path):
    common = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0", *FAST,
              f"hydra.sweep.dir={tmp_path}"]
    first = attnbench(*common, "seq_len=16,24", "causal=false,true")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    assert len(before) == 4
    again = attnbench(*common, "causal=true,false", "seq_len=24,16", "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(kept from an earlier run)") == 4
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")} == before
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4


def test_resume_measures_again_the_outcomes_that_may_change(tmp_path):
    common = ["-m", "variant=full", "variant.backend=naive,xformers", "seq_len=32,1024",
              "device=cpu", *FAST, f"hydra.sweep.dir={tmp_path}"]
    first = attnbench(*common, "max_memory=5MB")
    assert first.returncode == 0, first.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv").set_index(["label", "seq_len"])
    assert df.loc[("full[naive]", 1024), "status"] == "skipped"
    assert df.loc[("full[naive]", 32), "status"] == "ok"
    # the n=32 point ends as an error this time (same point, another outcome)
    (path,) = [p for p in tmp_path.glob("*/result.json") if "naive-n32-" in p.parent.name]
    path.write_text(path.read_text().replace('"status": "ok"', '"status": "error"'))
    again = attnbench(*common, "max_memory=0", "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(kept from an earlier run)") == 2  # the unsupported xformers
    df = pd.read_csv(tmp_path / "results.csv").set_index(["label", "seq_len"])
    assert len(df) == 4
    assert (df.loc["full[naive]", "status"] == "ok").all()  # skipped and error: measured again
    assert (df.loc["full[xformers]", "status"] == "unsupported").all()


def test_a_second_sweep_into_a_folder_adds_its_points_beside_the_first(tmp_path):
    common = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0", *FAST,
              f"hydra.sweep.dir={tmp_path}"]
    first = attnbench(*common, "seq_len=16,24")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    second = attnbench(*common, "seq_len=32,32,40")  # 32 twice: one point, run once
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[2/2]" in second.stdout and "[3/" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the first sweep's points stay
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df.seq_len) == [16, 24, 32, 40]


def test_concurrent_sweeps_into_one_folder_lose_nothing(tmp_path):
    common = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
              "variant.sleep_ms=20", *FAST, f"hydra.sweep.dir={tmp_path}"]
    procs = [subprocess.Popen([sys.executable, "-c", BOOT, *common, f"seq_len={ns}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ns in ("16,24,32,40", "48,56,64,72")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df.seq_len) == [16, 24, 32, 40, 48, 56, 64, 72]
    assert len(list(tmp_path.glob("*/result.json"))) == 8


def test_a_later_batch_with_a_bad_point_stops_before_any_point_runs(tmp_path):
    kept = tmp_path / "sweep"
    first = attnbench("-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
                      "seq_len=16", *FAST, f"hydra.sweep.dir={kept}")
    assert first.returncode == 0, first.stderr[-2000:]
    records = {p: p.read_bytes() for p in kept.rglob("result.json")}
    for folder in (tmp_path / "new", kept):
        proc = attnbench("-m", "hydra.sweeper.max_batch_size=1", "seq_len=64,128,0", *FAST,
                         f"hydra.sweep.dir={folder}")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "attnbench: error: seq_len=0: must be a positive integer"]
        assert "n=64" not in proc.stdout  # not even the first batch ran
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in kept.rglob("result.json")} == records


def test_a_job_that_raises_still_leaves_results_and_report(tmp_path):
    proc = attnbench("-m", "hydra.sweeper.max_batch_size=1", "variant=broken_model",
                     "variant.fail_at=32", "seq_len=16,32,48", *FAST,
                     f"hydra.sweep.dir={tmp_path}")
    if proc.returncode:  # the job raised: said so, after the other points were gathered
        assert "broken memory model at n=32" in proc.stderr
    assert "[1/3]" in proc.stdout and "[3/3]" in proc.stdout  # later batches still ran
    df = pd.read_csv(tmp_path / "results.csv")
    assert {16, 48} <= set(df.seq_len) and (df[df.seq_len != 32].status == "ok").all()
    assert (tmp_path / "index.html").exists() and (tmp_path / "summary.md").exists()


def test_resume_needs_a_named_sweep_folder():
    proc = attnbench("-m", "resume=true", "seq_len=32")
    assert proc.returncode == 2 and "hydra.sweep.dir" in proc.stderr


WRITER = """
import sys
from attnbench.harness.report.gather import gather
from attnbench.harness.records import Record, write_record
root, tag = sys.argv[1], sys.argv[2]
base = dict(variant="full", label="full[sdpa]", family="full", params="{}", batch=1, heads=1,
            head_dim=8, dtype="float32", device="cpu", causal=False, mode="fwd",
            inputs="gaussian", seed=0, status="ok")
for i in range(40):
    rec = Record(**base, seq_len=i + 1, point_id=f"{tag}-{i}", timestamp=str(i))
    write_record(rec, f"{root}/{tag}{i}")
    gather(root)
"""


def test_concurrent_writers_never_corrupt_records_or_the_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag], env=env)
             for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(load_records(tmp_path)) == 80
    gather(tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 80 and df.point_id.is_unique
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "args, field",
    [(["-m", "seq_len=64,0"], "seq_len"), (["-m", "variant=full,fulll"], "variant"),
     (["heads=-1"], "heads"), (["batch=0"], "batch"), (["head_dim=0"], "head_dim"),
     (["-m", "seqlen=1,2"], "seqlen"), (["timing.max_time_s=-1"], "timing.max_time_s"),
     (["-m", "timing.warmup=-1"], "timing.warmup"), (["max_memory=lots"], "max_memory"),
     (["-m", "hydra.sweep.dir=/proc/attnbench"], "hydra.sweep.dir"),
     (["device=cuda"], "device"), (["dtype=float8"], "dtype")],
)
def test_bad_input_stops_before_any_work(tmp_path, capsys, args, field):
    import torch
    from hydra.core.global_hydra import GlobalHydra

    from attnbench.harness.cli import main

    if field == "device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra = [] if any("hydra.sweep.dir" in a for a in args) else [
        f"hydra.sweep.dir={tmp_path}/s", f"hydra.run.dir={tmp_path}/r"]
    try:
        with pytest.raises(SystemExit) as exit_:
            main([*args, *extra])
    finally:
        GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in err, lines
    assert not list(tmp_path.rglob("result.json"))
    assert not (tmp_path / "s").exists()  # no empty sweep folder left behind


def test_oom_in_process_releases_and_continues():
    from attnbench.harness.run.config import from_dictconfig

    sys.path.insert(0, str(TESTS))
    import fault_variants  # noqa: F401

    def run(n, how):
        return run_point(from_dictconfig(dict(
            variant={"name": "faulty", "how": how, "fail_at": 48}, batch=1, heads=1, seq_len=n,
            head_dim=8, timing={"warmup": 0, "min_reps": 1, "min_time_s": 0})))

    assert run(48, "oom").status == "oom"
    assert run(48, "nonfinite").status == "invalid"
    assert run(32, "nonfinite").status == "ok"
    rec = run(48, "error")
    assert rec.status == "error" and rec.reason.startswith("ValueError: boom")


def test_ctrl_c_keeps_what_was_measured_and_prints_the_resume_command(tmp_path):
    sweep = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
             "variant.sleep_ms=40", "seq_len=16,24,32,40,48,56,64,72", *FAST,
             f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-c", BOOT, *sweep], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*/result.json"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    kept = len(list(tmp_path.glob("*/result.json")))
    assert 3 <= kept < 8, "the sweep was not interrupted mid-way"
    assert f"{kept} point(s) kept" in err
    assert len(pd.read_csv(tmp_path / "results.csv")) == kept  # gathered, with its report
    assert (tmp_path / "index.html").exists()
    command = shlex.split(err.split("Resume with:")[1].strip().splitlines()[0])
    assert command[0] == "attnbench" and "resume=true" in command
    assert f"hydra.sweep.dir={tmp_path}" in command
    done = attnbench(*command[1:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("(kept from an earlier run)") == kept
    assert sorted(pd.read_csv(tmp_path / "results.csv").seq_len) == [16, 24, 32, 40, 48, 56,
                                                                       64, 72]


def test_no_point_ends_the_sweep_not_even_a_crash(tmp_path):
    """User code that segfaults, aborts, calls os._exit(0) or raises SystemExit(0) ends only its
    own point: an `error` row saying why, the later points still run in a new worker, results.csv
    and the report are written, and the command exits 1 naming the failed points."""
    proc = attnbench("-m", "variant=faulty", "variant.how=segv,abort,exit0,sysexit",
                     "variant.fail_at=64", "seq_len=32,64", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 8
    df["how"] = df.params.str.extract(r'"how": "(\w+)"')[0]
    assert (df[df.seq_len == 32].status == "ok").all()  # each crash is followed by a point
    failed = df[df.seq_len == 64].set_index("how")
    assert (failed.status == "error").all()
    assert "SIGSEGV" in failed.reason["segv"] and "SIGABRT" in failed.reason["abort"]
    assert "exit code 0" in failed.reason["exit0"]
    assert failed.reason["sysexit"].startswith("SystemExit")
    assert (tmp_path / "index.html").exists() and (tmp_path / "summary.md").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("attnbench: 4 of 8 points failed:"), last


def test_a_single_run_that_fails_exits_1_with_a_last_line(tmp_path):
    for how, fail_at, code in (("error", 32, 1), ("exit0", 32, 1), ("error", 0, 0)):
        proc = attnbench("variant=faulty", f"variant.how={how}", f"variant.fail_at={fail_at}",
                         "seq_len=32", *FAST, f"hydra.run.dir={tmp_path / how / str(fail_at)}")
        assert proc.returncode == code, (how, proc.stderr[-2000:])
        assert (tmp_path / how / str(fail_at) / "result.json").exists()
        if code:
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("attnbench: the point failed: faulty[") and "(error)" in last


def test_a_full_disk_mid_sweep_stops_with_one_line_and_resume_completes(tmp_path):
    sweep = ["-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
             "seq_len=16,24,32,40", *FAST, f"hydra.sweep.dir={tmp_path}"]
    full = attnbench(*sweep, env=dict(os.environ, ATTNBENCH_TEST_NOSPACE="result.json:2"))
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("attnbench: error: could not write ") and "No space left" in last
    assert len(list(tmp_path.glob("*/result.json"))) == 2 and "[4/4]" not in full.stdout
    command = shlex.split(last.split("resume with: ")[1])
    assert command[0] == "attnbench" and "resume=true" in command
    done = attnbench(*command[1:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("(kept from an earlier run)") == 2
    assert sorted(pd.read_csv(tmp_path / "results.csv").seq_len) == [16, 24, 32, 40]


def test_results_that_cannot_be_written_at_the_end_are_exit_1(tmp_path):
    proc = attnbench("-m", "variant=faulty", "variant.how=error", "variant.fail_at=0",
                     "seq_len=16", *FAST, f"hydra.sweep.dir={tmp_path}",
                     env=dict(os.environ, ATTNBENCH_TEST_NOSPACE="results.csv:0"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("attnbench: error: results.csv and the report could not be written")
    assert "No space left" in last and "attnbench report" in last
    assert "UserWarning" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(list(tmp_path.glob("*/result.json"))) == 1  # the record is kept


def test_resume_refuses_a_folder_that_holds_no_sweep(tmp_path, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from attnbench.harness.cli import main

    typo = tmp_path / "typo"
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["-m", "resume=true", "seq_len=32", f"hydra.sweep.dir={typo}"])
    finally:
        GlobalHydra.instance().clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("attnbench: error: hydra.sweep.dir=") and "no sweep" in lines[0]
    assert not typo.exists()


@pytest.mark.parametrize("sdpa_backend", ["auto", "math", "flash"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_chunked_prefill_runs_and_its_ops_are_counted(sdpa_backend, mode):
    """Fewer queries than keys, causal: SDPA takes torch's bottom-right causal bias, a tensor
    subclass, which the op counter's dispatch mode refused to see created."""
    from attnbench.harness.run.config import from_dictconfig

    rec = run_point(from_dictconfig(dict(
        variant={"name": "full", "sdpa_backend": sdpa_backend}, batch=1, heads=2, seq_len=96,
        q_len=32, head_dim=8, causal=True, mode=mode, device="cpu",
        timing={"warmup": 0, "min_reps": 1, "min_time_s": 0})))
    if rec.status == "unsupported":
        pytest.skip(rec.reason)
    assert rec.status == "ok", rec.reason
    assert rec.kernel.startswith("sdpa:") and rec.ops_per_call > 0
    assert rec.softmax_rel_error < 1e-5


def test_a_call_the_op_counter_cannot_see_is_ok_with_a_note():
    from attnbench.harness.run.config import from_dictconfig

    sys.path.insert(0, str(TESTS))
    import fault_variants  # noqa: F401

    rec = run_point(from_dictconfig(dict(
        variant={"name": "faulty", "how": "subclass"}, batch=1, heads=1, seq_len=32,
        head_dim=8, timing={"warmup": 0, "min_reps": 1, "min_time_s": 0})))
    assert rec.status == "ok", rec.reason
    assert "ops not counted" in rec.notes and math.isnan(rec.ops_per_call)


def test_ctrl_c_while_the_sweep_writes_its_report_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", BOOT, "-m", "variant=faulty",
                             "variant.how=error", "variant.fail_at=0", "seq_len=16,24", *FAST,
                             f"hydra.sweep.dir={tmp_path}"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    deadline = time.time() + 240
    while not (tmp_path / "results.csv").exists() and time.time() < deadline:
        time.sleep(0.01)  # gathered: the report (plots: seconds) is being written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "interrupted while writing the report" in last and "attnbench report" in last
    assert len(list(tmp_path.glob("*/result.json"))) == 2


def test_a_ctrl_c_that_python_drops_is_raised_again_where_the_next_point_starts(capfd):
    """A SIGINT that lands in a weakref callback: Python drops its KeyboardInterrupt ("Exception
    ignored in …") and, without `interrupt.catching`, the sweep ran on to its end and exited 0
    (seen once in CI). Inside the block it is remembered, not printed, and `check` — called where
    each point starts — raises it again; a Ctrl-C elsewhere still raises at once."""
    import weakref

    from attnbench.harness.run import interrupt

    class Thing:
        pass

    dropped = []

    def callback(_: object) -> None:
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, inside the callback
        except BaseException as exc:
            dropped.append(type(exc))
            raise

    with interrupt.catching():
        interrupt.check()  # nothing pending yet
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback runs, and Python drops what it raises
        assert ref() is None and dropped == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):  # not in a callback: raised where it lands
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupt.check()  # the block's Ctrl-C does not outlive it
