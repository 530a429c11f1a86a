"""One sweep point, end to end: build → check support → inputs → measure → one record.

Failures are data: an unsupported point, an out-of-memory, a NaN output, an output of the wrong
dtype or shape, an input modified in place, any other exception (SystemExit included) becomes a
record with a status and a reason; nothing here raises past `run_point` except a ConfigError for
bad input (raised before any work). `measure` runs the point where `isolate` says: in a worker
process that a crash (a segfault in user code) ends without ending the sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import importlib
import json
import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch

from attnbench import variants
from attnbench.harness.records import Record
from attnbench.harness.run import worker
from attnbench.harness.run.accuracy import quality
from attnbench.harness.run.allocator import keep_freed_memory
from attnbench.harness.run.config import RunConfig, resolve_device
from attnbench.harness.run.contention import free_cores
from attnbench.harness.run.inputs import attention_entropy, make_inputs
from attnbench.harness.run.machine import gpu_state, machine_info
from attnbench.harness.run.memory import peak_memory
from attnbench.harness.run.opcount import count_call
from attnbench.harness.run.point import decide, on_device, point_id, point_label
from attnbench.harness.run.rate import process_matmul_rate, process_read_rate
from attnbench.harness.run.timing import Timing, measure_latency
from attnbench.harness.run.worker import Worker, WorkerDied
from attnbench.variants.base import Shape, Variant

log = logging.getLogger("attnbench")

NOISY_SPREAD = 0.10
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own default (physical cores), before any set


@functools.lru_cache(maxsize=1)
def auto_threads() -> int:
    """threads=0: the cores other processes leave free (`contention.free_cores`), measured once
    per process, when its first point starts, so every point of a sweep runs with one count."""
    return free_cores(DEFAULT_THREADS)


def point_threads(run: RunConfig) -> int:
    """The CPU threads a point computes with: `threads`, or 0 for `auto_threads`."""
    return run.threads or auto_threads()


def run_point(run: RunConfig) -> Record:
    """Measure one point and return its record (never raises for a failing point).

    With `isolate` (default `auto`: on CUDA) the point runs in a fresh process of its own, so a
    sticky CUDA error, a compile cache or a variant's cached projections cannot leak into the
    next point; a process that dies is an `error` row with its exit code."""
    if isolated(run):  # the threads chosen here, where the sweep runs, not in each new process
        return _run_in_subprocess(replace(run, threads=point_threads(run)))
    return _run_point_here(run)


def isolated(run: RunConfig) -> bool:
    if run.isolate == "auto":
        return resolve_device(run.device) == "cuda"
    return run.isolate is True


def _run_in_subprocess(run: RunConfig) -> Record:
    """The point in a fresh worker process of its own, closed after it."""
    one = Worker()
    try:
        return one.measure(run)
    except WorkerDied as exc:
        return died(run, exc.exitcode)
    finally:
        one.close()


def measure(run: RunConfig) -> Record:
    """The record of one point, measured where `run.isolate` says, so that no point can end the
    sweep: `auto` on a CPU, in this process's worker (one per sweep, started at the first point,
    kept for the next): user code that segfaults, aborts or calls `os._exit` ends only the
    worker, its point becomes an `error` row naming the signal or exit code (`died`), and the
    next point starts a new worker — one interpreter start per sweep (and per crash), not per
    point. `auto` on CUDA or `true`: a fresh process per point (`run_point`). `false`: in this
    process, unprotected. Exceptions and SystemExit are rows wherever the point runs."""
    if run.isolate == "auto" and resolve_device(run.device) == "cpu":
        try:
            return worker.shared().measure(run)
        except WorkerDied as exc:
            log.error("attnbench: the worker process ended during %s (exit code %s); the next "
                      "point starts a new one", point_label(run), exc.exitcode)
            return died(run, exc.exitcode)
    return run_point(run)


def serve(down: int, up: int) -> None:
    """A worker's loop (harness.run.worker): a pickled RunConfig in on fd `down`, its Record
    out on fd `up`, until the supervisor closes the pipe."""
    import faulthandler
    import pickle

    faulthandler.enable()  # a crash prints the Python stack of the point that caused it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    threads = torch.get_num_threads()
    with os.fdopen(down, "rb") as inbox, os.fdopen(up, "wb") as outbox:
        while True:
            try:
                run, module = pickle.load(inbox)
            except (EOFError, OSError):
                return
            if module:
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
            if torch.get_num_threads() != threads:  # threads=0: the default, not the last one's
                torch.set_num_threads(threads)
            try:
                record = _run_point_here(replace(run, isolate=False))
            except BaseException as exc:  # what the point's guard does not turn into a row
                record = error_record(run, f"{type(exc).__name__}: {exc}")
            pickle.dump(record, outbox)
            outbox.flush()


def died(run: RunConfig, exitcode: int | None) -> Record:
    """The `error` row of a point whose process ended before it returned a record: a crash in
    native code (SIGSEGV), an abort, a kill, or user code calling os._exit."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = f"was killed by {name}{SIGNAL_WORDS.get(name, '')}"
    else:
        why = f"exited (exit code {exitcode})"
    return error_record(run, f"the point's process {why} before it returned a record; see the "
                             f"log")


