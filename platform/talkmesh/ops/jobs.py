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
registered from the parent run. Methods whose config has an empty ``face_model`` field get
the corpus's face-model file there, so the registered model can build vertices when served.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["connect_ray", "find_preset", "main", "parse_args", "run_job", "run_stages"]


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


def parse_args(method: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    return p.parse_args(argv)


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


def run_job(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train + evaluate + register; returns a summary dict (also printed)."""
    from talkmesh.data import open_corpus
    from talkmesh.eval import metrics as M
    from talkmesh.eval.evaluate import evaluate_method, flat_metrics
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import load_method
    from talkmesh.train.config import load_experiment
    from talkmesh.train.runner import run_training

    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    stage, init_from = getattr(args, "stage", None), getattr(args, "init_from", None)
    if init_from:
        overrides.append(f"train.init_from={init_from}")
    exp = load_experiment(find_preset(method, args.preset), overrides, base={"method": method})
    if exp.method != method:
        from talkmesh.config import ConfigError

        raise ConfigError(f"preset {args.preset} trains {exp.method!r}, not {method!r}")
    exp = _with_face_model(exp)
    from talkmesh.methods.registry import get_method

    stages = tuple(get_method(method).stages)
    if stage is not None and stage not in stages:
        from talkmesh.config import ConfigError

        raise ConfigError(f"--stage {stage}: {method} has stages {list(stages)}")

    started = connect_ray(exp.train.num_workers) if exp.train.num_workers > 0 else False
    try:
        if len(stages) > 1:
            result = run_stages(exp, [stage] if stage else list(stages))
        else:
            if stage:
                exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, stage=stage))
            result = run_training(exp)
    finally:
        if started:
            import ray

            ray.shutdown()
    if result.selected_checkpoint is None:
        raise RuntimeError(f"run {result.run_name} produced no checkpoint")

    uri = result.tracking_uri
    loaded = load_method(result.selected_checkpoint)
    corpus = open_corpus(exp.data)
    pred_root = Path(result.run_dir) / "predictions"
    rows: dict[str, dict[str, float]] = {}
    test_metrics: dict[str, float] = {}
    for split in corpus.info.eval_splits:
        summary = evaluate_method(
            loaded.method,
            corpus,
            split,
            limit=exp.train.limit_eval_sequences,
            seed=exp.train.seed,
            adapted=True,
            save_dir=pred_root / split,
        )
        test_metrics.update(flat_metrics(summary, f"test/{split}"))
        rows[split] = summary["metrics"]
        if "unseen" in summary and "min" in summary["unseen"]:
            rows[f"{split} min over conditions"] = summary["unseen"]["min"]
            rows[f"{split} max over conditions"] = summary["unseen"]["max"]
        if "adapted" in summary:
            rows[f"{split} adapted"] = summary["adapted"]
    table = M.format_table(rows, corpus.info.format, list(M.DEFAULT_METRICS), label="split")
    tracking.log_metrics(result.mlflow_run_id, test_metrics, step=result.epochs, uri=uri)
    table_path = Path(result.run_dir) / "test_metrics.txt"
    table_path.write_text(table + "\n")
    tracking.log_artifacts(result.mlflow_run_id, table_path, uri=uri)

    version = champion = None
    if not args.no_register:
        metric = exp.train.checkpoint_metric
        version = tracking.register_model(
            method,
            result.mlflow_run_id,
            method_dir=result.selected_checkpoint,
            metrics={k: v for k, v in result.selected_metrics.items() if isinstance(v, (int, float))},
            uri=uri,
        )
        promoted = tracking.promote_if_better(method, version, metric, exp.train.checkpoint_mode, uri=uri)
        champion = tracking.get_alias_version(method, "champion", uri=uri)
        print(f"registered {tracking.model_name(method)} version {version}"
              + (" -> @champion" if promoted else f" (champion stays version {champion})"))

    print(f"\n== {method} on {corpus.info.format}: selected checkpoint {result.selected_checkpoint}")
    print(table)
    print(f"\nMLflow run id  {result.mlflow_run_id}  (experiment {result.experiment})")
    print(f"tracking URI   {uri}")
    if uri.startswith(("http://", "https://")):
        print(f"  browse:      {uri}")
    else:
        print(f"  browse:      mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"Ray run dir    {result.run_dir}  (checkpoints epoch-NNNN/, predictions/)")
    print(f"  score again: talkmesh metrics --pred {pred_root}/<split> --format {corpus.info.format} "
          f"--root {corpus.info.root}")
    return {
        "run_name": result.run_name,
        "run_id": result.mlflow_run_id,
        "checkpoint": result.selected_checkpoint,
        "test_metrics": test_metrics,
        "version": version,
        "champion": champion,
    }


def _with_face_model(exp: Any) -> Any:
    """``exp`` with ``model.face_model`` set to the corpus's face-model file when the method
    config has that field, it is empty, and the corpus has a face model."""
    mc = exp.method_config()
    if not hasattr(mc, "face_model") or mc.face_model:
        return exp
    from talkmesh.data import open_corpus

    layer = open_corpus(exp.data).face_model()
    source = getattr(layer, "source", "") if layer is not None else ""
    if not source or not Path(source).is_file():
        return exp
    return dataclasses.replace(exp, model={**exp.model, "face_model": str(Path(source).resolve())})


def run_stages(exp: Any, stages: Sequence[str], *, tracking_uri: str | None = None) -> Any:
    """Train ``stages`` in order as child runs of one MLflow parent run (``exp.train.run_name``
    or a default name; children ``<parent>-<stage>``). The first stage starts from
    ``train.init_from`` (if any), each later one from the previous stage's selected
    checkpoint. Returns the last stage's ``RunResult`` with the parent's run id and name
    (evaluation and registration go to the parent run). The parent ends FINISHED, or FAILED
    when a stage raises."""
    from talkmesh.config import flatten
    from talkmesh.ops import tracking
    from talkmesh.train.runner import default_run_name, run_training

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
            train = dataclasses.replace(exp.train, stage=stage, init_from=init_from, run_name=f"{parent_name}-{stage}")
            result = run_training(
                dataclasses.replace(exp, train=train),
                parent_run_id=parent_id,
                tags={"talkmesh.stage": stage},
                tracking_uri=uri,
            )
            if result.selected_checkpoint is None:
                raise RuntimeError(f"stage {stage} ({result.run_name}) produced no checkpoint")
            init_from = result.selected_checkpoint
            epochs += result.epochs
            stage_tags = {
                f"talkmesh.stage.{stage}.run_id": result.mlflow_run_id,
                f"talkmesh.stage.{stage}.checkpoint": result.selected_checkpoint,
            }
            tracking.set_tags(parent_id, stage_tags, uri=uri)
            print(f"[talkmesh] {exp.method} stage {stage} done: {result.selected_checkpoint}", flush=True)
    except BaseException as e:
        tracking.end_run(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", uri=uri)
        raise
    assert result is not None
    metrics = {k: v for k, v in result.selected_metrics.items() if isinstance(v, (int, float))}
    tracking.log_metrics(parent_id, metrics, step=epochs, uri=uri)
    tracking.set_tags(parent_id, {"talkmesh.selected_checkpoint": result.selected_checkpoint}, uri=uri)
    tracking.end_run(parent_id, "FINISHED", uri=uri)
    return dataclasses.replace(result, mlflow_run_id=parent_id, run_name=parent_name, epochs=epochs)


def main(method: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<method>.py``; user errors print one line and exit 2."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback Ray; before ray is imported
    from talkmesh.config import ConfigError
    from talkmesh.data.errors import DataError

    args = parse_args(method, argv)
    try:
        run_job(method, args)
    except (ConfigError, DataError) as e:
        print(f"{method}: error: {e}", file=sys.stderr)
        return 2
    return 0
