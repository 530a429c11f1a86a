"""The library backends of `full` (`attnbench.variants.full.full`): torch's SDPA (grouped heads,
bottom-right causal mask, a pinned kernel and why torch refuses it), xformers'
memory_efficient_attention (and the op its dispatcher picks) and FlexAttention's causal mask."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape


def _sdpa(q, k, v, causal: bool, backend: str) -> torch.Tensor:
    """SDPA with grouped k/v heads natively (enable_gqa) and, for fewer queries than keys, the
    causal mask aligned bottom-right (is_causal aligns it top-left)."""
    gqa = k.shape[1] != q.shape[1]
    with _sdpa_context(backend):
        if causal and q.shape[-2] != k.shape[-2]:
            bias = _lower_right(q.shape[-2], k.shape[-2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


@functools.lru_cache(maxsize=64)
def _lower_right(nq: int, nk: int):
    """torch's bottom-right causal bias (a tensor subclass holding only the two lengths), made
    once per shape: not per call, and never inside a dispatch mode (an op counter), where torch
    refuses to create a tensor subclass."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(nq, nk)


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
        return out.transpose(1, 2)  # (B, H, Nq, D)
    g = h // hkv
    q5 = q.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4)  # (B, Nq, G, H/G, D)
    # (B, Nk, G, H/G, D): each k/v head expanded over its H/G query heads (stride 0, no copy)
    k5, v5 = (t.transpose(1, 2)[:, :, :, None].expand(-1, -1, -1, g, -1) for t in (k, v))
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)  # (B, Nq, G, H/G, D)
    return out.permute(0, 2, 3, 1, 4).reshape(b, h, nq, d)  # (B, G, H/G, Nq, D) → (B, H, Nq, D)


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
