"""NSA, Native Sparse Attention (Yuan et al. 2025, https://arxiv.org/abs/2502.11089), without
learned weights.

Three branches per query token t, combined with fixed gates 1/3 each (the paper's gates are a
learned MLP + sigmoid, its compressor φ a learned MLP; here φ is the mean):
- compressed: attention over K̃, Ṽ = means of key/value blocks of length l, stride d (block i:
  tokens i·d … i·d + l − 1, visible once complete: i·d + l − 1 <= t);
- selected: exact attention inside the top-n blocks of l′ tokens (always the first block and the
  2 local ones: t's own block and the one before), ranked by the compressed attention
  probabilities mapped to selection blocks by overlap (eq. 9) and summed over the heads of a k/v
  group (eq. 10: one selection per group);
- sliding window: exact attention over keys t − w … t.

Eq. 9 as printed sums p_cmp[(l′/d)·j − m − n]: with the paper's own block numbering that weights
compression blocks 4j − 4 … 4j (defaults), i.e. mostly the block before j. The text says the
scores are mapped "according to their spatial relationship": here the weights are the overlap in
strides (the same 1, 2, 2, 2, 1 profile), aligned on block j's tokens: blocks 4j − 1 … 4j + 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, Variant, gpu_path
from attnbench.variants.cache import CACHE_STEP, KVCache
from attnbench.variants.registry import register
from attnbench.variants.sparse.nsa_naive import GATES, nsa_definition, nsa_selection
from attnbench.variants.sparse.select import (
    band_bytes,
    band_rows,
    block_pairs,
    blocks_to_keys,
    earlier_pairs,
    gathers,
    group_bytes,
    group_pairs,
    own_and_rest,
    own_rows,
    part_bytes,
    part_rows,
    select_attention,
    top_blocks,
)
from attnbench.variants.sparse.select_tiles import NEG, Part

# The compressed branch's scores per span of queries on the CPU (bytes): large enough that the
# span's ~25 ops are few against their work, small enough to be reused from the heap, not mapped
# fresh per call (glibc: above 32 MiB). n = 8K, H = 8: 8 MiB ran NSA 5-8% faster than 2 MiB
# (interleaved, 7 rounds, 2-core EPYC; 16 MiB no faster).
SPAN_BYTES = 8 << 20


@register
@dataclass
class NSA(Variant):
    """Compressed + selected + sliding-window attention, mean-pooled compression, fixed gates.

    Defaults: the paper's l = 32, d = 16, l′ = 64; n = 8 selected blocks and w = 256 (the paper's
    16 and 512 are sized for 64K contexts; at n = 2K–16K they would select most of the sequence).
    Exact to its own definition (`reference`); an approximation of softmax attention.

    Args: cmp_block (l); cmp_stride (d, dividing l and l′); sel_block (l′); sel_count (n,
    the first and 2 local blocks included); window (w, in tokens: keys t − w … t).
    """

    name: ClassVar[str] = "nsa"
    family: ClassVar[str] = "sparse"
    # Selected and window branches are O(n·(n_sel·l′ + w)); the compressed branch attends to n/d
    # keys per query: O(n²/d) time and memory (about 1/3 of the FLOPs at n = 8K with defaults).
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 2.0
    exact: ClassVar[bool] = False
    no_noncausal: ClassVar[str] = "compression, selection and window are defined over the past"
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    sel_count: int = 8
    window: int = 256

    def __post_init__(self) -> None:
        for f in ("cmp_block", "cmp_stride", "sel_block", "sel_count"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)}: must be >= 1")
        if self.window < 0:
            raise ValueError(f"window={self.window}: must be >= 0")
        if self.cmp_block % self.cmp_stride or self.sel_block % self.cmp_stride:
            raise ValueError(f"cmp_stride={self.cmp_stride} must divide cmp_block="
                             f"{self.cmp_block} and sel_block={self.sel_block} (eq. 9)")

    @property
    def label(self) -> str:
        return (f"nsa[l={self.cmp_block},d={self.cmp_stride},l'={self.sel_block},"
                f"n={self.sel_count},w={self.window}]")

    # -- computation ----------------------------------------------------------------------------
    def forward(self, q, k, v, causal: bool = False) -> torch.Tensor:
        if not causal:
            raise ValueError(f"nsa is causal only: {self.no_noncausal}")
        b, h, nq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        z, g = b * hkv, h // hkv
        # items are positions, the G query heads of a k/v head their rows
        qi = q.view(b, hkv, g, nq, d).transpose(2, 3).reshape(z, nq, g, d)  # (Z, Nq, G, D)
        qpos = torch.arange(nq, device=q.device) + (n - nq)
        kz, vz = k.reshape(z, n, d), v.reshape(z, n, d)  # (Z, N, D)
        kc, vc = (self._compress(x) for x in (kz, vz))
        out = self._branches(qi, kz, vz, kc, vc, qpos)  # (Z, Nq, G, D)
        return out.view(b, hkv, nq, g, d).transpose(2, 3).reshape(b, h, nq, d)  # (B, H, Nq, D)

    def _compress(self, x: torch.Tensor) -> torch.Tensor:
        """(Z, N, D) → (Z, C, D): means of blocks of l tokens at stride d (C = 0 when N < l)."""
        if x.shape[1] < self.cmp_block:
            return x[:, :0]
        return x.unfold(1, self.cmp_block, self.cmp_stride).mean(-1)  # (Z, C, D, l) → (Z, C, D)

    def _branches(self, qi, kz, vz, kc, vc, qpos) -> torch.Tensor:
        n, work, fused = kz.shape[1], _work(qi), not gpu_path(qi.device)
        o_cmp, idx = self._compressed_select(qi.to(work), kc.to(work), vc.to(work), qpos, n,
                                             fused)  # (Z, Nq, G, D), (Z, Nq, S)
        parts = own_and_rest(idx, qpos // self.sel_block, self.sel_block, 1, n - qi.shape[1])
        o_sel = select_attention(qi, kz, vz, qpos, parts, work, fused)
        o_win = select_attention(qi, kz, vz, qpos, [self._window_part(qpos, n, kz.shape[0])],
                                 work, fused)
        g_cmp, g_slc, g_win = GATES
        out = o_sel * g_slc  # one fresh tensor, the other branches added in place
        return out.add_(o_win, alpha=g_win).add_(o_cmp.to(out.dtype), alpha=g_cmp).to(qi.dtype)

    def _compressed_select(self, qi, kc, vc, qpos, n: int, spans: bool):
        """The compressed branch's output (Z, Nq, G, D) and the selection (Z, Nq, S) from its
        probabilities. `spans` (the CPU): a span of consecutive queries at a time, against only
        the compressed blocks complete by the span's last query, so the scores and
        probabilities stay small (under SPAN_BYTES; the whole (Nq, C) matrix was 134 MB at
        n = 8K and its page faults and passes took most of NSA's time) and the blocks no
        query of the span sees are not scored."""
        z, nq, g, _ = qi.shape
        parts = self._spans(z, g, nq, n, kc.shape[1], spans)
        if len(parts) == 1:
            o, p = self._compressed(qi, kc, vc, qpos)
            with torch.no_grad():
                return o, self._select(p, qpos, n)
        outs, idxs = [], []
        for s0, s1, vis in parts:
            o, p = self._compressed(qi[:, s0:s1], kc[:, :vis], vc[:, :vis], qpos[s0:s1])
            last = n - nq + s1 - 1  # the span's last position
            with torch.no_grad():
                idxs.append(self._select(p, qpos[s0:s1], n, last // self.sel_block + 1))
            outs.append(o)
        return torch.cat(outs, 1), torch.cat(idxs, 1)

    def _spans(self, z: int, g: int, nq: int, n: int, c: int,
               spans: bool) -> list[tuple[int, int, int]]:
        """(first, end, blocks) of each span `_compressed_select` runs (and `_cmp_pairs`
        counts): consecutive queries whose scores stay under SPAN_BYTES, against the c
        compressed blocks complete by the span's last query; one span of all where not
        `spans`."""
        st, lc = self.cmp_stride, self.cmp_block
        span = max(st, SPAN_BYTES // max(1, 4 * z * g * c) // st * st) if spans else nq
        if span >= nq:
            return [(0, nq, c)]
        out = []
        for s0 in range(0, nq, span):
            s1 = min(nq, s0 + span)
            last = n - nq + s1 - 1  # the span's last position
            out.append((s0, s1, min(c, max(0, (last - lc + 1) // st + 1)) if last >= lc - 1
                        else 0))
        return out

    def _compressed(self, qi, kc, vc, qpos):
        """Attention of each query over the complete compressed blocks: output (Z, Nq, G, D)
        (zero before the first block completes) and the probabilities (Z, Nq, G, C), detached."""
        z, nq, g, d = qi.shape
        c = kc.shape[1]
        qs = qi.reshape(z, nq * g, d) * (1.0 / math.sqrt(d))  # (Z, Nq·G, D)
        sc = (qs @ kc.transpose(-1, -2)).view(z, nq, g, c)  # (Z, Nq, G, C)
        ends = torch.arange(c, device=qi.device) * self.cmp_stride + self.cmp_block - 1
        hidden = ends > qpos[:, None]  # (Nq, C)
        stat = torch.float64 if qi.dtype == torch.float64 else torch.float32
        sc = sc.to(stat)
        # the blocks complete for the earliest query are seen by all: mask only the later ones
        lo = 0 if gpu_path(qi.device) or not len(qpos) else int((ends <= qpos[0]).sum())
        sc[..., lo:].masked_fill_(hidden[:, None, lo:], NEG)  # bmm's backward needs no output
        p = torch.softmax(sc, -1)  # rows that see no block: uniform, zeroed below
        o = (p.to(qi.dtype).view(z, nq * g, c) @ vc).view(z, nq, g, d)  # (Z, Nq, G, D)
        seen = (~hidden).any(-1)[:, None, None]  # (Nq, 1, 1)
        return o * seen, p.detach()

    def _select(self, p_cmp: torch.Tensor, qpos: torch.Tensor, n: int,
                blocks: int | None = None) -> torch.Tensor:
        """Top-n selection blocks from the compressed probabilities (Z, Nq, G, C): eq. 9 by
        overlap, eq. 10 summed over the group's heads, the first and 2 local blocks forced.
        `blocks`: score only the first ones (those up to the latest query's own block; the
        slots stay min(n − 1, all blocks) wide, -1 where empty)."""
        a, c = self.sel_block // self.cmp_stride, self.cmp_block // self.cmp_stride
        nbs = every = -(-n // self.sel_block)
        if blocks is not None:
            nbs = min(nbs, blocks)
        seen = (qpos >= self.cmp_block - 1)[:, None]  # a compression block is complete
        p = p_cmp.sum(2).mul_(seen)  # (Z, Nq, C)
        # Σ_{m<a} Σ_{r<c} p[a·j − (c − 1) + m + r]: per offset o = m + r − (c − 1) one strided
        # add of p[a·j + o] (columns outside p are 0), weighted by the (m, r) pairs that give o
        score = p.new_zeros(*p.shape[:-1], nbs)  # (Z, Nq, nbs)
        for o in range(1 - c, a):
            weight = sum(1 for m in range(a) if 0 <= o + c - 1 - m < c)
            j0 = -(-max(0, -o) // a)  # the first block whose column a·j + o >= 0
            j1 = min(nbs, (p.shape[-1] - 1 - o) // a + 1)  # past the last inside p
            if j1 > j0:
                cols = p[..., a * j0 + o : a * (j1 - 1) + o + 1 : a]
                score[..., j0:j1].add_(cols, alpha=weight)
        own = qpos // self.sel_block
        col = torch.arange(nbs, device=p.device)
        forced = (col == 0) | (col == own[:, None] - 1)
        idx = top_blocks(score, own, self.sel_count - 1, forced)  # besides the own block
        return F.pad(idx, (0, min(every, self.sel_count - 1) - idx.shape[-1]), value=-1)

    def _window_part(self, qpos: torch.Tensor, n: int, z: int) -> Part:
        """The window's key blocks (of l′ keys): those holding t − w … t, masked to the window;
        a band of ⌈w/l′⌉ + 1 blocks per query block when there is at least a block of queries,
        else gathered per query."""
        bw = self.sel_block
        if len(qpos) >= bw:
            return Part(None, bw, masked=True, window=self.window, runs=1, pos0=n - len(qpos),
                        reach=-(-self.window // bw))
        slots = self.window // bw + 2
        idx = qpos[:, None] // bw - torch.arange(slots, device=qpos.device)  # (Nq, S)
        idx = idx.masked_fill(idx < ((qpos - self.window).clamp(min=0) // bw)[:, None], -1)
        return Part(idx.expand(z, -1, -1), bw, masked=True, window=self.window)  # (Z, Nq, S)

    # -- decode: a KV cache and the complete compressed blocks ---------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
                    ) -> NsaCache:
        """The cache after a context k, v (B, Hkv, n, D); `heads` (main's contract) is not
        needed: the step routes from its own query heads."""
        b, hkv, n, d = k.shape
        kc, vc = (self._compress(x.reshape(b * hkv, n, d)) for x in (k, v))  # (Z, C, D)
        room = CACHE_STEP // self.cmp_stride + 1
        # (B, Hkv, C + room, D)
        bufs = [F.pad(x, (0, 0, 0, room)).view(b, hkv, -1, d) for x in (kc, vc)]
        return NsaCache(KVCache.of(k, v), bufs[0], bufs[1], kc.shape[1])

    def decode_step(self, q, k, v, state: NsaCache) -> tuple[torch.Tensor, NsaCache]:
        """The new token at p = the cache length: when it completes a compression block, that
        block's means are written at its slot (past the passed state's count, which is
        unchanged); then the three branches for that one query."""
        kv = state.kv.append(k, v)
        b, h, _, d = q.shape
        hkv, p = k.shape[1], kv.length - 1
        z, g = b * hkv, h // hkv
        kcb, vcb, count = state.kc, state.vc, state.count
        start = count * self.cmp_stride  # the next compression block's first token
        if start + self.cmp_block == p + 1:
            if count == kcb.shape[2]:
                kcb, vcb = (torch.cat([x, torch.zeros_like(x)], 2) for x in (kcb, vcb))
            for buf, x in ((kcb, kv.keys()), (vcb, kv.values())):
                buf[:, :, count] = x[:, :, start : p + 1].mean(2)
            count += 1
        kz, vz = kv.keys().reshape(z, p + 1, d), kv.values().reshape(z, p + 1, d)  # (Z, p+1, D)
        kc, vc = (x[:, :, :count].reshape(z, count, d) for x in (kcb, vcb))  # (Z, count, D)
        qi = q.reshape(z, g, 1, d).transpose(1, 2)  # (Z, 1, G, D)
        qpos = torch.full((1,), p, device=q.device)
        out = self._branches(qi, kz, vz, kc, vc, qpos)
        # (Z, 1, G, D) → (B, H, 1, D)
        return out.transpose(1, 2).reshape(b, h, 1, d), NsaCache(kv, kcb, vcb, count)

    # -- definition -----------------------------------------------------------------------------
    def definition(self, q, k, v, causal: bool = True, dtype=torch.float64,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The three branches densely in `dtype`, the selection from float64 compressed scores
        (`nsa_naive.nsa_definition`), on `rows` (None: all)."""
        return nsa_definition(self, q, k, v, dtype, rows)

    def reference(self, q, k, v, causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Its own definition in float64 (selection and the three branches), on `rows`."""
        return self.definition(q, k, v, causal, torch.float64, rows)

    def attended_keys(self, q, k, rows: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """(B, H, R, Nk) bool: the union of the full-resolution branches of each query row, its
        float64-selected blocks and its sliding window (keys t − w … t). The compressed branch
        is left out: it attends block means, not keys."""
        n, nq = k.shape[2], q.shape[2]
        pos = rows.to(q.device) + (n - nq)
        sel = nsa_selection(self, q.detach(), k.detach(), rows)  # (B, H, R, S)
        rel = pos[:, None] - torch.arange(n, device=q.device)  # (R, N)
        return blocks_to_keys(sel, self.sel_block, n, pos) | ((rel >= 0) & (rel <= self.window))

    # -- models ---------------------------------------------------------------------------------
    def _geometry(self, shape: Shape):
        n, m = shape.seq_len, shape.nq
        c = (n - self.cmp_block) // self.cmp_stride + 1 if n >= self.cmp_block else 0
        nbs = -(-n // self.sel_block)
        s = min(self.sel_count - 1, nbs)  # slots besides the own block
        ws = self.window // self.sel_block + 2
        return n, m, c, s, ws

    def _rows(self, shape: Shape, device: torch.device | str = "cpu",
              window: bool = True) -> int:
        """Engine rows per k/v head of the tiles: own block, other selected blocks (on the CPU
        the expected count of the trimmed tiles), window blocks (`window`)."""
        n, m, _, s, ws = self._geometry(shape)
        real = None if gpu_path(device) else earlier_pairs(
            torch.arange(n - m, n), s, self.sel_block)
        rest = part_rows(m, s, n, self.sel_block, trimmed=real) if s else 0
        if not window:
            return own_rows(1, m, n, self.sel_block) + rest
        if m >= self.sel_block:  # the band: ⌈w/l′⌉ + 1 key blocks per query block
            win = band_rows(m, n, self.sel_block) * (-(-self.window // self.sel_block) + 1)
        else:
            win = part_rows(m, ws, n, self.sel_block)
        return own_rows(1, m, n, self.sel_block) + rest + win

    def _cmp_pairs(self, shape: Shape, device: torch.device | str = "cpu") -> int:
        """Query–compressed-block pairs the compressed branch scores per query head: every
        block for every query (the GPU path), or on the CPU per span of queries the blocks
        complete by its last one (`_compressed_select`)."""
        n, m, c, _, _ = self._geometry(shape)
        parts = self._spans(shape.batch * shape.hkv, shape.groups, m, n, c, not gpu_path(device))
        return sum((s1 - s0) * vis for s0, s1, vis in parts)

    def _group_pairs(self, shape: Shape, device: torch.device | str = "cpu",
                     grad: bool = False) -> int | None:
        """Query–key pairs per k/v head of the selection's CPU key-block groups
        (`group_pairs`); None where it runs the tiles (the GPU path, autograd, fewer queries
        than a block)."""
        if grad or gpu_path(device):
            return None
        n, m, _, s, _ = self._geometry(shape)
        return group_pairs(1, m, n, self.sel_block, s, shape.groups)

    def _pairs(self, shape: Shape, device: torch.device | str = "cpu") -> int:
        """Query–key pairs of the selected and window branches per k/v head (per query head of
        its group): without autograd on the CPU the selection's groups (where they run) and
        the window's band, else the tiles' rows × l′ keys."""
        rows = self._rows(shape, device)
        pairs = self._group_pairs(shape, device)
        if pairs is None:
            return rows * self.sel_block
        sel = self._rows(shape, device, window=False)  # the tiles' selection rows
        return (rows - sel) * self.sel_block + pairs

    def flops(self, shape: Shape, causal: bool = False,
              device: torch.device | str = "cpu") -> float:
        """The compressed branch's scores and values (`_cmp_pairs`) and the engine's
        query–key pairs of the selected and window branches (`_pairs`, padding included)."""
        z, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        return 4.0 * z * g * d * (self._cmp_pairs(shape, device) + self._pairs(shape, device))

    def algorithm_flops(self, shape: Shape, causal: bool = True) -> float:
        """The three branches as the paper defines them, per query head and query at position t
        (4·D per key, scores and values): the complete compressed blocks (i·d + l − 1 <= t),
        the selected keys (t mod l′ + 1 of its own block and min(n − 1, t // l′) earlier blocks
        of l′) and the window's min(w, t) + 1 keys; no padding, the compression means and the
        selection's sums are no matmuls."""
        n, lc, st, bs = shape.seq_len, self.cmp_block, self.cmp_stride, self.sel_block
        t = torch.arange(n - shape.nq, n)
        cmp = torch.where(t >= lc - 1, torch.div(t - lc + 1, st, rounding_mode="floor") + 1, 0)
        sel = t % bs + 1 + bs * (t // bs).clamp(max=self.sel_count - 1)
        win = t.clamp(max=self.window) + 1
        return float(4 * shape.bh * shape.head_dim * int((cmp + sel + win).sum()))

    def backward_flops(self, shape: Shape, causal: bool = False,
                       device: torch.device | str = "cpu") -> float:
        """Compressed branch by autograd (2×); the engine flash-style (2.5×, scores recomputed);
        the compression means and the selection have no matmuls."""
        z, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        tiles = self._rows(shape, device) * self.sel_block
        return (8.0 * z * g * d * self._cmp_pairs(shape, device)
                + 4.0 * z * g * d * (3.5 * tiles - self._pairs(shape, device)))

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        """The KV cache (with its headroom), the compressed keys and values (and their padded
        buffers), and one step: the compressed branch's scores and probabilities over every
        complete block, the selected blocks' and the window's tiles. Not the forward's model
        (153 GB at n = 65536 for llama3_8b's heads: every query's compressed scores)."""
        el = torch.empty((), dtype=dtype).element_size()
        b, hkv, n, d = shape.batch, shape.hkv, shape.seq_len, shape.head_dim
        c = max(0, (n - self.cmp_block) // self.cmp_stride + 1)
        room = CACHE_STEP // self.cmp_stride + 1
        cache = 2 * b * hkv * (n + CACHE_STEP) * d * el
        compressed = 2 * b * hkv * (2 * c + room) * d * max(el, 4)  # kc, vc and their buffers
        keys = self.sel_count * self.sel_block + self.window + 1
        step = shape.bh * (4 * c * 8 + 4 * keys * (d + 1) * max(el, 4))
        return cache + compressed + step

    def decode_flops(self, shape: Shape) -> float:
        """The compressed branch over the complete blocks, then the selected slots and the
        window's, each gathered and scored whole (`select.gathers`)."""
        one = Shape(shape.batch, shape.heads, shape.seq_len + 1, shape.head_dim,
                    shape.kv_heads, 1)
        keys = self._decode_keys(shape)
        if keys is None:  # the engine's tiles
            return self.flops(one, True)
        return 4.0 * shape.bh * shape.head_dim * (self._geometry(one)[2] + keys)

    def _decode_keys(self, shape: Shape) -> int | None:
        """A step's selected and window slot keys (its compressed blocks apart), where both
        calls gather them (`select.gathers`); None where it runs the engine's tiles."""
        one = Shape(shape.batch, shape.heads, shape.seq_len + 1, shape.head_dim,
                    shape.kv_heads, 1)
        n, _, _, s, ws = self._geometry(one)
        sel, win, z = self.sel_block * (1 + s), self.sel_block * ws, shape.batch * shape.hkv
        return sel + win if gathers(z, 1, sel, n) and gathers(z, 1, win, n) else None

    def algorithm_decode_flops(self, shape: Shape) -> float:
        one = Shape(shape.batch, shape.heads, shape.seq_len + 1, shape.head_dim,
                    shape.kv_heads, 1)
        return self.algorithm_flops(one, True)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     device: torch.device | str = "cpu", grad: bool = False) -> int:
        """The compressed branch's scores, probabilities and selection, the larger of the
        engine's two calls (selection: the CPU's groups without autograd, where they run, else
        the tiles; window) and the branches' outputs; forward and backward (`grad`): 3× the
        tiles' forward."""
        el = torch.empty((), dtype=dtype).element_size()
        z, g, d = shape.batch * shape.hkv, shape.groups, shape.head_dim
        n, m, c, s, ws = self._geometry(shape)
        nbs = -(-n // self.sel_block)
        cmp = z * (2 * c * d * 4 + 3 * m * g * c * 4 + m * (c + 3 * nbs) * 8)  # scores, p, sel
        if not gpu_path(device):  # in spans: scores, probabilities, block scores per span
            cmp = min(cmp, z * (2 * c * d * 4 + m * g * d * 4 + m * s * 8) + 3 * SPAN_BYTES)
        b = self.sel_block
        sel = part_bytes(z, m, g, 1, n, b, d, True, own=True) + (
            part_bytes(z, m, g, s, n, b, d, False) if s else 0)
        win = part_bytes(z, m, g, ws, n, b, d, True)
        if self._group_pairs(shape, device, grad) is not None:
            sel = group_bytes(z, m, g, s, d)
        if not grad and not gpu_path(device) and m >= b:  # the window as a band
            win = band_bytes(z, m, g, n, b, -(-self.window // b), d)
        engine = max(sel, win)
        return int(cmp + engine + 4 * shape.bh * m * d * max(el, 4)) * (3 if grad else 1)

    def density(self, n: int, causal: bool = False) -> float:
        """The fraction of the n×n scores it computes (≤ 1), an upper bound (the selection is
        data-dependent): per query block j, the window's blocks (its own and ⌈w/l′⌉ before it)
        and the selected blocks besides the own and the previous one (both in the window),
        counted apart, at most the j + 1 blocks up to its own; whole blocks clipped at n. The
        compressed keys are no entries of the n×n matrix, and the engine's padded tiles are
        executed work, not scores: both are in `flops`."""
        reach = -(-self.window // self.sel_block)

        def blocks(j: int) -> int:
            window = min(j + 1, reach + 1)
            extra = max(0, min(self.sel_count - 1, j) - (1 if j else 0))
            return min(j + 1, window + extra)

        return block_pairs(n, self.sel_block, blocks) / n**2

    def decode_kernel(self, shape: Shape, device) -> str:
        """The compressed branch, then the selected blocks and the window each gathered and one
        attention call (`select.gathers`), else the one-query forward's path."""
        if self._decode_keys(shape) is not None:
            return "nsa:cmp-bmm+select:gathered-sdpa+window:gathered-sdpa"
        return super().decode_kernel(shape, device)

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        """The selection: gather (the tiles) or, on the CPU without autograd, groups (the
        key-block groups, where they run); the window: a band (a block of queries or more)
        or gathered blocks."""
        run = "bmm" if gpu_path(device) else "flash_cpu"
        grouped = self._group_pairs(shape, device, grad) is not None
        window = "band" if shape.nq >= self.sel_block else "gather"
        return (f"nsa:cmp-bmm+select:{'groups' if grouped else 'gather'}-{run}"
                f"+window:{window}-{run}")


@dataclass(frozen=True)
class NsaCache:
    """The KV cache and the compressed keys and values (B, Hkv, capacity, D) of the `count`
    complete compression blocks."""

    kv: KVCache
    kc: torch.Tensor
    vc: torch.Tensor
    count: int


def _work(x: torch.Tensor) -> torch.dtype:
    """Matmul dtype: the input's on the GPU path, float32 for half inputs on the CPU."""
    if gpu_path(x.device) or x.dtype not in (torch.float16, torch.bfloat16):
        return x.dtype
    return torch.float32
