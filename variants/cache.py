"""The KV cache of exact-attention decode: k, v buffers that grow by a step, shared by every
family whose decode attends over the whole context (full, the block-sparse patterns, MoBA, NSA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CACHE_STEP = 256


@dataclass(frozen=True)
class KVCache:
    """k, v buffers (B, Hkv, capacity, D) holding `length` tokens."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        b, h, n, d = k.shape
        kb, vb = (t.new_empty(b, h, n + CACHE_STEP, d) for t in (k, v))
        kb[:, :, :n], vb[:, :, :n] = k, v
        return cls(kb, vb, n)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        kb, vb = self.k, self.v
        if self.length == kb.shape[2]:  # full: grow (copy) by CACHE_STEP
            kb, vb = (torch.cat([t, t.new_empty(*t.shape[:2], CACHE_STEP, t.shape[3])], 2)
                      for t in (kb, vb))
        kb[:, :, self.length : self.length + 1] = k
        vb[:, :, self.length : self.length + 1] = v
        return KVCache(kb, vb, self.length + 1)

    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]
