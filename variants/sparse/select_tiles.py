"""The selected-block engine's tiles (see `attnbench.variants.sparse.select`): a part's (item,
slot) pairs sorted by key block into tiles of T rows (`_Layout`), or consecutive queries against
their own block or a band of blocks without gathers (`_Diagonal`); each tile's forward and
backward through aten's CPU flash-attention kernels or explicit matmuls (the GPU path)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG = -1e30  # finite mask: a row that sees nothing gets weight exp(NEG − max) = 0, never NaN
MAX_TILE = 128  # items per tile at most
# The CPU forward runs a layout's tiles in slabs of at most this many bytes of gathered queries:
# a larger temporary is mapped fresh by the C allocator at each call (glibc: above 32 MiB), and
# its first-touch page faults cost about as much as the tiles' matmuls (measured on 2-core EPYC);
# below that, smaller slabs stay in cache (1-2 MiB ran MoBA and NSA at n = 8K 5-10% faster than
# 8 MiB, 16 MiB 10% slower, one thread; 0.5 MiB slower again).
SLAB_BYTES = 2 << 20


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

    def hides(self, kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """Bool (broadcast): the keys at kpos that a query at qpos does not see under this
        part's mask: after it, or before its window."""
        hidden = kpos > qpos
        if self.window >= 0:
            hidden = hidden | (kpos < qpos - self.window)
        return hidden


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


