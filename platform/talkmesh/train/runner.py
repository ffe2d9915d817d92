"""Driver side of a training run: MLflow run, ``TorchTrainer.fit()``, the chosen checkpoint.

    result = run_training(load_experiment("configs/faceformer/small.yaml"))
    result.selected_checkpoint   # epoch-NNNN/ (method.json, model.pt, trainer.pt, metrics.json)
    result.mlflow_run_id

``train.num_workers=0`` runs the loop in-process (Ray Train local mode: no cluster);
``N >= 1`` needs a Ray cluster (``ray.init`` is the caller's business, see
:mod:`talkmesh.ops.jobs`). Running again with the same ``run_name`` (and storage path)
resumes from the latest checkpoint, and continues the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talkmesh.config import flatten, to_dict
from talkmesh.train.checkpoint import CheckpointInfo, list_checkpoints, load_method, select_checkpoint
from talkmesh.train.config import RUN_NAME, ExperimentConfig

if TYPE_CHECKING:  # pragma: no cover
    from ray.train import UserCallback
    from ray.train.torch import TorchTrainer

    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import MotionMethod

HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by the controller (propagated by Ray)

__all__ = ["RunResult", "default_run_name", "make_preview", "run_training", "submission_id"]


@dataclasses.dataclass
class RunResult:
    """What a finished training run left behind."""

    run_name: str
    run_dir: str  # <storage_path>/<run_name>: Ray Train's run directory with epoch-NNNN/ checkpoints
    mlflow_run_id: str
    experiment: str
    tracking_uri: str
    best_checkpoint: str | None  # best by train.checkpoint_metric
    last_checkpoint: str | None
    selected_checkpoint: str | None  # train.select: the one to evaluate and register
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]
    selected_metrics: dict[str, Any]
    epochs: int  # epochs completed (over all resumes)
    wall_s: float


def submission_id() -> str | None:
    """The Ray job submission id when running under ``ray job submit``, else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        sid = json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    return str(sid) if sid else None


def default_run_name(method: str) -> str:
    """``<method>-<submission id>`` under ``ray job submit`` (so a re-submitted job with the
    same id resumes), else ``<method>-<YYYYmmdd-HHMMSS>-<random>`` (a fresh run)."""
    sid = submission_id()
    if sid:
        return f"{method}-{re.sub(r'[^A-Za-z0-9._-]', '-', sid)}"
    return f"{method}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _worker_experiment(exp: ExperimentConfig, corpus: Corpus) -> dict[str, Any]:
    """The experiment dict the workers get: the synthetic corpus pinned to the directory
    the driver resolved (workers may not share the driver's cache environment)."""
    d = to_dict(exp)
    if exp.data.format == "synthetic" and not exp.data.root:
        d["data"]["root"] = str(corpus.root)
    return d


PREVIEW_SIZE = (384, 384)  # pixels per panel of a training preview


def make_preview(method: MotionMethod, corpus: Corpus, split: str, out_dir: str | Path) -> list[Path]:
    """Decode one sequence of ``split`` (an unseen speaker where there is one) and write
    ``<seq>.npy`` (T, V*3) plus ``<seq>.mp4``: prediction | ground truth, each from the
    front and turned three-quarters (PREVIEW_SIZE panels), with the lip error heat map and
    the audio (``talkmesh.render``). Returns the files written; the
    video is skipped with a warning when it cannot be rendered (e.g. no ffmpeg)."""
    import warnings

    from talkmesh.data.dataset import match_audio_to_motion
    from talkmesh.eval.evaluate import EvalProtocol, predict_split, save_predictions

    out = Path(out_dir)
    pred, gt, _ = next(iter(predict_split(method, corpus, split, EvalProtocol(limit=1, max_conditions=1))))
    files = save_predictions([pred], out)
    layer = corpus.face_model()
    faces = layer.faces if layer is not None else None  # (F, 3)
    audio = match_audio_to_motion(corpus.load(pred.sequence)).audio
    try:
        from talkmesh.render import render_motion

        video = render_motion(
            pred.vertices, faces, out / f"{Path(pred.filename).stem}.mp4", corpus.info.fps, audio=audio, gt=gt,
            heat_region=corpus.regions().lips, size=PREVIEW_SIZE, view="front_three_quarter",
        )
        files.append(Path(video))
    except Exception as e:  # noqa: BLE001 - a preview must never fail a finished run
        warnings.warn(f"preview video not rendered: {type(e).__name__}: {e}", stacklevel=2)
    return files


