"""A point's quality fields against float64 computations written here from their definitions:
softmax_rel_error (overall and per head), attention-mass recall, the implementation check."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from attnbench import variants
from attnbench.harness.run.accuracy import quality
from attnbench.harness.run.config import ErrorConfig, RunConfig, from_dictconfig
from attnbench.harness.run.job import run_point
from attnbench.variants import reference as _reference
from attnbench.variants import registry
from attnbench.variants.base import IMPL_TOL, Variant
from attnbench.variants.testing import random_qkv


def softmax_probs(q, k, rows, causal):
    """float64 P = softmax(q kᵀ/√d) of the query rows `rows` (B, H, R, Nk); grouped k/v heads
    repeated; query i at position Nk − Nq + i."""
    h, nq, d = q.shape[1:]
    hkv, nk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    s = q[:, :, rows].double() @ kk.transpose(-1, -2) / math.sqrt(d)
    if causal:
        future = torch.arange(nk)[None, :] > (rows + nk - nq)[:, None]
        s = s.masked_fill(future, -math.inf)
    return torch.softmax(s, -1)


def expected(q, k, v, out, rows, causal, keys=None):
    """softmax_rel_error, per-(batch, head) errors and per-(batch, head, row) recall of `keys`
    (bool, broadcastable to (B, H, R, Nk)), from the definitions."""
    h, hkv = q.shape[1], k.shape[1]
    p = softmax_probs(q, k, rows, causal)
    ref = p @ v.double().repeat_interleave(h // hkv, dim=1)
    diff = out[:, :, rows].double() - ref
    total = (diff.norm() / ref.norm()).item()
    heads = (diff.square().sum((-2, -1)) / ref.square().sum((-2, -1))).sqrt().flatten()
    recall = None if keys is None else (p * keys).sum(-1).flatten()
    return total, heads, recall


def _run(causal=False, rows=16, dtype="float32") -> RunConfig:
    return RunConfig(variant="x", params={}, causal=causal, dtype=dtype,
                     error=ErrorConfig(rows=rows))


def _rows(nq: int, r: int = 16) -> torch.Tensor:
    return torch.randperm(nq, generator=torch.Generator().manual_seed(3))[:r].sort().values


def local_keys(window, sinks, rows, nq, nk, causal):
    """Sliding window |i − j| ≤ w (causal: 0 ≤ i − j ≤ w) plus the first `sinks` keys."""
    i = (rows + nk - nq)[:, None]
    j = torch.arange(nk)[None, :]
    keys = ((i - j).abs() <= window) | (j < sinks)
    return keys & (j <= i) if causal else keys


def _check(f, total, heads, recall):
    assert f["softmax_rel_error"] == pytest.approx(total, rel=1e-9)
    assert f["head_error_median"] == pytest.approx(statistics.median(heads.tolist()), rel=1e-9)
    assert f["head_error_max"] == pytest.approx(float(heads.max()), rel=1e-9)
    if recall is None:
        assert math.isnan(f["recall_mean"]) and math.isnan(f["recall_p10"])
    else:
        assert f["recall_mean"] == pytest.approx(float(recall.mean()), rel=1e-9)
        assert f["recall_p10"] == pytest.approx(float(np.percentile(recall.numpy(), 10)),
                                                rel=1e-9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("window", "sinks"), [(8, 0), (8, 5), (200, 0)])
def test_local_softmax_error_and_recall_from_the_definition(causal, window, sinks):
    att = variants.build("local", window=window, sinks=sinks, block=16)
    q, k, v = random_qkv(2, 3, 96, 16, torch.float32, seed=1)
    out = att(q, k, v, causal=causal)
    rows = _rows(96)
    f = quality(att, q, k, v, out, _run(causal), rows)
    total, heads, recall = expected(q, k, v, out, rows, causal,
                                    local_keys(window, sinks, rows, 96, 96, causal))
    _check(f, total, heads, recall)
    assert f["error_ref"] == "masked softmax" and f["impl_ok"] and f["impl_error"] < 1e-5
    if window >= 96:  # a window over every key is exact attention: its softmax error rounding
        assert f["softmax_rel_error"] < 1e-5 and f["recall_mean"] == pytest.approx(1.0)
    else:  # exact to its own mask (impl_error), far from exact attention
        assert f["softmax_rel_error"] > 0.1 and f["recall_p10"] < 0.7


@pytest.mark.parametrize("name", ["strided", "fixed", "bigbird", "longformer"])
def test_patterns_recall_is_the_softmax_mass_on_their_mask(name):
    """Grouped heads and fewer queries than keys, causal: the mask is the pattern's
    `key_mask` (its definition), the mass and errors are computed here."""
    params = {"strided": dict(block=8, window_blocks=1, stride=4),
              "fixed": dict(block=8, stride=4),
              "bigbird": dict(block=8, window_blocks=1, globals=1, random=1),
              "longformer": dict(block=8, window=12, global_tokens=8)}[name]
    att = variants.build(name, **params)
    q, k, v = random_qkv(1, 4, 128, 16, torch.float32, seed=2)
    q, k, v = q[:, :, 32:], k[:, :2], v[:, :2]  # q_len 96 of 128; 2 k/v heads for 4 q heads
    out = att(q, k, v, causal=True)
    rows = _rows(96)
    keys = att.key_mask(rows + 32, 128, True)
    f = quality(att, q, k, v, out, _run(True), rows)
    _check(f, *expected(q, k, v, out, rows, True, keys))
    assert 0 < f["recall_p10"] <= f["recall_mean"] < 1


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_full_attention_has_recall_one_and_its_rounding_as_softmax_error(backend):
    att = variants.build("full", backend=backend)
    q, k, v = random_qkv(2, 2, 64, 16, torch.float32, seed=3)
    out = att(q, k, v, causal=True)
    rows = _rows(64)
    f = quality(att, q, k, v, out, _run(True), rows)
    _check(f, *expected(q, k, v, out, rows, True, torch.ones(1, 64, dtype=torch.bool)))
    assert f["recall_mean"] == pytest.approx(1.0, abs=1e-12)
    assert f["impl_error"] == f["softmax_rel_error"] < 1e-5 and f["error_ref"] == "softmax"


def moba_keys(att, q, k, rows):
    """MoBA from its paper: block means of the keys, gate q·mean per query and head, the
    top-(k − 1) complete blocks before its own, plus its own; keys at or before the query."""
    b, h, nq = q.shape[:3]
    hkv, n = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    out = torch.zeros(b, h, len(rows), n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for ri, row in enumerate(rows.tolist()):
                t = row + n - nq
                own = t // att.block
                means = [kk[bi, hi, j * att.block:(j + 1) * att.block].mean(0)
                         for j in range(own)]
                gate = [float(q[bi, hi, row].double() @ m) for m in means]
                chosen = [*sorted(range(own), key=lambda j: -gate[j])[: att.topk - 1], own]
                for j in chosen:
                    out[bi, hi, ri, j * att.block:min(n, (j + 1) * att.block)] = True
                out[bi, hi, ri, t + 1:] = False
    return out


def nsa_keys(att, q, k, rows):
    """NSA (arXiv 2502.11089) without learned weights, from the paper: compression blocks of
    l keys at stride d (means), visible once complete; p_cmp = softmax of q·k̃/√D over them,
    summed over the heads of a k/v group (eq. 10); a selection block j of l′ keys scores the
    p_cmp of the compression blocks weighted by their overlap with it in strides (eq. 9); the
    first, the own and the previous block always, then the top ones before the own block, n in
    all; plus the sliding window t − w … t. The compressed branch attends block means, not
    keys: it is not in the set."""
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g, l_, st, lsel = h // hkv, att.cmp_block, att.cmp_stride, att.sel_block
    starts = list(range(0, n - l_ + 1, st))
    out = torch.zeros(b, h, len(rows), n, dtype=torch.bool)
    for bi in range(b):
        for kv in range(hkv):
            kc = torch.stack([k[bi, kv, s:s + l_].double().mean(0) for s in starts])
            for ri, row in enumerate(rows.tolist()):
                t = row + n - nq
                seen = [i for i, s in enumerate(starts) if s + l_ - 1 <= t]
                p = torch.zeros(len(starts), dtype=torch.float64)
                for hi in range(kv * g, (kv + 1) * g):
                    if seen:
                        sc = kc[seen] @ q[bi, hi, row].double() / math.sqrt(d)
                        p[seen] += torch.softmax(sc, 0)
                own = t // lsel
                score = {}
                for j in range(own):
                    lo, hi_ = j * lsel // st, (j + 1) * lsel // st  # block j in stride units
                    score[j] = sum(float(p[i]) * max(0, min(i + l_ // st, hi_) - max(i, lo))
                                   for i in range(len(starts)))
                forced = {j for j in (0, own - 1) if 0 <= j < own}
                rest = sorted(set(range(own)) - forced, key=lambda j: -score[j])
                chosen = [*[*sorted(forced), *rest][: att.sel_count - 1], own]
                for hi in range(kv * g, (kv + 1) * g):
                    for j in chosen:
                        out[bi, hi, ri, j * lsel:min(n, (j + 1) * lsel)] = True
                    out[bi, hi, ri, max(0, t - att.window):t + 1] = True
                    out[bi, hi, ri, t + 1:] = False
    return out


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_selected_keys_and_recall_from_the_papers(name):
    """MoBA per query head, NSA per k/v group (2 q heads each), 40 of 160 queries."""
    att = (variants.build("moba", block=16, topk=3) if name == "moba" else
           variants.build("nsa", cmp_block=16, cmp_stride=8, sel_block=16, sel_count=5,
                          window=20))  # 4 of 10 blocks: first, previous and 2 by score
    q, k, v = random_qkv(2, 4, 160, 16, torch.float32, seed=4)
    q, k, v = q[:, :, 120:], k[:, :2], v[:, :2]
    rows = _rows(40, 12)
    keys = (moba_keys if name == "moba" else nsa_keys)(att, q, k, rows)
    assert torch.equal(att.attended_keys(q, k, rows, True), keys)
    out = att(q, k, v, causal=True)
    f = quality(att, q, k, v, out, _run(True), rows)
    _check(f, *expected(q, k, v, out, rows, True, keys))
    assert f["error_ref"] == "own definition" and f["impl_ok"] and f["impl_error"] < 1e-5
    assert f["softmax_rel_error"] > 1e-3  # an approximation of softmax attention


def test_linear_and_recurrent_say_what_they_lack():
    q, k, v = random_qkv(1, 2, 64, 16, torch.float32, seed=5)
    rows = _rows(64)
    lin = variants.build("linear")
    out = lin(q, k, v, causal=True)
    f = quality(lin, q, k, v, out, _run(True), rows)
    _check(f, *expected(q, k, v, out, rows, True))  # no key set: no recall
    assert math.isnan(f["impl_error"]) and f["impl_ok"] and f["error_ref"] == ""
    assert "no implementation check" in f["quality_note"] and "no recall" in f["quality_note"]
    ret = variants.build("retnet")
    f = quality(ret, q, k, v, ret(q, k, v, causal=True), _run(True), rows)
    assert f["impl_error"] < 1e-5 and f["error_ref"] == "own definition" and f["impl_ok"]
    for key in ("softmax_rel_error", "head_error_max", "recall_mean"):
        assert math.isnan(f[key]), key
    assert "replaces softmax" in f["quality_note"]


def test_no_reference_is_said_not_guessed(monkeypatch):
    att = variants.build("local", window=8, block=16)
    q, k, v = random_qkv(1, 2, 64, 16, torch.float32, seed=6)
    out = att(q, k, v)
    f = quality(att, q, k, v, out, _run(rows=0))
    assert math.isnan(f["softmax_rel_error"]) and math.isnan(f["impl_error"])
    assert "error.rows=0" in f["quality_note"]
    monkeypatch.setattr(_reference, "REFERENCE_BYTES", 1024)  # one row's scores do not fit
    f = quality(att, q, k, v, out, _run())
    assert math.isnan(f["softmax_rel_error"]) and math.isnan(f["recall_mean"])
    assert "no softmax reference" in f["quality_note"]


def test_small_blocks_give_the_same_numbers(monkeypatch):
    """The walk over k/v heads and rows in blocks changes nothing but memory."""
    att = variants.build("moba", block=16, topk=2)
    q, k, v = random_qkv(2, 4, 96, 16, torch.float32, seed=7)
    k, v = k[:, :2], v[:, :2]
    out = att(q, k, v, causal=True)
    whole = quality(att, q, k, v, out, _run(True, rows=24))
    monkeypatch.setattr(_reference, "REFERENCE_BYTES", 2 * 96 * 8 * 5 * 3 + 2 * 96 * 16 * 8)
    parts = quality(att, q, k, v, out, _run(True, rows=24))
    assert whole.keys() == parts.keys() and not math.isnan(whole["recall_p10"])
    for key, value in whole.items():
        if isinstance(value, float):
            assert parts[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
        else:
            assert parts[key] == value, key


@pytest.mark.parametrize(("name", "params", "causal"), [
    ("moba", {"block": 16, "topk": 2}, True), ("local", {"window": 20, "block": 16}, True),
    ("local", {"window": 20, "block": 16}, False), ("linear", {}, False),
    ("full", {}, True)])
def test_key_tiles_give_the_same_numbers(monkeypatch, name, params, causal):
    """Where one row of one k/v group is over the budget (n = 65536 at d = 128 in decode), the
    keys are walked in tiles with softmax accumulated online: every quality number is the
    untiled walk's to float64 rounding (errors, per-head errors, recall, the masked check)."""
    from attnbench.harness.run import accuracy

    att = variants.build(name, **params)
    q, k, v = random_qkv(2, 4, 300, 16, torch.float32, seed=7)
    k, v = k[:, :2], v[:, :2]
    out = att(q, k, v, causal=causal)
    whole = quality(att, q, k, v, out, _run(causal, rows=24))
    monkeypatch.setattr(accuracy, "KEY_TILE_MIN", 32)
    monkeypatch.setattr(_reference, "REFERENCE_BYTES", 60_000)  # under one row: 2·300·8·5 + …
    tiled = quality(att, q, k, v, out, _run(causal, rows=24))
    assert not math.isnan(tiled["softmax_rel_error"]), tiled["quality_note"]
    assert whole.keys() == tiled.keys()
    for key, value in whole.items():
        if isinstance(value, float):
            assert tiled[key] == pytest.approx(value, rel=1e-10, abs=1e-15, nan_ok=True), key
        else:
            assert tiled[key] == value, key


