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
* :class:`MethodConfig` - the base of every method's frozen config dataclass: presets,
  the training schedule per stage, the optimizer and the learning-rate schedule.
* :class:`MotionMethod` - the abstract ``nn.Module``: ``forward(batch) -> (loss, logs)``,
  ``generate(audio, template, style=None) -> {"vertices": (T, V, 3), ...}``,
  ``encode_style(reference) -> StyleState``, ``adapt(reference, ...) -> StyleState``,
  ``frames_for_audio(num_samples) -> T`` and ``stages``, plus every optional hook the
  training loop, the evaluator, the jobs and the service call, each with a default.
  The platform calls these through this type and never probes a method for attributes;
  ``methods/README.md`` lists them and walks through adding a method.

Only torch, numpy and :mod:`talkmesh.methods.streaming` (torch only) are imported here.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, Union

import numpy as np
import torch
from torch import nn

from talkmesh.methods.streaming import MotionStream, StreamContext, WindowedStream

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.clip import Clip
    from talkmesh.data.corpus import Corpus
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.face.flame import FlameLayer

__all__ = [
    "Batch",
    "DataFacts",
    "LossWeights",
    "MethodConfig",
    "MotionMethod",
    "Reference",
    "StyleState",
    "StageSchedule",
    "StyleStateError",
    "check_style_state",
    "load_style_state",
    "masked_mse",
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
_C = TypeVar("_C", bound="MethodConfig")


PRECISIONS = ("fp32", "bf16")


def mixed_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The precision ``generate``, ``adapt`` and streams run in: ``"bf16"`` runs matrix
    products and convolutions in bfloat16 under ``torch.autocast`` on ``device`` (a GPU's or
    the CPU's), parameters and outputs staying float32 where autocast keeps them; ``"fp32"``
    changes nothing. The service's ``precision`` setting picks it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision: one of {list(PRECISIONS)}, got {precision!r}")


def float32_style(state: StyleState) -> StyleState:
    """``state`` with its floating-point tensors in float32 (an adaptation under bf16 autocast
    may return bfloat16 ones; stored styles and float32 inference take float32)."""
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


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


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE of (B, T, C) over the valid frames (B, T) and every channel (a scalar)."""
    w = valid[..., None].to(pred.dtype)  # (B, T, 1)
    denom = (w.sum() * pred.shape[-1]).clamp_min(1.0)
    return (((pred - target) ** 2) * w).sum() / denom


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Base of a method's ``loss_weights`` section (a frozen dataclass of float fields):
    every weight must be finite and >= 0, else a ValueError names the field."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss_weights.{f.name} must be finite and >= 0, got {value}")


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
# Method configs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """How long and how fast one stage trains (the method's paper schedule for that stage).
    ``TrainConfig`` fields that are set override it. ``epochs``, ``batch_size`` and
    ``grad_accum`` are >= 1; ``lr`` is positive."""

    epochs: int
    batch_size: int
    lr: float
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config (a frozen dataclass of paper defaults).

    Subclasses list their presets in ``PRESETS`` and define each as a classmethod of the
    same name returning a config (``debug`` is the tiny preset the tests use); they do not
    define ``preset`` themselves. The four schedule fields hold the paper's schedule of the
    first (or only) stage; a subclass redeclares them with its own defaults. Override
    :meth:`stage_schedule`, :meth:`lr_factor` and :meth:`build_optimizer` where the paper
    trains differently, and :meth:`face_model_overrides` where the method reads a face-model
    file. The training loop and ``ExperimentConfig.schedule`` call these; a method never
    reads ``train.*`` itself.
    """

    PRESETS: ClassVar[tuple[str, ...]] = ()
    # True when the method reads a face-model file (see face_model_overrides): only then do
    # the jobs open the corpus's face model before training.
    reads_face_model_file: ClassVar[bool] = False

    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 1
    grad_accum: int = 1

    @classmethod
    def preset(cls: type[_C], name: str) -> _C:
        """The preset called ``name`` (one of :attr:`PRESETS`); a ValueError names the valid ones."""
        if name not in cls.PRESETS:
            label = cls.__name__.removesuffix("Config")
            raise ValueError(f"unknown {label} preset {name!r}; presets: {list(cls.PRESETS)}")
        return getattr(cls, name)()

    def stage_schedule(self, stage: str) -> StageSchedule:
        """Epochs, batch size, learning rate and gradient accumulation of ``stage`` ("" = the
        first stage). Default: the schedule fields, for every stage."""
        return StageSchedule(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, grad_accum=self.grad_accum)

    def lr_factor(self, stage: str, epoch: int) -> float:
        """The learning rate of 0-based ``epoch`` of ``stage`` is the stage's lr times this
        (a stateless per-epoch schedule, so a resumed run needs no scheduler state).
        Default: constant, 1.0."""
        return 1.0

    def build_optimizer(
        self, params: Sequence[nn.Parameter], *, stage: str, lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """The optimizer of ``stage`` over ``params`` (``weight_decay`` from ``train.weight_decay``).
        Default: AdamW, default betas (with ``weight_decay=0`` it is Adam)."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def face_model_overrides(self, path: str) -> dict[str, Any]:
        """Config overrides (dotted keys, as in ``build_config``) that hand this method the
        corpus's face-model file ``path``; the jobs apply them before registering a model, so
        that it can build vertices when served (asked only when ``reads_face_model_file``).
        Default: none (the method does not read a face-model file, or its config already
        names one)."""
        return {}

    @classmethod
    def upgrade(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A config dict saved by an earlier talkmesh (a checkpoint's or registered model's
        ``method.json``) rewritten in this version's keys, so that released checkpoints keep
        loading after a config is restructured. Default: unchanged."""
        return dict(saved)


# --------------------------------------------------------------------------------------
# The method contract
# --------------------------------------------------------------------------------------


class MotionMethod(nn.Module, abc.ABC):
    """Base class of every method (``methods/<name>.py``).

    Subclasses set ``name`` (the registry name), ``config_class`` (their
    :class:`MethodConfig` subclass), ``style_version`` and, for staged training, ``stages``
    (in order). ``stage`` is the stage ``forward`` trains; the training loop calls
    :meth:`set_stage`.

    Class-level declarations the platform reads (defaults suit a vertex method that is
    conditioned on a reference clip):

    * ``conditioning`` - ``"reference"``: the style comes from :meth:`encode_style` of a
      reference clip (unseen subjects are decoded in their own style); ``"onehot"``: the
      style is a training subject's one-hot (``generate(..., style=k)``), and the evaluator
      decodes unseen subjects under every training condition with :meth:`generate_conditions`.
    * ``template_input`` - what ``generate`` takes as ``template``: the ``"vertices"``
      (V, 3) mesh, or the FLAME ``"shape"`` vector of the clip.
    * ``trains_on_vertices`` - False for a parameter-corpus method whose training batches
      need no face-model vertices (the loop then skips computing them).
    * ``supports_style_mixing`` - True when :meth:`mix_styles` is implemented (the service
      accepts mixed style specs only then).
    * ``generate_options`` - the keyword-only options :meth:`generate` accepts beyond the
      three arguments (e.g. DEEPTalk's ``sample``, ``seed``, ``emotion``); the service passes a
      request's options only when the method lists them, and answers 422 otherwise.
    * ``style_options`` - the keyword-only options of :meth:`adapt` a client may choose per
      request (DEEPTalk's emotion ``source``); the service accepts only these.
    * ``method_metric_names`` - the keys :meth:`method_metrics` reports (empty: none; the
      evaluator then loads no clips for it).

    Every method the platform calls is declared here with a default; the loop, the
    evaluator, the jobs and the service call them through this type and never probe a
    method with ``getattr`` / ``hasattr``. ``methods/README.md`` lists who calls what, when.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = ("main",)
    conditioning: ClassVar[Literal["reference", "onehot"]] = "reference"
    template_input: ClassVar[Literal["vertices", "shape"]] = "vertices"
    trains_on_vertices: ClassVar[bool] = True
    supports_style_mixing: ClassVar[bool] = False
    generate_options: ClassVar[tuple[str, ...]] = ()
    style_options: ClassVar[tuple[str, ...]] = ()
    method_metric_names: ClassVar[tuple[str, ...]] = ()

    config: MethodConfig  # subclasses narrow it: ``config: MyConfig``
    facts: DataFacts
    stage: str

    def __init__(self, config: MethodConfig, facts: DataFacts) -> None:
        super().__init__()
        if not isinstance(facts, DataFacts):
            raise TypeError(f"facts must be DataFacts, got {type(facts).__name__}")
        if not isinstance(config, MethodConfig):
            raise TypeError(f"config must be a MethodConfig, got {type(config).__name__}")
        self.config = config
        self.facts = facts
        self.stage: str = self.stages[0]
        self._templates: dict[str, np.ndarray] = {}  # name -> (V, 3) float32, read-only
        self._default_template: np.ndarray | None = None  # (V, 3): the mean of _templates

    # ---- training -----------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """Train ``stage`` next (the loop and checkpoint loading call it; one of :attr:`stages`)."""
        if stage not in self.stages:
            raise ValueError(f"{self.name}: unknown stage {stage!r}; stages: {list(self.stages)}")
        self.stage = stage

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current stage optimises (default: all with ``requires_grad``).
        A stage that returns none is fit-only: the loop runs :meth:`fit_stage`, then one
        epoch without an optimizer (validation, checkpoint, report)."""
        return [p for p in self.parameters() if p.requires_grad]

    def fit_stage(self, dataset: ClipDataset) -> dict[str, float]:
        """Non-gradient fitting at the start of the current stage (normalisation statistics,
        k-means, ...). The loop calls it once on a fresh (not resumed) run, after
        ``train.init_from`` is loaded, on every rank, with the training split as whole
        sequences (``dataset[i]`` is a Clip); the returned logs are reported as
        ``train/fit/<key>``. Default: nothing to fit."""
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the loop at the start of every training epoch (0-based, on every rank,
        after resuming too), for schedules that live in the model (e.g. a gradient-reversal
        weight). Default: nothing."""

    def style_reference_frames(self) -> int:
        """Frames of style reference each training window of the current stage needs from
        other frames of the corpus (never the window itself; the ``style_*`` batch keys of
        talkmesh.data.dataset). The loop reads it when it builds the training loader.
        Default: 0, none."""
        return 0

    @abc.abstractmethod
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step's loss (scalar) and logs (flat dict of floats, every term named:
        ``loss``, and ``<term>`` / ``<term>_weighted`` for each loss term). The loop calls it
        in train mode on a collated batch (specs/README.md "Batch schema")."""

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
        """audio (S,) or (1, S) raw 16 kHz; template (V, 3) (the clip's FLAME shape where
        ``template_input == "shape"``); style a StyleState, a training subject (index or
        name) or None (the method's default). No grad, deterministic, restores the training
        mode. Returns at least ``vertices`` (T, V, 3) with T = ``frames_for_audio(S)``. The
        one inference path: the evaluator, the service and the pyfunc model all call it."""

    def generate_conditions(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        subjects: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """One-hot methods: ``{subject: (T, V, 3) vertices}`` for ``audio`` decoded under each
        training subject's condition (how the evaluator scores unseen subjects, metrics.md
        §6.1). Default: one :meth:`generate` per subject; override to batch them."""
        return {s: self.generate(audio, template, s)["vertices"] for s in subjects}

    def generate_batch(
        self,
        audio: Sequence[torch.Tensor | np.ndarray],
        template: Sequence[torch.Tensor | np.ndarray | None],
        style: Sequence[StyleState | int | str | None],
        **options: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """Several utterances (one audio, template and style each; the same ``options``):
        what :meth:`generate` returns for each, in order. The service calls it with the
        requests Serve's batching gathered. Default: one :meth:`generate` each; methods whose
        networks take padded batches override it."""
        if not len(audio) == len(template) == len(style):
            raise ValueError(f"generate_batch: {len(audio)} audios, {len(template)} templates, {len(style)} styles")
        return [self.generate(a, t, s, **options) for a, t, s in zip(audio, template, style, strict=True)]

    # ---- streaming ----------------------------------------------------------------------
    @property
    def stream_context(self) -> StreamContext:
        """The default encoder window of :meth:`open_stream`: left context and look-ahead in
        seconds. Default: 2 s and 0.5 s."""
        return StreamContext()

    def open_stream(
        self,
        template: torch.Tensor | np.ndarray | None = None,
        style: StyleState | int | str | None = None,
        *,
        left_s: float | None = None,
        right_s: float | None = None,
        **options: Any,
    ) -> MotionStream:
        """A :class:`~talkmesh.methods.streaming.MotionStream` animating audio as it arrives,
        with ``generate``'s template, style and ``options``; ``left_s`` / ``right_s`` override
        :attr:`stream_context`. The stream is :meth:`make_stream`'s."""
        return self.make_stream(template, style, self.stream_window(left_s, right_s), **options)

    def make_stream(
        self,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None,
        context: StreamContext,
        **options: Any,
    ) -> MotionStream:
        """The stream :meth:`open_stream` returns, for an encoder window ``context``; an option
        it does not take is a TypeError naming it. Default:
        :class:`~talkmesh.methods.streaming.WindowedStream` (``generate`` on a sliding window)
        with options listed in ``generate_options``; methods whose decoders carry state
        override it."""
        unknown = sorted(set(options) - set(self.generate_options))
        if unknown:
            raise TypeError(f"{self.name}.open_stream: unknown generate option(s) {unknown}")
        return WindowedStream(self, template, style, context, options)

    def stream_window(self, left_s: float | None = None, right_s: float | None = None) -> StreamContext:
        """:attr:`stream_context` with ``left_s`` / ``right_s`` replaced where given."""
        ctx = self.stream_context
        return StreamContext(
            ctx.left_s if left_s is None else float(left_s), ctx.right_s if right_s is None else float(right_s)
        )

    # ---- style --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_style(
        self, reference: Reference | None = None, *, subject: int | str | None = None, **kwargs: Any
    ) -> StyleState:
        """A StyleState from a reference clip, or, with ``subject`` (a training subject's
        index or name), that subject's own style; never updates parameters. The evaluator
        encodes reference-conditioned methods' unseen subjects with it; the service resolves
        a training speaker inside a style mix with ``encode_style(subject=name)``."""

    @abc.abstractmethod
    def adapt(self, reference: Reference, **kwargs: Any) -> StyleState:
        """A StyleState after selection/optimisation on a reference (never mutates the model).
        The service's ``POST /v1/styles`` runs it (``kwargs`` = its ``adapt_options``); the
        evaluator's "adapted" rows too."""

    @property
    def reference_seconds(self) -> float:
        """Seconds of a reference clip that :meth:`encode_style` / :meth:`adapt` use; the
        evaluator cuts style references to this length. Default: 10."""
        return 10.0

    def mix_styles(self, states: Sequence[StyleState], weights: Sequence[float]) -> StyleState:
        """A weighted mix of StyleStates, one weight each (``supports_style_mixing`` methods
        only; the service calls it for a style spec such as ``a:0.7,b:0.3``). Default: raises
        NotImplementedError."""
        raise NotImplementedError(f"{self.name} does not support style mixing")

    def method_metrics(self, clips: Sequence[Clip]) -> dict[str, float]:
        """Metrics that need the method's own networks (e.g. DEEPTalk's emotion retrieval and
        ``emo_acc``), on whole clips of an evaluated split; the keys are
        ``method_metric_names``. The evaluator calls it (in eval mode) only when that tuple is
        non-empty. Default: none."""
        return {}

    def set_face_model(self, layer: FlameLayer | None) -> None:
        """Use ``layer`` to build vertices from predicted FLAME parameters (the service injects
        the face model its config names, after loading the method; the jobs instead put the
        file into the config with :meth:`MethodConfig.face_model_overrides`). Default:
        ignored (the method predicts vertices)."""

    # ---- small shared utilities -----------------------------------------------------------
    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode inside the block, the previous training mode restored after it (every
        inference path, and the evaluator around a whole split)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

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
        if not isinstance(audio, torch.Tensor):
            audio = np.asarray(audio)
            audio = audio if audio.flags.writeable else audio.copy()  # e.g. from Ray's object store
        a = torch.as_tensor(audio)
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1:
            raise ValueError(f"audio must be one mono utterance (S,) or (1, S), got shape {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("audio holds non-finite samples")
        return a.to(device=self.device, dtype=torch.float32)[None]  # (1, S)

    # ---- carried templates ------------------------------------------------------------------
    # A model carries the neutral (V, 3) templates of its training speakers so that a client with
    # nothing but audio gets motion (issue 13). They live outside the state_dict (the method
    # directory's templates.npz, talkmesh.train.checkpoint), so strict state_dict loads of
    # imported weights and checkpoints saved before templates existed keep working.
    def set_templates(self, templates: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Carry ``templates`` (speaker name -> (V, 3) or flat (3V,) neutral mesh), replacing
        any carried before (an empty mapping carries none). Names must be training subjects
        of the facts (when the facts list any); meshes are stored as read-only float32 copies.
        The training loop sets them from the corpus, :func:`talkmesh.train.checkpoint.load_method`
        from the method directory."""
        v = self.facts.num_vertices
        known = self.facts.train_subjects
        stored: dict[str, np.ndarray] = {}
        for name, mesh in templates.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"template names must be non-empty strings, got {name!r}")
            if known and name not in known:
                raise ValueError(f"template {name!r} is not a training subject; training subjects: {list(known)}")
            arr = np.array(mesh.detach().cpu() if isinstance(mesh, torch.Tensor) else mesh, dtype=np.float32)
            if v and arr.ndim == 1 and arr.size == v * 3:
                arr = arr.reshape(v, 3)
            if v <= 0 or arr.shape != (v, 3):
                raise ValueError(f"template {name!r} must be ({v}, 3), got shape {tuple(arr.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"template {name!r} holds non-finite values")
            arr.flags.writeable = False
            stored[name] = arr
        order = {s: i for i, s in enumerate(known)}
        self._templates = dict(sorted(stored.items(), key=lambda kv: order.get(kv[0], len(order))))
        self._default_template = None
        if stored:
            mean = np.mean(np.stack(list(self._templates.values())), axis=0, dtype=np.float64)  # (V, 3)
            self._default_template = mean.astype(np.float32)
            self._default_template.flags.writeable = False

    @property
    def templates(self) -> Mapping[str, np.ndarray]:
        """The carried templates, read-only: name -> (V, 3) float32, in training-subject order."""
        return MappingProxyType(self._templates)

    @property
    def default_style(self) -> str:
        """What ``generate(style=None)`` animates with, for clients (``GET /v1/info``): a
        training speaker's name, or ``"mean"`` (a mean over the training speakers, this
        default). Methods whose default is one speaker override it."""
        return "mean"

    def template_for(self, style: StyleState | int | str | None = None) -> np.ndarray | None:
        """The template to animate ``style`` on when the request sends none: a training speaker
        (name or one-hot index) whose template is carried -> that template; None -> that of
        :attr:`default_style` (the speaker ``generate(style=None)`` animates) when it is one;
        anything else (a StyleState, another speaker, a "mean" default) -> the mean of the
        carried templates. Project decision: the average training face is a neutral face of the
        model's own topology for a client that owns no mesh. None when the model carries none."""
        name = self.default_style if style is None else style
        if isinstance(style, (int, np.integer)) and not isinstance(style, bool):
            k = int(style)
            name = self.facts.train_subjects[k] if 0 <= k < self.facts.num_train_subjects else None
        if isinstance(name, str) and name in self._templates:
            return self._templates[name]
        return self._default_template

    def as_template(
        self, template: torch.Tensor | np.ndarray | None, style: StyleState | int | str | None = None
    ) -> torch.Tensor:
        """(V, 3) or flat (3V,) template -> (V, 3) float32 on this model's device (checked against
        the facts). None -> :meth:`template_for` (``style``): the training speaker's carried
        template, else the mean one; a ValueError when the model carries none."""
        if template is None:
            carried = self.template_for(style)
            if carried is None:
                raise ValueError(f"this {self.name} model carries no templates; send a (V, 3) template")
            template = carried
        if not isinstance(template, torch.Tensor) and not np.asarray(template).flags.writeable:
            template = np.array(template)  # e.g. a carried template: torch needs a writable array
        t = torch.as_tensor(np.asarray(template) if not isinstance(template, torch.Tensor) else template)
        v = self.facts.num_vertices
        if t.ndim == 1 and t.numel() == v * 3:
            t = t.reshape(v, 3)
        if t.shape != (v, 3):
            raise ValueError(f"template must be ({v}, 3), got shape {tuple(t.shape)}")
        return t.to(device=self.device, dtype=torch.float32)
