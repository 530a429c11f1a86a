"""CPU memory between timed calls: kept by the allocator, as CUDA's caching allocator keeps it.

PyTorch's CPU tensors come from the C library's malloc. glibc maps a large block afresh for each
allocation and unmaps it at free (above its mmap threshold, which it raises by itself only after
a large free), and hands the top of its heap back to the kernel (above its trim threshold). So
whether a call's temporaries cost their pages again at every call (minor faults, ~0.25 ms per
MiB on a 2-core EPYC VM) depends on what the process did before: the same MoBA call at n=8192
faulted 0.3 MiB per call in one process and 36 MiB in the next (79.5 against 89.3 ms); RetNet
at n=4096 4-20 MiB. That is the process's history, not the variant's cost.

`keep_freed_memory()` fixes glibc's steady state from the start: blocks up to its largest mmap
threshold (32 MiB on 64-bit) come from the heap, and freed heap memory is kept up to TRIM_ABOVE
bytes at its top. A call's temporaries then reuse the pages of the previous call's, as they
would after glibc's own warm-up in a long-running process. A block above 32 MiB is mapped afresh
each time unless the kept heap has room for it (its faults are in the record's `page_faults`).
Peak memory is measured at the allocator level (`memory.py`), so it does not change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_ABOVE = 512 * 2**20  # free memory kept at the top of the heap before it is handed back

_state: str | None = None


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (see the module's docstring), once per process;
    the allocator as recorded: "glibc (freed memory kept, blocks < 32 MiB)", or "system" where
    the C library is not glibc or refuses."""
    global _state
    if _state is None:
        _state = _set()
    return _state


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value) for this process; False where the C library is not glibc
    or refuses the value."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _set() -> str:
    ok = mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) and mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)
    return f"glibc (freed memory kept, blocks < {KEEP_BELOW >> 20} MiB)" if ok else "system"
