"""How many positions the chunked forms take at once: the whole sequence on the GPU path, and on
the CPU segments whose largest intermediate stays near `SEGMENT_WORDS` elements, the state carried
from one segment to the next.

Why on the CPU: an intermediate that grows with n leaves the caches, and from 32 MiB on the
allocator maps fresh pages for it on every call (glibc's mmap threshold tops out at 32 MiB):
filling a fresh 32 MiB tensor cost 5.7 ns per element on the 2-core VM against 0.05 ns for 16 MiB
reused, which made every variant of the family super-linear from 8K to 16K (latency slopes 1.2 to
1.35 where the algorithms are O(n)). Segments keep the work per element constant in n; they add
ops per segment, which the GPU path (launch-light) does not take.
"""

from __future__ import annotations

import torch

from attnbench.variants.base import gpu_path

SEGMENT_WORDS = 1 << 19  # elements of the largest intermediate of one segment (2 MiB in float32)


def segment_span(n: int, chunk: int, words_per_position: int, device: torch.device | str) -> int:
    """Positions per segment, a multiple of `chunk`: all n on the GPU path, else about
    SEGMENT_WORDS / words_per_position (words_per_position: the elements the largest intermediate
    holds per position, all heads and batch rows together)."""
    if gpu_path(device):
        return n
    chunks = max(1, SEGMENT_WORDS // max(1, words_per_position * chunk))
    return min(n, chunks * chunk)
