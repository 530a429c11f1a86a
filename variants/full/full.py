"""Exact softmax attention (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762), four backends.

- ``naive``: materialised softmax(QKᵀ/√d)V, the O(n²)-memory baseline.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; ``sdpa_backend`` pins
  flash | efficient | cudnn | math (auto lets PyTorch choose).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only: no CPU kernels).
- ``flex``: FlexAttention, compiled (https://pytorch.org/blog/flexattention/); the first call per
  shape compiles, which the runner reports as setup time, never as latency.

The sdpa, xformers and flex calls (and why a pinned or missing backend is unsupported) are in
`backends.py`; `naive_attention` is here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.base import Shape, Variant, full_flops, fused_workspace
from attnbench.variants.cache import CACHE_STEP, KVCache
from attnbench.variants.flex import flex_attention_compiled, flex_reasons
from attnbench.variants.full.backends import (
    _causal_block_mask,
    _pinned_sdpa_reasons,
    _sdpa,
    _xformers,
    _xformers_missing,
    _xformers_op,
)
from attnbench.variants.registry import register

BACKENDS = ("naive", "sdpa", "xformers", "flex")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@register
@dataclass
class Full(Variant):
    """Exact attention. Args: backend (naive | sdpa | xformers | flex); sdpa_backend."""

    name: ClassVar[str] = "full"
    family: ClassVar[str] = "full"
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True
    time_exponent: ClassVar[float] = 2.0
    decode_time_exponent: ClassVar[float] = 1.0  # a step reads the whole cache
    decode_memory_exponent: ClassVar[float] = 1.0  # the KV cache

    backend: str = "sdpa"
    sdpa_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(
                f"sdpa_backend={self.sdpa_backend!r}: expected one of {', '.join(SDPA_BACKENDS)}"
            )

    @property
    def label(self) -> str:
        if self.backend == "sdpa" and self.sdpa_backend != "auto":
            return f"full[sdpa:{self.sdpa_backend}]"
        return f"full[{self.backend}]"

    @property
    def _materialises(self) -> bool:
        """Computes the whole score matrix (and masks it when causal)."""
        return self.backend == "naive" or (self.backend, self.sdpa_backend) == ("sdpa", "math")

    @property
    def memory_exponent(self) -> float:  # type: ignore[override]
        return 2.0 if self._materialises else 1.0

    def not_supported_reasons(
        self,
        shape: Shape,
        dtype: torch.dtype,
        device: torch.device | str,
        causal: bool,
        mode: str = "fwd",
    ) -> list[str]:
        reasons = super().not_supported_reasons(shape, dtype, device, causal, mode)
        on_cuda = torch.device(device).type == "cuda"
        if self.backend == "xformers":
            reason = _xformers_missing()
            if reason:
                reasons.append(reason)
            elif not on_cuda:
                reasons.append("xformers: no CPU kernels (memory_efficient_attention needs CUDA)")
        if self.backend == "flex":
            reasons += flex_reasons(device, mode)
        if self.backend == "sdpa" and self.sdpa_backend in ("efficient", "cudnn") and not on_cuda:
            reasons.append(f"sdpa_backend={self.sdpa_backend} has no CPU kernel")
        if on_cuda and self.backend == "sdpa" and self.sdpa_backend != "auto":
            reasons += _pinned_sdpa_reasons(self.sdpa_backend, shape, dtype, device, causal, mode)
        return reasons

    def kernel(
        self,
        shape: Shape,
        device: torch.device | str,
        causal: bool,
        grad: bool,
        dtype: torch.dtype | None = None,
    ) -> str:
        """naive | sdpa (sdpa:<pinned>; the harness adds the backend torch picked) |
        xformers[:<op>] (the op xformers dispatches to, on CUDA when `dtype` is given) |
        flex:compiled (flex never runs uncompiled: variants/flex.py)."""
        if self.backend == "sdpa":
            return "sdpa" if self.sdpa_backend == "auto" else f"sdpa:{self.sdpa_backend}"
        if self.backend == "xformers":
            op = _xformers_op(shape, device, causal, grad, dtype) if dtype else ""
            return f"xformers:{op}" if op else "xformers"
        if self.backend == "flex":
            return "flex:compiled"
        return self.backend

    def flops(self, shape: Shape, causal: bool = False) -> float:
        return full_flops(shape, causal and not self._materialises)

    def algorithm_flops(self, shape: Shape, causal: bool = False) -> float:
        """The method's work whatever the backend: the causal triangle when causal (naive and
        sdpa math execute, and `flops` counts, the whole square)."""
        return full_flops(shape, causal)

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        # Flash-style kernels keep no probabilities: backward recomputes QKᵀ (2.5× forward,
        # FlashAttention's count); naive and sdpa math keep them (2× forward: two gradient
        # matmuls per forward matmul).
        factor = 2.0 if self._materialises else 2.5
        return factor * self.flops(shape, causal)

    def density(self, n: int, causal: bool = False) -> float | None:
        """Fraction of the n×n scores counted. Naive and sdpa math compute every score and mask
        (1.0). The fused kernels are counted by the causal triangle they need, FlashAttention's
        convention, so causal TFLOP/s compare across kernels: how much of the masked part a
        kernel still computes is its own inefficiency, seen in its latency (aten's CPU flash
        kernel runs whole 512-key blocks up to the diagonal: all scores at n <= 512, 3/4 at
        n = 1024; CUDA kernels and flex skip 128-wide tiles)."""
        if not causal or self._materialises:
            return 1.0
        return super().density(n, causal)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     device: torch.device | str = "cpu") -> int:
        """naive: scores and probabilities in the input dtype, the causal mask. sdpa math (the
        composite path, materialised like naive): scores and probabilities in at least float32,
        softmax's all-masked-row flags (2 bytes a score, measured), `is_causal`'s float mask
        (4 bytes per query–key pair). The tiled kernels: the output, log-sum-exp and a bounded
        workspace (`fused_workspace`); flex on top keeps a second output-sized buffer. Fewer
        queries than keys, causal, through sdpa: the bottom-right bias is materialised (bool
        and float, 13–15 bytes per query–key pair measured; 16 counted)."""
        el = torch.empty((), dtype=dtype).element_size()
        bh, nq, nk, d = shape.bh, shape.nq, shape.seq_len, shape.head_dim
        out = bh * nq * d * el + bh * nq * 4  # output + log-sum-exp
        if self.backend == "naive":  # scores, probs, mask
            return out + 2 * bh * nq * nk * el + (nq * nk if causal else 0)
        lower_right = causal and nq < nk and self.backend == "sdpa"
        bias = 16 * nq * nk if lower_right else 0
        if self._materialises:  # sdpa math
            causal_mask = 4 * nq * nk if causal and not lower_right else 0
            return out + bh * nq * nk * (2 * max(el, 4) + 2) + causal_mask + bias
        if self.backend == "flex":
            out += bh * nq * d * el
        return out + bias + fused_workspace(device, shape.head_dim)  # tiled: O(n) + workspace

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if self.backend == "naive":
            return naive_attention(q, k, v, causal)
        if self.backend == "sdpa":
            return _sdpa(q, k, v, causal, self.sdpa_backend)
        if self.backend == "xformers":
            return _xformers(q, k, v, causal)
        nq, nk = q.shape[-2], k.shape[-2]
        block_mask = _causal_block_mask(nq, nk, str(q.device)) if causal else None
        return flex_attention_compiled(q, k, v, block_mask)

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        el = torch.empty((), dtype=dtype).element_size()
        cache = 2 * shape.batch * shape.hkv * (shape.seq_len + CACHE_STEP) * shape.head_dim * el
        row = 2 * shape.bh * (shape.seq_len + 1) * max(el, 4)  # one row of scores and probs
        return cache + row + fused_workspace(device, shape.head_dim)

    def decode_flops(self, shape: Shape) -> float:
        return 4.0 * shape.bh * (shape.seq_len + 1) * shape.head_dim  # q·K and p·V

    # -- decode: a KV cache -----------------------------------------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> KVCache:
        """The cache after a context k, v (B, Hkv, n, D), with room for CACHE_STEP more tokens
        (a full cache grows by copying, as a serving engine's would)."""
        return KVCache.of(k, v)

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVCache
    ) -> tuple[torch.Tensor, KVCache]:
        """Append the token's k, v at the cache's length (a slot past the context: the state
        passed in still holds its own length) and attend over all cached keys."""
        state = state.append(k, v)
        kc, vc = state.keys(), state.values()
        if self.backend == "naive":
            return naive_attention(q, kc, vc, causal=False), state
        if self.backend == "sdpa":
            return _sdpa(q, kc, vc, False, self.sdpa_backend), state
        if self.backend == "xformers":
            return _xformers(q, kc, vc, False), state
        return flex_attention_compiled(q, kc, vc, None), state


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V with the score matrix materialised: q (B, H, Nq, D), k, v (B, Hkv, Nk,
    D); grouped heads by a view (no repeated k/v), causal aligned bottom-right."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[-2]
    qg = q.view(b, hkv, h // hkv, nq, d)  # (B, Hkv, G, Nq, D)
    scores = (qg @ k[:, :, None].transpose(-2, -1)) * (1.0 / math.sqrt(d))  # (B,Hkv,G,Nq,Nk)
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu_(nk - nq + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v[:, :, None]).view(b, h, nq, d)  # (B, H, Nq, D)
