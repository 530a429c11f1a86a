"""Linear attention, φ(x) = elu(x) + 1 (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

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


class LinearState(NamedTuple):
    """Decode state per batch and k/v head: S = Σ φ(k)ᵀv (B, Hkv, F, D), z = Σ φ(k)
    (B, Hkv, F, 1), in the compute dtype."""

    s: torch.Tensor
    z: torch.Tensor


@register
@dataclass
class Linear(Variant):
    """φ(Q)φ(K)ᵀV / (φ(Q)Σφ(K) + eps): O(n·d²) time, causal by chunked prefix sums.

    Args: chunk (causal chunk length), eps (normaliser floor).
    """

    name: ClassVar[str] = "linear"
    family: ClassVar[str] = "linear"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    decode_time_exponent: ClassVar[float] = 0.0  # a fixed-size state per step
    decode_memory_exponent: ClassVar[float] = 0.0
    rewrites_state: ClassVar[bool] = True  # a decode step reads S, z and writes them anew
    exact: ClassVar[bool] = False
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    chunk: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError(f"chunk={self.chunk}: must be positive")
        if self.eps < 0:
            raise ValueError(f"eps={self.eps}: must be non-negative")

    @property
    def label(self) -> str:
        return self._label({})

    def feature_map(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(q), φ(k) = elu + 1, in the compute dtype (float32 for half inputs)."""
        ct = compute_dtype(q.dtype)
        return F.elu(q.to(ct)).add_(1), F.elu(k.to(ct)).add_(1)  # elu saves its input

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if path(q.device, causal, _grad(q, k, v)) == "tiled":
            ct = compute_dtype(q.dtype)
            return _forward_tiled(q.to(ct), k.to(ct), v.to(ct), self.eps).to(q.dtype)
        qf, kf = self.feature_map(q, k)  # (B, H, Nq, D), (B, Hkv, Nk, D)
        mm = mm_dtype(q.dtype, q.device, states=True)
        return linear_attention(qf, kf, v, causal, self.chunk, self.eps, mm).to(q.dtype)

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        return path_name(self.chunk, shape, device, causal, grad)

    def decode_kernel(self, shape: Shape, device) -> str:
        """A step updates the state S, z and reads it: a few matmuls, no prefix path."""
        return "state:step"

    # -- decode: the recurrent state ------------------------------------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> LinearState:
        """S, z after the context k, v (B, Hkv, n, D): one batched matmul (no step loop)."""
        ct = compute_dtype(k.dtype)
        kf = F.elu(k.to(ct)).add_(1)
        s, z = context_state(kf, v, ct)
        return LinearState(s, z)

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState
    ) -> tuple[torch.Tensor, LinearState]:
        """The state plus the new token's φ(k)ᵀv (a new state: the one passed in is unchanged),
        then q (B, H, 1, D) read against it, the G query heads of a group as rows."""
        ct = compute_dtype(q.dtype)
        qf, kf = self.feature_map(q, k)  # (B, H, 1, D), (B, Hkv, 1, D)
        s, z = context_state(kf, v, ct)
        state = LinearState(state.s + s, state.z + z)
        b, h, _, d = q.shape
        rows = qf.reshape(b, state.s.shape[1], -1, d)  # (B, Hkv, G, D)
        out = (rows @ state.s) / (rows @ state.z).add_(self.eps)
        return out.view(b, h, 1, d).to(q.dtype), state

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        """Building S = φ(K)ᵀV over the context holds φ(K) (and a cast of k and v where the
        compute dtype differs) beside the (D, D) state; a step makes a new state. Not the
        forward's model: no query-side chunks (10 GB at n = 65536 for llama3_8b's heads,
        against a 2 MB state)."""
        ct = compute_dtype(dtype)
        el = max(torch.empty((), dtype=ct).element_size(),
                 torch.empty((), dtype=mm_dtype(dtype, device, states=True)).element_size())
        b, hkv, n, d = shape.batch, shape.hkv, shape.seq_len, shape.head_dim
        context = 3 * b * hkv * n * d * el  # k in ct, φ(k), v in the matmul dtype
        state = 3 * b * hkv * (d * d + d) * el  # S, z, the step's new S
        step = 4 * shape.bh * d * el  # φ(q), numerator, normaliser, output
        return context + state + step

    def decode_flops(self, shape: Shape) -> float:
        d = shape.head_dim  # φ(k)ᵀv, then q against S and z
        return 2.0 * shape.batch * (shape.hkv * d * d + shape.heads * d * (d + 1))

    # -- models ---------------------------------------------------------------------------------
    def flops(self, shape: Shape, causal: bool = False) -> float:
        return linear_flops(shape, shape.head_dim, causal, self.chunk)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        ct = compute_dtype(dtype)
        el = torch.empty((), dtype=ct).element_size()
        b, d = shape.batch, shape.head_dim
        # φ(q), φ(k) (copies in the compute dtype), v's copy where it is cast
        feats = b * (shape.heads * shape.nq + shape.hkv * shape.seq_len * (2 if ct != dtype
                                                                           else 1)) * d * el
        return feats + linear_memory(shape, d, causal, self.chunk, el, el)

    def density(self, n: int, causal: bool = False) -> float | None:
        return None


def _grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _forward_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-causal `forward` without autograd (CPU), one k/v head (and row tile) at a time: the
    same features and products, but q, k, v are read once and the output written once; features,
    numerator and normaliser stay in cache (memory-bound: traffic is what costs). The G query
    heads of a group are rows against the group's one state."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qf = q.reshape(b * hkv, -1, d)  # (B·Hkv, G·Nq, D)
    kf, vf = (t.reshape(b * hkv, nk, d) for t in (k, v))  # (B·Hkv, Nk, D)
    out = torch.empty_like(qf)
    rows = max(1, _TILE // d)
    for i in range(b * hkv):
        state, norm = q.new_zeros(d, d), q.new_zeros(d, 1)
        for r in range(0, nk, rows):  # state Σ φ(k)vᵀ (D, D) and normaliser Σ φ(k) (D, 1)
            phi = F.elu(kf[i, r : r + rows]).add_(1)
            state += phi.T @ vf[i, r : r + rows]  # not addmm_: FLOP counters see a matmul
            norm.add_(phi.sum(0)[:, None])
        for r in range(0, qf.shape[1], rows):
            phi = F.elu(qf[i, r : r + rows]).add_(1)
            torch.div(phi @ state, (phi @ norm).add_(eps), out=out[i, r : r + rows])
    return out.view(b, h, nq, d)


_TILE = 1 << 17  # elements of one row tile (512 KiB in float32)
