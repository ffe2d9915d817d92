"""What every ``jobs/<method>.py`` runs: train, evaluate the test splits, register.

    python jobs/faceformer.py [--preset NAME|PATH] [--num-workers N] [--gpu] [key=value ...]
    ray job submit --working-dir . -- python jobs/faceformer.py --preset small train.epochs=3

Steps: load ``configs/<method>/<preset>.yaml`` (default ``small``: the synthetic corpus,
generated into the cache when missing) with the dotted overrides; attach to the Ray
cluster of ``ray job submit`` (``RAY_ADDRESS`` set) or start a local one bound to
127.0.0.1 when workers are requested (``train.num_workers=0`` runs without Ray);
:func:`talkmesh.train.runner.run_training`; evaluate the selected checkpoint on the
corpus's test splits (predictions saved next to the run for ``talkmesh metrics``), log
the metrics and the table to the same MLflow run; register ``talkmesh-<method>`` and
move ``@champion`` to it when it beats the current champion on the validation metric
(or there is none); print the run id and where to look.

Multi-stage methods (``stages`` has more than one entry, e.g. AdaMesh) run their stages in
order as child runs of one MLflow parent run; each stage starts from the previous stage's
selected checkpoint (``train.init_from``). ``--stage NAME --init-from URI`` re-runs one stage
alone (inputs from an earlier run's artifacts: ``runs:/<id>/checkpoints/epoch-NNNN``, a
checkpoint directory or ``models:/...``). The last stage's checkpoint is evaluated and
registered from the parent run. The method config's ``face_model_overrides`` hand it the
corpus's face-model file, so that the registered model can build vertices when served.

``main`` turns the command line into a typed :class:`JobRequest`; :func:`run_job` takes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.corpus import Corpus
    from talkmesh.train.config import ExperimentConfig
    from talkmesh.train.runner import RunResult

__all__ = ["JobRequest", "connect_ray", "find_preset", "main", "parse_args", "run_job", "run_stages"]


def find_preset(method: str, preset: str) -> Path:
    """A preset name (``configs/<method>/<preset>.yaml`` under the working directory or the
    repository holding this package) or a path to a YAML file."""
    p = Path(preset).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidates = [
        Path.cwd() / "configs" / method / f"{preset}.yaml",
        Path(__file__).resolve().parents[3] / "configs" / method / f"{preset}.yaml",
    ]
    for c in candidates:
        if c.is_file():
            return c
    from talkmesh.config import ConfigError

    raise ConfigError(f"--preset {preset}: no such preset; looked for {', '.join(str(c) for c in candidates)}")


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """What one job runs: ``method`` (registry name) trained from ``preset`` (a
    ``configs/<method>/<name>.yaml`` name or a YAML path) with dotted ``overrides``;
    ``num_workers`` (None = the preset's ``train.num_workers``) and ``gpu`` set the Ray
    Train workers; ``register`` registers the model and moves ``@champion`` when it is
    better; ``stage`` (multi-stage methods) runs only that stage, from ``init_from``."""

    method: str
    preset: str = "small"
    overrides: tuple[str, ...] = ()
    num_workers: int | None = None
    gpu: bool = False
    register: bool = True
    stage: str | None = None
    init_from: str | None = None

    def command(self) -> str:
        """The command line that runs this request again (the model card's "Reproduce")."""
        import shlex

        parts = ["python", f"jobs/{self.method}.py", "--preset", self.preset]
        parts += ["--stage", self.stage] if self.stage else []
        parts += ["--init-from", self.init_from] if self.init_from else []
        parts += [] if self.num_workers is None else ["--num-workers", str(self.num_workers)]
        parts += (["--gpu"] if self.gpu else []) + list(self.overrides)
        return shlex.join(parts)

    def all_overrides(self) -> list[str]:
        """The dotted overrides with the request's options applied on top."""
        out = list(self.overrides)
        if self.num_workers is not None:
            out.append(f"train.num_workers={self.num_workers}")
        if self.gpu:
            out.append("train.use_gpu=true")
        if self.init_from:
            out.append(f"train.init_from={self.init_from}")
        return out


def parse_args(method: str, argv: Sequence[str] | None = None) -> JobRequest:
    """The :class:`JobRequest` of ``jobs/<method>.py``'s command line."""
    p = argparse.ArgumentParser(
        prog=f"jobs/{method}.py",
        description=f"Train {method} with Ray Train, evaluate the test splits, register talkmesh-{method}.",
    )
    p.add_argument("--preset", default="small", help=f"configs/{method}/<NAME>.yaml or a YAML path (default: small)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (0 = in-process, no Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")
    p.add_argument("--no-register", action="store_true", help="skip registering the model")
    p.add_argument("--stage", default=None, help="multi-stage methods: run only this stage")
    p.add_argument("--init-from", default=None, help="the stage's input weights: runs:/..., models:/... or a directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 model.d_model=32")
    args = p.parse_args(argv)
    return JobRequest(
        method=method,
        preset=args.preset,
        overrides=tuple(args.overrides),
        num_workers=args.num_workers,
        gpu=args.gpu,
        register=not args.no_register,
        stage=args.stage,
        init_from=args.init_from,
    )


def connect_ray(num_workers: int, resources: Mapping[str, float] | None = None) -> bool:
    """Attach to ``RAY_ADDRESS`` (ray job submit) or start a loopback-only local Ray.
    ``resources`` are custom resources the local Ray offers (a sweep's ``TRAIN_DRIVER``
    slots); an attached cluster keeps its own. Returns True when this process started Ray
    (and should shut it down)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    ray.init(
        address="local",  # a new cluster of our own, never one that `ray start` left on this machine
        num_cpus=max(os.cpu_count() or 1, num_workers),
        resources=dict(resources) if resources else None,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
    )
    return True


def run_job(request: JobRequest) -> dict[str, Any]:
    """Train + evaluate + register; returns a summary dict (also printed)."""
    from talkmesh.data import open_corpus

    exp = _experiment(request)
    result = _train(exp, request.stage)
    if result.selected_checkpoint is None:
        raise RuntimeError(f"run {result.run_name} produced no checkpoint")
    from talkmesh.ops import tracking

    tracking.set_tags(result.mlflow_run_id, {"talkmesh.command": request.command(), "talkmesh.preset": request.preset},
                      uri=result.tracking_uri)  # fmt: skip
    corpus = open_corpus(exp.data)
    test_metrics, table = _evaluate_test_splits(exp, corpus, result)
    version = champion = None
    if request.register:
        version, champion = _register(request.method, exp, result)
        _card(request.method, version, exp, corpus, result)
    _print_summary(request.method, corpus, result, table)
    return {
        "run_name": result.run_name,
        "run_id": result.mlflow_run_id,
        "checkpoint": result.selected_checkpoint,
        "test_metrics": test_metrics,
        "version": version,
        "champion": champion,
    }


def _experiment(request: JobRequest) -> ExperimentConfig:
    """The request's experiment: preset + overrides, checked to train ``request.method``
    (and, with ``request.stage``, to have that stage), with the corpus's face model."""
    from talkmesh.config import ConfigError
    from talkmesh.methods.registry import get_method
    from talkmesh.train.config import load_experiment

    method = request.method
    preset = find_preset(method, request.preset)
    exp = load_experiment(preset, request.all_overrides(), base={"method": method})
    if exp.method != method:
        raise ConfigError(f"preset {request.preset} trains {exp.method!r}, not {method!r}")
    exp = _with_face_model(exp)
    stages = get_method(method).stages
    if request.stage is not None and request.stage not in stages:
        raise ConfigError(f"--stage {request.stage}: {method} has stages {list(stages)}")
    return exp


def _train(exp: ExperimentConfig, stage: str | None) -> RunResult:
    """Train every stage (or only ``stage``) on a Ray cluster when workers are requested."""
    from talkmesh.methods.registry import get_method
    from talkmesh.train.runner import run_training

    stages = get_method(exp.method).stages
    started = connect_ray(exp.train.num_workers) if exp.train.num_workers > 0 else False
    try:
        if len(stages) > 1:
            return run_stages(exp, [stage] if stage else list(stages))
        if stage:
            exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, stage=stage))
        return run_training(exp)
    finally:
        if started:
            import ray

            ray.shutdown()


