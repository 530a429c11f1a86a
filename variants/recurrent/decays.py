"""Sums of log-decays inside a chunk, shared by the decay-gated and the delta-rule engines.

Every exponent the chunked forms take is a sum of same-sign log-decays over a segment, formed
as such a sum, never as a difference of two cumulative sums: cum_t − cum_s keeps the rounding
error of cum_t (ε·|cum_t|, large after a strong decay) while the true segment may be small, so
the decays of the mild segments after a strong one lose their precision (measured: Gated
DeltaNet in float32 with keys ×20, 3.8e-5 against 2.5e-7 for the segment-sum form).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) → (..., L, L): Σ_{s<u≤t} x_u for t ≥ s, −inf above the diagonal (exact segment
    sums, as SSD's reference `segsum`)."""
    L = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, L)  # (..., L(t), L(s)) = x_t
    keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # s ≤ t
    seg = xx.masked_fill(~keep.tril(-1), 0).cumsum(-2)  # x_t summed over s < t ≤ row
    return seg.masked_fill(~keep, -math.inf)


def suffix_sums(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Σ_{u>s} x_u along `dim` (exclusive, to the end): a sum of its own terms, not total − cum."""
    x = x.movedim(dim, -1)
    after = F.pad(x[..., 1:], (0, 1))  # x_{s+1}, 0 past the end
    return after.flip(-1).cumsum(-1).flip(-1).movedim(-1, dim)
