"""Explicit key maps from a reference implementation's state dict onto a talkmesh method.

A key map is an ordered tuple of :class:`KeyRule`: the first rule whose ``reference`` name
matches a reference key decides it. A ``reference`` ending in ``"."`` is a prefix (the rest
of the key is kept), any other is one exact key. ``talkmesh`` None marks a reference tensor
that talkmesh does not need (it is listed, and the importer may check its value).

:func:`map_state_dict` is strict both ways: every reference tensor must match a rule, land
on a tensor the talkmesh module has, with the same shape, and every talkmesh tensor must be
filled exactly once. :func:`reference_state_dict` inverts a map (tests build reference-named
state dicts with it; nothing of the reference code is needed).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "CheckpointImportError",
    "KeyRule",
    "MappedState",
    "file_sha256",
    "load_reference_state",
    "map_state_dict",
    "reference_state_dict",
]

_MAX_LISTED = 8  # problems of one kind named in an error message


class CheckpointImportError(ValueError):
    """A reference checkpoint does not fit the talkmesh module it is imported into."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One entry of a key map: reference name (prefix if it ends with ".") -> talkmesh name."""

    reference: str
    talkmesh: str | None  # None: the reference tensor is not used by talkmesh
    note: str = ""

    @property
    def is_prefix(self) -> bool:
        return self.reference.endswith(".")

    def target(self, key: str) -> str | None:
        """The talkmesh name of reference ``key`` under this rule (None: unused); KeyError if no match."""
        if self.is_prefix:
            if not key.startswith(self.reference):
                raise KeyError(key)
            return None if self.talkmesh is None else self.talkmesh + key[len(self.reference) :]
        if key != self.reference:
            raise KeyError(key)
        return self.talkmesh

    def source(self, key: str) -> str | None:
        """The reference name that lands on talkmesh ``key`` under this rule, or None."""
        if self.talkmesh is None:
            return None
        if self.is_prefix:
            return self.reference + key[len(self.talkmesh) :] if key.startswith(self.talkmesh) else None
        return self.reference if key == self.talkmesh else None


@dataclasses.dataclass
class MappedState:
    """The result of :func:`map_state_dict`."""

    state: dict[str, torch.Tensor]  # talkmesh name -> tensor, ready for load_state_dict(strict=True)
    names: dict[str, str]  # reference name -> talkmesh name
    unused: dict[str, torch.Tensor]  # reference tensors talkmesh does not use (rule talkmesh=None)


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_reference_state(
    path: str | Path, wrappers: Sequence[str] = ("state_dict", "model")
) -> dict[str, torch.Tensor]:
    """A released ``.pth``/``.pt`` as a flat {name: tensor} on the CPU, read with
    ``torch.load(weights_only=True)`` (no code in the file runs). A dict that wraps the state
    dict under one of ``wrappers`` is unwrapped; a DataParallel ``module.`` prefix is removed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise CheckpointImportError(f"{p}: not a weights-only torch checkpoint ({type(e).__name__}: {e})") from e
    for key in wrappers:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointImportError(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointImportError(f"{p}: entries that are not tensors: {bad[:_MAX_LISTED]}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _rule_for(key: str, key_map: Sequence[KeyRule]) -> KeyRule | None:
    for rule in key_map:
        try:
            rule.target(key)
        except KeyError:
            continue
        return rule
    return None


def _expected_source(key: str, key_map: Sequence[KeyRule]) -> str:
    for rule in key_map:
        src = rule.source(key)
        if src is not None:
            return src
    return "(no rule maps onto it)"


def _listing(label: str, items: list[str]) -> str:
    """``items`` (each starting with a quoted key) named up to _MAX_LISTED, the shallowest keys
    first: top-level layers (output, style) say more about a mismatch than encoder internals."""
    shown = sorted(items, key=lambda item: item.split(" ", 1)[0].count("."))[:_MAX_LISTED]
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {label}: " + "; ".join(shown) + more


def map_state_dict(
    reference: Mapping[str, torch.Tensor], key_map: Sequence[KeyRule], target: Mapping[str, torch.Tensor]
) -> MappedState:
    """Rename ``reference`` onto the names of ``target`` (a talkmesh ``state_dict()``), strictly.

    Raises :class:`CheckpointImportError` naming every unexpected reference tensor (no rule),
    every tensor mapped onto a name talkmesh lacks or onto a different shape, every talkmesh
    tensor filled twice, and every talkmesh tensor left missing (with the reference name
    expected for it). Tensors are cast to the target's dtype.
    """
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unused: dict[str, torch.Tensor] = {}
    unexpected, unknown, shapes, twice = [], [], [], []
    offered: set[str] = set()  # talkmesh names a reference tensor of the wrong shape was offered for
    for key, tensor in reference.items():
        rule = _rule_for(key, key_map)
        if rule is None:
            unexpected.append(f"{key!r} {tuple(tensor.shape)}")
            continue
        dst = rule.target(key)
        if dst is None:
            unused[key] = tensor
        elif dst not in target:
            unknown.append(f"{key!r} -> {dst!r}")
        elif tuple(tensor.shape) != tuple(target[dst].shape):
            offered.add(dst)
            shapes.append(f"{key!r} {tuple(tensor.shape)} -> {dst!r} expects {tuple(target[dst].shape)}")
        elif dst in state:
            twice.append(f"{dst!r} from {_name_of(names, dst)!r} and {key!r}")
        else:
            state[dst] = tensor.detach().to(dtype=target[dst].dtype)
            names[key] = dst
    left = [k for k in target if k not in state and k not in offered]
    missing = [f"{k!r} (reference name {_expected_source(k, key_map)!r})" for k in left]
    problems = [
        _listing(label, items)
        for label, items in (
            ("unexpected reference tensor(s), no rule in the key map", unexpected),
            ("reference tensor(s) mapped onto names the talkmesh module lacks", unknown),
            ("tensor(s) with the wrong shape", shapes),
            ("talkmesh tensor(s) filled twice", twice),
            ("talkmesh tensor(s) missing from the checkpoint", missing),
        )
        if items
    ]
    if problems:
        raise CheckpointImportError("; ".join(problems))
    return MappedState(state=state, names=names, unused=unused)


def _name_of(names: Mapping[str, str], dst: str) -> str:
    """The reference name already mapped onto talkmesh name ``dst``."""
    return next((src for src, d in names.items() if d == dst), "?")


def reference_state_dict(talkmesh: Mapping[str, torch.Tensor], key_map: Sequence[KeyRule]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`map_state_dict`: talkmesh names -> the reference's names (the
    first rule whose talkmesh side matches, exact rules being listed before prefixes).
    Reference tensors talkmesh does not use are not produced."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in talkmesh.items():
        src = _expected_source(key, key_map)
        if src.startswith("("):
            raise CheckpointImportError(f"talkmesh tensor {key!r}: no rule of the key map produces it")
        out[src] = tensor
    return out