def _evaluate_test_splits(exp: ExperimentConfig, corpus: Corpus, result: RunResult) -> tuple[dict[str, float], str]:
    """Evaluate the selected checkpoint on the corpus's test splits (predictions saved under
    ``<run dir>/predictions/<split>``); log the metrics and the table to the MLflow run.
    Returns (``test/<split>/*`` metrics, the table)."""
    from talkmesh.eval.evaluate import evaluate_method, flat_metrics, summary_table
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import load_method

    assert result.selected_checkpoint is not None
    method = load_method(result.selected_checkpoint).method
    summaries: dict[str, dict[str, Any]] = {}
    test_metrics: dict[str, float] = {}
    for split in corpus.info.eval_splits:
        summary = evaluate_method(
            method,
            corpus,
            split,
            limit=exp.train.limit_eval_sequences,
            seed=exp.train.seed,
            adapted=True,
            save_dir=Path(result.run_dir) / "predictions" / split,
        )
        test_metrics.update(flat_metrics(summary, f"test/{split}"))
        summaries[split] = summary
    table = summary_table(summaries, corpus.info.format, method.method_metric_names)  # + the method's own metrics
    tracking.log_metrics(result.mlflow_run_id, test_metrics, step=result.epochs, uri=result.tracking_uri)
    table_path = Path(result.run_dir) / "test_metrics.txt"
    table_path.write_text(table + "\n")
    tracking.log_artifacts(result.mlflow_run_id, table_path, uri=result.tracking_uri)
    return test_metrics, table


