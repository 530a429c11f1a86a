"""Block-sparse and local variants on both engine paths (the CPU tiles and the GPU path forced by
ATTNBENCH_FORCE_GPU_PATHS=1): local's sinks, grouped heads and fewer queries against dense
float64 under the mask, bf16 within its budget, grouped heads without repeated k/v, decode."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.job import tensor_bytes
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.variants.base import FORCE_GPU_PATHS, Shape
from attnbench.variants.reference import attention_reference
from attnbench.variants.testing import assert_matches, random_qkv

PATHS = [pytest.param("0", id="cpu"), pytest.param("1", id="gpu")]
SMALL = {
    "local": dict(window=5, block=4, sinks=3),
    "strided": dict(block=4, window_blocks=1, stride=3),
    "fixed": dict(block=4, stride=3, summary=1),
    "bigbird": dict(block=4, window_blocks=3, globals=1, random=2),
    "longformer": dict(block=4, window=5, global_tokens=3),
}


def _reference(att):
    """Dense softmax under the variant's mask, k/v heads repeated, queries the last rows."""
    def ref(q, k, v, causal):
        nq, nk = q.shape[-2], k.shape[-2]
        mask = att.key_mask(torch.arange(nq) + (nk - nq), nk, causal)
        return attention_reference(q, k, v, causal, mask, dtype=q.dtype)
    return ref


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,window,sinks,block", [(37, 5, 4, 4), (61, 16, 1, 16), (53, 7, 9, 8),
                                                  (29, 0, 3, 8), (41, 3, 40, 8)])
def test_sinks_match_dense_masked_float64(n, window, sinks, block, causal, path, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, path)
    att = variants.build("local", window=window, sinks=sinks, block=block)
    q, k, v = random_qkv(2, 3, n, 16)
    assert_matches(att, q, k, v, causal=causal)
    with torch.no_grad():
        assert_matches(att, q, k, v, causal=causal, grads=False)


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_key_mask_and_label(causal):
    n, w, s = 50, 7, 4
    att = variants.build("local", window=w, sinks=s, block=8)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = ((i - j).abs() <= w) | (j < s)
    want = want & (j <= i) if causal else want
    assert torch.equal(att.key_mask(torch.arange(n), n, causal), want)
    assert att.label == "local[w=7,s=4,b=8]"
    assert variants.build("local").label == "local[w=256]"
    with pytest.raises(ValueError, match="sinks"):
        variants.build("local", sinks=-1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_grouped_heads_and_fewer_queries_on_both_paths(name, causal, path, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, path)
    att = variants.build(name, **SMALL[name])
    for nq in (67, 30, 1):  # every query, a partial first block, one query
        q, _, _ = random_qkv(1, 4, nq, 8)
        _, k, v = random_qkv(1, 2, 67, 8)
        assert_matches(att, q, k, v, causal=causal, reference=_reference(att))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_on_the_gpu_path_within_budget(name, causal, monkeypatch):
    """The GPU path multiplies in bf16 (fp32 accumulation there) with an fp32 softmax."""
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = variants.build(name, **SMALL[name])
    q, k, v = random_qkv(2, 2, 75, 32, dtype=torch.bfloat16)
    assert_matches(att, q, k, v, causal=causal)
    assert att.kernel(Shape(2, 2, 75, 32), "cpu", causal, False) == "blocksparse:bucket-gather"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["local", "bigbird"])
def test_grouped_heads_do_not_repeat_k_and_v(name, path, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, path)
    att = variants.build(name, block=64)
    b, h, hkv, n, d = 1, 8, 1, 2048, 64
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    with torch.no_grad():
        att(q, k, v)  # the layout outside the measurement
        grouped = peak_memory(lambda: att(q, k, v))
        repeated = peak_memory(lambda: att(q, k.repeat_interleave(h, 1),
                                           v.repeat_interleave(h, 1)))
    saved = 2 * b * (h - hkv) * n * d * 4  # the repeated k and v
    assert grouped <= repeated - 0.9 * saved, (grouped, repeated)
    shape, wide = Shape(b, h, n, d, kv_heads=hkv), Shape(b, h, n, d)
    assert att.memory_bytes(shape, torch.float32) < att.memory_bytes(wide, torch.float32)


