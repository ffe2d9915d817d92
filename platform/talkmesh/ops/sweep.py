"""Ray Tune sweeps: a search space over dotted overrides, one Ray Train run per trial.

    python sweeps/run.py sweeps/faceformer.yaml [--num-samples N] [--name NAME] [key=value ...]

    cfg = load_sweep("sweeps/faceformer.yaml", ["train.epochs=2"], num_samples=2)
    result = run_sweep(cfg)          # -> SweepResult (trials, best, registered version, promoted?)

The YAML (schema: :class:`SweepConfig`, loaded strictly: unknown keys and wrong types
raise :class:`~talkmesh.config.ConfigError` naming the key and the file)::

    method: faceformer
    preset: small                 # configs/<method>/<preset>.yaml (or a path)
    overrides: [train.epochs=4]   # fixed dotted overrides for every trial
    metric: val/lve
    mode: min
    num_samples: 8
    max_concurrent_trials: 1
    scheduler: {type: asha, max_t: 4, grace_period: 1, reduction_factor: 2}
    search: {type: optuna, seed: 0}
    space:                        # dotted keys -> distributions (choice, uniform, loguniform)
      train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      model.d_model: {type: choice, values: [16, 32]}
      model.dropout: {type: uniform, low: 0.0, high: 0.2}

Every space key is checked at load time by building the method's ``ExperimentConfig``
with each choice value and with both ends (and a non-integer middle) of each range, so a
misspelled key or a float range over an integer field fails before Ray starts.

How a sweep runs (notes/ray-mlflow.md §3):

- ``Tuner`` around a trial driver (:func:`_trial_driver`) that runs
  :func:`talkmesh.train.runner.run_training`, i.e. one ``TorchTrainer`` per trial, with the
  trial's sampled overrides; Ray Train's ``TuneReportCallback`` forwards each epoch's
  report (rank 0's metrics, plus ``epochs_done``) to Tune;
- ASHA (``max_t``/``grace_period`` in epochs) stops weak trials early; OptunaSearch
  (seeded) proposes the values; ``metric``/``mode`` drive both, and also rank each trial's
  checkpoints (``train.checkpoint_metric``/``checkpoint_mode`` are set to them);
- a trial driver holds one ``TRAIN_DRIVER`` custom resource instead of a CPU, so on a
  2-CPU machine the Train workers get the CPUs (a driver holding a CPU deadlocks Train).
  A sweep that starts its own loopback Ray offers ``max_concurrent_trials`` slots; an
  existing cluster must have been started with them (the error says how);
- a stopped trial's Train controller dies with its trial actor and would leave its
  placement group (its CPUs) reserved until the sweep ends; the sweep frees it
  (:mod:`talkmesh.ops._sweep_ray`);
- MLflow: a parent run ``sweep-<name>`` in ``talkmesh-<method>``; each trial is a child
  run ``<name>-<trial id>`` created by ``run_training(parent_run_id=...)`` (params once);
  after ``tuner.fit()`` children still RUNNING (trials ASHA stopped) are closed as KILLED,
  and the parent gets the best trial's params and metrics and ``sweep_results.csv``;
- the best trial's selected checkpoint is registered as ``talkmesh-<method>`` (its
  metrics as version tags) and ``@champion`` moves to it only when it beats the current
  champion on ``metric`` (:func:`talkmesh.ops.tracking.promote_if_better`).

Names and resume: the sweep name is ``name`` (YAML or ``--name``), else
``<method>-<ray job submission id>`` under ``ray job submit``, else
``<method>-<time>-<random>``. Tune keeps its state in
``<train.storage_path>/sweeps/<name>/``, trial Train runs in ``.../<name>/train/<name>-<trial id>/``.
Running a sweep again with the same name restores it (``Tuner.restore``: finished trials
are kept, unfinished ones run again) and continues the same parent run; a retried or
restored trial reuses its run name, so its Train run resumes from its latest checkpoint
and its MLflow child run continues. A resumed sweep whose best checkpoint is already
registered does not register it twice.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from talkmesh.config import ConfigError, apply_overrides, flatten, from_dict, load_config, to_dict

__all__ = [
    "EPOCHS_DONE",
    "TRAIN_DRIVER",
    "Distribution",
    "SchedulerConfig",
    "SearchConfig",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "TrialSummary",
    "format_summary",
    "load_sweep",
    "main",
    "run_sweep",
]

# Custom Ray resource a trial driver holds instead of a CPU (notes/ray-mlflow.md §3).
TRAIN_DRIVER = "TRAIN_DRIVER"

# Keys the sweep itself owns: a search space may not touch them.
_RESERVED_KEYS = (
    "method",
    "train.run_name",
    "train.experiment",
    "train.storage_path",
    "train.num_workers",
    "train.use_gpu",
    "train.checkpoint_metric",
    "train.checkpoint_mode",
)

_TAG_REGISTERED = "talkmesh.registered_version"

# Tune result key ASHA counts in: epochs the trial's Train run has completed (the loop's
# 0-based ``epoch`` + 1), so a trial resumed mid-way is compared at its true epoch.
EPOCHS_DONE = "epochs_done"


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


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
        if self.type == "uniform":
            mid = 0.5 * (self.low + self.high)
        else:
            mid = math.sqrt(self.low * self.high)
        if float(mid).is_integer():
            mid = math.nextafter(mid, self.high)
        return [self.low, self.high, mid]

    def tune_domain(self) -> Any:
        """The Ray Tune domain (``tune.choice`` / ``tune.uniform`` / ``tune.loguniform``)."""
        from ray import tune

        if self.type == "choice":
            return tune.choice(list(self.values))
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.loguniform(self.low, self.high)


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
    """A sweep definition (``sweeps/<method>.yaml``); see the module docstring."""

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
        from talkmesh.train.config import RUN_NAME

        if not self.method:
            raise ConfigError("method: required (a registered method name, e.g. faceformer)")
        if not self.preset:
            raise ConfigError("preset: required (configs/<method>/<preset>.yaml or a path)")
        if self.name and not RUN_NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (not starting with '.')")
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
            if key in _RESERVED_KEYS:
                raise ConfigError(f"space.{key}: set by the sweep itself; it cannot be searched")

    # ---- the trial experiment -------------------------------------------------------------

    def experiment(self, params: Mapping[str, Any] | None = None) -> Any:
        """The trial ``ExperimentConfig``: the preset, the fixed overrides, the sweep's metric
        and mode as the checkpoint ranking, then ``params`` (dotted key -> value)."""
        from talkmesh.ops.jobs import find_preset
        from talkmesh.train.config import ExperimentConfig, load_experiment

        try:
            exp = load_experiment(find_preset(self.method, self.preset), self.overrides, base={"method": self.method})
        except ConfigError as e:
            raise ConfigError(f"preset/overrides: {e}") from None
        if exp.method != self.method:
            raise ConfigError(f"preset: {self.preset} trains {exp.method!r}, not method {self.method!r}")
        data = apply_overrides(
            to_dict(exp), {"train.checkpoint_metric": self.metric, "train.checkpoint_mode": self.mode, **(params or {})}
        )
        return from_dict(ExperimentConfig, data)

    def validate(self) -> Any:
        """Check the trial experiment and every space key against it (see the module
        docstring); returns the fixed trial ``ExperimentConfig``. Errors name the key."""
        from talkmesh.train.config import ExperimentConfig

        exp = self.experiment()
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


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrialSummary:
    """One trial after the sweep."""

    trial_id: str
    run_name: str  # Ray Train run and MLflow child run: <sweep name>-<trial id>
    run_id: str | None  # MLflow child run
    status: str  # MLflow status: FINISHED, KILLED (stopped early), FAILED
    params: dict[str, Any]  # the sampled dotted overrides
    epochs: int  # epochs the trial completed (its last report)
    planned_epochs: int  # epochs its experiment schedules
    checkpoint: str | None  # the trial's selected checkpoint (train.select by the sweep metric)
    metric: float | None  # the sweep metric at that checkpoint
    metrics: dict[str, Any]  # everything reported with that checkpoint
    error: str | None = None


@dataclasses.dataclass
class SweepResult:
    """What a finished sweep left behind."""

    name: str
    experiment: str  # MLflow experiment (talkmesh-<method>)
    parent_run_id: str
    tracking_uri: str
    sweep_dir: str  # Tune state, trial Train runs (train/), sweep_results.csv
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    version: int | None  # registered talkmesh-<method> version of the best checkpoint
    promoted: bool  # whether @champion points at that version now
    champion: int | None  # the champion version after the sweep
    resumed: bool  # restored from an earlier run of the same name
    wall_s: float


# --------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------


def _driver_slots_message(have: float, want: int) -> str:
    return (
        f"the Ray cluster offers {have:g} {TRAIN_DRIVER} slots; each sweep trial driver holds one "
        f"{TRAIN_DRIVER} instead of a CPU (a driver holding a CPU deadlocks Ray Train on small machines). "
        f"Start the head with them, e.g. ray start --head --resources='{{\"{TRAIN_DRIVER}\": {want}}}' "
        "(one per concurrent trial)"
    )


def _check_cluster(cfg: SweepConfig, exp: Any) -> None:
    """Refuse a cluster where no trial driver can start; warn where concurrency is capped."""
    import ray

    res = ray.cluster_resources()
    slots = float(res.get(TRAIN_DRIVER, 0.0))
    if slots < 1:
        raise SweepError(_driver_slots_message(slots, cfg.max_concurrent_trials))
    if slots < cfg.max_concurrent_trials:
        warnings.warn(
            f"max_concurrent_trials={cfg.max_concurrent_trials} but only {slots:g} {TRAIN_DRIVER} slots: "
            f"at most {int(slots)} trials run at once",
            stacklevel=3,
        )
    key, need = ("GPU", exp.train.num_workers) if exp.train.use_gpu else ("CPU", exp.train.num_workers)
    if float(res.get(key, 0.0)) < need:
        warnings.warn(
            f"a trial needs {need} {key}s (train.num_workers) but the cluster has {res.get(key, 0):g}; "
            "trials wait until an autoscaler adds them",
            stacklevel=3,
        )


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def _trial_driver(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: train the fixed experiment with the trial's sampled overrides
    (``config``: dotted key -> value) through ``run_training``, a child MLflow run of the
    sweep, with every epoch's report forwarded to Tune."""
    import ray.tune

    from talkmesh.ops._sweep_ray import EpochTuneReportCallback, PlacementGroupRecorder
    from talkmesh.train.config import ExperimentConfig
    from talkmesh.train.runner import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{setup['sweep']}-{trial_id}"
    exp = from_dict(ExperimentConfig, apply_overrides(setup["experiment"], config))
    run_training(
        exp,
        run_name=run_name,
        parent_run_id=setup["parent_run_id"],
        tags={"talkmesh.sweep": setup["sweep"], "talkmesh.trial_id": trial_id},
        tracking_uri=setup["tracking_uri"],
        callbacks=[
            EpochTuneReportCallback(),
            PlacementGroupRecorder(str(Path(setup["pg_dir"]) / f"{run_name}.txt")),
        ],
    )


