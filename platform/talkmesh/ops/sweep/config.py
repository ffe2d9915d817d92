"""The sweep definition (``sweeps/<method>.yaml``): a strict schema, and the check of every
search-space key against the method's experiment before Ray starts. Imports no Ray."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from talkmesh.config import ConfigError, apply_overrides, flatten, from_dict, load_config, to_dict
from talkmesh.ops.jobs import find_preset
from talkmesh.train.config import RUN_NAME, ExperimentConfig, load_experiment

__all__ = [
    "EPOCHS_DONE",
    "RESERVED_KEYS",
    "TRAIN_DRIVER",
    "Distribution",
    "SchedulerConfig",
    "SearchConfig",
    "SweepConfig",
    "check_name",
    "load_sweep",
]

# Custom Ray resource a trial driver holds instead of a CPU (notes/ray-mlflow.md §3).
TRAIN_DRIVER = "TRAIN_DRIVER"

# Tune result key ASHA counts in: epochs the trial's Train run has completed (the loop's
# 0-based ``epoch`` + 1), so a trial resumed mid-way is compared at its true epoch.
EPOCHS_DONE = "epochs_done"

# Keys the sweep itself owns: a search space may not touch them.
RESERVED_KEYS = (
    "method",
    "train.run_name",
    "train.experiment",
    "train.storage_path",
    "train.num_workers",
    "train.use_gpu",
    "train.checkpoint_metric",
    "train.checkpoint_mode",
)


def check_name(name: str) -> str:
    """``name`` when it is a valid sweep/run name, else a :class:`ConfigError`."""
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (not starting with '.')")
    return name


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One search dimension: ``choice`` over ``values``, ``uniform`` on [low, high], or
    ``loguniform`` on [low, high] with 0 < low."""

    type: Literal["choice", "uniform", "loguniform"] | None = None
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.type is None:
            raise ValueError("type: required (choice, uniform or loguniform)")
        if self.type == "choice":
            if not self.values:
                raise ValueError("values: choice needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ValueError("choice takes `values`, not low/high")
            return
        if self.values:
            raise ValueError(f"{self.type} takes `low` and `high`, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low/high must be finite, got {self.low}, {self.high}")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.type == "loguniform" and not self.low > 0:
            raise ValueError(f"loguniform needs 0 < low, got low={self.low}")

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole dimension when validating the space: every
        choice; both ends of a range and a non-integer point inside it (a float range
        over an integer field then fails at load time, not in a trial)."""
        if self.type == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        mid = 0.5 * (self.low + self.high) if self.type == "uniform" else math.sqrt(self.low * self.high)
        if float(mid).is_integer():
            mid = math.nextafter(mid, self.high)
        return [self.low, self.high, mid]


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Trial scheduler. ``asha``: asynchronous successive halving over completed epochs
    (every epoch reports once); ``fifo``: every trial runs to the end."""

    type: Literal["asha", "fifo"] = "asha"
    max_t: int = 4  # epochs a trial may run at most (ASHA's top rung)
    grace_period: int = 1  # epochs before a trial can be stopped
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_t < 1:
            raise ValueError(f"max_t: must be >= 1, got {self.max_t}")
        if not 1 <= self.grace_period <= self.max_t:
            raise ValueError(f"grace_period: must lie in [1, max_t={self.max_t}], got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Search algorithm: ``optuna`` (TPE, seeded) or ``random`` (seeded random sampling)."""

    type: Literal["optuna", "random"] = "optuna"
    seed: int | None = 0


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep definition (``sweeps/<method>.yaml``); see :mod:`talkmesh.ops.sweep`."""

    method: str = ""
    preset: str = "small"  # configs/<method>/<preset>.yaml, or a path to a YAML preset
    name: str = ""  # "" = <method>-<ray job submission id> or <method>-<time>-<random>
    overrides: tuple[str, ...] = ()  # fixed dotted overrides of every trial
    metric: str = "val/lve"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    max_failures: int = 0  # Tune retries per trial (a retry resumes the trial's Train run)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    space: dict[str, Distribution] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.method:
            raise ConfigError("method: required (a registered method name, e.g. faceformer)")
        if not self.preset:
            raise ConfigError("preset: required (configs/<method>/<preset>.yaml or a path)")
        if self.name:
            check_name(self.name)
        if not self.metric:
            raise ConfigError("metric: required (e.g. val/lve)")
        for field in ("num_samples", "max_concurrent_trials"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}: must be >= 1, got {getattr(self, field)}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures: must be >= 0, got {self.max_failures}")
        if not self.space:
            raise ConfigError("space: empty; give at least one dotted key with a distribution")
        for key in self.space:
            if not key or any(not part for part in key.split(".")):
                raise ConfigError(f"space: {key!r} is not a dotted key (e.g. model.d_model)")
            if key in RESERVED_KEYS:
                raise ConfigError(f"space.{key}: set by the sweep itself; it cannot be searched")

    def experiment(self, params: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """The trial ``ExperimentConfig``: the preset, the fixed overrides, the sweep's metric
        and mode as the checkpoint ranking, then ``params`` (dotted key -> value)."""
        try:
            exp = load_experiment(find_preset(self.method, self.preset), self.overrides, base={"method": self.method})
        except ConfigError as e:
            raise ConfigError(f"preset/overrides: {e}") from None
        if exp.method != self.method:
            raise ConfigError(f"preset: {self.preset} trains {exp.method!r}, not method {self.method!r}")
        ranking = {"train.checkpoint_metric": self.metric, "train.checkpoint_mode": self.mode}
        return from_dict(ExperimentConfig, apply_overrides(to_dict(exp), {**ranking, **(params or {})}))

    def validate(self) -> ExperimentConfig:
        """Check the trial experiment and every space key against it (probe values, then the
        first values together); returns the fixed trial ``ExperimentConfig``. Errors name the key."""
        exp = self.experiment()
        self._check_training(exp)
        base = to_dict(exp)
        for key, dist in self.space.items():
            for value in dist.probe_values():
                try:
                    from_dict(ExperimentConfig, apply_overrides(base, {key: value}))
                except ConfigError as e:
                    hint = " (use type: choice for an integer field)" if "integer" in str(e) else ""
                    raise ConfigError(
                        f"space.{key}: {value!r} is not a valid override of the {self.method} experiment: {e}{hint}"
                    ) from None
        first = {key: dist.probe_values()[0] for key, dist in self.space.items()}
        try:
            from_dict(ExperimentConfig, apply_overrides(base, first))
        except ConfigError as e:
            raise ConfigError(f"space: the first values together {first} are not a valid experiment: {e}") from None
        return exp

    def _check_training(self, exp: ExperimentConfig) -> None:
        """Trials train with Ray Train workers, validate every epoch under ASHA, report ``metric``."""
        t = exp.train
        if t.num_workers < 1:
            raise ConfigError(
                f"overrides: train.num_workers={t.num_workers}; a sweep trial trains with Ray Train workers (>= 1)"
            )
        if self.scheduler.type == "asha" and t.eval_every != 1:
            raise ConfigError(
                f"overrides: train.eval_every={t.eval_every}; ASHA compares {self.metric} after every epoch, "
                "so trials must validate every epoch (train.eval_every=1)"
            )
        head = self.metric.split("/", 1)[0]
        if "/" not in self.metric or head not in (t.eval_split, "train"):
            raise ConfigError(
                f"metric: {self.metric!r} is not reported by the training loop; use train/<loss term> or "
                f"{t.eval_split}/<metric> (train.eval_split is {t.eval_split!r}), e.g. {t.eval_split}/lve"
            )

    def params(self) -> dict[str, Any]:
        """Flat ``sweep.*`` params for the parent MLflow run."""
        return {k: v for k, v in flatten(to_dict(self), "sweep").items() if v is not None and v != []}


def load_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    num_samples: int | None = None,
    name: str | None = None,
) -> SweepConfig:
    """Read and validate a sweep YAML. ``overrides`` are appended to its fixed trial
    overrides; ``num_samples``/``name`` replace its values. Errors name the key and file."""
    cfg = load_config(SweepConfig, path)
    changes: dict[str, Any] = {}
    if overrides:
        changes["overrides"] = (*cfg.overrides, *overrides)
    if num_samples is not None:
        changes["num_samples"] = num_samples
    if name is not None:
        changes["name"] = name
    try:
        if changes:
            cfg = dataclasses.replace(cfg, **changes)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg
