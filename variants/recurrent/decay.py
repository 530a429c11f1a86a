"""Decay-gated linear recurrence S_t = Diag(a_t) S_{t−1} + g_t k_tᵀ v_t, o_t = q_t S_t: `DecayRNN`,
the variant base class of retnet, gla and mamba2, which differ only in their gates (`log_a`, and
Mamba2's input gain g_t = Δ_t).

Its forms, one file each: `decay_chunk.chunk_decay` the chunked parallel form (prefill,
training), `decay_recurrent.recurrent_decay` the per-step form (decode, and the slow comparison
path), `decay_naive.naive_decay` the float64 step-by-step reference.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnbench.variants.base import Shape, gpu_path
from attnbench.variants.base import compute_dtype as _half_to_float
from attnbench.variants.recurrent._base import Recurrent
from attnbench.variants.recurrent.decay_chunk import (
    chunk_decay,
    chunk_length,
    chunk_state,
    decay_algorithm_flops,
    decay_flops,
    decay_memory,
)
from attnbench.variants.recurrent.decay_naive import naive_decay
from attnbench.variants.recurrent.decay_recurrent import recurrent_decay
from attnbench.variants.recurrent.segments import segment_span


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one switch for the family's arithmetic: float32 for half inputs (CPU has no fast
    half matmuls; on CUDA the goal is half matmuls with float32 accumulation, not done yet)."""
    return _half_to_float(dtype)


