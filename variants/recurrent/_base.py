"""What every linear RNN of the recurrent family shares: the contract's class data, the `chunk`
and `impl` fields, their checks and the label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnbench.variants.base import Variant

IMPLS = ("chunk", "recurrent", "fla")


@dataclass
class Recurrent(Variant):
    """Base of the recurrent family. Args: chunk (chunk length of the chunked form), impl
    (chunk: the chunked parallel form | recurrent: the per-step form | fla: the
    flash-linear-attention kernel, CUDA only)."""

    family: ClassVar[str] = "recurrent"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False  # replaces softmax: its error is against its own recurrence
    no_noncausal: ClassVar[str] = "a recurrence runs forward in time"
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True
    ops_grow_with_n: ClassVar[bool] = True  # the state is passed chunk by chunk (n/chunk steps)

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
