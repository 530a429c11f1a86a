"""The `attnbench` command: a Hydra app for sweeps, plus `list`, `plan`, `report`, `compare`.

    attnbench                                  # the default sweep for this machine
    attnbench -m variant=full variant.backend=naive,sdpa seq_len=1024,2048
    attnbench seq_len=4096 variant=local       # one point, printed as a line
    attnbench plan -m variant=full,local seq_len=1024,2048   # what a sweep would do; runs nothing
    attnbench list | report DIR | compare A B
    attnbench --help | --hydra-help | --version
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, RunConfig, conf_dir, fail, from_dictconfig

log = logging.getLogger("attnbench")
CONF_DIR = conf_dir()  # shipped in the package; the repository's conf/ in a checkout

# `attnbench <name> ...` runs `<module>.main(argv) -> int` instead of a sweep.
SUBCOMMANDS = {"list": "harness.listing", "plan": "harness.plan", "report": "harness.report",
               "compare": "harness.compare"}
HELP = """\
usage: attnbench [-m] [KEY=VALUE ...]           one point; with -m a sweep (every combination)
       attnbench list | plan [-m] [KEY=VALUE ...] | report DIR | compare A B
       attnbench --help | --hydra-help | --version

Benchmarks attention variants on this machine: latency, peak memory, FLOP rate, error against
float64 attention, and how each grows with the sequence length n. A sweep ends with a report:
fitted exponents, where each variant overtakes exact attention, tables and plots.

With no argument: the default sweep for this device (every variant with its defaults; n = 512 to
4096 in float32 on a CPU, 1024 to 32768 in bfloat16 on a GPU).

Subcommands (each takes --help):
  list              every variant and full backend: can it run here, or why not
  plan ARGS         what `attnbench ARGS` would do: its points, their predicted peak memory,
                    which would be skipped or unsupported and why, a rough time; runs nothing
  report DIR        rewrite a sweep folder's report (results.csv, summary.md, index.html)
  compare A B       two sweep folders side by side (B/A latency; --fail-on-regression)

Most used keys (KEY=VALUE; with -m a comma list sweeps it):
  variant=local                   attnbench list shows them; full_flash, ... are full's backends
  variant.window=128              a variant's parameter (in a sweep, variants without it ignore it)
  seq_len=1024,2048,4096          n; q, k, v are (batch, heads, seq_len, head_dim)
  batch=2 heads=16 head_dim=128   the rest of the shape (kv_heads=, q_len= for GQA and prefill)
  dtype=bfloat16                  float32 | float16 | bfloat16
  mode=fwd_bwd                    fwd | fwd_bwd | decode
  causal=true
  device=cpu                      auto | cpu | cuda
  max_memory=2GB                  skip points predicted above this (0: half the free RAM)
  +sweep=cpu_quick                a sweep preset (conf/sweep/: cpu_quick, gpu_scaling, ...)
  +shape=llama3_8b                a model's attention heads (conf/shape/)
  variant=custom variant.target=my_pkg.my_module:my_attention   time your own function
  hydra.sweep.dir=DIR             where a sweep writes (resume=true keeps points measured there)

Examples:
  attnbench -m variant=full,local,linear seq_len=1024,2048,4096
  attnbench plan -m variant=full,local seq_len=1024,2048,4096
  attnbench variant=local variant.window=128 seq_len=8192

Results: a sweep writes results/<timestamp>/ (one folder per point with its result.json, then
results.csv, summary.md, index.html, plots/); a single run prints its record as one line and
writes it under results/runs/<timestamp>/.

