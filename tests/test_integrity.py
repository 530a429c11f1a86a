"""What a point records is right or flagged: gradients in the fwd_bwd peak, every timed output
checked, the kernel that ran, failures anywhere in a point as rows, contention of the machine."""

from __future__ import annotations

import math
import mmap
import multiprocessing
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from attnbench import variants
from attnbench.harness.run.config import from_dictconfig
from attnbench.harness.run.contention import CONTENDED_SHARE, Contention, CpuSnapshot, contention
from attnbench.harness.run.job import run_point
from attnbench.harness.run.timing import measure_latency
from attnbench.variants import registry
from attnbench.variants.base import Variant
from attnbench.variants.full.full import naive_attention

TINY = {"batch": 1, "heads": 2, "head_dim": 16, "seq_len": 64,
        "timing": {"min_reps": 3, "min_time_s": 0, "warmup": 1}}


def point(name: str, params: dict | None = None, **kw):
    cfg = {**TINY, **kw, "variant": {"name": name, **(params or {})}}
    return from_dictconfig(cfg)


@dataclass
class LaterNaN(Variant):
    """Exact attention whose output turns NaN from call `bad_from` on (the first call is fine)."""

    name: ClassVar[str] = "test_later_nan"
    bad_from: int = 3

    def __post_init__(self) -> None:
        self._calls = 0

    def flops(self, shape, causal=False):
        return 4.0 * shape.bh * shape.seq_len**2 * shape.head_dim

    def forward(self, q, k, v, causal=False):
        self._calls += 1
        out = naive_attention(q, k, v, causal)
        return out * float("nan") if self._calls >= self.bad_from else out


@dataclass
class Raises(Variant):
    """Fails in whichever step `where` names, outside the measured call."""

    name: ClassVar[str] = "test_raises"
    where: str = "memory"  # memory | reasons | density | kernel | backward_flops

    def flops(self, shape, causal=False):
        return 1.0

    def forward(self, q, k, v, causal=False):
        return naive_attention(q, k, v, causal)

    def _maybe(self, step: str):
        if self.where == step:
            raise RuntimeError(f"plugin bug in {step}")

    def memory_bytes(self, shape, dtype, causal=False):
        self._maybe("memory")
        return 0

    def not_supported_reasons(self, *args, **kwargs):
        self._maybe("reasons")
        return []

    def density(self, n, causal=False):
        self._maybe("density")
        return 1.0

    def kernel(self, *args):
        self._maybe("kernel")
        return "test"

    def backward_flops(self, shape, causal=False):
        self._maybe("backward_flops")
        return 2.0


@pytest.fixture(autouse=True, scope="module")
def _test_variants():
    """Register this file's test-only variants for its tests alone."""
    for cls in (LaterNaN, Raises):
        variants.register(cls)
    yield
    for cls in (LaterNaN, Raises):
        registry._REGISTRY.pop(cls.name, None)


def builtins() -> list[str]:
    return [n for n in variants.names()
            if variants.get(n).__module__.startswith("attnbench.variants.")]


def test_fwd_bwd_peak_includes_the_gradients_it_creates():
    # n small, head_dim large: the gradients of q, k, v dwarf the n×n intermediates
    rec = run_point(point("full", seq_len=64, head_dim=256, mode="fwd_bwd"))
    assert rec.status == "ok", rec.reason
    tensor = rec.batch * rec.heads * rec.seq_len * rec.head_dim * 4
    assert rec.peak_mem_bytes >= 4 * tensor  # output + dq, dk, dv, all alive at the end


def test_a_timed_call_that_turns_non_finite_makes_the_point_invalid():
    rec = run_point(point("test_later_nan", {"bad_from": 4}))
    assert rec.status == "invalid", (rec.status, rec.reason)
    assert "timed call" in rec.reason
    first = run_point(point("test_later_nan", {"bad_from": 1}))
    assert first.status == "invalid" and "first call" in first.reason


@pytest.mark.parametrize("where", ["memory", "reasons", "density", "kernel", "backward_flops"])
def test_a_plugin_failing_outside_the_call_is_an_error_row(where):
    rec = run_point(point("test_raises", {"where": where}, mode="fwd_bwd"))
    assert rec.status == "error"
    assert f"plugin bug in {where}" in rec.reason


def test_a_variant_that_cannot_be_built_is_an_error_row():
    run = point("full")
    bad = type(run)(**{**run.__dict__, "params": {"backend": "nope"}})
    rec = run_point(bad)
    assert rec.status == "error" and "backend" in rec.reason and rec.label == "full"


@pytest.mark.parametrize(("params", "kernel"), [
    ({"backend": "sdpa"}, "sdpa:flash_cpu"),
    ({"backend": "sdpa", "sdpa_backend": "math"}, "sdpa:math"),
    ({"backend": "naive"}, "naive"),
])
def test_the_record_names_the_kernel_that_ran(params, kernel):
    rec = run_point(point("full", params))
    assert rec.status == "ok", rec.reason
    assert rec.kernel == kernel
    assert rec.ops_per_call > 0 and rec.host_syncs == 0 and rec.compute_dtype == "float32"


def test_every_built_in_names_its_kernel_and_counts_its_ops():
    for name in builtins():
        rec = run_point(point(name, seq_len=256))
        if rec.status != "ok":
            assert rec.status == "unsupported", (name, rec.reason)
            continue
        assert rec.kernel, name
        if "flex" not in rec.kernel:
            assert rec.ops_per_call > 0, name


