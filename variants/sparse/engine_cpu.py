"""The block-sparse engine's CPU path (cache-tiled; see `engine`): query blocks with equal
key-block counts in groups, each group one gather (or a band's strided windows) and batched
matmuls, chunked to CHUNK_BYTES; and the memory model of that path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape
from attnbench.variants.sparse.engine import (
    LAYOUT_CHUNK,
    _bias,
    _block_rows,
    _key_blocks,
    _query_blocks,
    _unfold,
)

CHUNK_BYTES = 16 << 20  # score-tile budget per batched matmul; bounds peak memory at any n
MERGE_ROWS = 256  # at most this many query rows per tile when query blocks share key blocks


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


def _merge(rows: torch.Tensor, kidx: torch.Tensor, most: int) -> int:
    """Largest R <= most dividing G such that runs of R consecutive query blocks share keys."""
    g, c = kidx.shape
    for r in range(min(most, g), 1, -1):
        if g % r:
            continue
        runs, keys = rows.view(-1, r), kidx.view(-1, r, c)  # (G/R, R), (G/R, R, L)
        if (runs - runs[:, :1] == torch.arange(r)).all() and (keys == keys[:, :1]).all():
            return r
    return 1


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
            vg = vb.index_select(1, ki).view(bh, t, nkb * b, d)  # (BHkv, t, L·b, D)
            if fused:  # q is already scaled
                o = F.scaled_dot_product_attention(qg, kg, vg, scale=1.0)
            else:
                bi = None if bi is None else bi.view(t, merge, 1, b, nkb * b)  # (t, R, 1, b, L·b)
                o = _attend(qg, kg, vg, bi, grad)
            put(r, o.view(bh, g, gq * b, d))  # (BHkv, g, G·b, D)
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
        s5 = scores.view(bh, t, r, rows // (r * b), b, width)  # (BHkv, t, R, G, b, L·b)
        scores = (s5 + bias if grad else s5.add_(bias)).view(bh, t, rows, width)  # as before
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

    # one 3-D bmm per head, batched over the g query blocks: (g, G·b, D) @ (g, D, L·b)
    for i in range(bh):
        torch.bmm(qb[i, q0 : q0 + g], window(kflat[i]).transpose(1, 2), out=scores[i])
    if bias is not None:
        scores.view(bh, g, gq, b, nkb * b).add_(bias[:, None])  # (BHkv, g, G, b, L·b)
    p = torch.softmax(scores, dim=-1)
    for i in range(bh):
        torch.bmm(p[i], window(vflat[i]), out=out[i])
    return out


def cpu_path_bytes(shape: Shape, counts: torch.Tensor, cut: torch.Tensor, b: int,
                   padded_q: int) -> tuple[int, int]:
    """The CPU path's largest working set of one chunk over the groups (no-grad paths) and its
    layout, in bytes, for query blocks with these key-block counts; `cut`: the query blocks with
    a cut pair (their group carries a bias); padded_q: the bytes of the padded queries."""
    bh, bhkv, d = shape.bh, shape.batch * shape.hkv, shape.head_dim
    size = torch.bincount(counts)  # query blocks per count
    biased = torch.bincount(counts, weights=cut.double()) > 0
    width = torch.arange(len(size))  # key blocks per row of each group
    indices = int((size * (1 + width)).sum()) * 8  # rows and key blocks, int64
    layout = indices + int((size * width)[biased].sum()) * b * b * 4  # + float32 biases
    work, most = 0, max(1, MERGE_ROWS // b)
    present = size > 0
    if (present & ~biased).any():  # fused sdpa: gathered k, v (budgeted), gathered q, out
        c = int(width[present & ~biased].max())
        work = max(CHUNK_BYTES, 2 * bhkv * c * b * d * 4) + 2 * padded_q
    if (present & biased).any():  # tile scores and their softmax + gathered k, v
        c = int(width[present & biased].max())
        tile = max(CHUNK_BYTES, bh * most * b * c * b * 4)
        work = max(work, 2 * tile + 2 * tile * d // b)
    return work, layout


def cpu_path_kernel(layout: Layout, grad: bool) -> str:
    """``blocksparse:`` and the paths `blocksparse_attention` takes for the groups of `layout`,
    joined by ``+`` (see `BlockSparse.kernel`)."""
    paths = set()
    for _, _, bias, _, band in layout.groups:
        if band is not None and not grad:
            paths.add("band")
        elif not grad and bias is None:
            paths.add("sdpa-gather")
        else:
            paths.add("matmul-gather")
    order = ("band", "sdpa-gather", "matmul-gather")
    return "blocksparse:" + "+".join(p for p in order if p in paths)
