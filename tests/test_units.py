"""One meaning per name: `window` counts tokens in every variant that has one; a window counted
in blocks is `window_blocks` (strided, bigbird), and the old name `window` is read under the new
one for one release with a one-line note; a sweep that would give one `window` value two
meanings is refused in one line."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.config import ConfigError, from_dictconfig
from attnbench.harness.run.plan import plan
from attnbench.harness.run.point import point_id, point_label

TINY = ["batch=1", "heads=2", "head_dim=16", "seq_len=256"]
WINDOWED = [n for n in variants.names()
            if "window" in {f.name for f in dataclasses.fields(variants.get(n))}]
RENAMED = [n for n in variants.names() if variants.get(n).renamed]


def test_the_window_of_every_variant_that_has_one_counts_tokens():
    """window=5 with blocks of 4: query t attends keys t − 5 … t (an exact pattern: those only;
    NSA adds its selected blocks). Counted in blocks it would reach 20 keys back."""
    assert {"local", "longformer", "nsa"} <= set(WINDOWED)
    assert not {"strided", "bigbird"} & set(WINDOWED)
    n, t, w = 64, 40, 5
    q, k = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    for name in WINDOWED:
        fields = {f.name for f in dataclasses.fields(variants.get(name))}
        extra = {f: v for f, v in (("block", 4), ("global_tokens", 0), ("sinks", 0))
                 if f in fields}
        att = variants.build(name, window=w, **extra)
        keys = att.attended_keys(q, k, torch.tensor([t]), causal=True).reshape(-1, n)[0]
        band = (torch.arange(n) >= t - w) & (torch.arange(n) <= t)
        assert keys[band].all(), name
        if att.exact:
            assert torch.equal(keys, band), (name, keys.nonzero().flatten().tolist())


@pytest.mark.parametrize("name", RENAMED)
def test_an_old_name_builds_the_new_one_with_one_line(name):
    cls = variants.get(name)
    assert cls.renamed == {"window": ("window_blocks", "blocks")}
    with pytest.warns(FutureWarning) as caught:
        old = variants.build(name, window=5)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"{name}: `window` counts blocks and is renamed `window_blocks`; window=5 read as "
        f"window_blocks=5 (`window` is accepted until the next release)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = variants.build(name, window_blocks=5)
    assert old.params() == new.params() and old.label == new.label
    assert "window" not in old.params() and old.params()["window_blocks"] == 5
    with pytest.raises(TypeError, match=r"window=5: the old name of .*window_blocks.*drop window"):
        variants.build(name, window=5, window_blocks=3)


def test_labels_and_point_ids_are_those_before_the_rename():
    """Labels keep `w=` and a point keeps its id (its folder, resume, compare): the ids below
    were taken before the rename, with `window`."""
    before = {("strided", 2): "bfd2760681ceb592", ("strided", 1): "751a0760e7abc11d",
              ("bigbird", 3): "e6ae229fdf7d11bb", ("bigbird", 5): "1915063540cfed03"}
    for (name, w), pid in before.items():
        run = from_dictconfig({"variant": {"name": name, "window_blocks": w}, "seq_len": 256})
        assert point_id(run) == pid, name
    run = from_dictconfig({"variant": {"name": "strided", "window_blocks": 1}, "seq_len": 256})
    assert point_label(run) == "strided[b=64,w=1,s=32]"


def test_a_config_with_the_old_name_is_read_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="attnbench"):
        run = from_dictconfig({"variant": {"name": "bigbird", "window": 5}, "seq_len": 512})
    assert run.params == {"window_blocks": 5}
    assert [r.getMessage() for r in caplog.records] == [
        "attnbench: bigbird: `window` counts blocks and is renamed `window_blocks`; window=5 "
        "read as window_blocks=5 (`window` is accepted until the next release)"]
    with pytest.raises(ConfigError, match=r"^variant.window: window=5: the old name"):
        from_dictconfig({"variant": {"name": "bigbird", "window": 5, "window_blocks": 3}})


def test_a_sweep_reads_the_old_name_once_per_value(caplog):
    with caplog.at_level(logging.WARNING, logger="attnbench"):
        planned, _ = plan(["variant=strided", "variant.window=1,2", *TINY])
    assert [p.label for p in planned] == ["strided[b=64,w=1,s=32]", "strided[b=64,w=2,s=32]"]
    assert all("variant.window_blocks=" in " ".join(p.overrides) for p in planned)
    notes = [r.getMessage() for r in caplog.records if "renamed" in r.getMessage()]
    assert len(notes) == 2 and "window=1 read as window_blocks=1" in notes[0]


def test_a_window_for_tokens_and_blocks_at_once_is_refused():
    """`variant=local,strided variant.window=64,256`: tokens for local; read as blocks, 256
    would make strided dense. One line naming variant.window and pointing to window_blocks."""
    with pytest.raises(ConfigError) as exc:
        plan(["variant=local,strided", "variant.window=64,256", *TINY])
    line = str(exc.value)
    assert line.startswith("variant.window: local takes it as its own window, strided would "
                           "read it as window_blocks (in blocks")
    assert "set variant.window_blocks=... for strided" in line and "\n" not in line


def test_a_mixed_sweep_sets_each_unit_by_its_own_name():
    planned, _ = plan(["variant=local,strided,bigbird,full", "variant.window=64,256",
                       "variant.window_blocks=1,3", *TINY])
    assert sorted(p.label for p in planned) == sorted([
        "local[w=64]", "local[w=256]", "strided[b=64,w=1,s=32]", "strided[b=64,w=3,s=32]",
        "bigbird[b=64,w=1,g=2,r=3]", "bigbird[b=64,w=3,g=2,r=3]", "full[sdpa]"])


def test_the_old_name_beside_the_new_one_alone_is_refused():
    with pytest.raises(ConfigError, match=r"^variant.window: the old name of strided's "
                                          r"window_blocks, which is set too; drop variant.window"):
        plan(["variant=strided", "variant.window=1", "variant.window_blocks=2", *TINY])
