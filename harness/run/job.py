"""One sweep point, end to end: build → check support → inputs → measure → one record.

Failures are data: an unsupported point, an out-of-memory, a NaN output or any other exception
becomes a record with a status and a reason; nothing here raises past `run_point` except a
ConfigError for bad input (raised before any work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import importlib
import json
import logging
import math
import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch

from attnbench import variants
from attnbench.harness.records import Record
from attnbench.harness.run.accuracy import error, softmax_error
from attnbench.harness.run.config import RunConfig, resolve_device
from attnbench.harness.run.inputs import attention_entropy, make_inputs
from attnbench.harness.run.machine import gpu_state, machine_info
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.harness.run.point import decide, on_device, point_id
from attnbench.harness.run.timing import Timing, measure_latency
from attnbench.variants.base import Shape, Variant

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
    if run.mode == "decode":  # a RunConfig built by hand: normalised as from_dictconfig does
        run = replace(run, causal=True)
    base = _run_fields(run)

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
        decision = decide(att, run)
        if decision.outcome == "unsupported":
            return finish("unsupported", decision.reason)
        predicted = decision.predicted
        if decision.outcome == "skipped":
            return finish("skipped", decision.reason, predicted_mem_bytes=float(predicted))
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

    rel, mab, error_ref = error(att, q, k, v, out, run)
    softmax_rel = softmax_error(att, q, k, v, out, run, error_ref)
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
        error_rows=min(run.error.rows, shape.nq),
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
    rel, mab, error_ref = error(att, q, k, v, full_out, run, last_row)
    softmax_rel = softmax_error(att, q, k, v, full_out, run, error_ref, last_row)
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
        error_rows=min(run.error.rows, 1),
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


# Allocation failures that surface as plain RuntimeErrors: the CPU allocator, and cuBLAS /
# cuDNN / cuFFT / cuSOLVER failing to get workspace (their status codes, not torch's OOM type).
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator",
                "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUFFT_ALLOC_FAILED",
                "CUSOLVER_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


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


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


