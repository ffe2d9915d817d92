"""Strict config loading, dotted overrides, and every YAML in configs/ loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from talkmesh.config import (
    ConfigError,
    DataConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_override,
    replace,
    to_dict,
)
from talkmesh.train.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]

# Schema of each preset directory under configs/. A new directory must be added here,
# so no YAML can sit in the repo without being validated. Method directories hold
# ExperimentConfig presets, whose `model` section is validated by the method's config class.
PRESET_SCHEMAS = {
    "adamesh": ExperimentConfig,
    "data": DataConfig,
    "deeptalk": ExperimentConfig,
    "dualtalker": ExperimentConfig,
    "faceformer": ExperimentConfig,
    "mimic": ExperimentConfig,
}


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ("x",)


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False
    label: str | None = None


def test_defaults_and_nested_sections():
    cfg = from_dict(Outer, {"inner": {"width": 8}, "flag": True})
    assert cfg.inner.width == 8 and cfg.inner.rate == 0.5 and cfg.flag is True


def test_unknown_key_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"inner\.widht"):
        from_dict(Outer, {"inner": {"widht": 8}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"inner": {"width": "8"}}, "inner.width"),
        ({"inner": {"width": 1.5}}, "inner.width"),
        ({"inner": {"rate": True}}, "inner.rate"),
        ({"flag": "yes"}, "flag"),
        ({"inner": {"mode": "c"}}, "inner.mode"),
        ({"inner": {"names": "x"}}, "inner.names"),
        ({"inner": 3}, "inner"),
    ],
)
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert str(e.value).startswith(key)


def test_int_accepted_for_float_and_none_for_optional():
    cfg = from_dict(Outer, {"inner": {"rate": 2}, "label": None})
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float) and cfg.label is None


def test_override_syntax_parses_yaml_scalars():
    assert parse_override("model.d_model=128") == ("model.d_model", 128)
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("root=/data/x=y") == ("root", "/data/x=y")
    with pytest.raises(ConfigError):
        parse_override("no_equals")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")


def test_overrides_roundtrip_with_flatten():
    cfg = from_dict(Outer, apply_overrides({}, ["inner.width=16", "inner.names=[p, q]", "flag=true"]))
    flat = flatten(cfg)
    assert flat["inner.width"] == 16 and flat["inner.names"] == ["p", "q"] and flat["flag"] is True
    # the flattened params rebuild the same config through the same override syntax
    assert from_dict(Outer, apply_overrides({}, flat)) == cfg
    assert replace(cfg, {"inner.width": 2}).inner.width == 2
    assert to_dict(cfg)["inner"]["names"] == ["p", "q"]


def test_load_config_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("format: vocaset\nfsp: 30\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*fsp"):
        load_config(DataConfig, p)
    q = tmp_path / "list.yaml"
    q.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DataConfig, q)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DataConfig, tmp_path / "missing.yaml")


def test_overrides_beat_the_preset(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("format: biwi\nfps: 25\n")
    cfg = load_config(DataConfig, p, ["fps=50", "root=/tmp"])
    assert cfg.format == "biwi" and cfg.fps == 50.0 and cfg.root == "/tmp"


def test_every_yaml_in_configs_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ holds no presets"
    for path in files:
        section = path.relative_to(REPO / "configs").parts[0]
        assert section in PRESET_SCHEMAS, f"{path}: no schema registered for configs/{section}/"
        cfg = load_config(PRESET_SCHEMAS[section], path)
        if isinstance(cfg, ExperimentConfig):
            assert cfg.method == section, f"{path}: configs/{section}/ holds a preset for {cfg.method!r}"
            cfg.method_config()  # preset + model overrides through the method's config class
