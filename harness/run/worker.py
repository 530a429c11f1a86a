"""A worker process that measures points for a supervisor, restarted after a point kills it.

The transport only: `Worker.measure(run)` sends a RunConfig to the worker and returns its
Record, or raises `WorkerDied` with the exit code (negative: the signal) when the worker ended
first — a segfault or abort in native code, `os._exit`, a kill. The worker runs
`attnbench.harness.run.job.serve` (named here as text: job decides where points run and imports
this module, never the other way round). `job.measure` keeps one worker per sweep on a CPU;
`job.run_point` uses a fresh one per point for `isolate=true` and on CUDA.

A plain subprocess of this interpreter, not multiprocessing's: it starts the same way under
any launcher (inside a joblib worker, whose own start method a multiprocessing child cannot
use) and needs no `__main__` guard in the program that measures. Pickled RunConfigs and Records
go through two pipes (about half a millisecond a point); the worker gets this process's
sys.path, so plugins, tests' variants and custom targets import there as here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import subprocess
import sys

from attnbench import variants
from attnbench.harness.records import Record
from attnbench.harness.run.config import RunConfig

SERVE = "attnbench.harness.run.job"  # its `serve(down_fd, up_fd)` is the worker's loop


class WorkerDied(Exception):
    """The worker process ended before it returned a record; `exitcode` < 0: killed by that
    signal."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"the worker process ended (exit code {exitcode})")
        self.exitcode = exitcode


class Worker:
    """One worker process, started on demand and again after a point killed it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._to = self._from = None

    def measure(self, run: RunConfig) -> Record:
        """The worker's record of `run`; WorkerDied if the point ended the worker."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            pickle.dump((run, _module_of(run)), self._to)
            self._to.flush()
            return pickle.load(self._from)
        except (EOFError, OSError, pickle.UnpicklingError):  # the point killed it
            raise WorkerDied(self._ended()) from None
        except BaseException:  # Ctrl-C here: the worker goes with the point it was measuring
            self.close()
            raise

    def _start(self) -> None:
        self.close()
        down_r, down_w = os.pipe()  # supervisor → worker
        up_r, up_w = os.pipe()  # worker → supervisor
        boot = (f"import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                f"from {SERVE} import serve; serve(int(sys.argv[2]), int(sys.argv[3]))")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", boot, json.dumps(sys.path), str(down_r), str(up_w)],
                pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(down_r)
            os.close(up_w)
        self._to, self._from = os.fdopen(down_w, "wb"), os.fdopen(up_r, "rb")

    def _ended(self) -> int | None:
        proc = self._proc
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: not to be trusted
            proc.kill()
            code = proc.wait()
        self.close()
        return code

    def close(self) -> None:
        """Stop the worker (if any); the next `measure` starts a new one."""
        proc, pipes = self._proc, (self._to, self._from)
        self._proc = self._to = self._from = None
        for pipe in pipes:
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()  # an idle worker reads EOF and returns
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_shared: Worker | None = None


def shared() -> Worker:
    """This process's worker for a sweep's points (one at a time), stopped at exit."""
    global _shared
    if _shared is None:
        _shared = Worker()
        atexit.register(shutdown)
    return _shared


def shutdown() -> None:
    """Stop this process's shared worker (the sweeper calls it before the report)."""
    if _shared is not None:
        _shared.close()


def _module_of(run: RunConfig) -> str:
    """The module that registers the point's variant (a plugin's, or a test's), for the worker
    to import: entry-point plugins load by themselves, others need their module imported."""
    with contextlib.suppress(KeyError):
        return variants.get(run.variant).__module__
    return ""
