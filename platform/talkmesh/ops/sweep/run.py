"""Running a sweep: the Tuner (ASHA, Optuna) around one Ray Train run per trial, the MLflow
parent run, registration of the best checkpoint, and the command line. Ray is imported
where used (the Ray callbacks module too), so importing this module starts nothing."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from talkmesh.config import ConfigError, apply_overrides, from_dict, replace, to_dict
from talkmesh.ops import tracking
from talkmesh.ops.jobs import connect_ray
from talkmesh.ops.sweep.config import EPOCHS_DONE, TRAIN_DRIVER, Distribution, SweepConfig, check_name, load_sweep
from talkmesh.ops.sweep.results import (
    SweepError,
    SweepResult,
    TrialSummary,
    best_trial,
    close_children,
    close_trial_runs,
    format_summary,
    trial_dirname,
    trial_summaries,
    write_table,
)
from talkmesh.train.config import ExperimentConfig

__all__ = ["check_cluster", "main", "run_sweep", "tune_domain"]


# How often Tune saves the experiment state (trial statuses, searcher) while a sweep runs,
# unless TUNE_GLOBAL_CHECKPOINT_S is set. Tune's "auto" saves at most every 10 s, so a driver
# killed within 10 s of a trial's end would restore that trial as unfinished and start it again.
STATE_SAVE_PERIOD_S = 1.0


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """One sweep being run: its definition, fixed trial experiment, name and places."""

    cfg: SweepConfig
    exp: ExperimentConfig  # train.storage_path = <sweep_dir>/train, the corpus pinned
    name: str
    uri: str
    sweep_dir: Path  # Tune state (<train.storage_path>/sweeps/<name>), train/, sweep_results.csv


def check_cluster(cfg: SweepConfig, exp: ExperimentConfig) -> None:
    """Refuse a cluster where no trial driver can start (the error says how to start one);
    warn where concurrency is capped or a trial's workers do not fit yet."""
    import ray

    res = ray.cluster_resources()
    slots = float(res.get(TRAIN_DRIVER, 0.0))
    if slots < 1:
        fix = json.dumps({TRAIN_DRIVER: cfg.max_concurrent_trials})
        raise SweepError(
            f"the Ray cluster offers {slots:g} {TRAIN_DRIVER} slots; each sweep trial driver holds one "
            f"{TRAIN_DRIVER} instead of a CPU (a driver holding a CPU deadlocks Ray Train on small machines). "
            f"Start the head with them, e.g. ray start --head --resources='{fix}' (one per concurrent trial)"
        )
    if slots < cfg.max_concurrent_trials:
        warnings.warn(
            f"max_concurrent_trials={cfg.max_concurrent_trials} but only {slots:g} {TRAIN_DRIVER} slots: "
            f"at most {int(slots)} trials run at once",
            stacklevel=2,
        )
    key, need = ("GPU" if exp.train.use_gpu else "CPU"), exp.train.num_workers
    if float(res.get(key, 0.0)) < need:
        warnings.warn(
            f"a trial needs {need} {key}s (train.num_workers) but the cluster has {res.get(key, 0):g}; "
            "trials wait until an autoscaler adds them",
            stacklevel=2,
        )


