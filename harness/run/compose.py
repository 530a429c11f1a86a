"""Points from arguments: every point of a sweep composed by Hydra's own loader and checked
(`checked_points`), the checks a command runs before Hydra starts (`precheck`), variant parameters
fitted to the variants that have them, the sweep folder checked, and the one decision of what a
point becomes before anything is measured (`decide`: unsupported, skipped or run). The sweeper,
the job, `plan` and the CLI all take these from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attnbench.harness.run.config import (
    ConfigError,
    RunConfig,
    check_writable,
    conf_dir,
    explain_hydra_error,
    fail,
    from_dictconfig,
    unknown_key,
)

log = logging.getLogger("attnbench")
CONF_DIR = conf_dir()  # shipped in the package; the repository's conf/ in a checkout


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the overrides its job is launched with, and its checked config."""

    overrides: list[str]
    run: RunConfig
    point_id: str


def checked_points(config: DictConfig, loader: Any, arguments: list[str]) -> list[Point]:
    """Every point of the sweep `arguments` (the sweeper's params, then the command line),
    composed and checked, in order; points that measure the same thing once. Raises ConfigError
    (one line) for the first bad point.

    Args:
        config: the sweep's master config (Hydra's, or one composed the same way).
        loader: Hydra's config loader (globs need the config groups).
        arguments: overrides, sweeps included (`seq_len=512,1024`, `variant=glob(*)`).
    """
    from attnbench.harness.run.job import point_id

    parser = OverridesParser.create(config_loader=loader)
    try:
        overrides = parser.parse_overrides(arguments)
        check_values(loader, overrides)
        everything = BasicSweeper.split_arguments(overrides, None)[0]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_hydra_error(exc)) from None
    everything = fit_variant_params(config, loader, everything)
    points, seen = [], set()
    for point in everything:
        try:
            cfg = loader.load_sweep_config(config, list(point))
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(explain_hydra_error(exc)) from None
        run = from_dictconfig(cfg)
        pid = point_id(run)
        if pid not in seen:
            seen.add(pid)
            points.append(Point(list(point), run, pid))
    if len(points) < len(everything):
        log.info("attnbench: points that measure the same thing run once (%d distinct)",
                 len(points))
    return fit_causal(points)


def fit_causal(points: list[Point]) -> list[Point]:
    """In a sweep over both causal values, each point whose variant has no form for its causal
    value (unsupported there, supported with the other value at the same point) left out, with
    one log line: `causal=true,false` measures linformer non-causal and RetNet causal. A sweep
    that asks one causal value keeps such a point: it is an `unsupported` row."""
    if {p.run.causal for p in points if p.run.mode != "decode"} != {True, False}:
        return points
    from attnbench.harness.run.point import point_label

    kept: list[Point] = []
    only: dict[str, dict[str, None]] = {"non-causal only": {}, "causal only": {}}
    for p in points:
        if p.run.mode != "decode" and _no_form(p.run):
            only["non-causal only" if p.run.causal else "causal only"][point_label(p.run)] = None
            continue
        kept.append(p)
    if len(kept) < len(points):
        log.info("attnbench: causal=true,false: %d points left out, of variants with one form "
                 "(measured in that one): %s", len(points) - len(kept),
                 "; ".join(f"{k}: {', '.join(v)}" for k, v in only.items() if v))
    return kept


def _no_form(run: RunConfig) -> bool:
    """Whether `run`'s variant has no form for `run.causal` but one for the other value at the
    same point (False where it runs neither way: the point's own row then says why)."""
    from attnbench import variants
    from attnbench.harness.run.config import resolve_device

    try:
        att = variants.build(run.variant, **run.params)
        args = (run.shape, run.torch_dtype, resolve_device(run.device))
        return bool(att.not_supported_reasons(*args, run.causal, run.mode)) and not \
            att.not_supported_reasons(*args, not run.causal, run.mode)
    except Exception:  # a variant that fails here fails as its own row
        return False


def check_values(loader: Any, overrides: list[Override]) -> None:
    """Raise ConfigError (one line naming the override) for what Hydra accepts but cannot
    compose, or composes into nothing: a config group set to null (`variant=null`), and a sweep
    with no value (`variant=glob(zzz*)`, `seq_len=range(5,5)`)."""
    for o in overrides:
        if o.is_delete():
            continue
        key = o.key_or_group
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        if not values:
            raise ConfigError(f"{o.input_line}: matches nothing, so the sweep would have no "
                              f"point (a glob, range or choice needs at least one value)")
        if any(v is None or v == "null" for v in values) and _is_group(loader, key):
            options = ", ".join(loader.get_group_options(key))
            raise ConfigError(f"{key}=null: {key} is a config group; choose one of its options "
                              f"({options})")