@dataclass
class DecayRNN(Recurrent):
    """Base of the decay-gated linear RNNs. Subclasses define `gates` (and `fla_call`).

    Args: chunk (chunk length L), impl (chunk | recurrent | fla).
    """

    per_dim: ClassVar[bool] = False  # decays per key dimension (gla) or a scalar per head
    per_query_head: ClassVar[bool] = True  # decays per query head, or per k/v head
    fla_op: ClassVar[str] = ""  # the flash-linear-attention op of the `fla` impl
    input_gain: ClassVar[bool] = False  # a gain g_t on k_tᵀv_t (mamba2's Δ_t)
    intra: ClassVar[str] = "tree-scale"  # how the chunked form decays its intra-chunk scores
    # (tree-scale: the scores scaled by the halving tree; the GPU path: by e^segsum)

    def gates(self, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log a (B, Ha, N, Dd) and the input gain (B, Ha, N) or None, from k (B, Hkv, N, D)
        in k's dtype; `heads` is H (Ha is H or Hkv)."""
        raise NotImplementedError

    def prepare(self, k: torch.Tensor) -> torch.Tensor:
        """k as the recurrence uses it (retnet: scaled by 1/√d)."""
        return k

    # -- forms ----------------------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{self.name} is causal only: {self.no_noncausal}")
        h, nq, pre = q.shape[1], q.shape[-2], k.shape[-2] - q.shape[-2]
        ct = compute_dtype(q.dtype)
        if self.impl == "chunk":  # segment by segment, the gates too (`segments`)
            span = self._span(q.shape[0], h, max(nq, pre), q.shape[-1], q.device)
            state = self._states(k[..., :pre, :], v[..., :pre, :], h, span)
            out = None if nq <= span else q.new_empty(*q.shape[:-1], v.shape[-1])
            for lo in range(0, nq, span):
                kc, vc, log_a, gain = self._inputs(k[..., pre + lo:pre + lo + span, :],
                                                   v[..., pre + lo:pre + lo + span, :], h)
                part, state = chunk_decay(q[..., lo:lo + span, :].to(ct), kc, vc, log_a,
                                          self.chunk, gain, state)
                if out is None:
                    return part.to(q.dtype)
                out[..., lo:lo + span, :] = part  # written as it comes: no list of parts kept
            return out
        qc, (kc, vc, log_a, gain) = q.to(ct), self._inputs(k, v, h)
        if self.impl == "recurrent":
            state = None
            if pre:
                _, state = recurrent_decay(None, kc[..., :pre, :], vc[..., :pre, :],
                                           log_a[..., :pre, :], _head(gain, pre))
            out, _ = recurrent_decay(qc, kc[..., pre:, :], vc[..., pre:, :],
                                     log_a[..., pre:, :], _tail(gain, pre), state)
            return out.to(q.dtype)
        state = None
        if pre:  # the queries are the last nq positions: the context only builds the state
            state = chunk_state(kc[..., :pre, :], vc[..., :pre, :], log_a[..., :pre, :],
                                self.chunk, _head(gain, pre))
        return self._fla(qc, kc[..., pre:, :], vc[..., pre:, :], log_a[..., pre:, :],
                         _tail(gain, pre), state).to(q.dtype)

    def _inputs(self, k: torch.Tensor, v: torch.Tensor, heads: int):
        """k (prepared) and v in the compute dtype, log a and the gain, for these positions."""
        ct = compute_dtype(k.dtype)
        kc = self.prepare(k.to(ct))
        return kc, v.to(ct), *self.gates(kc, heads)

    def _span(self, b: int, h: int, n: int, d: int, device) -> int:
        """Positions per segment of the chunked form (a multiple of the chunk length)."""
        L = chunk_length(self.chunk, self.chunk)
        return segment_span(n, L, b * h * max(L, d), device)

    def _states(self, k: torch.Tensor, v: torch.Tensor, heads: int, span: int):
        """The state after k, v by the chunked form, segment by segment (None: no positions)."""
        state = None
        for lo in range(0, k.shape[-2], span):
            kc, vc, log_a, gain = self._inputs(k[..., lo:lo + span, :], v[..., lo:lo + span, :],
                                               heads)
            state = chunk_state(kc, vc, log_a, self.chunk, gain, state)
        return state

    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> torch.Tensor:
        """The state (B, Ha, Dk, Dv) after the context, by the chunked form (compute dtype).
        `heads`: the query heads H, needed only where decays differ per query head and
        kv_heads < heads (k alone does not tell H); default k's heads."""
        h = heads or k.shape[1]
        state = self._states(k, v, h, self._span(k.shape[0], h, k.shape[-2], k.shape[-1],
                                                 k.device))
        if state is None:  # no context: the zero state
            ha = h if self.per_query_head else k.shape[1]
            state = k.new_zeros(k.shape[0], ha, k.shape[-1], v.shape[-1],
                                dtype=compute_dtype(k.dtype))
        return state

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, Any]:
        ct = compute_dtype(q.dtype)
        kc = self.prepare(k.to(ct))
        log_a, gain = self.gates(kc, q.shape[1])
        if state.shape[1] != log_a.shape[1]:
            raise ValueError(f"{self.name}: state has {state.shape[1]} heads, the decays "
                             f"{log_a.shape[1]}: pass heads={q.shape[1]} to decode_init")
        out, state = recurrent_decay(q.to(ct), kc, v.to(ct), log_a, gain, state)
        return out.to(q.dtype), state

    # -- definition -----------------------------------------------------------------------------
    def reference_tile(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any, at: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """Float64 step by step (`decay_naive.naive_decay`): S_t = Diag(a_t) S_{t−1} +
        g_t k_tᵀ v_t, o_t = q_t S_t, heads repeated for grouped queries, over one stretch of
        `Recurrent.reference`."""
        q, k, v = q.double(), self.prepare(k.double()), v.double()
        log_a, gain = self.gates(k, q.shape[1])
        return naive_decay(q, k, v, log_a, gain, state, at)

    # -- what it supports, costs ----------------------------------------------------------------
    def not_supported_reasons(self, shape, dtype, device, causal, mode="fwd") -> list[str]:
        reasons = super().not_supported_reasons(shape, dtype, device, causal, mode)
        if self.impl == "fla":
            if torch.device(device).type != "cuda":
                reasons.append(f"{self.name}[fla]: flash-linear-attention runs on CUDA only")
            if importlib.util.find_spec("fla") is None:
                reasons.append(f"{self.name}[fla]: flash-linear-attention (fla) not installed")
        return reasons

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        if self.impl == "chunk":
            L = chunk_length(self.chunk, shape.nq)
            intra = "segsum" if self.intra == "tree-scale" and gpu_path(device) else self.intra
            return f"chunk:{intra}[L={L}]"
        return f"fla:{self.fla_op}" if self.impl == "fla" else "recurrent"

    def density(self, n: int, causal: bool = False) -> float | None:
        return None

    def _ha(self, shape: Shape) -> int:
        return shape.heads if self.per_query_head else shape.hkv

    def gate_flops(self, shape: Shape) -> float:
        """Matmul FLOPs of the gates (their projection has no gradient: backward counts 1×)."""
        return 0.0

    def flops(self, shape: Shape, causal: bool = False) -> float:
        gates = self.gate_flops(shape)
        if self.impl == "recurrent":
            d, upd = shape.head_dim, self._ha(shape) if self.input_gain else shape.hkv
            return gates + 2.0 * shape.batch * shape.seq_len * upd * d * d + \
                2.0 * shape.batch * shape.nq * shape.heads * d * d  # k_tᵀv_t, then q_t S_t
        return gates + decay_flops(shape, self._ha(shape), self.per_dim, self.chunk)

    def algorithm_flops(self, shape: Shape, causal: bool = False) -> float:
        """The least matmul work of the chunked algorithm (forward): each causal triangle once,
        no padding; `flops` counts what runs (full L×L tiles, padded chunks). impl=recurrent:
        the step form's own count (`flops`: it pads nothing). Causal only: `causal` is not
        read."""
        if self.impl == "recurrent":
            return self.flops(shape, True)
        return self.gate_flops(shape) + decay_algorithm_flops(shape, self._ha(shape), self.chunk)

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        gates = self.gate_flops(shape)
        return 2.0 * (self.flops(shape, causal) - gates) + gates

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     grad: bool = False) -> int:
        """The chunked form's working set (`decay_chunk.decay_memory`, an upper estimate for the
        per-step form's forward too). `grad`: forward and backward, 3× that, and the per-step
        form's autograd keeps every step's state (Ha·Dk·Dv per position, measured 1.1×)."""
        ct = compute_dtype(dtype)
        el = torch.empty((), dtype=ct).element_size()
        fwd = decay_memory(shape, self._ha(shape), self.per_dim, self.chunk, el, ct != dtype)
        if not grad:
            return fwd
        return 3 * fwd + self._saved_states(shape, el, self._ha(shape))

    # -- flash-linear-attention (CUDA) ----------------------------------------------------------
    def fla_call(self, q, k, v, log_a, gain, state):
        """Call the fla op on (B, T, H, D) tensors; returns (o, final_state)."""
        raise NotImplementedError

    def _fla(self, q, k, v, log_a, gain, state) -> torch.Tensor:
        h = q.shape[1]
        rep = h // k.shape[1]
        if rep > 1:  # fla takes equal heads: repeated here (the fla path only)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            if log_a.shape[1] != h:
                log_a = log_a.repeat_interleave(rep, 1)
                gain = None if gain is None else gain.repeat_interleave(rep, 1)
            if state is not None and state.shape[1] != h:
                state = state.repeat_interleave(rep, 1)
        bthd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # (B, T, H, D)
        out, _ = self.fla_call(*bthd, log_a.transpose(1, 2).contiguous(),  # (B, T, H, Dd)
                               None if gain is None else gain.transpose(1, 2), state)  # (B, T, H)
        return out.transpose(1, 2)  # (B, H, T, Dv)


def fla_kwargs(fn) -> dict[str, Any]:
    """`head_first=False` for fla versions that still take it (newer ones reject it)."""
    return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}


def _head(gain: torch.Tensor | None, pre: int) -> torch.Tensor | None:
    return None if gain is None else gain[..., :pre]


def _tail(gain: torch.Tensor | None, pre: int) -> torch.Tensor | None:
    return None if gain is None else gain[..., pre:]
