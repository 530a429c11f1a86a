"""Float64 reference attention, the golden answer every variant is checked against."""

from __future__ import annotations

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """softmax(Q Kᵀ/√d + mask) V computed densely in `dtype` (float64 by default).

    Args:
        q, k, v: (B, H, N, D).
        causal: query i sees only keys j <= i.
        key_mask: optional (R, N) bool, True where a key may be seen (R = len(rows) or N).
        rows: optional 1-D index of the query rows to compute (for sampled error at large N).
    Returns:
        (B, H, R, D) in `dtype`. A row with no visible key is zero.
    """
    n, d = k.shape[-2], q.shape[-1]
    qq = q.to(dtype) if rows is None else q[..., rows, :].to(dtype)  # (B, H, R, D)
    idx = torch.arange(n, device=q.device) if rows is None else rows.to(q.device)
    scores = qq @ k.to(dtype).transpose(-2, -1) / math.sqrt(d)  # (B, H, R, N)
    allowed = torch.ones(len(idx), n, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed &= key_mask.to(q.device)
    if causal:
        allowed &= torch.arange(n, device=q.device)[None, :] <= idx[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return p @ v.to(dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    norm = torch.linalg.vector_norm
    return float(norm(out - ref) / norm(ref).clamp_min(1e-300))


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max())
