"""The float64 form of the selected-block engine's attention: dense softmax under a mask, the
definition MoBA's and NSA's `reference` compare the engine against."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sees: Callable[[int, int], torch.Tensor],
    dtype: torch.dtype,
    chunk: int = 256,
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V densely in `dtype`, each query row restricted to the keys
    ``sees(r0, r1)`` allows ((B, H or 1, r1 − r0, N) bool for query rows r0..r1−1), in chunks
    of query rows; a row that sees no key is zero. q (B, H, Nq, D), k, v (B, Hkv, N, D)."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    k, v = (x.repeat_interleave(h // hkv, dim=1).to(dtype) for x in (k, v))
    outs = []
    for r0 in range(0, q.shape[2], chunk):
        r1 = min(q.shape[2], r0 + chunk)
        sc = q[:, :, r0:r1].to(dtype) @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, r, N)
        sc = sc.masked_fill(~sees(r0, r1), -math.inf)
        outs.append(torch.softmax(sc, -1).nan_to_num(0.0) @ v)
    return torch.cat(outs, 2)