def _search_alg(cfg: SweepConfig) -> Any:
    if cfg.search.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.search.seed)


def _scheduler(cfg: SweepConfig) -> Any:
    if cfg.scheduler.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def _sweep_name(cfg: SweepConfig, name: str | None) -> str:
    from talkmesh.train.config import RUN_NAME
    from talkmesh.train.runner import default_run_name

    out = name or cfg.name or default_run_name(cfg.method)
    if not RUN_NAME.fullmatch(out):
        raise ConfigError(f"name: {out!r} must be letters, digits, '.', '_' or '-' (not starting with '.')")
    return out


def _pin_corpus(exp: Any) -> Any:
    """The synthetic corpus generated once here and pinned by path, so trial processes
    (whose environment may differ from this one's) read the same data."""
    from talkmesh.config import replace
    from talkmesh.data import open_corpus

    if exp.data.format == "synthetic" and not exp.data.root:
        return replace(exp, {"data.root": str(open_corpus(exp.data).root)})
    return exp


def _summaries(grid: Any, cfg: SweepConfig, exp: Any, name: str, train_dir: Path, uri: str) -> list[TrialSummary]:
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import list_checkpoints, select_checkpoint
    from talkmesh.train.config import ExperimentConfig

    out: list[TrialSummary] = []
    for i in range(len(grid)):
        r = grid[i]
        metrics = r.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(r.path).name.removeprefix("trial-"))
        epochs_done = int(metrics["epoch"]) + 1 if isinstance(metrics.get("epoch"), (int, float)) else 0
        planned = from_dict(ExperimentConfig, apply_overrides(to_dict(exp), dict(r.config or {}))).schedule().epochs
        run_name = f"{name}-{trial_id}"
        cks = list_checkpoints(train_dir / run_name)
        sel = select_checkpoint(cks, cfg.metric, cfg.mode, exp.train.select)
        value = None if sel is None else sel.metrics.get(cfg.metric)
        ok = isinstance(value, (int, float)) and math.isfinite(float(value))
        out.append(
            TrialSummary(
                trial_id=trial_id,
                run_name=run_name,
                run_id=tracking.find_run(exp.experiment_name, run_name, uri=uri),
                status="",
                params={k: r.config.get(k) for k in cfg.space},
                epochs=epochs_done,
                planned_epochs=planned,
                checkpoint=None if sel is None else str(sel.path),
                metric=float(value) if ok else None,
                metrics=dict(sel.metrics) if sel is not None else {},
                error=None if r.error is None else f"{type(r.error).__name__}: {r.error}",
            )
        )
    return out


