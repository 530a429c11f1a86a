"""The command explains itself (--help, --version, did-you-mean), `plan` shows a sweep without
running it, and a variant parameter applies across the variants of a sweep that have it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["batch=1", "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1"]


def sigint_default() -> None:
    """In a child the Ctrl-C tests interrupt: SIGINT's default action, whatever the test run
    inherited (a shell starts background jobs with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the child would run to the end and exit 0)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def attnbench(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "attnbench.harness.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("attnbench: error: "), lines[0]
    return lines[0]


def test_help_is_attnbenchs_own_page():
    proc = attnbench("--help")
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    assert page.startswith("usage: attnbench")
    for word in ("list", "plan", "report", "compare", "variant=", "seq_len=", "dtype=",
                 "mode=", "max_memory=", "hydra.sweep.dir=", "results/", "--hydra-help",
                 "--version"):
        assert word in page, word
    assert page.index("Subcommands") < page.rindex("--hydra-help")  # ours first, then Hydra's
    hydra_page = attnbench("--hydra-help")
    assert hydra_page.returncode == 0 and "Hydra" in hydra_page.stdout, hydra_page.stderr


def test_version_names_attnbench_and_torch():
    proc = attnbench("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("attnbench ") and f"torch {torch.__version__}" in proc.stdout


def test_unknown_command_gets_did_you_mean():
    line = one_error_line(attnbench("lst"))
    assert "'lst'" in line and "did you mean list?" in line
    line = one_error_line(attnbench("comprae", "a", "b"))
    assert "did you mean compare?" in line


def test_plan_prints_the_points_and_creates_nothing(tmp_path):
    proc = attnbench("plan", "-m", "variant=full,local,linformer", "seq_len=64,128", *TINY,
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("attnbench plan: 6 points: 4 run, 2 unsupported"), out
    for label in ("full[sdpa]", "local[w=256]", "linformer[k=256]"):
        assert label in out
    assert "1×2×64×16" in out and "1×2×128×16" in out
    assert "k=256 > seq_len=64" in out  # linformer's own reason
    assert "MiB" in out or "KiB" in out  # predicted peak memory
    assert "(rough)" in out and "matmul rate" in out
    assert list(tmp_path.iterdir()) == []  # no results/ folder, nothing else


def test_plan_says_what_max_memory_would_skip(tmp_path):
    proc = attnbench("plan", "variant=full", "seq_len=64", *TINY, "max_memory=1KB",
                     f"hydra.sweep.dir={tmp_path}/s")
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped" in proc.stdout and "> max_memory" in proc.stdout
    assert not (tmp_path / "s").exists()


def test_plan_prints_a_command_that_pastes_into_bash(tmp_path):
    """`glob(...)`, quotes and spaces survive: bash parses the printed line back into the exact
    arguments plan was given."""
    args = ["-m", "variant=glob(full*,exclude=[full_xformers,full_cudnn,full_efficient,full_flash,"
            "full_flex])", "seq_len=64", *TINY, "hydra.sweep.dir=my sweep"]
    proc = attnbench("plan", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Run it: "))
    echo = subprocess.run(["bash", "-c", f"printf '%s\\n' {line.removeprefix('Run it: ')}"],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout.splitlines() == ["attnbench", *args]


def test_plan_refuses_a_bad_point_in_one_line(tmp_path):
    line = one_error_line(attnbench("plan", "-m", "seq_len=64,0", *TINY, cwd=tmp_path))
    assert line.startswith("attnbench: error: seq_len=0")
    assert list(tmp_path.iterdir()) == []


def test_a_variant_parameter_applies_to_the_variants_that_have_it(tmp_path):
    """local's window counts tokens, strided's window_blocks blocks: each takes its own."""
    out = tmp_path / "sweep"
    proc = attnbench("-m", "variant=local,strided,full", "variant.window=1,2",
                     "variant.window_blocks=1,2", "seq_len=128", *TINY, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert (df.status == "ok").all(), df[["label", "status", "reason"]]
    assert sorted(df.label) == sorted(["local[w=1]", "local[w=2]", "strided[b=64,w=1,s=32]",
                                       "strided[b=64,w=2,s=32]", "full[sdpa]"])  # full once


def test_a_window_in_blocks_by_its_name_and_by_its_old_name(tmp_path):
    proc = attnbench("plan", "-m", "variant=strided", "variant.window_blocks=1,2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strided[b=64,w=1,s=32]" in proc.stdout and "strided[b=64,w=2,s=32]" in proc.stdout
    assert "renamed" not in proc.stderr
    line = one_error_line(attnbench("plan", "-m", "variant=local,strided",
                                    "variant.window=64,256", *TINY))
    assert line.startswith("attnbench: error: variant.window: local takes it as its own window")
    assert "variant.window_blocks" in line
    run = tmp_path / "r"  # a single run with the old name: read as window_blocks, one line
    proc = attnbench("variant=strided", "variant.window=1", "seq_len=128", *TINY,
                     f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("window=1 read as window_blocks=1") == 1, proc.stderr
    record = json.loads((run / "result.json").read_text())
    assert json.loads(record["params"])["window_blocks"] == 1 and \
        record["label"] == "strided[b=64,w=1,s=32]"


def test_a_parameter_no_selected_variant_has_is_one_line(tmp_path):
    line = one_error_line(attnbench("-m", "variant=full,linear", "variant.window=64,256",
                                    "seq_len=64", f"hydra.sweep.dir={tmp_path}/s"))
    assert line.startswith("attnbench: error: variant.window:") and "full, linear" in line
    assert not (tmp_path / "s").exists()
    line = one_error_line(attnbench("-m", "variant=full,local", "variant.windw=64",
                                    f"hydra.sweep.dir={tmp_path}/s"))
    assert "variant.windw" in line and "did you mean variant.window?" in line
    line = one_error_line(attnbench("variant=full", "variant.window=64",
                                    f"hydra.run.dir={tmp_path}/r"))
    assert line.startswith("attnbench: error: variant.window:")
    assert list(tmp_path.iterdir()) == []


def test_help_documents_the_exit_status():
    page = attnbench("--help").stdout
    assert "Exit status" in page
    for words in ("0 when every point is ok, oom, skipped or unsupported", "1 when a point ended",
                  "2 for bad input"):
        assert words in " ".join(page.split()), words


def test_hydra_modes_that_do_not_go_together_are_one_line(tmp_path):
    for args in (["-m", "--cfg", "job"], ["--cfg", "job", "-m"], ["--info", "--multirun"]):
        line = one_error_line(attnbench(*args, cwd=tmp_path))
        assert "--multirun" in line and "do not go together" in line
    assert list(tmp_path.iterdir()) == []


def _sweep_folder(folder: Path, points: int = 1) -> Path:
    from attnbench.harness.records import Record, write_record

    for n in range(points):
        write_record(Record(variant="full", label="full[sdpa]", family="full", params="{}",
                            batch=1, heads=1, seq_len=64 * 2**n, head_dim=8, dtype="float32",
                            device="cpu", causal=False, mode="fwd", inputs="gaussian", seed=0,
                            status="ok", latency_ms=1.0 + n, latency_p10_ms=0.9 + n,
                            latency_p90_ms=1.1 + n, peak_mem_bytes=1e6, point_id=f"p{n}",
                            timestamp=str(n)), folder / f"p{n}")
    return folder


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path):
    a, b = _sweep_folder(tmp_path / "a"), _sweep_folder(tmp_path / "b")
    (tmp_path / "file").write_text("")
    for out in ("/proc/attnbench-nope", str(tmp_path / "file" / "sub")):
        line = one_error_line(attnbench("report", str(a), "--out", out))
        assert line.startswith(f"attnbench: error: --out {out}: cannot write there"), line
        line = one_error_line(attnbench("compare", str(a), str(b), "--out", out))
        assert line.startswith(f"attnbench: error: --out {out}: cannot write there"), line


def test_ctrl_c_while_the_report_is_written_is_one_line(tmp_path):
    """SIGINT once results.csv is written (the plots come next): exit 130, one line. A report
    that finished before the signal arrived (a fast machine) proves nothing: tried again on a
    bigger folder, and at least one try must have been interrupted."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for attempt in range(3):
        folder = _sweep_folder(tmp_path / f"s{attempt}", points=4 * 2**attempt)
        proc = subprocess.Popen([sys.executable, "-m", "attnbench.harness.cli", "report",
                                 str(folder)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
        deadline = time.time() + 120
        while not (folder / "results.csv").exists() and time.time() < deadline:
            time.sleep(0.005)  # the report has started writing (the plots come next)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0 and "attnbench: wrote" in out:
            continue  # done before the signal came: not interrupted, try a bigger one
        assert proc.returncode == 130, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "interrupted" in lines[0] and "attnbench report" in lines[0]
        return
    pytest.fail("the report finished before SIGINT in every try: nothing was interrupted")


def test_plan_shows_the_inputs_when_a_sweep_varies_them(tmp_path):
    proc = attnbench("plan", "-m", "variant=full", "seq_len=64", "inputs=gaussian,realistic",
                     *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("#  label"))
    assert "inputs" in header.split()
    assert sum(" realistic " in line for line in proc.stdout.splitlines()) == 1
