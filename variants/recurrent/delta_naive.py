"""The float64 form of the delta rule S_t = α_t S_{t−1} + β_t k_tᵀ (v_t − α_t k_t S_{t−1}),
o_t = q_t S_t, step by step (what `DeltaRule.reference` checks the chunked and per-step forms
against; the rule: `attnbench.variants.recurrent.delta`)."""

from __future__ import annotations

import torch


def naive_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None = None,
    at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 step by step over the T steps of k (B, Hkv, T, D), v, β (B, Hkv, T) and log α
    (B, Hkv, T) or None, continuing from `state` (B, Hkv, D, Dv) (None: zero);
    q (B, Hkv, G, R, D) the rows read, row r after step at[r] (default: the last R steps).
    Returns the rows' outputs (B, Hkv, G, R, Dv) and the state after step T − 1.

    As `decay_naive.naive_decay`, the outputs go into one buffer: nothing small allocated in a
    step outlives it, so a long recurrence does not fragment the heap."""
    b, hkv, t_len, d = k.shape
    r = q.shape[3]
    at = torch.arange(t_len - r, t_len) if at is None else at.cpu()
    reads = sorted(zip(at.tolist(), range(r), strict=True))  # (step, row), by step
    s = k.new_zeros(b, hkv, d, v.shape[-1]) if state is None else state
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (B, Hkv, G, R, Dv)
    i = 0
    for t in range(t_len):
        kt = k[:, :, t, None, :]  # (B, Hkv, 1, D)
        if g is not None:
            s = s * g[:, :, t, None, None].exp()  # α_t S_{t−1}
        u = beta[:, :, t, None, None] * (v[:, :, t, None, :] - kt @ s)  # (B, Hkv, 1, Dv)
        s = s + kt.transpose(-1, -2) @ u  # (B, Hkv, D, 1) @ (B, Hkv, 1, Dv)
        while i < len(reads) and reads[i][0] == t:
            j = reads[i][1]
            out[:, :, :, j] = q[:, :, :, j] @ s  # (B, Hkv, G, Dv)
            i += 1
    return out, s
