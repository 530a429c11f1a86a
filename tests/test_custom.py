"""`variant=custom variant.target=...`: your own function or nn.Module timed like any variant."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_sweep import ran_ok

from attnbench import variants
from attnbench.harness.run.config import ConfigError, RunConfig, TimingConfig, validate
from attnbench.harness.run.job import run_point

REPO = Path(__file__).resolve().parent.parent
TINY = ["batch=1", "heads=2", "head_dim=16", "timing.min_reps=2", "timing.min_time_s=0",
        "timing.warmup=1"]
MODULE = '''
import torch
import torch.nn.functional as F


def my_attention(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def half_attention(q, k, v, causal):  # not softmax attention: a drift to measure
    return 0.5 * F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class MyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.ones(()))

    def forward(self, q, k, v, causal):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 / self.temperature  # (B, H, N, N)
        if causal:
            n = s.shape[-1]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v


class NotAModule:
    pass


def doubles_q(q, k, v, causal):  # modifies its input: the reference would see the change
    q.mul_(2.0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def shifts_k(q, k, v, causal):
    with torch.no_grad():
        k.add_(1.0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def in_float64(q, k, v, causal):  # another computation than the one asked for
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


def in_float16(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).half()


def as_int64(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).long()


def one_head(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)[:, :1]


def as_tuple(q, k, v, causal):
    return (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)
'''


@pytest.fixture
def my_module(tmp_path, monkeypatch):
    name = f"my_attn_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _run(target: str, **kw) -> RunConfig:
    run = RunConfig(variant="custom", params={"target": target, **kw.pop("params", {})},
                    batch=1, heads=2, seq_len=96, head_dim=16, device="cpu",
                    timing=TimingConfig(warmup=1, min_reps=2, min_time_s=0), **kw)
    validate(run)
    return run


@pytest.mark.parametrize("attr", ["my_attention", "MyAttention"], ids=["function", "module"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_custom_target_is_measured_like_any_variant(my_module, attr, mode):
    record = run_point(_run(f"{my_module}:{attr}", params={"exact": True}, causal=True,
                            mode=mode))
    assert record.status == "ok", record.reason
    assert record.label == f"custom[{my_module}:{attr},exact=True]"
    assert record.latency_ms > 0 and record.peak_mem_bytes > 0 and record.flops > 0
    # declared exact: its definition is softmax, so its check and its softmax error agree
    assert record.impl_error < 1e-5 and record.error_ref == "softmax" and record.impl_ok
    assert record.softmax_rel_error == record.impl_error


def test_a_target_that_is_not_softmax_shows_its_drift(my_module):
    record = run_point(_run(f"{my_module}:half_attention"))
    assert record.status == "ok", record.reason
    assert record.softmax_rel_error == pytest.approx(0.5, rel=1e-3)
    assert math.isnan(record.impl_error) and record.impl_ok  # no definition of its own
    assert "no implementation check" in record.quality_note


def test_custom_module_is_built_once_per_device_and_dtype(my_module):
    att = variants.build("custom", target=f"{my_module}:MyAttention")
    q = torch.randn(1, 2, 8, 4)
    att(q, q, q)
    att(q, q, q, causal=True)
    assert len(att._modules) == 1
    torch.testing.assert_close(att(q, q, q), torch.nn.functional.scaled_dot_product_attention(
        q, q, q))


@pytest.mark.parametrize(("target", "word"), [
    ("no_such_pkg.mod:fn", "cannot import no_such_pkg.mod"),
    ("{m}:nope", "has no attribute 'nope'"),
    ("{m}:NotAModule", "nn.Module"),
    ("justaword", "expected module:function"),
])
def test_bad_target_is_a_config_error_naming_variant_target(my_module, target, word):
    with pytest.raises(ConfigError) as err:
        _run(target.format(m=my_module))
    assert str(err.value).startswith("variant.target: ") and word in str(err.value)


def test_custom_from_the_command_line(tmp_path, my_module):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cwd = tmp_path  # where my_module's file is: found from the current directory
    ok = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "variant=custom",
                         f"variant.target={my_module}:MyAttention", "seq_len=64", *TINY,
                         f"hydra.run.dir={tmp_path}/r"], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ran_ok(ok.stdout, f"custom[{my_module}:MyAttention] n=64"), ok.stdout
    bad = subprocess.run([sys.executable, "-m", "attnbench.harness.cli", "variant=custom",
                          "variant.target=no_such_pkg:fn", f"hydra.run.dir={tmp_path}/x"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("attnbench: error: variant.target:")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("attr", "words"), [
    ("doubles_q", "modified its input q in place"), ("shifts_k", "modified its input k in place"),
    ("in_float64", "dtype is float64, not the inputs' float32"),
    ("in_float16", "dtype is float16"), ("as_int64", "dtype is int64"),
    ("one_head", "shape is (1, 1, 96, 16)"), ("as_tuple", "returned a tuple, not a tensor")])
def test_a_target_that_modifies_its_inputs_or_returns_another_dtype_is_invalid(my_module, attr,
                                                                               words):
    """The float64 reference must see the inputs the harness drew, and the timing must be of
    the computation asked for: otherwise the point is `invalid`, saying why, never `ok`."""
    rec = run_point(_run(f"{my_module}:{attr}"))
    assert rec.status == "invalid", (rec.status, rec.impl_error)
    assert words in rec.reason, rec.reason