Every key and its default: `attnbench --cfg job` (the composed config) or conf/config.yaml.
Hydra's own options (--cfg, --info, --multirun, shell completion, launchers):
`attnbench --hydra-help`.
"""


# resume=true keeps these outcomes; the others (skipped, oom, error, invalid) may change on a
# second try (another cap, a free machine, a fixed bug) and are measured again.
KEPT_ON_RESUME = ("ok", "unsupported")


def point_folder_of(run: RunConfig) -> str:
    """The folder of a point inside its sweep folder: readable + its identity (`point_id`)."""
    import variants
    from harness.records import point_folder
    from harness.sweep import point_id

    try:
        label = variants.build(run.variant, **run.params).label
    except Exception:  # a point that fails to build still gets its folder (and an error row)
        label = run.variant
    return point_folder(label, run.seq_len, run.dtype, run.mode, run.causal, point_id(run))


def _point_folder_resolver(*, _root_: DictConfig) -> str:
    return point_folder_of(from_dictconfig(_root_))


# `hydra.sweep.subdir: ${attnbench_point:}` (conf/config.yaml): each job's folder is named by what
# it measures, under any sweeper and launcher (jobs import this module to run `sweep_job`).
OmegaConf.register_new_resolver("attnbench_point", _point_folder_resolver, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def sweep_job(cfg: DictConfig) -> None:
    """One Hydra job = one point: validate, measure, write the record, print one line."""
    from harness import progress
    from harness.records import RECORD_FILE, read_record, write_record
    from harness.sweep import point_id, run_point

    try:
        run = from_dictconfig(cfg)
    except ConfigError as exc:
        fail(str(exc))
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    job_num = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    if run.resume and (out_dir / RECORD_FILE).exists():
        try:
            old = read_record(out_dir / RECORD_FILE)
        except ValueError:
            old = None
        if old is not None and old.point_id == point_id(run) and old.status in KEPT_ON_RESUME:
            print(f"{progress.line(old, job_num)} (kept from an earlier run)", flush=True)
            return
    record = run_point(run)
    write_record(record, out_dir)
    print(progress.line(record, job_num), flush=True)


def precheck(overrides: list[str], multirun: bool = False) -> None:
    """Compose and check a config before Hydra starts: one line per problem. For a multirun,
    the first point of the sweep (each swept key at its first value, variant parameters left
    out): Hydra composes a config before the sweeper runs, and would fail on it with a dump;
    the sweeper checks every point afterwards. For a single run, a variant parameter its variant
    does not have is named."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import check_writable, explain_hydra_error
    from hydra_plugins.attnbench_sweeper import fit_variant_params, is_variant_param

    try:
        with hydra_loader() as loader:
            if multirun:
                first = [o for o in first_point(overrides) if not is_variant_param(o)]
                cfg = loader.load_configuration("config", first, RunMode.MULTIRUN)
            else:
                base = [o for o in overrides if not is_variant_param(o)]
                fit_variant_params(loader.load_configuration("config", base, RunMode.RUN),
                                   loader, [overrides])
                cfg = loader.load_configuration("config", overrides, RunMode.RUN)
        from_dictconfig(cfg)
        if not multirun:  # the sweeper checks the sweep folder
            check_writable(Path(str(cfg.hydra.run.dir)).parent, "hydra.run.dir")
    except (HydraException, OmegaConfBaseException) as exc:
        fail(explain_hydra_error(exc))
    except ConfigError as exc:
        fail(str(exc))


@contextlib.contextmanager
def hydra_loader():
    """Hydra's config loader over attnbench's configs (and every search-path plugin's), as
    Hydra itself builds it: what the sweeper composes points with."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def first_point(overrides: list[str]) -> list[str]:
    """The overrides with every sweep (a,b,c / glob / range) replaced by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()), None)
            except Exception:  # glob() needs the group's options: the sweeper checks it
                continue
            if first is not None:
                out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def default_sweep() -> str:
    import torch

    return "default_gpu" if torch.cuda.is_available() else "default_cpu"


def version() -> str:
    """'attnbench X (torch Y, hydra Z, python W)'."""
    import importlib.metadata
    import platform

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


def sweep_argv(argv: list[str]) -> list[str]:
    """The arguments Hydra gets for a multirun: a variant parameter set to one value becomes a
    one-value sweep (`variant.window=choice(64)`). Hydra composes the sweep's first config from
    the non-swept overrides, and that config's variant may not have the parameter; the sweeper
    applies it to each point whose variant has it."""
    from hydra_plugins.attnbench_sweeper import is_variant_param

    out = []
    for a in argv:
        if is_variant_param(a) and not _is_sweep(a):
            key, value = a.split("=", 1)
            a = f"{key}=choice({value})"
        out.append(a)
    return out


def _is_sweep(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:  # Hydra will say what is wrong with it
        return True


USER_ARGV: list[str] = []


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        raise SystemExit(0)
    if argv and argv[0] == "--version":
        print(version())
        raise SystemExit(0)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        raise SystemExit(module.main(argv[1:]))
    if argv and not is_override(argv[0]):
        fail(unknown_command(argv[0]))
    if not Path(CONF_DIR, "config.yaml").is_file():
        fail(f"attnbench's configs are missing: no config.yaml in {CONF_DIR} (a broken install?)")
    if not argv:
        argv = ["--multirun", f"+sweep={default_sweep()}"]
    global USER_ARGV
    USER_ARGV = list(argv)  # as typed: what an interrupted sweep's resume command repeats
    flags = [a for a in argv if a.startswith("-")]
    if not flags:  # a single run: check before Hydra starts
        precheck(argv)
    elif set(flags) <= {"-m", "--multirun"}:
        argv = sweep_argv(argv)
        precheck([a for a in argv if a not in flags], multirun=True)
    sys.argv = [sys.argv[0], *argv]
    sweep_job()


if __name__ == "__main__":
    main()
