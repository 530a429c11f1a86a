"""Exact softmax attention (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762), four backends.

- ``naive``: materialised softmax(QKᵀ/√d)V, the O(n²)-memory baseline.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; ``sdpa_backend`` pins
  flash | efficient | cudnn | math (auto lets PyTorch choose).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only: no CPU kernels).
- ``flex``: FlexAttention, compiled (https://pytorch.org/blog/flexattention/); the first call per
  shape compiles, which the runner reports as setup time, never as latency.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants import register
from variants._flex import flex_attention_compiled, flex_reasons
from variants.base import Shape, Variant, full_flops

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
        return 2.0 if self.backend == "naive" else 1.0

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
        flex:compiled (flex never runs uncompiled: variants/_flex.py)."""
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

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        bh, nq, nk, d = shape.bh, shape.nq, shape.seq_len, shape.head_dim
        out = bh * nq * d * el + bh * nq * 4  # output + log-sum-exp
        if self.backend == "naive":  # scores, probs, mask
            return out + 2 * bh * nq * nk * el + (nq * nk if causal else 0)
        lower_right = causal and nq < nk and self.backend == "sdpa"  # a materialised bias
        return out + (64 << 20) + (nq * nk if lower_right else 0)  # tiled: O(n) + workspace

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

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        cache = 2 * shape.batch * shape.hkv * (shape.seq_len + CACHE_STEP) * shape.head_dim * el
        row = 2 * shape.bh * (shape.seq_len + 1) * max(el, 4)  # one row of scores and probs
        return cache + row + (64 << 20)

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


CACHE_STEP = 256


@dataclass(frozen=True)
class KVCache:
    """k, v buffers (B, Hkv, capacity, D) holding `length` tokens."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        b, h, n, d = k.shape
        kb, vb = (t.new_empty(b, h, n + CACHE_STEP, d) for t in (k, v))
        kb[:, :, :n], vb[:, :, :n] = k, v
        return cls(kb, vb, n)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        kb, vb = self.k, self.v
        if self.length == kb.shape[2]:  # full: grow (copy) by CACHE_STEP
            kb, vb = (torch.cat([t, t.new_empty(*t.shape[:2], CACHE_STEP, t.shape[3])], 2)
                      for t in (kb, vb))
        kb[:, :, self.length : self.length + 1] = k
        vb[:, :, self.length : self.length + 1] = v
        return KVCache(kb, vb, self.length + 1)

    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]


def _sdpa(q, k, v, causal: bool, backend: str) -> torch.Tensor:
    """SDPA with grouped k/v heads natively (enable_gqa) and, for fewer queries than keys, the
    causal mask aligned bottom-right (is_causal aligns it top-left)."""
    gqa = k.shape[1] != q.shape[1]
    with _sdpa_context(backend):
        if causal and q.shape[-2] != k.shape[-2]:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(q.shape[-2], k.shape[-2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _xformers(q, k, v, causal: bool) -> torch.Tensor:
    """xformers' memory_efficient_attention; grouped heads as its 5-D (B, N, G, H/G, D) form,
    fewer queries than keys with its bottom-right causal mask."""
    import xformers.ops as xops

    b, h, nq, d = q.shape
    hkv = k.shape[1]
    bias = None
    if causal:
        bias = xops.LowerTriangularMask() if nq == k.shape[-2] else \
            xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    if hkv == h:  # xformers wants (B, N, H, D); a transposed view, no copy
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    g = h // hkv
    q5 = q.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4)  # (B, Nq, G, H/G, D)
    k5, v5 = (t.transpose(1, 2)[:, :, :, None].expand(-1, -1, -1, g, -1) for t in (k, v))
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)  # (B, Nq, G, H/G, D)
    return out.permute(0, 2, 3, 1, 4).reshape(b, h, nq, d)


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
    return (torch.softmax(scores, dim=-1) @ v[:, :, None]).view(b, h, nq, d)


def _sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel(pinned)


def _pinned_sdpa_reasons(
    backend: str, shape: Shape, dtype: torch.dtype, device, causal: bool, mode: str
) -> list[str]:
    """Why torch's own check refuses a pinned CUDA SDPA backend (its debug warnings), the
    hand-kept rule where torch lacks the check."""
    check = {
        "flash": "can_use_flash_attention",
        "efficient": "can_use_efficient_attention",
        "cudnn": "can_use_cudnn_attention",
    }.get(backend)
    if check is None:  # math runs everything
        return []
    try:
        import warnings

        from torch.backends.cuda import SDPAParams

        can_use = getattr(torch.backends.cuda, check)
        b, h, n, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
        # stride-0 views of one head_dim row: the real shape and dtype, no real allocation
        row = torch.empty(d, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
        qkv = row.expand(b, h, n, d)  # (B, H, N, D)
        params = SDPAParams(qkv, qkv, qkv, None, 0.0, causal, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = can_use(params, True)
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return _hand_rule(backend, shape, dtype)
    if ok:
        return []
    why = "; ".join(str(w.message).strip() for w in caught)
    return [f"sdpa_backend={backend}: {why or f'torch.backends.cuda.{check} says no'}"]


def _hand_rule(backend: str, shape: Shape, dtype: torch.dtype) -> list[str]:
    if backend not in ("flash", "cudnn"):
        return []
    reasons = []
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"sdpa_backend={backend} needs float16/bfloat16")
    if shape.head_dim > 256 or shape.head_dim % 8:
        reasons.append(f"sdpa_backend={backend} needs head_dim a multiple of 8 and <= 256")
    return reasons


def _xformers_op(shape: Shape, device, causal: bool, grad: bool, dtype: torch.dtype) -> str:
    """Name of the op xformers' dispatcher picks for the forward (CUDA only; "" if unknown)."""
    if torch.device(device).type != "cuda" or _xformers_missing():
        return ""
    try:
        from xformers.ops import LowerTriangularMask, fmha
        from xformers.ops.fmha.dispatch import _dispatch_fw

        b, h, n, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
        qkv = torch.empty(d, device=device, dtype=dtype).expand(b, n, h, d)  # (B, N, H, D)
        bias = LowerTriangularMask() if causal else None
        op = _dispatch_fw(fmha.Inputs(query=qkv, key=qkv, value=qkv, attn_bias=bias), grad)
        return str(getattr(op, "NAME", op.__name__))
    except Exception:  # a private API: naming the op is a nicety, never a failure
        return ""


@functools.cache
def _xformers_missing() -> str:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build
        why = f"{type(exc).__name__}: {exc}"
        return f"xformers not importable ({why}); pip install attnbench[xformers]"
    return ""


@functools.lru_cache(maxsize=32)
def _causal_block_mask(nq: int, nk: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = nk - nq  # queries are the last nq positions

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal_mod, None, None, nq, nk, device=device)
