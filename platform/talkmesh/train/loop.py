"""The one training loop (DESIGN.md "Training"): ``train_loop_per_worker`` for every method.

Run by Ray Train's ``TorchTrainer`` on each worker (gloo on CPU, NCCL on GPU), or
in-process with ``ScalingConfig(num_workers=0)`` (Ray Train local mode, for tests and
quick runs). Per worker it

1. rebuilds the ``ExperimentConfig`` from ``config["experiment"]``, opens the corpus and
   builds the method through the registry (same seed on every rank: same init);
2. resumes from ``ray.train.get_checkpoint()`` (model, optimizer, epoch), or in local
   mode from the newest ``epoch-NNNN/`` under ``<storage_path>/<run_name>/`` (local mode
   keeps checkpoints in memory only, so the loop writes them there itself);
   else loads ``train.init_from`` (a stage's input weights), if given;
3. wraps the method with ``ray.train.torch.prepare_model`` (DDP when world > 1) and
   shards the training windows with a seeded ``DistributedSampler``
   (``prepare_data_loader``), with ``set_epoch`` every epoch;
4. per epoch: trains on windows, validates on whole sequences of ``train.eval_split``
   (sharded over ranks, gathered, scored as in :mod:`talkmesh.eval.evaluate`), and
   calls ``ray.train.report(metrics, checkpoint, checkpoint_dir_name="epoch-NNNN")`` on
   **every** rank (a barrier) with a checkpoint written by rank 0 only;
5. rank 0 logs the metrics of every epoch to MLflow (``talkmesh.ops.tracking``), since Ray
   drops metrics-only reports and keeps no per-epoch history with workers >= 1.

Optional method hooks (duck-typed; methods without them train exactly as above):

* ``fit_stage(dataset) -> dict`` - non-gradient fitting (normalisation statistics, k-means,
  ...). Called once on a fresh (not resumed) run, after ``train.init_from`` is loaded, on
  every rank with the training split as whole sequences (a ``ClipDataset``); its logs are
  reported as ``train/fit/<key>``. A stage whose ``trainable_parameters()`` is empty is
  fit-only: it runs one epoch without an optimiser (validation, checkpoint, report as usual).
* ``lr_multiplier(epoch) -> float`` - the epoch's learning rate is ``lr x`` its value
  (e.g. a StepLR schedule; stateless, so resuming needs no scheduler state).
* ``trains_on_vertices = False`` - a parameter-corpus method that does not need the face
  model's vertices in its training batches (skips computing them).

Metric names: ``train/loss`` and every ``train/<term>`` the method logs, ``<split>/lve``,
``<split>/fdd``, ... (all predictions), ``<split>/seen/*``, ``<split>/unseen/*`` (+
``_min``/``_max`` over conditions), ``epoch``, ``step``, ``time/*``.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from talkmesh.config import from_dict
from talkmesh.train.checkpoint import (
    checkpoint_dir_name,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
    select_checkpoint,
)
from talkmesh.train.config import ExperimentConfig

__all__ = ["train_loop_per_worker"]


def _all_gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` (a list of one in local mode / single worker)."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sync_buffers(module: torch.nn.Module, world: int) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics, which each rank updates on
    its own batches) to every rank."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    for buf in module.buffers():
        if buf.dtype == torch.bool:  # gloo has no bool: go through uint8
            t = buf.detach().to(torch.uint8)
            dist.broadcast(t, src=0)
            buf.data.copy_(t.to(torch.bool))
        else:
            dist.broadcast(buf.data, src=0)


@contextlib.contextmanager
def _resume_source(local_mode: bool, run_dir: Path) -> Iterator[Path | None]:
    """Directory of the checkpoint to resume from, or None for a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            yield Path(d)
        return
    if local_mode:
        found = list_checkpoints(run_dir)
        yield found[-1].path if found else None
        return
    yield None


def _load_init_weights(method: torch.nn.Module, source: str, uri: str | None) -> None:
    """Stage input weights from a checkpoint/method directory, a model.pt, or an MLflow URI
    (``runs:/<id>/<path>``, ``models:/<name>@<alias>``) in the tracking store ``uri``."""
    import re

    from talkmesh.train.checkpoint import MODEL_FILE

    path = Path(source).expanduser()
    if re.match(r"^[A-Za-z][\w+.-]*:/", source) and not path.exists():
        from talkmesh.ops.tracking import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = download_artifacts(source, tmp, uri=uri)
            found = next(iter(sorted(local.rglob(MODEL_FILE))), None)
            if found is None:
                raise FileNotFoundError(f"train.init_from: {source} holds no {MODEL_FILE}")
            state = torch.load(found, map_location="cpu", weights_only=True)
    else:
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"train.init_from: {file} not found")
        state = torch.load(file, map_location="cpu", weights_only=True)
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"train.init_from: {source} has weights this method lacks: {unexpected[:5]}")
    if missing:
        print(f"[talkmesh] init_from {source}: {len(missing)} tensors keep their fresh init (e.g. {missing[:3]})")