def test_contention_arithmetic():
    before = CpuSnapshot(wall=0.0, own=0.0, busy=100.0, cpus=2)
    # 1 s of wall on 2 CPUs: this process used 1.9 CPU-s, the machine 2.0 busy: quiet
    quiet = contention(before, CpuSnapshot(1.0, 1.9, 102.0, 2), threads=2)
    assert quiet.others_cpu == pytest.approx(0.05) and not quiet.contended
    assert quiet.own_cpu == pytest.approx(0.95)
    # others took one CPU (steal included in busy): half the machine
    busy = contention(before, CpuSnapshot(1.0, 1.0, 102.0, 2), threads=2)
    assert busy.others_cpu == pytest.approx(0.5) and busy.contended
    assert not Contention(math.nan, 0.5).contended
    assert 0 < CONTENDED_SHARE < 0.5


def test_page_faults_per_call_tell_fresh_temporaries_from_kept_buffers():
    """Timing counts the pages each timed call faulted in: a fresh anonymous 64 MiB mapping per
    call reads its pages (~16K of 4 KiB), a kept buffer ~0; a point's record carries the count.
    The mapping is made directly, not by torch.empty: whether malloc maps a block afresh depends
    on the process's allocator state (a heap kept by `keep_freed_memory` may serve it)."""
    resource = pytest.importorskip("resource")
    kept = torch.empty(1 << 24)

    def touch_fresh_pages() -> None:
        with mmap.mmap(-1, 64 << 20) as m:
            t = torch.frombuffer(m, dtype=torch.float32)
            t.fill_(1.0)
            del t  # its export of the mapping ends before the mapping closes

    fresh = measure_latency(touch_fresh_pages, min_reps=3, min_time_s=0)
    reused = measure_latency(lambda: kept.fill_(1.0), min_reps=3, min_time_s=0)
    assert fresh.faults_per_call > 0.9 * (64 << 20) / resource.getpagesize()
    assert reused.faults_per_call < 16
    rec = run_point(point("linear", seq_len=256, timing={"min_reps": 3, "min_time_s": 0,
                                                         "warmup": 1}))
    assert rec.status == "ok" and 0 <= rec.page_faults < 1e6



# three 10 MiB temporaries per call, freed at its end. The control sets glibc's initial
# thresholds (128 KiB, fixed): each temporary is mapped afresh and its pages faulted at every call.
# Left to itself glibc raises its thresholds after a large free, so whether a given process faults
# depends on what it freed before (20-30 MiB per call in one fresh process here, 0 in another).
_TEMPORARIES = """
import resource, sys, torch
from attnbench.harness.run import allocator
if sys.argv[1] == "keep":
    print(allocator.keep_freed_memory(), file=sys.stderr)
else:
    assert allocator.mallopt(allocator.M_MMAP_THRESHOLD, 128 << 10)
    assert allocator.mallopt(allocator.M_TRIM_THRESHOLD, 128 << 10)
from attnbench.harness.run.timing import measure_latency
def call():
    xs = [torch.empty(10 << 18).fill_(1.0) for _ in range(3)]
    return sum(float(x[0]) for x in xs)
t = measure_latency(call, warmup=3, min_reps=10, min_time_s=0)
print(t.faults_per_call * resource.getpagesize() / 2**20)
"""


def test_kept_freed_memory_spares_each_call_its_temporaries_pages():
    """Under glibc's initial thresholds a call with 30 MiB of temporaries faults them in again at
    every call (the control); with `keep_freed_memory` (every CPU point, every benchmark) the
    pages stay with the process: ~0 MiB per call. Each in a fresh process, as the allocator's
    state is the process's. A record of a CPU point names the allocator."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")

    def mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _TEMPORARIES, mode], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.split()[-1])

    assert mib("initial") > 25  # the control: 30 MiB per call
    assert mib("keep") < 1
    rec = run_point(point("linear", seq_len=256, timing={"min_reps": 3, "min_time_s": 0,
                                                         "warmup": 1}))
    assert rec.status == "ok" and rec.allocator.startswith("glibc (freed memory kept")


def _hog(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def test_points_measured_beside_cpu_hogs_are_flagged_contended():
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        time.sleep(0.5)
        recs = [run_point(point("linear", seq_len=n, timing={"min_reps": 3, "min_time_s": 0.3,
                                                             "warmup": 1}))
                for n in (256, 512, 1024, 2048)]
    finally:
        stop.set()
        for h in hogs:
            h.join(5)
    assert all(r.status == "ok" for r in recs)
    flagged = [r for r in recs if r.contended]
    assert len(flagged) >= 3, [(r.seq_len, r.others_cpu) for r in recs]
    assert all(r.others_cpu > CONTENDED_SHARE for r in flagged)


def test_isolated_points_run_in_their_own_process_and_a_dying_one_is_a_row():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import fault_variants  # noqa: F401  (registers `faulty`, here and in the child)

    here = run_point(point("full"))
    there = run_point(point("full", isolate=True))
    assert there.status == "ok" and there.kernel == here.kernel
    assert there.impl_error < 1e-5 and there.softmax_rel_error < 1e-5
    dead = run_point(point("faulty", {"how": "exit", "fail_at": 64}, isolate=True))
    assert dead.status == "error" and "exit code 3" in dead.reason


def test_decode_prediction_is_the_cache_not_a_forward():
    """A KV cache at n = 64K is tens of MB; the naive forward's n² scores would be 137 GB and
    skip the point for nothing."""
    from attnbench.harness.run.point import predicted_bytes

    run = point("full", {"backend": "naive"}, mode="decode", seq_len=65536, heads=8, head_dim=64)
    att = variants.build("full", backend="naive")
    assert predicted_bytes(att, run.shape, run.torch_dtype, run) < 1 << 30
