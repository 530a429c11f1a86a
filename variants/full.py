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
from variants._flex import compiled_flex, flex_reasons
from variants.base import Shape, Variant, full_flops

BACKENDS = ("naive", "sdpa", "xformers", "flex")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@register
@dataclass
class Full(Variant):
    """Exact attention. Args: backend (naive | sdpa | xformers | flex); sdpa_backend."""

    name: ClassVar[str] = "full"
    family: ClassVar[str] = "full"
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
        if on_cuda and self.backend == "sdpa" and self.sdpa_backend in ("flash", "cudnn"):
            if dtype not in (torch.float16, torch.bfloat16):
                reasons.append(f"sdpa_backend={self.sdpa_backend} needs float16/bfloat16")
            if shape.head_dim > 256 or shape.head_dim % 8:
                reasons.append(
                    f"sdpa_backend={self.sdpa_backend} needs head_dim a multiple of 8 and <= 256"
                )
        return reasons

    def flops(self, shape: Shape, causal: bool = False) -> float:
        # The naive backend computes every score and masks afterwards; the others skip the
        # masked half of the causal triangle.
        return full_flops(shape, causal and self.backend != "naive")

    def density(self, n: int, causal: bool = False) -> float | None:
        return 1.0 if self.backend == "naive" else super().density(n, causal)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        bh, n, d = shape.bh, shape.seq_len, shape.head_dim
        out = bh * n * d * el + bh * n * 4  # output + log-sum-exp
        if self.backend == "naive":
            return out + 2 * bh * n * n * el + (bh * n * n if causal else 0)  # scores, probs, mask
        return out + (64 << 20)  # tiled kernels: O(n) plus a bounded workspace

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        if self.backend == "naive":
            return naive_attention(q, k, v, causal)
        if self.backend == "sdpa":
            with _sdpa_context(self.sdpa_backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if self.backend == "xformers":
            import xformers.ops as xops

            bias = xops.LowerTriangularMask() if causal else None
            # xformers wants (B, N, H, D); a transposed view, no copy.
            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
            )
            return out.transpose(1, 2)
        block_mask = _causal_block_mask(q.shape[-2], str(q.device)) if causal else None
        return compiled_flex()(q, k, v, block_mask=block_mask)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V with the (B, H, N, N) score matrix materialised."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


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


@functools.cache
def _xformers_missing() -> str:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build
        why = f"{type(exc).__name__}: {exc}"
        return f"xformers not importable ({why}); pip install attnbench[xformers]"
    return ""


@functools.lru_cache(maxsize=32)
def _causal_block_mask(n: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal_mod, None, None, n, n, device=device)
