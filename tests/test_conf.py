"""Every file under conf/ composes, and every registered variant has its YAML (and vice versa)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from attnbench import variants
from attnbench.harness.run.config import from_dictconfig
from attnbench.variants import registry

CONF = Path(__file__).resolve().parent.parent / "conf"
VARIANT_FILES = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
SWEEP_FILES = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def test_one_yaml_per_registered_variant():
    """Every built-in has conf/variant/<name>.yaml; any other file is a preset `<name>_<what>`."""
    builtin = [n for n, c in registry._REGISTRY.items()
               if c.__module__.startswith("attnbench.variants.")]
    assert set(builtin) <= set(VARIANT_FILES)
    for stem in set(VARIANT_FILES) - set(builtin):
        assert stem.split("_")[0] in builtin, f"conf/variant/{stem}.yaml names no variant"


@pytest.mark.parametrize("name", VARIANT_FILES)
def test_variant_config_composes_and_builds(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"variant={name}"])
    run = from_dictconfig(cfg)
    att = variants.build(run.variant, **run.params)
    if name in variants.names():
        assert att.name == name
        # the YAML states every parameter, with the class defaults
        assert run.params == variants.get(name)().params()
    else:  # a preset: every parameter stated, named after its variant
        assert name.startswith(f"{att.name}_")
        assert set(run.params) == set(variants.get(att.name)().params())


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_preset_composes(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, name
    from_dictconfig(cfg)


SHAPE_FILES = sorted(p.stem for p in (CONF / "shape").glob("*.yaml"))


@pytest.mark.parametrize("name", SHAPE_FILES)
def test_model_shape_preset_names_itself_and_its_heads(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+shape={name}"])
    run = from_dictconfig(cfg)
    assert run.model == name and run.kv_heads >= 1 and run.heads % run.kv_heads == 0


def test_a_model_name_only_for_the_models_shape():
    """`+shape=llama3_8b heads=8` runs 8 query heads: the record must not say llama3_8b (32);
    it names the model and what was overridden. The preset as it is keeps its plain name."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        changed = compose(config_name="config", overrides=["+shape=llama3_8b", "heads=8"])
        both = compose(config_name="config",
                       overrides=["+shape=llama3_8b", "heads=16", "head_dim=64"])
        same = compose(config_name="config", overrides=["+shape=llama3_8b", "seq_len=2048"])
    run = from_dictconfig(changed)
    assert (run.heads, run.kv_heads, run.model) == (8, 8, "llama3_8b[heads=8]")
    assert from_dictconfig(both).model == "llama3_8b[heads=16,head_dim=64]"
    assert from_dictconfig(same).model == "llama3_8b"