def _close_trial_runs(trials: Sequence[TrialSummary], parent_run_id: str, uri: str) -> None:
    """Close the MLflow runs of trials the scheduler stopped: KILLED when stopped before their
    last epoch, FINISHED when the stop came with the last epoch's report; the selected
    checkpoint is tagged as ``run_training`` would have. Such a run is still RUNNING (the
    kill landed before ``run_training`` ended it) or FAILED (the stop broke the Train run
    first: Tune reported no error for the trial, so the stop, not training, ended it)."""
    from talkmesh.ops import tracking

    status = {c["run_id"]: c["status"] for c in tracking.child_runs(parent_run_id, uri=uri)}
    for t in trials:
        current = status.get(t.run_id) if t.run_id else None
        if not (current == "RUNNING" or (current == "FAILED" and t.error is None)):
            continue
        tags: dict[str, Any] = {"talkmesh.stopped_after_epochs": t.epochs}
        if t.checkpoint:
            tags["talkmesh.selected_checkpoint"] = t.checkpoint
            tags["talkmesh.selected_epoch"] = t.metrics.get("epoch", "")
        tracking.set_tags(t.run_id, tags, uri=uri)
        tracking.end_run(t.run_id, "FINISHED" if t.epochs >= t.planned_epochs else "KILLED", uri=uri)


def _close_children(parent_run_id: str, uri: str) -> int:
    """Mark every child run still RUNNING KILLED (what no trial summary accounts for)."""
    from talkmesh.ops import tracking

    n = 0
    for child in tracking.child_runs(parent_run_id, uri=uri):
        if child["status"] == "RUNNING":
            tracking.end_run(child["run_id"], "KILLED", uri=uri)
            n += 1
    return n


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _write_table(path: Path, cfg: SweepConfig, trials: Sequence[TrialSummary]) -> Path:
    """``sweep_results.csv``: one row per trial (sampled params, metric, status, run id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(cfg.space)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "epochs", cfg.metric, *keys, "checkpoint", "run_id", "error"])
        for t in trials:
            w.writerow(
                [
                    t.trial_id,
                    t.status,
                    t.epochs,
                    "" if t.metric is None else repr(t.metric),
                    *(json.dumps(t.params.get(k)) for k in keys),
                    t.checkpoint or "",
                    t.run_id or "",
                    t.error or "",
                ]
            )
    return path


class SweepError(RuntimeError):
    """The sweep cannot run (cluster set-up) or produced nothing to register."""


def run_sweep(
    cfg: SweepConfig,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    register: bool = True,
) -> SweepResult:
    """Run the sweep ``cfg`` (see the module docstring) and return what it left behind.

    Uses the Ray this process is connected to, else attaches to ``RAY_ADDRESS`` (``ray job
    submit``), else starts a loopback-only local Ray with ``max_concurrent_trials``
    ``TRAIN_DRIVER`` slots (shut down at the end). ``name`` overrides ``cfg.name``.
    ``register=False`` skips registering the best checkpoint.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    import ray
    from ray import tune

    from talkmesh.config import replace
    from talkmesh.ops import tracking
    from talkmesh.ops.jobs import connect_ray
    from talkmesh.train.runner import submission_id

    t0 = time.perf_counter()
    exp = cfg.validate()
    sweep_name = _sweep_name(cfg, name)
    uri = tracking_uri or tracking.tracking_uri()
    sweeps_root = Path(exp.train.storage_path).expanduser().resolve() / "sweeps"
    sweep_dir = sweeps_root / sweep_name
    train_dir = sweep_dir / "train"
    exp = _pin_corpus(replace(exp, {"train.storage_path": str(train_dir)}))

    started = False
    if not ray.is_initialized():
        started = connect_ray(exp.train.num_workers, {TRAIN_DRIVER: cfg.max_concurrent_trials})
    try:
        _check_cluster(cfg, exp)
        commit, dirty = tracking.git_commit()
        tags: dict[str, Any] = {
            "talkmesh.method": cfg.method,
            "talkmesh.sweep": sweep_name,
            "talkmesh.run_kind": "sweep",
            "talkmesh.sweep_dir": str(sweep_dir),
        }
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["talkmesh.git_dirty"] = dirty
        sid = submission_id()
        if sid:
            tags["ray.job_submission_id"] = sid
        parent_id = tracking.start_run(
            exp.experiment_name, f"sweep-{sweep_name}", params=cfg.params(), tags=tags, uri=uri
        )
        try:
            return _run(cfg, exp, sweep_name, sweep_dir, train_dir, parent_id, uri, register, t0, tune)
        except BaseException as e:
            _close_children(parent_id, uri)
            tracking.end_run(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", uri=uri)
            raise
    finally:
        if started:
            ray.shutdown()


def _run(
    cfg: SweepConfig,
    exp: Any,
    sweep_name: str,
    sweep_dir: Path,
    train_dir: Path,
    parent_id: str,
    uri: str,
    register: bool,
    t0: float,
    tune: Any,
) -> SweepResult:
    """Tuner.fit, then close stopped trials' runs, summarise, log to the parent, register."""
    from talkmesh.ops import tracking
    from talkmesh.ops._sweep_ray import PlacementGroupReaper

    pg_dir = sweep_dir / "placement_groups"
    setup = {
        "experiment": to_dict(exp),
        "sweep": sweep_name,
        "parent_run_id": parent_id,
        "tracking_uri": uri,
        "pg_dir": str(pg_dir),
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_driver, setup=setup), {TRAIN_DRIVER: 1})
    resumed = bool(tune.Tuner.can_restore(str(sweep_dir)))
    if resumed:
        print(f"[talkmesh] sweep {sweep_name}: restoring {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: dist.tune_domain() for key, dist in cfg.space.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                search_alg=_search_alg(cfg),
                scheduler=_scheduler(cfg),
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=str(sweep_dir.parent),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=[PlacementGroupReaper(str(pg_dir), sweep_name)],
            ),
        )
    grid = tuner.fit()

    # Trials ASHA stopped were killed mid-run: their child runs are still RUNNING.
    trials = _summaries(grid, cfg, exp, sweep_name, train_dir, uri)
    _close_trial_runs(trials, parent_id, uri)
    _close_children(parent_id, uri)
    status = {c["run_id"]: c["status"] for c in tracking.child_runs(parent_id, uri=uri)}
    for t in trials:
        t.status = status.get(t.run_id, "UNKNOWN") if t.run_id else ("FAILED" if t.error else "NOT_STARTED")
    table = _write_table(sweep_dir / "sweep_results.csv", cfg, trials)
    tracking.log_artifacts(parent_id, table, uri=uri)

    scored = [t for t in trials if t.metric is not None and t.checkpoint and t.run_id]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "none reported"
        raise SweepError(f"sweep {sweep_name}: no trial left a checkpoint with {cfg.metric} (errors: {errors})")
    pick = min if cfg.mode == "min" else max
    best = pick(scored, key=lambda t: t.metric)
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    tracking.set_tags(
        parent_id,
        {
            "talkmesh.best_trial": best.trial_id,
            "talkmesh.best_run_id": best.run_id,
            "talkmesh.best_checkpoint": best.checkpoint,
        },
        uri=uri,
    )
    tracking.log_params(parent_id, {f"best.{k}": v for k, v in best.params.items()}, uri=uri)
    tracking.log_metrics(
        parent_id,
        {
            **_numeric(best.metrics),
            "sweep/trials": len(trials),
            "sweep/finished": counts["FINISHED"],
            "sweep/stopped_early": counts["KILLED"],
            "sweep/failed": counts["FAILED"],
        },
        uri=uri,
    )

    version: int | None = None
    promoted = False
    if register:
        version, promoted = _register_best(cfg, best, sweep_dir, uri)
        tracking.set_tags(parent_id, {_TAG_REGISTERED: version, "talkmesh.promoted": promoted}, uri=uri)
    champion = tracking.get_alias_version(cfg.method, "champion", uri=uri)
    wall = time.perf_counter() - t0
    tracking.log_metrics(parent_id, {"time/sweep_s": wall}, uri=uri)
    tracking.end_run(parent_id, "FINISHED", uri=uri)
    return SweepResult(
        name=sweep_name,
        experiment=exp.experiment_name,
        parent_run_id=parent_id,
        tracking_uri=uri,
        sweep_dir=str(sweep_dir),
        metric=cfg.metric,
        mode=cfg.mode,
        trials=trials,
        best=best,
        version=version,
        promoted=promoted,
        champion=champion,
        resumed=resumed,
        wall_s=wall,
    )


