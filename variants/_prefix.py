"""Normalised linear attention φ(Q)φ(K)ᵀV shared by the linear-family variants.

Causal form by chunked prefix sums: inside a chunk of L positions the masked quadratic form;
across chunks the running state S = Σ φ(k)ᵀ[v, 1] (F × (D+1) per batch-head) of all earlier
chunks. The per-chunk states are formed in one batched matmul and prefix-summed over chunks,
so memory is O(n·L + n/L·F·D): one state per chunk, never one per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (features, prefix sums and the pseudo-inverse need the range)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def linear_attention(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    chunk: int,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    """out_i = Σ_j φq_i·φk_j v_j / (Σ_j φq_i·φk_j + eps), j over all keys (or j <= i if causal).

    Args:
        qf, kf: (B, H, N, F) non-negative features; v: (B, H, N, D).
        chunk: chunk length L of the causal path.
        eps: a float, or a (B, H, N, 1) tensor: one per query row.
    Returns:
        (B, H, N, D).
    """
    if not causal:
        num = qf @ (kf.transpose(-2, -1) @ v)  # (B, H, N, F) @ (B, H, F, D)
        den = qf @ kf.sum(-2).unsqueeze(-1)  # (B, H, N, 1)
        return num / den.add_(eps)
    d = v.shape[-1]
    v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, N, D+1): the ones column carries the normaliser
    num = _causal(qf, kf, v1, chunk)
    return num[..., :d] / (num[..., d:] + eps)


def _causal(qf: torch.Tensor, kf: torch.Tensor, v1: torch.Tensor, chunk: int) -> torch.Tensor:
    b, h, n, f = qf.shape
    e = v1.shape[-1]
    L = min(chunk, n)
    pad = -n % L  # zero rows: padded keys add nothing, padded queries are dropped
    if pad:
        qf, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v1))
    c = (n + pad) // L
    qc = qf.reshape(b, h, c, L, f)  # (B, H, C, L, F)
    kc = kf.reshape(b, h, c, L, f)
    vc = v1.reshape(b, h, c, L, e)  # (B, H, C, L, D+1)
    scores = (qc @ kc.transpose(-2, -1)).tril_()  # (B, H, C, L, L), masked within the chunk
    out = scores @ vc  # (B, H, C, L, D+1)
    if c > 1:
        states = kc[:, :, :-1].transpose(-2, -1) @ vc[:, :, :-1]  # (B, H, C-1, F, D+1)
        prev = states.cumsum_(2)  # state after chunks 0..c-1, for chunks 1..C-1
        out[:, :, 1:] += qc[:, :, 1:] @ prev  # carried state from earlier chunks
    return out.reshape(b, h, c * L, e)[:, :, :n]


def linear_flops(bh: int, n: int, f: int, d: int, causal: bool, chunk: int) -> float:
    """Matmul FLOPs of `linear_attention` (features excluded; multiply-add = 2)."""
    e = d + 1
    if not causal:
        return 2.0 * bh * (2 * n * f * d + n * f)  # state, queries against it, normaliser
    L = min(chunk, n)
    c = -(-n // L)
    intra = 2 * c * L * L * (f + e)  # masked scores and their product with [v, 1]
    inter = 4 * (c - 1) * L * f * e  # chunk states, and queries against the carried state
    return float(bh * (intra + inter))


def linear_memory(bh: int, n: int, f: int, d: int, causal: bool, chunk: int, el: int) -> int:
    """Upper estimate of the bytes `linear_attention` allocates at `el` bytes per element."""
    e = d + 1
    words = n * e + n * e + n * d  # v1 (or normaliser), numerator, output
    if causal:
        L = min(chunk, n)
        c = -(-n // L)
        words += 3 * c * L * (f + e)  # padded copies
        words += c * L * L + c * L * e + 2 * c * f * e  # scores, carried part, states
    else:
        words += f * e
    return bh * words * el
