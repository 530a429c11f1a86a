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

The row capacity is a static bound (pairs + (blocks + 1)·(T − 1)), so shapes, FLOPs and the op
count are known before the call and independent of batch·heads and n; cost is ∝ the selected
blocks. A query item is G query rows sharing one selection (NSA: the heads of a k/v group; MoBA:
one head, G = 1). Where the blocks follow from the position alone (the own block, a sliding
window) and the queries are consecutive, a piece runs without gathers: each query block against
its own key block (a view) or a band of key blocks (one unfold), under one causal/window mask.
On the CPU the tiles run through aten's flash-attention kernels (forward and backward); the GPU
path (`fused=False`) runs the same pieces as explicit matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG = -1e30  # finite mask: a row that sees nothing gets weight exp(NEG − max) = 0, never NaN
MAX_TILE = 128  # items per tile at most


@dataclass(frozen=True)
class Part:
    """One set of slots of every query item.

    Args:
        idx: (Z, M, S) int64 key blocks of `block` keys, distinct per item; -1: empty slot.
        masked: apply the causal (and `window`) mask: needed for blocks that may hold keys after
            the query (its own block) or before the window. Unmasked parts must name only blocks
            the item sees whole (complete, before its own block): no mask is built for them.
        own: the one slot is each item's own block and the items sit at consecutive positions
            (per head): each block's pairs fill whole tiles of `block` rows except in the first
            and last block, which bounds the padding by 2 tiles.
    """

    idx: torch.Tensor | None
    block: int
    masked: bool = False
    window: int = -1
    own: bool = False
    runs: int = 0  # items are `runs` runs of consecutive positions: no gather (0: gather them)
    pos0: int = 0  # the position of each run's first item
    reach: int = 0  # with runs: key blocks i − reach … i for query block i (idx is None)


