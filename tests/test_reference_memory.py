"""The float64 references a point's error is measured against stay inside their tiles: on the
sampled rows only, a bounded stretch of time or block of rows at a time, the heap unfragmented."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.accuracy import quality
from attnbench.harness.run.config import ErrorConfig, RunConfig, from_dictconfig
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.job import run_point
from attnbench.harness.run.memory import peak_memory
from attnbench.variants import reference as _reference

OWN = [("retnet", {}), ("gla", {}), ("mamba2", {}), ("deltanet", {}), ("gated_deltanet", {}),
       ("moba", {}), ("nsa", {})]


@pytest.mark.parametrize("name,params", OWN, ids=[n for n, _ in OWN])
def test_own_reference_stays_inside_its_tiles(name, params, monkeypatch):
    """The error's float64 reference, on the harness's sampled rows, holds at most one tile
    (`REFERENCE_BYTES`, here cut to 4 MiB) and the sampled rows' outputs at a time: a recurrence
    in stretches of time, a dense definition a k/v head and some rows at a time. Taking every
    row and step at once, it held O(B·H·n) (recurrent) or O(B·H·n²/tile) (MoBA, NSA) float64."""
    monkeypatch.setattr(_reference, "REFERENCE_BYTES", 4 << 20, raising=False)
    att = variants.build(name, **params)
    run = RunConfig(variant=name, params=att.params(), heads=8, seq_len=1024, causal=True,
                    device="cpu", error=ErrorConfig(rows=128))
    q, k, v = make_inputs(run.shape, torch.float32, "cpu")
    with torch.no_grad():
        out = att(q, k, v, causal=True)
    f = quality(att, q, k, v, out, run)
    assert f["error_ref"] == "own definition" and f["impl_error"] < 1e-4
    # the sampled rows' float64 outputs (B, H, R, D): a few copies (NSA's three branches, their
    # gated sum, the error's differences)
    rows_out = 8 * run.shape.bh * 128 * run.head_dim * 8
    peak = peak_memory(lambda: quality(att, q, k, v, out, run))
    assert peak <= (4 << 20) + rows_out, f"{peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("name,params", OWN, ids=[n for n, _ in OWN])
def test_own_reference_on_rows_equals_every_row(name, params, monkeypatch):
    """Rows asked for, in tiles of a single step or row, are the rows of the whole reference
    (grouped heads and fewer queries than keys included)."""
    small = {"moba": {"block": 16}, "nsa": {"cmp_block": 8, "cmp_stride": 4, "sel_block": 16,
                                            "window": 20}}
    att = variants.build(name, **small.get(name, params))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, 8, generator=g)
    k, v = (torch.randn(2, 2, 90, 8, generator=g) for _ in range(2))
    whole = att.reference(q, k, v, True)
    rows = torch.tensor([0, 7, 13, 14, 49])
    monkeypatch.setattr(_reference, "REFERENCE_BYTES", 1, raising=False)
    torch.testing.assert_close(att.reference(q, k, v, True, rows=rows), whole[:, :, rows],
                               rtol=1e-12, atol=1e-13)


def test_recurrent_reference_keeps_resident_memory_flat(tmp_path):
    """The process's resident memory, not only the allocator's live bytes: a float64 recurrence
    that kept one small output per step between freed state-sized temporaries fragmented the heap
    (retnet, n = 16K: 0.74 GB predicted, 4.8 GB resident). Run in a fresh process; its growth
    while the error is measured stays under the point's predicted peak."""
    script = textwrap.dedent("""
        import resource, torch
        from attnbench import variants
        from attnbench.harness.run.accuracy import quality
        from attnbench.harness.run.config import RunConfig
        from attnbench.harness.run.inputs import make_inputs
        from attnbench.harness.run.point import decide
        att = variants.build("retnet")
        run = RunConfig(variant="retnet", params={}, seq_len=2048, causal=True, device="cpu")
        q, k, v = make_inputs(run.shape, torch.float32, "cpu")
        with torch.no_grad():
            out = att(q, k, v, causal=True)
        quality(att, q[..., :64, :], k[..., :64, :], v[..., :64, :], out[..., :64, :], run)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        quality(att, q, k, v, out, run)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(grown, decide(att, run).predicted)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    grown, predicted = map(int, res.stdout.split()[-2:])
    assert grown < predicted, f"resident memory grew {grown / 2**20:.0f} MiB " \
                              f"(predicted peak {predicted / 2**20:.0f} MiB)"


@pytest.mark.parametrize("mode,rows,want", [("fwd", 16, 16), ("fwd", 0, 0), ("fwd", 999, 128),
                                            ("decode", 16, 1)])
def test_the_record_states_the_rows_the_error_is_measured_on(mode, rows, want):
    """The reference is sampled (and tiled), outside the prediction: the record says on how many
    query rows."""
    rec = run_point(from_dictconfig(dict(
        variant={"name": "retnet"}, batch=1, heads=2, seq_len=128, head_dim=16, causal=True,
        mode=mode, device="cpu", timing={"warmup": 0, "min_reps": 1, "min_time_s": 0},
        error={"rows": rows},
    )))
    assert rec.status == "ok", rec.reason
    assert rec.error_rows == want
    assert (rec.error_ref == "own definition") == (want > 0)
