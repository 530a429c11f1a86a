"""The `attnbench` command: a Hydra app for sweeps, plus `pick`, `list`, `plan`, `report`,
`compare`, `capture`.

    attnbench pick seq_len=16384 causal=true max_error=0.01 max_memory=2GB   # the answer
    attnbench                                  # the default sweep for this machine
    attnbench -m variant=full variant.backend=naive,sdpa seq_len=1024,2048
    attnbench seq_len=4096 variant=local       # one point, printed as a line
    attnbench plan -m variant=full,local seq_len=1024,2048   # what a sweep would do; runs nothing
    attnbench list | report DIR | compare A B | capture MODEL TEXT -o OUT
    attnbench --help | --hydra-help | --version
"""

from __future__ import annotations

import difflib
import importlib
import shlex
import sys
from pathlib import Path

from attnbench.harness.run.compose import CONF_DIR, default_sweep, precheck, sweep_argv
from attnbench.harness.run.config import fail

# `attnbench <name> ...` runs `<module>.main(argv) -> int` instead of a sweep.
SUBCOMMANDS = {"pick": "attnbench.harness.ask", "list": "attnbench.harness.listing",
               "plan": "attnbench.harness.run.plan",
               "report": "attnbench.harness.report.build",
               "compare": "attnbench.harness.report.compare",
               "capture": "attnbench.harness.run.capture"}
HELP = """\
usage: attnbench pick [--dry-run] KEY=VALUE ...  which variant to use: measured and answered
       attnbench [-m] [KEY=VALUE ...]           one point; with -m a sweep (every combination)
       attnbench list | plan [-m] [KEY=VALUE ...] | report DIR | compare A B
       attnbench capture MODEL TEXT -o OUT.safetensors
       attnbench --help | --hydra-help | --version

Benchmarks attention variants on this machine: latency, peak memory, FLOP rate, error against
float64 attention, and how each grows with the sequence length n. A sweep ends with a report:
fitted exponents, where each variant overtakes exact attention, tables and plots.

With no argument: the default sweep for this device (every variant with its defaults; n = 512 to
4096 in float32 on a CPU, 1024 to 32768 in bfloat16 on a GPU).

Subcommands (each takes --help):
  pick KEYS         the question asked directly: the fastest variant at one setting within
                    max_error (against softmax) and max_memory, e.g. `attnbench pick
                    seq_len=16384 causal=true max_error=0.01 max_memory=2GB`; it measures the
                    candidates and the exact baseline full[sdpa] into results/pick-<time>/ and
                    prints the pick, the runner-up, the baseline and why others were left out
  list              every variant and full backend: can it run here, or why not
  plan ARGS         what `attnbench ARGS` would do: its points, their predicted peak memory,
                    which would be skipped or unsupported and why, a rough time; runs nothing
  report DIR        rewrite a sweep folder's report (results.csv, summary.md, index.html)
  compare A B       two sweep folders side by side (B/A latency; --fail-on-regression)
  capture MODEL TEXT -o OUT   record a causal LM's q, k, v reading TEXT (for inputs=file:OUT)

Most used keys (KEY=VALUE; with -m a comma list sweeps it):
  variant=local                   attnbench list shows them; full_flash, ... are full's backends
  variant.window=128              a variant's parameter (in a sweep, variants without it ignore it)
  seq_len=1024,2048,4096          n; q, k, v are (batch, heads, seq_len, head_dim)
  batch=2 heads=16 head_dim=128   the rest of the shape (kv_heads=, q_len= for GQA and prefill)
  dtype=bfloat16                  float32 | float16 | bfloat16
  mode=fwd_bwd                    fwd | fwd_bwd | decode
  causal=true
  inputs=realistic                gaussian | peaked | local | sink | heavy | realistic | real |
                                  file:PATH (README, "Inputs": which answers which question)
  device=cpu                      auto | cpu | cuda
  max_memory=2GB                  skip points predicted above this (0: half the free RAM)
  +sweep=cpu_quick                a sweep preset (conf/sweep/: cpu_quick, gpu_scaling, ...)
  +shape=llama3_8b                a model's attention heads (conf/shape/)
  variant=custom variant.target=my_pkg.my_module:my_attention   time your own function
  hydra.sweep.dir=DIR             where a sweep writes (resume=true keeps points measured there)

Examples:
  attnbench pick seq_len=8192 causal=true max_error=1% max_memory=1GB
  attnbench pick mode=decode seq_len=32768 +shape=llama3_8b max_memory=4GB --dry-run
  attnbench -m variant=full,local,linear seq_len=1024,2048,4096
  attnbench plan -m variant=full,local seq_len=1024,2048,4096
  attnbench variant=local variant.window=128 seq_len=8192

Results: a sweep writes results/<timestamp>/ (one folder per point with its result.json, then
results.csv, summary.md, index.html, plots/); a single run prints its record as one line and
writes it under results/runs/<timestamp>/.

Exit status (a sweep or a single run): 0 when every point is ok, oom, skipped or unsupported;
1 when a point ended error or invalid, or the results could not be written (the last line names
the failed points); 2 for bad input (one line naming the field, before any work); 130 on Ctrl-C.
No point ends the sweep: exceptions, sys.exit() and crashes (a segfault) are error rows.

Every key and its default: `attnbench --cfg job` (the composed config) or conf/config.yaml.
Hydra's own options (--cfg, --info, --multirun, shell completion, launchers):
`attnbench --hydra-help`.
"""


