"""``bigbird``: sliding window + global + seeded random blocks (Zaheer et al. 2020,
https://arxiv.org/abs/2007.14062). Runs on the block-sparse engine
(`attnbench.variants.sparse.engine`, ``impl=blocked``) or the same mask through FlexAttention
(``impl=flex``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.registry import register
from attnbench.variants.sparse.bands import _band_and_globals, _positive
from attnbench.variants.sparse.pattern import BlockSparse


@register
@dataclass
class BigBird(BlockSparse):
    """BigBird-ITC: `window_blocks` sliding blocks (odd, centred: window_blocks=3 is the
    query's block and one each side; `window` is its old name, accepted for one release), the
    first `globals` blocks attend to and are attended by everything, `random` blocks per row
    drawn (seeded, without replacement) outside the others (causal: among the earlier blocks).
    Every count is in blocks of `block` tokens; the label keeps `w=` for window_blocks. The
    draw is part of the pattern and costs O(nb·random), so density and FLOPs count it exactly
    before any layout exists. Defaults at n=8192: 7.7% density."""

    name: ClassVar[str] = "bigbird"
    renamed: ClassVar[dict[str, tuple[str, str]]] = {"window": ("window_blocks", "blocks")}
    block: int = 64
    window_blocks: int = 3
    globals: int = 2
    random: int = 3
    seed: int = 0
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "window_blocks", "globals", "random", allow_zero=("globals", "random"))
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks={self.window_blocks}: must be odd (blocks centred "
                             f"on the query)")

    @property
    def label(self) -> str:
        return self._label({  # a non-default seed is appended
            "block": f"b={self.block}", "window_blocks": f"w={self.window_blocks}",
            "globals": f"g={self.globals}", "random": f"r={self.random}",
            "impl": "flex" if self.impl == "flex" else None,
        })

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        g = self.globals
        fixed = ((i - j).abs() <= self.window_blocks // 2) | (i < g) | (j < g)
        drawn = self._random(nb, causal)[i]  # (..., random)
        return fixed | (drawn == j.unsqueeze(-1)).any(-1)

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        counts, last = _band_and_globals(nb, causal, self.window_blocks // 2, self.globals)
        drawn = self._random(nb, causal)  # exact: the draw itself, O(nb·random)
        valid = drawn >= 0
        return counts + valid.sum(1), last | (valid & (drawn == nb - 1)).any(1)

    def _random(self, nb: int, causal: bool = False) -> torch.Tensor:
        """(nb, random) int64: each query block's random key blocks, drawn (seeded) without
        replacement among the blocks outside its window and the globals; -1 where fewer are
        left. Causal: drawn among the blocks before its window, so that a row depends on its
        own index only (the seeded uniforms of row I are the same for every nb), as decode
        needs. O(nb·random²) work and O(nb·random) memory."""
        key = ("random", nb, causal)
        if key in self._cache:
            return self._cache[key]
        i, r, h = torch.arange(nb), self.random, self.window_blocks // 2
        g = min(self.globals, nb)
        lo, hi = (i - h).clamp(min=g), (i + h).clamp(max=nb - 1)  # the window outside globals
        below = lo - g  # candidates below the window: g .. lo-1; the rest: hi+1 ..
        avail = torch.where(i < g, 0, below if causal else (nb - g) - (hi - lo + 1))
        u = torch.rand(nb, r, generator=torch.Generator().manual_seed(self.seed),
                       dtype=torch.float64)
        pos = torch.full((nb, r), -1, dtype=torch.long)  # positions among the candidates
        for t in range(r):  # sequential draw without replacement, every row at once
            left = avail - t
            p = (u[:, t] * left.clamp(min=1)).long().clamp(max=(left - 1).clamp(min=0))
            for taken in pos[:, :t].sort(1).values.unbind(1):  # skip the positions taken
                p = p + (p >= taken).long()
            pos[:, t] = torch.where(left > 0, p, -1)
        drawn = torch.where(pos < below[:, None], g + pos, hi[:, None] + 1 + pos - below[:, None])
        self._cache[key] = drawn.masked_fill_(pos < 0, -1)
        return self._cache[key]

    def _fit_reasons(self, n: int) -> list[str]:
        need = self.globals + self.window_blocks + self.random
        if self._nb(n) < need:
            return [f"bigbird: n={n} is {self._nb(n)} blocks of {self.block}; the pattern "
                    f"needs >= globals + window_blocks + random = {need} blocks"]
        return []
