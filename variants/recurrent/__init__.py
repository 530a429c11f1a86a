"""Recurrent family: linear RNNs with a matrix state, each with a chunked and a per-step form."""

from variants.recurrent import gla, mamba2, retnet  # noqa: F401
