"""The CUDA paths, run wherever a GPU is present (skipped without one): CUDA-event timing, CUDA
peak memory, the CUDA-graph fallback, pinned SDPA backends, xformers, flex with its backward,
the GPU paths of every variant against their CPU results, and a process per point."""

from __future__ import annotations

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.job import run_point
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.timing import measure_latency

pytestmark = pytest.mark.cuda_only
TINY = {"batch": 1, "heads": 4, "head_dim": 64, "seq_len": 1024, "device": "cuda",
        "dtype": "bfloat16", "timing": {"min_reps": 5, "min_time_s": 0, "warmup": 2}}


def point(name: str, params: dict | None = None, **kw):
    return run_point(from_dictconfig({**TINY, **kw, "variant": {"name": name, **(params or {})}}))


def test_cuda_timer_times_the_kernel_not_the_launch():
    x = torch.randn(4096, 4096, device="cuda")
    t = measure_latency(lambda: x @ x, "cuda", min_reps=5, min_time_s=0)
    flops = 2 * 4096**3
    assert t.median_ms > 0 and flops / (t.median_ms * 1e-3) < 2e15  # not launch time
    assert t.p10_ms <= t.median_ms <= t.p90_ms


def test_cuda_peak_memory_counts_what_the_call_allocates():
    n = 64 << 20
    assert peak_memory(lambda: torch.empty(n, dtype=torch.uint8, device="cuda"), "cuda") >= n


def test_cuda_graph_capture_that_fails_falls_back_with_the_reason():
    x = torch.randn(1024, device="cuda")

    def syncs():  # .item() cannot be captured
        return (x * 2).sum().item()

    t = measure_latency(syncs, "cuda", min_reps=3, min_time_s=0, cuda_graph=True)
    assert "cuda_graph capture failed" in t.note and t.reps >= 3
    stream = torch.cuda.current_stream()
    assert stream == torch.cuda.default_stream()  # the current stream is restored


@pytest.mark.parametrize("pin", ["flash", "efficient", "cudnn", "math"])
def test_pinned_sdpa_runs_or_says_torchs_reason(pin):
    rec = point("full", {"backend": "sdpa", "sdpa_backend": pin})
    assert rec.status in ("ok", "unsupported"), rec.reason
    if rec.status == "ok":
        assert rec.kernel.startswith("sdpa:") and rec.host_syncs == 0


def test_xformers_runs_or_is_unsupported_with_the_reason():
    rec = point("full", {"backend": "xformers"})
    assert rec.status in ("ok", "unsupported"), rec.reason
    if rec.status == "ok":
        assert rec.kernel.startswith("xformers") and rec.impl_error < 2e-2


def test_flex_on_cuda_runs_compiled_with_its_backward():
    rec = point("full", {"backend": "flex"}, mode="fwd_bwd", causal=True)
    assert rec.status == "ok", rec.reason
    assert rec.kernel == "flex:compiled"


def test_isolated_point_on_cuda():
    rec = point("full")
    assert rec.status == "ok" and rec.kernel.startswith("sdpa:")


@pytest.mark.parametrize("name", sorted(
    n for n in variants.names() if variants.get(n).__module__.startswith("attnbench.variants.")))
def test_every_variant_on_cuda_matches_its_cpu_result(name):
    att = variants.build(name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64, generator=g) for _ in range(3))
    causal = bool(att.no_noncausal)
    from attnbench.variants.base import Shape

    if att.not_supported_reasons(Shape(1, 4, 1024, 64), torch.float32, "cuda", causal):
        pytest.skip("not on CUDA")
    with torch.no_grad():
        cpu = att(q, k, v, causal=causal)
        gpu = att(q.cuda(), k.cuda(), v.cuda(), causal=causal).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-3, atol=2e-4)
