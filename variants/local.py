"""Sliding-window (local) attention, exact over the band |i − j| ≤ window (Beltagy et al. 2020,
https://arxiv.org/abs/2004.05150; lucidrains/local-attention): O(n·w) time and memory.

``impl=blocked``: queries in blocks of `block` attend to the 2·⌈w/b⌉+1 neighbouring key blocks
(the block-sparse engine in `variants/blocksparse.py`); only the band edges are masked.
``impl=flex``: FlexAttention with the same band as its block mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from variants import register
from variants.blocksparse import BlockSparse


@register
@dataclass
class Local(BlockSparse):
    """Query i sees keys j with |i − j| ≤ window (causal: 0 ≤ i − j ≤ window).

    Args: window (tokens each side); block (query/key block size of the blocked impl);
    impl (blocked | flex).
    """

    name: ClassVar[str] = "local"
    family: ClassVar[str] = "local"
    _token_level: ClassVar[bool] = True

    window: int = 256
    block: int = 128
    impl: str = "blocked"

    def _check_params(self) -> None:
        if self.window < 0:
            raise ValueError(f"window={self.window}: must be >= 0")

    @property
    def label(self) -> str:
        return self._label({
            "window": f"w={self.window}",
            "block": f"b={self.block}" if self.block != 128 else None,
            "impl": self.impl if self.impl != "blocked" else None,
        })

    def _reach(self) -> int:
        return -(-self.window // self.block)  # key blocks each side that the band reaches

    def block_allowed(self, i: torch.Tensor, j: torch.Tensor, nb: int) -> torch.Tensor:
        return (i - j).abs() <= self._reach()

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i, m = torch.arange(nb), self._reach()
        lo, hi = (i - m).clamp(min=0), i if causal else (i + m).clamp(max=nb - 1)
        return hi - lo + 1, hi == nb - 1

    def allowed(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return (q - k).abs() <= self.window
