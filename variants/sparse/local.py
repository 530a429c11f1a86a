"""Sliding-window (local) attention, exact over the band |i − j| ≤ window (Beltagy et al. 2020,
https://arxiv.org/abs/2004.05150; lucidrains/local-attention): O(n·w) time and memory; with
`sinks`, the first s tokens stay visible to every query (StreamingLLM, Xiao et al. 2023,
https://arxiv.org/abs/2309.17453; gpt-oss alternates 128-token windows with sinks).

``impl=blocked``: queries in blocks of `block` attend to the 2·⌈w/b⌉+1 neighbouring key blocks
and the ⌈s/b⌉ sink blocks (the block-sparse engine in `variants/sparse/engine.py`); only the band
edges and the sink block's tail are masked. ``impl=flex``: FlexAttention with the same mask.
Decode keeps the sinks and a ring buffer of the last window + 1 keys: constant state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnbench.variants.base import Shape
from attnbench.variants.registry import register
from attnbench.variants.sparse.bands import _band_keys
from attnbench.variants.sparse.engine import decode_attention
from attnbench.variants.sparse.pattern import BlockSparse


@register
@dataclass
class Local(BlockSparse):
    """Query i sees keys j with |i − j| ≤ window (causal: 0 ≤ i − j ≤ window), and j < sinks.

    Args: window (tokens each side); block (query/key block size of the blocked impl);
    impl (blocked | flex); sinks (leading tokens every query sees, 0: none).
    """

    name: ClassVar[str] = "local"
    family: ClassVar[str] = "local"
    _token_level: ClassVar[bool] = True
    decode_time_exponent: ClassVar[float] = 0.0  # a ring of window + 1 slots and the sinks
    decode_memory_exponent: ClassVar[float] = 0.0

    window: int = 256
    block: int = 128
    impl: str = "blocked"
    sinks: int = 0

    def _check_params(self) -> None:
        for f in ("window", "sinks"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}={getattr(self, f)}: must be >= 0")

    @property
    def label(self) -> str:
        return self._label({
            "window": f"w={self.window}",
            "sinks": f"s={self.sinks}" if self.sinks else None,
            "block": f"b={self.block}" if self.block != 128 else None,
            "impl": self.impl if self.impl != "blocked" else None,
        })

    def _reach(self) -> int:
        return -(-self.window // self.block)  # key blocks each side that the band reaches

    def _sink_blocks(self, nb: int) -> int:
        return min(-(-self.sinks // self.block), nb)

    def block_allowed(self, i, j, nb: int, causal: bool = False) -> torch.Tensor:
        return ((i - j).abs() <= self._reach()) | (j < self._sink_blocks(nb))

    def row_counts(self, nb: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i, m, gs = torch.arange(nb), self._reach(), self._sink_blocks(nb)
        lo, hi = (i - m).clamp(min=0), i if causal else (i + m).clamp(max=nb - 1)
        # the band, the sink blocks below it and (not causal) those above it
        counts = hi - lo + 1 + lo.clamp(max=gs) + (0 if causal else (gs - 1 - hi).clamp(min=0))
        return counts, (hi == nb - 1) | (gs == nb and not causal)

    def allowed(self, q, k, n: int, causal: bool = False) -> torch.Tensor:
        return ((q - k).abs() <= self.window) | (k < self.sinks)

    def row_keys(self, pos: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        return _band_keys(pos, n, self.window, self.sinks, causal)

    # -- decode: the sinks and a ring buffer of the window --------------------------------------
    def decode_init(
        self, k: torch.Tensor, v: torch.Tensor, heads: int | None = None
    ) -> RingCache:
        """Sinks (B, Hkv, s, D) and a ring of window + 1 slots: key j in slot j mod (w + 1)."""
        return RingCache.of(k, v, self.window, self.sinks)

    def decode_kernel(self, shape: Shape, device) -> str:
        """A step attends over the ring's window slots and the sinks (no gather)."""
        return "local:ring"

    def decode_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RingCache
    ) -> tuple[torch.Tensor, RingCache]:
        """Write the token at p = state.length into slot p mod (w + 1) (the key it replaces,
        p − w − 1, is outside every later window: a repeated step with the same state reads
        the same keys) and attend over the sinks and the ring slots inside [p − w, p]."""
        state = state.append(k, v)
        kc, vc, ok = state.visible()
        return decode_attention(q, kc, vc, ok), state

    def decode_memory_bytes(self, shape: Shape, dtype: torch.dtype,
                            device: torch.device | str = "cpu") -> int:
        """The ring of window + 1 slots and the sinks (k and v), a gather of the context's last
        slots while it is filled, and one step's scores over them. Not the forward's model."""
        el = torch.empty((), dtype=dtype).element_size()
        slots = min(self.window + 1, shape.seq_len) + self.sinks
        b, hkv, d = shape.batch, shape.hkv, shape.head_dim
        cache = 2 * b * hkv * (self.window + 1 + self.sinks) * d * el
        gather = 2 * b * hkv * slots * d * el
        step = shape.bh * (3 * slots * 4 + 2 * d * max(el, 4))  # scores, probs, mask; out
        return cache + gather + step

    def decode_flops(self, shape: Shape) -> float:
        keys = min(self.window + 1, shape.seq_len + 1) + min(self.sinks, shape.seq_len + 1)
        return 4.0 * shape.bh * keys * shape.head_dim


@dataclass(frozen=True)
class RingCache:
    """Sink k, v (B, Hkv, s, D), ring k, v (B, Hkv, w + 1, D) and the tokens seen so far."""

    sink_k: torch.Tensor
    sink_v: torch.Tensor
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    length: int
    window: int
    sinks: int

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> RingCache:
        b, h, n, d = k.shape
        slots = window + 1
        ring = [t.new_zeros(b, h, slots, d) for t in (k, v)]
        keep = torch.arange(max(0, n - slots), n)  # the last w + 1 positions
        for buf, t in zip(ring, (k, v), strict=True):
            buf[:, :, keep % slots] = t[:, :, keep]
        sink = [t.new_zeros(b, h, sinks, d) for t in (k, v)]
        s = min(sinks, n)
        for buf, t in zip(sink, (k, v), strict=True):
            buf[:, :, :s] = t[:, :, :s]
        return cls(sink[0], sink[1], ring[0], ring[1], n, window, sinks)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> RingCache:
        p, slot = self.length, self.length % (self.window + 1)
        self.ring_k[:, :, slot : slot + 1] = k
        self.ring_v[:, :, slot : slot + 1] = v
        sk, sv = self.sink_k, self.sink_v
        if p < self.sinks:  # a sink still being filled: a new buffer, the given state unchanged
            sk, sv = sk.clone(), sv.clone()
            sk[:, :, p : p + 1], sv[:, :, p : p + 1] = k, v
        return RingCache(sk, sv, self.ring_k, self.ring_v, p + 1, self.window, self.sinks)

    def visible(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values of the newest token's row (sinks, then ring slots) and which count:
        a sink j < min(s, p + 1); a ring slot holding position j with j >= s and j >= 0."""
        p, slots = self.length - 1, self.window + 1
        dev = self.ring_k.device
        pos = p - (p - torch.arange(slots, device=dev)) % slots  # position each slot holds
        ok = torch.cat([torch.arange(self.sinks, device=dev) <= p,
                        (pos >= 0) & (pos >= self.sinks)])
        return (torch.cat([self.sink_k, self.ring_k], 2), torch.cat([self.sink_v, self.ring_v], 2),
                ok)
