"""Block-sparse and local models: closed-form density, FLOPs and memory equal what the layouts
compute (the CPU layout and the GPU path's buckets), at awkward n, and a point far beyond the
memory cap allocates nothing large."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnbench import variants
from attnbench.variants.base import Shape
from attnbench.variants.sparse.pattern import BlockSparse

REPO = Path(__file__).resolve().parent.parent
PATTERNS = sorted(n for n in variants.names() if issubclass(variants.get(n), BlockSparse))
# Several parameter sets per pattern: small blocks so awkward n spans many blocks, windows and
# strides larger than the sequence, blocks of one token, globals beyond the end.
PARAMS = {
    "local": [dict(window=5, block=4), dict(window=0, block=8), dict(window=16, block=16),
              dict(window=100, block=3), dict(window=2, block=1), dict(window=5, block=4, sinks=3),
              dict(window=0, block=8, sinks=20), dict(window=3, block=2, sinks=1)],
    "strided": [dict(block=4, window_blocks=1, stride=3), dict(block=3, window_blocks=0, stride=1),
                dict(block=5, window_blocks=2, stride=7),
                dict(block=1, window_blocks=3, stride=4)],
    "fixed": [dict(block=4, stride=3, summary=1), dict(block=3, stride=5, summary=5),
              dict(block=2, stride=4, summary=2), dict(block=7, stride=1, summary=1)],
    "bigbird": [dict(block=4, window_blocks=3, globals=1, random=2),
                dict(block=3, window_blocks=1, globals=0, random=3, seed=5),
                dict(block=2, window_blocks=5, globals=3, random=1),
                dict(block=4, window_blocks=7, random=0)],
    "longformer": [dict(block=4, window=5, global_tokens=3), dict(block=8, window=0,
                   global_tokens=0), dict(block=3, window=20, global_tokens=50)],
}
AWKWARD_N = [1, 2, 7, 13, 41, 67, 128, 131]


def test_every_block_sparse_pattern_has_parameter_sets():
    assert set(PARAMS) == set(PATTERNS)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", PATTERNS)
def test_closed_form_counts_equal_the_layout(name, causal):
    for kw in [*PARAMS[name], {}]:
        for n in AWKWARD_N:
            att = variants.build(name, **kw)
            b, nb = att.block, -(-n // att.block)
            # the models, before any layout exists
            density = att.density(n, causal)
            flops = att.flops(Shape(2, 3, n, 16), causal)
            counts, last = att.row_counts(nb, causal)
            # the dense block table of the pattern, and of what the CPU engine runs (causal: a
            # query block's keys up to the end of its run of `causal_span` blocks)
            table = att.block_layout(nb, causal)
            assert torch.equal(counts, table.sum(1)), (kw, n)
            assert torch.equal(last, table[:, -1]), (kw, n)
            inside = (n - torch.arange(nb) * b).clamp(0, b)
            assert density == int((inside[:, None] * inside[None, :] * table).sum()) / n**2
            ran = att.block_layout(nb, causal, att.causal_span())
            ran_counts, ran_last = att.engine_counts(nb, causal)
            assert torch.equal(ran_counts, ran.sum(1)) and torch.equal(ran_last, ran[:, -1])
            computed = att.layout(n, causal).computed
            assert computed == int((inside[:, None] * inside[None, :] * ran).sum())
            # FLOPs count what runs: every computed block pair in full (padding included)
            pairs = att.layout(n, causal).pairs
            assert pairs == int(ran.sum()), (kw, n)
            assert flops == 4.0 * 6 * 16 * b * b * pairs, (kw, n)
            # the GPU path's padded buckets, from the same closed form
            gpu = att.gpu_layout(n, causal)
            assert sum(ki.numel() for _, ki, _, _ in gpu.buckets) == att.pairs(
                Shape(2, 3, n, 16), causal, device="cuda"), (kw, n)


@pytest.mark.parametrize("name", PATTERNS)
def test_layout_is_built_only_when_needed(name):
    att = variants.build(name)
    att.density(8192, True)
    att.flops(Shape(1, 8, 8192, 64), True)
    att.memory_bytes(Shape(1, 8, 8192, 64), torch.float32, True)
    assert not [k for k in att._cache if k[0] == "layout"]


def test_bigbird_random_blocks_are_exact_under_causal_and_seeded():
    att = variants.build("bigbird", block=4, window_blocks=3, globals=1, random=3)
    for n in (97, 130):
        nb = -(-n // 4)
        drawn = att._random(nb)
        rows = torch.arange(nb)[:, None]
        ok = drawn >= 0
        # outside the window and the globals, distinct per row
        assert (drawn[ok] >= 1).all()
        assert ((drawn - rows).abs()[ok] > 1).all()
        for r in range(nb):
            got = drawn[r][drawn[r] >= 0].tolist()
            assert len(got) == len(set(got))
        assert att.density(n, True) == att.layout(n, True).computed / n**2
    other = variants.build("bigbird", block=4, window_blocks=3, globals=1, random=3, seed=1)
    assert not torch.equal(att._random(40), other._random(40))


# Run in a child whose address space is capped at ~2 GiB: without the closed forms, the (nb, nb)
# block tables of these points need tens of GB, and the child fails instead of the machine.
CAPPED = """
import json, resource, sys, time
import torch
from attnbench import variants
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.job import run_point
from attnbench.variants.base import Shape
names = sys.argv[1].split(",")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
out = []
for name in names:
    for n in (1 << 18, 1 << 20):
        for causal in (False, True):
            for impl in ("blocked", "flex"):
                att = variants.build(name, impl=impl)
                shape = Shape(1, 8, n, 64)
                models = [att.density(n, causal), att.flops(shape, causal),
                          att.memory_bytes(shape, torch.float32, causal)]
                rec = run_point(from_dictconfig(dict(
                    variant={"name": name, "impl": impl}, batch=1, heads=8, seq_len=n,
                    head_dim=64, causal=causal, max_memory="64MB")))
                out.append([name, n, causal, impl, rec.status, rec.reason, models])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"points": out, "grown_mb": grown}))
"""


def test_points_far_beyond_the_cap_are_skipped_without_allocating():
    proc = subprocess.run([sys.executable, "-c", CAPPED, ",".join(PATTERNS)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["points"]) == len(PATTERNS) * 8
    for name, n, causal, impl, status, reason, (density, flops, mem) in result["points"]:
        assert status == "skipped" and "max_memory" in reason, (name, n, causal, impl, reason)
        assert 0 < density < 0.1 and flops > 0 and mem > 64e6
    assert result["grown_mb"] < 300, result["grown_mb"]  # measured: tens of MB
