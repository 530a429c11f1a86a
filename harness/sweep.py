"""One sweep point, end to end: build → check support → inputs → measure → one record.

Failures are data: an unsupported point, an out-of-memory, a NaN output or any other exception
becomes a record with a status and a reason; nothing here raises past `run_point` except a
ConfigError for bad input (raised before any work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import importlib
import inspect
import json
import logging
import math
import multiprocessing
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import variants
from harness.config import RunConfig, default_max_memory, resolve_device
from harness.dispatch import count_call
from harness.inputs import attention_entropy, make_inputs
from harness.memory import peak_memory
from harness.records import Record
from harness.timing import Timing, measure_latency
from variants.base import Shape, Variant
from variants.reference import attention_reference, max_abs_error, rel_error

log = logging.getLogger("attnbench")

NOISY_SPREAD = 0.10


def run_point(run: RunConfig) -> Record:
    """Measure one point and return its record (never raises for a failing point).

    With `isolate` (default `auto`: on CUDA) the point runs in a fresh process of its own, so a
    sticky CUDA error, a compile cache or a variant's cached projections cannot leak into the
    next point; a process that dies is an `error` row with its exit code."""
    if isolated(run):
        return _run_in_subprocess(run)
    return _run_point_here(run)


def isolated(run: RunConfig) -> bool:
    if run.isolate == "auto":
        return resolve_device(run.device) == "cuda"
    return run.isolate is True


def _run_in_subprocess(run: RunConfig) -> Record:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    module = ""
    with contextlib.suppress(KeyError):
        module = variants.get(run.variant).__module__  # a plugin's module, for the child
    proc = ctx.Process(target=_child, args=(run, module, send), daemon=True)
    proc.start()
    send.close()
    record = None
    with contextlib.suppress(EOFError):
        record = recv.recv()  # EOF: the child died without answering
    proc.join()
    if isinstance(record, Record):
        return record
    return Record(**_run_fields(run), status="error",
                  reason=f"the point's process died (exit code {proc.exitcode}) before it "
                         f"returned a record; see the log")


def _child(run: RunConfig, module: str, send) -> None:
    if module:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    send.send(_run_point_here(replace(run, isolate=False)))
    send.close()


def _run_point_here(run: RunConfig) -> Record:
    """Everything the point does — building the variant, its support check and models, setting
    threads, reading the device — runs inside one guard: a failure anywhere is a row."""
    base = _run_fields(run)
    if run.mode == "decode":  # one token after its context: causal by nature
        run = replace(run, causal=True)
        base["causal"] = True

    def finish(status: str, reason: str = "", **fields) -> Record:
        return Record(**base, status=status, reason=reason, **fields)

    device = "cpu"
    try:
        device = resolve_device(run.device)
        if run.threads:
            torch.set_num_threads(run.threads)
        base.update(threads=torch.get_num_threads(), **machine_info(device))
        att = variants.build(run.variant, **run.params)
        shape = run.shape
        dtype = run.torch_dtype
        base.update(_variant_fields(run, att, shape))
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
        base["density"] = _nan_if_none(att.density(shape.seq_len, run.causal))
        measure = _measure_decode if run.mode == "decode" else _measure
        return measure(run, att, shape, dtype, device, predicted, finish)
    except Exception as exc:
        if is_oom(exc):
            return finish("oom", _short(exc))
        log.error("point %s failed:\n%s", base["label"], traceback.format_exc())
        return finish("error", f"{type(exc).__name__}: {_short(exc)}")
    finally:
        gc.collect()
        if device == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def _measure(run, att: Variant, shape: Shape, dtype, device: str, predicted: int, finish):
    grad = run.mode == "fwd_bwd"
    q, k, v = make_inputs(shape, dtype, device, run.seed, run.inputs, requires_grad=grad)
    call = _make_call(att, q, k, v, run.causal, grad)
    inputs = (q, k, v) if grad else ()

    t0 = time.perf_counter()
    out = call()  # first call: compilation, masks, caches; reported as setup, never as latency
    _sync(device)
    setup_s = time.perf_counter() - t0
    bad = _non_finite(out, inputs)
    if bad:
        return finish("invalid", f"non-finite values in {bad} (first call)", setup_s=setup_s)

    rel, mab, error_ref = _error(att, q, k, v, out, run)
    softmax_rel = _softmax_error(att, q, k, v, out, run, error_ref)
    entropy = attention_entropy(q.detach(), k.detach(), rows=min(run.error.rows or 64, 64))
    del out
    kernel = att.kernel(shape, device, run.causal, grad)
    counted = _dispatch_fields(call, kernel)

    timing, fields = _time(call, run, device)
    bad = _non_finite(fields.pop("last"), inputs)
    if bad:
        return finish("invalid", f"non-finite values in {bad} (a timed call)", setup_s=setup_s)
    for x in inputs:  # the measured call's own gradients count in its peak
        x.grad = None
    peak = peak_memory(call, device)
    flops = on_device(att.flops, device)(shape, run.causal)
    if grad:
        flops += on_device(att.backward_flops, device)(shape, run.causal)
    return finish(
        "ok",
        setup_s=setup_s,
        peak_mem_bytes=float(peak),
        predicted_mem_bytes=float(predicted),
        flops=float(flops),
        tflops=flops / (timing.median_ms * 1e-3) / 1e12,
        rel_error=rel,
        max_abs_error=mab,
        error_ref=error_ref,
        softmax_rel_error=softmax_rel,
        entropy=entropy,
        **counted,
        **fields,
    )


def _measure_decode(run, att: Variant, shape: Shape, dtype, device: str, predicted: int,
                    finish):
    """mode=decode: the cache or state of a context of seq_len tokens is built once (setup);
    each timed call is one `decode_step` of the next token against that same state, so every
    repeat does the same work. Latency is per token; `state_bytes` what the state holds."""
    n = shape.seq_len
    full = dataclasses.replace(shape, seq_len=n + 1, q_len=0)
    q, k, v = make_inputs(full, dtype, device, run.seed, run.inputs)
    q1, k1, v1 = q[:, :, n:], k[:, :, n:], v[:, :, n:]  # the new token
    t0 = time.perf_counter()
    with torch.no_grad():
        state = att.decode_init(k[:, :, :n], v[:, :, :n], heads=shape.heads)
        _sync(device)
        setup_s = time.perf_counter() - t0

        def step():
            return att.decode_step(q1, k1, v1, state)[0]

        out = step()
        _sync(device)
    state_bytes = float(tensor_bytes(state))
    if _non_finite(out, ()):
        return finish("invalid", "non-finite values in output (first step)", setup_s=setup_s,
                      state_bytes=state_bytes)
    full_out = torch.zeros_like(q)
    full_out[:, :, n:] = out
    last_row = torch.tensor([n], device=q.device)  # the new token's row of the whole sequence
    rel, mab, error_ref = _error(att, q, k, v, full_out, run, last_row)
    softmax_rel = _softmax_error(att, q, k, v, full_out, run, error_ref, last_row)
    kernel = att.kernel(shape, device, True, False)

    def call():
        with torch.no_grad():
            return step()

    counted = _dispatch_fields(call, kernel)
    timing, fields = _time(call, run, device)
    if _non_finite(fields.pop("last"), ()):
        return finish("invalid", "non-finite values in output (a timed step)", setup_s=setup_s)
    peak = peak_memory(call, device)
    flops = att.decode_flops(shape)
    return finish(
        "ok",
        setup_s=setup_s,
        peak_mem_bytes=float(peak),
        predicted_mem_bytes=float(predicted),
        state_bytes=state_bytes,
        flops=flops,
        tflops=flops / (timing.median_ms * 1e-3) / 1e12,
        rel_error=rel,
        max_abs_error=mab,
        error_ref=error_ref,
        softmax_rel_error=softmax_rel,
        **counted,
        **fields,
    )


def _time(call: Callable[[], object], run: RunConfig, device: str) -> tuple[Timing, dict]:
    """Time `call` with the run's knobs, keeping the last timed output (under "last", for the
    caller's finiteness check); returns the timing and the record fields it gives: latency
    and spread, noisy, the machine's contention, GPU clock and temperature, notes."""
    last: list = [None]

    def timed() -> None:
        last[0] = call()

    t = run.timing
    timing = measure_latency(
        timed, device, warmup=t.warmup, min_reps=t.min_reps, min_time_s=t.min_time_s,
        max_reps=t.max_reps, max_time_s=t.max_time_s, flush_l2=t.flush_l2,
        cuda_graph=t.cuda_graph,
    )
    gpu = gpu_state(device)
    notes = "; ".join(x for x in (timing.note, gpu.pop("notes", "")) if x)
    return timing, dict(
        last=last[0],
        latency_ms=timing.median_ms,
        latency_p10_ms=timing.p10_ms,
        latency_p90_ms=timing.p90_ms,
        reps=timing.reps,
        noisy=bool(timing.spread > NOISY_SPREAD),
        contended=timing.load.contended,
        others_cpu=timing.load.others_cpu,
        own_cpu=timing.load.own_cpu,
        notes=notes,
        **gpu,
    )


def tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from `obj` (tuples, lists, dicts,
    dataclasses, objects' attributes): what a decode state holds."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return x.untyped_storage().nbytes()
        if isinstance(x, dict):
            return sum(walk(y) for y in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(y) for y in x)
        if dataclasses.is_dataclass(x) or hasattr(x, "__dict__"):
            return sum(walk(y) for y in vars(x).values())
        return 0

    return walk(obj)


def _dispatch_fields(call: Callable[[], object], kernel: str) -> dict:
    """One call under the dispatch counter, outside timing: ops, host syncs, the SDPA backend
    torch chose, the matmuls' dtype. Compiled (flex) kernels are not counted: a dispatch mode
    around compiled code makes dynamo run the op eagerly, which is not the kernel measured."""
    if kernel.startswith("flex"):
        return {"kernel": kernel}
    c = count_call(call)
    sdpa = "+".join(sorted(set(c.sdpa)))
    if kernel.startswith("sdpa"):  # what torch ran, whatever was asked for ("math": composite)
        kernel = f"sdpa:{sdpa or 'math'}"
    elif sdpa:  # an engine that runs torch's fused kernel inside
        kernel += f"+sdpa:{sdpa}"
    return dict(kernel=kernel, compute_dtype=c.compute_dtype, ops_per_call=float(c.ops),
                host_syncs=float(c.host_syncs))


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


def _error(att: Variant, q, k, v, out, run: RunConfig, rows: torch.Tensor | None = None,
           softmax: bool = False) -> tuple[float, float, str]:
    """Error on sampled query rows against float64 attention, never inside latency: the
    variant's own definition where it replaces softmax (`Variant.reference`), its masked
    definition for exact families, full softmax attention for approximations. Returns
    (rel_error, max_abs_error, what it is against). `rows`: the query rows (default: a seeded
    sample of `error.rows`)."""
    if not run.error.rows:
        return math.nan, math.nan, ""
    nq, nk = q.shape[-2], k.shape[-2]
    if rows is None:
        g = torch.Generator(device="cpu").manual_seed(run.seed + 7)
        rows = torch.randperm(nq, generator=g)[: min(run.error.rows, nq)].sort().values
        rows = rows.to(q.device)
    q, k, v = q.detach(), k.detach(), v.detach()
    got = out.detach()[..., rows, :]
    own = None if softmax else att.reference(q, k, v, run.causal)
    if own is not None:
        ref = own[..., rows, :]
        return rel_error(got, ref), max_abs_error(got, ref), "own definition"
    mask = att.key_mask(rows + (nk - nq), nk, run.causal) if att.exact and not softmax else None
    # Bound the float64 score block to ~256 MB by walking over batch and k/v heads.
    b, h, hkv = q.shape[0], q.shape[1], k.shape[1]
    grp = h // hkv
    qf, gf = (t.reshape(b * hkv, grp, *t.shape[-2:]) for t in (q, got))  # heads of one group
    kf, vf = (t.reshape(b * hkv, 1, *t.shape[-2:]) for t in (k, v))
    step = max(1, (256 << 20) // (grp * len(rows) * nk * 8 * 2))
    refs = [
        attention_reference(qf[i : i + step], kf[i : i + step], vf[i : i + step], run.causal,
                            mask, rows)
        for i in range(0, b * hkv, step)
    ]
    ref = torch.cat(refs)
    what = "masked softmax" if att.exact else "softmax"
    return rel_error(gf, ref), max_abs_error(gf, ref), what


def _softmax_error(att: Variant, q, k, v, out, run: RunConfig, error_ref: str,
                   rows: torch.Tensor | None = None) -> float:
    """For variants measured against their own definition that approximate softmax (MoBA's
    and NSA's selections), also the error against full softmax; the recurrent family replaces
    softmax, where that number would mean nothing (NaN)."""
    if error_ref != "own definition" or att.family == "recurrent":
        return math.nan
    return _error(att, q, k, v, out, run, rows, softmax=True)[0]


def predicted_bytes(att: Variant, shape: Shape, dtype: torch.dtype, run: RunConfig) -> int:
    """Predicted peak of one measured call, inputs included (×3 for forward+backward)."""
    el = torch.empty((), dtype=dtype).element_size()
    b, d = shape.batch, shape.head_dim
    inputs = (shape.heads * shape.nq + 2 * shape.hkv * shape.seq_len) * b * d * el
    device = resolve_device(run.device)
    if run.mode == "decode":  # the state of the context and one step
        return int(inputs + att.decode_memory_bytes(shape, dtype))
    fwd = on_device(att.memory_bytes, device)(shape, dtype, run.causal)
    return int(inputs + (fwd * 3 + 2 * inputs if run.mode == "fwd_bwd" else fwd))


# Allocation failures that surface as plain RuntimeErrors: the CPU allocator, and cuBLAS /
# cuDNN / cuFFT / cuSOLVER failing to get workspace (their status codes, not torch's OOM type).
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator",
                "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUFFT_ALLOC_FAILED",
                "CUSOLVER_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


def on_device(model: Callable, device: str) -> Callable:
    """A variant's model (`flops`, `backward_flops`, `memory_bytes`) for `device`: models whose
    GPU path differs (padded block buckets) take an optional `device`; the base contract's
    models do not, and are called as they are."""
    if "device" in inspect.signature(model).parameters:
        return functools.partial(model, device=device)
    return model


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and any(m in msg for m in OOM_MESSAGES)


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
    measured (timing, error, max_memory, resume, threads, isolate, the model preset's name).
    It names the point's folder."""
    skip = ("timing", "error", "max_memory", "resume", "threads", "isolate", "model")
    d = {k: v for k, v in run.__dict__.items() if k not in skip}
    with contextlib.suppress(Exception):  # a point that fails to build: params as written
        d["params"] = variants.build(run.variant, **run.params).params()
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_fields(run: RunConfig) -> dict:
    """The fields a record has from its config alone (a point that fails to build keeps them)."""
    return dict(
        variant=run.variant,
        label=run.variant,
        family="",
        params=json.dumps(run.params, sort_keys=True, default=str),
        batch=run.batch,
        heads=run.heads,
        seq_len=run.seq_len,
        head_dim=run.head_dim,
        kv_heads=run.kv_heads,
        q_len=run.q_len,
        model=run.model,
        dtype=run.dtype,
        device=run.device,
        causal=run.causal,
        mode=run.mode,
        inputs=run.inputs,
        seed=run.seed,
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        point_id=point_id(run),
    )


def _variant_fields(run: RunConfig, att: Variant, shape: Shape) -> dict:
    return dict(
        label=att.label,
        family=att.family,
        params=json.dumps(att.params(), sort_keys=True),
        device=resolve_device(run.device),
        time_exponent=float(att.time_exponent),
        memory_exponent=float(att.memory_exponent),
    )


def gpu_state(device: str) -> dict[str, float | str]:
    """SM clock (MHz) and temperature (°C) through NVML, right after timing; empty elsewhere.
    Without NVML (pip install attnbench[gpu]) the fields stay NaN and `notes` says why."""
    if device != "cuda":
        return {}
    try:
        return {
            "gpu_clock_mhz": float(torch.cuda.clock_rate()),
            "gpu_temp_c": float(torch.cuda.temperature()),
        }
    except Exception as exc:  # no pynvml / NVML
        return {"notes": f"no GPU clock/temperature: NVML unavailable ({type(exc).__name__}: "
                         f"{_short(exc, 120)}; pip install attnbench[gpu])"}


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