def _register(method: str, exp: ExperimentConfig, result: RunResult) -> tuple[int, int | None]:
    """Register the selected checkpoint as ``talkmesh-<method>`` and promote it to
    ``@champion`` when it beats the current one. Returns (version, champion version)."""
    from talkmesh.ops import tracking

    uri = result.tracking_uri
    assert result.selected_checkpoint is not None
    version = tracking.register_model(
        method,
        result.mlflow_run_id,
        method_dir=result.selected_checkpoint,
        metrics={k: v for k, v in result.selected_metrics.items() if isinstance(v, (int, float))},
        uri=uri,
    )
    metric = exp.train.checkpoint_metric
    promoted = tracking.promote_if_better(method, version, metric, exp.train.checkpoint_mode, uri=uri)
    champion = tracking.get_alias_version(method, "champion", uri=uri)
    print(f"registered {tracking.model_name(method)} version {version}"
          + (" -> @champion" if promoted else f" (champion stays version {champion})"))
    return version, champion


def _card(method: str, version: int, exp: ExperimentConfig, corpus: Corpus, result: RunResult) -> None:
    """The version's model card, with the protocol id of each test split's metrics (the
    leaderboard's protocol for the same split and sequence limit)."""
    from talkmesh.ops.leaderboard import make_protocol
    from talkmesh.ops.model_card import write_model_card

    limit = exp.train.limit_eval_sequences
    protocols = {s: make_protocol(corpus, s, limit=limit, seed=exp.train.seed).id for s in corpus.info.eval_splits}
    write_model_card(method, version, result.tracking_uri, protocols)
    print(f"model card of version {version}: its registry description and model_card/v{version}.md in the run")


