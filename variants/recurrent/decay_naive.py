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
    (B, H, Dk, Dv) to continue from (None: zero). Returns the rows' outputs
    (B, H, R, Dv) and the state after step T − 1.

    The outputs are written into one buffer, so nothing small allocated in a step outlives it:
    a per-step list of small outputs between freed state-sized temporaries fragments the heap,
    ~a state's bytes of resident memory per step. Out of place, so it stays differentiable."""
    h, r, t_len = q.shape[1], q.shape[-2], k.shape[-2]
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if log_a.shape[1] != h:
        log_a = log_a.repeat_interleave(rep, 1)
        gain = None if gain is None else gain.repeat_interleave(rep, 1)
    at = torch.arange(t_len - r, t_len) if at is None else at.cpu()
    reads = sorted(zip(at.tolist(), range(r), strict=True))  # (step, row), by step
    s = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (B, H, R, Dv)
    i = 0
    for t in range(t_len):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, Dk, Dv)
        if gain is not None:
            kv = kv * gain[:, :, t, None, None]
        s = log_a[:, :, t, :, None].exp() * s + kv
        while i < len(reads) and reads[i][0] == t:
            j = reads[i][1]
            out[:, :, j] = (q[:, :, j, None, :] @ s)[:, :, 0]
            i += 1
    return out, s
