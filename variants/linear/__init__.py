"""Linear attention: φ(Q)φ(K)ᵀV with elu+1 features (linear) or FAVOR+ random features
(performer), on one chunked prefix-sum engine (prefix.py)."""

from attnbench.variants.linear import linear, performer  # noqa: F401
