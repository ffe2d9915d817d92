"""MLflow tracking and the model registry; the only module that imports mlflow.

mlflow is imported inside the functions, and the tracking URI is resolved when a function
runs (never at import): ``MLFLOW_TRACKING_URI``, else an embedded SQLite store
``sqlite:///<cwd>/mlflow.db``. Every call takes an explicit ``uri`` too, so a Ray worker
logs to the store the driver chose even where its working directory differs.

Runs are addressed by id through ``MlflowClient`` (no process-global active run; the fluent
calls that need one run inside a short ``start_run(run_id=...)``), so rank 0 of a local-mode
training run can log while the driver holds its own run id:

    run_id = start_run("talkmesh-faceformer", "faceformer-abc", params=flat, tags=tags)
    log = RunLogger(run_id)                      # on rank 0
    log.log_metrics({"train/loss": 0.1}, step=0)
    log.close()
    end_run(run_id)

A run started again with the same ``run_name`` in the same experiment is the same MLflow
run (a resumed Ray Train run continues its MLflow run); params are logged once per run.
Parent/child runs (sweeps, stages) use ``parent_run_id``.

Inputs: :func:`log_dataset` logs the corpus (name, root, :func:`dataset_fingerprint` as the
digest) with ``mlflow.log_input``.

Models: :func:`log_model` stores a talkmesh method directory (``method.json`` + ``model.pt``,
see :mod:`talkmesh.train.checkpoint`) as the artifact of an ``mlflow.pyfunc`` model logged from
code (:mod:`talkmesh.ops.pyfunc_model`), and :func:`register_model` registers it as
``talkmesh-<method>``. :func:`load_registered` loads ``models:/talkmesh-<method>@<alias>`` with
``mlflow.pyfunc.load_model(...).unwrap_python_model()``; :func:`load_model_state` downloads
only the ``model.pt`` of a run's checkpoint or of a registered model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from talkmesh.data.corpus import Corpus
    from talkmesh.methods.base import DataFacts, MotionMethod

__all__ = [
    "MODEL_ARTIFACT",
    "RUN_NAME_TAG",
    "RunLogger",
    "dataset_fingerprint",
    "download_artifacts",
    "child_runs",
    "end_run",
    "find_run",
    "finite_metrics",
    "get_alias_version",
    "get_run_metrics",
    "git_commit",
    "load_model_state",
    "load_registered",
    "log_artifacts",
    "log_dataset",
    "log_metrics",
    "log_model",
    "log_model_metrics",
    "log_params",
    "model_name",
    "model_version",
    "promote_if_better",
    "register_model",
    "set_alias",
    "set_tags",
    "start_run",
    "tracking_uri",
]

RUN_NAME_TAG = "talkmesh.run_name"
MODEL_ARTIFACT = "talkmesh_method"  # pyfunc artifact key and folder of the method directory
_MAX_PARAM_CHARS = 6000


# --------------------------------------------------------------------------------------
# Store and runs
# --------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _client(uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client(uri: str | None = None) -> Any:
    """The ``MlflowClient`` of ``uri`` (tracking and registry; default :func:`tracking_uri`)."""
    return _client(uri)


@contextmanager
def _fluent(uri: str | None) -> Iterator[Any]:
    """Point the fluent API at ``uri`` for the duration of a call, then restore it (``search_runs``,
    ``log_input``, ``pyfunc.log_model``/``load_model`` take no tracking URI)."""
    import mlflow

    uri = uri or tracking_uri()
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        # set_*_uri also export MLFLOW_*_URI, which tracking_uri() reads: give the caller's back.
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _in_run(run_id: str, uri: str | None) -> Iterator[Any]:
    """The fluent API inside the existing run ``run_id`` (for ``log_model``/``log_input``,
    which take no run id); the run's status is left as it was."""
    with _fluent(uri) as mlflow:
        client = _client(uri)
        status = client.get_run(run_id).info.status
        try:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                yield mlflow
        finally:  # start_run set RUNNING and leaving it set FINISHED: put the status back
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=status)


