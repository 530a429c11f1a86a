"""Selected-block attention engine: each query attends, exactly, to the key blocks an index names.

Shared by MoBA (https://arxiv.org/abs/2502.13189) and NSA (https://arxiv.org/abs/2502.11089).
The selection is data-dependent and per query token, so the layout is built on the device with
static shapes and no host reads:

1. the (query item, slot) pairs are sorted by key block (``torch.sort``, stable: rows stay in
   query order inside a block); each block's pairs are padded to a multiple of T rows;
2. the rows form tiles of T items that all read one key block: one gather of the query rows,
   one of the tiles' key and value blocks, one batched matmul for the scores, the causal /
   window / padding mask, exp against the row maximum, one batched matmul with the values;
3. the slots of an item are merged by their row maxima and sums (the split-KV merge of
   flash-decoding), which is exact softmax over the union of the selected keys.

On the GPU path the row capacity is a static bound (pairs + (blocks + 1)·(T − 1)), so shapes,
FLOPs and the op count are known before the call and independent of batch·heads and n; the CPU
path reads how many tiles the real blocks fill (a host read costs nothing there) and drops the
rest, and runs the tiles in slabs of at most `SLAB_BYTES` (fresh large temporaries cost their
page faults at every call). Cost is ∝ the selected blocks. A query item is G query rows sharing
one selection (NSA: the heads of a k/v group; MoBA: one head, G = 1). Where the blocks follow
from the position alone (the own block, a sliding window) and the queries are consecutive, a
piece runs without gathers: each query block against its own key block (a view) or a band of
key blocks (an unfold: a strided view on the CPU), under one causal/window mask.
On the CPU the tiles run through aten's flash-attention kernels (forward and backward); the GPU
path (`fused=False`) runs the same pieces as explicit matmuls. On the CPU without autograd, a
part of selected blocks beside a diagonal own part runs instead by groups (`select_groups`): all
the rows of a key block in one call, the own blocks among them where they can join, long calls
where the kernel runs at its best. A call of a few items without autograd (a decode step, a
few queries: `gathers`) skips the layout: each item's slot keys gathered, one attention call.

Here: the engine's entry and its merge (autograd), the static row and byte counts of a part, and
the block routing MoBA and NSA share; the parts and tiles are in `select_tiles`, the groups in
`select_groups`, the float64 form in `select_naive`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnbench.variants.base import gpu_path
from attnbench.variants.sparse.select_groups import SPREAD, Groups, groupable
from attnbench.variants.sparse.select_tiles import (
    NEG,
    SLAB_BYTES,
    Part,
    _Diagonal,
    _Layout,
    capacity,
)

# a call of at most GATHER_ITEMS query items per k/v head (a decode step: the G heads of a
# group, or one item of G rows; a few queries), whose gathered key rows (all heads) stay under
# twice the k/v heads' own or GATHER_ROWS (64 MiB of k and v at D = 64, float32), runs as one
# attention call over each item's gathered keys (`gathers`)
GATHER_ITEMS = 64
GATHER_ROWS = 1 << 17


def gathers(z: int, items: int, keys: int, n: int) -> bool:
    """Whether `select_attention` without autograd runs z·`items` query items, of `keys` slot
    keys each, over n keys per k/v head by gathering each item's keys (`_gathered`; see
    GATHER_ITEMS); the FLOPs are then 4·D per query row and slot key."""
    return items <= GATHER_ITEMS and z * items * keys <= max(2 * z * n, GATHER_ROWS)


def part_rows(items: int, slots: int, n: int, block: int, own: bool = False,
              trimmed: int | None = None) -> int:
    """Rows one part computes, padding included: the static capacity (the GPU path), or where
    `trimmed` gives the part's real (item, block) pairs (the CPU path drops the tiles that only
    empty slots or no pairs fill) their expected count: the pairs plus half a tile of padding
    for each earlier block they can use (the fill of a block's last tile is data-dependent)."""
    nb = -(-n // block)
    t, rows = capacity(items * slots, nb, block, own)
    if trimmed is None or own:
        return rows
    return min(rows, trimmed + min(nb - 1, trimmed) * (t - 1) // 2)


def earlier_pairs(positions: torch.Tensor, slots: int, block: int) -> int:
    """Real (query, block) pairs of `slots` selected blocks before each query's own block:
    min(slots, the blocks before it) per query position."""
    return int((positions // block).clamp(max=slots).sum())


def own_rows(runs: int, nq: int, n: int, block: int) -> int:
    """Rows the own-block part computes for `runs` runs of nq consecutive queries (the last at
    n − 1): the diagonal's padded query blocks, or the gathered layout when nq < block."""
    if nq >= block:
        return runs * band_rows(nq, n, block)
    return part_rows(runs * nq, 1, n, block, own=True)


def group_pairs(runs: int, nq: int, n: int, block: int, slots: int, g: int) -> int | None:
    """Query–key pairs per k/v head of the CPU forward without autograd (`select_groups`), or
    None where it does not run (fewer than a block of queries per run, or no other slot): each
    real (query, earlier block) pair reads the block's keys; the own blocks join the groups
    (the kernel's causal triangle of each) where G = 1 and the first query starts a block,
    else run as the diagonal's padded blocks. A call's padding (the spread of its groups'
    sizes) is not counted: a few percent at the defaults."""
    if nq < block or not slots:
        return None
    rest = runs * earlier_pairs(torch.arange(n - nq, n), slots, block) * block
    if g != 1 or (n - nq) % block:
        return rest + own_rows(runs, nq, n, block) * block
    w = (n - torch.arange((n - nq) // block, -(-n // block)) * block).clamp(max=block)
    return rest + runs * int((w * (w + 1) // 2).sum())


def group_bytes(z: int, m: int, g: int, slots: int, d: int) -> int:
    """Upper estimate of the CPU groups' forward working set (bytes, float32 work): the sort's
    keys, order and row items, the calls' padded indices, each row's output and log-sum-exp
    (kept until the merge; padding up to 1/SPREAD), the reused gather buffers (a call's rows
    and key and value tiles) and the merge's output and statistics."""
    rows = z * m * (slots + 1)  # the own block is a slot
    index = 8 * rows * 5
    pieces = (rows + rows // SPREAD) * g * (d + 1) * 4
    buffers = 2 * SLAB_BYTES
    return int(index + pieces + buffers + 4 * z * m * g * (d + 3))


def band_bytes(z: int, nq: int, g: int, n: int, block: int, reach: int, d: int) -> int:
    """Upper estimate of a band part's CPU forward working set (bytes, float32 work; the band
    read as a strided view of k and v): k and v padded by the reach, the padded queries, the
    mask (per query block where the band reaches before the first key), the rows' output and
    log-sum-exp and their unpadded copies."""
    rows, lk = band_rows(nq, n, block), (reach + 1) * block
    kv = 2 * 4 * z * (n + (reach + 1) * block) * d
    mask = 4 * block * g * lk * (rows // block if (n - nq) // block < reach else 1)
    return int(kv + mask + 4 * z * rows * g * (d + 2 * (d + 1)))


def band_rows(nq: int, n: int, block: int) -> int:
    """Padded query rows of a run of nq consecutive queries (the last at n − 1) in blocks."""
    return (-(-n // block) - (n - nq) // block) * block


def block_pairs(n: int, block: int, blocks: Callable[[int], int]) -> int:
    """Query–key pairs inside the n×n matrix that whole key blocks cover, as the pattern variants
    count density: each query of query block j scores `blocks(j)` key blocks, its own (clipped at
    n, its causal part masked but computed) and blocks(j) − 1 whole earlier ones."""
    total = 0
    for j in range(-(-n // block)):
        width = min(block, n - j * block)  # the own block's keys, and its queries
        total += width * ((blocks(j) - 1) * block + width)
    return total


def part_bytes(z: int, items: int, g: int, slots: int, n: int, block: int, d: int,
               masked: bool, own: bool = False) -> int:
    """Upper estimate of one part's forward working set (bytes, float32 work): layout indices,
    gathered query rows, key/value tiles, the mask, tile outputs and statistics."""
    nb = -(-n // block)
    t, rows = capacity(items * slots, nb, block, own)
    pairs, tiles = items * slots, rows // t
    layout = 8 * z * (6 * pairs + 4 * rows + 3 * (nb + 1) + 2 * tiles)
    gathered = 4 * z * (2 * rows * g * d + 2 * tiles * block * d)
    mask = z * rows * block * (1 + 4 * g) if masked else 0
    return int(layout + gathered + mask + 16 * z * rows * g)


def select_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    parts: list[Part],
    work: torch.dtype | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Softmax attention of each query item over the union of the key blocks its parts name.

    Args:
        q: (Z, M, G, D) query items: Z = batch·k/v heads, M items of G rows sharing a selection.
        k, v: (Z, N, D).
        qpos: (M,) int64 absolute positions of the items: keys kpos <= qpos are visible (and
            kpos >= qpos − window in a part with a window).
        parts: the slots (see `Part`); every item must see at least one key (its own block).
        work: dtype of the matmuls (default: q's); statistics are float32 (float64 for float64).
        fused: run the tiles through aten's CPU flash-attention kernels (forward, and backward
            given the merged output and log-sum-exp); False: explicit matmuls (the GPU path).
            Both: 2 matmuls forward, 5 backward (the scores recomputed).
    Returns:
        (Z, M, G, D) in q's dtype.
    """
    work = work or q.dtype
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not grad and all(p.idx is not None for p in parts) and gathers(
            q.shape[0], q.shape[1], sum(p.idx.shape[-1] * p.block for p in parts), k.shape[1]):
        return _gathered(q.to(work), k.to(work), v.to(work), qpos, parts).to(q.dtype)
    with torch.no_grad():
        z, m, g, d = q.shape
        grouped = groupable(parts, g) if fused and not grad else None
        if grouped is not None:  # the rest by groups, the own blocks joining them where they can
            own, rest = grouped
            parts = [p for p in parts if p is not rest and p is not own]
        lays = [_Diagonal(z, m, g, p, k.shape[1], work, q.device)
                if p.runs else _Layout(p, qpos, k.shape[1], g, work, trim=fused) for p in parts]
        if grouped is not None:
            lays.append(Groups(rest, own, qpos, k.shape[1], g, d,
                               torch.empty((), dtype=work).element_size()))
    out = _SelectAttention.apply(q.to(work), k.to(work), v.to(work), lays, fused)
    return out.to(q.dtype)


def _gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
              parts: list[Part]) -> torch.Tensor:
    """A few items (a decode step): each item's keys, the union of its parts' slots, gathered
    (k and v rows) and one softmax attention call over them, the causal / window / empty-slot
    mask as a bool mask; (Z, M, G, D). No layout, no merge: the engine's tiles cost ~1.5 ms of
    ops per step whatever the keys."""
    z, m, g, d = q.shape
    n = k.shape[1]
    where, seen = [], []
    for p in parts:
        kp = (p.idx[..., None] * p.block + torch.arange(p.block, device=q.device)).flatten(-2)
        ok = (p.idx >= 0).repeat_interleave(p.block, -1) & (kp < n)  # (Z, M, S·b)
        if p.masked:
            ok &= ~p.hides(kp, qpos[:, None])
        where.append(kp.clamp(0, n - 1))
        seen.append(ok)
    kp, ok = torch.cat(where, -1), torch.cat(seen, -1)  # (Z, M, K)
    kg, vg = (_gather_rows(x, kp.view(z, -1)).view(z * m, 1, -1, d) for x in (k, v))
    out = F.scaled_dot_product_attention(q.reshape(z * m, 1, g, d), kg, vg,
                                         attn_mask=ok.view(z * m, 1, 1, -1))
    return out.view(z, m, g, d)


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x[i, pos[i]] for x (Z, N, D), pos (Z, R) → (Z, R, D). x may be a view of a longer cache
    (its heads S0 elements apart): its rows are read through a flat (rows, D) view of that
    memory by index_select (a copy per row; advanced indexing took twice as long)."""
    z, _, d = x.shape
    s0, s1 = x.stride(0), x.stride(1)
    if x.stride(2) != 1 or s1 < d or s0 % s1 or z == 0:
        return x[torch.arange(z, device=x.device)[:, None], pos]
    flat = x.as_strided(((z - 1) * (s0 // s1) + x.shape[1], d), (s1, 1))
    rows = pos + torch.arange(z, device=x.device)[:, None] * (s0 // s1)
    return flat.index_select(0, rows.view(-1)).view(z, -1, d)


class _SelectAttention(torch.autograd.Function):
    """Pieces forward (per-row output and log-sum-exp), merged per item; the backward feeds each
    row its item's merged output, gradient and total log-sum-exp, so the pieces' flash-style
    backward yields the exact gradients of softmax over the union (then index_add back)."""

    @staticmethod
    def forward(ctx, q, k, v, lays: list, fused: bool):
        z, m, g, d = q.shape
        qf, blocks = q.reshape(z * m, g * d), {}  # (Z·M, G·D)
        # pieces (items: an index into them, a slice of them in order, or None: all in
        # order; the rows' output and log-sum-exp)
        pieces = [x for lay in lays for x in lay.forward(qf, k, v, blocks, fused)]
        # each item's total log-sum-exp over its rows in every piece: max, then sum of exp; the
        # gathered pieces' rows (a few of G floats per item) together, one op each
        top = torch.full((z * m, g), NEG, dtype=pieces[0][2].dtype, device=q.device)
        ordered = [i for i, (qi, _, _) in enumerate(pieces) if _ordered(qi)]
        spread = [i for i in range(len(pieces)) if i not in ordered]
        for i in ordered:
            qi, _, lse = pieces[i]
            torch.maximum(top[_span(qi)], lse, out=top[_span(qi)])
        if spread:
            rows, stats = (torch.cat([pieces[i][j] for i in spread]) if len(spread) > 1
                           else pieces[spread[0]][j] for j in (0, 2))  # stats: log-sum-exp
            top.scatter_reduce_(0, rows[:, None].expand(-1, g), stats, "amax")
        tot, ws = torch.zeros_like(top), {}
        for i in ordered:
            qi, _, lse = pieces[i]
            ws[i] = (lse - top[_span(qi)]).exp_()  # (rows, G)
            tot[_span(qi)].add_(ws[i])
        if spread:
            w = (stats - top.index_select(0, rows)).exp_()
            tot.index_add_(0, rows, w)
        total = top + tot.log()  # (Z·M, G)
        for i in ordered:  # each row's weight in its item's output
            ws[i] /= tot[_span(pieces[i][0])]
        if spread:
            w /= tot.index_select(0, rows)
            parts = w.split([len(pieces[i][0]) for i in spread]) if len(spread) > 1 else [w]
            ws.update(zip(spread, parts, strict=True))
        out = None
        for i, (qi, o, _) in enumerate(pieces):
            o = o.mul_(ws[i][..., None].to(o.dtype))  # (rows, G, D)
            if qi is None and out is None:
                out = o  # an all-items piece's rows are the first summand: no zeros, no add
                continue
            if out is None:
                out = torch.zeros(z * m, g, d, dtype=q.dtype, device=q.device)
            _add_rows(out, qi, o)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, total)
        ctx.lays, ctx.fused = lays, fused
        return out.view(z, m, g, d)  # (Z, M, G, D)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, total = ctx.saved_tensors
        z, m, g, d = q.shape
        qf, blocks = q.reshape(z * m, g * d), {}  # (Z·M, G·D)
        dx, ox = dout.to(q.dtype).reshape(z * m, g * d), out.view(z * m, g * d)  # (Z·M, G·D)
        gq = torch.zeros_like(qf)
        gk, gv = torch.zeros_like(k), torch.zeros_like(v)
        for lay in ctx.lays:
            lay.backward(qf, k, v, blocks, dx, ox, total, (gq, gk, gv), ctx.fused)
        return gq.view(q.shape), gk, gv, None, None  # dq (Z, M, G, D)



def _ordered(qi) -> bool:
    """A piece whose rows are items in order: all (None) or a slice of them."""
    return qi is None or isinstance(qi, slice)


def _span(qi) -> slice:
    return slice(None) if qi is None else qi


def _add_rows(acc: torch.Tensor, qi, x: torch.Tensor) -> None:
    """acc's rows for a piece's items += x (rows), in place."""
    if _ordered(qi):
        acc[_span(qi)].add_(x)
    else:
        acc.index_add_(0, qi, x)


def block_means(k: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(Z, N, D) → (Z, ⌈N/block⌉, D) mean of each block's keys in `dtype` (a partial last block:
    the mean of its real keys)."""
    z, n, d = k.shape
    nb = -(-n // block)
    kp = k.to(dtype)
    if nb * block != n:
        kp = F.pad(kp, (0, 0, 0, nb * block - n))
    kp = kp.reshape(z, nb, block, d)  # (Z, nb, b, D)
    size = (n - torch.arange(nb, device=k.device) * block).clamp(max=block).to(dtype)
    return kp.sum(2) / size[:, None]


def top_blocks(score: torch.Tensor, own: torch.Tensor, count: int,
               forced: torch.Tensor | None = None, items_last: bool = False) -> torch.Tensor:
    """The `count` highest-scoring blocks before each item's own block (`forced` ones first);
    -1 where fewer exist. The own block is not among them: it is always selected, apart.

    Args:
        score: (..., M, C) block scores, or (..., C, M) where `items_last` (the layout the
            CPU's few-pick path reduces fastest); modified in place.
        own: (M,) each item's own block; it and the blocks after it are excluded.
        forced: optional (M, C) bool of blocks always selected.
    Returns:
        (..., M, min(count, C)) int64, in no particular order.
    """
    dim = -2 if items_last else -1  # the blocks'
    c = score.shape[dim]
    col = torch.arange(c, device=score.device)
    before = col[:, None] < own if items_last else col < own[:, None]  # score's last two dims
    cpu = not gpu_path(score.device)
    if cpu:  # one add of 0 / -inf: a broadcast masked fill is slower on the CPU
        score.add_(torch.where(before, 0.0, -math.inf).to(score.dtype))
    else:
        score.masked_fill_(~before, -math.inf)
    if forced is not None:
        score.masked_fill_((forced.transpose(0, 1) if items_last else forced) & before,
                           torch.finfo(score.dtype).max)
    count = min(count, c)
    if count > 4:
        vals, idx = (score.transpose(-1, -2) if items_last else score).topk(count, -1,
                                                                             sorted=False)
        return idx.masked_fill_(vals == -math.inf, -1)
    # a few passes beat topk
    picks = [_top_one(score, dim) if cpu else _max_one(score, dim) for _ in range(count)]
    if not picks:
        return score.new_zeros(*score.shape[:-2], len(own), 0, dtype=torch.long)
    idx = torch.cat(picks, dim)
    return idx.transpose(-1, -2) if items_last else idx


def _max_one(s: torch.Tensor, dim: int) -> torch.Tensor:
    """The highest block of s (blocks along `dim`) per item (-1: none left), then -inf there."""
    vals, i = s.max(dim, keepdim=True)
    s.scatter_(dim, i, -math.inf)
    return torch.where(vals == -math.inf, -1, i)


def _top_one(s: torch.Tensor, dim: int) -> torch.Tensor:
    """`_max_one` by amax alone (max with indices tracks an index per element: several times
    slower on the CPU), the first maximum's block read from the bits of s − max: +0 there, the
    sign bit set elsewhere (NaN where all are -inf: no pick)."""
    c = s.shape[dim]
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[s.element_size()]
    flag = torch.arange(c, 0, -1, dtype=bits, device=s.device)  # C − block
    vals = s.amax(dim, keepdim=True)
    at = (s - vals).view(bits)
    at.bitwise_right_shift_(8 * s.element_size() - 1).add_(1)  # 1 at a maximum, else 0
    at.mul_(flag[:, None] if dim == -2 else flag)
    i = at.amax(dim, keepdim=True).neg_().add_(c).clamp_(max=c - 1).long()  # the first max
    s.scatter_(dim, i, -math.inf)
    return i.masked_fill_(vals == -math.inf, -1)


def blocks_to_keys(sel: torch.Tensor, block: int, n: int, pos: torch.Tensor) -> torch.Tensor:
    """(..., R, S) selected block indices (-1: empty slot) → (..., R, n) bool: the keys of
    those blocks at or before each row's position `pos` (R,)."""
    nb = -(-n // block)
    chosen = torch.zeros(*sel.shape[:-1], nb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, sel.masked_fill(sel < 0, nb), True)  # empty slots land in column nb
    keys = torch.arange(n, device=sel.device)
    return chosen[..., keys // block] & (keys <= pos[:, None])


def own_and_rest(rest: torch.Tensor, own: torch.Tensor, block: int, runs: int,
                 pos0: int) -> list[Part]:
    """The engine's parts: each item's own block (`own` (M,), with the causal mask) and the
    `rest` (Z, M, S) from `top_blocks` (wholly visible blocks: no mask). The items are `runs`
    runs of consecutive positions from pos0: with at least a block of them the own blocks run
    as the diagonal (no gather, no layout)."""
    z, m = rest.shape[:2]
    if m // runs >= block:
        parts = [Part(None, block, masked=True, own=True, runs=runs, pos0=pos0)]
    else:
        parts = [Part(own[:, None].expand(z, m, 1), block, masked=True, own=True)]  # (Z, M, 1)
    if rest.shape[-1]:
        parts.append(Part(rest, block))
    return parts
