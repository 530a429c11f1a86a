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
from typing import ClassVar

import torch

from variants import register
from variants._prefix import compute_dtype, linear_attention, linear_flops, linear_memory
from variants.base import Shape, Variant


@register
@dataclass
class Performer(Variant):
    """FAVOR+ softmax-kernel attention. Args: features (m), seed, chunk (causal), eps (added to
    the unshifted normaliser φ(q)·Σφ(k), as in `linear`; 0: none)."""

    name: ClassVar[str] = "performer"
    family: ClassVar[str] = "linear"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False

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
        per batch-head for keys): (B, H, N, m) in the compute dtype (float32 for half inputs)."""
        qf, kf, _ = self._shifted_features(q, k)
        return qf, kf

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if not causal and not grad:
            ct = compute_dtype(q.dtype)
            w = self.projection(q.shape[-1], q.device, ct)
            return _forward_tiled(q.to(ct), k.to(ct), v.to(ct), w, self.eps).to(q.dtype)
        qf, kf, log_c = self._shifted_features(q, k)  # (B, H, N, m), (B, H, N, m), (B, H, N, 1)
        floor = _floor(self.eps, log_c, 1 / math.log(2))
        out = linear_attention(qf, kf, v.to(qf.dtype), causal, self.chunk, floor)
        return out.to(q.dtype)

    def _shifted_features(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """φ̃(q), φ̃(k) with max 1 per query row and per batch-head, and log c (B, H, N, 1) with
        φ(q_i)·φ(k_j) = c_i φ̃(q_i)·φ̃(k_j). Only the max-shifts are detached: the output does not
        depend on them, so autograd at fixed shifts gives the formula's own gradient."""
        ct = compute_dtype(q.dtype)
        q, k = q.to(ct), k.to(ct)
        d, m = q.shape[-1], self.features
        w = self.projection(d, q.device, ct) * d**-0.25  # (m, D)
        c = 0.5 / math.sqrt(d)
        half_q, half_k = ((x * x).sum(-1, keepdim=True).mul_(c) for x in (q, k))  # |x/d^¼|²/2
        lq = q @ w.T  # (B, H, N, m): wᵀq/d^¼, i.e. log √m φ(q) + half_q (constant along m)
        lk = (k @ w.T).sub_(half_k)  # (B, H, N, m): log √m φ(k)
        cq = lq.detach().amax(-1, keepdim=True)  # (B, H, N, 1)
        ck = lk.detach().amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
        log_c = (cq - half_q).add_(ck - math.log(m))
        return lq.sub_(cq).exp_(), lk.sub_(ck).exp_(), log_c

    def flops(self, shape: Shape, causal: bool = False) -> float:
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.features
        return 2.0 * bh * 2 * n * d * m + linear_flops(bh, n, m, d, causal, self.chunk)

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        """The projections q W/d^¼, k W/d^¼ need only dq, dk (W is constant): 1× their forward;
        the normalised products have both operands differentiable: 2×."""
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.features
        return 2.0 * bh * 2 * n * d * m + 2 * linear_flops(bh, n, m, d, causal, self.chunk)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.features
        inputs = 3 * bh * n * d * el  # q, k, v in the compute dtype
        feats = 2 * bh * n * (m + 1) * el  # φ(q), φ(k) and row terms
        return inputs + feats + linear_memory(bh, n, m, d, causal, self.chunk, el)

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float
) -> torch.Tensor:
    """Non-causal `forward` without autograd: the same features and products, but each head's
    φ(K) and each tile of φ(Q) rows is made, exponentiated in place and consumed while in cache
    (the (N, m) feature maps never go through main memory)."""
    b, h, n, d = q.shape
    m = w.shape[0]
    # exp(x) = 2^(x·log₂e), with log₂e folded into the projection and the row terms: torch's
    # exp2_ is ~3x faster than exp_ on this CPU (both vectorised to ~1 ulp).
    l2e = 1.0 / math.log(2.0)
    wt = (w * (d**-0.25 * l2e)).transpose(0, 1)  # (D, m)
    qf, kf, vf = (t.reshape(b * h, n, d) for t in (q, k, v))  # (BH, N, D)
    c = 0.5 * l2e / math.sqrt(d)
    half_q, half_k = ((t * t).sum(-1, keepdim=True).mul_(c) for t in (qf, kf))  # (BH, N, 1)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // m)
    for i in range(b * h):
        pk = kf[i] @ wt  # (N, m): log₂ √m φ(k) + |k'|²/2·log₂e, for keys of head i
        ck = (pk.amax(-1, keepdim=True) - half_k[i]).amax()  # max over keys and features
        pk = pk.sub_(half_k[i] + ck).exp2_()  # φ̃(K), max 1
        state, norm = pk.T @ vf[i], pk.sum(0)[:, None]  # (m, D): Σ φ̃(k)vᵀ; (m, 1): Σ φ̃(k)
        for r in range(0, n, rows):  # φ̃(Q) in row tiles, shift = each row's max
            pq = qf[i, r : r + rows] @ wt  # (rows, m)
            cq = pq.amax(-1, keepdim=True)
            pq = pq.sub_(cq).exp2_()
            floor = _floor(eps, cq.sub_(half_q[i, r : r + rows]).add_(ck - math.log2(m)), 1.0)
            torch.div(pq @ state, (pq @ norm).add_(floor), out=out[i, r : r + rows])
    return out.view(b, h, n, d)


_TILE = 1 << 19  # elements of one φ(Q) tile (2 MiB in float32: the L2 of one core)


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
