"""Block-sparse exact attention engine: computes only the active (query-block, key-block) pairs.

A pattern names which key blocks each query block sees (a block predicate, with a closed-form
count per query block for the models) and, at token level, which keys each query sees (a
predicate, also the FlexAttention ``mask_mod``). Two paths run the same pattern:

- CPU (cache-tiled): query blocks with the same number of active key blocks form a group; each
  group gathers its key/value blocks into a contiguous (BH, G, L·b, D) tensor and runs one
  batched matmul, a softmax over the gathered keys and one batched matmul (bands read strided
  windows of k, v without a gather; unbiased groups run torch's fused sdpa). Only pairs that the
  predicate cuts (band edges, causal diagonal, padding) carry an additive -inf bias.
- GPU (`variants.base.gpu_path`): the query blocks are split into GPU_BUCKETS buckets by their
  key-block count; each bucket is one gather of all its (query block, key block) pairs padded to
  the bucket's largest count, a -inf bias over the padding and the cut pairs, one batched
  matmul, an fp32 softmax and one batched matmul. The dispatched ops per call do not depend on
  B·H or n (a bucket is split in chunks only past GPU_SCORE_BYTES of scores per head); no host
  syncs; matmuls in the input dtype.

Grouped k/v heads: the G query heads that share a k/v head are folded into the rows of each
query block (k, v are never repeated). Fewer queries than keys: the queries are the last Nq
positions; only the query blocks that hold them run (the first one padded in front).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants._flex import flex_attention_compiled, flex_reasons
from variants.base import Shape, Variant, gpu_path
from variants.full import KVCache

IMPLS = ("blocked", "flex")
CHUNK_BYTES = 16 << 20  # score-tile budget per batched matmul; bounds peak memory at any n
MERGE_ROWS = 256  # at most this many query rows per tile when query blocks share key blocks
GPU_BUCKETS = 3  # buckets of query blocks on the GPU path (a constant: ops do not grow with n)
GPU_SCORE_BYTES = 32 << 20  # fp32 scores per query head per chunk on the GPU path


@dataclass(frozen=True)
class Layout:
    """Groups of query blocks with equal key-block counts, ready for the CPU engine."""

    n: int
    block: int
    nb: int
    q0: int  # first query block that runs (queries are the last Nq positions)
    # (query blocks relative to q0 (G,), key blocks (G, L), additive bias (G, b, L·b) float32 or
    # None, merge, band): merge = runs of that many consecutive query blocks see the same key
    # blocks and run as one (merge·b)-row tile; band = (first query block relative to q0, its
    # first key block) when consecutive query blocks' key blocks are one run shifting with them.
    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int,
                        tuple[int, int] | None], ...]
    computed: int  # scores computed that lie inside the n×n matrix
    pairs: int  # (query block, key block) pairs computed, padding included


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


LAYOUT_CHUNK = 1 << 22  # elements of one (rows, nb) block-mask slice or bias slice at a time
LAYOUT_TEMP = 32  # bytes per element those slices take while built (int64 temporaries, bools)


def _block_rows(block_allowed, rows: torch.Tensor, nb: int, causal: bool) -> torch.Tensor:
    keys = torch.arange(nb)
    mask = block_allowed(rows[:, None], keys[None, :], nb, causal)  # (rows, nb)
    return mask & (keys[None, :] <= rows[:, None]) if causal else mask


def build_layout(block_allowed, allowed, n: int, block: int, causal: bool,
                 q0: int = 0) -> Layout:
    """Layout from a block predicate ``block_allowed(I, J, nb, causal)`` and a token predicate
    ``allowed(q, k)`` (broadcasting int tensors, causal not applied; None when the pattern is
    whole blocks, so that only the causal diagonal and the padding cut pairs), for the query
    blocks q0.. .

    Memory: the groups (O(active pairs), plus a float32 bias over the pairs of groups that need
    one) and slices of at most LAYOUT_CHUNK elements; never an (nb, nb) tensor.
    """
    b = block
    nb = -(-n // b)
    found: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    step = max(1, LAYOUT_CHUNK // nb)
    for s in range(q0, nb, step):
        rows = torch.arange(s, min(nb, s + step))
        mask = _block_rows(block_allowed, rows, nb, causal)
        counts = mask.sum(1)
        for c in torch.unique(counts).tolist():
            sel = counts == c
            kidx = torch.nonzero(mask[sel])[:, 1].view(-1, c)  # (G, L), sorted
            found.setdefault(c, []).append((rows[sel], kidx))
    inside = (n - torch.arange(nb) * b).clamp(0, b)  # real tokens per block
    groups, computed, pairs = [], 0, 0
    for c in sorted(found):
        rows = torch.cat([r for r, _ in found[c]])  # (G,)
        kidx = torch.cat([k for _, k in found[c]])  # (G, L)
        computed += int((inside[rows] * inside[kidx].sum(1)).sum())
        pairs += kidx.numel()
        bias = _bias(rows, kidx, allowed, n, b, causal)
        shift = torch.arange(len(rows))
        band = bool(
            (rows == rows[0] + shift).all()
            and (kidx == kidx[0, 0] + shift[:, None] + torch.arange(c)).all()
        )
        start = (int(rows[0]) - q0, int(kidx[0, 0])) if band else None
        merge = _merge(rows, kidx, max(1, MERGE_ROWS // b))
        groups.append((rows - q0, kidx, bias, merge, start))
    return Layout(n, b, nb, q0, tuple(groups), computed, pairs)


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


def _merge(rows: torch.Tensor, kidx: torch.Tensor, most: int) -> int:
    """Largest R <= most dividing G such that runs of R consecutive query blocks share keys."""
    g, c = kidx.shape
    for r in range(min(most, g), 1, -1):
        if g % r:
            continue
        runs, keys = rows.view(-1, r), kidx.view(-1, r, c)
        if (runs - runs[:, :1] == torch.arange(r)).all() and (keys == keys[:, :1]).all():
            return r
    return 1


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
        return top.view(1)
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
    """The GPU path's buckets (see the module docstring); `counts` (nb − q0,) are the key-block
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


