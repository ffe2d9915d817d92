"""Checkpoint and model directories: one self-describing layout for every method.

A **method directory** holds what rebuilds a trained method without the training code's
config files::

    method.json   {"format": 1, "method": "faceformer", "config": {...}, "facts": {...}, "stage": "main", ...}
    model.pt      the method's state_dict (torch.save; loaded with weights_only=True)
    templates.npz the neutral templates the method carries (``MotionMethod.templates``), only
                  when it carries any: ``names`` (N,) str and ``templates`` (N, V, 3) float32
                  (np.load with allow_pickle=False). Kept out of model.pt so that strict
                  state_dict loads (importers, resuming) are unchanged; a directory without it
                  (saved before templates existed) loads with no templates.

A **training checkpoint** (one per epoch, ``epoch-0003/``) is a method directory plus::

    trainer.pt    {"epoch": 3, "optimizer": state_dict, "stage": "main", "global_step": 96}
    metrics.json  the metrics reported with it (train loss, val/lve, ...)

A **run directory** (``<train.storage_path>/<run name>/``) holds the checkpoints and
``progress.jsonl``: what rank 0 did, one JSON object a line (:func:`append_progress`) -
``{"event": "start", "start_epoch": 2, "workers": [{"rank", "pid", "node_id"}, ...]}`` each
time a worker group starts (a fresh run, a resumed one, or a restart after a lost worker),
``{"event": "epoch_start", "epoch": 2}`` and ``{"event": "epoch_end", "epoch": 2, "step": 96}``
(after the epoch's checkpoint is persisted). A restarted epoch shows as a second
``epoch_start`` of the same epoch.

The registered MLflow model (``talkmesh-<method>``) carries a method directory as its
artifact, so Serve, the job and the tests rebuild the module the same way
(:func:`load_method`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from talkmesh.config import to_dict

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import DataFacts, MethodConfig, MotionMethod

__all__ = [
    "METHOD_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "PROGRESS_FILE",
    "TEMPLATES_FILE",
    "TRAINER_FILE",
    "CheckpointInfo",
    "LoadedMethod",
    "append_progress",
    "checkpoint_dir_name",
    "checkpoint_epoch",
    "list_checkpoints",
    "load_method",
    "load_trainer_state",
    "read_metrics",
    "read_progress",
    "read_templates",
    "save_checkpoint",
    "save_method",
    "select_checkpoint",
    "write_templates",
]

FORMAT_VERSION = 1
METHOD_FILE = "method.json"
MODEL_FILE = "model.pt"
TEMPLATES_FILE = "templates.npz"
TRAINER_FILE = "trainer.pt"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.jsonl"
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


def checkpoint_dir_name(epoch: int) -> str:
    """``epoch-0003``: the directory (and Ray ``checkpoint_dir_name``) of epoch 3 (0-based)."""
    return f"epoch-{epoch:04d}"


def checkpoint_epoch(path: str | Path) -> int | None:
    """The epoch of a checkpoint directory named by :func:`checkpoint_dir_name` (None: another name)."""
    m = _EPOCH_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def _unwrap(module: torch.nn.Module) -> MotionMethod:
    """The method inside a DistributedDataParallel wrapper (or the method itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def _json_safe(value: Any) -> Any:
    """Metrics for JSON: NaN/inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _json_safe(value.item())
    return value


def save_method(directory: str | Path, method: torch.nn.Module, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``method.json`` + ``model.pt`` for ``method`` (a MotionMethod, DDP-wrapped or not)."""
    m = _unwrap(method)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT_VERSION,
        "method": m.name,
        "config": to_dict(m.config),
        "facts": m.facts.to_dict(),
        "stage": m.stage,
        **dict(extra or {}),
    }
    (d / METHOD_FILE).write_text(json.dumps(_json_safe(info), indent=2, sort_keys=True))
    state = {k: v.detach().to("cpu") for k, v in m.state_dict().items()}
    torch.save(state, d / MODEL_FILE)
    write_templates(d, m.templates)
    return d


def write_templates(directory: str | Path, templates: Mapping[str, np.ndarray]) -> Path | None:
    """Write ``templates.npz`` (name -> (V, 3)) into a method directory; with no templates,
    remove a stale one instead (so the directory never carries another model's). Returns the
    file, or None when none was written. Written to a temporary name, then renamed."""
    path = Path(directory) / TEMPLATES_FILE
    if not templates:
        path.unlink(missing_ok=True)
        return None
    names = np.array(list(templates), dtype=np.str_)  # (N,)
    meshes = np.stack([np.asarray(t, dtype=np.float32) for t in templates.values()])  # (N, V, 3)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, names=names, templates=meshes)
    os.replace(tmp, path)
    return path


