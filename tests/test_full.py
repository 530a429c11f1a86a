"""`full` against float64 attention on fresh random inputs, and the memory truth of backends."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.config import RunConfig
from attnbench.harness.run.inputs import make_inputs
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.harness.run.point import decide
from attnbench.variants.base import Shape
from attnbench.variants.full.backends import _pinned_sdpa_reasons
from attnbench.variants.testing import assert_matches, random_qkv

CPU_BACKENDS = ["naive", "sdpa"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_matches_float64(backend, causal, dtype):
    att = variants.build("full", backend=backend)
    q, k, v = random_qkv(2, 3, 67, 32, dtype=dtype)
    assert_matches(att, q, k, v, causal)


@pytest.mark.parametrize("pin", ["math", "flash"])
def test_pinned_sdpa_backend_matches(pin):
    att = variants.build("full", backend="sdpa", sdpa_backend=pin)
    assert att.label == f"full[sdpa:{pin}]"
    assert_matches(att, *random_qkv(1, 2, 45, 16, dtype=torch.float32), causal=True)


@pytest.mark.slow
def test_flex_forward_matches_float64():
    att = variants.build("full", backend="flex")
    q, k, v = random_qkv(1, 2, 128, 16, dtype=torch.float32)
    for causal in (False, True):
        assert_matches(att, q, k, v, causal, grads=False)


def test_xformers_unsupported_on_cpu_with_reason():
    att = variants.build("full", backend="xformers")
    reasons = att.not_supported_reasons(Shape(1, 2, 64, 64), torch.float32, "cpu", False)
    assert len(reasons) == 1
    assert "xformers" in reasons[0] and ("CPU" in reasons[0] or "not importable" in reasons[0])


def test_bad_backend_names_field():
    with pytest.raises(ValueError, match="backend='nope'"):
        variants.build("full", backend="nope")


def test_flops_and_declared_complexity():
    s = Shape(2, 4, 1024, 64)
    sdpa, naive = variants.build("full"), variants.build("full", backend="naive")
    assert sdpa.flops(s) == 4 * 2 * 4 * 1024 * 1024 * 64
    assert naive.flops(s, causal=True) == naive.flops(s)  # naive computes then masks
    assert naive.complexity == {"time": "O(n^2)", "memory": "O(n^2)"}
    assert sdpa.complexity == {"time": "O(n^2)", "memory": "O(n)"}


def test_memory_truth_naive_vs_sdpa():
    """At n=2048 (B=1, H=4, D=64, fp32) naive holds the n² scores; sdpa stays under a quarter."""
    b, h, n, d = 1, 4, 2048, 64
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    scores = b * h * n * n * 4
    naive = peak_memory(lambda: variants.build("full", backend="naive")(q, k, v))
    sdpa = peak_memory(lambda: variants.build("full", backend="sdpa")(q, k, v))
    assert naive >= scores
    assert sdpa < scores / 4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_math_model_counts_the_scores_it_materialises(causal):
    """sdpa pinned to math runs the composite path (no fused kernel: the dispatch shows none),
    which stores the scores and probabilities: its model and declared exponent say so. It once
    predicted the tiled kernels' O(n) (66–72 MiB) and measured 18.5 / 73 / 290 MiB at
    n = 1K / 2K / 4K (B1 H4)."""
    att = variants.build("full", sdpa_backend="math")
    assert att.memory_exponent == 2.0 and variants.build("full").memory_exponent == 1.0
    n = 4096
    run = RunConfig(variant="full", params=att.params(), heads=2, seq_len=n, causal=causal,
                    device="cpu")
    q, k, v = make_inputs(run.shape, torch.float32, "cpu")
    assert count_call(lambda: att(q, k, v, causal=causal)).sdpa == []  # no fused kernel
    peak = peak_memory(lambda: att(q, k, v, causal=causal))
    predicted = decide(att, run).predicted
    assert 2 * 2 * n * n * 4 <= peak <= 1.5 * predicted, (peak, predicted)


def test_causal_flops_count_the_triangle_unless_the_kernel_materialises():
    """Fused kernels: the causal triangle (FlashAttention's convention); naive and sdpa math
    compute every score and mask."""
    full = 4 * 2 * 4 * 1024 * 1024 * 64
    s = Shape(2, 4, 1024, 64)
    tri = full * (1024 + 1) / (2 * 1024)
    assert variants.build("full").flops(s, causal=True) == pytest.approx(tri)
    assert variants.build("full", backend="flex").flops(s, causal=True) == pytest.approx(tri)
    assert variants.build("full", sdpa_backend="math").flops(s, causal=True) == full
    assert variants.build("full", backend="naive").flops(s, causal=True) == full
    assert variants.build("full").density(1024, causal=True) == pytest.approx(1025 / 2048)


@pytest.mark.parametrize("backend,pin,factor", [
    ("sdpa", "auto", 2.5), ("sdpa", "flash", 2.5), ("sdpa", "math", 2.0), ("naive", "auto", 2.0),
    ("flex", "auto", 2.5), ("xformers", "auto", 2.5),
])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_flops_recompute_or_not(backend, pin, factor, causal):
    att = variants.build("full", backend=backend, sdpa_backend=pin)
    s = Shape(1, 2, 2048, 64)
    assert att.backward_flops(s, causal) == factor * att.flops(s, causal)


def test_kernel_strings():
    s = Shape(1, 2, 128, 16)
    want = {("naive", "auto"): "naive", ("sdpa", "auto"): "sdpa", ("sdpa", "math"): "sdpa:math",
            ("xformers", "auto"): "xformers", ("flex", "auto"): "flex:compiled"}
    for (backend, pin), kernel in want.items():
        att = variants.build("full", backend=backend, sdpa_backend=pin)
        assert att.kernel(s, "cpu", False, False) == kernel


def test_pinned_sdpa_reasons_fall_back_to_the_hand_rule(monkeypatch):
    monkeypatch.delattr(torch.backends.cuda, "can_use_flash_attention")
    shape = Shape(1, 2, 64, 12)
    reasons = _pinned_sdpa_reasons("flash", shape, torch.float32, "cpu", False, "fwd")
    assert any("float16/bfloat16" in r for r in reasons)
    assert any("multiple of 8" in r for r in reasons)


@pytest.mark.cuda_only
@pytest.mark.parametrize("pin", ["flash", "efficient", "cudnn"])
def test_pinned_sdpa_reasons_come_from_torch(pin):
    """head_dim 513 is beyond every fused CUDA kernel: torch's check says so, with its words;
    a point it accepts runs pinned."""
    att = variants.build("full", sdpa_backend=pin)
    bad = att.not_supported_reasons(Shape(1, 2, 256, 513), torch.float16, "cuda", False)
    assert bad and all(r.startswith(f"sdpa_backend={pin}: ") and len(r) > 30 for r in bad)
    shape = Shape(1, 2, 256, 64)
    if not att.not_supported_reasons(shape, torch.float16, "cuda", False):
        q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16)
        att(q, q, q)