def _trial_driver(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: train the fixed experiment with the trial's sampled overrides
    (``config``: dotted key -> value) through ``run_training``, a child MLflow run of the
    sweep, with every epoch's report forwarded to Tune."""
    import ray.tune

    from talkmesh.ops.sweep.callbacks import EpochTuneReportCallback, PlacementGroupRecorder
    from talkmesh.train.runner import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{setup['sweep']}-{trial_id}"
    callbacks: list[Any] = [EpochTuneReportCallback()]
    if setup["pg_dir"]:
        callbacks.append(PlacementGroupRecorder(str(Path(setup["pg_dir"]) / f"{run_name}.txt")))
    run_training(
        from_dict(ExperimentConfig, apply_overrides(setup["experiment"], config)),
        run_name=run_name,
        parent_run_id=setup["parent_run_id"],
        tags={"talkmesh.sweep": setup["sweep"], "talkmesh.trial_id": trial_id},
        tracking_uri=setup["tracking_uri"],
        callbacks=callbacks,
    )


def tune_domain(dist: Distribution) -> Any:
    """The Ray Tune domain of a search dimension (``tune.choice`` / ``uniform`` / ``loguniform``)."""
    from ray import tune

    if dist.type == "choice":
        return tune.choice(list(dist.values))
    return (tune.uniform if dist.type == "uniform" else tune.loguniform)(dist.low, dist.high)


def _tune_config(cfg: SweepConfig) -> Any:
    """``TuneConfig``: metric/mode, OptunaSearch or seeded random search (both capped at
    ``max_concurrent_trials``), ASHA over ``epochs_done``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(metric=cfg.metric, mode=cfg.mode, seed=cfg.search.seed)
    else:  # a SearchGenerator: Tune ignores TuneConfig.max_concurrent_trials for it, so it limits itself
        search = BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=cfg.max_concurrent_trials)
    s = cfg.scheduler
    asha = {"time_attr": EPOCHS_DONE, "max_t": s.max_t, "grace_period": s.grace_period}
    return tune.TuneConfig(
        metric=cfg.metric,
        mode=cfg.mode,
        search_alg=search,
        scheduler=None if s.type == "fifo" else ASHAScheduler(**asha, reduction_factor=s.reduction_factor),
        num_samples=cfg.num_samples,
        max_concurrent_trials=cfg.max_concurrent_trials if cfg.search.type == "optuna" else None,
        trial_dirname_creator=trial_dirname,
    )


def _tuner(s: _Sweep, parent_id: str) -> tuple[Any, bool]:
    """The sweep's ``Tuner`` and whether it was restored (``Tuner.can_restore``/``restore``)."""
    from ray import tune

    from talkmesh.ops.sweep.callbacks import PlacementGroupReaper, placement_group_workaround_needed

    pg_dir = s.sweep_dir / "placement_groups" if placement_group_workaround_needed() else None
    setup = {
        "experiment": to_dict(s.exp),
        "sweep": s.name,
        "parent_run_id": parent_id,
        "tracking_uri": s.uri,
        "pg_dir": str(pg_dir) if pg_dir else "",
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_driver, setup=setup), {TRAIN_DRIVER: 1})
    if tune.Tuner.can_restore(str(s.sweep_dir)):
        print(f"[talkmesh] sweep {s.name}: restoring {s.sweep_dir}", flush=True)
        return tune.Tuner.restore(str(s.sweep_dir), trainable, resume_unfinished=True, resume_errored=True), True
    run_config = tune.RunConfig(
        name=s.name,
        storage_path=str(s.sweep_dir.parent),
        failure_config=tune.FailureConfig(max_failures=s.cfg.max_failures),
        callbacks=[PlacementGroupReaper(str(pg_dir), s.name)] if pg_dir else None,
    )
    space = {key: tune_domain(dist) for key, dist in s.cfg.space.items()}
    return tune.Tuner(trainable, param_space=space, tune_config=_tune_config(s.cfg), run_config=run_config), False


def _prepare(cfg: SweepConfig, name: str | None, tracking_uri: str | None) -> _Sweep:
    """Validate, name the sweep, place it, and pin a synthetic corpus by path (generated once
    here, so trial processes, whose environment may differ, read the same data)."""
    from talkmesh.data import open_corpus
    from talkmesh.train.runner import default_run_name

    exp = cfg.validate()
    sweep_name = check_name(name or cfg.name or default_run_name(cfg.method))
    sweep_dir = Path(exp.train.storage_path).expanduser().resolve() / "sweeps" / sweep_name
    exp = replace(exp, {"train.storage_path": str(sweep_dir / "train")})
    if exp.data.format == "synthetic" and not exp.data.root:
        exp = replace(exp, {"data.root": str(open_corpus(exp.data).root)})
    return _Sweep(cfg, exp, sweep_name, tracking_uri or tracking.tracking_uri(), sweep_dir)


def _open_parent(s: _Sweep) -> str:
    """Start (or, for a sweep of the same name, reopen) the parent run ``sweep-<name>``."""
    from talkmesh.train.runner import submission_id

    tags: dict[str, Any] = {
        "talkmesh.method": s.cfg.method,
        "talkmesh.sweep": s.name,
        "talkmesh.run_kind": "sweep",
        "talkmesh.sweep_dir": str(s.sweep_dir),
    }
    commit, dirty = tracking.git_commit()
    if commit:
        tags.update({"mlflow.source.git.commit": commit, "talkmesh.git_dirty": dirty})
    if sid := submission_id():
        tags["ray.job_submission_id"] = sid
    return tracking.start_run(s.exp.experiment_name, f"sweep-{s.name}", params=s.cfg.params(), tags=tags, uri=s.uri)


