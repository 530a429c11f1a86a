"""Your own attention, timed like any variant, without writing a plugin.

    attnbench variant=custom variant.target=my_pkg.my_module:my_attention seq_len=4096
    attnbench -m variant=custom,full variant.target=my_module:MyAttention variant.exact=true \
        seq_len=1024,2048

`target` names a function `(q, k, v, causal) -> out` or an `nn.Module` class built with no
arguments (called the same way, in eval mode, moved to the inputs' device and dtype), as
`module:attribute` (or `module.attribute`). The module is imported from sys.path, then from the
current directory. q is (B, H, N, D); k and v are (B, Hkv, N, D), with Hkv < H only when you
ask for grouped heads (kv_heads=); out is (B, H, N, D).

It is measured like any variant: latency, peak memory, and the error against float64 softmax
attention on sampled rows. `exact=true` declares that it computes softmax attention exactly, so
that error is a correctness check (rounding level); with `exact=false` (the default) it reads as
how far the target drifts from softmax, as for the approximations. FLOPs, the memory prediction
and the declared exponents are exact attention's as a fused kernel computes it (O(n²), backward
2.5× forward): TFLOP/s is "as if exact attention".
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnbench.variants.base import Shape, Variant, full_flops
from attnbench.variants.registry import old_import_hint, register

DEFAULT_TARGET = "attnbench.variants.custom:softmax_attention"


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool = False) -> torch.Tensor:
    """The default target (and the shape of one): exact attention through torch's SDPA. k and v
    may have fewer heads than q (grouped-query attention)."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


@register
@dataclass
class Custom(Variant):
    """Args: target: `module:function` or `module:Module class`; exact: it computes softmax
    attention exactly (its error is then a correctness check)."""

    name: ClassVar[str] = "custom"
    family: ClassVar[str] = "full"
    supports_gqa: ClassVar[bool] = True  # k, v reach the target with their own (fewer) heads
    no_q_len: ClassVar[str] = "a target is not told where fewer queries sit (causal alignment)"

    target: str = DEFAULT_TARGET
    exact: bool = False  # a parameter here, a class constant elsewhere

    def __post_init__(self) -> None:
        self._loaded = load_target(self.target)  # not a field: not a parameter
        self._modules: dict[tuple, torch.nn.Module] = {}

    @property
    def label(self) -> str:
        return self._label({"target": None if self.target == DEFAULT_TARGET else self.target})

    def forward(self, q, k, v, causal=False):  # (B, H, N, D) in and out
        fn = self._loaded
        if isinstance(fn, type):  # an nn.Module class: one instance per device and dtype
            key = (q.device, q.dtype)
            if key not in self._modules:
                self._modules[key] = fn().to(device=q.device, dtype=q.dtype).eval()
            fn = self._modules[key]
        return fn(q, k, v, causal)

    def flops(self, shape: Shape, causal: bool = False) -> float:
        return full_flops(shape, causal)  # nominal: exact attention's

    def backward_flops(self, shape: Shape, causal: bool = False) -> float:
        return 2.5 * self.flops(shape, causal)  # a fused kernel's: it recomputes the scores


def load_target(target: str) -> Any:
    """The function or nn.Module class `target` names; ValueError (naming `target`) otherwise."""
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    if not module or not attr:
        raise ValueError(f"target={target!r}: expected module:function or module:Class, e.g. "
                         f"my_pkg.my_module:my_attention")
    try:
        mod = _import(module)
    except Exception as exc:
        why = old_import_hint(exc) or f"{type(exc).__name__}: {exc}"
        raise ValueError(f"target={target!r}: cannot import {module} ({why})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"target={target!r}: {module} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) and not issubclass(obj, torch.nn.Module):
        raise ValueError(f"target={target!r}: a class must be an nn.Module subclass")
    if not callable(obj):
        raise ValueError(f"target={target!r}: not a function (q, k, v, causal) -> out")
    return obj


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = module.split(".")[0]
        if exc.name != top or cwd in sys.path:
            raise
        sys.path.append(cwd)  # `attnbench` (a console script) does not look in the cwd itself
        return importlib.import_module(module)
