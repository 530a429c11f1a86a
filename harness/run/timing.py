"""One timer for everything: warm-up excluded, device synchronised, repeats, median and spread.

On CUDA each repeat is bracketed by CUDA events (and, optionally, preceded by an L2 flush); on
CPU by ``time.perf_counter``. Repeats continue until both `min_reps` and `min_time_s` are met
(or `max_reps` is hit), as ``torch.utils.benchmark``'s blocked_autorange and Triton's do_bench do.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnbench.harness.run.contention import Contention, contention, snapshot


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    warmup: int
    load: Contention = field(default_factory=Contention.unknown)  # the machine while timed
    note: str = ""  # e.g. why a CUDA graph could not be captured (then timed eagerly)
    faults_per_call: float = math.nan  # minor page faults per timed call (NaN: not readable)

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: the relative spread."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else float("nan")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile, as numpy's default."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_latency(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    warmup: int = 2,
    min_reps: int = 5,
    min_time_s: float = 0.2,
    max_reps: int = 1000,
    max_time_s: float = 30.0,
    flush_l2: bool = True,
    cuda_graph: bool = False,
) -> Timing:
    """Time `fn()` (its result is discarded); every repeat is timed separately.

    Args:
        fn: the call to time; it must do the same work each time.
        device: where `fn` runs; CUDA gets events and synchronisation.
        warmup: untimed calls first (compilation, caches, allocator warm-up).
        min_reps, min_time_s: repeat until both are met...
        max_reps, max_time_s: ...but stop at either of these (max_time_s counts timed calls).
        flush_l2: on CUDA, overwrite a buffer larger than L2 before each repeat (cold cache).
        cuda_graph: on CUDA, capture `fn` once in a CUDA graph and time its replays, which
            removes the CPU launch overhead (small shapes are otherwise launch-bound).

    The result also says how much of the machine other processes took during the repeats
    (`Timing.load`, see harness.contention): a busy machine inflates latencies consistently, so
    a tight spread alone does not make a number clean; and how many pages each call faulted in
    (`Timing.faults_per_call`): temporaries the allocator maps afresh at every call, ~0.25 ms
    per MiB on the 2-core VMs this was written on, a cost of the allocator's state, which
    differs from process to process, not of the method.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(dev)
    note = ""
    if cuda_graph and dev.type == "cuda":
        try:
            fn = _capture(fn, dev)
        except Exception as exc:  # e.g. a host sync or an allocation the graph cannot hold
            note = f"cuda_graph capture failed ({type(exc).__name__}: {_first_line(exc)}); " \
                "timed eagerly"
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(dev)
    times: list[float] = []
    total = 0.0
    before = snapshot()
    if dev.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.int8, device=dev) if flush_l2 else None
        while len(times) < max_reps and (len(times) < min_reps or total < min_time_s):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            times.append(ms)
            total += ms / 1e3
            if total > max_time_s:
                break
    else:
        while len(times) < max_reps and (len(times) < min_reps or total < min_time_s):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt * 1e3)
            total += dt
            if total > max_time_s:
                break
    after = snapshot()
    load = contention(before, after, torch.get_num_threads())
    return Timing(
        median_ms=statistics.median(times),
        p10_ms=quantile(times, 0.1),
        p90_ms=quantile(times, 0.9),
        reps=len(times),
        warmup=warmup,
        load=load,
        note=note,
        faults_per_call=(after.faults - before.faults) / len(times),
    )


def _capture(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture `fn` in a CUDA graph (after warm-up on a side stream, as PyTorch recommends).
    The caller's current stream is the current stream again afterwards, whether or not the
    capture succeeds (both context managers restore it on the way out)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    finally:
        torch.cuda.set_stream(current)
    return graph.replay


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
