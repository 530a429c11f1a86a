"""Sweep presets: B·n held at sweep.tokens; the full_<backend> presets of the variant group."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from attnbench import variants
from attnbench.harness.run.config import from_dictconfig

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
        _, run = run_config(f"+sweep={preset}", f"seq_len={n}", "variant=full_flash")
        assert (run.batch, run.dtype) == (batch, "bfloat16")
    _, run = run_config(f"+sweep={preset}", "seq_len=1024", "sweep.tokens=4096")
    assert run.batch == 4


FULL_PRESETS = sorted(p.stem for p in (CONF / "variant").glob("full_*.yaml"))


@pytest.mark.parametrize("preset", FULL_PRESETS)
def test_full_backend_presets_build(preset):
    _, run = run_config(f"variant={preset}")
    att = variants.build(run.variant, **run.params)
    assert att.name == "full" and preset.removeprefix("full_") in att.label


def test_full_backends_preset_sweeps_existing_options():
    cfg, _ = run_config("+sweep=gpu_full_backends")
    options = cfg.hydra.sweeper.params["variant"].split(",")
    assert options == FULL_PRESETS or set(options) <= set(FULL_PRESETS)
    assert {f"full_{b}" for b in ("flash", "efficient", "cudnn", "xformers", "flex")} <= set(
        options
    )
