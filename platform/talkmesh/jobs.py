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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["find_preset", "main", "parse_args", "run_job"]


def find_preset(method: str, preset: str) -> Path:
    """A preset name (``configs/<method>/<preset>.yaml`` under the working directory or the
    repository holding this package) or a path to a YAML file."""
    p = Path(preset).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidates = [
        Path.cwd() / "configs" / method / f"{preset}.yaml",
        Path(__file__).resolve().parents[2] / "configs" / method / f"{preset}.yaml",
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
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 model.d_model=32")
    return p.parse_args(argv)


def _connect_ray(num_workers: int, resources: Mapping[str, float] | None = None) -> bool:
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
    from talkmesh import metrics as M
    from talkmesh import tracking
    from talkmesh.data import open_corpus
    from talkmesh.train.checkpoint import load_method
    from talkmesh.train.config import load_experiment
    from talkmesh.train.evaluate import evaluate_method, flat_metrics
    from talkmesh.train.runner import run_training

    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    exp = load_experiment(find_preset(method, args.preset), overrides, base={"method": method})
    if exp.method != method:
        from talkmesh.config import ConfigError

        raise ConfigError(f"preset {args.preset} trains {exp.method!r}, not {method!r}")

    started = _connect_ray(exp.train.num_workers) if exp.train.num_workers > 0 else False
    try:
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
