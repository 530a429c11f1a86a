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
    state: torch.Tensor | None = None,
    at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 step by step: S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t, o_t = q_t S_t, heads
    repeated for grouped queries. k, v (B, Hkv, T, D) and the gates as `decay_chunk.chunk_decay`;
    q (B, H, R, Dk) the rows read, row r after step at[r] (default: the last R steps); `state`
    (B, H, Dk, Dv) to continue from (None: zero; updated in place). Returns the rows' outputs
    (B, H, R, Dv) and the state after step T − 1.

    Nothing allocated in one step outlives it (the state is updated in place, the outputs
    written into one buffer): a per-step list of small outputs between freed state-sized
    temporaries fragments the heap, ~a state's bytes of resident memory per step."""
    h, r, t_len = q.shape[1], q.shape[-2], k.shape[-2]
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if log_a.shape[1] != h:
        log_a = log_a.repeat_interleave(rep, 1)
        gain = None if gain is None else gain.repeat_interleave(rep, 1)
    at = torch.arange(t_len - r, t_len) if at is None else at.cpu()
    reads = sorted(zip(at.tolist(), range(r), strict=True))  # (step, row), by step
    s = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
    kv = torch.empty_like(s)  # (B, H, Dk, Dv)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (B, H, R, Dv)
    i = 0
    for t in range(t_len):
        torch.mul(k[:, :, t, :, None], v[:, :, t, None, :], out=kv)
        if gain is not None:
            kv.mul_(gain[:, :, t, None, None])
        s.mul_(log_a[:, :, t, :, None].exp()).add_(kv)
        while i < len(reads) and reads[i][0] == t:
            j = reads[i][1]
            out[:, :, j] = (q[:, :, j, None, :] @ s)[:, :, 0]
            i += 1
    return out, s