def read_templates(source: str | Path) -> dict[str, np.ndarray]:
    """The templates of a method directory, or of a ``templates.npz`` file itself (name ->
    (V, 3) float32); {} when the directory has no ``templates.npz``. A malformed file is a
    ValueError naming it and what was expected."""
    path = Path(source)
    path = path / TEMPLATES_FILE if path.is_dir() else path
    if not path.is_file():
        return {}
    expected = "'names' (N,) str and 'templates' (N, V, 3) float"
    try:
        with np.load(path, allow_pickle=False) as z:
            names, meshes = z["names"], z["templates"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read templates ({type(e).__name__}: {e}); expected {expected}") from None
    if names.ndim != 1 or names.dtype.kind != "U" or meshes.ndim != 3 or meshes.shape[0] != names.shape[0]:
        raise ValueError(f"{path}: names {names.shape} {names.dtype}, templates {meshes.shape}; expected {expected}")
    if meshes.dtype.kind != "f" or meshes.shape[2] != 3:
        raise ValueError(f"{path}: templates {meshes.shape} {meshes.dtype}; expected {expected}")
    if len(set(names.tolist())) != len(names):
        raise ValueError(f"{path}: duplicate template names {names.tolist()}")
    return {str(n): meshes[i].astype(np.float32) for i, n in enumerate(names.tolist())}


@dataclasses.dataclass
class LoadedMethod:
    """A method rebuilt from a method directory."""

    method: MotionMethod  # in eval mode, on ``device``
    facts: DataFacts
    config: MethodConfig  # the method's config dataclass
    info: dict[str, Any]  # method.json


def load_method(directory: str | Path, device: str | torch.device = "cpu") -> LoadedMethod:
    """Rebuild the method saved in ``directory`` (config + data facts + state dict)."""
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method, get_config_class

    d = Path(directory)
    meta_path = d / METHOD_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d}: no {METHOD_FILE}; not a talkmesh method or checkpoint directory")
    info = json.loads(meta_path.read_text())
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {info.get('format')!r}, this talkmesh reads {FORMAT_VERSION}")
    facts = DataFacts.from_dict(info["facts"])
    method = build_method(info["method"], get_config_class(info["method"]).upgrade(info["config"]), facts)
    stage = info.get("stage")
    if stage:
        method.set_stage(stage)
    state = torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    method.load_state_dict(state)
    templates = read_templates(d)
    try:
        method.set_templates(templates)
    except ValueError as e:
        raise ValueError(f"{d / TEMPLATES_FILE}: {e}") from None
    method.to(device).eval()
    return LoadedMethod(method=method, facts=facts, config=method.config, info=info)


def save_checkpoint(
    directory: str | Path,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A training checkpoint: method directory + ``trainer.pt`` (optimizer, epoch) + ``metrics.json``.
    ``optimizer`` None (a fit-only stage) stores an empty optimizer state."""
    d = save_method(directory, method, extra={"epoch": int(epoch)})
    opt_state = optimizer.state_dict() if optimizer is not None else {}
    state = {"epoch": int(epoch), "optimizer": opt_state, "stage": _unwrap(method).stage}
    state.update(dict(extra or {}))
    torch.save(state, d / TRAINER_FILE)
    (d / METRICS_FILE).write_text(json.dumps(_json_safe(dict(metrics)), indent=2, sort_keys=True))
    return d


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: epoch, optimizer state dict, stage, ..."""
    return torch.load(Path(directory) / TRAINER_FILE, map_location="cpu", weights_only=True)


def read_metrics(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / METRICS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    epoch: int
    path: Path
    metrics: dict[str, Any]


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints (``epoch-NNNN/`` with trainer.pt) under a run directory, by epoch."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        epoch = checkpoint_epoch(p)
        if epoch is not None and p.is_dir() and (p / TRAINER_FILE).is_file() and (p / MODEL_FILE).is_file():
            out.append(CheckpointInfo(epoch, p, read_metrics(p)))
    return sorted(out, key=lambda c: c.epoch)


def _score(c: CheckpointInfo, metric: str, mode: str) -> float:
    v = c.metrics.get(metric)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return math.inf
    return float(v) if mode == "min" else -float(v)


def select_checkpoint(
    checkpoints: list[CheckpointInfo], metric: str, mode: str = "min", which: str = "best"
) -> CheckpointInfo | None:
    """The last checkpoint, or the best by ``metric`` (ties and missing values: the later wins
    among equals, checkpoints without the metric lose)."""
    if not checkpoints:
        return None
    if which == "last":
        return checkpoints[-1]
    best = min(checkpoints, key=lambda c: (_score(c, metric, mode), -c.epoch))
    return best if math.isfinite(_score(best, metric, mode)) else checkpoints[-1]


def append_progress(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Append one event (plus its wall-clock ``time``) to the run's ``progress.jsonl``; the
    line is written with one ``write`` and flushed to disk, so a killed writer leaves whole lines."""
    import time

    path = Path(run_dir) / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_json_safe({**dict(record), "time": time.time()}), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_progress(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of the run's ``progress.jsonl`` in order ([] when there is none); a
    truncated last line (a writer killed mid-line on a filesystem without atomic appends) is skipped."""
    path = Path(run_dir) / PROGRESS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
