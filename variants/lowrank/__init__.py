"""Low-rank attention: keys and values projected to k rows (Linformer) or softmax approximated
through landmarks (Nyström)."""

from attnbench.variants.lowrank import linformer, nystrom  # noqa: F401
