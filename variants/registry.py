"""The variant registry: a dict from name to class, a decorator that fills it, and the
``attnbench.variants`` entry-point group through which other packages add variants (an entry point
names a module that registers its variants on import, or a Variant subclass).

Kept outside ``__init__`` (as timm keeps ``_registry``) so a variant module imports it without
climbing back into the package that imports every family.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import warnings
from typing import Any, TypeVar

from attnbench.variants.base import Variant

ENTRY_POINT_GROUP = "attnbench.variants"

_REGISTRY: dict[str, type[Variant]] = {}
_plugins_loaded = False

V = TypeVar("V", bound=type[Variant])


def register(cls: V) -> V:
    """Class decorator: add a Variant subclass to the registry under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__qualname__} has no `name` to register under")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        raise ValueError(
            f"variant name {name!r} is already registered by "
            f"{other.__module__}.{other.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def load_plugins() -> None:
    """Import every ``attnbench.variants`` entry point once; a broken one only warns."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Variant):
                register(obj)
        except Exception as exc:  # a broken plugin must not take the others down
            warnings.warn(f"attnbench: variant plugin {ep.name!r} ({ep.value}) failed to load: "
                          f"{old_import_hint(exc) or f'{type(exc).__name__}: {exc}'}",
                          stacklevel=2)


def names() -> list[str]:
    """Sorted names of every registered variant (built-ins and plugins)."""
    load_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Variant]:
    """The registered class for `name`; an unknown name raises KeyError listing the known ones."""
    load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown variant {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, **params: Any) -> Variant:
    """A ready variant object: ``build("local", window=64)``.

    Unknown parameters raise TypeError naming the parameter and the accepted ones. A renamed
    parameter (`Variant.renamed`) is read under its new name with a FutureWarning of one line.
    """
    cls = get(name)
    params, notes = renamed_params(name, params)
    for note in notes:
        warnings.warn(note, FutureWarning, stacklevel=2)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(
            f"variant {name!r} has no parameter {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(fields)) or '(none)'}"
        )
    return cls(**params)


def renamed_params(name: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`params` of variant `name` with each old parameter name (`Variant.renamed`) replaced by
    its new one, and one note per replacement: ``strided: `window` counts blocks and is renamed
    `window_blocks`; window=2 read as window_blocks=2``. TypeError where both names are set."""
    cls = get(name)
    out, notes = dict(params), []
    for old, (new, unit) in cls.renamed.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(f"{old}={out[old]!r}: the old name of {name}'s {new}, which is set "
                            f"too ({new}={out[new]!r}); drop {old}")
        value = out.pop(old)
        out[new] = value
        notes.append(rename_note(name, old, new, unit, value))
    return out, notes


def rename_note(name: str, old: str, new: str, unit: str, value: Any) -> str:
    """The one line that says an old parameter name was read under its new one."""
    return (f"{name}: `{old}` counts {unit} and is renamed `{new}`; {old}={value} read as "
            f"{new}={value} (`{old}` is accepted until the next release)")


OLD_NAMES = ("variants", "harness")  # the import names before attnbench 0.2


def old_import_hint(exc: BaseException) -> str:
    """One line for code written against the old import names (`from variants import
    register`), which attnbench now installs as `attnbench.variants`; "" for any other error."""
    name = getattr(exc, "name", None) or ""
    if not isinstance(exc, ImportError) or name.split(".")[0] not in OLD_NAMES:
        return ""
    return (f"it imports {name!r}, which attnbench installs as 'attnbench.{name}': write "
            f"`from attnbench import register, Variant, build` (or `attnbench.{name}`)")
