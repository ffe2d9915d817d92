"""Method registry: name -> ``"module:Class"``, imported lazily (DESIGN.md "Method").

Importing this module imports nothing heavy; a method's module (and torch/transformers)
is imported the first time that method is asked for. Each method class names its
:class:`~talkmesh.methods.base.MethodConfig` subclass in ``config_class``; the presets are
classmethods of that config (``MethodConfig.preset(name)``).

    facts = DataFacts.from_corpus(corpus)
    model = build_method("faceformer", {"d_model": 128}, facts, preset="biwi")

Adding a method is one line in ``_METHODS`` (or :func:`register_method` at run time, e.g.
for a method that lives outside this package); ``methods/README.md`` walks through it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import DataFacts, MethodConfig, MotionMethod

__all__ = [
    "UnknownMethodError",
    "available_methods",
    "build_config",
    "build_method",
    "get_config_class",
    "get_method",
    "register_method",
    "unregister_method",
]

# name -> "module:Class"; the module is imported the first time the method is asked for.
_METHODS: dict[str, str] = {
    "adamesh": "talkmesh.methods.adamesh:AdaMesh",
    "deeptalk": "talkmesh.methods.deeptalk:DEEPTalk",
    "dualtalker": "talkmesh.methods.dualtalker:DualTalker",
    "faceformer": "talkmesh.methods.faceformer:FaceFormer",
    "mimic": "talkmesh.methods.mimic:Mimic",
}


class UnknownMethodError(KeyError):
    """No method is registered under this name."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


def register_method(name: str, target: str) -> None:
    """Register a method: ``register_method("mine", "pkg.module:MyMethod")``. Nothing is
    imported until the method is asked for; registering a name again replaces it."""
    if not name or ":" in name:
        raise ValueError(f"method name must be non-empty and contain no ':', got {name!r}")
    module, _, cls = target.partition(":")
    if not module or not cls or ":" in cls:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _METHODS[name] = target


def unregister_method(name: str) -> None:
    """Remove a method registered with :func:`register_method` (tests, plug-ins)."""
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {available_methods()}")
    del _METHODS[name]


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[MotionMethod]:
    """The method class registered as ``name`` (imports its module)."""
    from talkmesh.methods.base import MotionMethod

    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {available_methods()}")
    module, cls = _METHODS[name].split(":")
    method = getattr(importlib.import_module(module), cls)
    if not (isinstance(method, type) and issubclass(method, MotionMethod)):
        raise TypeError(f"{_METHODS[name]} (method {name!r}) is not a MotionMethod subclass")
    return method


def get_config_class(name: str) -> type[MethodConfig]:
    """The :class:`MethodConfig` subclass of method ``name``."""
    return get_method(name).config_class


def build_config(
    name: str, cfg: MethodConfig | Mapping[str, Any] | None = None, preset: str | None = None
) -> MethodConfig:
    """A validated config for method ``name``.

    ``cfg`` is a config instance (returned as is, ``preset`` must then be None), a mapping
    of overrides (nested ``{"audio_encoder": {"tiny": True}}`` or dotted
    ``{"audio_encoder.tiny": True}``; unknown keys and wrong types raise
    :class:`talkmesh.config.ConfigError`) applied on top of the preset (or the class
    defaults), or None for the preset / defaults.
    """
    from talkmesh.config import flatten, replace

    cls = get_config_class(name)
    if isinstance(cfg, cls):
        if preset is not None:
            raise ValueError("pass either a config instance or a preset, not both")
        return cfg
    if cfg is not None and not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a {cls.__name__}, a mapping or None, got {type(cfg).__name__}")
    base = cls.preset(preset) if preset is not None else cls()
    if not cfg:
        return base
    # Flatten first so a nested section override keeps the section's other preset values.
    return replace(base, flatten(dict(cfg)))


def build_method(
    name: str,
    cfg: MethodConfig | Mapping[str, Any] | None,
    data_facts: DataFacts,
    preset: str | None = None,
) -> MotionMethod:
    """Build method ``name`` from a config (instance, overrides mapping or None) and data facts."""
    from talkmesh.methods.base import DataFacts

    if not isinstance(data_facts, DataFacts):
        raise TypeError(f"data_facts must be DataFacts, got {type(data_facts).__name__}")
    config = build_config(name, cfg, preset)
    return get_method(name)(config, data_facts)
