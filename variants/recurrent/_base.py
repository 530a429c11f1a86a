"""What every linear RNN of the recurrent family shares: the contract's class data, the `chunk`
and `impl` fields, their checks and the label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnbench.variants import reference as _reference
from attnbench.variants.base import Shape, Variant

IMPLS = ("chunk", "recurrent", "fla")


@dataclass
class Recurrent(Variant):
    """Base of the recurrent family. Args: chunk (chunk length of the chunked form), impl
    (chunk: the chunked parallel form | recurrent: the per-step form | fla: the
    flash-linear-attention kernel, CUDA only)."""

    family: ClassVar[str] = "recurrent"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    decode_time_exponent: ClassVar[float] = 0.0  # a fixed-size state per step
    decode_memory_exponent: ClassVar[float] = 0.0
    exact: ClassVar[bool] = False  # replaces softmax: its error is against its own recurrence
    no_noncausal: ClassVar[str] = "a recurrence runs forward in time"
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True
    ops_grow_with_n: ClassVar[bool] = True  # the state is passed chunk by chunk (n/chunk steps)
    rewrites_state: ClassVar[bool] = True  # a decode step reads its state and writes it anew

    chunk: int = 64
    impl: str = "chunk"

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError(f"chunk={self.chunk}: must be positive")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: expected one of {', '.join(IMPLS)}")

    @property
    def label(self) -> str:
        return self._label({"impl": None if self.impl == "chunk" else self.impl})

    def decode_kernel(self, shape: Shape, device) -> str:
        """A step runs the per-step form on the state (whatever the prefill's `impl`)."""
        return "recurrent:step"

    def _saved_states(self, shape, el: int, heads: int) -> int:
        """Bytes autograd keeps through the per-step form (impl=recurrent): a (Dk, Dv) state of
        `heads` heads per position, 1.25× for what each step saves beside it; 0 for the other
        forms, whose chunk states are in their forward model."""
        if self.impl != "recurrent":
            return 0
        d = shape.head_dim
        return int(1.25 * shape.batch * heads * shape.seq_len * d * d * el)

    # -- definition -----------------------------------------------------------------------------
    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The float64 recurrence step by step (`reference_tile`: the family's naive form) over
        the positions up to the last of `rows` (query rows 0..Nq−1; None: all), in stretches of
        time whose float64 copies stay under `reference.REFERENCE_BYTES`, the state carried
        from one to the next: only the requested rows' outputs are kept, (B, H, R, Dv)."""
        b, h, nq, dk = q.shape
        nk, dv = k.shape[-2], v.shape[-1]
        rows = torch.arange(nq) if rows is None else rows.cpu()
        pos = rows + (nk - nq)  # the rows' positions in the sequence
        out = q.new_zeros(b, h, len(rows), dv, dtype=torch.float64)  # (B, H, R, Dv)
        # float64 per step of a stretch: k, v and their prepared forms per query head, gates
        step_bytes = 8 * 8 * b * h * (dk + dv + 1)
        tile = max(1, _reference.REFERENCE_BYTES // step_bytes)
        state = None
        for t0 in range(0, int(pos.max()) + 1 if len(pos) else 0, tile):
            t1 = min(t0 + tile, int(pos.max()) + 1)
            j = ((pos >= t0) & (pos < t1)).nonzero()[:, 0]  # rows read in this stretch
            jd = j.to(q.device)
            o, state = self.reference_tile(q[:, :, rows[j].to(q.device)], k[:, :, t0:t1],
                                           v[:, :, t0:t1], state, pos[j] - t0)
            out[:, :, jd] = o
        return out

    def reference_tile(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any, at: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """A stretch of the float64 recurrence: k, v (B, Hkv, T, D) its steps, continuing from
        `state` (None: zero); q (B, H, R, Dk) the rows read, row r after step at[r] (a CPU
        index into the stretch). Returns their outputs (B, H, R, Dv) and the state after it."""
        raise NotImplementedError