def run_sweep(
    cfg: SweepConfig,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    register: bool = True,
) -> SweepResult:
    """Run the sweep ``cfg`` (see :mod:`talkmesh.ops.sweep`) and return what it left behind.

    Uses the Ray this process is connected to, else attaches to ``RAY_ADDRESS`` (``ray job
    submit``), else starts a loopback-only local Ray with ``max_concurrent_trials``
    ``TRAIN_DRIVER`` slots (shut down at the end). ``name`` overrides ``cfg.name``.
    ``register=False`` skips registering the best checkpoint.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    import ray

    t0 = time.perf_counter()
    s = _prepare(cfg, name, tracking_uri)
    started = False
    if not ray.is_initialized():
        started = connect_ray(s.exp.train.num_workers, {TRAIN_DRIVER: cfg.max_concurrent_trials})
    try:
        check_cluster(cfg, s.exp)
        parent_id = _open_parent(s)
        try:
            return _run(s, parent_id, register, t0)
        except BaseException as e:
            close_children(parent_id, s.uri)
            tracking.end_run(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", uri=s.uri)
            raise
    finally:
        if started:
            ray.shutdown()


def _collect(grid: Any, s: _Sweep, parent_id: str) -> list[TrialSummary]:
    """Trial summaries; runs of trials ASHA stopped (killed mid-run, still RUNNING) closed;
    each trial's final MLflow status; ``sweep_results.csv`` logged on the parent."""
    trials = trial_summaries(grid, s.cfg, s.exp, s.name, s.uri)
    close_trial_runs(trials, parent_id, s.uri)
    close_children(parent_id, s.uri)
    status = {c["run_id"]: c["status"] for c in tracking.child_runs(parent_id, uri=s.uri)}
    for t in trials:
        t.status = status.get(t.run_id, "UNKNOWN") if t.run_id else ("FAILED" if t.error else "NOT_STARTED")
    tracking.log_artifacts(parent_id, write_table(s.sweep_dir / "sweep_results.csv", s.cfg, trials), uri=s.uri)
    return trials


def _log_best(s: _Sweep, parent_id: str, trials: Sequence[TrialSummary], best: TrialSummary) -> None:
    """The best trial's ids, params (``best.<key>``) and checkpoint metrics, and trial counts, on the parent."""
    tags = {"talkmesh.best_trial": best.trial_id, "talkmesh.best_run_id": best.run_id}
    tracking.set_tags(parent_id, {**tags, "talkmesh.best_checkpoint": best.checkpoint}, uri=s.uri)
    tracking.log_params(parent_id, {f"best.{k}": v for k, v in best.params.items()}, uri=s.uri)
    counts = {st: sum(t.status == st for t in trials) for st in ("FINISHED", "KILLED", "FAILED")}
    counted = {"sweep/finished": counts["FINISHED"], "sweep/stopped_early": counts["KILLED"]}
    counted.update({"sweep/trials": len(trials), "sweep/failed": counts["FAILED"]})
    tracking.log_metrics(parent_id, {**best.metrics, **counted}, uri=s.uri)


@contextlib.contextmanager
def _state_saved_every(seconds: float) -> Iterator[None]:
    """``TUNE_GLOBAL_CHECKPOINT_S`` = ``seconds`` (read when ``Tuner.fit`` starts its controller)
    unless the user set it; the environment is restored afterwards."""
    key = "TUNE_GLOBAL_CHECKPOINT_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _run(s: _Sweep, parent_id: str, register: bool, t0: float) -> SweepResult:
    """Tuner.fit, then close stopped trials' runs, summarise, log to the parent, register."""
    tuner, resumed = _tuner(s, parent_id)
    with _state_saved_every(STATE_SAVE_PERIOD_S):
        grid = tuner.fit()
    trials = _collect(grid, s, parent_id)
    try:
        best = best_trial(grid, trials, s.cfg, s.exp.train.select)
    except SweepError as e:
        raise SweepError(f"sweep {s.name}: {e}") from None
    _log_best(s, parent_id, trials, best)
    version, promoted = _register_best(s, best) if register else (None, False)
    if register:
        tracking.set_tags(parent_id, {"talkmesh.registered_version": version, "talkmesh.promoted": promoted}, uri=s.uri)
    champion = tracking.get_alias_version(s.cfg.method, "champion", uri=s.uri)
    wall = time.perf_counter() - t0
    tracking.log_metrics(parent_id, {"time/sweep_s": wall}, uri=s.uri)
    tracking.end_run(parent_id, "FINISHED", uri=s.uri)
    return SweepResult(
        name=s.name,
        experiment=s.exp.experiment_name,
        parent_run_id=parent_id,
        tracking_uri=s.uri,
        sweep_dir=str(s.sweep_dir),
        metric=s.cfg.metric,
        mode=s.cfg.mode,
        trials=trials,
        best=best,
        version=version,
        promoted=promoted,
        champion=champion,
        resumed=resumed,
        wall_s=wall,
    )


def _register_best(s: _Sweep, best: TrialSummary) -> tuple[int, bool]:
    """Register the best checkpoint (once per sweep: a resumed sweep with the same best
    reuses the version) and move ``@champion`` to it only when it beats the champion."""
    marker = s.sweep_dir / "registered.json"
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("checkpoint") == best.checkpoint and done.get("tracking_uri") == s.uri:
        version = int(done["version"])
    else:
        assert best.run_id is not None and best.checkpoint is not None
        version = tracking.register_model(
            s.cfg.method, best.run_id, method_dir=best.checkpoint, metrics=best.metrics, uri=s.uri
        )
        marker.write_text(json.dumps({"checkpoint": best.checkpoint, "version": version, "tracking_uri": s.uri}))
    return version, tracking.promote_if_better(s.cfg.method, version, s.cfg.metric, s.cfg.mode, uri=s.uri)


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
    except (ConfigError, DataError, SweepError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, SweepError) else 2
    print(format_summary(result))
    return 0
