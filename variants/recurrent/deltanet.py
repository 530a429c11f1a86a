"""DeltaNet (Schlag et al. 2021, https://arxiv.org/abs/2102.11174), chunked with the WY/UT
representation (Yang et al. 2024, https://arxiv.org/abs/2406.06484).

Per k/v head, S (d_k × d_v), o_t = q_t S_t: S_t = (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t, with
q_t, k_t L2-normalised and β_t = σ(k_t·w_β) from the raw k_t and a fixed projection w_β ~
N(0, 1/d) shared by the heads, drawn from `seed` (variants.recurrent.delta.gate_weights). The
contract is in `delta.py`, the engine in `delta_chunk.py` and `delta_recurrent.py`; this file
adds the name and the fla kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnbench.variants.recurrent.delta import DeltaRule
from attnbench.variants.registry import register


@register
@dataclass
class DeltaNet(DeltaRule):
    """The delta rule. Args: chunk (C), impl (chunk | recurrent | fla), seed (w_β)."""

    name: ClassVar[str] = "deltanet"
    fla_module: ClassVar[str] = "chunk_delta_rule"

    def fla_kernel(self, q, k, v, beta, g, **kw):
        from fla.ops.delta_rule import chunk_delta_rule

        return chunk_delta_rule(q=q, k=k, v=v, beta=beta, **kw)

