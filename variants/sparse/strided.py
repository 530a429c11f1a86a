"""``strided``: the factorised strided pattern of the Sparse Transformer (Child et al. 2019,
https://arxiv.org/abs/1904.10509), at block granularity: a local band and every stride-th
block. Runs on the block-sparse engine (`attnbench.variants.sparse.engine`, ``impl=blocked``) or
the same mask through FlexAttention (``impl=flex``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.registry import register
from attnbench.variants.sparse.bands import _band, _congruent, _positive
from attnbench.variants.sparse.pattern import BlockSparse


@register
@dataclass
class Strided(BlockSparse):
    """Query block I sees key blocks with |I − J| ≤ window_blocks or (I − J) mod stride = 0.

    Args: block (tokens per block); window_blocks (key blocks each side of the query's block,
    in blocks: window_blocks=2 reaches 2·block tokens; `window` is its old name, accepted for
    one release); stride (in blocks). Child et al. tie the local width to the stride l; here
    they are separate fields so the density can be set (defaults at n=8192: 8 of 128 blocks
    per row, 6.25%). The label keeps `w=` for window_blocks (`strided[b=64,w=2,s=32]`).
    """

    name: ClassVar[str] = "strided"
    # Rows see nb/stride column blocks: n²/stride at fixed stride (n^1.5 with stride ∝ √n, as
    # in the paper), so the declared growth at fixed parameters is quadratic, with a 1/stride
    # constant.
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 1.0  # score tiles are chunked: memory is O(n) + O(1)
    renamed: ClassVar[dict[str, tuple[str, str]]] = {"window": ("window_blocks", "blocks")}
    block: int = 64
    window_blocks: int = 2
    stride: int = 32
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "stride", "window_blocks", allow_zero=("window_blocks",))

    @property
    def label(self) -> str:
        flex = ",flex" if self.impl == "flex" else ""
        return f"strided[b={self.block},w={self.window_blocks},s={self.stride}{flex}]"

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        rel = i - j
        return (rel.abs() <= self.window_blocks) | (rel % self.stride == 0)

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(nb)
        lo, hi = _band(nb, causal, self.window_blocks)
        top = i if causal else nb - 1
        # the band, plus the blocks J ≡ I (mod stride) in [0, top] outside it
        counts = hi - lo + 1 + _congruent(i, self.stride, 0, top) - _congruent(
            i, self.stride, lo, hi)
        last = (hi == nb - 1) | (((nb - 1 - i) % self.stride == 0) & (not causal))
        return counts, last
