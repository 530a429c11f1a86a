"""What the block-sparse patterns share: closed-form counts of bands and global blocks per query
block (for their `row_counts`) and the check of their integer fields."""

from __future__ import annotations

import torch


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


def _band_keys(pos: torch.Tensor, n: int, window: int, first: int,
               causal: bool) -> torch.Tensor:
    """Per query position: how many keys j in [0, n) have |pos − j| ≤ window or j < first
    (causal: j ≤ pos), in closed form."""
    lo = (pos - window).clamp(min=0)
    hi = pos if causal else (pos + window).clamp(max=n - 1)
    f = min(first, n)
    keys = hi - lo + 1 + lo.clamp(max=f)  # the band, and the first keys below it
    return keys if causal else keys + (f - 1 - hi).clamp(min=0)  # and those above it


def _positive(obj, *fields: str, allow_zero: tuple[str, ...] = ()) -> None:
    for f in fields:
        value, low = getattr(obj, f), 0 if f in allow_zero else 1
        if value < low:
            raise ValueError(f"{f}={value}: must be >= {low}")