def _is_group(loader: Any, key: str) -> bool:
    try:
        return bool(loader.repository.group_exists(key))
    except Exception:  # another loader: Hydra itself will say what is wrong
        return False


def is_variant_param(override: str) -> bool:
    """`variant.window=64` (a plain override of a variant's parameter, not `variant.name`)."""
    key = override.split("=", 1)[0]
    return key.startswith("variant.") and key != "variant.name" and "@" not in key


def fit_variant_params(config: DictConfig, loader: Any,
                       points: list[list[str]]) -> list[list[str]]:
    """Each point without the variant parameters its variant does not have: in
    `variant=local,longformer,full variant.window=64,256`, `window` sets local's and
    longformer's window (tokens) and full ignores it (its otherwise identical points then
    measure the same thing: run once). A renamed parameter (`Variant.renamed`: strided's
    `window` is `window_blocks`) is set under its new name, one log line per value, where no
    selected variant has the old name as its own; where one has (`variant=local,strided
    variant.window=64`: tokens for local, blocks for strided) it is refused. Raises ConfigError
    (one line) naming a parameter that no selected variant has, or that means two things."""
    if not any(is_variant_param(o) for point in points for o in point):
        return points
    from attnbench.variants.registry import rename_note

    default = str(config.hydra.runtime.choices.get("variant", ""))
    params: dict[str, _Params | None] = {}  # option → its variant's parameters
    used: set[str] = set()
    asked: dict[str, None] = {}
    own: dict[str, dict[str, None]] = {}  # parameter → the variants that have it
    renamed: dict[str, dict[str, tuple[str, str]]] = {}  # old name → variant → (new, unit)
    notes: dict[str, None] = {}
    shadowed: dict[str, str] = {}  # an old name beside its new one: for the other variants
    out = []
    for point in points:
        choice = next((o.split("=", 1)[1] for o in reversed(point)
                       if o.split("=", 1)[0] == "variant"), default)
        if choice not in params:
            params[choice] = _params_of(config, loader, choice)
        have = params[choice]
        kept = []
        for o in point:
            if is_variant_param(o):
                key, value = o.split("=", 1)
                key = key.removeprefix("variant.")
                asked[key] = None
                if have is not None and key in have.renamed and key not in have.fields:
                    new, unit = have.renamed[key]
                    if any(x.split("=", 1)[0] == f"variant.{new}" for x in point):
                        shadowed[key] = f"{have.variant}'s {new}"  # set: `key` is another's
                        continue
                    renamed.setdefault(key, {})[have.variant] = (new, unit)
                    notes[rename_note(have.variant, key, new, unit, value)] = None
                    o = f"variant.{new}={value}"
                elif have is not None and key not in have.fields:
                    continue
                elif have is not None:
                    own.setdefault(key, {})[have.variant] = None
                used.add(key)
            kept.append(o)
        out.append(kept)
    for key, where in renamed.items():
        if key in own:
            (new, unit), names = next(iter(where.values())), ", ".join(where)
            one = len(own[key]) == 1
            raise ConfigError(
                f"variant.{key}: {', '.join(own[key])} take{'s' * one} it as "
                f"{'its' if one else 'their'} own {key}, {names} "
                f"would read it as {new} (in {unit}; {key} is its old name): one value cannot "
                f"mean both, so set variant.{new}=... for {names} beside variant.{key}=... "
                f"(each variant takes only the parameters it has)")
    for key in asked:
        if key in shadowed and key not in used:
            raise ConfigError(f"variant.{key}: the old name of {shadowed[key]}, which is set "
                              f"too; drop variant.{key}")
        if key not in used:
            allowed = set().union(*(p.fields for p in params.values() if p is not None))
            names = ", ".join(sorted(c for c, p in params.items() if p is not None))
            raise ConfigError(unknown_key(f"variant.{key}", allowed, f"parameter of {names}"))
    for note in notes:
        log.warning("attnbench: %s", note)
    return out


@dataclass(frozen=True)
class _Params:
    """A variant config's registered name, its parameters and its renamed ones."""

    variant: str
    fields: set[str]
    renamed: dict[str, tuple[str, str]]


def _params_of(config: DictConfig, loader: Any, choice: str) -> _Params | None:
    """The parameters of the variant config `variant/<choice>.yaml` (None: it does not compose,
    and the point's own check will say why)."""
    from attnbench import variants

    try:
        cfg = loader.load_sweep_config(config, [f"variant={choice}"] if choice else [])
        node = OmegaConf.to_container(cfg.variant, resolve=False)
        name = node.pop("name")
        try:
            cls = variants.get(name)
            return _Params(name, {f.name for f in dataclasses.fields(cls)}, dict(cls.renamed))
        except KeyError:
            return _Params(str(name), set(node), {})
    except Exception:  # a bad option: left to the point's own composition and check
        return None