def run_training(
    exp: ExperimentConfig,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    callbacks: Sequence[UserCallback] = (),
) -> RunResult:
    """Train ``exp`` with Ray Train and track it in MLflow; see the module docstring.

    ``run_name`` > ``exp.train.run_name`` > :func:`default_run_name`. The MLflow run
    (experiment ``exp.experiment_name``) gets the flattened resolved config as params, the
    git commit, the dataset fingerprint, per-epoch metrics from rank 0, and the selected
    checkpoint's files as artifacts (``train.log_checkpoint``); it ends FINISHED, or FAILED
    when training raises. ``callbacks`` are extra Ray Train ``UserCallback``s for the
    ``RunConfig`` (a sweep passes ``TuneReportCallback`` so every epoch's report reaches Tune).
    """
    from talkmesh.data import open_corpus
    from talkmesh.ops import tracking

    name = run_name or exp.train.run_name or default_run_name(exp.method)
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' or '-'")
    storage = Path(exp.train.storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    run_dir = storage / name
    uri = tracking_uri or tracking.tracking_uri()
    corpus = open_corpus(exp.data)  # generates the synthetic corpus here, once, if needed
    run_id = _start_run(exp, corpus, name, run_dir, uri, parent_run_id, tags)
    trainer = _make_trainer(exp, corpus, name, storage, run_id, uri, callbacks)
    wall = _fit(trainer, run_id, uri)
    best, last, selected = _select_and_log(exp, corpus, run_dir, run_id, uri)
    tracking.log_metrics(run_id, {"time/fit_s": wall}, uri=uri)
    tracking.end_run(run_id, "FINISHED", uri=uri)
    return RunResult(
        run_name=name,
        run_dir=str(run_dir),
        mlflow_run_id=run_id,
        experiment=exp.experiment_name,
        tracking_uri=uri,
        best_checkpoint=str(best.path) if best else None,
        last_checkpoint=str(last.path) if last else None,
        selected_checkpoint=str(selected.path) if selected else None,
        best_metrics=dict(best.metrics) if best else {},
        last_metrics=dict(last.metrics) if last else {},
        selected_metrics=dict(selected.metrics) if selected else {},
        epochs=(last.epoch + 1) if last else 0,
        wall_s=wall,
    )


def _fit(trainer: TorchTrainer, run_id: str, uri: str) -> float:
    """``trainer.fit()``; its wall time in seconds. The MLflow run ends FAILED (KILLED on
    Ctrl-C) when it raises."""
    from talkmesh.ops import tracking

    t0 = time.perf_counter()
    try:
        trainer.fit()
    except BaseException as e:
        tracking.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", uri=uri)
        raise
    return time.perf_counter() - t0


def _start_run(
    exp: ExperimentConfig,
    corpus: Corpus,
    name: str,
    run_dir: Path,
    uri: str,
    parent_run_id: str | None,
    tags: Mapping[str, Any] | None,
) -> str:
    """Start (or continue, same name) the MLflow run: resolved config as params, the git
    commit, the dataset fingerprint, the Ray job submission id and (when the reader left clips
    out) ``talkmesh.skipped_clips`` as tags. Its run id."""
    from talkmesh.ops import tracking

    commit, dirty = tracking.git_commit()
    run_tags: dict[str, Any] = {
        "talkmesh.method": exp.method,
        "talkmesh.dataset": corpus.info.format,
        "talkmesh.dataset_root": corpus.info.root,
        "talkmesh.dataset_fingerprint": tracking.dataset_fingerprint(corpus),
        "talkmesh.run_dir": str(run_dir),
        "talkmesh.num_workers": exp.train.num_workers,
    }
    if corpus.skipped:  # clips the reader left out (e.g. MEAD clips with missing or unreadable audio)
        run_tags["talkmesh.skipped_clips"] = len(corpus.skipped)
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
        run_tags["talkmesh.git_dirty"] = dirty
    sid = submission_id()
    if sid:
        run_tags["ray.job_submission_id"] = sid
    run_tags.update(tags or {})
    params = flatten(exp.resolved())
    params["data.fingerprint"] = run_tags["talkmesh.dataset_fingerprint"]
    run_id = tracking.start_run(
        exp.experiment_name, name, params=params, tags=run_tags, parent_run_id=parent_run_id, uri=uri
    )
    tracking.log_dataset(run_id, corpus, uri=uri)  # the corpus as the run's input (mlflow.log_input)
    return run_id


def _make_trainer(
    exp: ExperimentConfig,
    corpus: Corpus,
    name: str,
    storage: Path,
    run_id: str,
    uri: str,
    callbacks: Sequence[UserCallback],
) -> TorchTrainer:
    """The ``TorchTrainer`` of the run: the loop's config, workers, checkpoint ranking and retries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from talkmesh.train.loop import train_loop_per_worker

    t = exp.train
    # Ray Train's controller takes reports (and notices a lost worker) when it polls the workers,
    # every 2 s by default. Training does not wait for it (the loop reports asynchronously), but
    # Ray registers a checkpoint, and Tune sees a trial's epoch, only then: 0.5 s unless set
    # keeps them close behind the epochs; the poll is one small call per worker.
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, "0.5")
    resources = {"GPU" if t.use_gpu else "CPU": 1, **t.worker_resources} if t.worker_resources else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": _worker_experiment(exp, corpus),
            "run_name": name,
            "storage_path": str(storage),
            "local_mode": t.num_workers == 0,
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.checkpoint_num_to_keep or None,
                checkpoint_score_attribute=t.checkpoint_metric,
                checkpoint_score_order=t.checkpoint_mode,
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks) or None,
        ),
    )


def _select_and_log(
    exp: ExperimentConfig, corpus: Corpus, run_dir: Path, run_id: str, uri: str
) -> tuple[CheckpointInfo | None, CheckpointInfo | None, CheckpointInfo | None]:
    """(best, last, selected) checkpoints of the finished run; the selected one is tagged,
    logged as artifacts (``train.log_checkpoint``) and previewed (``train.preview``)."""
    from talkmesh.ops import tracking

    t = exp.train
    checkpoints = list_checkpoints(run_dir)
    best = select_checkpoint(checkpoints, t.checkpoint_metric, t.checkpoint_mode, "best")
    last = checkpoints[-1] if checkpoints else None
    selected = best if t.select == "best" else last
    if selected is None:
        return best, last, selected
    tracking.set_tags(
        run_id,
        {"talkmesh.selected_checkpoint": str(selected.path), "talkmesh.selected_epoch": selected.epoch},
        uri=uri,
    )
    if t.log_checkpoint:
        tracking.log_artifacts(run_id, selected.path, f"checkpoints/{selected.path.name}", uri=uri)
    if t.preview:
        method = load_method(selected.path).method
        for f in make_preview(method, corpus, t.eval_split, run_dir / "preview"):
            tracking.log_artifacts(run_id, f, "preview", uri=uri)
    return best, last, selected
