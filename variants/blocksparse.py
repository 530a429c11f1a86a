"""Block-sparse exact attention engine: computes only the active (query-block, key-block) pairs.

A pattern names which key blocks each query block sees (a block predicate, with a closed-form
count per query block for the models) and, at token level, which keys each query sees (a
predicate, also the FlexAttention ``mask_mod``). Query blocks
with the same number of active key blocks form a group; each group gathers its key/value blocks
into a contiguous (BH, G, L·b, D) tensor and runs one batched matmul, a softmax over the gathered
keys and one batched matmul. Only pairs that the predicate cuts (band edges, causal diagonal,
padding) carry an additive -inf bias, cached per (n, causal). Time and memory are O(active pairs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from variants._flex import flex_attention_compiled, flex_reasons
from variants.base import Shape, Variant

IMPLS = ("blocked", "flex")
CHUNK_BYTES = 16 << 20  # score-tile budget per batched matmul; bounds peak memory at any n
MERGE_ROWS = 256  # at most this many query rows per tile when query blocks share key blocks


@dataclass(frozen=True)
class Layout:
    """Groups of query blocks with equal key-block counts, ready for the engine."""

    n: int
    block: int
    nb: int
    # (query blocks (G,), key blocks (G, L), additive bias (G, b, L·b) float32 or None, merge,
    # band): merge = runs of that many consecutive query blocks see the same key blocks and run
    # as one (merge·b)-row tile; band = consecutive query blocks whose key blocks are one
    # contiguous run shifting with them.
    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool], ...]
    computed: int  # scores computed that lie inside the n×n matrix


LAYOUT_CHUNK = 1 << 22  # elements of one (rows, nb) block-mask slice or bias slice at a time
LAYOUT_TEMP = 32  # bytes per element those slices take while built (int64 temporaries, bools)


def build_layout(block_allowed, allowed, n: int, block: int, causal: bool) -> Layout:
    """Layout from a block predicate ``block_allowed(I, J, nb)`` and a token predicate
    ``allowed(q, k)`` (broadcasting int tensors, causal not applied; None when the pattern is
    whole blocks, so that only the causal diagonal and the padding cut pairs).

    Memory: the groups (O(active pairs), plus a float32 bias over the pairs of groups that need
    one) and slices of at most LAYOUT_CHUNK elements; never an (nb, nb) tensor.
    """
    b = block
    nb = -(-n // b)
    keys = torch.arange(nb)
    found: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    step = max(1, LAYOUT_CHUNK // nb)
    for s in range(0, nb, step):
        rows = torch.arange(s, min(nb, s + step))
        mask = block_allowed(rows[:, None], keys[None, :], nb)  # (rows, nb)
        if causal:
            mask = mask & (keys[None, :] <= rows[:, None])
        counts = mask.sum(1)
        for c in torch.unique(counts).tolist():
            sel = counts == c
            kidx = torch.nonzero(mask[sel])[:, 1].view(-1, c)  # (G, L), sorted
            found.setdefault(c, []).append((rows[sel], kidx))
    inside = (n - torch.arange(nb) * b).clamp(0, b)  # real tokens per block
    groups, computed = [], 0
    for c in sorted(found):
        rows = torch.cat([r for r, _ in found[c]])  # (G,)
        kidx = torch.cat([k for _, k in found[c]])  # (G, L)
        computed += int((inside[rows] * inside[kidx].sum(1)).sum())
        bias = _bias(rows, kidx, allowed, n, b, causal)
        shift = torch.arange(len(rows))
        band = bool(
            (rows == rows[0] + shift).all()
            and (kidx == kidx[0, 0] + shift[:, None] + torch.arange(c)).all()
        )
        groups.append((rows, kidx, bias, _merge(rows, kidx, max(1, MERGE_ROWS // b)), band))
    return Layout(n, b, nb, tuple(groups), computed)


def _bias(rows: torch.Tensor, kidx: torch.Tensor, allowed, n: int, b: int, causal: bool):
    """Additive (G, b, L·b) float32 bias, -inf on the pairs the token predicate, the causal
    diagonal or the padding cut; None when the group has no cut pair. Built in slices."""
    g, c = kidx.shape
    ar = torch.arange(b)
    bias = None
    step = max(1, LAYOUT_CHUNK // (b * c * b))
    for s in range(0, g, step):
        r, ki = rows[s : s + step], kidx[s : s + step]
        qtok = (r[:, None] * b + ar)[:, :, None]  # (g, b, 1)
        ktok = (ki[:, :, None] * b + ar).view(len(r), 1, c * b)  # (g, 1, L·b)
        ok = ktok < n if allowed is None else allowed(qtok, ktok) & (ktok < n)
        if causal:
            ok = ok & (ktok <= qtok)
        ok = ok | (qtok >= n)  # padded query rows see anything: finite, and discarded
        if bool(ok.all()):
            continue
        if bias is None:  # slices before this one had no cut pair: their bias stays 0
            bias = torch.zeros(g, b, c * b)
        bias[s : s + step].masked_fill_(~ok, float("-inf"))
    return bias


def _merge(rows: torch.Tensor, kidx: torch.Tensor, most: int) -> int:
    """Largest R <= most dividing G such that runs of R consecutive query blocks share keys."""
    g, c = kidx.shape
    for r in range(min(most, g), 1, -1):
        if g % r:
            continue
        runs, keys = rows.view(-1, r), kidx.view(-1, r, c)
        if (runs - runs[:, :1] == torch.arange(r)).all() and (keys == keys[:, :1]).all():
            return r
    return 1


def blocksparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout
) -> torch.Tensor:
    """Exact softmax attention over the pairs in `layout`; q, k, v, out: (B, H, N, D)."""
    bsz, h, n, d = q.shape
    b, nb = layout.block, layout.nb
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    pad = nb * b - n

    def blocks(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        t = t.to(work) * scale if scale != 1.0 else t.to(work)
        t = F.pad(t, (0, 0, 0, pad)) if pad else t  # no copy of k, v when b divides n
        return t.reshape(bsz * h, nb, b, d)  # (BH, nb, b, D)

    qb, kb, vb = blocks(q, 1.0 / math.sqrt(d)), blocks(k), blocks(v)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    pieces, order = [], []
    # without grad each piece is written straight to its query blocks (no cat + reorder)
    out = None if grad else qb.new_empty(bsz * h, nb, b, d)

    def put(rows: torch.Tensor, piece: torch.Tensor) -> None:  # piece: (BH, G, b, D)
        if out is None:
            pieces.append(piece)
        else:
            out.index_copy_(1, rows, piece)

    for rows, kidx, bias, merge, band in layout.groups:
        g_all, nkb = kidx.shape
        tile = merge * b  # query rows per tile
        # Without grad and bias, torch's fused sdpa kernel runs the tiles (no score tile kept);
        # then the budget bounds the gathered k, v instead of the scores.
        fused = not grad and bias is None
        per_tile = bsz * h * nkb * b * qb.element_size() * (2 * d if fused else tile)
        step = merge * max(1, CHUNK_BYTES // per_tile)
        for s in range(0, g_all, step):
            r, ki = rows[s : s + step], kidx[s : s + step]
            g = len(r)
            bi = None if bias is None else bias[s : s + step].to(work)
            if band and not grad:
                put(r, _attend_band(qb, kb, vb, int(r[0]), int(ki[0, 0]), g, nkb, bi))
                continue
            t = g // merge  # tiles of `merge` query blocks sharing their key blocks
            ki = ki[::merge].flatten()  # index_select: contiguous block copies (fancy indexing
            qg = qb.index_select(1, r).view(bsz * h, t, tile, d)  # is slow); (BH, t, R·b, D)
            kg = kb.index_select(1, ki).view(bsz * h, t, nkb * b, d)  # (BH, t, L·b, D)
            vg = vb.index_select(1, ki).view(bsz * h, t, nkb * b, d)
            bi = None if bi is None else bi.view(t, tile, nkb * b)
            if fused:  # q is already scaled
                o = F.scaled_dot_product_attention(qg, kg, vg, scale=1.0)
            else:
                o = _attend(qg, kg, vg, bi, grad)
            put(r, o.view(bsz * h, g, b, d))
        order.append(rows)
    if out is None:
        out = torch.cat(pieces, 1)  # (BH, nb, b, D), query blocks in group order
        out = out.index_select(1, torch.argsort(torch.cat(order)))
    out = out.reshape(bsz, h, nb * b, d)[:, :, :n]
    return out.to(q.dtype)


def _attend(qg, kg, vg, bias, grad: bool) -> torch.Tensor:
    scores = qg @ kg.transpose(-1, -2)  # (BH, g, b, L·b)
    if bias is not None:
        scores = scores + bias if grad else scores.add_(bias)
    # torch.softmax is one fused pass per row (max, exp-sum, scale); it beats in-place
    # amax/sub_/exp_/sum plus normalising the output, measured on CPU.
    return torch.softmax(scores, dim=-1) @ vg


def _attend_band(qb, kb, vb, q0: int, k0: int, g: int, nkb: int, bias) -> torch.Tensor:
    """A band of query blocks q0.. over key blocks k0.. without gathering: each query block's
    L·b keys are an overlapping strided view of k, which 3-D bmm takes as is (4-D matmul would
    copy it)."""
    bh, _, b, d = qb.shape
    scores = qb.new_empty(bh, g, b, nkb * b)  # (BH, g, b, L·b)
    out = qb.new_empty(bh, g, b, d)
    kflat, vflat = kb.view(bh, -1, d), vb.view(bh, -1, d)  # (BH, nb·b, D)

    def window(t: torch.Tensor) -> torch.Tensor:  # (g, L·b, D), consecutive rows shift by b
        return t.as_strided((g, nkb * b, d), (b * d, d, 1), t.storage_offset() + k0 * b * d)

    for i in range(bh):  # one 3-D bmm per head; the batch runs over the g query blocks
        torch.bmm(qb[i, q0 : q0 + g], window(kflat[i]).transpose(1, 2), out=scores[i])
    if bias is not None:
        scores.add_(bias)
    p = torch.softmax(scores, dim=-1)
    for i in range(bh):
        torch.bmm(p[i], window(vflat[i]), out=out[i])
    return out


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
    def block_allowed(self, i: torch.Tensor, j: torch.Tensor, nb: int) -> torch.Tensor:
        """Whether query block i sees key block j (broadcasting int tensors; causal not applied),
        for a sequence of nb blocks."""
        raise NotImplementedError

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form in O(nb), never an (nb, nb) tensor: per query block, how many key blocks
        it sees (nb,) int64, and whether the last key block is one of them (nb,) bool."""
        raise NotImplementedError

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        """(nb, nb) bool: key blocks each query block sees (causal applied). O(nb²): for
        FlexAttention's table and tests, never for the models (those use `row_counts`)."""
        out = torch.empty(nb, nb, dtype=torch.bool)
        keys, step = torch.arange(nb), max(1, LAYOUT_CHUNK // max(nb, 1))
        for s in range(0, nb, step):  # in slices: no (nb, nb) int64 temporaries
            rows = torch.arange(s, min(nb, s + step))[:, None]
            m = self.block_allowed(rows, keys[None, :], nb)
            out[s : s + step] = m & (keys <= rows) if causal else m
        return out

    def allowed(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        """Token predicate (broadcasting int tensors q, k), causal not applied. Default: the
        block predicate, i.e. whole blocks."""
        return self.block_allowed(q // self.block, k // self.block, self._nb(n))

    def _table(self, n: int) -> torch.Tensor:
        key = ("table", n)
        if key not in self._cache:
            self._cache[key] = self.block_layout(self._nb(n), False)
        return self._cache[key]

    def _nb(self, n: int) -> int:
        return -(-n // self.block)

    def layout(self, n: int, causal: bool, device: torch.device | str = "cpu") -> Layout:
        """The engine's layout, built on the CPU (then moved) the first time it is needed: after
        the memory cap was checked against `memory_bytes`, which counts it."""
        key = ("layout", n, causal, str(device))
        if key not in self._cache:
            allowed = (lambda q, k: self.allowed(q, k, n)) if self._token_level else None
            lay = build_layout(self.block_allowed, allowed, n, self.block, causal)
            groups = tuple(
                (r.to(device), ki.to(device), None if bi is None else bi.to(device), mg, band)
                for r, ki, bi, mg, band in lay.groups
            )
            self._cache[key] = dataclasses.replace(lay, groups=groups)
        return self._cache[key]

    # -- models: closed form from `row_counts`, O(nb) ------------------------------------------
    def computed(self, n: int, causal: bool = False) -> int:
        """Scores computed inside the n×n matrix: whole active blocks (the causal diagonal and
        band edges included), equal to `layout(n, causal).computed` without building it."""
        b = self.block
        counts, last = self.row_counts(self._nb(n), causal)
        inside = (n - torch.arange(len(counts)) * b).clamp(0, b)  # real tokens per query block
        keys = counts * b - last.long() * (len(counts) * b - n)  # real keys each query block sees
        return int((inside * keys).sum())

    def key_mask(self, rows: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        q, k = rows.cpu(), torch.arange(n)[None, :]
        step = max(1, LAYOUT_CHUNK // max(n, 1))  # slices: int64 temporaries stay small
        parts = []
        for s in range(0, len(q), step):
            qs = q[s : s + step, None]
            mask = self.allowed(qs, k, n)
            parts.append(mask & (k <= qs) if causal else mask)
        out = torch.cat(parts) if parts else torch.zeros(0, n, dtype=torch.bool)
        return out.to(rows.device)

    def density(self, n: int, causal: bool = False) -> float:
        return self.computed(n, causal) / (n * n)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        return 4.0 * shape.bh * shape.head_dim * self.computed(shape.seq_len, causal)

    def memory_bytes(self, shape: Shape, dtype: torch.dtype, causal: bool = False) -> int:
        """Upper estimate of one forward's peak, the first call's layout included (it is built
        then and kept): closed form from `row_counts`, nothing of size nb² or n² allocated."""
        el = torch.empty((), dtype=dtype).element_size()
        bh, n, d, b = shape.bh, shape.seq_len, shape.head_dim, self.block
        nb = self._nb(n)
        padded = bh * nb * b * d * 4
        out = bh * n * d * el
        if self.impl == "flex":  # the (nb, nb) block table, then FlexAttention's own kernel
            return int(nb * nb + LAYOUT_CHUNK * LAYOUT_TEMP + 2 * padded + out)
        counts, last = self.row_counts(nb, causal)
        # Groups are the query blocks with equal counts; a group carries a bias over all its
        # pairs when any of its rows has a cut pair (an upper bound for token-level patterns).
        cut = torch.ones_like(last) if causal or self._token_level else last & (n % b != 0)
        size = torch.bincount(counts)  # query blocks per count
        biased = torch.bincount(counts, weights=cut.double()) > 0
        width = torch.arange(len(size))  # key blocks per row of each group
        indices = int((size * (1 + width)).sum()) * 8  # rows and key blocks, int64
        layout = indices + int((size * width)[biased].sum()) * b * b * 4  # + float32 biases
        # the largest working set of one chunk, over the groups (no-grad paths)
        work, most = 0, max(1, MERGE_ROWS // b)
        present = size > 0
        if (present & ~biased).any():  # fused sdpa: gathered k, v (budgeted), gathered q, out
            c = int(width[present & ~biased].max())
            work = max(CHUNK_BYTES, 2 * bh * c * b * d * 4) + 2 * padded
        if (present & biased).any():  # tile scores and their softmax + gathered k, v
            c = int(width[present & biased].max())
            tile = max(CHUNK_BYTES, bh * most * b * c * b * 4)
            work = max(work, 2 * tile + 2 * tile * d // b)
        building = min(nb * nb, LAYOUT_CHUNK) * LAYOUT_TEMP  # slices while the layout is built
        # padded q, k, v + pieces, cat, reorder + one chunk's working set (or the layout's
        # slices, freed before it) + output + the layout itself
        return int(6 * padded + max(work, building) + out + layout)

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
        n = q.shape[-2]
        if self.impl == "flex":
            return flex_attention_compiled(q, k, v, self._flex_mask(n, causal, q.device))
        return blocksparse_attention(q, k, v, self.layout(n, causal, q.device))

    def kernel(self, shape: Shape, device: torch.device | str, causal: bool, grad: bool) -> str:
        """``flex:compiled``, or ``blocksparse:`` and the engine paths the groups take, joined
        by ``+``: band (strided key windows, no gather), sdpa-gather (gathered key blocks
        through fused sdpa) and matmul-gather (gathered key blocks, explicit scores with the
        -inf bias where the pattern cuts, softmax, matmul). Mirrors blocksparse_attention."""
        if self.impl == "flex":
            return "flex:compiled"
        paths = set()
        for _, _, bias, _, band in self.layout(shape.seq_len, causal).groups:
            if band and not grad:
                paths.add("band")
            elif not grad and bias is None:
                paths.add("sdpa-gather")
            else:
                paths.add("matmul-gather")
        order = ("band", "sdpa-gather", "matmul-gather")
        return "blocksparse:" + "+".join(p for p in order if p in paths)

    def _flex_mask(self, n: int, causal: bool, device: torch.device):
        key = ("flex", n, causal, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            if self._token_level:
                allowed = self.allowed
            else:  # table lookup on the device
                table = self._table(n).to(device)
                blk = self.block

                def allowed(q, k, n):
                    return table[q // blk, k // blk]

            def mask_mod(b, h, q_idx, kv_idx):
                ok = allowed(q_idx, kv_idx, n)
                return ok & (kv_idx <= q_idx) if causal else ok

            self._cache[key] = create_block_mask(mask_mod, None, None, n, n, device=str(device))
        return self._cache[key]

    _token_level: ClassVar[bool] = False  # True when `allowed` is a formula, not the table