class _Layout:
    """The tiles of one part (built under no_grad, static shapes): the query item of each row,
    the key block of each tile, the row of each pair, which rows are real (not padding, not an
    empty slot: those read item 0 and block 0 and get weight 0 forward, dO = 0 backward), and
    the additive mask (Z·tiles, 1, T·G, b) of masked parts."""

    def __init__(self, part: Part, qpos: torch.Tensor, n: int, g: int, work,
                 trim: bool = False) -> None:
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
        full = rows
        if trim:  # the host reads the rows the real blocks fill (free on the CPU): no spare tiles
            tiles = max(1, -(-int(end[:, nb - 1].max()) // t))
            rows = tiles * t
        starts = torch.arange(0, rows, t, device=dev).repeat(z, 1)  # (Z, tiles)
        tile_blk = torch.searchsorted(end, starts, right=True)  # (Z, tiles); >= nb: none
        item = torch.arange(pairs, device=dev) // s  # (P,) item of each pair
        zi = torch.arange(z, device=dev)[:, None]
        row_item = torch.zeros(z, full, dtype=torch.long, device=dev)
        row_item = row_item.scatter_(1, dest, item.expand(z, pairs))[:, :rows]  # (Z, rows)
        real = torch.zeros(z, full, dtype=torch.bool, device=dev)
        real = real.scatter_(1, dest, (blk < nb))[:, :rows]  # (Z, rows)
        self.mask = None
        if part.masked:
            row_pos = torch.full((z, full), -1, dtype=torch.long, device=dev)  # sees nothing
            row_pos = row_pos.scatter_(1, dest, qpos[item].expand(z, pairs))[:, :rows]
            kpos = (tile_blk * b)[..., None, None] + torch.arange(b, device=dev)
            rp = row_pos.reshape(z, tiles, t, 1)  # (Z, tiles, T, 1)
            hidden = part.hides(kpos, rp)  # (Z, tiles, T, b); padded keys (>= n > qpos) too
            neg, zero = (torch.tensor(x, dtype=work, device=dev) for x in (NEG, 0.0))
            mask = torch.where(hidden, neg, zero)
            self.mask = mask[:, :, :, None].expand(z, tiles, t, g, b).reshape(
                z * tiles, 1, t * g, b)  # (Z, tiles, T, G, b) → (Z·tiles, 1, T·G, b)
        self.real = real[..., None].expand(z, rows, g).reshape(z * rows, g)  # (Z·rows, G)
        self.q_index = (zi * m + row_item).reshape(-1)  # (Z·rows,) into the Z·M items
        self.k_index = (zi * nb + tile_blk.clamp(max=nb - 1)).view(-1)  # (Z·tiles,) into Z·nb
        self.shape = (z, m, s, g, t, tiles, rows, nb, b, n)


def _stat(work: torch.dtype) -> torch.dtype:
    return torch.float64 if work == torch.float64 else torch.float32


def _forward(self, qf, k, v, blocks, fused):
    """A layout's tiles as pieces (q_index, per-row output (rows, G, D), log-sum-exp (rows, G);
    not real: NEG). On the CPU in slabs of tiles whose tensors stay under SLAB_BYTES: the
    allocator then reuses freed memory instead of mapping (and page-faulting) fresh pages for
    each large temporary, which took as long as the tiles' matmuls."""
    g, d, t, zt = self.shape[3], k.shape[-1], self.shape[4], self.shape[0] * self.shape[5]
    step = max(1, SLAB_BYTES // (t * g * d * qf.element_size())) if fused else zt
    # the slabs' gathers land in three buffers, paged in once per call
    bufs = _buffers(qf, step, t * g, self.shape[8], d) if step < zt else None
    pieces = []
    for a in range(0, zt, step):
        e = min(zt, a + step)
        qr, kt, vt = _tiles(qf, k, v, self, blocks, a, e, bufs)
        mask = None if self.mask is None else self.mask[a:e]
        o, lse = _tile_forward(qr, kt, vt, mask, fused)  # (tiles, 1, T·G, D), (tiles, 1, T·G)
        # (tiles, 1, T·G, D) → (rows, G, D); lse (tiles, 1, T·G) → (rows, G)
        pieces.append((self.q_index[a * t : e * t], o.reshape(-1, g, d),
                       lse.reshape(-1, g).masked_fill(~self.real[a * t : e * t], NEG)))
    return pieces


def _backward(self, qf, k, v, blocks, dx, ox, total, grads, fused):
    z, g = self.shape[0], self.shape[3]
    t, tiles, rows, nb, b, n = self.shape[4:]
    d = k.shape[-1]
    gq, gk, gv = grads
    qr, kt, vt = _tiles(qf, k, v, self, blocks)

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.q_index).view(z * tiles, 1, t * g, -1)  # (Zt, 1, T·G, ·)

    # real rows as (Zt, 1, T·G, 1): padding gets dO = 0
    do = rows_of(dx).mul_(self.real.reshape(z * tiles, 1, t * g, 1))
    lse = rows_of(total)[..., 0].contiguous()  # (Zt, 1, T·G)
    dq, dk, dv = _tile_backward(do, qr, kt, vt, rows_of(ox), lse, self.mask, fused)
    gq.index_add_(0, self.q_index, dq.view(z * rows, g * d))  # (Z·rows, G·D)
    for acc, x in ((gk, dk), (gv, dv)):
        # dk, dv (Zt, 1, b, D) as (Z·tiles, b, D), summed into the (Z·nb, b, D) blocks
        acc_b = x.new_zeros(z * nb, b, d).index_add_(0, self.k_index, x.view(z * tiles, b, d))
        acc += acc_b.view(z, nb * b, d)[:, :n]  # (Z, N, D)


_Layout.forward, _Layout.backward = _forward, _backward


def _buffers(qf: torch.Tensor, tiles: int, rows: int, b: int, d: int) -> tuple:
    """Reusable gather targets for slabs of `tiles` tiles: query rows, key and value tiles."""
    return (qf.new_empty(tiles * rows // (qf.shape[1] // d), qf.shape[1]),
            qf.new_empty(tiles, b, d), qf.new_empty(tiles, b, d))


def _tiles(qf, k, v, lay: _Layout, blocks: dict, a: int = 0, e: int | None = None,
           bufs: tuple | None = None):
    """Tiles a … e − 1 (of Z·tiles; default all): gathered query rows (tiles, 1, T·G, D) and
    key, value tiles (tiles, 1, b, D), into `bufs` (`_buffers`) where given; `blocks` keeps k,
    v as (Z·nb, b, D) per block size (a padded copy only when b does not divide n)."""
    g, t, nb, b = (lay.shape[i] for i in (3, 4, 7, 8))
    e = lay.shape[0] * lay.shape[5] if e is None else e
    d = k.shape[-1]
    if b not in blocks:
        blocks[b] = [_as_blocks(x, nb, b, k.shape[1]) for x in (k, v)]
    kb, vb = blocks[b]
    qi, ki = lay.q_index[a * t : e * t], lay.k_index[a:e]
    if bufs is None:
        qr = qf.index_select(0, qi)
        kt, vt = (_gather_blocks(x, ki, nb) for x in (kb, vb))
    else:
        qr = torch.index_select(qf, 0, qi, out=bufs[0][: len(qi)])
        kt, vt = (_gather_blocks(x, ki, nb, out[: e - a])
                  for x, out in zip((kb, vb), bufs[1:], strict=True))
    return qr.view(e - a, 1, t * g, d), kt.view(e - a, 1, b, d), vt.view(e - a, 1, b, d)


def _as_blocks(x: torch.Tensor, nb: int, b: int, n: int):
    """x (Z, N, D) as a source of whole key blocks: (Z·nb, b, D) where that is x itself
    (contiguous, b divides N); otherwise (its whole blocks as a view (Z, N // b, b, D), the
    partial last block padded alone (Z, 1, b, D)): no copy of the whole keys, which a decode step
    over a cache (a strided view, rarely a whole number of blocks long) made at every token."""
    z, _, d = x.shape
    if nb * b == n and x.is_contiguous():
        return x.reshape(z * nb, b, d)
    full = n // b
    whole = x[:, : full * b].unflatten(1, (full, b))  # (Z, full, b, D): a view
    tail = F.pad(x[:, full * b:], (0, 0, 0, nb * b - n)).unsqueeze(1) if full < nb else None
    return whole, tail


def _gather_blocks(src, index: torch.Tensor, nb: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks `index` (into Z·nb) names, (len(index), b, D), from an `_as_blocks` source
    (into `out` where given and the source is one tensor)."""
    if isinstance(src, torch.Tensor):
        return src.index_select(0, index) if out is None else \
            torch.index_select(src, 0, index, out=out)
    whole, tail = src
    zi, bi = index // nb, index % nb
    full = whole.shape[1]
    out = whole[zi, bi.clamp(max=max(full - 1, 0))] if full else None
    if tail is None:
        return out
    last = tail[zi, 0]
    if out is None:
        return last
    return torch.where((bi >= full)[:, None, None], last, out)


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
        lk = (r + 1) * b
        # query a of a block (at a + r·b in its band) against key c of its band: the same in
        # every block
        hidden = part.hides(torch.arange(lk, device=device),
                            torch.arange(b, device=device)[:, None] + r * b)  # (b, Lk)
        blocks = 1  # one mask fits every block, unless a band reaches before the first key
        if self.first < r:
            blocks = self.nbq
            kpos = ((torch.arange(blocks, device=device) + self.first - r) * b)[:, None] + \
                torch.arange(lk, device=device)  # (blocks, Lk)
            hidden = hidden | (kpos < 0)[:, None, :]  # (blocks, b, Lk)
        mask = torch.where(hidden, torch.tensor(NEG, dtype=work, device=device),
                           torch.tensor(0.0, dtype=work, device=device))
        self.mask = mask.view(blocks, b, 1, lk).expand(blocks, b, g, lk).reshape(
            1, blocks, b * g, lk)  # (1, blocks, b·G, Lk)

    def _pad(self, x: torch.Tensor, width: int) -> torch.Tensor:
        z, _, g, runs, nq, _, b, _ = self.geo
        rows = self.nbq * b
        # (Z·M, width) → (Z, runs, Nq, width), padded to (Z, runs, nbq·b, width) (no copy when
        # the run fills whole blocks)
        x = x.reshape(z, runs, nq, width)
        if rows != nq:
            x = F.pad(x, (0, 0, self.front, rows - self.front - nq))
        return x.view(z * runs, self.nbq, b * g, width // g)  # (Z·runs, nbq, b·G, width/G)

    def _unpad(self, x: torch.Tensor, width: int) -> torch.Tensor:
        _, _, _, runs, nq, _, b, _ = self.geo
        # (Z·runs, nbq, b·G, width/G) → (Z, runs, Nq, width) → (Z·M, width) (Z: all k/v heads
        # or a slab of them)
        x = x.reshape(-1, runs, self.nbq * b, width)[:, :, self.front : self.front + nq]
        return x.reshape(-1, width)

    def _keys(self, x: torch.Tensor, view: bool = False) -> torch.Tensor:
        """(Z·runs, nbq, Lk, D) keys (or values) of each query block's band; `view`: the band
        as an overlapping strided view of the padded x (aten's CPU flash kernels read any row
        stride), not a copy of (r + 1)× the keys."""
        runs, n, b, r = (self.geo[i] for i in (3, 5, 6, 7))
        z, d, lk = x.shape[0], x.shape[-1], (r + 1) * b  # z: all k/v heads or a slab of them
        if r or (self.first + self.nbq) * b != n:  # token t at t + r·b
            x = F.pad(x, (0, 0, r * b, (self.first + self.nbq) * b - n))
        x = x[:, self.first * b :]  # band of query block i: rows i·b … i·b + Lk
        if r == 0:
            x = x.view(z, self.nbq, b, d)
        else:
            x = x.unfold(1, lk, b).transpose(-1, -2)  # (Z, nbq, Lk, D)
            x = x if view and runs == 1 else x.contiguous()
        # (Z, nbq, Lk, D) → (Z, runs, nbq, Lk, D) → (Z·runs, nbq, Lk, D)
        return x[:, None].expand(-1, runs, -1, -1, -1).reshape(z * runs, self.nbq, lk, d)

    def forward(self, qf, k, v, blocks, fused):
        """Pieces (items, per-row output (rows, G, D), log-sum-exp (rows, G)); items: None
        (every item in order) or a slice of them. A band (reach > 0, one run) runs on the CPU a
        slab of k/v heads at a time, so its padded keys and values stay under SLAB_BYTES."""
        z, _, g, runs, nq, _, b, r = self.geo
        d = k.shape[-1]
        qp = self._pad(qf, g * d)  # (Z·runs, nbq, b·G, D)
        padded = 2 * (self.nbq + r) * b * d * k.element_size()  # one head's padded k and v
        step = max(1, SLAB_BYTES // padded) if fused and r and runs == 1 else z
        pieces = []
        for a in range(0, z, step):  # k/v heads a … e − 1: items a·runs·Nq … e·runs·Nq − 1
            e = min(z, a + step)
            whole = e - a == z  # one call: no slices (the GPU path's op count)
            qs, ks, vs = (qp, k, v) if whole else (qp[a * runs : e * runs], k[a:e], v[a:e])
            o, lse = _tile_forward(qs, self._keys(ks, fused), self._keys(vs, fused), self.mask,
                                   fused)
            items = None if whole else slice(a * runs * nq, e * runs * nq)
            pieces.append((items, self._unpad(o, g * d).view(-1, g, d), self._unpad(lse, g)))
        return pieces

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
            x = x.view(z, runs, self.nbq, (r + 1) * b, d).sum(1)  # (Z, nbq, Lk, D): runs summed
            band = x.new_zeros(z, (self.nbq + r) * b, d)  # token t at start − r·b + row
            for o in range(r + 1):  # the band's o-th key block of query block i: block i − r + o
                band[:, o * b : (o + self.nbq) * b] += x[:, :, o * b : (o + 1) * b].reshape(
                    z, self.nbq * b, d)  # (Z, nbq, b, D) → (Z, nbq·b, D)
            lo = start - r * b  # token of the band's first row (negative: front padding)
            acc[:, max(lo, 0) :] += band[:, max(-lo, 0) : max(-lo, 0) + n - max(lo, 0)]


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _tile_forward(qr, kt, vt, mask, fused: bool):
    scale = 1.0 / math.sqrt(qr.shape[-1])
    if fused:
        return _FLASH(qr, kt, vt, attn_mask=mask, scale=scale)
    sc = (qr @ kt.transpose(-1, -2)).to(_stat(qr.dtype)).mul_(scale)  # (..., rows, keys)
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
    sc = (qr @ kt.transpose(-1, -2)).to(_stat(qr.dtype)).mul_(scale)  # (..., rows, keys)
    if mask is not None:
        sc.add_(mask)
    p = sc.sub_(lse[..., None]).exp_()  # the probabilities under the item's total
    delta = (do.to(p.dtype) * o.to(p.dtype)).sum(-1, keepdim=True)
    ds = (do @ vt.transpose(-1, -2)).to(p.dtype).sub_(delta).mul_(p).to(qr.dtype)  # as sc
    pw = p.to(qr.dtype)
    # dq (..., rows, D); dk, dv (..., keys, D)
    return ds @ kt * scale, ds.transpose(-1, -2) @ qr * scale, pw.transpose(-1, -2) @ do
