"""The per-step form of the decay-gated recurrence S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t,
o_t = q_t S_t (decode, ``impl=recurrent`` and the slow comparison path; see
`attnbench.variants.recurrent.decay`): one loop iteration per position, batched over batch and
heads, grouped query heads folded into the rows as in the chunked form."""

from __future__ import annotations

import torch


def recurrent_decay(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    gain: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step form (one loop iteration per position); arguments and results as
    `decay_chunk.chunk_decay` (q None: no outputs, the state only)."""
    b, hkv, n, dk = k.shape
    h, dv, ha = hkv if q is None else q.shape[1], v.shape[-1], log_a.shape[1]
    g, ga = h // hkv, ha // hkv
    # the state (B, Hkv, Ga, Dk, Dv): a decay per query head (Ga = G) or per k/v head (Ga = 1)
    s = k.new_zeros(b, hkv, ga, dk, dv) if state is None else state.view(b, hkv, ga, dk, dv)
    qg = None if q is None else q.view(b, hkv, g, n, dk)  # (B, Hkv, G, N, Dk)
    a = log_a.exp().view(b, hkv, ga, n, -1, 1)  # (B, Hkv, Ga, N, Dd, 1)
    # (B, Hkv, 1 or Ga, N, Dk): the gain (B, Ha, N) as (B, Hkv, Ga, N, 1)
    kg = k.unsqueeze(2) if gain is None else k.unsqueeze(2) * gain.view(b, hkv, ga, n, 1)
    outs = []
    for t in range(n):
        # outer product as a K=1 matmul: k_tᵀ v_t, (B, Hkv, Ga, Dk, 1) @ (B, Hkv, 1, 1, Dv)
        s = a[:, :, :, t] * s + kg[:, :, :, t, :, None] @ v[:, :, None, t, None, :]
        if qg is not None:
            outs.append(_read(qg[:, :, :, t, None, :], s))  # (B, Hkv, G, 1, Dv)
    out = torch.cat(outs, dim=3).reshape(b, h, n, dv) if outs else None  # (B, H, N, Dv)
    return out, s.reshape(b, ha, dk, dv)  # state (B, Ha, Dk, Dv)


def _read(qx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """qx (B, Hkv, G, L, Dk) against states (B, Hkv, Ga, Dk, Dv), Ga ∈ {1, G}."""
    if s.shape[-3] == 1 and qx.shape[-3] > 1:  # one state per k/v head: fold G into rows
        return torch.einsum("...gld,...de->...gle", qx, s.squeeze(-3))  # s: (.., Dk, Dv)
    return qx @ s
