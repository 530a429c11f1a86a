"""Performer, FAVOR+ (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794).

Positive orthogonal random features φ(x) = exp(wᵀx − |x|²/2)/√m on x = q/d^¼ (and k/d^¼), so
that E[φ(q)·φ(k)] = exp(q·k/√d); out = φ(Q)(φ(K)ᵀV) / (φ(Q)(φ(K)ᵀ1) + eps). As in the paper's
code, exp is taken after max-shifts: one per query row, one per batch-head for keys. Both cancel
exactly between numerator and normaliser, and `eps` is scaled by the same factors, so it is added
in unshifted units: the output (and its gradient) is that of the formula, whatever the shifts.
With the default eps = 0 that is FAVOR+ itself; a normaliser whose every term underflowed is
floored at √tiny (in shifted units), so output and gradients stay finite, never 0/0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from attnbench.variants.base import Shape, Variant, compute_dtype, mm_dtype
from attnbench.variants.linear.prefix import (
    context_state,
    linear_attention,
    linear_flops,
    linear_memory,
    path,
    path_name,
)
from attnbench.variants.registry import register


class PerformerState(NamedTuple):
    """Decode state per batch and k/v head, with the keys' running max-shift c (B, Hkv, 1, 1):
    S = Σ φ̃(k)ᵀv (B, Hkv, m, D), z = Σ φ̃(k) (B, Hkv, m, 1), φ̃(k) = exp(log √m φ(k) − c)."""

    s: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor


@register
@dataclass
class Performer(Variant):
    """FAVOR+ softmax-kernel attention. Args: features (m), seed, chunk (causal), eps (added to
    the unshifted normaliser φ(q)·Σφ(k), as in `linear`; 0: none)."""

    name: ClassVar[str] = "performer"
    family: ClassVar[str] = "linear"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    decode_time_exponent: ClassVar[float] = 0.0  # a fixed-size state per step
    decode_memory_exponent: ClassVar[float] = 0.0
    rewrites_state: ClassVar[bool] = True  # a decode step reads S, z and writes them anew
    exact: ClassVar[bool] = False
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    features: int = 256
    seed: int = 0
    chunk: int = 128
    eps: float = 0.0

    def __post_init__(self) -> None:
        if self.features <= 0:
            raise ValueError(f"features={self.features}: must be positive")
        if self.chunk <= 0:
            raise ValueError(f"chunk={self.chunk}: must be positive")
        if self.eps < 0:
            raise ValueError(f"eps={self.eps}: must be non-negative")

    @property
    def label(self) -> str:
        return self._label({"features": f"m={self.features}"})

    def projection(self, d: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The (m, d) random feature matrix: the same for a given (seed, m, d) everywhere."""
        return _orthogonal_features(self.seed, self.features, d).to(device, dtype)

    def feature_map(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(q), φ(k) up to positive factors that cancel in the output (one per query row, one
        per batch and k/v head for keys): (B, H, Nq, m), (B, Hkv, Nk, m) in the compute dtype
        (float32 for half inputs)."""
        qf, kf, _ = self._shifted_features(q, k, compute_dtype(q.dtype))
        return qf, kf

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if path(q.device, causal, _grad(q, k, v)) == "tiled":
            ct = compute_dtype(q.dtype)
            wt = _projection(self.seed, self.features, q.shape[-1], str(q.device), ct, True)
            return _forward_tiled(q.to(ct), k.to(ct), v.to(ct), wt, self.eps).to(q.dtype)
        mm = mm_dtype(q.dtype, q.device, states=True)
        qf, kf, log_c = self._shifted_features(q, k, mm)  # (B,H,Nq,m), (B,Hkv,Nk,m), (B,H,Nq,1)
        floor = _floor(self.eps, log_c, 1 / math.log(2))
        return linear_attention(qf, kf, v, causal, self.chunk, floor, mm).to(q.dtype)

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        return path_name(self.chunk, shape, device, causal, grad)

    def decode_kernel(self, shape: Shape, device) -> str:
        """A step updates the state S, z and reads it: a few matmuls, no prefix path."""
        return "state:step"

    def _logits(self, x: torch.Tensor, mm: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """wᵀx/d^¼ (B, ·, N, m) and |x/d^¼|²/2 (B, ·, N, 1), in the compute dtype; the projection
        runs in `mm` (W cached per device and dtype: no copy inside a call)."""
        ct = compute_dtype(x.dtype)
        d = x.shape[-1]
        w = _projection(self.seed, self.features, d, str(x.device), mm, False)  # (D, m)
        xc = x.to(ct)
        half = (xc * xc).sum(-1, keepdim=True).mul_(0.5 / math.sqrt(d))
        return (x.to(mm) @ w).to(ct), half

    def _shifted_features(
        self, q: torch.Tensor, k: torch.Tensor, mm: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """φ̃(q), φ̃(k) with max 1 per query row and per batch and k/v head, and log c
        (B, H, Nq, 1) with φ(q_i)·φ(k_j) = c_i φ̃(q_i)·φ̃(k_j). Only the max-shifts are detached:
        the output does not depend on them, so autograd at fixed shifts gives the formula's own
        gradient."""
        b, h, nq, _ = q.shape
        hkv = k.shape[1]
        lq, half_q = self._logits(q, mm)  # lq = log √m φ(q) + half_q (constant along m)
        lk, half_k = self._logits(k, mm)
        lk = lk.sub_(half_k)  # log √m φ(k)
        cq = lq.detach().amax(-1, keepdim=True)  # (B, H, Nq, 1)
        ck = lk.detach().amax(dim=(-2, -1), keepdim=True)  # (B, Hkv, 1, 1)
        log_c = (cq - half_q).view(b, hkv, -1, 1).add_(ck - math.log(self.features))
        return lq.sub_(cq).exp_(), lk.sub_(ck).exp_(), log_c.view(b, h, nq, 1)

    # -- decode: the recurrent state with a running key shift -----------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> PerformerState:
        """S, z, c after the context k, v (B, Hkv, n, D): one batched matmul (no step loop);
        c is the context keys' max of log √m φ(k)."""
        ct = compute_dtype(k.dtype)
        lk, half_k = self._logits(k, ct)
        lk = lk.sub_(half_k)
        c = lk.amax(dim=(-2, -1), keepdim=True)  # (B, Hkv, 1, 1)
        s, z = context_state(lk.sub_(c).exp_(), v, ct)
        return PerformerState(s, z, c)

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: PerformerState
    ) -> tuple[torch.Tensor, PerformerState]:
        """Add the new token to a new state (the one passed in is unchanged), then read q
        (B, H, 1, D) against it. A key above the running shift raises it: c' = max(c, new),
        S and z are rescaled by exp(c − c') ≤ 1 (online-softmax style), so features stay ≤ 1
        whatever later keys do and the output is the formula's (the shifts cancel, and eps is
        scaled by them as in `forward`)."""
        b, h, _, d = q.shape
        hkv = k.shape[1]
        ct = compute_dtype(q.dtype)
        lk, half_k = self._logits(k, ct)
        lk = lk.sub_(half_k)  # (B, Hkv, 1, m)
        c = torch.maximum(state.c, lk.amax(-1, keepdim=True))  # (B, Hkv, 1, 1)
        scale = (state.c - c).exp_()
        s, z = context_state(lk.sub_(c).exp_(), v, ct)
        state = PerformerState(state.s * scale + s, state.z * scale + z, c)
        lq, half_q = self._logits(q, ct)  # (B, H, 1, m)
        cq = lq.amax(-1, keepdim=True)
        rows = lq.sub_(cq).exp_().view(b, hkv, -1, self.features)  # (B, Hkv, G, m)
        log_c = (cq - half_q).view(b, hkv, -1, 1).add_(c - math.log(self.features))
        floor = _floor(self.eps, log_c, 1 / math.log(2))
        out = (rows @ state.s) / (rows @ state.z).add_(floor)
        return out.reshape(b, h, 1, d).to(q.dtype), state

    def decode_flops(self, shape: Shape) -> float:
        b, h, hkv, d, m = shape.batch, shape.heads, shape.hkv, shape.head_dim, self.features
        # projections of q and k; φ(k)ᵀv; q against S and z
        return 2.0 * b * ((h + hkv) * d * m + hkv * m * d + h * m * (d + 1))

    # -- models ---------------------------------------------------------------------------------
    def _projection_flops(self, shape: Shape) -> float:
        rows = shape.heads * shape.nq + shape.hkv * shape.seq_len
        return 2.0 * shape.batch * rows * shape.head_dim * self.features

    def flops(self, shape: Shape, causal: bool = False) -> float:
        return self._projection_flops(shape) + linear_flops(shape, self.features, causal,
                                                            self.chunk)

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        """The projections q W/d^¼, k W/d^¼ need only dq, dk (W is constant): 1× their forward;
        the normalised products have both operands differentiable: 2×."""
        return self._projection_flops(shape) + 2 * linear_flops(shape, self.features, causal,
                                                                self.chunk)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        b, h, hkv, d, m = shape.batch, shape.heads, shape.hkv, shape.head_dim, self.features
        nq, nk = shape.nq, shape.seq_len
        inputs = 3 * b * (h * nq + 2 * hkv * nk) * d * el  # casts of q, k, v; squares
        feats = 2 * b * (h * nq + hkv * nk) * (m + 1) * el  # logits, φ(q), φ(k), row terms
        return inputs + feats + linear_memory(shape, m, causal, self.chunk, el, el)

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _floor(eps: float, log_c: torch.Tensor, log2_base: float) -> torch.Tensor:
    """eps in shifted units, eps/c (log_c in a base with log₂ base = `log2_base`), at least √tiny
    (2⁻⁶³ in float32): a normaliser whose terms all underflowed gives a bounded output and
    gradients below overflow (1/den² stays finite), never 0/0; at ordinary scales the shifted
    normaliser is > 1e-6 (measured at n=8192, causal too), so the floor changes nothing."""
    f = torch.finfo(log_c.dtype)
    log2_eps = math.log2(eps) if eps > 0 else -math.inf
    expo = (log_c * -log2_base).add_(log2_eps)
    return torch.exp2(expo.clamp(0.5 * math.log2(f.tiny), math.log2(f.max) - 1))