# Hydra's flags that each choose what the command does; Hydra takes only one of them.
EXCLUSIVE = {"-m": "--multirun", "--multirun": "--multirun", "-c": "--cfg", "--cfg": "--cfg",
             "-i": "--info", "--info": "--info", "-r": "--run", "--run": "--run",
             "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def version() -> str:
    """'attnbench X (torch Y, hydra Z, python W)'."""
    import importlib.metadata
    import platform

    import hydra
    import torch

    try:
        ours = importlib.metadata.version("attnbench")
    except importlib.metadata.PackageNotFoundError:
        ours = "(not installed)"
    return (f"attnbench {ours} (torch {torch.__version__}, hydra {hydra.__version__}, "
            f"python {platform.python_version()})")


def is_override(arg: str) -> bool:
    """A Hydra override always has `=` or starts with +, ~ or - (flags): a bare word does not."""
    return "=" in arg or arg[:1] in ("+", "~", "-")


def unknown_command(word: str) -> str:
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.5)
    hint = f" did you mean {close[0]}?" if close else ""
    return (f"{word!r}: unknown command;{hint} commands: {', '.join(SUBCOMMANDS)}; overrides "
            f"are KEY=VALUE (attnbench --help)")




def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        raise SystemExit(0)
    if argv and argv[0] == "--version":
        print(version())
        raise SystemExit(0)
    if argv and argv[0] in SUBCOMMANDS:
        try:
            module = importlib.import_module(SUBCOMMANDS[argv[0]])
            code = module.main(argv[1:])
        except KeyboardInterrupt:  # Ctrl-C: files are written whole or not at all
            print(f"attnbench: interrupted; each file written is whole: run `attnbench "
                  f"{shlex.join(argv)}` again", file=sys.stderr, flush=True)
            code = 130
        raise SystemExit(code)
    if argv and not is_override(argv[0]):
        fail(unknown_command(argv[0]))
    if not Path(CONF_DIR, "config.yaml").is_file():
        fail(f"attnbench's configs are missing: no config.yaml in {CONF_DIR} (a broken install?)")
    if not argv:
        argv = ["--multirun", f"+sweep={default_sweep()}"]
    flags = [a for a in argv if a.startswith("-")]
    modes = {EXCLUSIVE[f] for f in flags if f in EXCLUSIVE}
    if len(modes) > 1:
        fail(f"{' and '.join(sorted(modes))} do not go together: --cfg and --info show one "
             f"run's config (drop -m); `attnbench plan -m ...` shows a sweep's points")
    if not flags:  # a single run: check before Hydra starts (a renamed parameter renamed)
        argv = precheck(argv)
    elif set(flags) <= {"-m", "--multirun"}:
        argv = sweep_argv(argv)
        precheck([a for a in argv if a not in flags], multirun=True)
    sys.argv = [sys.argv[0], *argv]
    from attnbench.harness.records import NotWritten
    from attnbench.harness.run.task import sweep_job

    try:
        sweep_job()
    except NotWritten as exc:  # a single run (a sweep says it itself, with the resume command)
        fail(str(exc), code=1)


if __name__ == "__main__":
    main()