@dataclass
class OffByOne(Variant):
    """Exact attention that drops each query's own key: a wrong mask, for the check to catch."""

    name: ClassVar[str] = "test_off_by_one"

    def flops(self, shape, causal=False):
        return 4.0 * shape.bh * shape.seq_len**2 * shape.head_dim

    def forward(self, q, k, v, causal=False):
        n = q.shape[-2]
        keep = ~torch.eye(n, dtype=torch.bool, device=q.device)
        if causal:
            keep &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            keep[0, 0] = True
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, -math.inf)
        return torch.softmax(s, -1) @ v


@pytest.fixture
def off_by_one():
    """Registered for the test alone (the registry's other tests see the built-ins only)."""
    variants.register(OffByOne)
    yield
    registry._REGISTRY.pop(OffByOne.name, None)


def test_a_wrong_implementation_fails_its_check_in_the_record(off_by_one):
    run = from_dictconfig({"batch": 1, "heads": 2, "head_dim": 16, "seq_len": 256,
                           "timing": {"min_reps": 2, "min_time_s": 0, "warmup": 1},
                           "variant": {"name": "test_off_by_one"}})
    rec = run_point(run)
    assert rec.status == "ok", rec.reason
    assert rec.error_ref == "softmax" and rec.impl_error > IMPL_TOL["float32"]
    assert not rec.impl_ok and "implementation check FAILED" in rec.line()
    good = run_point(dataclasses.replace(run, variant="full", params={}))
    assert good.impl_ok and good.impl_error < IMPL_TOL["float32"]


