"""The contract every method implements (DESIGN.md "Method"; specs/README.md G3-G5).

Three small pieces, shared so that the training loop, the evaluator and the service treat
every method alike:

* :class:`DataFacts` - the dataset facts a model may depend on (fps, vertex count,
  training identities, regions, audio samples per frame), as plain numbers. Models never
  ask which dataset they are on.
* StyleState helpers - a StyleState is a plain ``dict`` with ``method`` (str), ``version``
  (int) and tensors / ints / floats / strings. It round-trips through ``torch.save`` /
  ``torch.load(weights_only=True)``; :func:`check_style_state` validates one (e.g. an
  upload) and raises :class:`StyleStateError` (a ``ValueError``) with a clear message.
* :class:`MotionMethod` - the abstract ``nn.Module``: ``forward(batch) -> (loss, logs)``,
  ``generate(audio, template, style=None) -> {"vertices": (T, V, 3), ...}``,
  ``encode_style(reference) -> StyleState``, ``adapt(reference, ...) -> StyleState``,
  ``frames_for_audio(num_samples) -> T`` and ``stages``.

Only torch and numpy are imported here.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.clip import Clip
    from talkmesh.data.corpus import Corpus

__all__ = [
    "Batch",
    "DataFacts",
    "MotionMethod",
    "Reference",
    "StyleState",
    "StyleStateError",
    "check_style_state",
    "load_style_state",
    "make_style_state",
    "reference_field",
    "save_style_state",
    "weighted_loss",
]

Batch = dict[str, Any]
StyleState = dict[str, Any]
# One clip record: a talkmesh.data.clip.Clip or a mapping with the batch-schema keys
# without the batch dimension (audio (S,), vertices (T, V, 3), template (V, 3), ...).
Reference = Union["Clip", Mapping[str, Any]]

SAMPLE_RATE = 16000


# --------------------------------------------------------------------------------------
# Dataset facts
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What a model may know about its data, as numbers (specs/README.md "Batch schema").

    ``train_subjects`` is the one-hot order (index k = ``train_subjects[k]``).
    ``lip_indices`` / ``upper_indices`` are sorted unique vertex indices (may be empty).
    """

    fps: float
    num_vertices: int
    param_dim: int = 0
    train_subjects: tuple[str, ...] = ()
    lip_indices: tuple[int, ...] = ()
    upper_indices: tuple[int, ...] = ()
    motion: Literal["vertices", "params"] = "vertices"
    has_head_pose: bool = False

    def __post_init__(self) -> None:
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"DataFacts.fps must be positive, got {self.fps}")
        if self.num_vertices < 0 or self.param_dim < 0:
            raise ValueError("DataFacts.num_vertices and param_dim must be >= 0")
        if len(set(self.train_subjects)) != len(self.train_subjects):
            raise ValueError(f"DataFacts.train_subjects has duplicates: {list(self.train_subjects)}")
        for name in ("lip_indices", "upper_indices"):
            idx = getattr(self, name)
            if any(i < 0 or (self.num_vertices and i >= self.num_vertices) for i in idx):
                raise ValueError(f"DataFacts.{name}: indices must lie in [0, {self.num_vertices})")

    @property
    def num_train_subjects(self) -> int:
        return len(self.train_subjects)

    @property
    def samples_per_frame(self) -> float:
        """Audio samples (16 kHz) per motion frame: 16000 / fps (533.33 at 30, 640 at 25)."""
        return SAMPLE_RATE / self.fps

    def subject_index(self, subject: int | str) -> int:
        """Position of a training subject (name or index) in the one-hot; errors otherwise."""
        if isinstance(subject, (int, np.integer)) and not isinstance(subject, bool):
            k = int(subject)
            if not 0 <= k < self.num_train_subjects:
                raise ValueError(f"subject index {k} outside [0, {self.num_train_subjects})")
            return k
        if isinstance(subject, str):
            try:
                return self.train_subjects.index(subject)
            except ValueError:
                raise ValueError(
                    f"{subject!r} is not a training subject; training subjects: {list(self.train_subjects)}"
                ) from None
        raise TypeError(f"subject must be an int index or a name, got {type(subject).__name__}")

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> DataFacts:
        """Facts of an opened corpus (``Corpus.info`` and ``Corpus.regions()``)."""
        info = corpus.info
        regions = corpus.regions()
        return cls(
            fps=float(info.fps),
            num_vertices=int(info.num_vertices),
            param_dim=int(info.param_dim),
            train_subjects=tuple(info.train_subjects),
            lip_indices=tuple(int(i) for i in np.asarray(regions.lips).ravel()),
            upper_indices=tuple(int(i) for i in np.asarray(regions.upper).ravel()),
            motion=info.motion,
            has_head_pose=bool(info.has_head_pose),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly dict (stored next to checkpoints so a model can be rebuilt)."""
        d = dataclasses.asdict(self)
        for k in ("train_subjects", "lip_indices", "upper_indices"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataFacts:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DataFacts key(s) {unknown}; valid: {sorted(known)}")
        d = dict(data)
        for k in ("train_subjects", "lip_indices", "upper_indices"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# --------------------------------------------------------------------------------------
# StyleState
# --------------------------------------------------------------------------------------


class StyleStateError(ValueError):
    """A StyleState is malformed, or belongs to another method/version."""


_SCALARS = (bool, int, float, str)


def make_style_state(method: str, version: int, **fields: Any) -> StyleState:
    """A validated StyleState; tensors are detached, made contiguous and moved to the CPU."""
    state: StyleState = {"method": method, "version": int(version)}
    for key, value in fields.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu").contiguous().clone()
        elif isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value)).clone()
        elif isinstance(value, np.generic):
            value = value.item()
        state[key] = value
    return check_style_state(state)


def check_style_state(
    state: Any,
    method: str | None = None,
    version: int | None = None,
    max_numel: int = 10_000_000,
) -> StyleState:
    """Validate a StyleState and return it unchanged; raise :class:`StyleStateError`.

    Rules: a dict with str keys; ``method`` a non-empty str (== ``method`` if given);
    ``version`` an int (== ``version`` if given); every other value a CPU tensor with
    finite values, a bool/int/float (finite) or a str; tensors hold at most
    ``max_numel`` elements in total.
    """
    if not isinstance(state, dict):
        raise StyleStateError(f"a StyleState is a dict, got {type(state).__name__}")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise StyleStateError(f"StyleState keys must be strings, got {bad_keys[:3]}")
    m = state.get("method")
    if not isinstance(m, str) or not m:
        raise StyleStateError("StyleState needs a non-empty string 'method'")
    v = state.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise StyleStateError("StyleState needs an integer 'version'")
    if method is not None and m != method:
        raise StyleStateError(f"StyleState is for method {m!r}, not {method!r}")
    if version is not None and v != version:
        raise StyleStateError(f"StyleState has version {v}, this {method or m} model expects {version}")
    total = 0
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise StyleStateError(f"StyleState[{key!r}] must be a CPU tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise StyleStateError(f"StyleState[{key!r}] holds non-finite values")
            total += value.numel()
        elif isinstance(value, _SCALARS):
            if isinstance(value, float) and not math.isfinite(value):
                raise StyleStateError(f"StyleState[{key!r}] is not finite")
        else:
            raise StyleStateError(
                f"StyleState[{key!r}] has type {type(value).__name__}; allowed: tensor, bool, int, float, str"
            )
    if total > max_numel:
        raise StyleStateError(f"StyleState holds {total} tensor elements (limit {max_numel})")
    return state


def save_style_state(state: StyleState, target: str | Path | io.BytesIO) -> None:
    """``torch.save`` a validated StyleState to a path or buffer."""
    torch.save(check_style_state(state), target)


def load_style_state(
    source: str | Path | bytes | io.BytesIO, method: str | None = None, version: int | None = None
) -> StyleState:
    """Load a StyleState with ``torch.load(weights_only=True)`` (never unpickles code) and validate it."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad style file
        raise StyleStateError(f"cannot read StyleState: {type(e).__name__}: {e}") from e
    return check_style_state(state, method=method, version=version)


# --------------------------------------------------------------------------------------
# Helpers shared by the methods
# --------------------------------------------------------------------------------------


def reference_field(reference: Reference, name: str, default: Any = None) -> Any:
    """``reference.name`` for a Clip-like object, ``reference[name]`` for a mapping."""
    if isinstance(reference, Mapping):
        return reference.get(name, default)
    return getattr(reference, name, default)


def weighted_loss(
    terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of ``weights[k] * terms[k]`` and the G3 logs: ``k`` (unweighted),
    ``k_weighted`` and ``loss`` (the total), all detached floats."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"no weight for loss term(s) {missing}")
    total: torch.Tensor | None = None
    logs: dict[str, float] = {}
    for name, value in terms.items():
        w = float(weights[name])
        weighted = value * w
        total = weighted if total is None else total + weighted
        logs[name] = float(value.detach())
        logs[f"{name}_weighted"] = float(weighted.detach())
    if total is None:
        raise ValueError("no loss terms")
    logs["loss"] = float(total.detach())
    return total, logs


# --------------------------------------------------------------------------------------
# The method contract
# --------------------------------------------------------------------------------------


class MotionMethod(nn.Module, abc.ABC):
    """Base class of every method (``methods/<name>.py``).

    Subclasses set ``name`` (the registry name), ``config_class`` (their frozen config
    dataclass), ``style_version`` and, for staged training, ``stages`` (in order).
    ``stage`` is the stage ``forward`` trains; the training loop calls :meth:`set_stage`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = ("main",)

    def __init__(self, config: Any, facts: DataFacts) -> None:
        super().__init__()
        if not isinstance(facts, DataFacts):
            raise TypeError(f"facts must be DataFacts, got {type(facts).__name__}")
        self.config = config
        self.facts = facts
        self.stage: str = self.stages[0]

    # ---- training -----------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"{self.name}: unknown stage {stage!r}; stages: {list(self.stages)}")
        self.stage = stage

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current stage optimises (default: all with ``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    @abc.abstractmethod
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step's loss (scalar) and logs (flat dict of floats, every term named)."""

    # ---- inference ----------------------------------------------------------------------
    @abc.abstractmethod
    def frames_for_audio(self, num_samples: int) -> int:
        """Motion frames ``generate`` returns for ``num_samples`` samples of 16 kHz audio."""

    @abc.abstractmethod
    def generate(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """audio (S,) or (1, S) raw 16 kHz; template (V, 3). No grad, deterministic.
        Returns at least ``vertices`` (T, V, 3) with T = ``frames_for_audio(S)``."""

    # ---- style --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_style(self, reference: Reference | None = None, **kwargs: Any) -> StyleState:
        """A StyleState from a reference clip (never updates parameters)."""

    @abc.abstractmethod
    def adapt(self, reference: Reference, **kwargs: Any) -> StyleState:
        """A StyleState after selection/optimisation on a reference (never mutates the model)."""

    # ---- small shared utilities -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def check_style(self, state: Any) -> StyleState:
        """Validate a StyleState for this method and version."""
        return check_style_state(state, method=self.name, version=self.style_version)

    def as_audio(self, audio: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
        """(S,) or (1, S) audio -> (1, S) float32 on this model's device."""
        a = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1:
            raise ValueError(f"audio must be one mono utterance (S,) or (1, S), got shape {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("audio holds non-finite samples")
        return a.to(device=self.device, dtype=torch.float32)[None]  # (1, S)

    def as_template(self, template: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """(V, 3) or flat (3V,) template -> (V, 3) float32 on this model's device (checked against the facts)."""
        if template is None:
            raise ValueError(f"{self.name} needs a (V, 3) template")
        t = torch.as_tensor(np.asarray(template) if not isinstance(template, torch.Tensor) else template)
        v = self.facts.num_vertices
        if t.ndim == 1 and t.numel() == v * 3:
            t = t.reshape(v, 3)
        if t.shape != (v, 3):
            raise ValueError(f"template must be ({v}, 3), got shape {tuple(t.shape)}")
        return t.to(device=self.device, dtype=torch.float32)