@pytest.mark.parametrize("sinks", [0, 4])
def test_local_decode_state_is_constant_and_not_advanced(sinks):
    att = variants.build("local", window=16, block=8, sinks=sinks)
    q, k, v = random_qkv(1, 2, 200, 8)
    sizes = [tensor_bytes(att.decode_init(k[:, :, :n], v[:, :, :n])) for n in (20, 100, 199)]
    assert len(set(sizes)) == 1, sizes
    state = att.decode_init(k[:, :, :3], v[:, :, :3])  # a sink still filling
    for t in range(3, 40):
        args = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        first, _ = att.decode_step(*args, state)
        again, state = att.decode_step(*args, state)  # the same state, the same step
        assert torch.equal(first, again) and state.length == t + 1
    with torch.no_grad():
        rows = att(q[:, :, :40], k[:, :, :40], v[:, :, :40], causal=True)
    torch.testing.assert_close(again, rows[:, :, 39:40], rtol=1e-9, atol=1e-12)
    assert att.decode_flops(Shape(1, 2, 10_000, 8)) == att.decode_flops(Shape(1, 2, 20_000, 8))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_decode_repeated_steps_from_one_state_agree(name):
    att = variants.build(name, **SMALL[name])
    q, k, v = random_qkv(1, 4, 61, 8)
    state = att.decode_init(k[:, :, :60], v[:, :, :60])
    args = (q[:, :, 60:], k[:, :, 60:], v[:, :, 60:])
    first, _ = att.decode_step(*args, state)
    again, _ = att.decode_step(*args, state)
    assert torch.equal(first, again) and state.length == 60


@pytest.mark.parametrize("name", ["strided", "fixed", "bigbird", "longformer"])
def test_a_pattern_decode_step_reads_only_its_row_s_keys(name):
    """The step gathers the keys its causal row allows: its FLOPs (counted at dispatch level)
    are the method's own, 4·D per allowed key and query head, at every context length."""
    att = variants.build(name, **SMALL[name])
    for n in (60, 200):
        q, k, v = random_qkv(1, 4, n + 1, 8, dtype=torch.float32)
        k, v = k[:, :2], v[:, :2]  # grouped heads
        state = att.decode_init(k[:, :, :n], v[:, :, :n])
        step = (q[:, :, n:], k[:, :, n:], v[:, :, n:], state)
        with torch.no_grad():
            counted = count_call(lambda s=step: att.decode_step(*s)).flops
        shape = Shape(1, 4, n, 8, kv_heads=2)
        assert att.decode_flops(shape) == att.algorithm_decode_flops(shape) == counted
    assert att.decode_kernel(Shape(1, 4, 200, 8, kv_heads=2), "cpu") == "blocksparse:row-gather"


@pytest.mark.parametrize("name", ["strided", "fixed", "bigbird", "longformer"])
def test_a_decode_row_s_keys_are_the_mask_s_row(name):
    """The keys a step gathers (from the block table's row, or the token mask) are its causal
    row of the pattern's mask, at every position through several blocks and strides."""
    for att in (variants.build(name, **SMALL[name]), variants.build(name)):
        for p in [*range(150), 1000, 4095, 4096]:
            want = att.key_mask(torch.tensor([p]), p + 1, True)[0].nonzero()[:, 0]
            assert torch.equal(att._row_keys(p), want), (att.label, p)


def test_bigbird_causal_rows_do_not_depend_on_the_length():
    """A causal row is the same at every sequence length (decode needs it)."""
    att = variants.build("bigbird", block=4, window_blocks=3, globals=1, random=2)
    short, long = att.block_layout(20, True), att.block_layout(90, True)
    assert torch.equal(long[:20, :20], short)
    assert (att._random(90, True)[5:] >= 0).all()  # enough earlier blocks: all drawn


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_sinks_and_fewer_queries(causal):
    att = variants.build("local", window=40, sinks=4, impl="flex")
    q, _, _ = random_qkv(1, 4, 150, 16, dtype=torch.float32)
    _, k, v = random_qkv(1, 2, 200, 16, dtype=torch.float32)
    assert_matches(att, q, k, v, causal=causal, reference=_reference(att), grads=False)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gpu_path_memory_model_is_an_upper_bound(name, monkeypatch):
    monkeypatch.setenv(FORCE_GPU_PATHS, "1")
    att = variants.build(name)
    q, k, v = random_qkv(1, 4, 4096, 64, dtype=torch.float32, seed=0)
    with torch.no_grad():
        peak = peak_memory(lambda: att(q, k, v))
    predicted = att.memory_bytes(Shape(1, 4, 4096, 64), torch.float32, device="cuda")
    assert peak <= predicted <= 3 * peak, (peak, predicted)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cpu_path_reads_inputs_that_are_views_of_longer_tensors(name):
    """q, k, v the first rows of longer tensors (as a KV cache's prefix): the no-grad path's
    key windows and query views keep the inputs' own strides; float64 under the mask."""
    att = variants.build(name, **SMALL[name])
    q, k, v = (t[:, :, :45] for t in random_qkv(2, 3, 60, 16))
    with torch.no_grad():
        for causal in (False, True):
            assert_matches(att, q, k, v, causal=causal, grads=False)
