"""Recurrent family: linear recurrences with a matrix state, chunked for prefill."""

from variants.recurrent import deltanet, gated_deltanet  # noqa: F401
