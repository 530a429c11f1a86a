"""Recurrent family: linear RNNs with a matrix state (decay-gated: retnet, gla, mamba2; the
delta rule: deltanet, gated_deltanet), each with a chunked form for prefill and training and a
per-step form for decode, checked against its float64 step-by-step recurrence."""

from attnbench.variants.recurrent import deltanet, gated_deltanet, gla, mamba2, retnet  # noqa: F401
