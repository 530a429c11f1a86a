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

from attnbench.variants.base import gpu_path


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


def decay_matrix_into(x: torch.Tensor, out: torch.Tensor,
                      tmp: torch.Tensor | None = None) -> torch.Tensor:
    """`decay_matrix` of float32 x (X, L) into out (X, L, L) (the CPU path, no autograd): the
    segment sums as differences of float64 cumulative sums, taken in float32 arithmetic:
    cum = hi + lo (hi its float32 rounding, |lo| <= ε32·|cum|), Σ_ts = (hi_t − hi_s) +
    (lo_t − lo_s). hi_t − hi_s is two float32 numbers' difference, rounded relative to itself;
    lo_t − lo_s (into `tmp`, same shape as out, or a fresh tensor) errs by ε32²·|cum|: Σ to
    2 ε32·|Σ|, as the float64 difference rounded to float32, whose rounding error is what rules
    out float32 cumulative sums (module docstring) and which a mixed-dtype subtraction over
    L×L gave 5x slower (2.7 against 14.9 ms, 1024 chunks of 64, 2 threads). The float64 sums
    err by ε64·1000 L at most (each log-decay clamped at −1000 first: e^−1000 is 0 in float64,
    so no entry changes), 7e-12 at L = 64."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return out.copy_(decay_matrix(x))  # float64 sums would lose float64's precision
    cum = x.double().clamp_min(-1000).cumsum(-1)  # (X, L)
    hi = cum.float()
    lo = (cum - hi.double()).float()
    low = torch.sub(lo[:, :, None], lo[:, None, :], out=tmp)  # the correction, exact enough
    torch.sub(hi[:, :, None], hi[:, None, :], out=out)  # Σ_{s<u≤t} for t ≥ s
    return out.add_(low).exp_().tril_()  # above the diagonal: e^(positive) then 0


def decay_matrix(x: torch.Tensor) -> torch.Tensor:
    """(..., L) log-decays → (..., L, L): e^(Σ_{s<u≤t} x_u) for s ≤ t, 0 above the diagonal.

    On the GPU path e^segsum (few launches). On the CPU a halving tree, no exponential or
    cumulative sum over L×L (3.4× faster than segsum at L = 64): at the level of blocks of s,
    the entries (t in the second half, s in the first) of each 2s-block are the outer product of
    e^(Σ from the boundary to t) and e^(Σ after s to the boundary); both sums grow by the other
    half's total (same-sign sums, as segsum's), exponentiated per position."""
    if gpu_path(x.device):
        return segsum(x).exp()
    *lead, L = x.shape
    size = 1 << (L - 1).bit_length()  # zero log-decays past the end change no entry below
    track = torch.is_grad_enabled() and x.requires_grad
    a = F.pad(x, (0, size - L)).reshape(-1, size).clone()  # Σ from the start of t's block to t
    e = torch.zeros_like(a)  # Σ after t to the end of its aligned block
    out = a.new_zeros(a.shape[0], size, size)
    out.diagonal(0, -2, -1).fill_(1)
    s = 1
    while s < size:
        nb = size // (2 * s)
        a4, e4 = a.view(-1, nb, 2, s), e.view(-1, nb, 2, s)
        blocks = out.view(-1, nb, 2, s, nb, 2, s).diagonal(0, 1, 4)[:, 1, :, 0]  # (X, s, s, nb)
        rows, cols = a4[:, :, 1].exp().transpose(1, 2), e4[:, :, 0].exp().transpose(1, 2)
        blocks.copy_(rows[:, :, None] * cols[:, None])
        tot = a4[:, :, :, s - 1:]  # (X, nb, 2, 1): each half's total
        if track:  # out of place (autograd)
            a, e = (torch.stack((a4[:, :, 0], a4[:, :, 1] + tot[:, :, 0]), 2).view(-1, size),
                    torch.stack((e4[:, :, 0] + tot[:, :, 1], e4[:, :, 1]), 2).view(-1, size))
        else:
            e4[:, :, 0] += tot[:, :, 1]
            a4[:, :, 1] += tot[:, :, 0]
        s *= 2
    return out[:, :L, :L].reshape(*lead, L, L)
