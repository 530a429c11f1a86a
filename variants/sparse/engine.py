"""Block-sparse exact attention engine: computes only the active (query-block, key-block) pairs.

A pattern (`attnbench.variants.sparse.pattern.BlockSparse`) names which key blocks each query
block sees (a block predicate, with a closed-form count per query block for the models) and, at
token level, which keys each query sees (a predicate, also the FlexAttention ``mask_mod``). Two
paths run the same pattern:

- CPU (cache-tiled, `engine_cpu`): query blocks with the same number of active key blocks form a
  group. Without grad each group runs torch's fused CPU flash kernel over its key blocks: a
  band (or query blocks sharing one run of key blocks) reads strided windows of k, v, other
  groups gather their blocks into reused buffers. Under autograd each group gathers its
  key/value blocks into a contiguous (BH, G, L·b, D) tensor and runs one batched matmul, a
  softmax and one batched matmul. Only pairs that the predicate cuts (band edges, causal
  diagonal, padding) carry an additive -inf bias (the fused kernel's mask).
- GPU (`engine_gpu`, when `attnbench.variants.base.gpu_path`): the query blocks are split into
  GPU_BUCKETS buckets by their key-block count; each bucket is one gather of all its (query
  block, key block) pairs padded to the bucket's largest count, a -inf bias over the padding and
  the cut pairs, one batched matmul, an fp32 softmax and one batched matmul. The dispatched ops
  per call do not depend on B·H or n (a bucket is split in chunks only past GPU_SCORE_BYTES of
  scores per head); no host syncs; matmuls in the input dtype.

Grouped k/v heads: the G query heads that share a k/v head are folded into the rows of each
query block (k, v are never repeated). Fewer queries than keys: the queries are the last Nq
positions; only the query blocks that hold them run (the first one padded in front).

This module holds what both paths share: the block rows of a pattern, the -inf bias over the cut
pairs, q, k, v as blocks and back, the one-query decode attention over a KV cache, and
FlexAttention's block mask of a pattern (``impl=flex``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LAYOUT_CHUNK = 1 << 22  # elements of one (rows, nb) block-mask slice or bias slice at a time
LAYOUT_TEMP = 32  # bytes per element those slices take while built (int64 temporaries, bools)


def _block_rows(block_allowed, rows: torch.Tensor, nb: int, causal: bool,
                span: int = 1) -> torch.Tensor:
    """(rows, nb) bool: the key blocks of query blocks `rows`; causal: up to the end of the row's
    aligned run of `span` blocks (1: its own block; wider runs share their key blocks, the
    causal cut left to the token mask)."""
    keys = torch.arange(nb)
    mask = block_allowed(rows[:, None], keys[None, :], nb, causal)  # (rows, nb)
    if not causal:
        return mask
    return mask & (keys[None, :] <= ((rows // span + 1) * span - 1)[:, None])


def _token_ok(rows, kidx, valid, allowed, n: int, b: int, causal: bool) -> torch.Tensor:
    """(g, b, L·b) bool: the pairs of query blocks `rows` and key blocks `kidx` (slots where
    `valid` is False are padding) that attend."""
    g, c = kidx.shape
    ar = torch.arange(b)
    qtok = (rows[:, None] * b + ar)[:, :, None]  # (g, b, 1)
    ktok = (kidx[:, :, None] * b + ar).view(g, 1, c * b)  # (g, 1, L·b)
    ok = ktok < n if allowed is None else allowed(qtok, ktok) & (ktok < n)
    if causal:
        ok = ok & (ktok <= qtok)
    if valid is not None:
        ok = ok & valid.repeat_interleave(b, 1)[:, None, :]
    return ok | (qtok >= n)  # padded query rows see anything: finite, and discarded


def _bias(rows: torch.Tensor, kidx: torch.Tensor, allowed, n: int, b: int, causal: bool,
          valid: torch.Tensor | None = None, always: bool = False):
    """Additive (G, b, L·b) float32 bias, -inf on the pairs the token predicate, the causal
    diagonal, the padding or an invalid slot cut; None when the group has no cut pair (unless
    `always`). Built in slices."""
    g, c = kidx.shape
    bias = torch.zeros(g, b, c * b) if always else None
    step = max(1, LAYOUT_CHUNK // max(1, b * c * b))
    for s in range(0, g, step):
        sl = slice(s, s + step)
        ok = _token_ok(rows[sl], kidx[sl], None if valid is None else valid[sl], allowed, n, b,
                       causal)
        if bool(ok.all()):
            continue
        if bias is None:  # slices before this one had no cut pair: their bias stays 0
            bias = torch.zeros(g, b, c * b)
        bias[sl].masked_fill_(~ok, float("-inf"))
    return bias


def _query_blocks(q: torch.Tensor, hkv: int, n: int, b: int, q0: int, work) -> torch.Tensor:
    """q (B, H, Nq, D), the last Nq of n positions → scaled (B·Hkv, nb − q0, G·b, D): query
    blocks q0.. (padded in front and at the end), the G heads of a k/v head in each block's
    rows (head-major)."""
    bsz, h, nq, d = q.shape
    nbq = -(-n // b) - q0
    front = n - nq - q0 * b
    t = q.to(work) * (1.0 / math.sqrt(d))
    if front or nbq * b != nq:
        t = F.pad(t, (0, 0, front, nbq * b - nq - front))
    if h == hkv:
        return t.view(bsz * h, nbq, b, d)  # (B·H, nbq, b, D)
    t = t.view(bsz, hkv, h // hkv, nbq, b, d).transpose(2, 3)  # (B, Hkv, nbq, G, b, D)
    return t.reshape(bsz * hkv, nbq, h // hkv * b, d)  # (B·Hkv, nbq, G·b, D)


def _key_blocks(t: torch.Tensor, nb: int, b: int, work) -> torch.Tensor:
    bsz, hkv, n, d = t.shape
    t = t.to(work)
    t = F.pad(t, (0, 0, 0, nb * b - n)) if nb * b != n else t  # no copy when b divides n
    return t.reshape(bsz * hkv, nb, b, d)  # (B·Hkv, nb, b, D)


def _unfold(out: torch.Tensor, q: torch.Tensor, n: int, b: int, q0: int) -> torch.Tensor:
    """(B·Hkv, nbq, G·b, D) → (B, H, Nq, D), the inverse of `_query_blocks`."""
    bsz, h, nq, d = q.shape
    nbq = out.shape[1]
    hkv = out.shape[0] // bsz
    if h != hkv:
        out = out.view(bsz, hkv, nbq, h // hkv, b, d).transpose(2, 3)  # (B, Hkv, G, nbq, b, D)
    out = out.reshape(bsz, h, nbq * b, d)  # (B, H, nbq·b, D)
    front = n - nq - q0 * b
    return out[:, :, front : front + nq].to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     ok: torch.Tensor | None) -> torch.Tensor:
    """One query per head over cached keys: q (B, H, 1, D), k, v (B, Hkv, L, D), ok (L,) bool
    or None; grouped heads as rows of their k/v head (no repeated k, v); fp32 statistics."""
    bsz, h, _, d = q.shape
    hkv = k.shape[1]
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(bsz, hkv, h // hkv, d) * (1.0 / math.sqrt(d))  # (B, Hkv, G, D)
    scores = (qg @ k.transpose(-1, -2)).to(stats)  # (B, Hkv, G, L)
    if ok is not None:
        scores = scores.masked_fill(~ok, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return (p @ v).view(bsz, h, 1, d)  # (B, Hkv, G, D) → (B, H, 1, D)


def flex_block_mask(allowed, nq: int, n: int, causal: bool, device: torch.device | str):
    """FlexAttention's block mask of a pattern for the last nq of n positions: query i sees key
    j where ``allowed(i, j)`` (broadcasting int tensors; causal: and j <= i)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = n - nq  # queries are the last nq positions

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        ok = allowed(pos, kv_idx)
        return ok & (kv_idx <= pos) if causal else ok

    return create_block_mask(mask_mod, None, None, nq, n, device=str(device))
