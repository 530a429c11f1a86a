"""The typed run configuration: YAML (conf/config.yaml) → this schema → plain arguments.

Only the sweep entry point touches Hydra objects; it converts the composed DictConfig with
`from_dictconfig`, which checks every field and raises `ConfigError` naming the field, the value
and what is allowed, before any work is done.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin, get_type_hints

import torch

from attnbench.harness.records import make_writable_folder

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEVICES = ("auto", "cpu", "cuda")
MODES = ("fwd", "fwd_bwd", "decode")
Mode = Literal["fwd", "fwd_bwd", "decode"]


class ConfigError(ValueError):
    """A bad configuration value: the message names the field, the value and what is allowed."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Bad input: one line on stderr naming the field, no traceback, non-zero exit."""
    print(f"attnbench: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@dataclass(frozen=True)
class TimingConfig:
    """Timing knobs (see harness.timing.measure_latency)."""

    warmup: int = 2
    min_reps: int = 5
    min_time_s: float = 0.2
    max_reps: int = 200
    max_time_s: float = 10.0
    flush_l2: bool = True
    cuda_graph: bool = False


@dataclass(frozen=True)
class ErrorConfig:
    """Quality on `rows` sampled query rows against float64 references (full softmax attention
    and the variant's own definition); 0 turns it off."""

    rows: int = 128


@dataclass(frozen=True)
class RunConfig:
    variant: str
    params: dict[str, Any]
    batch: int = 1
    heads: int = 8
    seq_len: int = 1024
    head_dim: int = 64
    kv_heads: int = 0  # heads of k and v (0: heads); must divide heads; 1 is multi-query
    q_len: int = 0  # query positions (0: seq_len); the last q_len of seq_len when causal
    model: str = ""  # the model-shape preset that set heads, kv_heads, head_dim ("" none;
    # `name[heads=8]` where an override changed its shape: `model_name`)
    dtype: str = "float32"
    device: str = "auto"
    causal: bool = False
    mode: Mode = "fwd"
    seed: int = 0
    inputs: str = "gaussian"
    threads: int = 0
    max_memory: int = 0
    resume: bool = False
    isolate: str | bool = "auto"  # auto (a process per point on CUDA) | true | false
    timing: TimingConfig = field(default_factory=TimingConfig)
    error: ErrorConfig = field(default_factory=ErrorConfig)

    @property
    def shape(self):
        from attnbench.variants.base import Shape

        return Shape(self.batch, self.heads, self.seq_len, self.head_dim, self.kv_heads,
                     self.q_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(resolve_device(self.device))


# Upper bounds of the timing knobs: a point must end (1e308 seconds or 10^12 repeats would not).
TIMING_LIMITS = {"warmup": 1000, "min_reps": 100_000, "max_reps": 100_000,
                 "min_time_s": 3600.0, "max_time_s": 3600.0}
_HINTS = {cls: get_type_hints(cls) for cls in (RunConfig, TimingConfig, ErrorConfig)}


def resolve_device(device: str) -> str:
    """auto → cuda when a GPU is present, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def parse_bytes(value: Any, name: str = "max_memory") -> int:
    """Bytes from 1073741824, '2GB', '512MiB' or '1.5 GB'; 0 stays 0 (meaning auto)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected bytes (an integer) or a size such as '2GB'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0 or value >= 2**63:
            raise ConfigError(f"{name}={value!r}: must be a byte count in [0, 2^63)")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{name}={value!r}: expected bytes (an integer) or a size such as '2GB'")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    size = num * base ** " KMGT".index(unit or " ")
    if not math.isfinite(size) or size >= 2**63:
        raise ConfigError(f"{name}={value!r}: too large (at most 2^63 bytes)")
    return int(size)


def from_dictconfig(cfg: Any) -> RunConfig:
    """Check and convert a composed config (DictConfig or plain dict) into a RunConfig."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as exc:  # a failing ${...} interpolation or resolver
            raise ConfigError(explain_hydra_error(exc)) from None
    else:
        raw = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    variant = dict(raw.pop("variant", None) or {})
    name = variant.pop("name", None)
    if not name:
        raise ConfigError("variant: no variant selected (e.g. variant=full)")
    variant = _new_names(str(name), variant)
    timing = _sub(TimingConfig, raw.pop("timing", {}) or {}, "timing")
    error = _sub(ErrorConfig, raw.pop("error", {}) or {}, "error")
    raw.pop("sweep", None)  # sweep presets may leave a descriptive block
    nested = {"variant", "params", "timing", "error"}
    known = {f.name for f in dataclasses.fields(RunConfig)} - nested
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(unknown_key(unknown[0], known))
    for key, value in raw.items():
        if key != "max_memory":
            check_type(key, value, _HINTS[RunConfig][key])
    raw["max_memory"] = parse_bytes(raw.get("max_memory", 0) or 0)
    run = RunConfig(variant=str(name), params=variant, timing=timing, error=error, **raw)
    validate(run)
    run = dataclasses.replace(run, model=model_name(run))
    if run.mode == "decode" and not run.causal:  # one token after its context: causal by nature,
        run = dataclasses.replace(run, causal=True)  # before any identity is taken from it
    return run


SHAPE_KEYS = ("heads", "kv_heads", "head_dim")


def model_name(run: RunConfig) -> str:
    """The model-shape preset's name where the point has that model's shape; where an override
    changed it (``+shape=llama3_8b heads=8``), the name with what differs
    (``llama3_8b[heads=8]``), so no record claims a model whose shape it did not run. A name
    with no preset in conf/shape/ stays as written."""
    if not run.model:
        return run.model
    preset = Path(conf_dir()) / "shape" / f"{run.model}.yaml"
    if not preset.is_file():
        return run.model
    import yaml

    model = yaml.safe_load(preset.read_text()) or {}
    differs = [f"{key}={getattr(run, key)}" for key in SHAPE_KEYS
               if key in model and getattr(run, key) != model[key]]
    return f"{run.model}[{','.join(differs)}]" if differs else run.model


def unknown_key(key: str, allowed: Iterable[str], what: str = "config key") -> str:
    """'<key>: unknown config key; did you mean …? allowed: …' (close matches first)."""
    allowed = sorted(allowed)
    prefix, _, last = key.rpartition(".")
    close = difflib.get_close_matches(last, allowed, n=3, cutoff=0.6)
    hint = f" did you mean {', '.join(f'{prefix}.{c}' if prefix else c for c in close)}?" \
        if close else ""
    return f"{key}: unknown {what};{hint} allowed: {', '.join(allowed) or '(none)'}"


def check_type(key: str, value: Any, kind: Any) -> None:
    """Raise ConfigError unless `value` is of the declared type `kind` (int, float, bool, str
    or a Literal): a bool is not an int, an int field refuses 1.5, floats must be finite."""
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            options = ", ".join(str(a) for a in get_args(kind))
            raise ConfigError(f"{key}={value!r}: expected one of {options}")
        return
    if kind is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value)
        want = "a finite number"
    elif kind is str:
        ok, want = isinstance(value, str), "a string"
    else:
        return  # containers (params) are checked field by field elsewhere
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {want}")


def _sub(cls: type, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}={raw!r}: expected a group of keys ({prefix}.<key>=...)")
    hints = _HINTS[cls]
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(unknown_key(f"{prefix}.{key}", hints))
        check_type(f"{prefix}.{key}", value, hints[key])
    return cls(**raw)


def validate(run: RunConfig) -> None:
    """Raise ConfigError for the first bad field."""
    for name in ("batch", "heads", "seq_len", "head_dim"):
        value = getattr(run, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r}: must be a positive integer")
    for name in ("kv_heads", "q_len"):
        value = getattr(run, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}={value!r}: must be 0 (the default) or a positive integer")
    if run.kv_heads and run.heads % run.kv_heads:
        raise ConfigError(f"kv_heads={run.kv_heads}: must divide heads={run.heads}")
    if run.q_len > run.seq_len:
        raise ConfigError(f"q_len={run.q_len}: must be <= seq_len={run.seq_len} (queries are "
                          f"the last q_len positions)")
    if run.q_len and run.mode == "decode":
        raise ConfigError(f"q_len={run.q_len}: mode=decode takes one query per step; leave "
                          f"q_len at 0")
    if run.dtype not in DTYPES:
        raise ConfigError(f"dtype={run.dtype!r}: expected one of {', '.join(DTYPES)}")
    if run.device not in DEVICES:
        raise ConfigError(f"device={run.device!r}: expected one of {', '.join(DEVICES)}")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available on this machine")
    if run.mode not in MODES:
        raise ConfigError(f"mode={run.mode!r}: expected one of {', '.join(MODES)}")
    if not (run.isolate == "auto" or isinstance(run.isolate, bool)):
        raise ConfigError(f"isolate={run.isolate!r}: expected auto, true or false")
    for name in ("causal", "resume"):
        if not isinstance(getattr(run, name), bool):
            raise ConfigError(f"{name}={getattr(run, name)!r}: expected true or false")
    cores = os.cpu_count() or 1
    if not isinstance(run.threads, int) or not 0 <= run.threads <= cores:
        raise ConfigError(f"threads={run.threads!r}: must be 0 (auto: the free cores) or at most "
                          f"this machine's {cores} CPUs")
    from attnbench.harness.run.inputs import inputs_problem

    if not isinstance(run.inputs, str):
        raise ConfigError(f"inputs={run.inputs!r}: expected a string (inputs=gaussian, …)")
    problem = inputs_problem(run.inputs, run.shape, run.seq_len + (run.mode == "decode"))
    if problem:
        raise ConfigError(problem)
    t = run.timing
    for name, lo in (("warmup", 0), ("min_reps", 1), ("max_reps", 1)):
        value, hi = getattr(t, name), TIMING_LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"timing.{name}={value!r}: must be an integer in [{lo}, {hi}]")
    if t.max_reps < t.min_reps:
        raise ConfigError(f"timing.max_reps={t.max_reps}: must be >= timing.min_reps={t.min_reps}")
    for name in ("min_time_s", "max_time_s"):
        value, hi = getattr(t, name), TIMING_LIMITS[name]
        if not isinstance(value, int | float) or isinstance(value, bool) or not \
                math.isfinite(value) or not 0 <= value <= hi:
            raise ConfigError(f"timing.{name}={value!r}: must be a finite number in [0, {hi:g}] "
                              f"(seconds)")
    if t.max_time_s < t.min_time_s:
        raise ConfigError(f"timing.max_time_s={t.max_time_s}: must be >= timing.min_time_s="
                          f"{t.min_time_s} (timing stops at max_time_s)")
    check_seed("seed", run.seed)
    if not isinstance(run.error.rows, int) or run.error.rows < 0:
        raise ConfigError(f"error.rows={run.error.rows!r}: must be an integer >= 0")
    _check_variant(run)


def check_seed(key: str, value: Any) -> None:
    """A seed, the run's or a variant's (`variant.seed`): an integer in [0, 2^63)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ConfigError(f"{key}={value!r}: must be an integer in [0, 2^63)")


def _check_variant(run: RunConfig) -> None:
    from attnbench import variants

    try:
        cls = variants.get(run.variant)
    except KeyError as exc:
        raise ConfigError(f"variant={run.variant!r}: {exc.args[0]}") from None
    hints = {f.name: _hint(cls, f) for f in dataclasses.fields(cls)}
    for key, value in run.params.items():
        if key not in hints:
            raise ConfigError(unknown_key(f"variant.{key}", hints, f"parameter of {run.variant}"))
        check_type(f"variant.{key}", value, hints[key])
        if key == "seed":  # every variant's seed seeds a torch.Generator
            check_seed(f"variant.{key}", value)
    try:
        variants.build(run.variant, **run.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"variant.{_field_of(str(exc))}: {exc}") from None


def _new_names(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with a renamed parameter (`Variant.renamed`: `+variant.window=2` on strided, a
    config written before the rename) under its new name, one log line each. The command line
    and sweeps rename before composing (`compose.fit_variant_params`); this catches the rest."""
    from attnbench import variants

    try:
        params, notes = variants.renamed_params(name, params)
    except KeyError:  # an unknown variant: `_check_variant` names it
        return params
    except TypeError as exc:
        raise ConfigError(f"variant.{_field_of(str(exc))}: {exc}") from None
    for note in notes:
        logging.getLogger("attnbench").warning("attnbench: %s", note)
    return params


def _hint(cls: type, f: dataclasses.Field) -> Any:
    try:
        return get_type_hints(cls)[f.name]
    except Exception:  # a plugin's annotation we cannot resolve: no type check for it
        return Any


def _field_of(message: str) -> str:
    m = re.match(r"(\w+)=", message) or re.search(r"no parameter (\w+)", message)
    return m.group(1) if m else "params"


def default_max_memory(device: str = "cpu") -> int:
    """The cap used when max_memory is 0: 90% of the GPU's free memory on CUDA; on CPU half the
    memory available now, which keeps the Linux OOM killer away from the sweep."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2


def check_writable(folder: Path, field: str, create: bool = True) -> None:
    """Raise ConfigError unless `folder` can be created and written to. `create=False` only
    looks (the folder, or its nearest existing parent, must be a writable folder) and creates
    nothing."""
    if not create:
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}={str(folder)!r}: not writable ({existing} is not a "
                              f"writable folder)")
        return
    why = make_writable_folder(folder)
    if why:
        raise ConfigError(f"{field}={str(folder)!r}: not writable ({why})")


def conf_dir() -> str:
    """attnbench's Hydra config folder: the repository's top-level conf/, which installs as
    `attnbench/conf` (pyproject.toml maps the repository's root to the `attnbench` package), so
    a checkout, an editable install and a wheel find it at the same place."""
    from importlib.resources import files

    return str(files("attnbench").joinpath("conf"))


def explain_hydra_error(exc: BaseException) -> str:
    """Hydra's multi-line composition errors as one line naming the field, with close matches."""
    msg = str(exc)
    m = re.search(r"Could not find '([\w/]+)/([^'/]+)'", msg)
    if m:
        group, value = m.groups()
        options = re.findall(r"^\t(\S+)$", msg, re.MULTILINE)
        close = difflib.get_close_matches(value, options, n=3)
        hint = f" did you mean {', '.join(close)}?" if close else ""
        return f"{group}={value!r}: unknown {group};{hint} known: {', '.join(options)}"
    m = re.search(r"Could not override '([\w.]+)'", msg) or re.search(r"Key '([\w.]+)'", msg)
    if m:
        key = m.group(1)
        head = key.split(".")[0]
        return unknown_key(key, _keys_under(head) if "." in key else
                           [f for f in RunConfig.__dataclass_fields__ if f != "params"])
    m = re.search(r"full_key: ([\w.]+)", msg)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if m:  # an interpolation or resolver failed while resolving this key
        return f"{m.group(1)}: {first}"
    return " ".join(msg.split())


def _keys_under(head: str) -> list[str]:
    """The keys a nested group accepts: timing.*, error.*, or any variant's parameters."""
    nested = {"timing": TimingConfig, "error": ErrorConfig}
    if head in nested:
        return list(_HINTS[nested[head]])
    if head == "variant":
        from attnbench import variants

        return sorted({f.name for n in variants.names()
                       for f in dataclasses.fields(variants.get(n))} | {"name"})
    return []
