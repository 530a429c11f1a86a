"""Gated DeltaNet (Yang et al. 2025, https://arxiv.org/abs/2412.06464), chunked with the WY/UT
representation and the cumulative log-decays folded in (§3).

Per k/v head, S (d_k × d_v), o_t = q_t S_t: S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,
q_t, k_t L2-normalised, from the raw k_t and fixed parameters shared by the heads, drawn from
`seed` (variants.recurrent.delta.gate_weights, the paper's / fla's initialisation):
    β_t = σ(k_t·w_β),   α_t = exp(−A · softplus(k_t·w_α + b)),
w ~ N(0, 1/d), A ~ U(0, 16), b = softplus⁻¹(dt), dt ~ logU(1e-3, 1e-1). The decay is kept in
log space: the exponents inside a chunk are segment sums of log α (`decays`), all <= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnbench.variants.recurrent.delta import DeltaRule
from attnbench.variants.registry import register


@register
@dataclass
class GatedDeltaNet(DeltaRule):
    """The gated delta rule. Args: chunk (C), impl (chunk | recurrent | fla), seed (gates)."""

    name: ClassVar[str] = "gated_deltanet"
    gated: ClassVar[bool] = True
    fla_module: ClassVar[str] = "chunk_gated_delta_rule"

    def fla_kernel(self, q, k, v, beta, g, **kw):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **kw)

