"""The float64 form of the selected-block engine's attention: dense softmax under a mask, the
definition MoBA's and NSA's `reference` compare the engine against."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnbench.variants import reference as _reference


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sees: Callable[[int, int, int, int], torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V densely in `dtype`, each query row restricted to the keys `sees` allows;
    a row that sees no key is zero. q (B, H, R, D) the query rows, k, v (B, Hkv, N, D);
    ``sees(b, j, r0, r1)``: (G or 1, r1 − r0, N) bool for batch b, k/v head j (query heads
    j·G … j·G + G − 1) and query rows r0..r1−1. One k/v head and a tile of rows at a time, so
    the float64 scores and casts stay under `reference.REFERENCE_BYTES`. Returns (B, H, R, D)."""
    b, h, r, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    # rows per tile: float64 scores, probabilities and masked copy, the mask and its per-slot
    # temporaries, for G heads (64 bytes per score covers them)
    step = max(1, _reference.REFERENCE_BYTES // (64 * g * max(n, 1)))
    batch = []
    for bi in range(b):
        heads = []
        for j in range(hkv):
            kk, vv = k[bi, j].to(dtype), v[bi, j].to(dtype)  # (N, D)
            tiles = []
            for r0 in range(0, r, step):
                r1 = min(r, r0 + step)
                sc = q[bi, j * g : (j + 1) * g, r0:r1].to(dtype) @ kk.T / math.sqrt(d)  # (G, r, N)
                sc = sc.masked_fill(~sees(bi, j, r0, r1), -math.inf)
                tiles.append(torch.softmax(sc, -1).nan_to_num(0.0) @ vv)  # (G, r, D)
            heads.append(torch.cat(tiles, 1) if tiles else q.new_zeros(g, 0, d, dtype=dtype))
        batch.append(torch.cat(heads))  # (H, R, D)
    return torch.stack(batch)
