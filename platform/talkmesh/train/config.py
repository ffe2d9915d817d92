"""Schema of a training run: ``ExperimentConfig`` = method + preset + data + model + train.

A preset (``configs/<method>/<name>.yaml``) selects and overrides; dotted overrides
(``train.epochs=3 model.d_model=32 data.format=biwi``) go on top::

    exp = load_experiment("configs/faceformer/small.yaml", ["train.epochs=3"])

``model`` is a mapping of overrides of the method's own config dataclass (applied on top
of ``preset``); it is validated against that class through the method registry when the
``ExperimentConfig`` is built, so a misspelled ``model.d_modle`` fails at load time, not
on a worker half an hour later. Fields of ``TrainConfig`` left at ``None`` take the
method config's schedule of the stage (``lr``, ``epochs``, ``batch_size``, ``grad_accum``
from ``MethodConfig.stage_schedule``: the paper schedule lives in one place, the
method's preset).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from talkmesh.config import ConfigError, DataConfig, load_config, to_dict

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import MethodConfig, StageSchedule

__all__ = [
    "RUN_NAME",
    "ExperimentConfig",
    "TrainConfig",
    "load_experiment",
]


# A run name is a directory name (Ray) and an MLflow tag value.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the method config says what to train)."""

    # ---- schedule (None = the method config's value for the stage: MethodConfig.stage_schedule) ----
    epochs: int | None = None
    batch_size: int | None = None  # per worker
    lr: float | None = None
    grad_accum: int | None = None
    weight_decay: float = 0.0  # passed to MethodConfig.build_optimizer (default AdamW; 0 = Adam)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # ---- resources ----
    num_workers: int = 0  # Ray Train workers; 0 = local mode (in-process, no Ray cluster)
    use_gpu: bool = False
    # Extra Ray resources each worker holds besides its CPU (or GPU), e.g. a custom resource
    # that only some nodes offer, to pin or spread the workers: {"trainer_slot": 1}.
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    bf16: bool = False  # autocast to bfloat16 (GPU only; ignored on CPU)
    torch_threads: int = 0  # intra-op threads per worker; 0 = leave torch's setting
    loader_workers: int = 0  # DataLoader worker processes per Ray worker
    seed: int = 0
    # ---- checkpoints, fault tolerance, evaluation ----
    checkpoint_num_to_keep: int = 2  # 0 = keep every epoch's checkpoint
    checkpoint_metric: str = "val/lve"  # ranks checkpoints (the best is kept and returned)
    checkpoint_mode: Literal["min", "max"] = "min"
    # Which checkpoint the job evaluates on the test splits and registers.
    select: Literal["best", "last"] = "best"
    # Log the selected checkpoint's files as MLflow artifacts after training.
    log_checkpoint: bool = True
    # Worker-group restarts from the latest checkpoint after a lost worker or node (or an
    # error in training: a deterministic one fails again, once more per retry).
    max_failures: int = 1
    eval_every: int = 1  # validate every N epochs (and always after the last one)
    eval_split: str = "val"
    eval_adapted: bool = False  # validation also decodes unseen subjects with adapt() (``<split>/adapted/*``)
    limit_train_batches: int = 0  # per epoch and worker; 0 = all (quick runs)
    limit_eval_sequences: int = 0  # per evaluated split; 0 = all (quick runs)
    # ---- where things go ----
    storage_path: str = "./outputs/ray"  # Ray Train run directories (shared storage on clusters)
    run_name: str = ""  # "" = <method>-<ray job submission id> or <method>-<time>-<random>
    experiment: str = ""  # MLflow experiment; "" = talkmesh-<method>
    system_metrics: bool = True  # MLflow system metrics (when psutil is installed)
    preview: bool = False  # render a preview of one validation sequence after training
    # ---- stages (multi-stage methods) ----
    stage: str = ""  # "" = the method's first stage
    # Input weights of this stage: a checkpoint directory, a checkpoint.pt, or an MLflow
    # URI (runs:/<id>/checkpoint, models:/talkmesh-<method>@<alias>). Never hard-coded in models.
    init_from: str = ""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr: must be positive, got {self.lr}")
        for name in (
            "weight_decay",
            "grad_clip",
            "num_workers",
            "torch_threads",
            "loader_workers",
            "checkpoint_num_to_keep",
            "max_failures",
            "limit_train_batches",
            "limit_eval_sequences",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        bad = {k: v for k, v in self.worker_resources.items() if not v >= 0}
        if bad:
            raise ConfigError(f"train.worker_resources: amounts must be >= 0, got {bad}")
        if self.eval_every < 1:
            raise ConfigError(f"train.eval_every: must be >= 1, got {self.eval_every}")
        if not self.storage_path:
            raise ConfigError("train.storage_path: must not be empty")
        if "://" in self.storage_path:
            raise ConfigError(
                f"train.storage_path: {self.storage_path!r} is a URI; give a directory every node mounts "
                "(NFS, a PVC, or the bucket mounted with s3fs/gcsfuse): rank 0 writes the checkpoints there"
            )
        if self.run_name and not RUN_NAME.fullmatch(self.run_name):
            raise ConfigError(
                f"train.run_name: {self.run_name!r} must be letters, digits, '.', '_' or '-' (not starting with '.')"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run: which method (registry name) with which preset and overrides, on
    which data, trained how. Building one validates ``model`` with the method's config class."""

    method: str = "faceformer"
    preset: str = ""  # the method config's preset ("" = the class defaults)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.method_config()  # validate now (imports the method's module)

    def method_config(self) -> MethodConfig:
        """The method's config dataclass: ``preset``, then the ``model`` overrides."""
        from talkmesh.methods.registry import UnknownMethodError, build_config, get_config_class

        try:
            cls = get_config_class(self.method)
        except UnknownMethodError as e:
            raise ConfigError(f"method: {e}") from None
        if self.preset:
            try:
                cls.preset(self.preset)
            except (AttributeError, ValueError, TypeError) as e:
                raise ConfigError(f"preset: {e}") from None
        try:
            return build_config(self.method, dict(self.model), self.preset or None)
        except ConfigError as e:
            msg = str(e)
            head = msg.split(":", 1)[0]
            raise ConfigError(f"model.{msg}" if head and " " not in head else f"model: {msg}") from None
        except (ValueError, TypeError) as e:  # the method config's own checks
            raise ConfigError(f"model: {e}") from None

    def schedule(self) -> StageSchedule:
        """epochs / batch size / lr / grad accumulation actually used: each ``TrainConfig``
        field that is set, else the method config's schedule of ``train.stage``
        (``MethodConfig.stage_schedule``)."""
        t = self.train
        staged = self.method_config().stage_schedule(t.stage)
        return dataclasses.replace(
            staged,
            epochs=staged.epochs if t.epochs is None else t.epochs,
            batch_size=staged.batch_size if t.batch_size is None else t.batch_size,
            lr=staged.lr if t.lr is None else t.lr,
            grad_accum=staged.grad_accum if t.grad_accum is None else t.grad_accum,
        )

    @property
    def experiment_name(self) -> str:
        return self.train.experiment or f"talkmesh-{self.method}"

    def resolved(self) -> dict[str, Any]:
        """Nested dict of everything that defines the run: the full method config (preset
        and overrides applied) under ``model`` and the resolved schedule under ``train``.
        ``flatten`` of it gives the MLflow params; it rebuilds the same run through
        ``ExperimentConfig`` (the resolved model dict is a valid override set)."""
        d = to_dict(self)
        d["model"] = to_dict(self.method_config())
        d["train"].update(dataclasses.asdict(self.schedule()))
        return d


def load_experiment(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    base: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """``ExperimentConfig`` <- defaults, ``base``, the YAML preset at ``path``, then dotted
    overrides. Errors name the dotted key (and the file)."""
    return load_config(ExperimentConfig, path, overrides, base=base)
