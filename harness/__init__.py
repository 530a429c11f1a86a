"""attnbench harness: config schema, sweep job, timing, memory, records, report, CLI."""

from omegaconf import OmegaConf


def _tokens_batch(tokens: int, seq_len: int) -> int:
    """`batch: ${tokens_batch:16384,${seq_len}}`: hold B·n at `tokens` (at least one sequence)."""
    return max(1, int(tokens) // int(seq_len))


# Registered here, not in cli.py: every process that composes or runs a config (the CLI, Hydra's
# launcher jobs, tests composing conf/) imports `harness` first.
OmegaConf.register_new_resolver("tokens_batch", _tokens_batch, replace=True)