# -- the two paths ---------------------------------------------------------------------------
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
        return t.view(bsz * h, nbq, b, d)
    t = t.view(bsz, hkv, h // hkv, nbq, b, d).transpose(2, 3)  # (B, Hkv, nbq, G, b, D)
    return t.reshape(bsz * hkv, nbq, h // hkv * b, d)


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
        out = out.view(bsz, hkv, nbq, h // hkv, b, d).transpose(2, 3)
    out = out.reshape(bsz, h, nbq * b, d)
    front = n - nq - q0 * b
    return out[:, :, front : front + nq].to(q.dtype)


def blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout
) -> torch.Tensor:
    """Exact softmax attention over the pairs in `layout` (the CPU path): q (B, H, Nq, D), k, v
    (B, Hkv, Nk, D); out (B, H, Nq, D)."""
    bsz, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    gq = h // hkv  # query heads per k/v head
    b, nb, q0 = layout.block, layout.nb, layout.q0
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _query_blocks(q, hkv, n, b, q0, work)  # (BHkv, nbq, G·b, D)
    kb, vb = _key_blocks(k, nb, b, work), _key_blocks(v, nb, b, work)  # (BHkv, nb, b, D)
    bh = bsz * hkv
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    pieces, order = [], []
    # without grad each piece is written straight to its query blocks (no cat + reorder)
    out = None if grad else torch.empty_like(qb)

    def put(rows: torch.Tensor, piece: torch.Tensor) -> None:  # piece: (BHkv, G, Gq·b, D)
        if out is None:
            pieces.append(piece)
        else:
            out.index_copy_(1, rows, piece)

    for rows, kidx, bias, merge, band in layout.groups:
        g_all, nkb = kidx.shape
        tile = merge * b  # query rows per tile and head
        # Without grad and bias, torch's fused sdpa kernel runs the tiles (no score tile kept);
        # then the budget bounds the gathered k, v instead of the scores.
        fused = not grad and bias is None
        per_tile = bh * nkb * b * qb.element_size() * (2 * d if fused else gq * tile)
        step = merge * max(1, CHUNK_BYTES // per_tile)
        for s in range(0, g_all, step):
            r, ki = rows[s : s + step], kidx[s : s + step]
            g = len(r)
            bi = None if bias is None else bias[s : s + step].to(work)
            if band is not None and not grad:
                put(r, _attend_band(qb, kb, vb, band[0] + s, band[1] + s, g, nkb, bi, gq))
                continue
            t = g // merge  # tiles of `merge` query blocks sharing their key blocks
            ki = ki[::merge].flatten()  # index_select: contiguous block copies (fancy indexing
            qg = qb.index_select(1, r).view(bh, t, tile * gq, d)  # is slow); (BHkv, t, R·G·b, D)
            kg = kb.index_select(1, ki).view(bh, t, nkb * b, d)  # (BHkv, t, L·b, D)
            vg = vb.index_select(1, ki).view(bh, t, nkb * b, d)
            if fused:  # q is already scaled
                o = F.scaled_dot_product_attention(qg, kg, vg, scale=1.0)
            else:
                bi = None if bi is None else bi.view(t, merge, 1, b, nkb * b)
                o = _attend(qg, kg, vg, bi, grad)
            put(r, o.view(bh, g, gq * b, d))
        order.append(rows)
    if out is None:
        out = torch.cat(pieces, 1)  # (BHkv, nbq, G·b, D), query blocks in group order
        out = out.index_select(1, torch.argsort(torch.cat(order)))
    return _unfold(out, q, n, b, q0)


def _attend(qg, kg, vg, bias, grad: bool) -> torch.Tensor:
    """qg (BHkv, t, R·G·b, D), kg, vg (BHkv, t, L·b, D), bias (t, R, 1, b, L·b) or None."""
    scores = qg @ kg.transpose(-1, -2)  # (BHkv, t, R·G·b, L·b)
    if bias is not None:
        bh, t, rows, width = scores.shape
        r, b = bias.shape[1], bias.shape[3]
        s5 = scores.view(bh, t, r, rows // (r * b), b, width)
        scores = (s5 + bias if grad else s5.add_(bias)).view(bh, t, rows, width)
    # torch.softmax is one fused pass per row (max, exp-sum, scale); it beats in-place
    # amax/sub_/exp_/sum plus normalising the output, measured on CPU.
    return torch.softmax(scores, dim=-1) @ vg


def _attend_band(qb, kb, vb, q0: int, k0: int, g: int, nkb: int, bias, gq: int) -> torch.Tensor:
    """A band of query blocks q0.. over key blocks k0.. without gathering: each query block's
    L·b keys are an overlapping strided view of k, which 3-D bmm takes as is (4-D matmul would
    copy it)."""
    bh, _, rows, d = qb.shape
    b = kb.shape[2]
    scores = qb.new_empty(bh, g, rows, nkb * b)  # (BHkv, g, G·b, L·b)
    out = qb.new_empty(bh, g, rows, d)
    kflat, vflat = kb.view(bh, -1, d), vb.view(bh, -1, d)  # (BHkv, nb·b, D)

    def window(t: torch.Tensor) -> torch.Tensor:  # (g, L·b, D), consecutive rows shift by b
        return t.as_strided((g, nkb * b, d), (b * d, d, 1), t.storage_offset() + k0 * b * d)

    for i in range(bh):  # one 3-D bmm per head; the batch runs over the g query blocks
        torch.bmm(qb[i, q0 : q0 + g], window(kflat[i]).transpose(1, 2), out=scores[i])
    if bias is not None:
        scores.view(bh, g, gq, b, nkb * b).add_(bias[:, None])
    p = torch.softmax(scores, dim=-1)
    for i in range(bh):
        torch.bmm(p[i], window(vflat[i]), out=out[i])
    return out


def gpu_blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GpuLayout
) -> torch.Tensor:
    """The GPU path (see the module docstring): matmuls in the input dtype (fp32 accumulation on
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
            vg = vb.index_select(1, ki.flatten()).view(bh, g, nkb * b, d)
            scores = (qg @ kg.transpose(-1, -2)).view(bh, g, gq, b, nkb * b)
            scores = scores.to(stats) + bi[:, None]  # (BHkv, g, G, b, L·b)
            p = torch.softmax(scores, dim=-1).to(v.dtype).view(bh, g, gq * b, nkb * b)
            pieces.append(p @ vg)  # (BHkv, g, G·b, D)
    out = torch.cat(pieces, 1).index_select(1, layout.inverse)  # query-block order
    return _unfold(out, q, n, b, q0)


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
    return (p @ v).view(bsz, h, 1, d)


@dataclass
class BlockSparse(Variant):
    """Shared base of the block-sparse and local variants. Subclasses define the fields
    ``block`` and ``impl`` and the pattern: `block_allowed` (the block predicate), `row_counts`
    (its closed-form count per query block) and, for token-level patterns, `allowed` with
    ``_token_level = True``.

    Density, FLOPs and the memory model come from `row_counts` in O(nb) and allocate nothing of
    size nb² or n², so the memory cap is checked before anything large exists; the layout is
    built on the first call, and `memory_bytes` counts it."""

    family: ClassVar[str] = "sparse"
    time_exponent: ClassVar[float] = 1.0
    memory_exponent: ClassVar[float] = 1.0
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.block <= 0:
            raise ValueError(f"block={self.block}: must be > 0")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}: expected one of {', '.join(IMPLS)}")
        self._check_params()
        self._cache: dict = {}

    def _check_params(self) -> None:
        """Subclasses raise ValueError naming the offending field."""

    # -- the pattern ----------------------------------------------------------------------------
    def block_allowed(self, i: torch.Tensor, j: torch.Tensor, nb: int,
                      causal: bool = False) -> torch.Tensor:
        """Whether query block i sees key block j (broadcasting int tensors), for a sequence of
        nb blocks. The causal mask j <= i is applied by the caller; `causal` is for patterns
        whose rows differ under it (bigbird draws its random blocks among the visible ones)."""
        raise NotImplementedError

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form in O(nb), never an (nb, nb) tensor: per query block, how many key blocks
        it sees (nb,) int64, and whether the last key block is one of them (nb,) bool."""
        raise NotImplementedError

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        """(nb, nb) bool: key blocks each query block sees (causal applied). O(nb²): for
        FlexAttention's table and tests, never for the models (those use `row_counts`)."""
        out = torch.empty(nb, nb, dtype=torch.bool)
        step = max(1, LAYOUT_CHUNK // max(nb, 1))
        for s in range(0, nb, step):  # in slices: no (nb, nb) int64 temporaries
            out[s : s + step] = _block_rows(self.block_allowed, torch.arange(s, min(nb, s + step)),
                                            nb, causal)
        return out

    def allowed(self, q: torch.Tensor, k: torch.Tensor, n: int,
                causal: bool = False) -> torch.Tensor:
        """Token predicate (broadcasting int tensors q, k), causal not applied. Default: the
        block predicate, i.e. whole blocks."""
        return self.block_allowed(q // self.block, k // self.block, self._nb(n), causal)

    def _table(self, n: int, causal: bool) -> torch.Tensor:
        key = ("table", n, causal)
        if key not in self._cache:
            self._cache[key] = self.block_layout(self._nb(n), causal)
        return self._cache[key]

    def _nb(self, n: int) -> int:
        return -(-n // self.block)

    def _token_predicate(self, n: int, causal: bool):
        if not self._token_level:
            return None
        return lambda q, k: self.allowed(q, k, n, causal)

    def layout(self, n: int, causal: bool, device: torch.device | str = "cpu",
               q0: int = 0) -> Layout:
        """The CPU engine's layout for query blocks q0.., built on the CPU (then moved) the
        first time it is needed: after the memory cap was checked against `memory_bytes`."""
        key = ("layout", n, causal, str(device), q0)
        if key not in self._cache:
            lay = build_layout(self.block_allowed, self._token_predicate(n, causal), n,
                               self.block, causal, q0)
            groups = tuple(
                (r.to(device), ki.to(device), None if bi is None else bi.to(device), mg, band)
                for r, ki, bi, mg, band in lay.groups
            )
            self._cache[key] = dataclasses.replace(lay, groups=groups)
        return self._cache[key]

    def gpu_layout(self, n: int, causal: bool, device: torch.device | str = "cpu",
                   q0: int = 0) -> GpuLayout:
        """The GPU path's buckets, built on the CPU and cached per device (no copy per call)."""
        key = ("gpu", n, causal, str(device), q0)
        if key not in self._cache:
            counts = self.row_counts(self._nb(n), causal)[0][q0:]
            lay = build_gpu_layout(self.block_allowed, self._token_predicate(n, causal), n,
                                   self.block, causal, q0, counts)
            buckets = tuple((r.to(device), ki.to(device), bi.to(device), c)
                            for r, ki, bi, c in lay.buckets)
            self._cache[key] = dataclasses.replace(lay, buckets=buckets,
                                                   inverse=lay.inverse.to(device))
        return self._cache[key]

    # -- models: closed form from `row_counts`, O(nb) ------------------------------------------
    def computed(self, n: int, causal: bool = False) -> int:
        """Scores inside the n×n matrix of the active blocks (the causal diagonal and band
        edges included, padding not), equal to `layout(n, causal).computed` without building
        it: the density's numerator."""
        b = self.block
        counts, last = self.row_counts(self._nb(n), causal)
        inside = (n - torch.arange(len(counts)) * b).clamp(0, b)  # real tokens per query block
        keys = counts * b - last.long() * (len(counts) * b - n)  # real keys each query block sees
        return int((inside * keys).sum())

    def pairs(self, shape: Shape, causal: bool = False, device: torch.device | str = "cpu"
              ) -> int:
        """(query block, key block) pairs one head computes, padding included: the CPU path's
        layout, or (gpu_path(device)) the GPU path's buckets padded to their largest count."""
        nb = self._nb(shape.seq_len)
        q0 = (shape.seq_len - shape.nq) // self.block
        counts = self.row_counts(nb, causal)[0][q0:]
        return gpu_pairs(counts) if gpu_path(device) else int(counts.sum())

    def key_mask(self, rows: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        q, k = rows.cpu(), torch.arange(n)[None, :]
        step = max(1, LAYOUT_CHUNK // max(n, 1))  # slices: int64 temporaries stay small
        parts = []
        for s in range(0, len(q), step):
            qs = q[s : s + step, None]
            mask = self.allowed(qs, k, n, causal)
            parts.append(mask & (k <= qs) if causal else mask)
        out = torch.cat(parts) if parts else torch.zeros(0, n, dtype=torch.bool)
        return out.to(rows.device)

    def density(self, n: int, causal: bool = False) -> float:
        """Scores of the active blocks that lie inside the n×n matrix, over n² (the padding of a
        partial last block is computed but not counted here; `flops` counts it)."""
        return self.computed(n, causal) / (n * n)

    def flops(self, shape: Shape, causal: bool = False,
              device: torch.device | str = "cpu") -> float:
        """What runs: every computed block pair in full (b² scores, padding and the masked part
        of partial blocks included), QKᵀ and PV: 4·B·H·pairs·b²·D. The CPU path by default; the
        GPU path's padded buckets when gpu_path(device)."""
        b = self.block
        return 4.0 * shape.bh * shape.head_dim * b * b * self.pairs(shape, causal, device)

    def backward_flops(self, shape: Shape, causal: bool = False,
                       device: torch.device | str = "cpu") -> float:
        """Autograd through the gathered matmuls: two gradient matmuls per forward matmul, over
        the same block pairs (both paths run the explicit-score form under autograd)."""
        return 2.0 * self.flops(shape, causal, device)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     device: torch.device | str = "cpu") -> int:
        """Upper estimate of one forward's peak, the first call's layout included (it is built
        then and kept): closed form from `row_counts`, nothing of size nb² or n² allocated."""
        el = torch.empty((), dtype=dtype).element_size()
        b, d, n = self.block, shape.head_dim, shape.seq_len
        nb = self._nb(n)
        q0 = (n - shape.nq) // b
        padded_q = shape.bh * (nb - q0) * b * d * 4
        padded_kv = shape.batch * shape.hkv * nb * b * d * 4
        out = shape.bh * shape.nq * d * el
        if self.impl == "flex":  # the (nb, nb) block table, then FlexAttention's own kernel
            return int(nb * nb + LAYOUT_CHUNK * LAYOUT_TEMP + padded_q + padded_kv + out)
        counts, last = self.row_counts(nb, causal)
        counts, last = counts[q0:], last[q0:]
        building = min(nb * nb, LAYOUT_CHUNK) * LAYOUT_TEMP  # slices while the layout is built
        if gpu_path(device):
            t = gpu_buckets(counts)
            width = t[torch.searchsorted(t, counts)]  # padded key blocks of each query block
            layout = int(width.sum()) * (b * b * 4 + 8) + len(counts) * 16
            rows_most = max(1, GPU_SCORE_BYTES // max(1, b * int(t[-1]) * b * 4))
            widest = min(int((width * b * b).sum()), rows_most * b * int(t[-1]) * b)
            scores = shape.bh * widest * (el + 3 * 4)  # matmul, fp32 + bias, softmax, cast
            gathered = 2 * shape.batch * shape.hkv * widest // b * d * el
            return int(4 * padded_q + 2 * padded_kv + max(scores + gathered, building) + out
                       + layout)
        bh, bhkv = shape.bh, shape.batch * shape.hkv
        # Groups are the query blocks with equal counts; a group carries a bias over all its
        # pairs when any of its rows has a cut pair (an upper bound for token-level patterns).
        cut = torch.ones_like(last) if causal or self._token_level else last & (n % b != 0)
        size = torch.bincount(counts)  # query blocks per count
        biased = torch.bincount(counts, weights=cut.double()) > 0
        width = torch.arange(len(size))  # key blocks per row of each group
        indices = int((size * (1 + width)).sum()) * 8  # rows and key blocks, int64
        layout = indices + int((size * width)[biased].sum()) * b * b * 4  # + float32 biases
        # the largest working set of one chunk, over the groups (no-grad paths)
        work, most = 0, max(1, MERGE_ROWS // b)
        present = size > 0
        if (present & ~biased).any():  # fused sdpa: gathered k, v (budgeted), gathered q, out
            c = int(width[present & ~biased].max())
            work = max(CHUNK_BYTES, 2 * bhkv * c * b * d * 4) + 2 * padded_q
        if (present & biased).any():  # tile scores and their softmax + gathered k, v
            c = int(width[present & biased].max())
            tile = max(CHUNK_BYTES, bh * most * b * c * b * 4)
            work = max(work, 2 * tile + 2 * tile * d // b)
        # padded q, pieces, cat, reorder; padded k, v + one chunk's working set (or the
        # layout's slices, freed before it) + output + the layout itself
        return int(4 * padded_q + 2 * padded_kv + max(work, building) + out + layout)

    def not_supported_reasons(
        self,
        shape: Shape,
        dtype: torch.dtype,
        device: torch.device | str,
        causal: bool,
        mode: str = "fwd",
    ) -> list[str]:
        reasons = super().not_supported_reasons(shape, dtype, device, causal, mode)
        if self.impl == "flex":
            reasons += flex_reasons(device, mode)
        return reasons + self._fit_reasons(shape.seq_len)

    def _fit_reasons(self, n: int) -> list[str]:
        return []

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        nq, n = q.shape[-2], k.shape[-2]
        if self.impl == "flex":
            return flex_attention_compiled(q, k, v, self._flex_mask(nq, n, causal, q.device))
        q0 = (n - nq) // self.block
        if gpu_path(q.device):
            return gpu_blocksparse_attention(q, k, v, self.gpu_layout(n, causal, q.device, q0))
        return blocksparse_attention(q, k, v, self.layout(n, causal, q.device, q0))

    def kernel(self, shape: Shape, device: torch.device | str, causal: bool, grad: bool) -> str:
        """``flex:compiled``; on the GPU path ``blocksparse:bucket-gather`` (padded gathers of
        GPU_BUCKETS buckets); else ``blocksparse:`` and the CPU paths the groups take, joined by
        ``+``: band (strided key windows, no gather), sdpa-gather (gathered key blocks through
        fused sdpa) and matmul-gather (gathered key blocks, explicit scores with the -inf bias
        where the pattern cuts, softmax, matmul). Mirrors the engine."""
        if self.impl == "flex":
            return "flex:compiled"
        if gpu_path(device):
            return "blocksparse:bucket-gather"
        paths = set()
        q0 = (shape.seq_len - shape.nq) // self.block
        for _, _, bias, _, band in self.layout(shape.seq_len, causal, "cpu", q0).groups:
            if band is not None and not grad:
                paths.add("band")
            elif not grad and bias is None:
                paths.add("sdpa-gather")
            else:
                paths.add("matmul-gather")
        order = ("band", "sdpa-gather", "matmul-gather")
        return "blocksparse:" + "+".join(p for p in order if p in paths)

    def _flex_mask(self, nq: int, n: int, causal: bool, device: torch.device):
        key = ("flex", nq, n, causal, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            if self._token_level:
                def allowed(q, k):
                    return self.allowed(q, k, n, causal)
            else:  # table lookup on the device
                table = self._table(n, causal).to(device)
                blk = self.block

                def allowed(q, k):
                    return table[q // blk, k // blk]

            offset = n - nq  # queries are the last nq positions

            def mask_mod(b, h, q_idx, kv_idx):
                pos = q_idx + offset
                ok = allowed(pos, kv_idx)
                return ok & (kv_idx <= pos) if causal else ok

            self._cache[key] = create_block_mask(mask_mod, None, None, nq, n, device=str(device))
        return self._cache[key]

    _token_level: ClassVar[bool] = False  # True when `allowed` is a formula, not the table

    # -- decode: the new row of the pattern over a KV cache ---------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> KVCache:
        """The whole KV cache (patterns with strided, summary, random or global columns reach
        back to any earlier key), with room to grow as `variants.full.KVCache`."""
        return KVCache.of(k, v)

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVCache
    ) -> tuple[torch.Tensor, KVCache]:
        """The token at position p = state.length: its k, v written in the slot past the
        context (the state passed in keeps its length), then attention over the cache under
        the pattern's causal row p (a mask built on the host, one (p+1,) bool copy)."""
        state = state.append(k, v)
        p = state.length - 1
        ok = self.key_mask(torch.tensor([p]), p + 1, True)[0].to(q.device)
        return decode_attention(q, state.keys(), state.values(), ok), state

    def decode_flops(self, shape: Shape) -> float:
        """q·K and p·V over the whole cache of seq_len + 1 keys (masked, not gathered)."""
        return 4.0 * shape.bh * (shape.seq_len + 1) * shape.head_dim
