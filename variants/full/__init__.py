"""Exact softmax attention: one variant with four backends (naive, sdpa, xformers, flex)."""

from attnbench.variants.full import full  # noqa: F401