def model_name(method: str) -> str:
    """Registered model name of a method: ``talkmesh-<method>``."""
    return f"talkmesh-{method}"


def _experiment_id(client: Any, name: str) -> str:
    # Not mlflow.set_experiment: it refuses a deleted experiment and races when several
    # processes create the same one (https://github.com/mlflow/mlflow/issues/4123).
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(client.tracking_uri))
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlruns/`` beside its database file, wherever the
    process runs (MLflow's default is ``./mlruns`` of the current directory, which differs
    between a driver and its Ray workers); other stores keep their server's default (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def find_run(experiment: str, run_name: str, uri: str | None = None) -> str | None:
    """Id of the newest live run tagged ``talkmesh.run_name = run_name`` in ``experiment``."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    uri: str | None = None,
) -> str:
    """Create (or, with ``resume``, reopen) the run ``run_name`` of ``experiment``; return its id.

    Reopening sets the status back to RUNNING and keeps params/metrics. ``params`` are
    logged once (see :func:`log_params`); ``tags`` are (re)set; ``parent_run_id`` makes
    a child run (``mlflow.parentRunId``), e.g. a sweep trial or a training stage.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    run_id = find_run(experiment, run_name, uri) if resume else None
    all_tags = {RUN_NAME_TAG: run_name, MLFLOW_RUN_NAME: run_name, **dict(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    if run_id is None:
        run_id = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        set_tags(run_id, all_tags, uri=uri)
    if params:
        log_params(run_id, params, uri=uri)
    return run_id


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    _client(uri).set_terminated(run_id, status=status)


@contextmanager
def new_run(
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """A new run of ``experiment`` (:func:`start_run` without resuming) for the block, which
    gets its id: ended FINISHED when the block completes, FAILED when it raises (re-raised)."""
    run_id = start_run(experiment, run_name, params=params, tags=tags, resume=False, uri=uri)
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED", uri=uri)
        raise
    end_run(run_id, "FINISHED", uri=uri)


def child_runs(parent_run_id: str, uri: str | None = None) -> list[dict[str, str]]:
    """Runs tagged ``mlflow.parentRunId = parent_run_id`` in the parent's experiment, oldest
    first: ``{"run_id", "run_name", "status"}`` each (status RUNNING / FINISHED / FAILED / KILLED)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    exp_id = _client(uri).get_run(parent_run_id).info.experiment_id
    with _fluent(uri) as mlflow:
        runs = mlflow.search_runs(
            [exp_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            output_format="list",
        )
    return [
        {"run_id": r.info.run_id, "run_name": r.data.tags.get(RUN_NAME_TAG, r.info.run_name), "status": r.info.status}
        for r in runs
    ]


def set_tags(run_id: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    """Set (or overwrite) tags of a run; values become strings."""
    from mlflow.entities import RunTag

    if tags:
        _client(uri).log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s if len(s) <= _MAX_PARAM_CHARS else s[: _MAX_PARAM_CHARS - 3] + "..."


def log_params(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> dict[str, str]:
    """Log flattened params once per run: keys already logged are skipped (a resumed run
    keeps its original values; a changed value is reported in a warning, never re-logged).
    Returns the params that were logged now."""
    from mlflow.entities import Param

    # Skipping logged keys is talkmesh's rule: MLflow rejects a logged param given a new value.
    client = _client(uri)
    existing = client.get_run(run_id).data.params
    new: dict[str, str] = {}
    changed = []
    for k, v in params.items():
        s = _param_value(v)
        if k in existing:
            if existing[k] != s:
                changed.append(k)
            continue
        new[str(k)] = s
    if changed:
        warnings.warn(
            f"MLflow run {run_id}: params {changed[:5]} differ from the values logged when the run "
            "started; the original values are kept",
            stacklevel=2,
        )
    if new:
        client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
    return new


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are finite numbers (not bools), as ``{str: float}``."""
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_metrics(
    run_id: str, metrics: Mapping[str, Any], step: int | None = None, uri: str | None = None, wait: bool = True
) -> Any:
    """Log numeric, finite metrics (others are skipped) at ``step``. ``wait=False`` queues them on
    MLflow's asynchronous logger and returns its ``RunOperations`` (``.wait()`` raises what the
    logging raised), or None when there was nothing to log."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step or 0)) for k, v in finite_metrics(metrics).items()]
    if not items:
        return None
    return _client(uri).log_batch(run_id, metrics=items, synchronous=wait)


def log_artifacts(run_id: str, path: str | Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    """Upload a file or a directory's files (e.g. a checkpoint, a preview video)."""
    p = Path(path)
    client = _client(uri)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path)
    else:
        client.log_artifact(run_id, str(p), artifact_path)


def download_artifacts(artifact_uri: str, dst: str | Path, uri: str | None = None) -> Path:
    """Download ``runs:/...``, ``models:/...`` or ``mlflow-artifacts:/...`` (a file or a folder)
    into ``dst``; returns the local path."""
    import mlflow.artifacts

    uri = uri or tracking_uri()
    local = mlflow.artifacts.download_artifacts(artifact_uri, dst_path=str(dst), tracking_uri=uri, registry_uri=uri)
    return Path(local)


def get_run_metrics(run_id: str, uri: str | None = None) -> dict[str, float]:
    """Latest value of every metric of a run."""
    return dict(_client(uri).get_run(run_id).data.metrics)


class RunLogger:
    """What rank 0 uses during training: metrics per epoch, artifacts, optional system
    metrics (MLflow's monitor, when ``psutil`` is installed)."""

    def __init__(self, run_id: str, uri: str | None = None, system_metrics: bool = False) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self._monitor: Any = None
        self._pending: Any = None  # the RunOperations of the last log_metrics
        if system_metrics and _have("psutil"):
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.uri)
                self._monitor.start()
            except Exception as e:  # noqa: BLE001 - system metrics are best effort
                warnings.warn(f"MLflow system metrics not started: {e}", stacklevel=2)
                self._monitor = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` at ``step`` and return; they are written while training goes on. At
        most one call is in flight: this one first waits for the previous one (whose error it
        raises), so a lost worker loses at most the newest epoch's metrics, which a restart logs
        again from its checkpoint (``train.loop``)."""
        self.flush()
        self._pending = log_metrics(self.run_id, metrics, step, uri=self.uri, wait=False)

    def flush(self) -> None:
        """Wait until the metrics queued by :meth:`log_metrics` are written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run already has metric ``key``."""
        return {m.step for m in _client(self.uri).get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.run_id, tags, uri=self.uri)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        log_artifacts(self.run_id, path, artifact_path, uri=self.uri)

    def close(self) -> None:
        """Write what is queued and stop the system metrics monitor."""
        try:
            self.flush()
        finally:
            if self._monitor is not None:
                try:
                    self._monitor.finish()
                finally:
                    self._monitor = None


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------


def git_commit(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit sha, dirty) of the git work tree holding ``path`` (default: this package),
    or (None, None) outside a work tree or without git."""
    # MLflow tags the commit only of runs started by the fluent API, from the entry script, without a dirty flag.
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (sha or None), bool(status.strip())


def dataset_fingerprint(corpus: Corpus) -> str:
    """sha256 (16 hex) of the corpus index: format, root, fps, and every sequence's name,
    subject, split and frame count. Equal fingerprints = the same data as indexed."""
    info = corpus.info
    h = hashlib.sha256()
    h.update(json.dumps([info.format, str(info.root), float(info.fps), info.motion]).encode())
    for s in corpus.sequences():
        h.update(f"\n{s.name}\t{s.subject}\t{s.split}\t{s.num_frames}".encode())
    return h.hexdigest()[:16]


def log_dataset(run_id: str, corpus: Corpus, context: str = "training", uri: str | None = None) -> str:
    """Log ``corpus`` as an input of run ``run_id`` (``mlflow.log_input``): a metadata-only
    dataset named after the corpus format, with its root as the source and
    :func:`dataset_fingerprint` as the digest. Logging it again is a no-op. Returns the fingerprint."""
    from mlflow.exceptions import MlflowException

    info = corpus.info
    dataset = _corpus_dataset(corpus)
    tags = {"fps": str(float(info.fps)), "motion": info.motion}
    with _in_run(run_id, uri) as fluent:
        for attempt in range(_INPUT_ATTEMPTS):
            try:
                fluent.log_input(dataset, context=context, tags=tags)
                break
            except MlflowException as exc:
                # The store looks the dataset up, then inserts it: concurrent trials logging the
                # same corpus race between the two, and the loser's insert breaks the unique key.
                # Again, the lookup finds the winner's row and only the run's input is added.
                if attempt == _INPUT_ATTEMPTS - 1 or not _lost_insert_race(exc):
                    raise
    return dataset.digest


_INPUT_ATTEMPTS = 3


def _lost_insert_race(exc: BaseException) -> bool:
    """Whether an MLflow store error is a unique-key violation (an insert that lost a race):
    the SQLAlchemy error itself for a database store, its text for a tracking server."""
    from sqlalchemy.exc import IntegrityError

    text = str(exc)
    return isinstance(exc.__cause__, IntegrityError) or "IntegrityError" in text or "UNIQUE constraint" in text


def _corpus_dataset(corpus: Corpus) -> Any:
    """The corpus as a metadata-only MLflow dataset: named after its format, its root as the
    source, :func:`dataset_fingerprint` as the digest."""
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset

    info = corpus.info
    source = mlflow.data.get_dataset_source_from_json(json.dumps({"uri": str(info.root)}), source_type="local")
    return MetaDataset(source, name=info.format, digest=dataset_fingerprint(corpus))


def log_model_metrics(
    run_id: str,
    metrics: Mapping[str, Any],
    model_id: str | None,
    corpus: Corpus | None = None,
    step: int = 0,
    uri: str | None = None,
) -> None:
    """Log the finite ``metrics`` to run ``run_id`` with ``mlflow.log_metrics``, linked to the
    logged model ``model_id`` (a registered version's ``model_id``: MLflow then records the
    model as an input of the run and shows the metrics on the model) and to ``corpus`` as
    their dataset (see :func:`log_dataset`)."""
    finite = finite_metrics(metrics)
    if not finite:
        return
    dataset = _corpus_dataset(corpus) if corpus is not None else None
    with _fluent(uri) as mlflow:
        mlflow.log_metrics(finite, step=step, run_id=run_id, model_id=model_id, dataset=dataset)


# --------------------------------------------------------------------------------------
# Models and the registry
# --------------------------------------------------------------------------------------


def _signature(num_vertices: int) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1,), "audio"),
            TensorSpec(np.dtype(np.float32), (num_vertices, 3), "template"),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, num_vertices, 3), "vertices")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("style", "long", -1)]))


def _method_artifact(tmp: Path, method: MotionMethod | None, method_dir: str | Path | None, extra: Any) -> Path:
    """The method directory to log: ``method`` saved, or the method files of ``method_dir`` copied."""
    from talkmesh.train.checkpoint import METHOD_FILE, MODEL_FILE, TEMPLATES_FILE, save_method

    if (method is None) == (method_dir is None):
        raise ValueError("pass exactly one of method= or method_dir=")
    art = tmp / MODEL_ARTIFACT
    if method is not None:
        return save_method(art, method, extra=extra)
    art.mkdir()
    for f in (METHOD_FILE, MODEL_FILE):
        src = Path(method_dir) / f  # type: ignore[arg-type]
        if not src.is_file():
            raise FileNotFoundError(f"{method_dir}: no {f}")
        (art / f).write_bytes(src.read_bytes())
    templates = Path(method_dir) / TEMPLATES_FILE  # type: ignore[arg-type]
    if templates.is_file():  # optional: a model without carried templates has none
        (art / TEMPLATES_FILE).write_bytes(templates.read_bytes())
    return art


def log_model(
    run_id: str,
    method: MotionMethod | None = None,
    *,
    method_dir: str | Path | None = None,
    registered_model_name: str | None = None,
    name: str = "model",
    extra: Mapping[str, Any] | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """Log a method (or an existing method/checkpoint directory) as the pyfunc model
    ``name`` of run ``run_id`` (models from code: :mod:`talkmesh.ops.pyfunc_model`); register
    it when ``registered_model_name`` is given. Returns {"model_uri", "model_id", "version" (int or None)}."""
    import torch

    from talkmesh.train.checkpoint import METHOD_FILE

    with tempfile.TemporaryDirectory() as tmp:
        art = _method_artifact(Path(tmp), method, method_dir, extra)
        info = json.loads((art / METHOD_FILE).read_text())
        with _in_run(run_id, uri) as mlflow, warnings.catch_warnings():
            import mlflow.pyfunc

            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            model_info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={MODEL_ARTIFACT: str(art)},
                signature=_signature(int(info["facts"]["num_vertices"])),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                registered_model_name=registered_model_name,
                metadata={"talkmesh_method": info["method"], "talkmesh_stage": info.get("stage", "")},
            )
    version = model_info.registered_model_version
    return {
        "model_uri": model_info.model_uri,
        "model_id": model_info.model_id,
        "version": None if version is None else int(version),
    }


def register_model(
    method_name: str,
    run_id: str,
    method: MotionMethod | None = None,
    *,
    method_dir: str | Path | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    uri: str | None = None,
) -> int:
    """Log the model in run ``run_id`` and register it as ``talkmesh-<method_name>``;
    returns the new version number. ``metrics`` (e.g. the selected checkpoint's
    ``val/lve``) become version tags ``metric.<name>``, which :func:`promote_if_better` compares."""
    out = log_model(
        run_id, method, method_dir=method_dir, registered_model_name=model_name(method_name), extra=extra, uri=uri
    )
    if out["version"] is None:
        raise RuntimeError(f"registering {model_name(method_name)} returned no version")
    version = int(out["version"])
    client = _client(uri)
    for k, v in finite_metrics(metrics or {}).items():
        client.set_model_version_tag(model_name(method_name), str(version), f"metric.{k}", repr(v))
    return version


def _version_metric(client: Any, name: str, version: int, metric: str) -> float | None:
    mv = client.get_model_version(name, str(version))
    tag = (mv.tags or {}).get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote_if_better(
    method_name: str,
    version: int,
    metric: str,
    mode: str = "min",
    alias: str = "champion",
    uri: str | None = None,
) -> bool:
    """Move ``alias`` to ``version`` when there is no ``alias`` yet, or when ``version`` beats
    the current holder on ``metric`` (``mode`` min/max; version tag ``metric.<name>``, else
    the run's latest value). Returns whether ``alias`` now points at ``version``."""
    client = _client(uri)
    name = model_name(method_name)
    current = get_alias_version(method_name, alias, uri=uri)
    if current == int(version):
        return True
    if current is not None:
        new = _version_metric(client, name, version, metric)
        old = _version_metric(client, name, current, metric)
        if new is None:
            return False
        if old is not None and not (new < old if mode == "min" else new > old):
            return False
    set_alias(method_name, alias, version, uri=uri)
    return True


def set_alias(method_name: str, alias: str, version: int, uri: str | None = None) -> None:
    """Point ``talkmesh-<method_name>@<alias>`` at ``version``."""
    _client(uri).set_registered_model_alias(model_name(method_name), alias, str(version))


def get_alias_version(method_name: str, alias: str = "champion", uri: str | None = None) -> int | None:
    """Version behind ``talkmesh-<method_name>@<alias>``, or None when the alias (or model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client(uri).get_model_version_by_alias(model_name(method_name), alias)
    except MlflowException:
        return None
    return int(mv.version)


def model_version(method: str, ref: str, uri: str | None = None) -> dict[str, Any]:
    """The version of ``talkmesh-<method>`` that ``ref`` names (an alias, or a version number
    such as ``"3"``): ``{"name", "version", "run_id", "model_id"}`` (``model_id``: its logged
    model, None for versions registered before MLflow 3). :class:`LookupError` naming the
    versions and aliases that exist when there is no such version."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    name = model_name(method)
    try:
        mv = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    except MlflowException:
        try:
            aliases = client.get_registered_model(name).aliases
        except MlflowException:
            raise LookupError(f"no registered model {name} in {client.tracking_uri}") from None
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
        have = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        where = client.tracking_uri
        raise LookupError(f"{name} has no {what} in {where}; versions {versions}, aliases {have}") from None
    return {"name": name, "version": int(mv.version), "run_id": mv.run_id, "model_id": _logged_model_id(client, mv)}


def _logged_model_id(client: Any, mv: Any) -> str | None:
    """The logged model behind a model version: its ``model_id``, which the SQLite registry
    leaves empty, else the id in its source ``models:/<model_id>`` (how MLflow 3 registers a
    model that ``log_model`` logged); None when there is no such logged model."""
    from mlflow.exceptions import MlflowException

    if mv.model_id:
        return str(mv.model_id)
    candidate = str(mv.source or "").removeprefix("models:/")
    if not str(mv.source or "").startswith("models:/") or not candidate or any(c in candidate for c in "/@"):
        return None
    try:
        return str(client.get_logged_model(candidate).model_id)
    except MlflowException:
        return None


def load_registered(
    method: str, alias: str = "champion", device: str = "cpu", uri: str | None = None
) -> tuple[MotionMethod, DataFacts, Any]:
    """(method module in eval mode, data facts, method config) of
    ``models:/talkmesh-<method>@<alias>`` (``alias`` may also be a version number, ``"3"``),
    loaded with ``mlflow.pyfunc.load_model`` and unwrapped to the talkmesh pyfunc."""
    from talkmesh.train.checkpoint import load_method

    ref = f"models:/{model_name(method)}{'/' if str(alias).isdigit() else '@'}{alias}"
    with _fluent(uri) as mlflow, tempfile.TemporaryDirectory() as tmp:
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        try:
            loaded = mlflow.pyfunc.load_model(ref, dst_path=tmp).unwrap_python_model().loaded
        except MlflowException as e:
            if not isinstance(e.__cause__, ImportError):
                raise
            # Registered by an earlier talkmesh, whose wrapper code imports a module that has
            # since moved (talkmesh.tracking): the method directory inside it is all we need.
            from mlflow.models import Model

            artifacts = Model.load(ref).flavors["python_function"]["artifacts"]
            local = download_artifacts(f"{ref}/{artifacts[MODEL_ARTIFACT]['path']}", Path(tmp) / "m", uri=uri)
            loaded = load_method(local)
    if loaded.info.get("method") != method:
        raise ValueError(f"{ref} holds method {loaded.info.get('method')!r}, not {method!r}")
    return loaded.method.to(device), loaded.facts, loaded.config


def load_model_state(source: str, uri: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict stored at an MLflow URI, downloading only its ``model.pt``:
    ``runs:/<id>/<checkpoint dir>`` (or any artifact URI of a method/checkpoint directory or of
    its ``model.pt``), ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (a model logged
    by :func:`log_model`). Loaded on the CPU with ``weights_only=True``."""
    import torch
    from mlflow.exceptions import MlflowException

    from talkmesh.train.checkpoint import MODEL_FILE

    base = source.rstrip("/")
    if base.startswith("models:/"):
        file_uri, expected = f"{base}/artifacts/{MODEL_ARTIFACT}/{MODEL_FILE}", "a model logged by talkmesh"
    elif base.endswith(f"/{MODEL_FILE}"):
        file_uri, expected = base, f"a {MODEL_FILE} artifact"
    else:
        file_uri, expected = f"{base}/{MODEL_FILE}", f"a checkpoint or method directory holding {MODEL_FILE}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_artifacts(file_uri, tmp, uri=uri)
        except (MlflowException, OSError) as e:
            raise FileNotFoundError(f"{source}: expected {expected}; {file_uri} could not be downloaded ({e})") from e
        if not local.is_file():
            raise FileNotFoundError(f"{source}: expected {expected}; {file_uri} is not a file")
        return torch.load(local, map_location="cpu", weights_only=True)
