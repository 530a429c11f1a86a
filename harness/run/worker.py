"""Where a point runs, so that no point can end the sweep: the job's process supervises a worker.

`measure(run)` by `isolate`:
- `auto` on a CPU: in one worker process per sweep (started at the first point, kept for the
  next). User code — a custom target, a plugin — that segfaults, aborts or calls `os._exit`
  ends only the worker: its point becomes an `error` row naming the signal or exit code
  (`job.died`), and the next point starts a new worker. A point costs one RunConfig and one
  Record through a pipe (well under a millisecond), not a new interpreter.
- `auto` on CUDA, or `true`: a fresh process per point (`job.run_point`), as before.
- `false`: in this process (no protection; for debugging).

Exceptions and `SystemExit` in user code are rows wherever the point runs (`job.run_point`).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import importlib
import logging
import multiprocessing
import signal
from dataclasses import replace

from attnbench import variants
from attnbench.harness.records import Record
from attnbench.harness.run.config import RunConfig, resolve_device

log = logging.getLogger("attnbench")


def measure(run: RunConfig) -> Record:
    """The record of one point, measured where `run.isolate` says (module docstring)."""
    from attnbench.harness.run.job import run_point

    if run.isolate == "auto" and resolve_device(run.device) == "cpu":
        return _shared().measure(run)
    return run_point(run)


class Worker:
    """One worker process, started on demand and again after a point killed it."""

    def __init__(self) -> None:
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn = None

    def measure(self, run: RunConfig) -> Record:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((run, _module_of(run)))
            record = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the point killed it
            return self._died(run)
        except BaseException:  # Ctrl-C here: the worker goes with the point it was measuring
            self.close()
            raise
        return record

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True,
                                 name="attnbench-worker")
        self._proc.start()
        child.close()
        self._conn = parent

    def _died(self, run: RunConfig) -> Record:
        from attnbench.harness.run.job import died

        proc = self._proc
        proc.join(timeout=30)
        code = proc.exitcode
        self.close()
        log.error("attnbench: the worker process ended during %s (exit code %s); the next "
                  "point starts a new one", run.variant, code)
        return died(run, code)

    def close(self) -> None:
        """Stop the worker (if any); the next `measure` starts a new one."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()  # an idle worker reads EOF and returns
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_worker: Worker | None = None


def _shared() -> Worker:
    global _worker
    if _worker is None:
        _worker = Worker()
        atexit.register(shutdown)
    return _worker


def shutdown() -> None:
    """Stop this process's worker (the sweeper calls it before the report)."""
    if _worker is not None:
        _worker.close()


def _module_of(run: RunConfig) -> str:
    """The module that registers the point's variant (a plugin's, or a test's), for the worker
    to import: entry-point plugins load by themselves, others need their module imported."""
    with contextlib.suppress(KeyError):
        return variants.get(run.variant).__module__
    return ""


def _serve(conn) -> None:
    """The worker's loop: a RunConfig in, its Record out, until the pipe closes."""
    import torch

    from attnbench.harness.run.job import _run_point_here, error_record

    faulthandler.enable()  # a crash prints the Python stack of the point that caused it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    threads = torch.get_num_threads()
    while True:
        try:
            run, module = conn.recv()
        except (EOFError, OSError):
            return
        if module:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        torch.set_num_threads(threads)  # threads=0 means PyTorch's default, not the last point's
        try:
            record = _run_point_here(replace(run, isolate=False))
        except BaseException as exc:  # what run_point does not turn into a row itself
            record = error_record(run, f"{type(exc).__name__}: {exc}")
        conn.send(record)
