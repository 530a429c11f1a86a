"""Attention variants: the contract every family and plugin shares, and the registry.

    from attnbench import variants
    att = variants.build("full", backend="sdpa")
    out = att(q, k, v, causal=True)          # q, k, v, out: (B, H, N, D)

One folder per family (full, sparse, linear, lowrank, recurrent), its engine beside its variants;
what families share lives at this level (base, registry, cache, flex, reference, testing). The
built-in families are imported explicitly below and register themselves as a plugin would.
"""

from __future__ import annotations

if __name__ != "attnbench.variants":  # a checkout's folder imported under its old name
    raise ImportError(
        f"attnbench's variants import as 'attnbench.variants', not {__name__!r}: write "
        "`from attnbench import register, Variant, build`", name=__name__)

from attnbench.variants.base import Family, Shape, Variant
from attnbench.variants.registry import (
    ENTRY_POINT_GROUP,
    build,
    get,
    load_plugins,
    names,
    register,
    renamed_params,
)

__all__ = ["ENTRY_POINT_GROUP", "Family", "Shape", "Variant", "build", "get", "load_plugins",
           "names", "register", "renamed_params"]

# Built-in variants register themselves on import.
from attnbench.variants import custom, full, linear, lowrank, recurrent, sparse  # noqa: F401
