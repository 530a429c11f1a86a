"""RetNet retention (Sun et al. 2023, https://arxiv.org/abs/2307.08621), the recurrent kernel only.

S_t = γ_h S_{t−1} + k_tᵀ v_t / √d, o_t = q_t S_t, i.e. o_t = Σ_{s≤t} γ_h^{t−s} (q_t·k_s/√d) v_s
(the parallel form (QKᵀ/√d ⊙ D)V, D_ts = γ^{t−s}), with the paper's fixed decay per head
γ_h = 1 − 2^{−5−h}, h = 0…H−1 (h the query head). Left out, as the benchmark's inputs are raw q, k:
the xPos rotation of q and k, the score normalisations of Sec. 2.2 beyond 1/√d, and GroupNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.recurrent.decay import DecayRNN, fla_kwargs
from attnbench.variants.registry import register


@register
@dataclass
class RetNet(DecayRNN):
    """Retention with fixed per-head decays. Args: chunk, impl (chunk | recurrent | fla)."""

    name: ClassVar[str] = "retnet"
    fla_op: ClassVar[str] = "chunk_retention"
    intra: ClassVar[str] = "fixed-decay"

    def gammas(self, heads: int, device, dtype: torch.dtype) -> torch.Tensor:
        """γ_h = 1 − 2^(−5−h), (H,)."""
        h = torch.arange(heads, device=device, dtype=torch.float64)
        return (1 - 2.0 ** (-5 - h)).to(dtype)

    def prepare(self, k: torch.Tensor) -> torch.Tensor:
        return k * k.shape[-1] ** -0.5

    def gates(self, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, None]:
        b, _, n, _ = k.shape
        log_g = self.gammas(heads, k.device, torch.float64).log().to(k.dtype)
        return log_g.view(1, heads, 1, 1).expand(b, heads, n, 1), None  # (B, H, N, 1)

    def fla_call(self, q, k, v, log_a, gain, state):
        from fla.ops.retention import chunk_retention

        # k arrives scaled by 1/√d already; fla applies `scale` to q·k, so 1 here. fla's
        # decays are the same formula, 1 − 2^(−5−h).
        return chunk_retention(q, k, v, scale=1.0, initial_state=state,
                               output_final_state=False, **fla_kwargs(chunk_retention))

