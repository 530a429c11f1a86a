"""Ctrl-C in a sweep, never dropped.

Python's own SIGINT handler raises KeyboardInterrupt in whatever the main thread runs. When
that is a weakref callback or a `__del__` (the garbage collector runs them between any two
bytecodes), Python prints "Exception ignored …" and drops the exception: the sweep would run on
to its end and exit 0. Inside `catching()` a Ctrl-C is remembered as well as raised, a dropped
one is not printed, and `check()` (where each point starts, after the last one and after the
report) raises it again. Outside a sweep's main thread, or where SIGINT is not Python's default
(ignored, or someone else's handler), nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_pending = False


def _on_sigint(signum: int, frame: Any) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _quiet(previous: Callable[[Any], object], unraisable: Any) -> None:
    """A KeyboardInterrupt dropped by Python after a Ctrl-C: `check()` raises it again, so
    nothing is printed; anything else goes to the hook that was there before."""
    if _pending and issubclass(unraisable.exc_type, KeyboardInterrupt):
        return
    previous(unraisable)


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Remember each Ctrl-C inside the block (see the module's docstring)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    hook = sys.unraisablehook
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = lambda u: _quiet(hook, u)
    try:
        yield
    finally:
        _pending = False  # a Ctrl-C belongs to its block: a later run in this process starts clean
        if signal.getsignal(signal.SIGINT) is _on_sigint:  # not SIG_IGN, set while gathering
            signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = hook


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came inside `catching()` (caught or dropped)."""
    if _pending:
        raise KeyboardInterrupt

