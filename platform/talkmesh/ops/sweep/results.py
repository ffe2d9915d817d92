"""What a finished sweep left behind, read from Tune's ``ResultGrid``: one summary per trial,
the best trial, the closing of stopped trials' MLflow runs, the results table and report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from talkmesh.config import apply_overrides, from_dict, to_dict
from talkmesh.ops import tracking
from talkmesh.ops.sweep.config import EPOCHS_DONE, SweepConfig
from talkmesh.train.config import ExperimentConfig

__all__ = [
    "SweepError",
    "SweepResult",
    "TrialSummary",
    "best_trial",
    "close_children",
    "close_trial_runs",
    "format_summary",
    "trial_dirname",
    "trial_summaries",
    "write_table",
]


class SweepError(RuntimeError):
    """The sweep cannot run (cluster set-up) or produced nothing to register."""


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


def trial_dirname(trial: Any) -> str:
    """``trial-<trial id>``: the Tuner's ``trial_dirname_creator`` (a trial's directory)."""
    return f"trial-{trial.trial_id}"


def _trial_id(result: Any) -> str:
    return Path(result.path).name.removeprefix("trial-")  # see trial_dirname


def _selected_checkpoint(result: Any, metric: str, mode: str, which: str) -> Any:
    """The trial's checkpoint chosen by ``train.select`` among those Tune saw reported
    (``Result.metrics_dataframe`` rows carry Train's ``checkpoint_path``); None when there is
    none or Train has since deleted it."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from talkmesh.train.checkpoint import CheckpointInfo, select_checkpoint

    df = result.metrics_dataframe
    if df is None or CHECKPOINT_PATH_KEY not in df:
        return None
    reported = [  # in report order (the index breaks ties: the later wins, as for epochs)
        CheckpointInfo(i, Path(row[CHECKPOINT_PATH_KEY]), row)
        for i, row in enumerate(df.to_dict("records"))
        if isinstance(row.get(CHECKPOINT_PATH_KEY), str)
    ]
    sel = select_checkpoint(reported, metric, mode, which)
    return sel if sel is not None and sel.path.is_dir() else None


def _summary(result: Any, cfg: SweepConfig, exp: ExperimentConfig, sweep_name: str, uri: str) -> TrialSummary:
    from talkmesh.train.checkpoint import read_metrics

    trial_id, last, config = _trial_id(result), result.metrics or {}, dict(result.config or {})
    run_name = f"{sweep_name}-{trial_id}"
    sel = _selected_checkpoint(result, cfg.metric, cfg.mode, exp.train.select)
    metrics = read_metrics(sel.path) if sel is not None else {}
    value = metrics.get(cfg.metric)
    finite = isinstance(value, (int, float)) and math.isfinite(float(value))
    error = result.error
    return TrialSummary(
        trial_id=trial_id,
        run_name=run_name,
        run_id=tracking.find_run(exp.experiment_name, run_name, uri=uri),
        status="",
        params={k: config.get(k) for k in cfg.space},
        epochs=int(last[EPOCHS_DONE]) if isinstance(last.get(EPOCHS_DONE), (int, float)) else 0,
        planned_epochs=from_dict(ExperimentConfig, apply_overrides(to_dict(exp), config)).schedule().epochs,
        checkpoint=None if sel is None else str(sel.path),
        metric=float(value) if finite else None,
        metrics=metrics,
        error=None if error is None else f"{type(error).__name__}: {error}",
    )


def trial_summaries(grid: Any, cfg: SweepConfig, exp: ExperimentConfig, name: str, uri: str) -> list[TrialSummary]:
    """One :class:`TrialSummary` per trial of the ``ResultGrid`` (status still empty)."""
    return [_summary(result, cfg, exp, name, uri) for result in grid]


def best_trial(grid: Any, trials: Sequence[TrialSummary], cfg: SweepConfig, select: str) -> TrialSummary:
    """The trial ``ResultGrid.get_best_result`` picks on the sweep metric (over every report
    for ``train.select=best``, the last one for ``last``), if it left a checkpoint and a run."""
    try:
        result = grid.get_best_result(cfg.metric, cfg.mode, scope="all" if select == "best" else "last")
    except RuntimeError:  # no trial reported the metric
        result = None
    best = next((t for t in trials if result is not None and t.trial_id == _trial_id(result)), None)
    if best is None or best.metric is None or not best.checkpoint or not best.run_id:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "none reported"
        raise SweepError(f"no trial left a checkpoint with {cfg.metric} (errors: {errors})")
    return best


def close_trial_runs(trials: Sequence[TrialSummary], parent_run_id: str, uri: str) -> None:
    """Close the MLflow runs of trials the scheduler stopped: KILLED when stopped before their
    last epoch, FINISHED when the stop came with the last epoch's report; the selected
    checkpoint is tagged as ``run_training`` would have. Such a run is still RUNNING (the
    kill landed before ``run_training`` ended it) or FAILED (the stop broke the Train run
    first: Tune reported no error for the trial, so the stop, not training, ended it)."""
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


def close_children(parent_run_id: str, uri: str) -> int:
    """Mark every child run still RUNNING KILLED (what no trial summary accounts for)."""
    running = [c["run_id"] for c in tracking.child_runs(parent_run_id, uri=uri) if c["status"] == "RUNNING"]
    for run_id in running:
        tracking.end_run(run_id, "KILLED", uri=uri)
    return len(running)


def write_table(path: Path, cfg: SweepConfig, trials: Sequence[TrialSummary]) -> Path:
    """``sweep_results.csv``: one row per trial (sampled params as JSON, metric, status, run id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "epochs", cfg.metric, *cfg.space, "checkpoint", "run_id", "error"])
        for t in trials:
            params = [json.dumps(t.params.get(k)) for k in cfg.space]
            ids = [t.checkpoint or "", t.run_id or "", t.error or ""]
            w.writerow([t.trial_id, t.status, t.epochs, "" if t.metric is None else repr(t.metric), *params, *ids])
    return path


def _trial_line(t: TrialSummary, keys: Sequence[str], best: TrialSummary | None) -> str:
    value = "-" if t.metric is None else f"{t.metric:.4e}"
    params = "  ".join(
        f"{t.params[k]:>{len(k)}.4g}" if isinstance(t.params.get(k), float) else f"{t.params.get(k)!r:>{len(k)}}"
        for k in keys
    )
    mark = " *" if best is not None and t.trial_id == best.trial_id else ""
    return f"{t.trial_id:<16} {t.status:<9} {t.epochs:>6} {value:>12}  {params}{mark}"


def format_summary(result: SweepResult) -> str:
    """A plain-text report of a finished sweep."""
    keys = list(result.trials[0].params) if result.trials else []
    lines = [f"== sweep {result.name}: {len(result.trials)} trials, {result.metric} ({result.mode})"]
    lines.append(f"{'trial':<16} {'status':<9} {'epochs':>6} {result.metric:>12}  " + "  ".join(keys))
    ranked = sorted(result.trials, key=lambda t: (t.metric is None, t.metric if t.metric is not None else 0.0))
    lines += [_trial_line(t, keys, result.best) for t in ranked]
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