def _register_best(cfg: SweepConfig, best: TrialSummary, sweep_dir: Path, uri: str) -> tuple[int, bool]:
    """Register the best checkpoint (once per sweep: a resumed sweep with the same best
    reuses the version) and move ``@champion`` to it only when it beats the champion."""
    from talkmesh.ops import tracking

    marker = sweep_dir / "registered.json"
    version: int | None = None
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("checkpoint") == best.checkpoint and done.get("tracking_uri") == uri:
            version = int(done["version"])
    if version is None:
        assert best.run_id is not None and best.checkpoint is not None
        version = tracking.register_model(
            cfg.method, best.run_id, method_dir=best.checkpoint, metrics=_numeric(best.metrics), uri=uri
        )
        marker.write_text(json.dumps({"checkpoint": best.checkpoint, "version": version, "tracking_uri": uri}))
    promoted = tracking.promote_if_better(cfg.method, version, cfg.metric, cfg.mode, uri=uri)
    return version, promoted


# --------------------------------------------------------------------------------------
# Entry point (sweeps/run.py, `talkmesh sweep`)
# --------------------------------------------------------------------------------------


def format_summary(result: SweepResult) -> str:
    """A plain-text report of a finished sweep."""
    keys = list(result.trials[0].params) if result.trials else []
    lines = [f"== sweep {result.name}: {len(result.trials)} trials, {result.metric} ({result.mode})"]
    lines.append(f"{'trial':<16} {'status':<9} {'epochs':>6} {result.metric:>12}  " + "  ".join(keys))
    for t in sorted(result.trials, key=lambda t: (t.metric is None, t.metric if t.metric is not None else 0.0)):
        value = "-" if t.metric is None else f"{t.metric:.4e}"
        params = "  ".join(
            f"{t.params.get(k)!r:>{len(k)}}"
            if not isinstance(t.params.get(k), float)
            else f"{t.params[k]:>{len(k)}.4g}"
            for k in keys
        )
        mark = " *" if result.best is not None and t.trial_id == result.best.trial_id else ""
        lines.append(f"{t.trial_id:<16} {t.status:<9} {t.epochs:>6} {value:>12}  {params}{mark}")
    if result.best is not None:
        lines.append(f"best           {result.best.trial_id} ({result.best.checkpoint})")
    if result.version is not None:
        outcome = "promoted to @champion" if result.promoted else f"@champion stays version {result.champion}"
        lines.append(
            f"registered     talkmesh-{result.experiment.removeprefix('talkmesh-')} version {result.version}: {outcome}"
        )
    lines.append(f"MLflow parent  {result.parent_run_id}  (experiment {result.experiment})")
    lines.append(f"tracking URI   {result.tracking_uri}")
    lines.append(f"sweep dir      {result.sweep_dir}  (sweep_results.csv, train/<run>/epoch-NNNN/)")
    lines.append(f"wall time      {result.wall_s:.1f} s" + ("  (restored)" if result.resumed else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "sweeps/run.py") -> int:
    """``sweeps/run.py CONFIG [--num-samples N] [--name NAME] [--no-register] [key=value ...]``;
    trailing ``key=value`` are fixed overrides of every trial. User errors exit 2."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    from talkmesh.data.errors import DataError

    p = argparse.ArgumentParser(prog=prog, description="Run a Ray Tune sweep (ASHA + Optuna) over dotted overrides.")
    p.add_argument("config", help="sweep YAML, e.g. sweeps/faceformer.yaml")
    p.add_argument("--num-samples", type=int, default=None, help="trials (replaces num_samples)")
    p.add_argument("--name", default=None, help="sweep name; an existing sweep of that name is resumed")
    p.add_argument("--no-register", action="store_true", help="do not register the best checkpoint")
    p.add_argument("overrides", nargs="*", help="fixed overrides of every trial, e.g. train.epochs=2")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_sweep(args.config, args.overrides, num_samples=args.num_samples, name=args.name)
        result = run_sweep(cfg, register=not args.no_register)
    except (ConfigError, DataError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0
