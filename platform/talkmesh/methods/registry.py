"""Method registry: name -> ``"module:Class"``, imported lazily (DESIGN.md "Method").

Importing this module imports nothing heavy; a method's module (and torch/transformers)
is imported the first time that method is asked for. Each method class names its config
dataclass in ``config_class`` and its presets as classmethods of that config.

    facts = DataFacts.from_corpus(corpus)
    model = build_method("faceformer", {"d_model": 128}, facts, preset="biwi")
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import DataFacts, MotionMethod

__all__ = [
    "UnknownMethodError",
    "available_methods",
    "build_config",
    "build_method",
    "get_config_class",
    "get_method",
    "register_method",
]

_METHODS: dict[str, str] = {
    "adamesh": "talkmesh.methods.adamesh:AdaMesh",
    "faceformer": "talkmesh.methods.faceformer:FaceFormer",
    "mimic": "talkmesh.methods.mimic:Mimic",
}


class UnknownMethodError(KeyError):
    """No method is registered under this name."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


def register_method(name: str, target: str) -> None:
    """Register a method: ``register_method("mine", "pkg.module:MyMethod")``."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _METHODS[name] = target


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type[MotionMethod]:
    """The method class registered as ``name`` (imports its module)."""
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {available_methods()}")
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_config_class(name: str) -> type:
    """The config dataclass of method ``name``."""
    return get_method(name).config_class


def build_config(name: str, cfg: Any = None, preset: str | None = None) -> Any:
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


def build_method(name: str, cfg: Any, data_facts: DataFacts, preset: str | None = None) -> MotionMethod:
    """Build method ``name`` from a config (instance, overrides mapping or None) and data facts."""
    from talkmesh.methods.base import DataFacts

    if not isinstance(data_facts, DataFacts):
        raise TypeError(f"data_facts must be DataFacts, got {type(data_facts).__name__}")
    config = build_config(name, cfg, preset)
    assert dataclasses.is_dataclass(config)
    return get_method(name)(config, data_facts)
