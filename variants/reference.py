"""Float64 reference attention, the golden answer every variant is checked against."""

from __future__ import annotations

import math

import torch

# The working set of one tile of a float64 reference (scores, casts, a stretch of a recurrence):
# references on long sequences walk over tiles instead of holding O(n) or O(n²) float64 at once.
REFERENCE_BYTES = 64 << 20


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
        q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with Hkv dividing H (grouped-query heads are
            repeated here: a reference may materialise) and Nq <= Nk. The queries are the last
            Nq positions: query i sits at position Nk − Nq + i.
        causal: a query at position p sees only keys j <= p.
        key_mask: optional (R, Nk) bool, True where a key may be seen (R = len(rows) or Nq).
        rows: optional 1-D index of the query rows (0..Nq−1) to compute.
    Returns:
        (B, H, R, D) in `dtype`. A row with no visible key is zero.
    """
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # (B, Hkv, N, D) → (B, H, N, D): head h reads k/v head h // groups
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    qq = q.to(dtype) if rows is None else q[..., rows, :].to(dtype)  # (B, H, R, D)
    idx = torch.arange(nq, device=q.device) if rows is None else rows.to(q.device)
    pos = idx + (nk - nq)  # absolute positions of the query rows
    scores = qq @ k.to(dtype).transpose(-2, -1) / math.sqrt(d)  # (B, H, R, Nk)
    allowed = torch.ones(len(idx), nk, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed &= key_mask.to(q.device)
    if causal:
        allowed &= torch.arange(nk, device=q.device)[None, :] <= pos[:, None]
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