def capacity(pairs: int, nb: int, block: int, own: bool = False) -> tuple[int, int]:
    """(T, rows): items per tile and the static row capacity of a part with `pairs` (item, slot)
    pairs over nb key blocks. Padding adds at most T − 1 rows per block used, key/value tiles
    b·D per T rows: T ≈ √(pairs·b/nb) (a power of two, at most MAX_TILE) balances the two. Own
    parts use tiles of `block` rows (only the first and last block are partial)."""
    if own:
        t = block if pairs >= block else 1 << (pairs.bit_length() - 1)
        rows = pairs + 2 * (t - 1)
    else:
        t = max(1, math.isqrt(pairs * block // (nb + 1)))
        t = min(MAX_TILE, 1 << (t.bit_length() - 1))
        rows = pairs + min(nb + 1, pairs) * (t - 1)
    return t, -(-rows // t) * t


def part_rows(items: int, slots: int, n: int, block: int, own: bool = False) -> int:
    """Rows one part computes (padding included: the capacity is static)."""
    return capacity(items * slots, -(-n // block), block, own)[1]


def own_rows(runs: int, nq: int, n: int, block: int) -> int:
    """Rows the own-block part computes for `runs` runs of nq consecutive queries (the last at
    n − 1): the diagonal's padded query blocks, or the gathered layout when nq < block."""
    if nq >= block:
        return runs * band_rows(nq, n, block)
    return part_rows(runs * nq, 1, n, block, own=True)


def band_rows(nq: int, n: int, block: int) -> int:
    """Padded query rows of a run of nq consecutive queries (the last at n − 1) in blocks."""
    return (-(-n // block) - (n - nq) // block) * block


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
    with torch.no_grad():
        z, m, g = q.shape[:3]
        lays = [_Diagonal(z, m, g, p, k.shape[1], work, q.device)
                if p.runs else _Layout(p, qpos, k.shape[1], g, work) for p in parts]
    out = _SelectAttention.apply(q.to(work), k.to(work), v.to(work), lays, fused)
    return out.to(q.dtype)


class _Layout:
    """The tiles of one part (built under no_grad, static shapes): the query item of each row,
    the key block of each tile, the row of each pair, which rows are real (not padding, not an
    empty slot: those read item 0 and block 0 and get weight 0 forward, dO = 0 backward), and
    the additive mask (Z·tiles, 1, T·G, b) of masked parts."""

    def __init__(self, part: Part, qpos: torch.Tensor, n: int, g: int, work) -> None:
        idx, b = part.idx, part.block
        z, m, s = idx.shape
        nb, pairs, dev = -(-n // b), m * s, idx.device
        t, rows = capacity(pairs, nb, b, part.own)
        tiles = rows // t
        blk = torch.where(idx < 0, nb, idx).reshape(z, pairs)  # (Z, P); nb: empty slots, last
        sblk, perm = torch.sort(blk, dim=1, stable=True)  # pairs grouped by block, query order
        counts = torch.zeros(z, nb + 1, dtype=torch.long, device=dev)
        counts.scatter_add_(1, blk, torch.ones_like(blk))
        padded = (counts + (t - 1)) // t * t
        end = padded.cumsum(1)  # (Z, nb+1): the row after each block's padded rows
        first = counts.cumsum(1) - counts  # sorted index of each block's first pair
        rank = torch.arange(pairs, device=dev) - first.gather(1, sblk)
        dest = torch.empty_like(blk).scatter_(1, perm, (end - padded).gather(1, sblk) + rank)
        starts = torch.arange(0, rows, t, device=dev).repeat(z, 1)  # (Z, tiles)
        tile_blk = torch.searchsorted(end, starts, right=True)  # (Z, tiles); >= nb: none
        item = torch.arange(pairs, device=dev) // s  # (P,) item of each pair
        zi = torch.arange(z, device=dev)[:, None]
        row_item = torch.zeros(z, rows, dtype=torch.long, device=dev)
        row_item.scatter_(1, dest, item.expand(z, pairs))
        real = torch.zeros(z, rows, dtype=torch.bool, device=dev)
        real.scatter_(1, dest, (blk < nb))  # (Z, rows)
        self.mask = None
        if part.masked:
            row_pos = torch.full((z, rows), -1, dtype=torch.long, device=dev)  # sees nothing
            row_pos.scatter_(1, dest, qpos[item].expand(z, pairs))
            kpos = (tile_blk * b)[..., None, None] + torch.arange(b, device=dev)
            rp = row_pos.view(z, tiles, t, 1)
            hidden = kpos > rp  # (Z, tiles, T, b); kpos <= qpos < n: padded keys are hidden too
            if part.window >= 0:
                hidden |= kpos < rp - part.window
            neg, zero = (torch.tensor(x, dtype=work, device=dev) for x in (NEG, 0.0))
            mask = torch.where(hidden, neg, zero)
            self.mask = mask[:, :, :, None].expand(z, tiles, t, g, b).reshape(
                z * tiles, 1, t * g, b)
        self.real = real[..., None].expand(z, rows, g).reshape(z * rows, g)  # (Z·rows, G)
        self.q_index = (zi * m + row_item).view(-1)  # (Z·rows,) into the Z·M items
        self.k_index = (zi * nb + tile_blk.clamp(max=nb - 1)).view(-1)  # into Z·nb blocks
        self.shape = (z, m, s, g, t, tiles, rows, nb, b, n)


def _stat(work: torch.dtype) -> torch.dtype:
    return torch.float64 if work == torch.float64 else torch.float32


class _SelectAttention(torch.autograd.Function):
    """Pieces forward (per-row output and log-sum-exp), merged per item; the backward feeds each
    row its item's merged output, gradient and total log-sum-exp, so the pieces' flash-style
    backward yields the exact gradients of softmax over the union (then index_add back)."""

    @staticmethod
    def forward(ctx, q, k, v, lays: list, fused: bool):
        z, m, g, d = q.shape
        qf, blocks = q.reshape(z * m, g * d), {}
        outs, lses = zip(*(lay.forward(qf, k, v, blocks, fused) for lay in lays), strict=True)
        # each item's total log-sum-exp over its rows in every piece: max, then sum of exp
        top = torch.full((z * m, g), NEG, dtype=lses[0].dtype, device=q.device)
        for lay, lse in zip(lays, lses, strict=True):
            top.scatter_reduce_(0, lay.q_index[:, None].expand(-1, g), lse, "amax")
        tot = torch.zeros_like(top)
        ws = []
        for lay, lse in zip(lays, lses, strict=True):
            w = (lse - top.index_select(0, lay.q_index)).exp_()  # (rows, G)
            tot.index_add_(0, lay.q_index, w)
            ws.append(w)
        total = top + tot.log()  # (Z·M, G)
        out = torch.zeros(z * m, g, d, dtype=q.dtype, device=q.device)
        for lay, o, w in zip(lays, outs, ws, strict=True):
            out.index_add_(0, lay.q_index, o.mul_((w / tot.index_select(0, lay.q_index))
                                                  [..., None].to(o.dtype)))
        ctx.save_for_backward(q, k, v, out, total)
        ctx.lays, ctx.fused = lays, fused
        return out.view(z, m, g, d)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, total = ctx.saved_tensors
        z, m, g, d = q.shape
        qf, blocks = q.reshape(z * m, g * d), {}
        dx, ox = dout.to(q.dtype).reshape(z * m, g * d), out.view(z * m, g * d)
        gq = torch.zeros_like(qf)
        gk, gv = torch.zeros_like(k), torch.zeros_like(v)
        for lay in ctx.lays:
            lay.backward(qf, k, v, blocks, dx, ox, total, (gq, gk, gv), ctx.fused)
        return gq.view(q.shape), gk, gv, None, None


def _forward(self, qf, k, v, blocks, fused):
    """A layout's tiles: per-row output (rows, G, D) and log-sum-exp (rows, G) (not real: NEG)."""
    g, d = self.shape[3], k.shape[-1]
    qr, kt, vt = _tiles(qf, k, v, self, blocks)
    o, lse = _tile_forward(qr, kt, vt, self.mask, fused)  # (Zt, 1, T·G, D), (Zt, 1, T·G)
    return o.reshape(-1, g, d), lse.reshape(-1, g).masked_fill(~self.real, NEG)


def _backward(self, qf, k, v, blocks, dx, ox, total, grads, fused):
    z, g = self.shape[0], self.shape[3]
    t, tiles, rows, nb, b, n = self.shape[4:]
    d = k.shape[-1]
    gq, gk, gv = grads
    qr, kt, vt = _tiles(qf, k, v, self, blocks)

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.q_index).view(z * tiles, 1, t * g, -1)

    do = rows_of(dx).mul_(self.real.reshape(z * tiles, 1, t * g, 1))  # padding: dO = 0
    lse = rows_of(total)[..., 0].contiguous()  # (Zt, 1, T·G)
    dq, dk, dv = _tile_backward(do, qr, kt, vt, rows_of(ox), lse, self.mask, fused)
    gq.index_add_(0, self.q_index, dq.view(z * rows, g * d))
    for acc, x in ((gk, dk), (gv, dv)):
        acc_b = x.new_zeros(z * nb, b, d).index_add_(0, self.k_index, x.view(z * tiles, b, d))
        acc += acc_b.view(z, nb * b, d)[:, :n]


_Layout.forward, _Layout.backward = _forward, _backward


def _tiles(qf, k, v, lay: _Layout, blocks: dict):
    """Gathered query rows (Zt, 1, T·G, D) and key, value tiles (Zt, 1, b, D); `blocks` keeps
    k, v as (Z·nb, b, D) per block size (a padded copy only when b does not divide n)."""
    z, g, t, tiles, nb, b, n = (lay.shape[i] for i in (0, 3, 4, 5, 7, 8, 9))
    d = k.shape[-1]
    if b not in blocks:
        blocks[b] = [(F.pad(x, (0, 0, 0, nb * b - n)) if nb * b != n else x)
                     .reshape(z * nb, b, d) for x in (k, v)]
    kb, vb = blocks[b]
    qr = qf.index_select(0, lay.q_index).view(z * tiles, 1, t * g, d)
    kt, vt = (x.index_select(0, lay.k_index).view(z * tiles, 1, b, d) for x in (kb, vb))
    return qr, kt, vt


class _Diagonal:
    """Items at consecutive positions without gathers: q (Z, runs, Nq, G, D) padded to whole
    blocks; each query block against key blocks i − reach … i (reach 0: its own block, a view of
    k; else a band, one unfold copy) under the causal (and window) mask; per-row output and
    log-sum-exp in item order. The flash layout is (Z·runs, query blocks, b·G, D)."""

    def __init__(self, z: int, m: int, g: int, part: Part, n: int, work, device) -> None:
        runs, b, r = part.runs, part.block, part.reach
        nq = m // runs
        self.first = part.pos0 // b
        self.front = part.pos0 - self.first * b  # padded query rows before the first
        self.nbq = -(-n // b) - self.first  # query blocks
        self.geo = (z, m, g, runs, nq, n, b, r)
        self.q_index = torch.arange(z * m, device=device)
        blocks = 1 if r == 0 and part.window < 0 else self.nbq  # one mask fits every block
        qpos = ((torch.arange(blocks, device=device) + self.first) * b)[:, None] + torch.arange(
            b, device=device)  # (blocks, b)
        kpos = qpos[:, :1] - r * b + torch.arange((r + 1) * b, device=device)  # (blocks, Lk)
        rel = qpos[:, :, None] - kpos[:, None, :]  # (blocks, b, Lk)
        hidden = (rel < 0) | (kpos[:, None, :] < 0)
        if part.window >= 0:
            hidden |= rel > part.window
        mask = torch.where(hidden, torch.tensor(NEG, dtype=work, device=device),
                           torch.tensor(0.0, dtype=work, device=device))
        self.mask = mask[:, :, None].expand(blocks, b, g, (r + 1) * b).reshape(
            1, blocks, b * g, (r + 1) * b)

    def _pad(self, x: torch.Tensor, width: int) -> torch.Tensor:
        z, _, g, runs, nq, _, b, _ = self.geo
        rows = self.nbq * b
        x = F.pad(x.reshape(z, runs, nq, width), (0, 0, self.front, rows - self.front - nq))
        return x.view(z * runs, self.nbq, b * g, width // g)

    def _unpad(self, x: torch.Tensor, width: int) -> torch.Tensor:
        z, m, _, runs, nq, _, b, _ = self.geo
        x = x.reshape(z, runs, self.nbq * b, width)[:, :, self.front : self.front + nq]
        return x.reshape(z * m, width)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        z, runs, n, b, r = (self.geo[i] for i in (0, 3, 5, 6, 7))
        d, lk = x.shape[-1], (r + 1) * b
        x = F.pad(x, (0, 0, r * b, (self.first + self.nbq) * b - n))  # token t at t + r·b
        x = x[:, self.first * b :]  # band of query block i: rows i·b … i·b + Lk
        x = x.view(z, self.nbq, b, d) if r == 0 else \
            x.unfold(1, lk, b).transpose(-1, -2).contiguous()  # (Z, nbq, Lk, D)
        return x[:, None].expand(-1, runs, -1, -1, -1).reshape(z * runs, self.nbq, lk, d)

    def forward(self, qf, k, v, blocks, fused):
        g, d = self.geo[2], k.shape[-1]
        o, lse = _tile_forward(self._pad(qf, g * d), self._keys(k), self._keys(v), self.mask,
                               fused)
        return self._unpad(o, g * d).view(-1, g, d), self._unpad(lse, g)

    def backward(self, qf, k, v, blocks, dx, ox, total, grads, fused):
        z, _, g, runs, _, n, b, r = self.geo
        d = k.shape[-1]
        gq, gk, gv = grads
        lse = self._pad(total, g)[..., 0].contiguous()  # padding rows: dO = 0, nothing flows
        dq, dk, dv = _tile_backward(self._pad(dx, g * d), self._pad(qf, g * d), self._keys(k),
                                    self._keys(v), self._pad(ox, g * d), lse, self.mask, fused)
        gq += self._unpad(dq, g * d)
        start = self.first * b
        for acc, x in ((gk, dk), (gv, dv)):
            x = x.view(z, runs, self.nbq, (r + 1) * b, d).sum(1)
            band = x.new_zeros(z, (self.nbq + r) * b, d)  # token t at start − r·b + row
            for o in range(r + 1):  # the band's o-th key block of query block i: block i − r + o
                band[:, o * b : (o + self.nbq) * b] += x[:, :, o * b : (o + 1) * b].reshape(
                    z, self.nbq * b, d)
            lo = start - r * b  # token of the band's first row (negative: front padding)
            acc[:, max(lo, 0) :] += band[:, max(-lo, 0) : max(-lo, 0) + n - max(lo, 0)]


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _tile_forward(qr, kt, vt, mask, fused: bool):
    scale = 1.0 / math.sqrt(qr.shape[-1])
    if fused:
        return _FLASH(qr, kt, vt, attn_mask=mask, scale=scale)
    sc = (qr @ kt.transpose(-1, -2)).to(_stat(qr.dtype)).mul_(scale)
    if mask is not None:
        sc.add_(mask)
    mx = sc.amax(-1, keepdim=True)
    e = sc.sub_(mx).exp_()
    den = e.sum(-1, keepdim=True)
    o = (e.to(qr.dtype) @ vt) / den.to(qr.dtype)
    return o, (mx + den.log())[..., 0]


def _tile_backward(do, qr, kt, vt, o, lse, mask, fused: bool):
    scale = 1.0 / math.sqrt(qr.shape[-1])
    if fused:
        return _FLASH_BWD(do, qr, kt, vt, o, lse, 0.0, False, attn_mask=mask, scale=scale)
    sc = (qr @ kt.transpose(-1, -2)).to(_stat(qr.dtype)).mul_(scale)
    if mask is not None:
        sc.add_(mask)
    p = sc.sub_(lse[..., None]).exp_()  # the probabilities under the item's total
    delta = (do.to(p.dtype) * o.to(p.dtype)).sum(-1, keepdim=True)
    ds = (do @ vt.transpose(-1, -2)).to(p.dtype).sub_(delta).mul_(p).to(qr.dtype)
    pw = p.to(qr.dtype)
    return ds @ kt * scale, ds.transpose(-1, -2) @ qr * scale, pw.transpose(-1, -2) @ do


def block_means(k: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(Z, N, D) → (Z, ⌈N/block⌉, D) mean of each block's keys in `dtype` (a partial last block:
    the mean of its real keys)."""
    z, n, d = k.shape
    nb = -(-n // block)
    kp = F.pad(k.to(dtype), (0, 0, 0, nb * block - n)).view(z, nb, block, d)
    size = (n - torch.arange(nb, device=k.device) * block).clamp(max=block).to(dtype)
    return kp.sum(2) / size[:, None]


def top_blocks(score: torch.Tensor, own: torch.Tensor, count: int,
               forced: torch.Tensor | None = None) -> torch.Tensor:
    """The `count` highest-scoring blocks before each item's own block (`forced` ones first);
    -1 where fewer exist. The own block is not among them: it is always selected, apart.

    Args:
        score: (..., M, C) block scores (modified in place).
        own: (M,) each item's own block; it and the blocks after it are excluded.
        forced: optional (M, C) bool of blocks always selected.
    Returns:
        (..., M, min(count, C)) int64, in no particular order.
    """
    col = torch.arange(score.shape[-1], device=score.device)
    before = col < own[:, None]
    score.masked_fill_(~before, -math.inf)
    if forced is not None:
        score.masked_fill_(forced & before, torch.finfo(score.dtype).max)
    count = min(count, score.shape[-1])
    if count > 4:
        vals, idx = score.topk(count, dim=-1, sorted=False)
    else:  # a few passes of max beat topk on the CPU
        picks = []
        for _ in range(count):
            vals, i = score.max(-1, keepdim=True)
            picks.append(torch.where(vals == -math.inf, -1, i))
            score.scatter_(-1, i, -math.inf)
        return torch.cat(picks, -1) if picks else score.new_zeros(*score.shape[:-1], 0,
                                                                   dtype=torch.long)
    return idx.masked_fill_(vals == -math.inf, -1)


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
        parts = [Part(own[:, None].expand(z, m, 1), block, masked=True, own=True)]
    if rest.shape[-1]:
        parts.append(Part(rest, block))
    return parts


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sees: Callable[[int, int], torch.Tensor],
    dtype: torch.dtype,
    chunk: int = 256,
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V densely in `dtype`, each query row restricted to the keys
    ``sees(r0, r1)`` allows ((B, H or 1, r1 − r0, N) bool for query rows r0..r1−1), in chunks
    of query rows; a row that sees no key is zero. q (B, H, Nq, D), k, v (B, Hkv, N, D)."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    k, v = (x.repeat_interleave(h // hkv, dim=1).to(dtype) for x in (k, v))
    outs = []
    for r0 in range(0, q.shape[2], chunk):
        r1 = min(q.shape[2], r0 + chunk)
        sc = q[:, :, r0:r1].to(dtype) @ k.transpose(-1, -2) / math.sqrt(d)
        sc = sc.masked_fill(~sees(r0, r1), -math.inf)
        outs.append(torch.softmax(sc, -1).nan_to_num(0.0) @ v)
    return torch.cat(outs, 2)
