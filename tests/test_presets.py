"""Sweep presets: B·n held at sweep.tokens, one valid backend pair per full_backend option."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import variants
from harness.config import from_dictconfig

CONF = Path(__file__).resolve().parent.parent / "conf"


def run_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg, from_dictconfig(cfg)


@pytest.mark.parametrize("preset", ["gpu_scaling", "gpu_full_backends"])
def test_gpu_presets_hold_tokens_per_batch(preset):
    cfg, _ = run_config(f"+sweep={preset}")
    lengths = [int(n) for n in cfg.hydra.sweeper.params.seq_len.split(",")]
    assert lengths[0] == 1024 and lengths[-1] == 65536
    assert set(cfg.hydra.sweeper.params.mode.split(",")) == {"fwd", "fwd_bwd"}
    for n, batch in ((1024, 16), (4096, 4), (16384, 1), (65536, 1)):
        _, run = run_config(f"+sweep={preset}", f"seq_len={n}", "+full_backend=flash")
        assert (run.batch, run.dtype) == (batch, "bfloat16")
    _, run = run_config(f"+sweep={preset}", "seq_len=1024", "sweep.tokens=4096")
    assert run.batch == 4


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "full_backend").glob("*.yaml")))
def test_full_backend_options_build(option):
    _, run = run_config("variant=full", f"+full_backend={option}")
    att = variants.build(run.variant, **run.params)
    assert option in att.label or (option == "sdpa" and att.label == "full[sdpa]")


def test_full_backends_preset_sweeps_existing_options():
    cfg, _ = run_config("+sweep=gpu_full_backends")
    options = cfg.hydra.sweeper.params["+full_backend"].split(",")
    assert all((CONF / "full_backend" / f"{o}.yaml").exists() for o in options)
    assert {"flash", "efficient", "cudnn", "xformers", "flex"} <= set(options)
