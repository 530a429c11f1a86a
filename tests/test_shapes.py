"""Model shapes for every built-in: grouped-query and multi-query heads, fewer queries than keys
(causal aligned bottom-right), and decode through the variant's own cache or state."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.memory import peak_memory
from attnbench.variants.base import Shape
from attnbench.variants.reference import attention_reference
from attnbench.variants.testing import assert_matches, random_qkv

# Small parameters so every pattern and rank fits the test sizes.
SMALL = {"linformer": {"k": 32}, "nystrom": {"landmarks": 16}, "bigbird": {"block": 16},
         "local": {"window": 40, "block": 32}, "longformer": {"block": 16, "window": 20,
         "global_tokens": 8}, "strided": {"block": 16, "stride": 4}, "performer": {"features": 64}}


def build(name: str):
    return variants.build(name, **SMALL.get(name, {}))


def builtins() -> list[str]:
    return sorted(n for n in variants.names()
                  if variants.get(n).__module__.startswith("attnbench.variants."))


def _cpu_variants():
    """Built-ins that run on this CPU, as pytest params (flex has no backward here: forward
    checks only)."""
    out = []
    for name in builtins():
        att = build(name)
        if getattr(att, "backend", "") in ("xformers",):
            continue
        out.append(pytest.param(name, id=name))
    return out


def _reference(att, kv_heads: int):
    """The variant's definition with k/v heads repeated: its own float64 formula, its masked
    softmax, or (approximations) its own quadratic definition via the test helpers."""
    def ref(q, k, v, causal):
        own = att.reference(q, k, v, causal)  # a family's own float64 definition takes the
        if own is not None:  # grouped heads itself (gates drawn per k/v head stay per k/v head)
            return own.to(q.dtype)
        g = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
        if att.exact:
            nq, nk = q.shape[-2], k.shape[-2]
            rows = torch.arange(nq) + (nk - nq)
            mask = att.key_mask(rows, nk, causal)
            return attention_reference(q, k, v, causal, mask, dtype=q.dtype)
        # approximations: the variant itself on repeated heads is its own definition
        return att(q, k, v, causal=causal)
    return ref


def _skip_unless_runs(att, shape, causal, mode="fwd"):
    """Skip where the variant has no such form (a documented reason); grouped heads are
    required of every built-in."""
    square = Shape(shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    if not att.not_supported_reasons(square, torch.float32, "cpu", causal, "fwd"):
        assert shape.hkv == shape.heads or att.supports_gqa, f"{att.name}: no grouped heads"
    reasons = att.not_supported_reasons(shape, torch.float32, "cpu", causal, mode)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", _cpu_variants())
def test_grouped_heads_equal_repeated_heads(name, kv_heads, causal):
    att = build(name)
    b, h, n, d = 2, 4, 150, 16
    shape = Shape(b, h, n, d, kv_heads=kv_heads)
    _skip_unless_runs(att, shape, causal)
    q, _, _ = random_qkv(b, h, n, d, dtype=torch.float64)
    _, k, v = random_qkv(b, kv_heads, n, d, dtype=torch.float64)
    grads = getattr(att, "impl", "") != "flex" and getattr(att, "backend", "") != "flex"
    assert_matches(att, q, k, v, causal, reference=_reference(att, kv_heads), grads=grads)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", _cpu_variants())
def test_fewer_queries_equal_the_last_rows(name, causal):
    att = build(name)
    b, h, n, d, nq = 1, 2, 200, 16, 37
    _skip_unless_runs(att, Shape(b, h, n, d, q_len=nq), causal)
    q, k, v = random_qkv(b, h, n, d, dtype=torch.float64)
    with torch.no_grad():
        square = att(q, k, v, causal=causal)[:, :, n - nq :]
        part = att(q[:, :, n - nq :].contiguous(), k, v, causal=causal)
    assert part.shape == (b, h, nq, d)
    torch.testing.assert_close(part, square, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", _cpu_variants())
def test_decode_steps_equal_the_rows_of_the_causal_forward(name):
    att = build(name)
    b, h, n, d, hkv = 1, 4, 130, 16, 2
    _skip_unless_runs(att, Shape(b, h, n, d, kv_heads=hkv), True, "decode")
    q, _, _ = random_qkv(b, h, n, d, dtype=torch.float64)
    _, k, v = random_qkv(b, hkv, n, d, dtype=torch.float64)
    with torch.no_grad():
        rows = att(q, k, v, causal=True)
        start = n - 10
        state = att.decode_init(k[:, :, :start], v[:, :, :start], heads=h)
        for t in range(start, n):  # ten consecutive steps
            out, state = att.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1],
                                         v[:, :, t : t + 1], state)
            assert out.shape == (b, h, 1, d)
            torch.testing.assert_close(out, rows[:, :, t : t + 1], rtol=1e-7, atol=1e-9)


def test_decode_state_is_not_advanced_by_a_step():
    """The harness times repeated steps against one state: a step must leave it as it was."""
    att = variants.build("full")
    q, k, v = random_qkv(1, 2, 65, 8, dtype=torch.float64)
    state = att.decode_init(k[:, :, :64], v[:, :, :64])
    a, _ = att.decode_step(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], state)
    b_, _ = att.decode_step(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], state)
    assert state.length == 64 and torch.equal(a, b_)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_grouped_heads_use_less_memory_than_repeating_them(backend):
    att = variants.build("full", backend=backend)
    b, h, hkv, n, d = 1, 8, 1, 1024, 64
    q = torch.randn(b, h, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    with torch.no_grad():
        grouped = peak_memory(lambda: att(q, k, v))
        kr, vr = k.repeat_interleave(h, 1), v.repeat_interleave(h, 1)
        repeated = peak_memory(lambda: att(q, k.repeat_interleave(h, 1),
                                           v.repeat_interleave(h, 1)))
    del kr, vr
    saved = 2 * b * (h - hkv) * n * d * 4  # the repeated k and v
    assert grouped <= repeated - 0.9 * saved, (grouped, repeated)