# Each point's folder inside the sweep folder (conf/config.yaml, harness/run/task.py): named by
# what the point measures, so no other point, sweep or job order can write there.
POINT_SUBDIR = "${attnbench_point:}"


def check_sweep_folder(config: DictConfig, create: bool = True) -> Path:
    """The sweep folder, checked: named (not empty); points filed in it by identity (an
    override of `hydra.sweep.subdir` is refused); `resume=true` needs it named and holding a
    sweep; it must be writable (`create`: by creating it and writing a probe; otherwise only
    looked at, nothing created)."""
    sub = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if sub != POINT_SUBDIR:
        raise ConfigError(f"hydra.sweep.subdir={sub!r}: attnbench files each point in a folder "
                          f"named by what it measures, directly in the sweep folder; leave "
                          f"hydra.sweep.subdir as it is (choose the folder with hydra.sweep.dir)")
    raw = OmegaConf.select(config, "hydra.sweep.dir")
    if raw is None or not str(raw).strip():
        raise ConfigError(f"hydra.sweep.dir={raw!r}: empty; name the folder the sweep writes "
                          f"into (hydra.sweep.dir=DIR)")
    sweep_dir = Path(str(raw))
    if config.get("resume"):
        if not _named_sweep_dir(config):
            raise ConfigError("resume=true: name the sweep folder to resume with "
                              "hydra.sweep.dir=DIR")
        if not holds_sweep(sweep_dir):
            raise ConfigError(f"hydra.sweep.dir={str(sweep_dir)!r}: resume=true, but no sweep "
                              f"was written there (no multirun.yaml, no result.json); check "
                              f"the folder's name")
    check_writable(sweep_dir, "hydra.sweep.dir", create=create)
    return sweep_dir


def holds_sweep(folder: Path) -> bool:
    """Whether `folder` holds a sweep: its multirun.yaml (written before any point runs) or a
    record."""
    from attnbench.harness.records import find_records

    return (folder / "multirun.yaml").is_file() or bool(find_records(folder))


def _named_sweep_dir(config: DictConfig) -> bool:
    return any(str(o).startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)


def precheck(overrides: list[str], multirun: bool = False) -> list[str]:
    """Compose and check a config before Hydra starts: one line per problem. For a multirun,
    the first point of the sweep (each swept key at its first value, variant parameters left
    out): Hydra composes a config before the sweeper runs, and would fail on it with a dump;
    the sweeper checks every point afterwards. For a single run, a variant parameter its variant
    does not have is named. Returns the overrides to run: a single run's renamed variant
    parameter under its new name (`fit_variant_params`), a multirun's as given."""

    try:
        with hydra_loader() as loader:
            check_values(loader, OverridesParser.create(config_loader=loader)
                         .parse_overrides(overrides))
            if multirun:
                first = [o for o in first_point(overrides) if not is_variant_param(o)]
                cfg = loader.load_configuration("config", first, RunMode.MULTIRUN)
            else:
                base = [o for o in overrides if not is_variant_param(o)]
                overrides = fit_variant_params(
                    loader.load_configuration("config", base, RunMode.RUN), loader,
                    [overrides])[0]
                cfg = loader.load_configuration("config", overrides, RunMode.RUN)
        from_dictconfig(cfg)
        if not multirun:  # the sweeper checks the sweep folder
            run_dir = OmegaConf.select(cfg, "hydra.run.dir")
            if run_dir is None or not str(run_dir).strip():
                raise ConfigError(f"hydra.run.dir={run_dir!r}: empty; name the folder the run "
                                  f"writes its record into (hydra.run.dir=DIR)")
            check_writable(Path(str(run_dir)).parent, "hydra.run.dir")
    except (HydraException, OmegaConfBaseException) as exc:
        fail(explain_hydra_error(exc))
    except ConfigError as exc:
        fail(str(exc))
    return overrides


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


def sweep_argv(argv: list[str]) -> list[str]:
    """The arguments Hydra gets for a multirun: a variant parameter set to one value becomes a
    one-value sweep (`variant.window=choice(64)`). Hydra composes the sweep's first config from
    the non-swept overrides, and that config's variant may not have the parameter; the sweeper
    applies it to each point whose variant has it."""
    out = []
    for a in argv:
        if is_variant_param(a) and not _is_sweep(a):
            key, value = a.split("=", 1)
            a = f"{key}=choice({value})"
        out.append(a)
    return out


def _is_sweep(arg: str) -> bool:
    try:
        return OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:  # Hydra will say what is wrong with it
        return True
