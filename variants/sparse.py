"""Block-sparse attention patterns, exact over their mask, cost ∝ the active blocks.

- ``strided``, ``fixed``: the factorised patterns of the Sparse Transformer (Child et al. 2019,
  https://arxiv.org/abs/1904.10509), at block granularity.
- ``bigbird``: sliding window + global + seeded random blocks (Zaheer et al. 2020,
  https://arxiv.org/abs/2007.14062).
- ``longformer``: token-level sliding window + global tokens (Beltagy et al. 2020,
  https://arxiv.org/abs/2004.05150).

All share the engine in `variants/blocksparse.py` (``impl=blocked``) or run the same mask through
FlexAttention (``impl=flex``). Defaults give a density near 6% at n = 8192 (see each class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from variants import register
from variants.blocksparse import BlockSparse


def _band(nb: int, causal: bool, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block I: the key blocks [lo, hi] of the band |I − J| ≤ width (causal: J ≤ I)."""
    i = torch.arange(nb)
    return (i - width).clamp(min=0), i if causal else (i + width).clamp(max=nb - 1)


def _congruent(c: torch.Tensor, s: int, a: torch.Tensor, z: torch.Tensor | int) -> torch.Tensor:
    """How many J in [a, z] have J ≡ c (mod s) (z ≥ a − 1)."""
    return torch.div(z - c, s, rounding_mode="floor") - torch.div(a - 1 - c, s,
                                                                    rounding_mode="floor")


def _band_and_globals(nb: int, causal: bool, width: int, g: int):
    """row_counts of |I − J| ≤ width, or I < g, or J < g (causal: J ≤ I)."""
    i = torch.arange(nb)
    lo, hi = _band(nb, causal, width)
    g = min(g, nb)
    counts = hi - lo + 1 + lo.clamp(max=g)  # the band, and the global blocks below it
    last = hi == nb - 1
    glob = i < g  # global rows see every block
    counts = torch.where(glob, i + 1 if causal else torch.full_like(i, nb), counts)
    return counts, last | (glob & (not causal))


def _positive(obj, *fields: str, allow_zero: tuple[str, ...] = ()) -> None:
    for f in fields:
        value, low = getattr(obj, f), 0 if f in allow_zero else 1
        if value < low:
            raise ValueError(f"{f}={value}: must be >= {low}")


@register
@dataclass
class Strided(BlockSparse):
    """Query block I sees key blocks with |I − J| ≤ window or (I − J) mod stride = 0.

    Child et al. tie the local width to the stride l; here they are separate fields so the
    density can be set (defaults at n=8192: 8 of 128 blocks per row, 6.25%).
    """

    name: ClassVar[str] = "strided"
    # Rows see nb/stride column blocks: n²/stride at fixed stride (n^1.5 with stride ∝ √n, as
    # in the paper), so the declared growth at fixed parameters is quadratic, with a 1/stride
    # constant.
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 1.0  # score tiles are chunked: memory is O(n) + O(1)
    block: int = 64
    window: int = 2
    stride: int = 32
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "stride", "window", allow_zero=("window",))

    @property
    def label(self) -> str:
        flex = ",flex" if self.impl == "flex" else ""
        return f"strided[b={self.block},w={self.window},s={self.stride}{flex}]"

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        rel = i - j
        return (rel.abs() <= self.window) | (rel % self.stride == 0)

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(nb)
        lo, hi = _band(nb, causal, self.window)
        top = i if causal else nb - 1
        # the band, plus the blocks J ≡ I (mod stride) in [0, top] outside it
        counts = hi - lo + 1 + _congruent(i, self.stride, 0, top) - _congruent(
            i, self.stride, lo, hi)
        last = (hi == nb - 1) | (((nb - 1 - i) % self.stride == 0) & (not causal))
        return counts, last


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

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s, c = self.stride, self.summary
        i = torch.arange(nb)
        lo = i // s * s  # the query block's chunk is [lo, hi]
        hi = i if causal else (lo + s - 1).clamp(max=nb - 1)
        top = i if causal else torch.full_like(i, nb - 1)

        def summaries(z: torch.Tensor) -> torch.Tensor:  # summary blocks in [0, z], z ≥ -1
            return (z + 1) // s * c + ((z + 1) % s - (s - c)).clamp(min=0)

        counts = hi - lo + 1 + summaries(top) - summaries(hi) + summaries(lo - 1)
        last = (hi == nb - 1) | (((nb - 1) % s >= s - c) & (not causal))
        return counts, last


@register
@dataclass
class BigBird(BlockSparse):
    """BigBird-ITC: `window` sliding blocks (odd, centred), the first `globals` blocks attend to
    and are attended by everything, `random` blocks per row drawn (seeded, without replacement)
    outside the others (causal: among the earlier blocks). The draw is part of the pattern
    and costs O(nb·random), so density and FLOPs count it exactly before any layout exists.
    Defaults at n=8192: 7.7% density."""

    name: ClassVar[str] = "bigbird"
    block: int = 64
    window: int = 3
    globals: int = 2
    random: int = 3
    seed: int = 0
    impl: str = "blocked"

    def _check_params(self) -> None:
        _positive(self, "window", "globals", "random", allow_zero=("globals", "random"))
        if self.window % 2 == 0:
            raise ValueError(f"window={self.window}: must be odd (blocks centred on the query)")

    @property
    def label(self) -> str:
        return self._label({  # a non-default seed is appended
            "block": f"b={self.block}", "window": f"w={self.window}",
            "globals": f"g={self.globals}", "random": f"r={self.random}",
            "impl": "flex" if self.impl == "flex" else None,
        })

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        g = self.globals
        fixed = ((i - j).abs() <= self.window // 2) | (i < g) | (j < g)
        drawn = self._random(nb, causal)[i]  # (..., random)
        return fixed | (drawn == j.unsqueeze(-1)).any(-1)

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        counts, last = _band_and_globals(nb, causal, self.window // 2, self.globals)
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
        i, r, h = torch.arange(nb), self.random, self.window // 2
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
        need = self.globals + self.window + self.random
        if self._nb(n) < need:
            return [f"bigbird: n={n} is {self._nb(n)} blocks of {self.block}; the pattern "
                    f"needs >= globals + window + random = {need} blocks"]
        return []


@register
@dataclass
class Longformer(BlockSparse):
    """Token i sees j with |i − j| ≤ window, and the first `global_tokens` tokens see and are
    seen by all. Computed in blocks of `block`; defaults at n=8192: 5.4% density."""

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
