"""Every class of bad input is refused before any work, with one line naming the full key, the
value and what is allowed; exit code 2, no traceback, no folder left behind — single run and
multirun alike."""

from __future__ import annotations

import pytest

# (overrides, the key the one line must name, a word it must contain)
CASES = [
    (["variant=local", "variant.window=1.5"], "variant.window", "integer"),
    (["variant=local", "variant.window=true"], "variant.window", "integer"),
    (["variant=performer", "variant.eps=nan"], "variant.eps", "finite"),
    (["variant=local", "variant.windw=3"], "variant.windw", "variant.window"),
    (["timing.min_rep=3"], "timing.min_rep", "timing.min_reps"),
    (["seqln=3"], "seqln", "seq_len"),
    (["seed=1.5"], "seed", "integer"),
    (["causal=1"], "causal", "true or false"),
    (["max_memory=99999999999999999999999"], "max_memory", "2^63"),
    (["max_memory=1e30TB"], "max_memory", ""),
    (["timing.min_time_s=5", "timing.max_time_s=1"], "timing.max_time_s", "min_time_s"),
    (["timing.min_time_s=inf"], "timing.min_time_s", "finite"),
    (["timing=3"], "timing", ""),
    (["+sweep=nope"], "sweep", "cpu_quick"),
    (["hydra/launcher=nope"], "hydra/launcher", "basic"),
    (["+sweep=gpu_scaling", "sweep.tokens=abc"], "batch", "abc"),
    (["seq_len=${oc.env:ATTNBENCH_NO_SUCH_VAR}"], "seq_len", "ATTNBENCH_NO_SUCH_VAR"),
    (["variant=nope"], "variant", "full"),
    (["inputs=nope"], "inputs", "realistic"),
    (["inputs=real@layer:3"], "inputs", "@layers:"),
    (["inputs=file:/no/such/capture.safetensors"], "inputs", "no such file"),
    (["inputs=local", "head_dim=7"], "inputs", "even head_dim"),
    (["variant=null"], "variant=null", "full"),
    (["threads=100000"], "threads", "CPUs"),
    (["timing.max_time_s=1e308"], "timing.max_time_s", "3600"),
    (["timing.min_time_s=1e308", "timing.max_time_s=1e308"], "timing.min_time_s", "3600"),
    (["timing.max_reps=1000000000000"], "timing.max_reps", "100000"),
    (["timing.warmup=1000000000"], "timing.warmup", "1000"),
    (["variant=performer", "variant.seed=-1"], "variant.seed", "2^63"),
    (["variant=bigbird", "variant.seed=99999999999999999999"], "variant.seed", "2^63"),
]
# Sweep-only: what a sweep's values or its folder layout can get wrong.
SWEEP_CASES = [
    (["variant=glob(zzz*)"], "variant=glob(zzz*)", "matches nothing"),
    (["seq_len=range(5,5)"], "seq_len=range(5,5)", "matches nothing"),
    (["variant=full,null"], "variant=null", "full"),
    (["hydra.sweep.subdir=same"], "hydra.sweep.subdir", "hydra.sweep.dir"),
    (["hydra.sweep.subdir=${hydra.job.num}"], "hydra.sweep.subdir", "named by what it measures"),
    (["hydra.sweep.subdir=../escaped_${hydra.job.num}"], "hydra.sweep.subdir", ""),
]


def _run(tmp_path, capsys, args):
    from hydra.core.global_hydra import GlobalHydra

    from attnbench.harness.cli import main

    try:
        with pytest.raises(SystemExit) as exit_:
            main([*args, f"hydra.sweep.dir={tmp_path}/s", f"hydra.run.dir={tmp_path}/r"])
    finally:
        GlobalHydra.instance().clear()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("multirun", [False, True], ids=["single", "multirun"])
@pytest.mark.parametrize(("args", "key", "word"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, key, word, multirun):
    code, err = _run(tmp_path, capsys, (["-m"] if multirun else []) + args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"attnbench: error: {key}"), lines[0]
    assert word in lines[0], lines[0]
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "key", "word"), SWEEP_CASES,
                         ids=[" ".join(c[0]) for c in SWEEP_CASES])
def test_bad_sweep_input_is_one_line_before_any_work(tmp_path, capsys, args, key, word):
    code, err = _run(tmp_path, capsys, ["-m", *args])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"attnbench: error: {key}"), lines[0]
    assert word in lines[0], lines[0]
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("escaped_*"))


@pytest.mark.parametrize("args", [["-m", "hydra.sweep.dir="], ["hydra.run.dir="]],
                         ids=["sweep", "single"])
def test_an_empty_output_folder_is_refused(tmp_path, capsys, monkeypatch, args):
    """An empty folder would put the records straight into the current folder."""
    from hydra.core.global_hydra import GlobalHydra

    from attnbench.harness.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exit_:
            main([*args, "seq_len=32"])
    finally:
        GlobalHydra.instance().clear()
    lines = capsys.readouterr().err.strip().splitlines()
    key = args[-1].rstrip("=")
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"attnbench: error: {key}=''") and "empty" in lines[0]
    assert list(tmp_path.iterdir()) == []