def error_record(run: RunConfig, reason: str) -> Record:
    """An `error` row of a point from its config alone (it never returned a record)."""
    fields = _run_fields(run)
    fields["label"] = point_label(run)
    return Record(**fields, status="error", reason=_short(reason))


SIGNAL_WORDS = {"SIGSEGV": " (a crash in native code)", "SIGBUS": " (a crash in native code)",
                "SIGABRT": " (an abort)", "SIGKILL": " (e.g. the out-of-memory killer)",
                "SIGFPE": " (a crash in native code)", "SIGILL": " (a crash in native code)"}


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
        torch.set_num_threads(point_threads(run))
        kept = keep_freed_memory() if device == "cpu" else ""  # before the variant allocates
        base.update(threads=torch.get_num_threads(), allocator=kept, **machine_info(device))
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
    except (Exception, SystemExit) as exc:  # user code calling sys.exit() ends only its point
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
    saved = _host_copies(q, k, v)
    call = _make_call(att, q, k, v, run.causal, grad)
    inputs = (q, k, v) if grad else ()

    t0 = time.perf_counter()
    out = call()  # first call: compilation, masks, caches; reported as setup, never as latency
    _sync(device)
    setup_s = time.perf_counter() - t0
    bad = _output_problem(out, q, v) or _changed(saved, (q, k, v))
    if bad:
        return finish("invalid", f"{bad} (first call)", setup_s=setup_s)
    bad = _non_finite(out, inputs)
    if bad:
        return finish("invalid", f"non-finite values in {bad} (first call)", setup_s=setup_s)

    quality_fields = quality(att, q, k, v, out, run)
    entropy = attention_entropy(q.detach(), k.detach(), rows=min(run.error.rows or 64, 64),
                                causal=run.causal)
    del out
    kernel = att.kernel(shape, device, run.causal, grad)
    counted = _dispatch_fields(call, kernel)

    timing, fields = _time(call, run, device)
    last = fields.pop("last")
    bad = _output_problem(last, q, v) or _changed(saved, (q, k, v))
    if bad:
        return finish("invalid", f"{bad} (a timed call)", setup_s=setup_s)
    bad = _non_finite(last, inputs)
    if bad:
        return finish("invalid", f"non-finite values in {bad} (a timed call)", setup_s=setup_s)
    fields["notes"] = _join(counted.pop("notes", ""), fields["notes"])
    for x in inputs:  # the measured call's own gradients count in its peak
        x.grad = None
    peak = peak_memory(call, device)
    flops = on_device(att.flops, device)(shape, run.causal)
    if grad:
        flops += on_device(att.backward_flops, device)(shape, run.causal)
    algo = on_device(att.algorithm_flops, device)(shape, run.causal) * (3 if grad else 1)
    moved = att.algorithm_bytes(shape, dtype) * (3 if grad else 1)  # the backward: 2× its I/O
    return finish(
        "ok",
        setup_s=setup_s,
        peak_mem_bytes=float(peak),
        predicted_mem_bytes=float(predicted),
        flops=float(flops),
        tflops=flops / (timing.median_ms * 1e-3) / 1e12,
        **flop_fields(algo, flops, moved, timing.median_ms, device, run.dtype),
        error_rows=min(run.error.rows, shape.nq),
        entropy=entropy,
        **quality_fields,
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
    saved = _host_copies(q, k, v)
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
    bad = _output_problem(out, q1, v1) or _changed(saved, (q, k, v))
    if bad:
        return finish("invalid", f"{bad} (first step)", setup_s=setup_s, state_bytes=state_bytes)
    if _non_finite(out, ()):
        return finish("invalid", "non-finite values in output (first step)", setup_s=setup_s,
                      state_bytes=state_bytes)
    full_out = torch.zeros_like(q)
    full_out[:, :, n:] = out
    last_row = torch.tensor([n], device=q.device)  # the new token's row of the whole sequence
    quality_fields = quality(att, q, k, v, full_out, run, last_row)
    kernel = att.decode_kernel(shape, device)

    def call():
        with torch.no_grad():
            return step()

    counted = _dispatch_fields(call, kernel)
    timing, fields = _time(call, run, device)
    last = fields.pop("last")
    bad = _output_problem(last, q1, v1) or _changed(saved, (q, k, v))
    if bad:
        return finish("invalid", f"{bad} (a timed step)", setup_s=setup_s)
    if _non_finite(last, ()):
        return finish("invalid", "non-finite values in output (a timed step)", setup_s=setup_s)
    fields["notes"] = _join(counted.pop("notes", ""), fields["notes"])
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
        **flop_fields(att.algorithm_decode_flops(shape), flops,
                      att.algorithm_decode_bytes(shape, dtype, state_bytes), timing.median_ms,
                      device, run.dtype),
        error_rows=min(run.error.rows, 1),
        **quality_fields,
        **counted,
        **fields,
    )


