"""One sweep point, end to end: build → check support → inputs → measure → one record.

Failures are data: an unsupported point, an out-of-memory, a NaN output or any other exception
becomes a record with a status and a reason; nothing here raises past `run_point` except a
ConfigError for bad input (raised before any work).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import hashlib
import json
import logging
import math
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import variants
from harness.config import RunConfig, default_max_memory, resolve_device
from harness.inputs import attention_entropy, make_inputs
from harness.memory import peak_memory
from harness.records import Record
from harness.timing import measure_latency
from variants.base import Shape, Variant
from variants.reference import attention_reference, max_abs_error, rel_error

log = logging.getLogger("attnbench")

# Backward of attention costs about 2.5× its forward (FlashAttention's convention).
BWD_FLOP_FACTOR = 2.5
NOISY_SPREAD = 0.10


def run_point(run: RunConfig) -> Record:
    """Measure one point and return its record (never raises for a failing point)."""
    device = resolve_device(run.device)
    if run.threads:
        torch.set_num_threads(run.threads)
    att = variants.build(run.variant, **run.params)
    shape = Shape(run.batch, run.heads, run.seq_len, run.head_dim)
    dtype = run.torch_dtype
    base = _base_fields(run, att, shape, device)

    def finish(status: str, reason: str = "", **fields) -> Record:
        return Record(**base, status=status, reason=reason, **fields)

    reasons = att.not_supported_reasons(shape, dtype, device, run.causal, run.mode)
    if reasons:
        return finish("unsupported", "; ".join(reasons))
    predicted = predicted_bytes(att, shape, dtype, run)
    cap = run.max_memory or default_max_memory(device)
    if predicted > cap:
        return finish(
            "skipped",
            f"predicted peak {predicted / 2**30:.2f} GiB > max_memory {cap / 2**30:.2f} GiB",
            predicted_mem_bytes=float(predicted),
        )
    try:
        return _measure(run, att, shape, dtype, device, predicted, finish)
    except Exception as exc:
        if is_oom(exc):
            return finish("oom", _short(exc), predicted_mem_bytes=float(predicted))
        log.error("point %s failed:\n%s", base["label"], traceback.format_exc())
        return finish("error", f"{type(exc).__name__}: {_short(exc)}")
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _measure(run, att: Variant, shape: Shape, dtype, device: str, predicted: int, finish):
    grad = run.mode == "fwd_bwd"
    q, k, v = make_inputs(shape, dtype, device, run.seed, run.inputs, requires_grad=grad)
    call = _make_call(att, q, k, v, run.causal, grad)

    t0 = time.perf_counter()
    out = call()  # first call: compilation, masks, caches; reported as setup, never as latency
    _sync(device)
    setup_s = time.perf_counter() - t0
    bad = _non_finite(out, (q, k, v) if grad else ())
    if bad:
        return finish("invalid", f"non-finite values in {bad}", setup_s=setup_s)

    rel, mab = _error(att, q, k, v, out, run)
    entropy = attention_entropy(q.detach(), k.detach(), rows=min(run.error.rows or 64, 64))
    del out

    t = run.timing
    timing = measure_latency(
        call, device, warmup=t.warmup, min_reps=t.min_reps, min_time_s=t.min_time_s,
        max_reps=t.max_reps, max_time_s=t.max_time_s, flush_l2=t.flush_l2,
        cuda_graph=t.cuda_graph,
    )
    gpu = gpu_state(device)
    peak = peak_memory(call, device)
    flops = att.flops(shape, run.causal) * (1 + BWD_FLOP_FACTOR if grad else 1)
    return finish(
        "ok",
        latency_ms=timing.median_ms,
        latency_p10_ms=timing.p10_ms,
        latency_p90_ms=timing.p90_ms,
        reps=timing.reps,
        noisy=bool(timing.spread > NOISY_SPREAD),
        setup_s=setup_s,
        peak_mem_bytes=float(peak),
        predicted_mem_bytes=float(predicted),
        flops=float(flops),
        tflops=flops / (timing.median_ms * 1e-3) / 1e12,
        rel_error=rel,
        max_abs_error=mab,
        entropy=entropy,
        **gpu,
    )


def _make_call(att: Variant, q, k, v, causal: bool, grad: bool) -> Callable[[], object]:
    if not grad:

        def fwd():
            with torch.no_grad():
                return att(q, k, v, causal=causal)

        return fwd
    g = torch.Generator(device="cpu").manual_seed(1)
    grad_out = torch.randn(q.shape, generator=g).to(q.device, q.dtype)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        out = att(q, k, v, causal=causal)
        out.backward(grad_out)
        return out

    return fwd_bwd


def _error(att: Variant, q, k, v, out, run: RunConfig) -> tuple[float, float]:
    """Error on sampled query rows against float64 attention: the variant's own masked definition
    for exact families, full softmax attention for approximations. Never inside latency."""
    n = q.shape[-2]
    if not run.error.rows:
        return math.nan, math.nan
    g = torch.Generator(device="cpu").manual_seed(run.seed + 7)
    rows = torch.randperm(n, generator=g)[: min(run.error.rows, n)].sort().values.to(q.device)
    mask = att.key_mask(rows, n, run.causal) if att.exact else None
    q, k, v = q.detach(), k.detach(), v.detach()
    got = out.detach()[..., rows, :]
    # Bound the float64 score block to ~256 MB by walking over batch·heads.
    b, h = q.shape[:2]
    qf, kf, vf, gf = (t.reshape(b * h, 1, *t.shape[-2:]) for t in (q, k, v, got))
    step = max(1, (256 << 20) // (len(rows) * n * 8 * 2))
    refs = [
        attention_reference(qf[i : i + step], kf[i : i + step], vf[i : i + step], run.causal,
                            mask, rows)
        for i in range(0, b * h, step)
    ]
    ref = torch.cat(refs)
    return rel_error(gf, ref), max_abs_error(gf, ref)


def predicted_bytes(att: Variant, shape: Shape, dtype: torch.dtype, run: RunConfig) -> int:
    """Predicted peak of one measured call, inputs included (×3 for forward+backward)."""
    el = torch.empty((), dtype=dtype).element_size()
    inputs = 3 * shape.bh * shape.seq_len * shape.head_dim * el
    fwd = att.memory_bytes(shape, dtype, run.causal)
    return int(inputs + (fwd * 3 + 2 * inputs if run.mode == "fwd_bwd" else fwd))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg
    )


def _non_finite(out, inputs) -> str:
    if not torch.isfinite(out).all():
        return "output"
    for name, t in zip("qkv", inputs, strict=False):
        if t.grad is not None and not torch.isfinite(t.grad).all():
            return f"grad {name}"
    return ""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(exc: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def point_id(run: RunConfig) -> str:
    """A stable id of what a point measures: a hash of the validated config, seed included, with
    the variant's parameters completed by their defaults (``variant=local`` and
    ``variant=local variant.window=256`` are one point), less what does not change what is
    measured (timing, error, max_memory, resume, threads). It names the point's folder."""
    skip = ("timing", "error", "max_memory", "resume", "threads")
    d = {k: v for k, v in run.__dict__.items() if k not in skip}
    with contextlib.suppress(Exception):  # a point that fails to build: params as written
        d["params"] = variants.build(run.variant, **run.params).params()
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _base_fields(run: RunConfig, att: Variant, shape: Shape, device: str) -> dict:
    return dict(
        variant=run.variant,
        label=att.label,
        family=att.family,
        params=json.dumps(att.params(), sort_keys=True),
        batch=shape.batch,
        heads=shape.heads,
        seq_len=shape.seq_len,
        head_dim=shape.head_dim,
        dtype=run.dtype,
        device=device,
        causal=run.causal,
        mode=run.mode,
        inputs=run.inputs,
        seed=run.seed,
        density=_nan_if_none(att.density(shape.seq_len, run.causal)),
        time_exponent=float(att.time_exponent),
        memory_exponent=float(att.memory_exponent),
        threads=torch.get_num_threads(),
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        point_id=point_id(run),
        **machine_info(device),
    )


def gpu_state(device: str) -> dict[str, float]:
    """SM clock (MHz) and temperature (°C) through NVML, right after timing; empty elsewhere."""
    if device != "cuda":
        return {}
    try:
        return {
            "gpu_clock_mhz": float(torch.cuda.clock_rate()),
            "gpu_temp_c": float(torch.cuda.temperature()),
        }
    except Exception:  # no pynvml / NVML: the fields stay NaN
        return {}


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


@functools.cache
def machine_info(device: str) -> dict[str, str]:
    """Device name and the versions that matter, recorded with every point."""
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        name = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    else:
        name = _cpu_name()
    xf = ""
    with contextlib.suppress(Exception):
        import importlib.metadata

        xf = importlib.metadata.version("xformers")
    return dict(
        device_name=name,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "",
        driver_version=_driver_version() if device == "cuda" else "",
        xformers_version=xf,
        git_sha=git_sha(),
        hostname=platform.node(),
    )


def _driver_version() -> str:
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    return ""


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


@functools.cache
def git_sha() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
