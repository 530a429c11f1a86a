"""The block-sparse engine's CPU path (cache-tiled; see `engine`): query blocks with equal
key-block counts in groups, each group one gather (or a band's strided windows) and torch's
fused CPU flash kernel (batched matmuls under autograd), chunked to CHUNK_BYTES; and the memory
model of that path."""

from __future__ import annotations

import math
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
# Without grad (the fused kernel keeps no scores): the gathered k, v of one call and the output
# of one call over a band. At n=8192 on a contended 2-core machine 4 MB of k, v beat 16 MB by
# 5-15% with one torch thread but lost 1.1-2.7x with two (each call and copy is a parallel
# region; a descheduled thread stalls it), 64 MB won 10-25% there: 16 MB, main's chunk.
GATHER_BYTES = 16 << 20
OUT_BYTES = 4 << 20
BIAS_TEMP = 16  # bytes per element of a bias slice while its cut pairs are found (bools)
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
                 q0: int = 0, span: int = 1) -> Layout:
    """Layout from a block predicate ``block_allowed(I, J, nb, causal)`` and a token predicate
    ``allowed(q, k)`` (broadcasting int tensors, causal not applied; None when the pattern is
    whole blocks, so that only the causal diagonal and the padding cut pairs), for the query
    blocks q0.. ; causal: each query block's key blocks up to the end of its aligned run of
    `span` blocks (`_block_rows`), so that a run can share its keys as one tile.

    Memory: the groups (O(active pairs), plus a float32 bias over the pairs of groups that need
    one) and slices of at most LAYOUT_CHUNK elements; never an (nb, nb) tensor.
    """
    b = block
    nb = -(-n // b)
    found: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    step = max(1, LAYOUT_CHUNK // nb)
    for s in range(q0, nb, step):
        rows = torch.arange(s, min(nb, s + step))
        mask = _block_rows(block_allowed, rows, nb, causal, span)
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
    keys an overlapping strided view of k, v for a run (`_run`: a band, or query blocks
    sharing one run of key blocks; no copy) or gathered into buffers reused across chunks.
    q is unscaled (the kernel scales it) and a view of q unless padded;
    grouped heads: one call per query head of a k/v head over the same keys (no copy of q or of
    the mask per head). Each chunk's output is copied into a slice of the output (index_copy_
    only for scattered query blocks)."""
    bsz, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    gq = h // hkv  # query heads per k/v head
    b, nb, q0 = layout.block, layout.nb, layout.q0
    nbq = nb - q0
    front = n - nq - q0 * b
    qp = q.to(work)
    if front or nbq * b != nq:
        qp = F.pad(qp, (0, 0, front, nbq * b - nq - front))
    qv = qp.view(bsz, hkv, gq, nbq, b, d)
    kb, vb = _key_blocks(k, nb, b, work), _key_blocks(v, nb, b, work)  # (BHkv, nb, b, D)
    bh, el = bsz * hkv, qp.element_size()
    final = qp.new_empty(bsz, h, nbq * b, d)  # written in place, one slice per chunk and head
    fv = final.view(bsz, hkv, gq, nbq, b, d)
    kflat, vflat = kb.view(bh, nb * b, d), vb.view(bh, nb * b, d)  # (BHkv, nb·b, D)
    scale = 1.0 / math.sqrt(d)
    buffers: list[torch.Tensor] = []  # gathered k, v: one allocation, reused by every chunk
    for rows, kidx, bias, merge, band in layout.groups:
        g_all, nkb = kidx.shape
        tile = merge * b  # query rows per tile and head
        first = int(rows[0])
        dense = int(rows[-1]) - first == g_all - 1  # rows are sorted: consecutive query blocks
        run = _group_run(rows, kidx, merge, band)
        # a run reads views (the budget bounds the kernel's output); a gather copies k, v
        per_tile = bh * (tile * d if run is not None else 2 * nkb * b * d) * el
        if bias is not None and bias.shape[0] > 1:  # + the tile's slice of the mask
            per_tile += tile * nkb * b * el
        step = merge * max(1, (OUT_BYTES if run is not None else GATHER_BYTES) // per_tile)
        for s in range(0, g_all, step):
            g = min(step, g_all - s)
            t = g // merge  # tiles of `merge` query blocks sharing their key blocks
            if run is not None:  # tile i sees keys (k0 + i·shift)·b ..: a window view
                k0 = run[0] + (s // merge) * run[1]
                kg, vg = (_windows(x, k0, t, nkb * b, b, run[1]) for x in (kflat, vflat))
            else:
                ki = kidx[s : s + g : merge].flatten()
                size = bh * t * nkb * b * d
                if not buffers or buffers[0].numel() < size:
                    most = bh * min(step, g_all) // merge * nkb * b * d
                    buffers = [qp.new_empty(max(most, size)) for _ in range(2)]
                shape = (bh, t * nkb, b, d)
                kg = torch.index_select(kb, 1, ki, out=buffers[0][:size].view(shape))
                vg = torch.index_select(vb, 1, ki, out=buffers[1][:size].view(shape))
                kg, vg = kg.view(bh, t, nkb * b, d), vg.view(bh, t, nkb * b, d)
            mask = None
            if bias is not None:  # (1, t or 1, R·b, L·b): broadcast over the heads
                same = bias.shape[0] == 1  # one bias for every query block: broadcast
                rep, per = (1, 1) if same else (t, merge)
                bi = (bias if same else bias[s : s + g]).to(work).view(rep, per, b, nkb * b)
                mask = bi.expand(rep, merge, b, nkb * b).reshape(1, rep, tile, nkb * b)
            for j in range(gq):  # query head j of each k/v head
                qj = qv[:, :, j]  # (B, Hkv, nbq, b, D)
                qj = qj[:, :, first + s : first + s + g] if dense else qj.index_select(
                    2, rows[s : s + g])
                o = _FLASH(qj.reshape(bh, t, tile, d), kg, vg, attn_mask=mask, scale=scale)[0]
                o = o.view(bsz, hkv, g, b, d)
                if dense:
                    fv[:, :, j, first + s : first + s + g] = o
                else:
                    fv[:, :, j].index_copy_(2, rows[s : s + g], o)
    return final[:, :, front : front + nq].to(q.dtype)


def _group_run(rows: torch.Tensor, kidx: torch.Tensor, merge: int,
               band: tuple[int, int] | None) -> tuple[int, int] | None:
    """A group's key blocks as windows of k (see `_run`) when its query blocks are consecutive
    (scattered ones gather their q and k alike)."""
    if band is not None:
        return band[1], 1
    return _run(kidx[::merge]) if int(rows[-1] - rows[0]) == len(rows) - 1 else None


def _run(kt: torch.Tensor) -> tuple[int, int] | None:
    """(first key block, shift per tile) when each tile's key blocks kt (T, L) are consecutive
    and their first blocks step evenly (a band: shift 1; query blocks sharing all their keys:
    one tile), else None."""
    t, c = kt.shape
    if not bool((kt == kt[:, :1] + torch.arange(c)).all()):
        return None
    starts = kt[:, 0]
    shift = int(starts[1] - starts[0]) if t > 1 else 0
    if shift < 0 or not bool((starts == starts[0] + shift * torch.arange(t)).all()):
        return None
    return int(starts[0]), shift


def _windows(t: torch.Tensor, k0: int, g: int, width: int, b: int, shift: int) -> torch.Tensor:
    """(BHkv, g, width, D) overlapping view of t (BHkv, nb·b, D): window i starts at key
    (k0 + i·shift)·b (t's head stride kept: k may be a view of a longer cache)."""
    bh, _, d = t.shape
    stride = (t.stride(0), shift * b * t.stride(1), t.stride(1), t.stride(2))
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
    bhkv, d = shape.batch * shape.hkv, shape.head_dim
    size = torch.bincount(counts)  # query blocks per count
    biased = torch.bincount(counts, weights=cut.double()) > 0
    width = torch.arange(len(size))  # key blocks per row of each group
    indices = int((size * (1 + width)).sum()) * 8  # rows and key blocks, int64
    layout = indices + int((size * width)[biased].sum()) * b * b * 4  # + float32 biases
    most = max(1, MERGE_ROWS // b)
    present = size > 0
    # Without grad the fused kernel keeps no scores. A gather chunk: its k, v and its tiles'
    # mask (budgeted together), its output and (scattered query blocks) gathered q of one query
    # head, each at most the padded q and R/2 times its k, v; a band chunk: its output and mask
    # (budgeted).
    c = int(width[present].max())
    cut_width = int(width[present & biased].max()) if (present & biased).any() else 0
    tile_mask = most * b * cut_width * b * 4
    kv = max(GATHER_BYTES, 2 * bhkv * c * b * d * 4 + tile_mask)
    band = max(OUT_BYTES, bhkv * most * b * d * 4 + tile_mask)
    per_head = padded_q // (shape.bh // bhkv)  # one query head of each k/v head per call
    work = kv + max(band, 2 * min(per_head, kv * most // 2))
    # and, while the layout is built (before the forward, added all the same): a bool
    # comparison over the biases (held, in `layout`) and the cut pairs in LAYOUT_CHUNK slices
    bias_elems = int((size * width)[biased].sum()) * b * b
    slice_elems = min(bias_elems, max(LAYOUT_CHUNK, b * c * b))
    work += bias_elems + slice_elems * BIAS_TEMP
    return work, layout


def cpu_path_kernel(layout: Layout, grad: bool) -> str:
    """``blocksparse:`` and the paths `blocksparse_attention` takes for the groups of `layout`,
    joined by ``+`` (see `BlockSparse.kernel`)."""
    paths = set()
    for rows, kidx, _, merge, band in layout.groups:
        if grad:
            paths.add("matmul-gather")
        else:  # a band, or query blocks sharing one run of key blocks: a window view
            run = _group_run(rows, kidx, merge, band) is not None
            paths.add("band" if run else "sdpa-gather")
    order = ("band", "sdpa-gather", "matmul-gather")
    return "blocksparse:" + "+".join(p for p in order if p in paths)
