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


def _rel(nb: int) -> torch.Tensor:
    return torch.arange(nb)[:, None] - torch.arange(nb)[None, :]  # (nb, nb): I − J


def _causal(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    return mask & (_rel(mask.shape[0]) >= 0) if causal else mask


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

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        rel = _rel(nb)
        return _causal((rel.abs() <= self.window) | (rel % self.stride == 0), causal)


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

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        same_chunk = (i // self.stride) == (j // self.stride)
        return _causal(same_chunk | (j % self.stride >= self.stride - self.summary), causal)


@register
@dataclass
class BigBird(BlockSparse):
    """BigBird-ITC: `window` sliding blocks (odd, centred), the first `globals` blocks attend to
    and are attended by everything, `random` blocks per row drawn (seeded) outside the others.
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

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        fixed = ((i - j).abs() <= self.window // 2) | (i < self.globals) | (j < self.globals)
        gen = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(nb, nb, generator=gen).masked_fill_(fixed, -1.0)
        top = draw.topk(min(self.random, nb), dim=1)
        rand = torch.zeros(nb, nb, dtype=torch.bool).scatter_(1, top.indices, top.values >= 0)
        return _causal(fixed | rand, causal)

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

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        m, g = -(-self.window // self.block), -(-self.global_tokens // self.block)
        return _causal(((i - j).abs() <= m) | (i < g) | (j < g), causal)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        g = self.global_tokens
        return ((q - k).abs() <= self.window) | (q < g) | (k < g)
