"""The delta rule, chunked with the WY/UT representation, and the shared base of its variants.

Per k/v head, with the state S (d_k × d_v), row vectors q_t, k_t (L2-normalised), v_t and
o_t = q_t S_t (Yang et al. 2024, https://arxiv.org/abs/2406.06484; gated: Yang et al. 2025,
https://arxiv.org/abs/2412.06464, §3):

    S_t = α_t S_{t−1} + β_t k_tᵀ (v_t − α_t k_t S_{t−1})     (α_t = 1: DeltaNet)

Chunked form, chunks of C tokens, γ_i = Σ_{j≤i} log α_j inside the chunk, Γ_ij = e^(γ_i − γ_j)
for i ≥ j (0 above the diagonal), β = diag(β_i):
    UT transform  (I + tril(β (K Kᵀ ⊙ Γ), −1)) [U | W] = β [V | e^γ K]    (a triangular solve)
    state         S' = e^(γ_C) S + K̃ᵀ (U − W S),  K̃ = e^(γ_C − γ) K      (the chunk loop)
    output        O = e^γ Q S + (Q Kᵀ ⊙ Γ ⊙ M)(U − W S),  M causal (diagonal included)
Everything but the state passing is batched over B·H·chunks. The triangular solve is blocked
forward substitution (`unit_lower_solve`: the 16×16 diagonal blocks inverted by doubling, then
C/16 block rows), matmuls only. The chunk loop (sequential by nature: n/C steps) is one fused
matmul per chunk, S' = (e^(γ_C) I − K̃ᵀW) S + K̃ᵀU, both factors formed for all chunks at once.
The output is rearranged as (e^γ Q − P W) S + P U, P = Q Kᵀ ⊙ Γ ⊙ M: it needs the states in one
batched matmul after the loop. (torch.linalg.solve_triangular makes one small LAPACK call per
matrix; with 2 threads on a busy CPU it spun for seconds at n = 8192, 1024 matrices.)

The state depends only on k, v and the gates (drawn from k), so grouped-query heads share it:
the engine runs per k/v head and folds the query heads of a group into the rows of the chunk.
The per-step form (`recurrent_delta`) is the float64 reference, the decode step and the
`impl=recurrent` benchmark form, never the prefill path.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants._prefix import compute_dtype
from variants.base import Shape
from variants.recurrent._base import Recurrent

SOLVE_BLOCK = 16  # rows of the diagonal blocks `unit_lower_solve` inverts by doubling


@functools.lru_cache(maxsize=32)
def gate_weights(
    seed: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed gate parameters per k/v head, drawn in float64 on the CPU from `seed` and cached per
    (device, dtype): w (Hkv, D, 2) ~ N(0, 1/D) (column 0 → β, column 1 → α), A (Hkv,) ~ U(0, 16)
    and b (Hkv,) = softplus⁻¹(dt), dt ~ logU(1e-3, 1e-1) (the Gated DeltaNet / Mamba-2 init)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(hkv, d, 2, generator=g, dtype=torch.float64) / math.sqrt(d)
    a = torch.rand(hkv, generator=g, dtype=torch.float64) * 16
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt = torch.exp(torch.rand(hkv, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    b = dt + torch.log(-torch.expm1(-dt))
    return tuple(t.to(device, dtype) for t in (w, a, b))  # type: ignore[return-value]


def chunk_delta(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None = None,
    chunk: int = 64,
    final: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The chunked delta rule (module docstring) over one segment.

    Args:
        q: (B, Hkv, G, N, D) L2-normalised queries, G per k/v head; None: states only.
        k: (B, Hkv, N, D) L2-normalised; v: (B, Hkv, N, Dv); beta: (B, Hkv, N) in (0, 1).
        g: (B, Hkv, N) log α_t <= 0, or None (DeltaNet).
        state: (B, Hkv, D, Dv) before the segment (None: zeros). final: also return the state
            after the segment.
    Returns:
        (B, Hkv, G, N, Dv) or None, and the final state or None.
    """
    b, hkv, n, d = k.shape
    dv = v.shape[-1]
    c = max(1, min(chunk, n))
    pad = -n % c  # zero keys (β = 0, no decay) leave the state as it is; padded queries dropped
    if pad:
        k, v, beta = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
        q = None if q is None else F.pad(q, (0, 0, 0, pad))
    nc, bh = (n + pad) // c, b * hkv
    bn = bh * nc  # every chunk of every k/v head: the batch of all but the chunk loop
    kc, vc = k.reshape(bn, c, d), v.reshape(bn, c, dv)  # (BHkv·nc, C, D)
    bc = beta.reshape(bn, c, 1)
    kb = kc * bc  # β K
    a = kb @ kc.transpose(1, 2)  # (BHkv·nc, C, C): β_i k_i·k_j; the strict lower part is read
    if g is None:
        rhs = torch.cat([vc * bc, kb], -1)  # β [V | K], (BHkv·nc, C, Dv + D)
    else:
        gam = g.reshape(bn, c).cumsum(-1)  # γ_i, (BHkv·nc, C)
        causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril_()
        decay = (gam[:, :, None] - gam[:, None, :]).masked_fill(~causal, -math.inf).exp()
        eg, last = gam.exp()[..., None], gam[:, -1:, None]  # e^γ_i (.., C, 1); γ_C (.., 1, 1)
        a = a * decay
        rhs = torch.cat([vc * bc, kb * eg], -1)  # β [V | e^γ K]
    x = unit_lower_solve(a, rhs)  # [U | W], (BHkv·nc, C, Dv + D)
    kt = kc if g is None else kc * (last - gam[..., None]).exp()  # K̃ = e^(γ_C − γ) K
    y = (kt.transpose(1, 2) @ x).view(bh, nc, d, dv + d)  # [K̃ᵀU | K̃ᵀW]
    eye = torch.eye(d, dtype=k.dtype, device=k.device)
    carry = (eye if g is None else eye * last.exp().view(bh, nc, 1, 1)) - y[..., dv:]
    s = k.new_zeros(bh, d, dv) if state is None else state.reshape(bh, d, dv)
    states = [s]  # the state before each chunk; one fused matmul per chunk (sequential)
    steps = zip(y[..., :dv].unbind(1), carry.unbind(1), strict=True)  # views, in two ops
    for add_i, carry_i in itertools.islice(steps, nc if final else nc - 1):
        s = torch.baddbmm(add_i, carry_i, s)  # S' = (e^(γ_C) I − K̃ᵀW) S + K̃ᵀU
        states.append(s)
    s_out = states[-1].reshape(b, hkv, d, dv) if final else None
    if q is None:
        return None, s_out
    grp = q.shape[2]
    qc = q.reshape(b, hkv, grp, nc, c, d).transpose(2, 3).reshape(bn, grp * c, d)
    p = (qc @ kc.transpose(1, 2)).view(bn, grp, c, c)  # (BHkv·nc, G, C, C)
    p = (p.tril() if g is None else p * decay[:, None]).view(bn, grp * c, c)
    z = p @ x  # (BHkv·nc, G·C, Dv + D): [P U | P W]
    qe = qc if g is None else (qc.view(bn, grp, c, d) * eg[:, None]).view_as(qc)
    if state is None and nc == 1:  # S = 0: the intra-chunk term alone
        out = z[..., :dv]
    else:
        st = torch.stack(states[:nc], 1).view(bn, d, dv)  # the state before each chunk
        out = torch.baddbmm(z[..., :dv], qe - z[..., dv:], st)  # (e^γ Q − P W) S + P U
    out = out.reshape(b, hkv, nc, grp, c, dv).transpose(2, 3).reshape(b, hkv, grp, nc * c, dv)
    return out[..., :n, :], s_out


