"""Sparse attention: fixed patterns on one block-sparse engine (local, strided, fixed, BigBird,
Longformer) and learned block selection on one selected-block engine (MoBA, NSA)."""

from attnbench.variants.sparse import (  # noqa: F401
    bigbird,
    fixed,
    local,
    longformer,
    moba,
    nsa,
    strided,
)
