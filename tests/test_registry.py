"""The registry: build by name, unknown and duplicate names, entry-point plugins."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest

from attnbench import variants
from attnbench.variants import registry
from attnbench.variants.base import Variant


def test_build_by_name_returns_ready_variant():
    att = variants.build("full", backend="naive")
    assert att.label == "full[naive]"
    assert att.family == "full"
    assert "full" in variants.names()


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as err:
        variants.build("fulll")
    msg = str(err.value)
    assert "fulll" in msg and "full" in msg and "Known:" in msg


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match="windoww"):
        variants.build("full", windoww=3)


def test_duplicate_name_raises():
    @dataclass
    class Impostor(Variant):
        name: ClassVar[str] = "full"

    with pytest.raises(ValueError, match="already registered"):
        variants.register(Impostor)
    assert variants.get("full").__module__ == "attnbench.variants.full.full"


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """Two installed distributions on sys.path: a good plugin and a broken one."""

    def dist(name: str, module: str, code: str, entry: str) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
        info = tmp_path / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[attnbench.variants]\n{entry}\n")

    dist(
        "good_plugin", "good_plugin_mod",
        """
        from dataclasses import dataclass
        from typing import ClassVar
        from attnbench import variants
        from attnbench.variants.full.full import naive_attention
        from attnbench.variants.base import Variant

        @variants.register
        @dataclass
        class Doubled(Variant):
            name: ClassVar[str] = "plugin_demo"
            scale: float = 1.0

            def forward(self, q, k, v, causal=False):
                return naive_attention(q, k, v, causal)
        """,
        "plugin_demo = good_plugin_mod",
    )
    dist("broken_plugin", "broken_plugin_mod", "raise ImportError('boom')\n",
         "broken = broken_plugin_mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    for mod in ("good_plugin_mod", "broken_plugin_mod"):
        sys.modules.pop(mod, None)


def test_plugin_discovered_and_broken_plugin_only_warns(plugin_env):
    with pytest.warns(UserWarning, match=r"broken.*failed to load.*boom"):
        found = variants.names()
    assert "plugin_demo" in found and "full" in found
    att = variants.build("plugin_demo", scale=2.0)
    assert att.label == "plugin_demo[scale=2.0]"


def _other_values(value):
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2 if value else 1]
    if isinstance(value, float):
        return [value * 2 if value else 0.5]
    return {"blocked": ["flex"], "naive": ["sdpa"], "sdpa": ["naive"], "auto": ["math"]}.get(
        value, [])


@pytest.mark.parametrize("name", variants.names())
def test_every_parameter_change_changes_the_label(name):
    """Two points of a sweep that differ in any parameter never share a label (reports, plots
    and `compare` key on it)."""
    default = variants.build(name)
    for param, value in default.params().items():
        for other in _other_values(value):
            try:
                changed = variants.build(name, **{param: other})
            except ValueError:
                continue  # not a valid value for this parameter
            assert changed.label != default.label, (param, other, default.label)


@pytest.mark.parametrize("name", variants.names())
def test_density_is_a_fraction_of_the_scores(name):
    """density: the fraction of the n×n scores the algorithm computes, at most 1 at every n
    (blocks larger than n included); None where it has no meaning. Padded, executed work is in
    the FLOPs."""
    att = variants.build(name)
    for n in (1, 64, 100, 1024):
        for causal in (False, True):
            d = att.density(n, causal)
            assert d is None or 0 < d <= 1, (n, causal, d)
