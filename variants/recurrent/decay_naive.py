"""The float64 form of the decay-gated recurrence S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t,
o_t = q_t S_t: step by step, heads repeated (what `DecayRNN.reference` checks the chunked and
per-step forms against; see `attnbench.variants.recurrent.decay`)."""

from __future__ import annotations

import torch


def naive_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 step by step: S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t, o_t = q_t S_t, heads
    repeated for grouped queries, the first Nk − Nq steps without outputs. Shapes as
    `decay_chunk.chunk_decay` (q (B, H, Nq, Dk), the keys Nk ≥ Nq); returns (B, H, Nq, Dv)."""
    h, nq, nk = q.shape[1], q.shape[-2], k.shape[-2]
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if log_a.shape[1] != h:
        log_a = log_a.repeat_interleave(rep, 1)
        gain = None if gain is None else gain.repeat_interleave(rep, 1)
    s = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1])  # (B, H, Dk, Dv)
    out = []
    for t in range(nk):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        if gain is not None:
            kv = kv * gain[:, :, t, None, None]
        s = log_a[:, :, t, :, None].exp() * s + kv
        if t >= nk - nq:
            out.append((q[:, :, t - (nk - nq), None, :] @ s)[:, :, 0])
    return torch.stack(out, dim=2)
