"""The shared base of the block-sparse patterns (local, strided, fixed, bigbird, longformer):
the pattern's contract, its layouts for the two paths of the engine (`engine_cpu`,
`engine_gpu`), FlexAttention's mask, the closed-form models and decode over a KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.base import Shape, Variant, gpu_path
from attnbench.variants.cache import KVCache
from attnbench.variants.flex import flex_attention_compiled, flex_reasons
from attnbench.variants.sparse.engine import (
    LAYOUT_CHUNK,
    LAYOUT_TEMP,
    _block_rows,
    decode_attention,
    flex_block_mask,
)
from attnbench.variants.sparse.engine_cpu import (
    Layout,
    blocksparse_attention,
    build_layout,
    cpu_path_bytes,
    cpu_path_kernel,
)
from attnbench.variants.sparse.engine_gpu import (
    GpuLayout,
    build_gpu_layout,
    gpu_blocksparse_attention,
    gpu_pairs,
    gpu_path_bytes,
)

IMPLS = ("blocked", "flex")


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

    def causal_span(self) -> int:
        """Query blocks (an aligned run) that share their key blocks in the CPU engine's causal
        layout, the causal cut at token level (the bias): 1, each block to its own diagonal. A
        pattern of many small blocks whose runs see the same keys sets it wider: one tile and
        one gather per run, not per block, for the masked upper part of its diagonal run."""
        return 1

    def engine_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`row_counts` as the CPU engine's layout has them (causal: up to the end of each
        block's `causal_span` run); the models of what runs use these, the method's own pairs
        `row_counts`."""
        if causal and self.causal_span() > 1:
            raise NotImplementedError(f"{self.name}: causal_span > 1 needs engine_counts")
        return self.row_counts(nb, causal)

    def block_layout(self, nb: int, causal: bool, span: int = 1) -> torch.Tensor:
        """(nb, nb) bool: key blocks each query block sees (causal applied; to the end of its
        aligned run of `span` blocks: what the CPU engine computes, `causal_span`). O(nb²): for
        FlexAttention's table and tests, never for the models (those use `row_counts`)."""
        out = torch.empty(nb, nb, dtype=torch.bool)
        step = max(1, LAYOUT_CHUNK // max(nb, 1))
        for s in range(0, nb, step):  # in slices: no (nb, nb) int64 temporaries
            out[s : s + step] = _block_rows(self.block_allowed, torch.arange(s, min(nb, s + step)),
                                            nb, causal, span)
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
                               self.block, causal, q0, self.causal_span())
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
        """Scores inside the n×n matrix of the pattern's active blocks (the causal diagonal and
        band edges included, padding not), the density's numerator; equal to `layout(n,
        causal).computed` without building it, but for a causal span over 1, where the engine
        also computes the masked rest of a run's diagonal blocks (`engine_counts`)."""
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
        if gpu_path(device):
            return gpu_pairs(self.row_counts(nb, causal)[0][q0:])
        return int(self.engine_counts(nb, causal)[0][q0:].sum())

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

    def row_keys(self, pos: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        """Keys each query at positions `pos` (int64, 0..n−1) sees inside the n×n matrix
        (causal: only j <= pos), as int64: the method's pairs, without the padding or the
        masked part of blocks the engine computes. Block-level patterns: the real keys of the
        query block's key blocks (`row_counts`, O(nb)) less, causal, the keys after the query
        in its own block; token-level patterns override it with their closed form."""
        b, nb = self.block, self._nb(n)
        counts, last = self.row_counts(nb, causal)
        blk = pos // b
        keys = (counts * b - last.long() * (nb * b - n))[blk]
        if causal:  # the own block is cut at the query: its later real keys are not seen
            diag = self.block_allowed(blk, blk, nb, causal).long()
            inside = (n - blk * b).clamp(max=b)
            keys = keys - diag * (inside - (pos - blk * b) - 1)
        return keys

    def algorithm_flops(self, shape: Shape, causal: bool = False) -> float:
        """QKᵀ and PV over the pattern's allowed pairs only, 4·B·H·D·pairs (causal: j <= i),
        for the last Nq queries: no padding of partial blocks, no masked half of diagonal
        blocks, no band edges (`flops` counts every computed block pair in full)."""
        n = shape.seq_len
        pairs = int(self.row_keys(torch.arange(n - shape.nq, n), n, causal).sum())
        return 4.0 * shape.bh * shape.head_dim * pairs

    def algorithm_decode_flops(self, shape: Shape) -> float:
        """q·K and p·V over the new token's allowed keys (`decode_flops` counts the cache)."""
        n = shape.seq_len + 1
        keys = int(self.row_keys(torch.tensor([n - 1]), n, True).sum())
        return 4.0 * shape.bh * keys * shape.head_dim

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
        counts, last = (self.row_counts if gpu_path(device) else self.engine_counts)(nb, causal)
        counts, last = counts[q0:], last[q0:]
        building = min(nb * nb, LAYOUT_CHUNK) * LAYOUT_TEMP  # slices while the layout is built
        if gpu_path(device):
            work, layout = gpu_path_bytes(shape, counts, b, el)
        else:
            # Groups are the query blocks with equal counts; a group carries a bias over all its
            # pairs when any of its rows has a cut pair (an upper bound for token-level patterns).
            cut = torch.ones_like(last) if causal or self._token_level else last & (n % b != 0)
            work, layout = cpu_path_bytes(shape, counts, cut, b, padded_q)
            # the fused path: a copy of q only when padded or cast; of k, v only when padded or
            # cast; the output written in place (cast once when not float32)
            padded = nb * b != n or (n - shape.nq) % b != 0
            cast = el != 4
            copies = padded_q * (padded or cast)
            copies += 2 * padded_kv * (n % b != 0 or cast)
            return int(copies + padded_q + max(work, building) + out * cast + layout)
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
        ``+``: band (no grad: strided windows of the keys through torch's fused CPU flash
        kernel, the -inf bias as its mask), sdpa-gather (no grad: gathered key blocks through
        the same kernel) and matmul-gather (under autograd: gathered key blocks, explicit scores
        with the -inf bias where the pattern cuts, softmax, matmul). Mirrors the engine."""
        if self.impl == "flex":
            return "flex:compiled"
        if gpu_path(device):
            return "blocksparse:bucket-gather"
        q0 = (shape.seq_len - shape.nq) // self.block
        return cpu_path_kernel(self.layout(shape.seq_len, causal, "cpu", q0), grad)

    def _flex_mask(self, nq: int, n: int, causal: bool, device: torch.device):
        key = ("flex", nq, n, causal, str(device))
        if key not in self._cache:
            if self._token_level:
                def allowed(q, k):
                    return self.allowed(q, k, n, causal)
            else:  # table lookup on the device
                table = self._table(n, causal).to(device)
                blk = self.block

                def allowed(q, k):
                    return table[q // blk, k // blk]

            self._cache[key] = flex_block_mask(allowed, nq, n, causal, device)
        return self._cache[key]

    _token_level: ClassVar[bool] = False  # True when `allowed` is a formula, not the table

    # -- decode: the new row of the pattern over a KV cache ---------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> KVCache:
        """The whole KV cache (patterns with strided, summary, random or global columns reach
        back to any earlier key), with room to grow as `attnbench.variants.cache.KVCache`."""
        return KVCache.of(k, v)

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVCache
    ) -> tuple[torch.Tensor, KVCache]:
        """The token at position p = state.length: its k, v written in the slot past the
        context (the state passed in keeps its length), then attention over the keys of the
        pattern's causal row p, gathered from the cache (their positions found on the host,
        one copy of them to the device): a step reads what the pattern allows, not the cache."""
        state = state.append(k, v)
        p = state.length - 1
        keys = self._row_keys(p).to(q.device)
        kc, vc = (x.index_select(2, keys) for x in (state.keys(), state.values()))
        return decode_attention(q, kc, vc, None), state

    def _row_keys(self, p: int) -> torch.Tensor:
        """The positions causal row p sees (int64, on the host): from its row of the block
        table, O(n/b), for whole-block patterns; from the token predicate, O(n), otherwise."""
        if self._token_level:
            return self.key_mask(torch.tensor([p]), p + 1, True)[0].nonzero()[:, 0]
        b = self.block
        row = _block_rows(self.block_allowed, torch.tensor([p // b]), self._nb(p + 1), True)[0]
        keys = (row.nonzero() * b + torch.arange(b)).flatten()  # the blocks' keys, ascending
        return keys[keys <= p]

    def decode_kernel(self, shape: Shape, device) -> str:
        """The row's allowed keys gathered from the cache, then one query's attention."""
        return "blocksparse:row-gather"

    def decode_flops(self, shape: Shape) -> float:
        """q·K and p·V over the row's allowed keys, gathered: the method's own."""
        return self.algorithm_decode_flops(shape)
