"""The block-sparse engine's CPU path (cache-tiled; see `engine`): query blocks with equal
key-block counts in groups, each group one gather (or a band's strided windows) and torch's
fused CPU flash kernel (batched matmuls under autograd), chunked to CHUNK_BYTES; and the memory
model of that path."""

from __future__ import annotations

import math
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

CHUNK_BYTES = 16 << 20  # score-tile budget per batched matmul; bounds peak memory at any n
OUT_BYTES = 4 << 20  # output budget of one fused call over a band (it keeps no scores)
MERGE_ROWS = 256  # at most this many query rows per tile when query blocks share key blocks


@dataclass(frozen=True)
class Layout:
    """Groups of query blocks with equal key-block counts, ready for the CPU engine."""

    n: int
    block: int
    nb: int
    q0: int  # first query block that runs (queries are the last Nq positions)
    # (query blocks relative to q0 (G,), key blocks (G, L), additive bias (G, b, L·b) float32,
    # (1, b, L·b) when every query block of the group has the same one, or None, merge, band):
    # merge = runs of that many consecutive query blocks see the same key blocks and run as one
    # (merge·b)-row tile; band = (first query block relative to q0, its
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
        if bias is not None and len(bias) > 1 and bool((bias == bias[:1]).all()):
            bias = bias[:1].clone()  # every query block cuts the same pairs (a band's interior)
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
    (B, Hkv, Nk, D); out (B, H, Nq, D). Without grad every group runs torch's fused CPU flash
    kernel (`_fused_attention`); with grad, explicit scores through autograd."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad:
        return _fused_attention(q, k, v, layout, work)
    bsz, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    gq = h // hkv  # query heads per k/v head
    b, nb, q0 = layout.block, layout.nb, layout.q0
    qb = _query_blocks(q, hkv, n, b, q0, work)  # (BHkv, nbq, G·b, D)
    kb, vb = _key_blocks(k, nb, b, work), _key_blocks(v, nb, b, work)  # (BHkv, nb, b, D)
    bh = bsz * hkv
    pieces, order = [], []
    for rows, kidx, bias, merge, _ in layout.groups:
        g_all, nkb = kidx.shape
        tile = merge * b  # query rows per tile and head
        per_tile = bh * nkb * b * qb.element_size() * gq * tile
        step = merge * max(1, CHUNK_BYTES // per_tile)
        for s in range(0, g_all, step):
            r, ki = rows[s : s + step], kidx[s : s + step]
            g = len(r)
            bi = None if bias is None else _bias_rows(bias, s, g).to(work)
            t = g // merge  # tiles of `merge` query blocks sharing their key blocks
            ki = ki[::merge].flatten()  # index_select: contiguous block copies (fancy indexing
            qg = qb.index_select(1, r).view(bh, t, tile * gq, d)  # is slow); (BHkv, t, R·G·b, D)
            kg = kb.index_select(1, ki).view(bh, t, nkb * b, d)  # (BHkv, t, L·b, D)
            vg = vb.index_select(1, ki).view(bh, t, nkb * b, d)  # (BHkv, t, L·b, D)
            bi = None if bi is None else bi.view(t, merge, 1, b, nkb * b)  # (t, R, 1, b, L·b)
            pieces.append(_attend(qg, kg, vg, bi, True).view(bh, g, gq * b, d))
        order.append(rows)
    out = torch.cat(pieces, 1)  # (BHkv, nbq, G·b, D), query blocks in group order
    out = out.index_select(1, torch.argsort(torch.cat(order)))
    return _unfold(out, q, n, b, q0)


def _bias_rows(bias: torch.Tensor, s: int, g: int) -> torch.Tensor:
    """Rows s..s+g of a group's (G, b, L·b) bias, stored as (1, b, L·b) when every query block
    of the group has the same one."""
    return bias.expand(g, -1, -1) if bias.shape[0] == 1 else bias[s : s + g]


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _fused_attention(q, k, v, layout: Layout, work) -> torch.Tensor:
    """The no-grad CPU path: each group's query blocks through torch's fused CPU flash kernel
    (no score tile kept; the cut pairs as its additive mask, broadcast over the heads), their
    keys an overlapping strided view of k, v for a band (no copy) or gathered into buffers
    reused across chunks; q unscaled (the kernel scales it), a view of q when unpadded; each
    chunk's output copied into a slice of the output (index_copy_ only for scattered rows)."""
    bsz, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    gq = h // hkv  # query heads per k/v head
    b, nb, q0 = layout.block, layout.nb, layout.q0
    scale = 1.0 / math.sqrt(d)
    qb = _query_blocks(q, hkv, n, b, q0, work, scale=False)  # (BHkv, nbq, G·b, D)
    kb, vb = _key_blocks(k, nb, b, work), _key_blocks(v, nb, b, work)  # (BHkv, nb, b, D)
    bh, el = bsz * hkv, qb.element_size()
    nbq = qb.shape[1]
    final = qb.new_empty(bsz, h, nbq * b, d)  # written in place through `out`, a permuted view
    out = final.view(bsz, hkv, gq, nbq, b, d).transpose(2, 3)  # (B, Hkv, nbq, G, b, D)
    kflat, vflat = kb.view(bh, nb * b, d), vb.view(bh, nb * b, d)  # (BHkv, nb·b, D)
    buffers: list[torch.Tensor] = []  # gathered k, v: one allocation, reused by every chunk
    for rows, kidx, bias, merge, band in layout.groups:
        g_all, nkb = kidx.shape
        tile = merge * b  # query rows per tile and head
        first = int(rows[0])
        dense = int(rows[-1]) - first == g_all - 1  # rows are sorted: consecutive query blocks
        # a band reads views (the budget bounds the kernel's output); a gather copies k, v
        per_tile = bh * (gq * tile * d if band is not None else 2 * nkb * b * d) * el
        if bias is not None and bias.shape[0] > 1:  # + the tile's slice of the mask
            per_tile += gq * tile * nkb * b * el
        step = merge * max(1, (OUT_BYTES if band is not None else CHUNK_BYTES) // per_tile)
        for s in range(0, g_all, step):
            g = min(step, g_all - s)
            t = g // merge  # tiles of `merge` query blocks sharing their key blocks
            qg = qb[:, first + s : first + s + g] if dense else qb.index_select(1, rows[s : s + g])
            qg = qg.reshape(bh, t, tile * gq, d)  # (BHkv, t, R·G·b, D)
            if band is not None:  # query block q0 + i sees keys (k0 + i)·b .. : a window view
                kg, vg = (_windows(t, band[1] + s, g, nkb * b, b) for t in (kflat, vflat))
            else:
                ki = kidx[s : s + g : merge].flatten()
                if not buffers:
                    most = bh * min(step, g_all) // merge * nkb * b * d
                    buffers = [qb.new_empty(most), qb.new_empty(most)]
                elif buffers[0].numel() < bh * t * nkb * b * d:
                    buffers = [qb.new_empty(bh * t * nkb * b * d) for _ in range(2)]
                shape = (bh, t * nkb, b, d)
                kg = torch.index_select(kb, 1, ki, out=buffers[0][: math.prod(shape)].view(shape))
                vg = torch.index_select(vb, 1, ki, out=buffers[1][: math.prod(shape)].view(shape))
                kg, vg = kg.view(bh, t, nkb * b, d), vg.view(bh, t, nkb * b, d)
            mask = None
            if bias is not None:  # (1, t or 1, R·G·b, L·b): each query block's rows per head
                same = bias.shape[0] == 1  # one bias for every query block: broadcast
                rep, per = (1, 1) if same else (t, merge)
                bi = (bias if same else bias[s : s + g]).to(work).view(rep, per, 1, b, nkb * b)
                mask = bi.expand(rep, merge, gq, b, nkb * b).reshape(1, rep, tile * gq, nkb * b)
            o = _FLASH(qg, kg, vg, attn_mask=mask, scale=scale)[0]  # (BHkv, t, R·G·b, D)
            o = o.view(bsz, hkv, g, gq, b, d)
            if dense:
                out[:, :, first + s : first + s + g] = o
            else:
                out.index_copy_(2, rows[s : s + g], o)
    front = n - q.shape[2] - q0 * b
    return final[:, :, front : front + q.shape[2]].to(q.dtype)


def _windows(t: torch.Tensor, k0: int, g: int, width: int, b: int) -> torch.Tensor:
    """(BHkv, g, width, D) overlapping view of t (BHkv, nb·b, D): window i starts at key
    (k0 + i)·b (t's head stride kept: k may be a view of a longer cache)."""
    bh, _, d = t.shape
    stride = (t.stride(0), b * t.stride(1), t.stride(1), t.stride(2))
    return t.as_strided((bh, g, width, d), stride, t.storage_offset() + k0 * b * t.stride(1))


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
    most, gq = max(1, MERGE_ROWS // b), bh // bhkv
    present = size > 0
    # Without grad the fused kernel keeps no scores. A gather chunk: its k, v and its tiles'
    # mask (budgeted together); a band chunk: its output and mask (budgeted); the gathered q
    # of scattered query blocks and a gather chunk's output (each at most the padded q).
    c = int(width[present].max())
    cut_width = int(width[present & biased].max()) if (present & biased).any() else 0
    tile_mask = most * gq * b * cut_width * b * 4
    work = (max(CHUNK_BYTES, 2 * bhkv * c * b * d * 4 + tile_mask)
            + max(OUT_BYTES, bh * b * d * 4 + tile_mask) + 2 * padded_q)
    return work, layout


def cpu_path_kernel(layout: Layout, grad: bool) -> str:
    """``blocksparse:`` and the paths `blocksparse_attention` takes for the groups of `layout`,
    joined by ``+`` (see `BlockSparse.kernel`)."""
    paths = set()
    for *_, band in layout.groups:
        if grad:
            paths.add("matmul-gather")
        else:
            paths.add("band" if band is not None else "sdpa-gather")
    order = ("band", "sdpa-gather", "matmul-gather")
    return "blocksparse:" + "+".join(p for p in order if p in paths)
