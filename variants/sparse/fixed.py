"""``fixed``: the fixed pattern of the Sparse Transformer (Child et al. 2019,
https://arxiv.org/abs/1904.10509), at block granularity: each block's chunk and the summary
blocks of every chunk. Runs on the block-sparse engine (`attnbench.variants.sparse.engine`,
``impl=blocked``) or the same mask through FlexAttention (``impl=flex``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.registry import register
from attnbench.variants.sparse.bands import _positive
from attnbench.variants.sparse.pattern import BlockSparse


@register
@dataclass
class Fixed(BlockSparse):
    """Query block I sees the key blocks of its own chunk of `stride` blocks, and the last
    `summary` blocks of every chunk. Non-causal density ≈ stride/nb + summary/stride (≥ 2/√nb),
    so 6% at n=8192 needs small blocks: the defaults (block 8, stride 32, summary 1) are the
    paper's token pattern with l = 256, c = 8, density 6.15%. The engine runs each chunk's 32
    query blocks as one 256-row tile (they share their key blocks), so small blocks cost little."""

    name: ClassVar[str] = "fixed"
    time_exponent: ClassVar[float] = 2.0  # nb/stride summary blocks per row: n²·summary/stride
    memory_exponent: ClassVar[float] = 1.0
    block: int = 8
    stride: int = 32
    summary: int = 1
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "stride", "summary")
        if self.summary > self.stride:
            raise ValueError(f"summary={self.summary}: must be <= stride={self.stride}")

    @property
    def label(self) -> str:
        flex = ",flex" if self.impl == "flex" else ""
        return f"fixed[b={self.block},s={self.stride},c={self.summary}{flex}]"

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        s, c = self.stride, self.summary
        return (i // s == j // s) | (j % s >= s - c)

    def causal_span(self) -> int:
        """A chunk's `stride` query blocks see the same key blocks up to the chunk's end: causal,
        they run as one tile (the engine's per-block gathers of 8-key blocks took 2/3 of the
        causal forward: 122 ms against 25 ms as one tile per chunk at n=4096, B1 H8 D64 CPU)."""
        return self.stride

    def engine_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`row_counts` with the causal limit at the end of the query block's chunk."""
        return self.row_counts(nb, causal, chunk=causal)

    def row_counts(self, nb: int, causal: bool,
                   chunk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`chunk` (causal): up to the end of the query block's chunk, not its own block."""
        s, c = self.stride, self.summary
        i = torch.arange(nb)
        lo = i // s * s  # the query block's chunk is [lo, hi]
        hi = i if causal and not chunk else (lo + s - 1).clamp(max=nb - 1)
        top = hi if causal else torch.full_like(i, nb - 1)

        def summaries(z: torch.Tensor) -> torch.Tensor:  # summary blocks in [0, z], z ≥ -1
            return (z + 1) // s * c + ((z + 1) % s - (s - c)).clamp(min=0)

        counts = hi - lo + 1 + summaries(top) - summaries(hi) + summaries(lo - 1)
        last = (hi == nb - 1) | (((nb - 1) % s >= s - c) & (not causal))
        return counts, last