def _print_summary(method: str, corpus: Corpus, result: RunResult, table: str) -> None:
    """Where to look: the test table, the MLflow run and the Ray run directory."""
    info = corpus.info
    uri = result.tracking_uri
    print(f"\n== {method} on {info.format}: selected checkpoint {result.selected_checkpoint}")
    print(table)
    print(f"\nMLflow run id  {result.mlflow_run_id}  (experiment {result.experiment})")
    print(f"tracking URI   {uri}")
    if uri.startswith(("http://", "https://")):
        print(f"  browse:      {uri}")
    else:
        print(f"  browse:      mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"Ray run dir    {result.run_dir}  (checkpoints epoch-NNNN/, predictions/)")
    print(f"  score again: talkmesh metrics --pred {Path(result.run_dir) / 'predictions'}/<split> "
          f"--format {info.format} --root {info.root}")


def _with_face_model(exp: ExperimentConfig) -> ExperimentConfig:
    """``exp`` with the method config's :meth:`~talkmesh.methods.base.MethodConfig.face_model_overrides`
    for the corpus's face-model file (when the corpus has one on disk)."""
    from talkmesh.data import open_corpus

    if not exp.method_config().reads_face_model_file:  # no need to open the corpus and its face model
        return exp
    layer = open_corpus(exp.data).face_model()
    source = layer.source if layer is not None else ""
    if not source or not Path(source).is_file():
        return exp
    overrides = exp.method_config().face_model_overrides(str(Path(source).resolve()))
    if not overrides:
        return exp
    return dataclasses.replace(exp, model={**exp.model, **overrides})


def run_stages(exp: ExperimentConfig, stages: Sequence[str], *, tracking_uri: str | None = None) -> RunResult:
    """Train ``stages`` in order as child runs of one MLflow parent run (``exp.train.run_name``
    or a default name; children ``<parent>-<stage>``). The first stage starts from
    ``train.init_from`` (if any), each later one from the previous stage's selected
    checkpoint. Returns the last stage's ``RunResult`` with the parent's run id and name
    (evaluation and registration go to the parent run). The parent ends FINISHED, or FAILED
    when a stage raises."""
    from talkmesh.config import flatten
    from talkmesh.ops import tracking
    from talkmesh.train.runner import default_run_name

    if not stages:
        raise ValueError("run_stages: no stages to run")
    uri = tracking_uri or tracking.tracking_uri()
    parent_name = exp.train.run_name or default_run_name(exp.method)
    parent_id = tracking.start_run(
        exp.experiment_name,
        parent_name,
        params={k: v for k, v in flatten(exp.resolved()).items() if not k.startswith("train.")},
        tags={"talkmesh.method": exp.method, "talkmesh.stages": ",".join(stages), "talkmesh.staged": "parent"},
        uri=uri,
    )
    init_from = exp.train.init_from
    result = None
    epochs = 0
    try:
        for stage in stages:
            result = _run_stage(exp, stage, init_from, parent_name, parent_id, uri)
            init_from = result.selected_checkpoint
            epochs += result.epochs
    except BaseException as e:
        tracking.end_run(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", uri=uri)
        raise
    assert result is not None and result.selected_checkpoint is not None
    metrics = {k: v for k, v in result.selected_metrics.items() if isinstance(v, (int, float))}
    tracking.log_metrics(parent_id, metrics, step=epochs, uri=uri)
    tracking.set_tags(parent_id, {"talkmesh.selected_checkpoint": result.selected_checkpoint}, uri=uri)
    tracking.end_run(parent_id, "FINISHED", uri=uri)
    return dataclasses.replace(result, mlflow_run_id=parent_id, run_name=parent_name, epochs=epochs)


def _run_stage(
    exp: ExperimentConfig, stage: str, init_from: str, parent_name: str, parent_id: str, uri: str
) -> RunResult:
    """One stage as a child run ``<parent>-<stage>`` from ``init_from``; its run id and
    checkpoint are tagged on the parent."""
    from talkmesh.ops import tracking
    from talkmesh.train.runner import run_training

    train = dataclasses.replace(exp.train, stage=stage, init_from=init_from, run_name=f"{parent_name}-{stage}")
    result = run_training(
        dataclasses.replace(exp, train=train), parent_run_id=parent_id, tags={"talkmesh.stage": stage}, tracking_uri=uri
    )
    if result.selected_checkpoint is None:
        raise RuntimeError(f"stage {stage} ({result.run_name}) produced no checkpoint")
    stage_tags = {
        f"talkmesh.stage.{stage}.run_id": result.mlflow_run_id,
        f"talkmesh.stage.{stage}.checkpoint": result.selected_checkpoint,
    }
    tracking.set_tags(parent_id, stage_tags, uri=uri)
    print(f"[talkmesh] {exp.method} stage {stage} done: {result.selected_checkpoint}", flush=True)
    return result


def main(method: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<method>.py``; user errors print one line and exit 2."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    from talkmesh.config import ConfigError
    from talkmesh.data.errors import DataError

    request = parse_args(method, argv)
    try:
        run_job(request)
    except (ConfigError, DataError) as e:
        print(f"{method}: error: {e}", file=sys.stderr)
        return 2
    return 0
