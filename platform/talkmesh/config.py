"""Typed configs: dataclasses are the schema, YAML presets only select and override.

One override syntax serves every entry point (CLI, Tune search spaces, MLflow params)::

    data.format=vocaset  data.root=/data/vocaset  model.codebook_size=512

Loading is strict: an unknown key, a wrong type or a value outside a ``Literal`` raises
:class:`ConfigError` naming the dotted key (and the file, when it came from one).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "DataConfig",
    "apply_overrides",
    "flatten",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_override",
    "replace",
    "to_dict",
    "yaml_load",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as people write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (floats like ``1e-3`` included)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------------------
# Schema of the data section (later sections live next to what they configure).
# --------------------------------------------------------------------------------------

FormatName = Literal["synthetic", "vocaset", "biwi", "mead", "hdtf"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which corpus to read and how. Dataset facts (fps, vertex count, regions, splits) are
    read from the corpus itself and handed to models as numbers (see ``Corpus.info``)."""

    format: FormatName = "synthetic"
    # Dataset root. Empty for `synthetic` means the cache directory (generated on demand).
    root: str = ""
    # Motion rate used everywhere downstream. 0 = the format's convention
    # (VOCASET 30 by stride-2 subsampling of the 60 fps capture; 25 for the others).
    fps: float = 0.0
    # VOCASET ships in two layouts; `auto` detects which one `root` holds.
    layout: Literal["auto", "original", "processed"] = "auto"
    # Region overrides: a .txt index list (comma/whitespace separated) or a FLAME_masks.pkl
    # (`lips`; upper face = `forehead` + `eye_region`). Empty = the corpus's own files.
    lip_regions: str = ""
    upper_regions: str = ""
    # FLAME 2020 model (generic_model.pkl or an .npz conversion) for parameter corpora.
    # Empty = the corpus's own face model where it ships one (synthetic), else none.
    flame_model: str = ""
    # Savitzky-Golay(5, 2) smoothing of FLAME expression/jaw/head columns (datasets.md 5.4).
    smoothing: bool = True
    # Training windows (seconds of motion); evaluation always uses whole sequences.
    window_seconds: float = 3.0
    # Training items drawn from each sequence per epoch, each its own random window (1 = one
    # per sequence; Mimic's 3D-HDTF reference draws 40 per video).
    items_per_sequence: int = 1
    # Clips kept decoded in memory per process (0 = none). Corpora are never loaded whole.
    cache_clips: int = 32
    # Synthetic corpus: generated into `<cache>/synthetic-<preset>-s<seed>-<fps>fps` when root is empty.
    synthetic_preset: Literal["small", "default"] = "small"
    synthetic_seed: int = 0
    # Which motion the synthetic corpus presents: vertices (VOCASET/BIWI-like) or
    # FLAME-56 parameters (MEAD-like, vertices through its face model).
    synthetic_flavour: Literal["vertex", "flame"] = "vertex"
    # MEAD / FLAME corpora: record the reconstruction version in run metadata.
    flame_reconstruction: str = "unknown"
    # 3D-HDTF: train ids are 1..hdtf_train_ids, val ids the next hdtf_val_ids (Mimic config).
    hdtf_train_ids: int = 150
    hdtf_val_ids: int = 10
    # Unseen-subject evaluation with many training identities: a seeded subset of this size.
    max_conditions: int = 8

    def __post_init__(self) -> None:
        if self.items_per_sequence < 1:
            raise ConfigError(f"data.items_per_sequence: must be >= 1, got {self.items_per_sequence}")


# --------------------------------------------------------------------------------------
# Generic strict conversion
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return _convert_literal(value, tp, key)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_section(value, tp, key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _convert_sequence(value, tp, key)
    if origin in (dict, Mapping) or tp is dict:
        return _convert_mapping(value, tp, key)
    return _convert_scalar(value, tp, key)


def _convert_literal(value: Any, tp: Any, key: str) -> Any:
    """One of the ``Literal`` choices (``True`` does not pass for ``1``)."""
    choices = get_args(tp)
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    return value


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union (``X | None``, ``Optional[X]``) that accepts ``value``."""
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")


def _convert_section(value: Any, tp: type, key: str) -> Any:
    """A nested dataclass section, from an instance or a mapping."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
    return from_dict(tp, value, _prefix=key)


def _convert_sequence(value: Any, tp: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list or tuple (fixed-length tuples checked item by item); strings are not lists."""
    origin = get_origin(tp)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    args = get_args(tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item = args[0] if args else Any
    out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if (origin is tuple or tp is tuple) else out


def _convert_mapping(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """A dict whose keys and values are converted against the annotation's arguments."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    args = get_args(tp) or (str, Any)
    return {_convert(k, args[0], f"{key}.<key>"): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int (integral floats accepted), float (ints accepted), str (paths accepted),
    any other class by isinstance; an annotation of no known kind passes ``value`` through."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, _prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{_prefix}." if _prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + u for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{_prefix}.{name}" if _prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{_prefix or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list/scalars, YAML- and JSON-serialisable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass/dict -> ``{"a.b.c": value}`` (the override syntax; MLflow params)."""
    d = to_dict(obj)
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = d
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.d_model=128"`` -> ``("model.d_model", 128)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. data.format=vocaset)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key, value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = {}
            cur[p] = nxt
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted overrides applied (strings or a mapping)."""
    import copy

    out = copy.deepcopy(dict(data))
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(out, key, value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Schema ``cls`` <- defaults, then ``base``, then the YAML preset at ``path`` (merged key
    by key over ``base``), then dotted overrides."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = apply_overrides(data, flatten(load_yaml(path))) if data else load_yaml(path)
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from e
        raise


def replace(obj: T, overrides: Sequence[str] | Mapping[str, Any]) -> T:
    """A copy of the config ``obj`` with dotted overrides, validated like a fresh load."""
    return from_dict(type(obj), apply_overrides(to_dict(obj), overrides))
