"""attnbench's harness: the CLI (cli.py), one point measured into a record (run/), records turned
into the answer (report/), and the record and sweep-folder files both share (records.py)."""

if __name__ != "attnbench.harness":  # a checkout's folder imported under its old name
    raise ImportError(f"attnbench's harness imports as 'attnbench.harness', not {__name__!r}",
                      name=__name__)

from omegaconf import OmegaConf


def _tokens_batch(tokens: int, seq_len: int) -> int:
    """`batch: ${tokens_batch:16384,${seq_len}}`: hold B·n at `tokens` (at least one sequence)."""
    return max(1, int(tokens) // int(seq_len))


# Registered here, not in cli.py: every process that composes or runs a config (the CLI, Hydra's
# launcher jobs, tests composing conf/) imports `attnbench.harness` first.
OmegaConf.register_new_resolver("tokens_batch", _tokens_batch, replace=True)
