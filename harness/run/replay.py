"""Recorded attention inputs, replayed: a capture's layout, which of its heads feed a point
(`plan_slots`), and a point's q, k, v (`replay`).

A capture (written by `attnbench capture`, harness/run/capture.py) is a safetensors file holding,
for each recorded layer L, `layers.L.q` (1, H, N, D) and `layers.L.k`, `layers.L.v`
(1, Hkv, N, D): post-RoPE, as the model's attention function received them. Its metadata (all
strings) says what it is: `format`, `model`, `layers`, `heads`, `kv_heads`, `head_dim`,
`positions`, `scaling` (the model's softmax scale), the text's name, sha256 and length.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from attnbench.variants.base import Shape

FORMAT = "attnbench-capture/1"


@dataclass(frozen=True)
class Layout:
    """What a capture holds: its layers, head layout and positions; `scaling` is the model's
    softmax scale (replay multiplies q by scaling·√D, so softmax(q·kᵀ/√D) is the model's)."""

    layers: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    positions: int
    scaling: float
    source: str  # how messages name it

    @property
    def groups(self) -> int:
        """Query heads per k/v head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Slot:
    """One k/v head of a point: a captured layer's k/v head and `groups` of its query heads."""

    layer: int
    kv_head: int
    q_heads: tuple[int, ...]


def parse_int_list(value: str) -> tuple[int, ...]:
    """'3', '0-5', '2+9+17' (or a mix, '0-3+8') → the integers in that order, without repeats;
    ValueError naming the value otherwise."""
    out: list[int] = []
    for item in value.split("+"):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"{value} is not a list of integers (expected 3, 0-5 or 2+9+17)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out += [i for i in range(lo, hi + 1) if i not in out]
    return tuple(out)


def int_list_text(values: tuple[int, ...]) -> str:
    """The short form parse_int_list reads back: (0, 1, 2, 5, 8, 9) → '0-2+5+8-9'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def tensor_name(layer: int, which: str) -> str:
    return f"layers.{layer}.{which}"


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata, from its header alone (no tensor is read)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    try:
        with p.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 2**27:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a safetensors file ({exc})") from None
    return dict(header.get("__metadata__") or {})


def read_layout(path: str | Path) -> Layout:
    """The layout of a capture file; ValueError (one line) when it is not one."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attnbench capture (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r}; write one with "
                         f"`attnbench capture`)")
    try:
        return Layout(
            layers=tuple(int(x) for x in meta["layers"].split(",")),
            heads=int(meta["heads"]), kv_heads=int(meta["kv_heads"]),
            head_dim=int(meta["head_dim"]), positions=int(meta["positions"]),
            scaling=float(meta["scaling"]), source=str(path))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: damaged capture metadata ({type(exc).__name__}: {exc})") \
            from None


def plan_slots(layout: Layout, shape: Shape, positions: int,
               layers: tuple[int, ...] | None = None,
               heads: tuple[int, ...] | None = None) -> list[Slot]:
    """The B·Hkv slots of a point, batch-major (slot b·Hkv + j is k/v head j of batch b).

    The pool: for each selected layer (in order) and each captured k/v head, its selected
    query heads in groups of H/Hkv (a point with fewer query heads per k/v head than the model
    splits a group: each part gets the k/v head, as the model computed it). The point takes
    slots evenly spread over the pool, or the pool tiled (slot i is pool slot i mod P) when it
    needs more than the pool holds. ValueError (one line) when the point cannot be fed."""
    src = layout.source
    if shape.head_dim != layout.head_dim:
        raise ValueError(f"head_dim={shape.head_dim}, but {src} has head_dim "
                         f"{layout.head_dim} (set head_dim={layout.head_dim})")
    if positions > layout.positions:
        raise ValueError(f"seq_len={shape.seq_len} needs {positions} positions; {src} has "
                         f"{layout.positions}")
    layers = layout.layers if layers is None else layers
    for layer in layers:
        if layer not in layout.layers:
            raise ValueError(f"layer {layer} is not in {src} (layers: "
                             f"{_span(layout.layers)})")
    heads = tuple(range(layout.heads)) if heads is None else heads
    for h in heads:
        if not 0 <= h < layout.heads:
            raise ValueError(f"query head {h} is not in {src} (query heads 0-"
                             f"{layout.heads - 1})")
    per_kv = [[h for h in heads if h // layout.groups == j] for j in range(layout.kv_heads)]
    g = shape.groups
    pool = [Slot(layer, j, tuple(mine[c * g:(c + 1) * g]))
            for layer in layers for j, mine in enumerate(per_kv) for c in range(len(mine) // g)]
    if not pool:
        most = max(len(mine) for mine in per_kv)
        raise ValueError(f"heads={shape.heads} with kv_heads={shape.hkv} puts {g} query heads "
                         f"on each k/v head, but {src} has at most {most} selected query heads "
                         f"per k/v head ({layout.heads} query, {layout.kv_heads} k/v heads): "
                         f"use kv_heads >= heads/{most}")
    need = shape.batch * shape.hkv
    size = len(pool)
    picks = [i * size // need for i in range(need)] if need <= size else \
        [i % size for i in range(need)]
    return [pool[i] for i in picks]


def _span(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


def replay(path: str | Path, shape: Shape, layers: tuple[int, ...] | None = None,
           heads: tuple[int, ...] | None = None):
    """q (B, H, Nq, D), k, v (B, Hkv, N, D) in float32 on the CPU: the capture's first N
    positions (the queries: the last Nq of them) in the slots of `plan_slots`."""
    layout = read_layout(path)
    slots = plan_slots(layout, shape, shape.seq_len, layers, heads)
    try:
        from safetensors import safe_open
    except ImportError:
        raise ValueError("reading a capture needs the safetensors package (the `real` extra: "
                         "pip install 'attnbench[real]')") from None
    b, h, hkv, n, d = shape.batch, shape.heads, shape.hkv, shape.seq_len, shape.head_dim
    loaded: dict[int, tuple[torch.Tensor, ...]] = {}
    with safe_open(str(Path(path).expanduser()), framework="pt") as f:
        for layer in sorted({s.layer for s in slots}):
            loaded[layer] = tuple(f.get_slice(tensor_name(layer, x))[:, :, :n].float()[0]
                                  for x in "qkv")  # (H|Hkv, N, D)
    q = torch.stack([loaded[s.layer][0][list(s.q_heads)] for s in slots])  # (B·Hkv, H/Hkv, N, D)
    k = torch.stack([loaded[s.layer][1][s.kv_head] for s in slots])  # (B·Hkv, N, D)
    v = torch.stack([loaded[s.layer][2][s.kv_head] for s in slots])
    q = q.reshape(b, h, n, d)  # query heads j·g .. j·g+g-1 of batch b: slot b·Hkv + j
    k, v = k.reshape(b, hkv, n, d), v.reshape(b, hkv, n, d)
    scale = layout.scaling * math.sqrt(d)
    if abs(scale - 1.0) > 1e-6:  # a model whose softmax scale is not 1/√D
        q = q * scale
    return q[:, :, n - shape.nq:], k, v
