"""``longformer``: token-level sliding window + global tokens (Beltagy et al. 2020,
https://arxiv.org/abs/2004.05150), computed in blocks. Runs on the block-sparse engine
(`attnbench.variants.sparse.engine`, ``impl=blocked``) or the same mask through FlexAttention
(``impl=flex``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.registry import register
from attnbench.variants.sparse.bands import _band_and_globals, _band_keys, _positive
from attnbench.variants.sparse.pattern import BlockSparse


@register
@dataclass
class Longformer(BlockSparse):
    """Token i sees j with |i − j| ≤ window (in tokens), and the first `global_tokens` tokens
    see and are seen by all. Computed in blocks of `block`; defaults at n=8192: 5.4% density."""

    name: ClassVar[str] = "longformer"
    _token_level: ClassVar[bool] = True
    block: int = 64
    window: int = 128
    global_tokens: int = 64
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "window", "global_tokens", allow_zero=("window", "global_tokens"))

    @property
    def label(self) -> str:
        flex = ",flex" if self.impl == "flex" else ""
        return f"longformer[b={self.block},w={self.window},g={self.global_tokens}{flex}]"

    def _blocks(self) -> tuple[int, int]:  # window and global blocks
        return -(-self.window // self.block), -(-self.global_tokens // self.block)

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        m, g = self._blocks()
        return ((i - j).abs() <= m) | (i < g) | (j < g)

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _band_and_globals(nb, causal, *self._blocks())

    def allowed(self, q, k, n: int, causal: bool = False) -> torch.Tensor:
        g = self.global_tokens
        return ((q - k).abs() <= self.window) | (q < g) | (k < g)

    def row_keys(self, pos: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        every = pos + 1 if causal else torch.full_like(pos, n)  # a global query sees all
        band = _band_keys(pos, n, self.window, self.global_tokens, causal)
        return torch.where(pos < self.global_tokens, every, band)
