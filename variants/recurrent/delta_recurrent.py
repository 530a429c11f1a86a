"""The delta rule's per-step form (the rule: `attnbench.variants.recurrent.delta`): the decode
step and the ``impl=recurrent`` benchmark form, never the prefill path (the float64 reference is
`delta_naive.naive_delta`, the same steps)."""

from __future__ import annotations

import torch


def recurrent_delta(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None = None,
    chunk: int = 0,
    final: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The per-step recurrence, same arguments as `delta_chunk.chunk_delta` (`chunk` unused);
    returns the outputs (None when q is None) and the final state. A loop over the N steps: the
    decode form and `impl=recurrent`."""
    b, hkv, n, d = k.shape
    s = k.new_zeros(b, hkv, d, v.shape[-1]) if state is None else state
    outs = []
    for t in range(n):
        kt = k[:, :, t, None, :]  # (B, Hkv, 1, D)
        if g is not None:
            s = s * g[:, :, t, None, None].exp()  # α_t S_{t−1}
        u = beta[:, :, t, None, None] * (v[:, :, t, None, :] - kt @ s)  # (B, Hkv, 1, Dv)
        s = s + kt.transpose(-1, -2) @ u  # (B, Hkv, D, 1) @ (B, Hkv, 1, Dv)
        if q is not None:
            outs.append(q[:, :, :, t] @ s)  # (B, Hkv, G, Dv)
    return (torch.stack(outs, 3) if q is not None else None), s  # (B, Hkv, G, N, Dv), state