def test_tolerance_is_per_dtype_and_a_variant_may_set_its_own():
    att = variants.build("full")
    assert att.impl_tol("float32") == IMPL_TOL["float32"] == att.impl_tol(torch.float32)
    assert att.impl_tol(torch.bfloat16) == IMPL_TOL["bfloat16"] > att.impl_tol("float16")

    class Loose(OffByOne):
        impl_tolerance: ClassVar[dict[str, float]] = {"float32": 1.0}

    assert Loose().impl_tol("float32") == 1.0


def test_decode_is_judged_on_the_new_token_row():
    """mode=decode: the new token (position n) against full softmax over its n + 1 keys; its
    recall is the softmax mass inside the window and sinks, computed here."""
    from attnbench.harness.run.inputs import make_inputs
    from attnbench.variants.base import Shape

    n, w, s = 64, 8, 2
    run = from_dictconfig({"batch": 1, "heads": 2, "head_dim": 16, "seq_len": n, "seed": 0,
                           "mode": "decode", "variant": {"name": "local", "window": w,
                                                         "sinks": s, "block": 16},
                           "timing": {"min_reps": 2, "min_time_s": 0, "warmup": 1}})
    rec = run_point(run)
    assert rec.status == "ok", rec.reason
    q, k, v = make_inputs(Shape(1, 2, n + 1, 16), torch.float32, "cpu", 0)
    row = torch.tensor([n])
    keys = local_keys(w, s, row, n + 1, n + 1, True)
    p = softmax_probs(q, k, row, True)
    assert rec.recall_mean == pytest.approx(float((p * keys).sum(-1).mean()), rel=1e-9)
    # its output is softmax under its mask (to rounding): the error of that against softmax
    masked = torch.softmax((q[:, :, row].double() @ k.double().transpose(-1, -2) / 4)
                           .masked_fill(~keys, -math.inf), -1) @ v.double()
    full = p @ v.double()
    want = ((masked - full).norm() / full.norm()).item()
    assert rec.softmax_rel_error == pytest.approx(want, rel=1e-4)
    assert rec.error_ref == "masked softmax" and rec.impl_ok and rec.impl_error < 1e-5
