"""The bytes a method must move (`Variant.algorithm_bytes`, `algorithm_decode_bytes`) and the
record's fraction of the limit that binds (`limit_fraction`, `limit_bound`).

The byte models are lower bounds: a call's own traffic is at least the bytes its ops read and
write at dispatch level where nothing stays in cache, and at least the token's own bytes. A
model above the ops' reads and writes would claim traffic the call never makes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnbench import variants
from attnbench.harness.run.config import RunConfig, TimingConfig, validate
from attnbench.harness.run.job import run_point, tensor_bytes
from attnbench.variants.base import Shape, token_bytes
from attnbench.variants.testing import random_qkv

N = 520  # past every default block count (BigBird needs 8 blocks of 64)
SHAPE = Shape(1, 4, N, 16, kv_heads=2)  # grouped heads
# ops that only relabel memory (their output is a view of an input)
VIEWS = {"view", "_unsafe_view", "slice", "select", "expand", "transpose", "permute",
         "unsqueeze", "squeeze", "as_strided", "t", "detach", "alias", "split", "unbind",
         "narrow", "diagonal", "split_with_sizes", "lift_fresh"}


class _Traffic(TorchDispatchMode):
    """Bytes of every tensor each non-view op reads (its arguments) and writes (its results)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.rstrip("_") not in VIEWS:
            for x in tree_leaves((args, kwargs or {}, out)):
                if isinstance(x, torch.Tensor):
                    self.bytes += x.numel() * x.element_size()
        return out


def _traffic(fn) -> int:
    with torch.no_grad(), _Traffic() as t:
        fn()
    return t.bytes


def _built_ins() -> list[str]:
    return [n for n in variants.names()
            if variants.get(n).__module__.startswith("attnbench.variants.")]


def _countable(att) -> bool:
    return not (getattr(att, "impl", "") in ("flex", "fla")
                or getattr(att, "backend", "") in ("flex", "xformers"))


@pytest.mark.parametrize("name", _built_ins())
def test_forward_bytes_lie_between_the_io_and_what_the_ops_move(name):
    att = variants.build(name)
    causal = not att.not_supported_reasons(SHAPE, torch.float32, "cpu", True)
    if not _countable(att) or att.not_supported_reasons(SHAPE, torch.float32, "cpu", causal):
        pytest.skip("not countable here")
    q, _, _ = random_qkv(1, 4, N, 16, dtype=torch.float32, seed=0)
    _, k, v = random_qkv(1, 2, N, 16, dtype=torch.float32, seed=1)
    model = att.algorithm_bytes(SHAPE, torch.float32)
    assert model == 4 * 16 * (2 * 4 * N + 2 * 2 * N)  # q, out; k, v
    assert model <= _traffic(lambda: att(q, k, v, causal=causal))


@pytest.mark.parametrize("name", _built_ins())
def test_decode_bytes_lie_between_the_token_and_what_the_step_moves(name):
    att = variants.build(name)
    if not att.has_decode or not _countable(att):
        pytest.skip("no decode form countable here")
    q, _, _ = random_qkv(1, 4, N + 1, 16, dtype=torch.float32, seed=0)
    _, k, v = random_qkv(1, 2, N + 1, 16, dtype=torch.float32, seed=1)
    with torch.no_grad():
        state = att.decode_init(k[:, :, :N], v[:, :, :N], heads=4)
    held = tensor_bytes(state)
    model = att.algorithm_decode_bytes(SHAPE, torch.float32, held)
    if math.isnan(att.algorithm_decode_flops(SHAPE)) and att.decode_memory_exponent != 0:
        assert math.isnan(model)  # no FLOP model, no cache model: no bytes claimed
        return
    step = (q[:, :, N:], k[:, :, N:], v[:, :, N:])
    moved = _traffic(lambda: att.decode_step(*step, state))
    assert token_bytes(SHAPE, 4) < model <= moved, (model, moved, held)


def test_full_decode_reads_its_whole_cache_and_a_recurrent_step_rewrites_its_state():
    """Written from the definitions: softmax over every cached key reads all n + 1 k and v rows
    once per k/v head; a linear RNN reads its (Dk, Dv) state and writes it anew."""
    io = token_bytes(SHAPE, 4)
    cache = 2 * SHAPE.batch * SHAPE.hkv * (SHAPE.seq_len + 1) * SHAPE.head_dim * 4
    assert variants.build("full").algorithm_decode_bytes(SHAPE, torch.float32) == io + cache
    state = SHAPE.batch * SHAPE.hkv * 16 * 16 * 4  # deltanet: one state per k/v head
    got = variants.build("deltanet").algorithm_decode_bytes(SHAPE, torch.float32, state)
    assert got == io + 2 * state


def _point(variant: str, mode: str, n: int):
    run = RunConfig(variant=variant, params={}, batch=1, heads=8, seq_len=n, head_dim=64,
                    device="cpu", causal=True, mode=mode,
                    timing=TimingConfig(warmup=1, min_reps=3, min_time_s=0.02))
    validate(run)
    rec = run_point(run)
    assert rec.status == "ok", rec.reason
    return rec


def test_a_decode_step_is_held_to_the_memory_limit_and_a_prefill_to_the_matmul_rate():
    """Built to fool a matmul-only fraction: full attention's decode step at n = 16384 does
    4·D FLOPs per 2·D·4 bytes of cache it reads (64 MiB, beyond the caches), far below any
    machine's balance; its fraction of the matmul rate alone would read as an engine running
    at a few percent of the machine. The bytes bind there, and the FLOPs in a prefill."""
    step = _point("full", "decode", 16384)
    mm = step.executed_flops / (step.latency_ms * 1e-3) / (step.matmul_gflops * 1e9)
    assert step.limit_bound == "memory" and step.limit_fraction > 2 * mm
    assert step.algo_bytes >= 2 * 8 * 16385 * 64 * 4
    prefill = _point("full", "fwd", 1024)
    assert prefill.limit_bound == "matmul"
    mm = prefill.executed_flops / (prefill.latency_ms * 1e-3) / (prefill.matmul_gflops * 1e9)
    assert math.isclose(prefill.limit_fraction, mm, rel_tol=1e-12)
