"""The method's minimal FLOPs (`Variant.algorithm_flops`) against counts written from each
variant's definition, never above what its engine executes (`flops`), and the record fields that
set them beside the measured latency and matmul rate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnbench import variants
from attnbench.harness.listing import configurations
from attnbench.harness.run.config import RunConfig, TimingConfig, validate
from attnbench.harness.run.job import run_point
from attnbench.harness.run.point import on_device
from attnbench.variants.base import Shape
from attnbench.variants.sparse.nsa_naive import nsa_selection
from attnbench.variants.sparse.select import blocks_to_keys

# Small parameters, so a few dozen tokens cross band edges, partial last blocks and sinks.
PATTERNS = [
    ("local", {"window": 5, "block": 4}),
    ("local", {"window": 5, "block": 4, "sinks": 3}),
    ("local", {"window": 0, "block": 4, "sinks": 9}),
    ("local", {"window": 300, "block": 128}),  # the window covers everything
    ("strided", {"block": 4, "window_blocks": 1, "stride": 3}),
    ("fixed", {"block": 4, "stride": 3, "summary": 1}),
    ("fixed", {"block": 3, "stride": 4, "summary": 2}),
    ("bigbird", {"block": 4}),
    ("longformer", {"block": 4, "window": 5, "global_tokens": 6}),
    ("longformer", {"block": 4, "window": 0, "global_tokens": 0}),
]
SHAPES = [Shape(1, 2, 37, 8), Shape(2, 4, 64, 4, kv_heads=2), Shape(1, 2, 61, 8, q_len=13)]


def _pairs(mask_rows: torch.Tensor) -> int:
    return int(mask_rows.sum())


@pytest.mark.parametrize(("name", "params"), PATTERNS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(PATTERNS)])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_patterns_count_their_allowed_pairs(name, params, causal):
    """4·B·H·D·(query–key pairs its float64 mask allows, causal j <= i, last Nq queries): no
    padding, no masked half of the diagonal blocks; below what the engine executes."""
    att = variants.build(name, **params)
    for shape in SHAPES:
        n = shape.seq_len
        if att.not_supported_reasons(shape, torch.float32, "cpu", causal):
            continue
        rows = torch.arange(n - shape.nq, n)
        mask = att.key_mask(rows, n, causal)  # (Nq, N) bool, the definition's
        want = 4 * shape.bh * shape.head_dim * _pairs(mask)
        assert att.algorithm_flops(shape, causal) == want
        assert want <= att.flops(shape, causal) and want <= att.flops(shape, causal, "cuda")


@pytest.mark.parametrize(("name", "params"), PATTERNS[:3] + PATTERNS[-2:],
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(PATTERNS[:3] + PATTERNS[-2:])])
def test_pattern_decode_counts_the_new_row(name, params):
    att = variants.build(name, **params)
    shape = Shape(1, 2, 40, 8)
    row = att.key_mask(torch.tensor([40]), 41, True)
    assert att.algorithm_decode_flops(shape) == 4 * 2 * 8 * _pairs(row)
    assert att.algorithm_decode_flops(shape) <= att.decode_flops(shape)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_full_counts_the_causal_triangle_whatever_the_backend(backend, causal):
    att = variants.build("full", backend=backend)
    for shape in SHAPES:
        n, nq = shape.seq_len, shape.nq
        pos = torch.arange(n - nq, n)[:, None]
        mask = torch.arange(n)[None, :] <= pos if causal else torch.ones(nq, n, dtype=bool)
        want = 4 * shape.bh * shape.head_dim * _pairs(mask)
        assert att.algorithm_flops(shape, causal) == want <= att.flops(shape, causal)
    if causal and backend == "naive":  # it executes the whole square
        assert att.flops(SHAPES[0], True) > att.algorithm_flops(SHAPES[0], True)


def _qkv(shape: Shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.batch, shape.heads, shape.nq, shape.head_dim, generator=g,
                    dtype=torch.float64)
    k = torch.randn(shape.batch, shape.hkv, shape.seq_len, shape.head_dim, generator=g,
                    dtype=torch.float64)
    return q, k


MOBA_SHAPES = [Shape(1, 2, 50, 8), Shape(2, 4, 45, 8, kv_heads=2, q_len=20)]


@pytest.mark.parametrize("topk", [1, 3])
def test_moba_counts_its_selected_keys_and_the_router(topk):
    """Per query head and query: 4·D per key it attends (its float64 selection, causal inside
    its own block) and 2·D per complete block before its own that the router scores."""
    att = variants.build("moba", block=8, topk=topk)
    for shape in MOBA_SHAPES:
        q, k = _qkv(shape)
        n, b = shape.seq_len, 8
        rows = torch.arange(shape.nq)
        keys = _pairs(att.attended_keys(q, k, rows, True))  # over B, H and the rows
        routed = sum(sum(1 for j in range(-(-n // b)) if (j + 1) * b <= p // b * b)
                     for p in range(n - shape.nq, n))
        want = shape.head_dim * (4 * keys + 2 * shape.bh * routed)
        assert att.algorithm_flops(shape, True) == want <= att.flops(shape, True)


def test_nsa_counts_its_three_branches():
    """Per query head and query at t: 4·D per complete compressed block (i·d + l − 1 <= t),
    per selected key (its float64 selection, causal) and per window key (t − w <= j <= t)."""
    att = variants.build("nsa", cmp_block=8, cmp_stride=4, sel_block=8, sel_count=3, window=10)
    for shape in [Shape(1, 2, 60, 8), Shape(2, 4, 53, 8, kv_heads=2, q_len=21)]:
        q, k = _qkv(shape, 1)
        n = shape.seq_len
        rows = torch.arange(shape.nq)
        pos = rows + (n - shape.nq)
        sel = _pairs(blocks_to_keys(nsa_selection(att, q, k, rows), 8, n, pos))
        rel = pos[:, None] - torch.arange(n)
        win = shape.bh * _pairs((rel >= 0) & (rel <= 10))
        ends = torch.arange((n - 8) // 4 + 1) * 4 + 8 - 1  # compression block i: i·d … i·d+l−1
        cmp = shape.bh * _pairs(ends[None, :] <= pos[:, None])
        want = 4 * shape.head_dim * (sel + win + cmp)
        assert att.algorithm_flops(shape, True) == want <= att.flops(shape, True)


@pytest.mark.parametrize("name", ["retnet", "deltanet"])
def test_recurrent_step_form_counts_its_own_work(name):
    att = variants.build(name, impl="recurrent")
    shape = Shape(1, 2, 40, 8)
    assert att.algorithm_flops(shape, True) == att.flops(shape, True)


def _everything():
    return [(name, params) for name in variants.names() for params in configurations(name)]


@pytest.mark.parametrize(("name", "params"), _everything(),
                         ids=[f"{n}{p or ''}" for n, p in _everything()])
def test_executed_is_never_below_the_algorithm(name, params):
    att = variants.build(name, **params)
    shapes = [Shape(1, 4, 1000, 32), Shape(2, 4, 2048, 16, kv_heads=2),
              Shape(1, 4, 4096, 32, q_len=300)]
    checked = 0
    for shape in shapes:
        for causal in (False, True):
            # the models need no support here (a backend without CPU kernels is modelled too);
            # only a point the variant rejects for its shape or mask is left out
            why = " ".join(att.not_supported_reasons(shape, torch.float32, "cpu", causal))
            if any(w in why for w in ("causal", "q_len", "grouped", "seq_len")):
                continue
            for device in ("cpu", "cuda"):  # the GPU path's models need no GPU
                algo = on_device(att.algorithm_flops, device)(shape, causal)
                done = on_device(att.flops, device)(shape, causal)
                assert 0 < algo <= done, (shape, causal, device)
                checked += 1
    assert checked or name == "custom"


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "decode"])
def test_a_record_carries_both_counts_and_the_fraction_of_the_binding_limit(mode):
    run = RunConfig(variant="local", params={"window": 8, "block": 8}, batch=1, heads=2,
                    seq_len=64, head_dim=8, device="cpu", causal=True, mode=mode,
                    timing=TimingConfig(warmup=1, min_reps=2, min_time_s=0))
    validate(run)
    rec = run_point(run)
    assert rec.status == "ok", rec.reason
    att, shape = variants.build("local", window=8, block=8), run.shape
    if mode == "decode":
        algo, done = att.algorithm_decode_flops(shape), att.decode_flops(shape)
    else:
        k = 3 if mode == "fwd_bwd" else 1  # the method's backward: twice its forward
        algo = k * att.algorithm_flops(shape, True)
        done = att.flops(shape, True) + (att.backward_flops(shape, True) if k == 3 else 0)
    assert rec.algo_flops == algo <= rec.executed_flops == done == rec.flops
    assert rec.kernel.startswith("local:ring" if mode == "decode" else "blocksparse:")
    assert mode == "decode" or algo < done  # the band's edge blocks are computed whole
    assert rec.matmul_gflops > 0 and rec.read_gbps > 0 and rec.algo_bytes > 0
    times = {"matmul": rec.executed_flops / (rec.matmul_gflops * 1e9),
             "memory": rec.algo_bytes / (rec.read_gbps * 1e9)}
    assert rec.limit_bound == max(times, key=times.get)
    want = times[rec.limit_bound] / (rec.latency_ms * 1e-3)
    assert math.isclose(rec.limit_fraction, want, rel_tol=1e-12)


FOUR = ("algo_flops", "executed_flops", "algo_bytes", "matmul_gflops", "read_gbps",
        "limit_fraction")


def test_a_record_without_the_new_fields_still_reads(tmp_path):
    from attnbench.harness.records import Record, read_record, write_record

    rec = Record(variant="full", label="full[sdpa]", family="full", params="{}", batch=1,
                 heads=1, seq_len=64, head_dim=8, dtype="float32", device="cpu", causal=False,
                 mode="fwd", inputs="gaussian", seed=0, status="ok", flops=1.0)
    path = write_record(rec, tmp_path)
    data = json.loads(path.read_text())
    for key in FOUR:
        del data[key]
    path.write_text(json.dumps(data))
    old = read_record(path)
    assert old.flops == 1.0 and all(math.isnan(getattr(old, f)) for f in FOUR)
