"""The selected-block engine's CPU forward without autograd (see `variants.sparse.select`): the
rows that read one key block form one group, and groups of near-equal size run together in
one call of aten's CPU flash kernel, padded to the longest.

Why not `select_tiles`' tiles of at most 128 rows: the kernel splits a call's queries by their
length, 32-row blocks below 192 rows, 64 from 192, 256 from 768, and its small GEMMs are what
cost. On a 2-core AMD EPYC, against 128 keys: batches of 128-row tiles ran at 81 GFLOP/s, the
same work in 256-row rows at 114, 1024 rows at 136 (matmul: 168). A group holds every row of its
key block (MoBA at n = 8K: about 260 rows and the block's own 128 queries; NSA: about 450 and
its 64), so a call's rows are long and the padding is only the spread of sizes in a batch.

Each item's own block joins its group where the items of a k/v head are runs of one query head's
consecutive positions starting on a block boundary (G = 1): sorted first, the own rows put
position j·b + a at row a against keys j·b … j·b + b − 1, and the kernel's causal mask (top-left:
row a sees keys ≤ a) is exactly the own block's; the later rows (later queries reading the whole
block) sit at rows ≥ b and see every key. Only the last block may be partial, and no later query
reads it. Groups with own rows and groups without run in separate calls.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from attnbench.variants.sparse.select_tiles import (
    _FLASH,
    NEG,
    SLAB_BYTES,
    Part,
    _as_blocks,
    _gather_blocks,
)

# a call's groups differ in size by at most 1/SPREAD of the smallest: its padding stays under
# that fraction of its rows
SPREAD = 16


def groupable(parts: list[Part], g: int) -> tuple[Part | None, Part] | None:
    """(own, rest) where a forward may run by groups: an unmasked part of selected blocks beside
    one diagonal own part (a block or more of consecutive queries per run); `own`
    is None where it cannot join the groups (G > 1, or the first query off a block boundary).
    None: the parts are not of that form."""
    rest = [p for p in parts if p.idx is not None and not p.masked]
    diag = [p for p in parts if p.runs and p.own and not p.reach and p.window < 0]
    if len(parts) != 2 or len(rest) != 1 or len(diag) != 1:
        return None
    own = diag[0]
    joins = g == 1 and own.pos0 % own.block == 0 and own.block == rest[0].block
    return (own if joins else None), rest[0]


class Groups:
    """The (item, slot) pairs of `rest` (and each item's own block, where `own` is given)
    sorted by (query head, key block); the host reads the group sizes (free on the CPU) and
    batches groups of near-equal size (within 1/SPREAD) under SLAB_BYTES of gathered queries."""

    def __init__(self, rest: Part, own: Part | None, qpos: torch.Tensor, n: int, g: int,
                 d: int, itemsize: int) -> None:
        idx, b = rest.idx, rest.block
        z, m, s = idx.shape
        dev = idx.device
        runs = own.runs if own is not None else 1
        zq, nq = z * runs, m // runs  # one virtual head per run of consecutive items
        nb = -(-n // b)
        blk = idx.reshape(zq, nq, s)
        if own is not None:  # each item's own block as slot 0
            mine = (qpos[:nq] // b)[None, :, None].expand(zq, nq, 1)
            blk = torch.cat([mine, blk], -1)
            s += 1
        heads = torch.arange(zq, device=dev)[:, None, None] * nb
        grp = torch.where(blk < 0, zq * nb, blk + heads).reshape(-1)  # empty slots: group zq·nb
        key = grp
        if own is not None:  # own rows first in their group, then the later queries
            key = grp * 2 + (torch.arange(s, device=dev) > 0).repeat(zq * nq)
        small = torch.int16 if 2 * (zq * nb + 1) < 2**15 else torch.int32  # sorts 2x faster
        perm = torch.sort(key.to(small), stable=True)[1]  # by group, own first, query order
        rows = perm // s  # (pairs,) the item of each sorted row, into Z·M
        size = torch.bincount(grp, minlength=zq * nb + 1).tolist()  # host read
        first = int(qpos[0]) // b if own is not None else nb  # blocks from here hold own rows
        found, start = [], 0
        for gi, c in enumerate(size[:-1]):
            if c:  # (own rows, size, first row, k/v block of Z·nb)
                h, j = divmod(gi, nb)
                found.append((j >= first, c, start, (h // runs) * nb + j))
            start += c
        found.sort()  # calls of one kind, sizes ascending
        budget = max(1, SLAB_BYTES // (g * d * itemsize))  # padded rows of a call
        self.calls, cur = [], []
        for grp_ in [*found, None]:
            if cur and (grp_ is None or grp_[0] != cur[0][0]
                        or (len(cur) + 1) * grp_[1] > budget
                        or grp_[1] > cur[0][1] + cur[0][1] // SPREAD):
                self.calls.append(_call(cur, rows, dev))
                cur = []
            if grp_ is not None:
                cur.append(grp_)
        self.shape = (z, m, g, nb, b, n)

    def forward(self, qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks, fused):
        """Pieces (rows' items, output (rows, G, D), log-sum-exp (rows, G); padding: NEG), one
        per call, the queries and key/value blocks gathered into buffers reused by every call."""
        _, _, g, nb, b, _ = self.shape
        d = k.shape[-1]
        if b not in blocks:
            blocks[b] = [_as_blocks(x, nb, b, k.shape[1]) for x in (k, v)]
        kb, vb = blocks[b]
        most = max((len(c.q_index) for c in self.calls), default=0)
        tiles = max((len(c.k_index) for c in self.calls), default=0)
        bufs = (qf.new_empty(most, qf.shape[1]), qf.new_empty(tiles, b, d),
                qf.new_empty(tiles, b, d))
        pieces = []
        for c in self.calls:
            t, rows = len(c.k_index), len(c.q_index)
            qr = torch.index_select(qf, 0, c.q_index, out=bufs[0][:rows])
            kt, vt = (_gather_blocks(x, c.k_index, nb, out[:t])
                      for x, out in zip((kb, vb), bufs[1:], strict=True))
            o, lse = _FLASH(qr.view(t, 1, -1, d), kt.view(t, 1, b, d), vt.view(t, 1, b, d),
                            is_causal=c.causal, scale=1.0 / math.sqrt(d))
            pieces.append((c.q_index, o.reshape(-1, g, d),
                           lse.reshape(-1, g).masked_fill(c.pad[:, None], NEG)))
        return pieces


class _Call(NamedTuple):
    """One flash call: q_index (T·M,) items of the padded rows, pad (T·M,) which are padding,
    k_index (T,) key blocks into Z·nb, causal (the groups start with own rows)."""

    q_index: torch.Tensor
    pad: torch.Tensor
    k_index: torch.Tensor
    causal: bool


def _call(groups: list[tuple], rows: torch.Tensor, dev) -> _Call:
    """The call of `groups` (own, size, first row, block), each padded to the longest."""
    width = groups[-1][1]  # sizes ascend
    first = torch.tensor([x[2] for x in groups], device=dev)[:, None]
    size = torch.tensor([x[1] for x in groups], device=dev)[:, None]
    col = torch.arange(width, device=dev)
    pad = (col >= size).reshape(-1)  # (T·M,)
    at = (first + col.clamp(max=size - 1)).reshape(-1)  # padding repeats the group's last row
    return _Call(rows[at], pad, torch.tensor([x[3] for x in groups], device=dev), groups[0][0])
