"""The delta rule and the shared base of its variants (deltanet, gated_deltanet).

Per k/v head, with the state S (d_k × d_v), row vectors q_t, k_t (L2-normalised), v_t and
o_t = q_t S_t (Yang et al. 2024, https://arxiv.org/abs/2406.06484; gated: Yang et al. 2025,
https://arxiv.org/abs/2412.06464, §3):

    S_t = α_t S_{t−1} + β_t k_tᵀ (v_t − α_t k_t S_{t−1})     (α_t = 1: DeltaNet)

Its forms, one file each: `delta_chunk.chunk_delta` the chunked form with the WY/UT
representation (prefill, training), `delta_recurrent.recurrent_delta` the per-step form (the
decode step and the ``impl=recurrent`` benchmark form, never the prefill path),
`delta_naive.naive_delta` the float64 step-by-step reference.

The state depends only on k, v and the gates (drawn from k), so grouped-query heads share it:
both forms run per k/v head, the query heads of a group as rows.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, compute_dtype, gpu_path
from attnbench.variants.recurrent._base import Recurrent
from attnbench.variants.recurrent.delta_chunk import (
    SOLVE_BLOCK,
    chunk_delta,
    delta_algorithm_flops,
    delta_flops,
    workspace,
)
from attnbench.variants.recurrent.delta_naive import naive_delta
from attnbench.variants.recurrent.delta_recurrent import recurrent_delta
from attnbench.variants.recurrent.segments import segment_span


@functools.lru_cache(maxsize=32)
def gate_weights(
    seed: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed gate parameters, one set shared by every k/v head (as GLA's W), drawn in float64 on
    the CPU from `seed` and cached per (device, dtype): w (D, 2) ~ N(0, 1/D) (column 0 → β,
    column 1 → α), A ~ U(0, 16) and b = softplus⁻¹(dt), dt ~ logU(1e-3, 1e-1) (the Gated
    DeltaNet / Mamba-2 init); returned per head, (Hkv, D, 2), (Hkv,), (Hkv,).

    Shared, so a head's gates are a function of its own keys alone: kv_heads = H/G is the
    kv_heads = H model with its k/v heads repeated, and a kv_heads sweep compares one model.
    Draws per head could not give that (the repeated heads j·G … j·G + G − 1 would all need head
    j's draw, for every G); drawn as one (Hkv, D, 2) block they even changed with kv_heads."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(d, 2, generator=g, dtype=torch.float64) / math.sqrt(d)
    a = torch.rand((), generator=g, dtype=torch.float64) * 16
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt = torch.exp(torch.rand((), generator=g, dtype=torch.float64) * (hi - lo) + lo)
    b = dt + torch.log(-torch.expm1(-dt))
    per_head = (w.expand(hkv, d, 2), a.expand(hkv), b.expand(hkv))
    return tuple(t.to(device, dtype).contiguous() for t in per_head)  # type: ignore[return-value]


def run_delta(step, qn, kn, v, beta, g, chunk: int) -> torch.Tensor:
    """`step` (chunk_delta or recurrent_delta) over the keys before the Nq queries without
    outputs, then over the last Nq with them; qn (B, Hkv, G, Nq, D) → (B, Hkv, G, Nq, Dv)."""
    p = kn.shape[2] - qn.shape[3]
    state = None
    if p:
        cut = [None if t is None else t[:, :, :p] for t in (kn, v, beta, g)]
        _, state = step(None, *cut, None, chunk, final=True)
    rest = [None if t is None else t[:, :, p:] for t in (kn, v, beta, g)]
    return step(qn, *rest, state, chunk)[0]


def _positions(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """t's positions lo … hi − 1 (the last dim of a gate (B, Hkv, N), the one before the last
    of (B, H, N, D)): t itself where they are all of them (a single segment, the GPU path: no
    op), else one narrow."""
    dim = -1 if t.dim() == 3 else -2
    n = t.shape[dim]
    hi = min(hi, n)
    return t if lo == 0 and hi == n else t.narrow(dim, lo, hi - lo)


@dataclass
class DeltaRule(Recurrent):
    """Shared contract of `deltanet` and `gated_deltanet` (they differ in the decay `log_alpha`
    and the fla kernel). Gates come from k before its normalisation, per k/v head:
    β_t = σ(k_t·w[:, 0]) and (gated) log α_t = −A·softplus(k_t·w[:, 1] + b), with the fixed
    parameters of `gate_weights(seed, ...)`, shared by the heads: a point is reproducible from
    its inputs, and grouped k/v heads equal repeated ones.

    Args: chunk (chunk length C), impl (chunk | recurrent | fla), seed (gate parameters).
    """

    gated: ClassVar[bool] = False
    fla_module: ClassVar[str] = ""

    seed: int = 0

    def gates(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """β (B, Hkv, N) and log α (B, Hkv, N) or None, from raw k in its (compute) dtype."""
        w, a, b = gate_weights(self.seed, k.shape[1], k.shape[-1], k.device, k.dtype)
        # (B, Hkv, 1 or 2, N): wᵀ kᵀ, a (2, D)·(D, N) product per head; k·w (N rows, 2 columns)
        # took 2.3× as long on the CPU (0.28 against 0.12 ms at H=8, N=512, D=64)
        x = (w if self.gated else w[..., :1]).transpose(-1, -2) @ k.transpose(-1, -2)
        beta = torch.sigmoid(x[..., 0, :])
        if not self.gated:
            return beta, None
        return beta, -a[:, None] * F.softplus(x[..., 1, :] + b[:, None])

    def _inputs(self, q, k, v):
        """L2-normalised q and k, v, β and the gates, in the compute dtype; q as
        (B, Hkv, G, Nq, D), the G query heads of a k/v head its rows (the per-step form, the
        decode step, the float64 reference)."""
        kf, beta, g, norm = self._keys(k)
        b, h, nq, d = q.shape
        qn = F.normalize(q.to(kf.dtype), dim=-1)
        return qn.view(b, k.shape[1], h // k.shape[1], nq, d), kf / norm, v.to(kf.dtype), beta, g

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{self.name} is causal only: {self.no_noncausal}")
        if self.impl == "fla":
            return self._fla(q, k, v)
        if self.impl == "recurrent":
            out = run_delta(recurrent_delta, *self._inputs(q, k, v), self.chunk)
            return out.reshape(q.shape).to(q.dtype)  # (B, Hkv, G, Nq, Dv) → (B, H, Nq, D)
        b, h, nq, d = q.shape
        ct, pre = compute_dtype(q.dtype), k.shape[-2] - nq
        span = self._span(b, h, max(nq, pre), d, q.device)
        work: dict[str, torch.Tensor] = {}  # the engine's buffers, shared by the segments
        kf, beta, g, knorm = self._keys(k)  # gates and key norms once for the call: small
        state = None
        if pre:
            state = self._states(*(None if t is None else _positions(t, 0, pre)
                                   for t in (kf, v, beta, g, knorm)), span=span, work=work)
        out = None if nq <= span else q.new_empty(b, h, nq, v.shape[-1])
        tracked = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        # the output is linear in q̂ = q / max(|q|, ε): the engine takes q as it is and its rows
        # are scaled by 1 / max(|q|, ε) where they are written (no normalised copy of q)
        qf = q.to(ct)
        inv = torch.linalg.vector_norm(qf, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
        hkv = k.shape[1]
        for lo in range(0, nq, span):  # segment by segment
            qs, sc = (_positions(t, lo, lo + span) for t in (qf, inv))
            qs = qs.view(b, hkv, h // hkv, qs.shape[-2], d)  # (B, Hkv, G, m, D)
            kc, vc, bc, gc, nc = (None if t is None else _positions(t, pre + lo, pre + lo + span)
                                  for t in (kf, v, beta, g, knorm))
            part, state = chunk_delta(qs, self._unit(kc, nc, work, tracked), vc.to(ct), bc, gc,
                                      state, self.chunk, final=lo + span < nq, work=work)
            part = part.reshape(b, h, -1, d)  # (B, Hkv, G, m, D) → (B, H, m, D)
            if out is None:
                return (part * sc).to(q.dtype)  # fresh: the buffers are the call's
            rows = out[..., lo:lo + span, :]
            if tracked or out.dtype != part.dtype:
                rows.copy_(part * sc)
            else:  # written as it comes, scaled on the way (part: a view into the buffers)
                torch.mul(part, sc, out=rows)
        return out

    def _keys(self, k: torch.Tensor):
        """k in the compute dtype, its gates β, log α (None: DeltaNet), (B, Hkv, N) each, and
        its norms max(|k_t|, ε) (B, Hkv, N, 1): for the whole call at once (a few ops, N·Hkv
        words), where per segment they cost ~10 ops each."""
        kf = k.to(compute_dtype(k.dtype))
        beta, g = self.gates(kf)
        return kf, beta, g, torch.linalg.vector_norm(kf, dim=-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _unit(k: torch.Tensor, norm: torch.Tensor, work: dict[str, torch.Tensor],
              tracked: bool) -> torch.Tensor:
        """k / norm, as F.normalize; on the CPU without autograd (`tracked`: any of the call's
        inputs needs a gradient, and then autograd keeps each segment's keys) into the call's
        buffer "kn" (contiguous: the engine's chunks are then a view, no copy of a strided
        slice)."""
        if gpu_path(k.device) or tracked:
            return k / norm
        return torch.div(k, norm, out=workspace(work, "kn", tuple(k.shape), k))

    def _span(self, b: int, h: int, n: int, d: int, device) -> int:
        """Positions per segment of the chunked form (a multiple of the chunk length)."""
        return segment_span(n, self.chunk, b * h * max(self.chunk, 2 * d), device)

    def _states(self, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None = None,
                g: torch.Tensor | None = None, norm: torch.Tensor | None = None, *, span: int,
                work: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The state after k, v by the chunked form, segment by segment (None: no positions).
        beta, g, norm: k's gates and norms (`_keys`) where the caller has them (then k is in the
        compute dtype)."""
        if k.shape[-2] == 0:
            return None
        if norm is None:
            k, beta, g, norm = self._keys(k)
        ct, state = compute_dtype(k.dtype), None
        work = {} if work is None else work
        tracked = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        for lo in range(0, k.shape[-2], span):
            kc, vc, bc, gc, nc = (None if t is None else _positions(t, lo, lo + span)
                                  for t in (k, v, beta, g, norm))
            _, state = chunk_delta(None, self._unit(kc, nc, work, tracked), vc.to(ct), bc, gc,
                                   state, self.chunk, final=True, work=work)
        return state

    def fla_kernel(self, q, k, v, beta, g, **kw):
        """The subclass's fla call on (B, T, H, D) tensors; returns (out, final state)."""
        raise NotImplementedError

    def _fla(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """fla's chunked kernel (CUDA, half inputs, Hkv = H) on our normalised q, k and gates;
        scale 1 (o_t = q_t S_t as in the papers; fla's default is 1/√d); the context before the
        queries enters as fla's initial state."""
        ct = compute_dtype(q.dtype)
        beta, g = self.gates(k.to(ct))  # (B, H, N), in float32 for half inputs
        qn, kn = (F.normalize(t.to(ct), dim=-1).to(t.dtype).transpose(1, 2) for t in (q, k))
        vt, bt = v.transpose(1, 2), beta.transpose(1, 2).to(q.dtype)  # q, k, v (B, T, H, D)
        gt = None if g is None else g.transpose(1, 2)  # (B, T, H), log α
        p = k.shape[2] - q.shape[2]
        kw = {"scale": 1.0, "use_qk_l2norm_in_kernel": False}
        state = None
        if p:  # the context: its keys stand in for queries whose outputs are dropped
            _, state = self.fla_kernel(kn[:, :p], kn[:, :p], vt[:, :p], bt[:, :p],
                                       None if gt is None else gt[:, :p], initial_state=None,
                                       output_final_state=True, **kw)
        out, _ = self.fla_kernel(qn, kn[:, p:], vt[:, p:], bt[:, p:],
                                 None if gt is None else gt[:, p:], initial_state=state,
                                 output_final_state=False, **kw)
        return out.transpose(1, 2).to(q.dtype)  # (B, H, Nq, D)

    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> torch.Tensor:
        """The state (B, Hkv, D, Dv) in the compute dtype after the context, chunked. One state
        per k/v head (the gates come from k): `heads` is not needed."""
        b, hkv, n, d = k.shape
        state = self._states(k, v, span=self._span(b, hkv, n, d, k.device))
        if state is None:  # no context: the zero state
            state = k.new_zeros(b, hkv, d, v.shape[-1], dtype=compute_dtype(k.dtype))
        return state

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qn, kn, vc, beta, g = self._inputs(q, k, v)
        out, s = recurrent_delta(qn, kn, vc, beta, g, state)
        return out.reshape(q.shape).to(q.dtype), s  # (B, H, 1, D)

    def reference_tile(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any, at: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """The float64 per-step recurrence (`delta_naive.naive_delta`) over one stretch of
        `Recurrent.reference`; the state (B, Hkv, D, Dv) per k/v head."""
        qn, kn, vc, beta, g = self._inputs(*(t.double() for t in (q, k, v)))
        out, state = naive_delta(qn, kn, vc, beta, g, state, at)  # (B, Hkv, G, R, Dv)
        return out.reshape(*q.shape[:-1], out.shape[-1]), state  # (B, H, R, Dv)

    # -- what it supports, costs ----------------------------------------------------------------
    def not_supported_reasons(
        self, shape: Shape, dtype: torch.dtype, device: torch.device | str, causal: bool,
        mode: str = "fwd",
    ) -> list[str]:
        reasons = super().not_supported_reasons(shape, dtype, device, causal, mode)
        if self.impl == "fla" and mode != "decode":
            if importlib.util.find_spec("fla") is None:
                reasons.append("fla (flash-linear-attention) not importable")
            if torch.device(device).type != "cuda":
                reasons.append("fla: Triton kernels need CUDA")
            if dtype == torch.float32:
                reasons.append(f"fla: {self.fla_module} rejects float32 (bf16/fp16 only)")
            if shape.groups > 1:
                reasons.append("fla: k heads must equal q heads (expanding would copy k/v)")
        return reasons

    def flops(self, shape: Shape, causal: bool = False, device: str = "cpu") -> float:
        """Matmul FLOPs of one forward: the values' form on the CPU, the carry form on the GPU
        path (`delta_chunk`)."""
        bh, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        p, nq = shape.seq_len - shape.nq, shape.nq
        f = 2.0 * bh * shape.seq_len * d * (2 if self.gated else 1)  # gate projections
        if self.impl == "recurrent":  # k S, kᵀ u per step; q S per step and query head
            return f + bh * (4.0 * shape.seq_len * d * d + 2.0 * g * nq * d * d)
        values = not gpu_path(device)
        if p:
            f += delta_flops(bh, g, p, d, self.chunk, final=True, queries=False, initial=False,
                             values=values)
        return f + delta_flops(bh, g, nq, d, self.chunk, final=False, queries=True,
                               initial=p > 0, values=values)

    def backward_flops(self, shape: Shape, causal: bool = False, device: str = "cpu") -> float:
        return 2.0 * self.flops(shape, causal, device)

    def algorithm_flops(self, shape: Shape, causal: bool = False, device: str = "cpu") -> float:
        """The least matmul work of the chunked algorithm that runs on `device` (forward): the
        triangles once, no padding; `flops` counts what runs (full C×C tiles, the blocked solve,
        padded chunks). impl=recurrent: the step form's own count (`flops`: it pads nothing).
        Causal only: `causal` is not read."""
        if self.impl == "recurrent":
            return self.flops(shape, True, device)
        bh, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        p, nq = shape.seq_len - shape.nq, shape.nq
        values = not gpu_path(device)
        f = 2.0 * bh * shape.seq_len * d * (2 if self.gated else 1)  # gate projections
        if p:
            f += delta_algorithm_flops(bh, g, p, d, self.chunk, False, values)
        return f + delta_algorithm_flops(bh, g, nq, d, self.chunk, True, values)

    def decode_flops(self, shape: Shape) -> float:
        """One `decode_step`: gate projections, k S and kᵀu per k/v head, q S per query head."""
        bh, d = shape.batch * shape.hkv, shape.head_dim
        return float(bh * (2 * d * (2 if self.gated else 1) + 4 * d * d)
                     + shape.batch * shape.heads * 2 * d * d)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = True,
                     grad: bool = False) -> int:
        """Upper estimate: the normalised inputs and gates, plus every intermediate of the larger
        of the two parts (context, queries) counted as live at once (the GPU path; and what
        autograd keeps). On the CPU without autograd the segments (`segments`) hold one
        segment's intermediates at a time: the peak stays far below. `grad`: forward and
        backward, 3× that, and the per-step form's autograd keeps every step's state, twice
        when gated (α_t S_{t−1} and S_{t−1}; measured 1.14× and 2.14×)."""
        if grad:
            el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
            states = self._saved_states(shape, el, shape.hkv) * (2 if self.gated else 1)
            return 3 * self.memory_bytes(shape, dtype, causal) + states
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, g, d, n, nq = shape.batch * shape.hkv, shape.groups, shape.head_dim, shape.seq_len, \
            shape.nq
        words = g * nq * d + 2 * n * d + 6 * n  # q, k, v in the compute dtype; gates
        if self.impl == "recurrent":  # the outputs, listed then stacked; a few states
            return int(bh * el * (words + 2 * g * nq * d + 4 * d * d))
        extra = 1 if self.gated else 0
        segments = []
        for length, queries in ((n - nq, 0), (nq, g)):
            c = max(1, min(self.chunk, length))
            padded, chunks = -(-length // c) * c, -(-length // c)
            keys = padded * ((12 + extra) * d + (1 + 4 * extra) * c + 4 * SOLVE_BLOCK)
            rows = queries * padded * ((8 + extra) * d + 2 * c)  # Q, P, P[U|W], Q̃, outputs
            segments.append(keys + rows + chunks * 6 * d * d)  # [K̃ᵀU | K̃ᵀW], carry, states
        return int(bh * el * (words + max(segments)))

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        """The state is built by the chunked form whatever the impl (`decode_init`)."""
        return dataclasses.replace(self, impl="chunk").memory_bytes(shape, dtype, True)

    def kernel(self, shape: Shape, device: torch.device | str, causal: bool, grad: bool) -> str:
        return {"chunk": "chunk-wy", "recurrent": "recurrent"}.get(
            self.impl, f"fla:{self.fla_module}")

    def density(self, n: int, causal: bool = False) -> None:
        return None