def flop_fields(algo: float, executed: float, moved: float, median_ms: float, device: str,
                dtype: str) -> dict[str, float | str]:
    """algo_flops, executed_flops, algo_bytes (`moved`, the method's least traffic), the
    machine's limits (`rate`: its matmul rate once per process, the read rate of a working set
    that size) and the point's fraction of the one that binds: the larger of executed FLOPs at
    the matmul rate and algo_bytes at the read rate, over the latency (`limit_bound` names it;
    a limit without a model is left out; NaN and "" where neither has one)."""
    rate = process_matmul_rate(device, dtype)
    seconds = median_ms * 1e-3
    read = math.nan
    if math.isfinite(moved) and moved > 0:
        try:
            read = process_read_rate(device, moved)
        except RuntimeError:  # no room for the probe (a full GPU): that limit is left out
            log.warning("read-rate probe of %.0f bytes failed; limit_fraction: matmul only", moved)
    times = {"matmul": executed / rate if math.isfinite(executed) and rate > 0 else math.nan,
             "memory": moved / read if math.isfinite(read) and read > 0 else math.nan}
    known = {k: t for k, t in times.items() if math.isfinite(t)}
    bound = max(known, key=known.get) if known and seconds > 0 else ""
    return {"algo_flops": float(algo), "executed_flops": float(executed),
            "algo_bytes": float(moved), "matmul_gflops": rate / 1e9,
            "read_gbps": read / 1e9, "limit_bound": bound,
            "limit_fraction": known[bound] / seconds if bound else math.nan}


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
        page_faults=timing.faults_per_call,
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
    try:
        c = count_call(call)
    except Exception as exc:  # e.g. a tensor subclass made inside the call: counts left empty
        return {"kernel": kernel, "notes": f"ops not counted ({type(exc).__name__}: "
                                           f"{_short(exc, 120)})"}
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


def _host_copies(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copies of the inputs in host memory (never the device's, whose cap the point was sized
    against): what the float64 reference must see, compared after the variant's calls."""
    return tuple(t.detach().to("cpu", copy=True) for t in tensors)


def _changed(saved: tuple[torch.Tensor, ...], tensors: tuple[torch.Tensor, ...]) -> str:
    """Which input the variant modified in place ("" if none): its error would be measured
    against the modified inputs, and its latency on them."""
    for name, old, t in zip("qkv", saved, tensors, strict=True):
        if not torch.equal(t.detach().cpu(), old):
            return (f"the variant modified its input {name} in place (its error would be "
                    f"against the modified inputs)")
    return ""


def _output_problem(out, q: torch.Tensor, v: torch.Tensor) -> str:
    """What is wrong with a call's output ("" if nothing): not a tensor, not (B, H, Nq, Dv), or
    not the inputs' dtype (a float64 result of float32 inputs times another computation and
    hides its rounding error; an integer one is not attention)."""
    if not isinstance(out, torch.Tensor):
        return f"the variant returned a {type(out).__name__}, not a tensor"
    want = (*q.shape[:-1], v.shape[-1])
    if tuple(out.shape) != want:
        return (f"the output's shape is {tuple(out.shape)}, not (B, H, Nq, Dv) = {want}")
    if out.dtype != q.dtype:
        return (f"the output's dtype is {str(out.dtype).removeprefix('torch.')}, not the "
                f"inputs' {str(q.dtype).removeprefix('torch.')}")
    return ""


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(exc: object, limit: int = 300) -> str:
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
        threads=run.threads,
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        point_id=point_id(run),
    )


def _variant_fields(run: RunConfig, att: Variant, shape: Shape) -> dict:
    return dict(
        label=att.label,
        family=att.family,
        params=json.dumps(att.params(), sort_keys=True),
        device=resolve_device(run.device),
        # decode: the growth of one step's time and of what the deployment holds
        time_exponent=float(att.decode_time_exponent if run.mode == "decode"
                            else att.time_exponent),
        memory_exponent=float(att.decode_memory_exponent if run.mode == "decode"
                              else att.memory_exponent),
    )


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


