"""Stage registry: name -> stage class, per stage kind; "package.module:Class" for user stages.

A stage class is registered with ``@register("sampler", "euler")``. It must define a pydantic model
``Config`` (with ``extra="forbid"``) and be constructible as ``Stage(config)``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from flowrl.errors import FlowrlError

KINDS = ("sampler", "reward", "estimator", "objective", "kl", "advantage")

_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}

#: Modules whose import registers the built-in stages of each kind (imported on first lookup).
_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "sampler": ("flowrl.samplers",),
    "reward": ("flowrl.rewards",),
    "estimator": ("flowrl.estimators",),
    "objective": ("flowrl.objectives",),
    "kl": ("flowrl.kl",),
    "advantage": ("flowrl.advantages",),
}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator adding a stage under `kind`/`name`."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown stage kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(cls: type) -> type:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        if not hasattr(cls, "Config"):
            raise TypeError(f"{cls.__qualname__} must define a pydantic `Config` model to be registered")
        cls.stage_kind, cls.stage_name = kind, name
        _REGISTRY[kind][name] = cls
        return cls

    return deco


def _load_builtins(kind: str) -> None:
    for module in _BUILTIN_MODULES.get(kind, ()):
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    """Registered names of a kind, sorted."""
    _load_builtins(kind)
    return sorted(_REGISTRY[kind])


def lookup(kind: str, name: str) -> type:
    """The stage class for `name`, or a user class given as "package.module:Class".

    Raises:
        FlowrlError: unknown name (with the nearest registered one) or an import failure.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise FlowrlError(
                f"cannot import user {kind} {name!r}: {err}. Give it as 'package.module:Class' "
                "with the package importable (installed or on PYTHONPATH)"
            ) from None
        if not hasattr(cls, "Config"):
            raise FlowrlError(f"user {kind} {name!r} has no pydantic `Config` model; see flowrl/registry.py")
        return cls
    _load_builtins(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = sorted(_REGISTRY[kind])
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise FlowrlError(f"unknown {kind} {name!r}{hint} Known: {', '.join(known)}") from None