def _prune_local(run_dir: Path, keep: int, metric: str, mode: str) -> None:
    """Local mode: keep the newest checkpoint and the ``keep`` best (as Ray's CheckpointConfig)."""
    import shutil

    if keep <= 0:
        return
    cks = list_checkpoints(run_dir)
    if len(cks) <= keep:
        return
    ranked = []
    rest = list(cks)
    while rest and len(ranked) < keep:
        best = select_checkpoint(rest, metric, mode, "best")
        assert best is not None
        ranked.append(best)
        rest.remove(best)
    survivors = {c.path for c in ranked} | {cks[-1].path}
    for c in cks:
        if c.path not in survivors:
            shutil.rmtree(c.path, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one method on one worker (see the module docstring). ``config`` keys:
    ``experiment`` (``to_dict(ExperimentConfig)``), ``run_name``, ``storage_path``,
    ``local_mode`` (bool), ``mlflow_run_id`` and ``tracking_uri`` (None = no MLflow)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from talkmesh.data import open_corpus
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.eval.evaluate import condition_subjects, flat_metrics, score_method, summarize
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method

    exp = from_dict(ExperimentConfig, config["experiment"])
    t = exp.train
    sched = exp.schedule()
    local_mode = bool(config.get("local_mode", False))
    run_dir = Path(config["storage_path"]) / config["run_name"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads_before = torch.get_num_threads()
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)

    logger = None
    try:
        # ---- data and method ------------------------------------------------------------
        corpus = open_corpus(exp.data)
        facts = DataFacts.from_corpus(corpus)
        torch.manual_seed(t.seed)  # identical init on every rank
        method = build_method(exp.method, exp.model, facts, preset=exp.preset or None)
        if t.stage:
            method.set_stage(t.stage)

        trainer_state: dict[str, Any] | None = None
        with _resume_source(local_mode, run_dir) as resume_dir:
            if resume_dir is not None:
                from talkmesh.train.checkpoint import MODEL_FILE

                method.load_state_dict(torch.load(resume_dir / MODEL_FILE, map_location="cpu", weights_only=True))
                trainer_state = load_trainer_state(resume_dir)
                if trainer_state.get("stage"):
                    method.set_stage(trainer_state["stage"])
        if trainer_state is None and t.init_from:
            _load_init_weights(method, t.init_from, config.get("tracking_uri"))

        device = ray.train.torch.get_device()
        fit_logs: dict[str, float] = {}
        if trainer_state is None and callable(getattr(method, "fit_stage", None)):  # non-gradient fitting
            method.to(device)
            fit_ds = ClipDataset(corpus, "train", mode="sequence", seed=t.seed)
            fit_logs = {f"train/fit/{k}": float(v) for k, v in (method.fit_stage(fit_ds) or {}).items()}
        params = method.trainable_parameters()
        fit_only = not params  # e.g. a k-means stage: one epoch, no optimiser
        if fit_only:
            model = method.to(device)
            optimizer = None
        else:
            model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": True})
            optimizer = torch.optim.AdamW(params, lr=sched.lr, weight_decay=t.weight_decay)
        lr_multiplier = getattr(method, "lr_multiplier", None)
        num_epochs = 1 if fit_only else sched.epochs
        start_epoch, global_step = 0, 0
        if trainer_state is not None:
            if optimizer is not None:
                optimizer.load_state_dict(trainer_state["optimizer"])
            start_epoch = int(trainer_state["epoch"]) + 1
            global_step = int(trainer_state.get("global_step", 0))
        torch.manual_seed(t.seed + 7919 * (rank + 1) + start_epoch)  # dropout etc.: per rank, per resume

        with_vertices = facts.motion == "params" and facts.num_vertices > 0
        with_vertices = with_vertices and getattr(method, "trains_on_vertices", True)
        train_ds = ClipDataset(corpus, "train", mode="window", seed=t.seed, with_vertices=with_vertices)
        sampler = (
            DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
            if world > 1
            else None
        )
        generator = torch.Generator()
        loader = DataLoader(
            train_ds,
            batch_size=sched.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            collate_fn=train_ds.collate,
            num_workers=t.loader_workers,
            generator=generator,
        )
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)  # methods move their inputs
        steps_per_epoch = len(loader) if not t.limit_train_batches else min(len(loader), t.limit_train_batches)
        conditions = condition_subjects(facts.train_subjects, exp.data.max_conditions, t.seed)

        run_id = config.get("mlflow_run_id")
        if rank == 0 and run_id:
            from talkmesh.ops.tracking import RunLogger

            logger = RunLogger(run_id, uri=config.get("tracking_uri"), system_metrics=t.system_metrics)

        use_bf16 = t.bf16 and device.type == "cuda"
        for epoch in range(start_epoch, num_epochs):
            # ---- train ----------------------------------------------------------------------
            t0 = time.perf_counter()
            train_ds.set_epoch(epoch)
            generator.manual_seed(t.seed * 1_000_003 + epoch)
            if isinstance(getattr(loader, "sampler", None), DistributedSampler):
                loader.sampler.set_epoch(epoch)
            model.train()
            if optimizer is not None and callable(lr_multiplier):
                for group in optimizer.param_groups:
                    group["lr"] = sched.lr * float(lr_multiplier(epoch))
            sums: dict[str, float] = {}
            batches = 0
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(loader if optimizer is not None else ()):
                if i >= steps_per_epoch:
                    break
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with autocast:
                    loss, logs = model(batch)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"{exp.method}: non-finite loss {float(loss)} at epoch {epoch}, batch {i}")
                (loss / sched.grad_accum).backward()
                if (i + 1) % sched.grad_accum == 0 or i + 1 == steps_per_epoch:
                    if t.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), t.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                batches += 1
            train_s = time.perf_counter() - t0
            totals: dict[str, float] = {}
            n_total = 0
            for part_sums, part_n in _all_gather((sums, batches), world):
                n_total += part_n
                for k, v in part_sums.items():
                    totals[k] = totals.get(k, 0.0) + v
            metrics: dict[str, Any] = {f"train/{k}": v / max(n_total, 1) for k, v in totals.items()}
            if epoch == start_epoch:
                metrics.update(fit_logs)
            metrics.update(
                {
                    "epoch": epoch,
                    "step": global_step,
                    "world_size": world,
                    "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0,
                    "time/train_s": train_s,
                }
            )

            # ---- validate (whole sequences, sharded over ranks) -----------------------------
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == num_epochs:
                t1 = time.perf_counter()
                _sync_buffers(method, world)  # every rank validates the weights rank 0 checkpoints
                scored = score_method(
                    method,
                    corpus,
                    t.eval_split,
                    limit=t.limit_eval_sequences,
                    max_conditions=exp.data.max_conditions,
                    seed=t.seed,
                    shard=(rank, world),
                    adapted=t.eval_adapted,
                )
                scored = [s for part in _all_gather(scored, world) for s in part]
                summary = summarize(scored, t.eval_split, conditions)
                metrics.update(flat_metrics(summary, t.eval_split))
                metrics["time/eval_s"] = time.perf_counter() - t1
            metrics.setdefault(t.checkpoint_metric, math.nan)  # no validation: ranked last, still resumable

            # ---- log, checkpoint, report (every rank reports: report() is a barrier) --------
            if logger is not None:
                logger.log_metrics(metrics, step=epoch)
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
                checkpoint = None
                if rank == 0:
                    target = run_dir / checkpoint_dir_name(epoch) if local_mode else Path(tmp) / "ckpt"
                    save_checkpoint(target, model, optimizer, epoch, metrics, extra={"global_step": global_step})
                    checkpoint = ray.train.Checkpoint.from_directory(str(target))
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch))
            if local_mode and rank == 0:
                _prune_local(run_dir, t.checkpoint_num_to_keep, t.checkpoint_metric, t.checkpoint_mode)
            if rank == 0:
                shown = {k: metrics[k] for k in ("train/loss", t.checkpoint_metric) if k in metrics}
                print(f"[talkmesh] {exp.method} epoch {epoch + 1}/{num_epochs} {shown}", flush=True)
    finally:
        if logger is not None:
            logger.close()
        if t.torch_threads:
            torch.set_num_threads(threads_before)