def _forward_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wt: torch.Tensor, eps: float
) -> torch.Tensor:
    """Non-causal `forward` without autograd (CPU): the same features and products, but each
    k/v head's φ(K) and each tile of φ(Q) rows (the group's G query heads as rows) is made,
    exponentiated in place and consumed while in cache (the (N, m) feature maps never go through
    main memory). wt: (D, m), W scaled by log₂e/d^¼."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    m = wt.shape[1]
    # exp(x) = 2^(x·log₂e), with log₂e folded into the projection and the row terms: torch's
    # exp2_ is ~3x faster than exp_ on this CPU (both vectorised to ~1 ulp).
    l2e = 1.0 / math.log(2.0)
    qf = q.reshape(b * hkv, -1, d)  # (B·Hkv, G·Nq, D)
    kf, vf = (t.reshape(b * hkv, nk, d) for t in (k, v))  # (B·Hkv, Nk, D)
    c = 0.5 * l2e / math.sqrt(d)
    half_q, half_k = ((t * t).sum(-1, keepdim=True).mul_(c) for t in (qf, kf))  # (·, N, 1)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // m)
    for i in range(b * hkv):
        pk = kf[i] @ wt  # (Nk, m): log₂ √m φ(k) + |k'|²/2·log₂e, for keys of head i
        ck = (pk.amax(-1, keepdim=True) - half_k[i]).amax()  # max over keys and features
        pk = pk.sub_(half_k[i] + ck).exp2_()  # φ̃(K), max 1
        state, norm = pk.T @ vf[i], pk.sum(0)[:, None]  # (m, D): Σ φ̃(k)vᵀ; (m, 1): Σ φ̃(k)
        for r in range(0, qf.shape[1], rows):  # φ̃(Q) in row tiles, shift = each row's max
            pq = qf[i, r : r + rows] @ wt  # (rows, m)
            cq = pq.amax(-1, keepdim=True)
            pq = pq.sub_(cq).exp2_()
            floor = _floor(eps, cq.sub_(half_q[i, r : r + rows]).add_(ck - math.log2(m)), 1.0)
            torch.div(pq @ state, (pq @ norm).add_(floor), out=out[i, r : r + rows])
    return out.view(b, h, nq, d)


_TILE = 1 << 19  # elements of one φ(Q) tile (2 MiB in float32: the L2 of one core)


@functools.lru_cache(maxsize=32)
def _projection(
    seed: int, m: int, d: int, device: str, dtype: torch.dtype, log2: bool
) -> torch.Tensor:
    """Wᵀ/d^¼ as (D, m) on `device` in `dtype`, scaled by log₂e too for the tiled path's exp2:
    made once per device and dtype, so a call copies nothing to the device."""
    w = _orthogonal_features(seed, m, d) * d**-0.25
    if log2:
        w = w / math.log(2.0)
    return w.T.contiguous().to(device, dtype)


@functools.lru_cache(maxsize=16)
def _orthogonal_features(seed: int, m: int, d: int) -> torch.Tensor:
    """Blocks of d orthonormal rows (QR of Gaussian), rows scaled by χ_d norms; float64, CPU."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        blocks.append(qmat.T)  # rows orthonormal
    w = torch.cat(blocks)[:m]  # (m, d)
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return w * norms
