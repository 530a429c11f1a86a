"""The block-sparse engine's GPU path (see `engine`): query blocks in GPU_BUCKETS buckets by
key-block count, each bucket one padded gather and batched matmuls, a constant number of ops;
and the memory model of that path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbench.variants.base import Shape
from attnbench.variants.sparse.engine import (
    LAYOUT_CHUNK,
    _bias,
    _block_rows,
    _key_blocks,
    _query_blocks,
    _unfold,
)

GPU_BUCKETS = 3  # buckets of query blocks on the GPU path (a constant: ops do not grow with n)
GPU_SCORE_BYTES = 32 << 20  # fp32 scores per query head per chunk on the GPU path


@dataclass(frozen=True)
class GpuLayout:
    """Buckets of query blocks for the GPU path: (query blocks relative to q0 (G,), key blocks
    padded to the bucket's largest count (G, L), float32 bias (G, b, L·b), chunks)."""

    n: int
    block: int
    nb: int
    q0: int
    buckets: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], ...]
    inverse: torch.Tensor  # (nb − q0,): bucket order → query-block order


def gpu_buckets(counts: torch.Tensor, k: int = GPU_BUCKETS) -> torch.Tensor:
    """Thresholds (k <= 3,) splitting query blocks by key-block count into k buckets (bucket i:
    t[i−1] < count <= t[i]) that minimise the padded pairs Σ |bucket|·t[i]; t[-1] is the largest
    count. Closed form over at most 64 candidate thresholds, O(nb log nb)."""
    if len(counts) == 0:
        return torch.ones(k, dtype=torch.long)
    c = counts.sort().values
    u = torch.unique(c)
    if len(u) > 64:
        u = torch.unique(u[torch.linspace(0, len(u) - 1, 64).round().long()])
    m, top = len(c), c[-1]
    at = torch.searchsorted(c, u, right=True)  # query blocks with count <= each candidate
    if k == 1:
        return top.view(1)  # (1,)
    # k = 2 or 3: thresholds u[i] <= u[j] (j = i for two buckets), then the largest count
    i, j = torch.meshgrid(torch.arange(len(u)), torch.arange(len(u)), indexing="ij")
    if k == 2:
        j = i
    cost = at[i] * u[i] + (at[j] - at[i]) * u[j] + (m - at[j]) * top
    cost = cost.masked_fill(j < i, torch.iinfo(torch.long).max)
    best = int(cost.flatten().argmin())
    ts = [*[u[i.flatten()[best]], u[j.flatten()[best]]][: k - 1], top]
    return torch.stack(ts).long()


def gpu_pairs(counts: torch.Tensor, k: int = GPU_BUCKETS) -> int:
    """(query block, key block) pairs the GPU path computes for these per-block counts."""
    t = gpu_buckets(counts, k)
    bucket = torch.searchsorted(t, counts)  # bucket of each query block
    return int(t[bucket].sum())


def build_gpu_layout(block_allowed, allowed, n: int, block: int, causal: bool, q0: int,
                     counts: torch.Tensor) -> GpuLayout:
    """The GPU path's buckets (see `engine`'s docstring); `counts` (nb − q0,) are the key-block
    counts of the query blocks q0.. from the closed form. Built on the CPU in slices."""
    b = block
    nb = -(-n // b)
    t = gpu_buckets(counts)
    bucket = torch.searchsorted(t, counts)
    buckets, order = [], []
    for i in range(len(t)):
        rel = torch.nonzero(bucket == i)[:, 0]  # (G,) query blocks relative to q0
        width = max(1, int(t[i]))
        kidx = torch.zeros(len(rel), width, dtype=torch.long)
        valid = torch.zeros(len(rel), width, dtype=torch.bool)
        step = max(1, LAYOUT_CHUNK // nb)
        for s in range(0, len(rel), step):
            mask = _block_rows(block_allowed, rel[s : s + step] + q0, nb, causal)  # (g, nb)
            # stable sort puts each row's key blocks first, in order; the rest is padding
            first = mask.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
            kidx[s : s + step] = first[:, :width]
            valid[s : s + step] = torch.arange(width) < mask.sum(1, keepdim=True)
        bias = _bias(rel + q0, kidx, allowed, n, b, causal, valid, always=True)
        chunks = max(1, -(-len(rel) * b * width * b * 4 // GPU_SCORE_BYTES))
        buckets.append((rel, kidx, bias, chunks))
        order.append(rel)
    inverse = torch.argsort(torch.cat(order))
    return GpuLayout(n, b, nb, q0, tuple(buckets), inverse)


def gpu_blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GpuLayout
) -> torch.Tensor:
    """The GPU path (see `engine`'s docstring): matmuls in the input dtype (fp32 accumulation on
    the GPU), bias and softmax in fp32 (float64 stays float64); a constant number of ops."""
    bsz, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    gq = h // hkv
    b, nb, q0 = layout.block, layout.nb, layout.q0
    qb = _query_blocks(q, hkv, n, b, q0, q.dtype)  # (BHkv, nbq, G·b, D)
    kb, vb = _key_blocks(k, nb, b, k.dtype), _key_blocks(v, nb, b, v.dtype)  # (BHkv, nb, b, D)
    bh = bsz * hkv
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    pieces = []
    for rows, kidx, bias, chunks in layout.buckets:
        g_all, nkb = kidx.shape
        step = max(1, -(-g_all // chunks))
        for s in range(0, max(g_all, 1), step):  # an empty bucket still runs (constant ops)
            r, ki, bi = rows[s : s + step], kidx[s : s + step], bias[s : s + step]
            g = len(r)
            qg = qb.index_select(1, r)  # (BHkv, g, G·b, D)
            kg = kb.index_select(1, ki.flatten()).view(bh, g, nkb * b, d)  # (BHkv, g, L·b, D)
            vg = vb.index_select(1, ki.flatten()).view(bh, g, nkb * b, d)  # (BHkv, g, L·b, D)
            # (BHkv, g, G·b, L·b) scores as (BHkv, g, G, b, L·b): the bias broadcasts over G
            scores = (qg @ kg.transpose(-1, -2)).view(bh, g, gq, b, nkb * b)
            scores = scores.to(stats) + bi[:, None]  # (BHkv, g, G, b, L·b)
            p = torch.softmax(scores, dim=-1).to(v.dtype).view(bh, g, gq * b, nkb * b)  # G·b rows
            pieces.append(p @ vg)  # (BHkv, g, G·b, D)
    out = torch.cat(pieces, 1).index_select(1, layout.inverse)  # query-block order
    return _unfold(out, q, n, b, q0)


def gpu_path_bytes(shape: Shape, counts: torch.Tensor, b: int, el: int) -> tuple[int, int]:
    """The GPU path's largest working set (one chunk's scores and gathered k, v) and its layout,
    in bytes, for query blocks with these key-block counts (el: bytes per input element)."""
    d = shape.head_dim
    t = gpu_buckets(counts)
    width = t[torch.searchsorted(t, counts)]  # padded key blocks of each query block
    layout = int(width.sum()) * (b * b * 4 + 8) + len(counts) * 16
    rows_most = max(1, GPU_SCORE_BYTES // max(1, b * int(t[-1]) * b * 4))
    widest = min(int((width * b * b).sum()), rows_most * b * int(t[-1]) * b)
    scores = shape.bh * widest * (el + 3 * 4)  # matmul, fp32 + bias, softmax, cast
    gathered = 2 * shape.batch * shape.hkv * widest // b * d * el
    return scores + gathered, layout