def unit_lower_solve(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """X = (I + tril(a, −1))⁻¹ r for a (B, C, C), r (B, C, m): the inverses of the diagonal blocks
    of `SOLVE_BLOCK` rows (`unit_lower_inverse`), then forward substitution over the C / 16
    blocks. Batched matmuls only: on the CPU torch.linalg.solve_triangular makes one small
    LAPACK call per matrix, ~10× slower at these sizes.
    """
    c = a.shape[-1]
    blk = min(SOLVE_BLOCK, c)
    pad = -c % blk  # identity rows: exact
    if pad:
        a, r = F.pad(a, (0, pad, 0, pad)), F.pad(r, (0, 0, 0, pad))
    nb = (c + pad) // blk
    diag = a.view(-1, nb, blk, nb, blk).diagonal(dim1=1, dim2=3).movedim(-1, 1)  # (B, nb, b, b)
    t = unit_lower_inverse(diag)
    xs: list[torch.Tensor] = []
    for j in range(nb):
        rows = slice(j * blk, (j + 1) * blk)
        rj = r[:, rows]
        if j:  # r_j − L_{j,<j} X_{<j}
            rj = torch.baddbmm(rj, a[:, rows, : j * blk], torch.cat(xs, 1), alpha=-1)
        xs.append(t[:, j] @ rj)
    return torch.cat(xs, 1)[:, :c]


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, −1))⁻¹ for a (..., b, b) by doubling: the inverses of the diagonal blocks of
    size s give those of size 2s (T21 = −T22 L21 T11); log2(b) levels of batched matmuls."""
    c = a.shape[-1]
    size = 1 << (c - 1).bit_length()  # a power of two; padding with identity rows is exact
    lower = F.pad(a, (0, size - c, 0, size - c)) if size != c else a.contiguous()
    batch = lower.shape[:-2]
    t = lower.new_ones(*batch, size, 1, 1)  # the inverse's diagonal blocks, (..., m, s, s)
    s = 1
    while s < size:
        m = size // (2 * s)
        diag = lower.view(*batch, m, 2 * s, m, 2 * s).diagonal(dim1=-4, dim2=-2)  # (.., 2s, 2s, m)
        l21 = diag[..., s:, :s, :].movedim(-1, -3)  # (..., m, s, s): strictly below the diagonal
        t11, t22 = t.view(*batch, m, 2, s, s).unbind(-3)
        t21 = -(t22 @ l21 @ t11)
        t = torch.cat([torch.cat([t11, torch.zeros_like(t11)], -1), torch.cat([t21, t22], -1)], -2)
        s *= 2
    return t[..., 0, :c, :c]


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
    """The per-step recurrence, same arguments as `chunk_delta` (`chunk` unused); returns the
    outputs (None when q is None) and the final state. A loop over the N steps: the reference,
    the decode form and `impl=recurrent`."""
    b, hkv, n, d = k.shape
    s = k.new_zeros(b, hkv, d, v.shape[-1]) if state is None else state
    outs = []
    for t in range(n):
        kt = k[:, :, t, None, :]  # (B, Hkv, 1, D)
        if g is not None:
            s = s * g[:, :, t, None, None].exp()  # α_t S_{t−1}
        u = beta[:, :, t, None, None] * (v[:, :, t, None, :] - kt @ s)  # (B, Hkv, 1, Dv)
        s = s + kt.transpose(-1, -2) @ u
        if q is not None:
            outs.append(q[:, :, :, t] @ s)  # (B, Hkv, G, Dv)
    return (torch.stack(outs, 3) if q is not None else None), s


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


def delta_flops(bh: int, groups: int, n: int, d: int, chunk: int, final: bool,
                queries: bool, initial: bool) -> float:
    """Matmul FLOPs of `chunk_delta` over bh = B·Hkv (Dv = D); `initial`: a state enters."""
    c = max(1, min(chunk, n))
    nc, e = -(-n // c), 2 * d  # e: the width of [U | W]
    f = nc * (2 * c * c * d + solve_flops(c, e) + 2 * d * c * e)  # β K Kᵀ, solve, K̃ᵀ[U | W]
    f += (nc if final else nc - 1) * 2 * d * d * d  # the chunk loop
    if queries:  # P, P [U | W], (e^γ Q − P W) S
        f += nc * groups * (2 * c * c * d + 2 * c * c * e)
        f += 0 if nc == 1 and not initial else nc * groups * 2 * c * d * d
    return float(bh * f)


def solve_flops(c: int, m: int) -> float:
    """Matmul FLOPs of `unit_lower_solve` for one C×C system with m columns."""
    blk = min(SOLVE_BLOCK, c)
    nb, size = -(-c // blk), 1 << (blk - 1).bit_length()
    inverse = nb * sum(2 * size * s * s for s in (1 << i for i in range(size.bit_length() - 1)))
    return inverse + sum(2 * blk * (j * blk + blk) * m for j in range(nb))  # L_{j,<j} X, T_jj r


@dataclass
class DeltaRule(Recurrent):
    """Shared contract of `deltanet` and `gated_deltanet` (they differ in the decay `log_alpha`
    and the fla kernel). Gates come from k before its normalisation, per k/v head h:
    β_t = σ(k_t·w_h[:, 0]) and (gated) log α_t = −A_h·softplus(k_t·w_h[:, 1] + b_h), with the
    fixed parameters of `gate_weights(seed, ...)`: a point is reproducible from its inputs.

    Args: chunk (chunk length C), impl (chunk | recurrent | fla), seed (gate parameters).
    """

    gated: ClassVar[bool] = False
    fla_module: ClassVar[str] = ""

    seed: int = 0

    def gates(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """β (B, Hkv, N) and log α (B, Hkv, N) or None, from raw k in its (compute) dtype."""
        w, a, b = gate_weights(self.seed, k.shape[1], k.shape[-1], k.device, k.dtype)
        x = k @ (w if self.gated else w[..., :1])  # (B, Hkv, N, 1 or 2)
        beta = torch.sigmoid(x[..., 0])
        if not self.gated:
            return beta, None
        return beta, -a[:, None] * F.softplus(x[..., 1] + b[:, None])

    def _inputs(self, q, k, v):
        ct = compute_dtype(q.dtype)
        kf = k.to(ct)
        beta, g = self.gates(kf)
        b, h, nq, d = q.shape
        qn = F.normalize(q.to(ct), dim=-1).view(b, k.shape[1], h // k.shape[1], nq, d)
        return qn, F.normalize(kf, dim=-1), v.to(ct), beta, g

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{self.name} is causal only: {self.no_noncausal}")
        if self.impl == "fla":
            return self._fla(q, k, v)
        step = recurrent_delta if self.impl == "recurrent" else chunk_delta
        out = run_delta(step, *self._inputs(q, k, v), self.chunk)
        return out.reshape(q.shape).to(q.dtype)

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
        vt, bt = v.transpose(1, 2), beta.transpose(1, 2).to(q.dtype)
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
        return out.transpose(1, 2).to(q.dtype)

    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> torch.Tensor:
        """The state (B, Hkv, D, Dv) in the compute dtype after the context, chunked. One state
        per k/v head (the gates come from k): `heads` is not needed."""
        ct = compute_dtype(k.dtype)
        kf = k.to(ct)
        beta, g = self.gates(kf)
        _, s = chunk_delta(None, F.normalize(kf, dim=-1), v.to(ct), beta, g, None, self.chunk,
                           final=True)
        return s

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qn, kn, vc, beta, g = self._inputs(q, k, v)
        out, s = recurrent_delta(qn, kn, vc, beta, g, state)
        return out.reshape(q.shape).to(q.dtype), s

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        """The float64 per-step recurrence over all Nk steps; the last Nq outputs."""
        q, k, v = (t.double() for t in (q, k, v))
        return run_delta(recurrent_delta, *self._inputs(q, k, v), 0).reshape(q.shape)

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

    def flops(self, shape: Shape, causal: bool = False) -> float:
        bh, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        p, nq = shape.seq_len - shape.nq, shape.nq
        f = 2.0 * bh * shape.seq_len * d * (2 if self.gated else 1)  # gate projections
        if self.impl == "recurrent":  # k S, kᵀ u per step; q S per step and query head
            return f + bh * (4.0 * shape.seq_len * d * d + 2.0 * g * nq * d * d)
        if p:
            f += delta_flops(bh, g, p, d, self.chunk, final=True, queries=False, initial=False)
        return f + delta_flops(bh, g, nq, d, self.chunk, final=False, queries=True,
                               initial=p > 0)

    def decode_flops(self, shape: Shape) -> float:
        """One `decode_step`: gate projections, k S and kᵀu per k/v head, q S per query head."""
        bh, d = shape.batch * shape.hkv, shape.head_dim
        return float(bh * (2 * d * (2 if self.gated else 1) + 4 * d * d)
                     + shape.batch * shape.heads * 2 * d * d)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = True) -> int:
        """Upper estimate: the normalised inputs and gates, plus every intermediate of the larger
        of the two segments (context, queries) counted as live at once."""
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

    def kernel(self, shape: Shape, device: torch.device | str, causal: bool, grad: bool) -> str:
        return {"chunk": "chunk-wy", "recurrent": "recurrent"}.get(
            self.impl, f"fla:{self.fla_module}")

    def density(self, n: int, causal: bool = False) -> None:
        return None
