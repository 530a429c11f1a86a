"""Performer, FAVOR+ (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794).

Positive orthogonal random features φ(x) = exp(wᵀx − |x|²/2 − c)/√m on x = q/d^¼ (and k/d^¼),
so that E[φ(q)·φ(k)] ∝ exp(q·k/√d). As in the paper's code, c is a max subtracted in the
exponent: per query row for queries, per batch-head for keys; both cancel in the normalisation.
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
    """FAVOR+ softmax-kernel attention. Args: features (m), seed, chunk (causal), eps."""

    name: ClassVar[str] = "performer"
    family: ClassVar[str] = "linear"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    exact: ClassVar[bool] = False

    features: int = 256
    seed: int = 0
    chunk: int = 128
    eps: float = 1e-6

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
        """φ(q), φ(k): (B, H, N, m) in the compute dtype (float32 for half inputs)."""
        ct = compute_dtype(q.dtype)
        w = self.projection(q.shape[-1], q.device, ct)
        return _features(q.to(ct), w, is_query=True), _features(k.to(ct), w, is_query=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if not causal and not grad:
            ct = compute_dtype(q.dtype)
            w = self.projection(q.shape[-1], q.device, ct)
            return _forward_tiled(q.to(ct), k.to(ct), v.to(ct), w, self.eps).to(q.dtype)
        qf, kf = self.feature_map(q, k)  # (B, H, N, m)
        out = linear_attention(qf, kf, v.to(qf.dtype), causal, self.chunk, self.eps)
        return out.to(q.dtype)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.features
        return 2.0 * bh * 2 * n * d * m + linear_flops(bh, n, m, d, causal, self.chunk)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        bh, n, d, m = shape.bh, shape.seq_len, shape.head_dim, self.features
        inputs = 3 * bh * n * d * el  # q, k, v in the compute dtype
        feats = 2 * bh * n * (m + 1) * el  # φ(q), φ(k) and row terms
        return inputs + feats + linear_memory(bh, n, m, d, causal, self.chunk, el)

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _features(x: torch.Tensor, w: torch.Tensor, is_query: bool) -> torch.Tensor:
    m, d = w.shape
    proj = x @ (w * d**-0.25).transpose(0, 1)  # (B, H, N, m): wᵀ(x/d^¼)
    dims = (-1,) if is_query else (-2, -1)
    shift = proj.detach().amax(dim=dims, keepdim=True) + 0.5 * math.log(m)  # max, and the 1/√m
    half_sq = (x * x).sum(-1, keepdim=True).mul_(0.5 / math.sqrt(d))  # |x/d^¼|²/2, (B, H, N, 1)
    return proj.sub_(half_sq + shift).exp_()  # one pass over (B, H, N, m), then exp in place


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
    log_m = 0.5 * math.log(m) * l2e
    out = torch.empty_like(qf)
    rows = max(1, _TILE // m)
    for i in range(b * h):
        pk = kf[i] @ wt  # (N, m): φ(K) of head i, shift = its max (one per batch-head)
        pk = pk.sub_(half_k[i] + (pk.amax() + log_m)).exp2_()
        state, norm = pk.T @ vf[i], pk.sum(0)[:, None]  # (m, D): Σ φ(k)vᵀ; (m, 1): Σ φ(k)
        for r in range(0, n, rows):  # φ(Q) in row tiles, shift = each row's max
            pq = qf[i, r : r + rows] @ wt  # (rows, m)
            pq = pq.sub_(half_q[i, r : r + rows] + (pq.amax(-1, keepdim=True) + log_m)).exp2_()
            torch.div(pq @ state, (pq @ norm).add_(eps), out=out[i, r : r + rows])
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
