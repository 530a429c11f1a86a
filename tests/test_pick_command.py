"""`attnbench pick KEY=VALUE…` answers the question in one command: it plans every variant at one
setting, measures only the candidates and the exact baseline into a sweep folder (resumed), and
prints the pick, the runner-up and the baseline; exit 1 names what binds, exit 2 the bad field."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnbench import variants
from attnbench.harness import ask
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.plan import Planned
from attnbench.variants.base import Shape

REPO = Path(__file__).resolve().parent.parent
TINY = ["seq_len=256", "batch=1", "heads=2", "head_dim=16", "timing.min_reps=2",
        "timing.min_time_s=0", "timing.warmup=1"]


def pick(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "pick", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def answer_line(stdout: str, role: str) -> list[str]:
    line = next(x for x in stdout.splitlines() if x.strip().startswith(role))
    return line.split()


def softmax_reference(q, k, v, causal: bool) -> torch.Tensor:
    """Softmax attention from its definition, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def test_pick_answers_with_a_variant_within_the_error_and_resumes(tmp_path):
    out = tmp_path / "pick"
    proc = pick("causal=true", "max_error=0.01", "max_memory=1GB", *TINY,
                f"hydra.sweep.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout
    assert text.startswith("attnbench pick: n=256, fp32 fwd causal, CPU")
    label = answer_line(text, "pick")[1] if "pick (the baseline)" not in text else "full[sdpa]"
    df = pd.read_csv(out / "results.csv")
    row = df[df.label == label].iloc[0]
    assert row.status == "ok"
    # its error against softmax, recomputed here from the definition in float64
    shape = Shape(1, 2, 256, 16)
    q, k, v = make_inputs(shape, torch.float32, "cpu", int(row.seed), row.inputs)
    att = variants.build(row.variant, **json.loads(row.params))
    with torch.no_grad():
        got = att(q, k, v, causal=True)
    ref = softmax_reference(q, k, v, True)
    err = float(torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref))
    assert err <= 0.01, (label, err)
    # what the answer needs, and nothing else: the baseline, no recurrent, no non-causal form
    assert "full[sdpa]" in set(df.label)
    assert not (df.family == "recurrent").any() and not (df.family == "lowrank").any()
    assert (df.causal == True).all()  # noqa: E712
    assert (out / "index.html").is_file()
    left = text[text.index("left out:"):]
    assert "recurrent: deltanet, gated_deltanet, gla, mamba2, retnet: replaces softmax" in left
    assert "lowrank: linformer[k=256]: linformer has no causal form" in left
    assert "max_error=none or --allow-recurrent" in left
    assert "plan predicted" in text
    # asked again into the same folder: every point kept, the same answer
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    again = pick("causal=true", "max_error=1%", "max_memory=1GB", *TINY,
                 f"hydra.sweep.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert answer_line(again.stdout, "pick")[:3] == answer_line(text, "pick")[:3]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps


def test_dry_run_shows_the_plan_and_its_time_and_creates_nothing(tmp_path):
    proc = pick("causal=true", "max_memory=1GB", *TINY, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "would measure" in text and "(rough: plan's estimate)" in text
    assert "full[sdpa]" in text and "(the exact baseline)" in text
    assert "left out:" in text and "recurrent:" in text
    assert "Run it: attnbench pick causal=true" in text
    assert list(tmp_path.iterdir()) == []


def test_the_recurrent_family_is_a_candidate_only_when_allowed_and_decode_memory_holds_state(
        tmp_path):
    out = tmp_path / "pick"
    proc = pick("mode=decode", "variant=retnet,linear", "--allow-recurrent", "max_error=0.01",
                *TINY, f"hydra.sweep.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert set(df.label) == {"retnet", "linear", "full[sdpa]"}  # the baseline measured too
    assert answer_line(proc.stdout, "pick")[1] == "retnet"  # linear misses 1%
    assert "linear: error" in proc.stdout
    row = df[df.label == "retnet"].iloc[0]
    held = row.state_bytes + row.peak_mem_bytes  # decode: the state plus the step's peak
    from attnbench.harness.units import size

    assert f"holds {size(held)}" in proc.stdout
    assert "no error against softmax (replaces it)" in proc.stdout


def test_exit_1_says_which_constraint_binds(tmp_path):
    nothing = pick("causal=true", "variant=linformer,nystrom", *TINY,
                   f"hydra.sweep.dir={tmp_path}/a", cwd=tmp_path)
    assert nothing.returncode == 1, nothing.stderr[-2000:]
    assert "what binds: nothing supports this setting" in nothing.stdout
    assert "nothing measured" in nothing.stdout
    memory = pick("causal=true", "variant=local,linear", "max_memory=1KB", *TINY,
                  f"hydra.sweep.dir={tmp_path}/b", cwd=tmp_path)
    assert memory.returncode == 1
    assert "what binds: memory" in memory.stdout
    recurrent = pick("causal=true", "variant=retnet,gla", *TINY,
                     f"hydra.sweep.dir={tmp_path}/c", cwd=tmp_path)
    assert recurrent.returncode == 1
    assert "what binds: error: only the recurrent family" in recurrent.stdout
    error = pick("causal=true", "variant=linear,performer", "max_error=0.001", *TINY,
                 f"hydra.sweep.dir={tmp_path}/d", cwd=tmp_path)
    assert error.returncode == 1, error.stderr[-2000:]
    assert "what binds: error: the candidates within max_memory miss max_error" in error.stdout
    assert "least: linear" in error.stdout or "least: performer" in error.stdout


@pytest.mark.parametrize("args, field", [
    (["max_error=abc"], "max_error='abc'"),
    (["max_memory=lots"], "max_memory='lots'"),
    (["seq_len=256,512"], "seq_len=256,512"),
    (["variant=nope"], "variant='nope'"),
    (["+sweep=cpu_quick"], "+sweep=cpu_quick"),
    (["resume=true"], "resume=true"),
    (["causal=maybe"], "causal='maybe'"),
    (["seq_len=0"], "seq_len=0"),
    (["variant=glob(local*)"], "variant=glob(local*)"),
])
def test_exit_2_is_one_line_naming_the_field(tmp_path, args, field):
    proc = pick(*TINY, *args, f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"attnbench: error: {field}"), lines
    assert not (tmp_path / "s").exists()


# -- the answer's arithmetic, on rows written here ------------------------------------------

def entry(label: str, err: float, mem: float, ms: float, family: str = "linear",
          **row) -> ask.Entry:
    planned = Planned(label, None, 0, "run", "", 1.0)
    base = dict(status="ok", family=family, error_ref="", impl_error=float("nan"), impl_ok=True,
                softmax_rel_error=err, peak_mem_bytes=mem, latency_ms=ms, mode="fwd",
                dtype="float32", noisy=False, contended=False)
    return ask.Entry(label, planned, family, True, row={**base, **row})


def test_the_error_and_memory_axes_are_read_in_one_place():
    assert ask.softmax_error({"softmax_rel_error": 0.02, "impl_error": 1e-7}) == 0.02
    # an implementation check (error against the variant's own mask) is never read as it
    assert math.isnan(ask.softmax_error({"family": "local", "error_ref": "masked softmax",
                                         "impl_error": 1e-7}))
    assert ask.held_bytes({"mode": "fwd", "peak_mem_bytes": 10, "state_bytes": 5}) == 10
    assert ask.held_bytes({"mode": "decode", "peak_mem_bytes": 10, "state_bytes": 5}) == 15
    assert ask.parse_error("1%") == pytest.approx(0.01)
    assert ask.parse_error("2e-3") == pytest.approx(0.002)
    assert ask.parse_error("none") is None


def test_judge_puts_a_marked_point_first_only_when_faster_beyond_its_noise():
    """As the report's pick: a noisy 0.12 ms point whose p90 is under the clean winner's p10
    comes first; one whose spread reaches the clean winner's does not."""
    budget = ask.Budget(None, 0, True, "")
    clean = entry("full", 3e-7, 1e6, 34.0, latency_p10_ms=33.0, latency_p90_ms=35.0)
    sure = entry("linear", 0.8, 1e6, 0.12, noisy=True, latency_p10_ms=0.1, latency_p90_ms=0.2)
    unsure = entry("local", 0.5, 1e6, 20.0, noisy=True, latency_p10_ms=10.0,
                   latency_p90_ms=40.0)
    assert [e.label for e in ask.judge([clean, unsure, sure], budget)] == \
        ["linear", "full", "local"]
    assert [e.label for e in ask.judge([clean, unsure], budget)] == ["full", "local"]


def test_a_failed_implementation_check_is_never_picked():
    budget = ask.Budget(0.01, 10**9, False, "1GB")
    broken = entry("fast", 0.001, 1e6, 0.1, impl_error=0.3, impl_ok=False)
    fine = entry("slow", 0.005, 1e6, 2.0)
    assert [e.label for e in ask.judge([broken, fine], budget)] == ["slow"]
    assert "implementation check" in broken.why


def test_judge_prefers_clean_points_then_latency_and_binding_names_the_closest_miss():
    budget = ask.Budget(0.01, 10**9, False, "1GB")
    fast_marked = entry("a", 0.001, 1e6, 1.0, contended=True)
    clean = entry("b", 0.005, 1e6, 2.0)
    wrong = entry("c", 0.5, 1e6, 0.5)
    big = entry("d", 0.001, 2e9, 0.5)
    best = ask.judge([fast_marked, clean, wrong, big], budget)
    assert [e.label for e in best] == ["b", "a"]
    assert "error 50% against softmax > max_error 1%" in wrong.why
    assert "> max_memory 1GB" in big.why
    only_big = [entry("d", 0.001, 2e9, 0.5), entry("c", 0.5, 1e6, 0.5)]
    assert ask.judge(only_big, budget) == []
    assert ask.binding(only_big, budget).startswith("memory:")
    assert "least: d" in ask.binding(only_big, budget)
    only_wrong = [entry("c", 0.5, 1e6, 0.5), entry("e", 0.2, 1e6, 0.7)]
    assert ask.judge(only_wrong, budget) == []
    assert ask.binding(only_wrong, budget).startswith("error:")
    assert "least: e" in ask.binding(only_wrong, budget)


def test_help_lists_pick_first():
    page = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert page.returncode == 0
    assert page.stdout.startswith("usage: attnbench pick")
    assert "\n  pick KEYS" in page.stdout
    own = pick("--help")
    assert own.returncode == 0 and "max_error" in own.stdout and "--dry-run" in own.stdout
