"""MoBA, Mixture of Block Attention (Lu et al. 2025, https://arxiv.org/abs/2502.13189).

Keys in blocks of `block`; each query token scores the blocks not in its future by
q·mean(K_block) and attends, exactly, to the `topk` best, its own block always among them
(causal inside it). Gating is per query token and per query head, as in the paper (k/v heads
are broadcast to their group); the selected blocks run through the engine in
`variants/sparse/select.py`, cost ∝ topk·block per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants import reference as _reference
from attnbench.variants.base import Shape, Variant, gpu_path
from attnbench.variants.cache import CACHE_STEP, KVCache
from attnbench.variants.registry import register
from attnbench.variants.sparse.select import (
    block_means,
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
from attnbench.variants.sparse.select_naive import dense_reference
from attnbench.variants.sparse.select_tiles import SLAB_BYTES


@register
@dataclass
class MoBA(Variant):
    """Top-k block attention with mean-pooled block keys as the router.

    Defaults: the paper's top-3 with blocks 4× smaller (128): its 81.25% sparsity at 8K becomes
    ours at 2K, the low end of the range benchmarked here (its block 512 would select 3 of a 2K
    sequence's 4 blocks); 384 keys per query, 4.7% of an 8K sequence. Exact to its own
    selection (`reference`); an approximation of softmax attention, hence ``exact = False``.

    Args: block (keys per block); topk (blocks per query, its own block included).
    """

    name: ClassVar[str] = "moba"
    family: ClassVar[str] = "sparse"
    # Attention is O(n·topk·block), the router O(n²/block): quadratic, with a 1/block constant
    # (at n <= 16K with the defaults the router is under 12% of the FLOPs: near-linear there).
    time_exponent: ClassVar[float] = 2.0
    memory_exponent: ClassVar[float] = 2.0  # the router's (n, n/block) scores
    exact: ClassVar[bool] = False
    no_noncausal: ClassVar[str] = "a query is routed only to blocks not in its future"
    supports_gqa: ClassVar[bool] = True
    supports_q_len: ClassVar[bool] = True

    block: int = 128
    topk: int = 3

    def __post_init__(self) -> None:
        for f in ("block", "topk"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)}: must be >= 1")

    @property
    def label(self) -> str:
        return f"moba[b={self.block},k={self.topk}]"

    # -- computation ----------------------------------------------------------------------------
    def forward(self, q, k, v, causal: bool = False) -> torch.Tensor:
        if not causal:
            raise ValueError(f"moba is causal only: {self.no_noncausal}")
        b, h, nq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        z = b * hkv
        items = q.reshape(z, h // hkv * nq, 1, d)  # (Z, G·Nq, 1, D): item = (head, query)
        qpos = torch.arange(items.shape[1], device=q.device) % nq + (n - nq)
        kz, vz = k.reshape(z, n, d), v.reshape(z, n, d)
        with torch.no_grad():
            means = block_means(kz, self.block, _gate_dtype(q))  # (Z, nb, D)
            idx = self._route(items[:, :, 0], means, qpos, spans=not gpu_path(q.device))
        parts = own_and_rest(idx, qpos // self.block, self.block, h // hkv, n - nq)
        out = select_attention(items, kz, vz, qpos, parts, _work(q), not gpu_path(q.device))
        return out.view(b, h, nq, d)

    def _route(self, qi: torch.Tensor, means: torch.Tensor, qpos: torch.Tensor,
               spans: bool = False) -> torch.Tensor:
        """(Z, M, D) queries, (Z, C, D) block means → (Z, M, topk − 1) blocks selected besides
        each query's own (-1: empty slot). `spans` (the CPU): a span of items at a time against
        only the blocks up to its latest query's own (the later ones are never selected), its
        scores under SLAB_BYTES."""
        c, last = means.shape[1], not gpu_path(qi.device)
        picks = []
        for s0, s1, cols in self._route_spans(qpos, qi.shape[0], c, spans):
            # q·mean(K_block), on the CPU (Z, cols, span): the items last (its fast layout)
            qs, ms = qi[:, s0:s1].to(means.dtype), means[:, :cols]
            gate = torch.bmm(ms, qs.transpose(-1, -2)) if last else qs @ ms.transpose(-1, -2)
            idx = top_blocks(gate, qpos[s0:s1] // self.block, self.topk - 1, items_last=last)
            picks.append(F.pad(idx, (0, min(c, self.topk - 1) - idx.shape[-1]), value=-1))
        return picks[0] if len(picks) == 1 else torch.cat(picks, 1)

    def _route_spans(self, qpos: torch.Tensor, z: int, c: int,
                     spans: bool) -> list[tuple[int, int, int]]:
        """(first, end, blocks) of each span of items `_route` scores (and `_route_pairs`
        counts): scores under SLAB_BYTES, against the blocks up to the span's latest own (a host
        read of the positions); one span of all c blocks where not `spans`."""
        m = len(qpos)
        span = max(1, SLAB_BYTES // (4 * z * c)) if spans else m
        if span >= m:
            return [(0, m, c)]
        return [(s, min(m, s + span), min(c, int(qpos[s : s + span].max()) // self.block + 1))
                for s in range(0, m, span)]

    # -- decode: a KV cache and the means of the complete blocks -------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
                    ) -> MobaCache:
        """The cache after a context k, v (B, Hkv, n, D); `heads` (main's contract) is not
        needed: the step routes from its own query heads."""
        b, hkv, n, d = k.shape
        full = n // self.block
        means = k.new_zeros(b, hkv, full + CACHE_STEP // self.block + 1, d, dtype=_gate_dtype(k))
        means[:, :, :full] = block_means(k[:, :, : full * self.block].reshape(b * hkv, -1, d),
                                         self.block, means.dtype).view(b, hkv, full, d)
        return MobaCache(KVCache.of(k, v), means, full)

    def decode_step(self, q, k, v, state: MobaCache) -> tuple[torch.Tensor, MobaCache]:
        """The new token (position p = the cache length) is routed by its own query over the
        complete blocks; its own block is always selected. When it completes its block, that
        block's mean is written at slot p // block (beyond the passed state's count: the state
        passed in is unchanged in what it exposes)."""
        kv = state.kv.append(k, v)
        b, h, _, d = q.shape
        hkv, p = k.shape[1], kv.length - 1
        z, full = b * hkv, state.full  # full = p // block blocks lie before the own block
        qi = q.reshape(z, h // hkv, 1, d)
        qpos = torch.full((h // hkv,), p, device=q.device)
        means = state.means[:, :, : full + 1].reshape(z, full + 1, d)  # slot `full`: own block
        idx = self._route(qi[:, :, 0], means, qpos)
        kc, vc = kv.keys().reshape(z, p + 1, d), kv.values().reshape(z, p + 1, d)
        parts = own_and_rest(idx, qpos // self.block, self.block, h // hkv, p)
        out = select_attention(qi, kc, vc, qpos, parts, _work(q), not gpu_path(q.device))
        out = out.view(b, h, 1, d)
        buf, done = state.means, full
        if (p + 1) % self.block == 0:  # the own block is complete: its mean joins the router
            if done == buf.shape[2]:
                buf = torch.cat([buf, buf.new_zeros(b, hkv, CACHE_STEP // self.block + 1, d)], 2)
            last = kv.keys()[:, :, p + 1 - self.block :].reshape(z, self.block, d)
            buf[:, :, done] = block_means(last, self.block, buf.dtype).view(b, hkv, d)
            done += 1
        return out, MobaCache(kv, buf, done)

    # -- definition -----------------------------------------------------------------------------
    def select(self, q: torch.Tensor, k: torch.Tensor,
               pos: torch.Tensor | None = None) -> torch.Tensor:
        """The selection in float64: (B, H, Nq, topk) blocks of each query, its own first (-1:
        empty slot). `pos`: the positions of q's rows (default: the last Nq)."""
        b, h, nq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        if pos is None:
            pos = torch.arange(nq, device=q.device) + (n - nq)
        kz = k.reshape(b * hkv, n, d)
        # float64 block means a k/v head and a span of whole blocks at a time (a tile's bytes)
        span = max(1, _reference.REFERENCE_BYTES // (16 * d * self.block)) * self.block
        means = torch.cat([torch.cat([block_means(kz[i : i + 1, s : s + span], self.block,
                                                  torch.float64) for s in range(0, n, span)], 1)
                           for i in range(b * hkv)])  # (Z, nb, D)
        qi = q.reshape(b * hkv, h // hkv * nq, d)
        qpos = pos.to(q.device).repeat(h // hkv)  # item i of a group is row i mod Nq
        rest = self._route(qi, means, qpos)
        own = (qpos // self.block)[None, :, None].expand(rest.shape[0], -1, 1)
        return torch.cat([own, rest], -1).view(b, h, nq, -1)

    def attended_keys(self, q, k, rows: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """(B, H, R, Nk) bool: the keys of each query row's float64-selected blocks at or
        before its position (what `definition` attends)."""
        n, nq = k.shape[2], q.shape[2]
        pos = rows.to(q.device) + (n - nq)
        sel = self.select(q[:, :, rows].detach(), k.detach(), pos)  # (B, H, R, topk)
        return blocks_to_keys(sel, self.block, n, pos)

    def definition(self, q, k, v, causal: bool = True, dtype=torch.float64,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """Dense softmax in `dtype` under the float64 selection: each query sees the keys of its
        selected blocks at or before its position. `rows`: the query rows to compute (None:
        all), (B, H, R, D); tiled (`select_naive.dense_reference`)."""
        n, nq = k.shape[2], q.shape[2]
        idx = torch.arange(nq, device=q.device) if rows is None else rows.to(q.device)
        q = q[:, :, idx]  # (B, H, R, D)
        pos = idx + (n - nq)
        sel = self.select(q.detach(), k.detach(), pos)  # (B, H, R, S)
        keys = torch.arange(n, device=q.device)
        blocks = keys // self.block
        g = q.shape[1] // k.shape[1]

        def sees(bi: int, j: int, r0: int, r1: int) -> torch.Tensor:
            mine = sel[bi, j * g : (j + 1) * g, r0:r1, :, None]  # (G, r, S, 1)
            return (mine == blocks).any(2) & (keys <= pos[r0:r1, None])  # (G, r, N)

        return dense_reference(q, k, v, sees, dtype)

    def reference(self, q, k, v, causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Its own definition in float64 (selection and attention), on `rows` (None: all)."""
        return self.definition(q, k, v, causal, torch.float64, rows)

    # -- models ---------------------------------------------------------------------------------
    def _sizes(self, shape: Shape) -> tuple[int, int, int, int]:
        z, m = shape.batch * shape.hkv, shape.groups * shape.nq
        nb = -(-shape.seq_len // self.block)
        return z, m, nb, min(self.topk - 1, nb)  # slots besides the own block

    def _rows(self, shape: Shape, device: torch.device | str = "cpu") -> int:
        """Rows the engine computes per k/v head: the own-block part and the other slots (on
        the CPU the expected count of the trimmed tiles, on the GPU the static capacity)."""
        _, m, _, s = self._sizes(shape)
        n = shape.seq_len
        real = None if gpu_path(device) else shape.groups * earlier_pairs(
            torch.arange(n - shape.nq, n), s, self.block)
        rest = part_rows(m, s, n, self.block, trimmed=real) if s else 0
        return own_rows(shape.groups, shape.nq, n, self.block) + rest

    def _group_pairs(self, shape: Shape, device: torch.device | str = "cpu",
                     grad: bool = False) -> int | None:
        """Query–key pairs per k/v head of the CPU's key-block groups (`group_pairs`); None
        where the forward runs the tiles (the GPU path, autograd, fewer queries than a block)."""
        if grad or gpu_path(device):
            return None
        return group_pairs(shape.groups, shape.nq, shape.seq_len, self.block,
                           self._sizes(shape)[3], 1)

    def _pairs(self, shape: Shape, device: torch.device | str = "cpu") -> int:
        """Query–key pairs of the forward per k/v head: without autograd on the CPU the
        groups' (where they run), else the tiles' rows × block keys."""
        pairs = self._group_pairs(shape, device)
        return self._rows(shape, device) * self.block if pairs is None else pairs

    def flops(self, shape: Shape, causal: bool = False,
              device: torch.device | str = "cpu") -> float:
        """The router's q·mean(K) for every block and the engine's query–key pairs (`_pairs`:
        padding included; on the CPU path its expected count, see `part_rows`)."""
        z, d = shape.batch * shape.hkv, shape.head_dim
        return 2.0 * z * d * self._route_pairs(shape, device) + 4.0 * z * d * self._pairs(
            shape, device)

    def _route_pairs(self, shape: Shape, device: torch.device | str = "cpu") -> int:
        """Item–block scores of the router per k/v head: every block for every item (the GPU
        path), or per span of items the blocks up to its latest query's own (`_route`)."""
        z, m, nb, _ = self._sizes(shape)
        qpos = torch.arange(m) % shape.nq + (shape.seq_len - shape.nq)  # the items' positions
        parts = self._route_spans(qpos, z, nb, not gpu_path(device))
        return sum((s1 - s0) * cols for s0, s1, cols in parts)

    def algorithm_flops(self, shape: Shape, causal: bool = True) -> float:
        """The method's work, per query head and query at position p (own block o = p // b):
        the router's q·mean(K) over the o complete earlier blocks (2·D each) and attention
        (4·D per key) over p − o·b + 1 keys of its own block and min(topk − 1, o) earlier
        blocks of b keys; no padding, no router score of the own or later blocks."""
        n, b = shape.seq_len, self.block
        pos = torch.arange(n - shape.nq, n)
        own = pos // b
        keys = pos - own * b + 1 + b * own.clamp(max=self.topk - 1)
        return float(shape.bh * shape.head_dim * int((4 * keys + 2 * own).sum()))

    def backward_flops(self, shape: Shape, causal: bool = False,
                       device: torch.device | str = "cpu") -> float:
        """Flash-style: scores recomputed (2.5× the tiles' forward); the router has none. With
        autograd the forward runs the tiles, not the CPU's groups (`flops`): the difference is
        counted here."""
        z, d = shape.batch * shape.hkv, shape.head_dim
        tiles = 4.0 * z * self._rows(shape, device) * self.block * d
        return 3.5 * tiles - 4.0 * z * d * self._pairs(shape, device)

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        """The KV cache (with its headroom), the router's block means, the float32 cast of the
        context keys those means are taken from (while the cache is built), and one step: the
        router's scores and the selected blocks' tiles. Not the forward's model (26 GB at
        n = 65536 for llama3_8b's heads: the router's n × n/block scores of every query)."""
        el = torch.empty((), dtype=dtype).element_size()
        eg = 8 if dtype == torch.float64 else 4
        b, hkv, n, d = shape.batch, shape.hkv, shape.seq_len, shape.head_dim
        cache = 2 * b * hkv * (n + CACHE_STEP) * d * el
        means = b * hkv * (n // self.block + CACHE_STEP // self.block + 1) * d * eg
        build = 2 * b * hkv * n * d * eg  # k cast, padded, for the block means
        step = shape.bh * ((n // self.block + 1) * eg * 4
                           + 4 * (self.topk + 1) * self.block * (d + 1) * max(el, 4))
        return cache + means + build + step

    def decode_flops(self, shape: Shape) -> float:
        """The router over the complete blocks' means and the own one's slot, then the own
        block and topk − 1 slots of keys gathered per query head (`select.gathers`), every slot
        scored whole."""
        keys = self._decode_keys(shape)
        if keys is None:  # the engine's tiles
            return self.flops(Shape(shape.batch, shape.heads, shape.seq_len + 1,
                                    shape.head_dim, shape.kv_heads, 1), True)
        return 2.0 * shape.bh * shape.head_dim * (shape.seq_len // self.block + 1 + 2 * keys)

    def _decode_keys(self, shape: Shape) -> int | None:
        """A step's slot keys per query head (the own block and topk − 1 slots over the
        complete blocks and the own one's), where the step gathers them (`select.gathers`);
        None where it runs the engine's tiles."""
        full = shape.seq_len // self.block
        keys = self.block * (1 + min(full + 1, self.topk - 1))
        gathered = gathers(shape.batch * shape.hkv, shape.groups, keys, shape.seq_len + 1)
        return keys if gathered else None

    def algorithm_decode_flops(self, shape: Shape) -> float:
        n = shape.seq_len + 1
        return self.algorithm_flops(Shape(shape.batch, shape.heads, n, shape.head_dim,
                                          shape.kv_heads, 1), True)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False,
                     device: torch.device | str = "cpu", grad: bool = False) -> int:
        """The router's means, scores and picks, the engine's working set (the CPU's groups
        without autograd, where they run; else the tiles) and the output; forward and backward
        (`grad`): 3× the tiles' forward."""
        el = torch.empty((), dtype=dtype).element_size()
        z, m, nb, s = self._sizes(shape)
        n, d = shape.seq_len, shape.head_dim
        router = z * (nb * d * 8 + m * nb * 8 + m * s * 16)  # means, scores, top-k
        out = 2 * shape.bh * shape.nq * d * max(el, 4)
        if self._group_pairs(shape, device, grad) is not None:
            return int(router + group_bytes(z, m, 1, s, d) + out)
        engine = part_bytes(z, m, 1, 1, n, self.block, d, True, own=True)
        if s:
            engine += part_bytes(z, m, 1, s, n, self.block, d, False)
        return int(router + engine + out) * (3 if grad else 1)

    def density(self, n: int, causal: bool = False) -> float:
        """The fraction of the n×n scores it computes (≤ 1): each query's own block and the
        topk − 1 earlier blocks it selects (fewer where fewer exist), whole blocks clipped at n.
        The router's scores against block means are no entries of the n×n matrix, and the
        engine's padded tiles are executed work, not scores: both are in `flops`."""
        return block_pairs(n, self.block, lambda j: 1 + min(self.topk - 1, j)) / n**2

    def decode_kernel(self, shape: Shape, device) -> str:
        """select:gathered-sdpa where a step's keys are gathered (`select.gathers`), else the
        one-query forward's path."""
        if self._decode_keys(shape) is not None:
            return "select:gathered-sdpa"
        return super().decode_kernel(shape, device)

    def kernel(self, shape: Shape, device, causal: bool, grad: bool) -> str:
        """gather: the tiles (`select_tiles`); groups: the CPU's key-block groups without
        autograd (`select_groups`), where they run."""
        if gpu_path(device):
            return "select:gather-bmm"
        grouped = self._group_pairs(shape, device, grad) is not None
        return f"select:{'groups' if grouped else 'gather'}-flash_cpu"


@dataclass(frozen=True)
class MobaCache:
    """The KV cache and the router's block means (B, Hkv, capacity, D) of the `full` complete
    blocks."""

    kv: KVCache
    means: torch.Tensor
    full: int


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _work(x: torch.Tensor) -> torch.dtype:
    """Matmul dtype: the input's on the GPU path, float32 for half inputs on the CPU."""
    if gpu_path(x.device) or x.dtype not in (torch.float16, torch.bfloat16):
        return x.dtype
    return torch.float32
