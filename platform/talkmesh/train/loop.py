"""The one training loop (DESIGN.md "Training"): ``train_loop_per_worker`` for every method.

Run by Ray Train's ``TorchTrainer`` on each worker (gloo on CPU, NCCL on GPU), or
in-process with ``ScalingConfig(num_workers=0)`` (Ray Train local mode, for tests and
quick runs). Per worker, in named steps (as torchtitan's trainer reads):

1. :func:`build_worker` - rebuild the ``ExperimentConfig`` from ``config["experiment"]``,
   open the corpus and build the method through the registry (same seed on every rank:
   same init); resume from ``ray.train.get_checkpoint()`` (model, optimizer, epoch), or in
   local mode from the newest ``epoch-NNNN/`` under ``<storage_path>/<run_name>/`` (local
   mode keeps checkpoints in memory only, so the loop writes them there itself), else load
   ``train.init_from`` (a stage's input weights) and run the method's ``fit_stage``; build
   the optimizer (``MethodConfig.build_optimizer``), wrap the method with
   ``ray.train.torch.prepare_model`` (DDP when world > 1) and shard the training windows
   with a seeded ``DistributedSampler`` (``prepare_data_loader``);
2. :func:`train_epoch` - per epoch: the learning rate of the stage's schedule times
   ``MethodConfig.lr_factor(stage, epoch)``, ``MotionMethod.on_epoch_start(epoch)``, then
   the training windows;
3. :func:`validate` - whole sequences of ``train.eval_split`` (sharded over ranks,
   gathered, scored as in :mod:`talkmesh.eval.evaluate`);
4. :func:`report_epoch` - rank 0 writes the checkpoint into the run directory; every rank
   calls ``ray.train.report(metrics, checkpoint, checkpoint_dir_name="epoch-NNNN")``, which
   agrees on the name across ranks and hands the report to Ray's controller in the
   background (asynchronous upload mode, nothing to copy); then rank 0 queues the metrics
   for MLflow (``talkmesh.ops.tracking.RunLogger``, since Ray drops metrics-only reports and
   keeps no per-epoch history with workers >= 1).

Faults (``train.max_failures``, default 1): a lost worker makes Ray Train restart the whole
group, which resumes from the latest persisted checkpoint, so at most the epoch in progress
is repeated. Its metrics were not logged yet (they are logged only once the checkpoint is
persisted); a resumed rank 0 logs the resumed checkpoint's metrics if a kill fell between
the two, and does not log again an epoch MLflow already has (a kill before Ray registered
its checkpoint): the MLflow epoch series has neither repeats nor gaps. A resumed group
reseeds torch from (seed, rank, first epoch), so its dropout draws differ from an
uninterrupted run's from there on.
Rank 0 records worker-group starts and epochs in ``<run dir>/progress.jsonl``
(:func:`~talkmesh.train.checkpoint.append_progress`) and tags the MLflow run with
``talkmesh.worker_nodes`` (Ray node id per rank) and ``talkmesh.worker_starts``.

The method is called only through the :class:`~talkmesh.methods.base.MotionMethod` contract:
``fit_stage`` (non-gradient fitting, once on a fresh run, logs reported as
``train/fit/<key>``; a stage whose ``trainable_parameters()`` is empty is fit-only: one
epoch without an optimizer), ``on_epoch_start``, ``trains_on_vertices`` (False: the
training batches of a parameter corpus carry no face-model vertices) and
``style_reference_frames`` (> 0: training windows carry style references from other frames).

Metric names: ``train/loss`` and every ``train/<term>`` the method logs, ``<split>/lve``,
``<split>/fdd``, ... (all predictions), ``<split>/seen/*``, ``<split>/unseen/*`` (+
``_min``/``_max`` over conditions), ``epoch``, ``step``, ``time/*``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from talkmesh.config import from_dict
from talkmesh.train.checkpoint import (
    MODEL_FILE,
    append_progress,
    checkpoint_dir_name,
    checkpoint_epoch,
    list_checkpoints,
    load_trainer_state,
    read_metrics,
    read_progress,
    save_checkpoint,
    select_checkpoint,
)
from talkmesh.train.config import ExperimentConfig

if TYPE_CHECKING:  # pragma: no cover
    import ray.train
    from torch.utils.data import DataLoader

    from talkmesh.data.corpus import Corpus
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.methods.base import MotionMethod, StageSchedule
    from talkmesh.ops.tracking import RunLogger

__all__ = ["WorkerState", "build_worker", "report_epoch", "train_epoch", "train_loop_per_worker", "validate"]


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
    """Directory of the checkpoint to resume from, or None for a fresh start: in local mode
    the newest complete one under ``run_dir``; on Ray the newer of Ray's latest registered
    checkpoint and the newest one rank 0 finished reporting (its ``epoch_end`` in
    ``progress.jsonl``). Ray registers a checkpoint only when its controller next polls the
    workers' reports, so a worker lost right after an epoch would otherwise repeat two epochs."""
    import ray.train

    found = list_checkpoints(run_dir)
    if local_mode:
        yield found[-1].path if found else None
        return
    ended = {e.get("epoch") for e in read_progress(run_dir) if e.get("event") == "epoch_end"}
    persisted = [c for c in found if c.epoch in ended]
    ckpt = ray.train.get_checkpoint()
    registered = checkpoint_epoch(ckpt.path) if ckpt is not None else None
    if persisted and (ckpt is None or (registered is not None and persisted[-1].epoch > registered)):
        yield persisted[-1].path
        return
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def _load_init_weights(method: torch.nn.Module, source: str, uri: str | None) -> None:
    """Stage input weights from a checkpoint/method directory, a model.pt, or an MLflow URI
    (``runs:/<id>/<path>``, ``models:/<name>@<alias>``) in the tracking store ``uri``."""
    import re

    path = Path(source).expanduser()
    if re.match(r"^[A-Za-z][\w+.-]*:/", source) and not path.exists():
        from talkmesh.ops.tracking import load_model_state

        state = load_model_state(source, uri)
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


# --------------------------------------------------------------------------------------
# The worker's state and the steps
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkerState:
    """What one worker holds while it trains (built by :func:`build_worker`)."""

    exp: ExperimentConfig
    sched: StageSchedule
    corpus: Corpus
    method: MotionMethod
    model: torch.nn.Module  # the method, DDP-wrapped when world > 1 (the method itself when fit-only)
    optimizer: torch.optim.Optimizer | None  # None: a fit-only stage
    train_ds: ClipDataset
    loader: DataLoader
    generator: torch.Generator  # the loader's shuffling, reseeded every epoch
    device: torch.device
    rank: int
    world: int
    run_dir: Path  # <storage_path>/<run_name>
    local_mode: bool
    start_epoch: int
    num_epochs: int
    global_step: int
    steps_per_epoch: int
    conditions: list[str]  # training subjects that decode unseen subjects in validation
    fit_logs: dict[str, float]  # train/fit/* of fit_stage, reported with the first epoch
    logger: RunLogger | None = None  # rank 0 with an MLflow run
    logged_epochs: set[int] = dataclasses.field(default_factory=set)  # epochs MLflow had when this group started


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one method on one worker (see the module docstring). ``config`` keys:
    ``experiment`` (``to_dict(ExperimentConfig)``), ``run_name``, ``storage_path``,
    ``local_mode`` (bool), ``mlflow_run_id`` and ``tracking_uri`` (None = no MLflow)."""
    exp = from_dict(ExperimentConfig, config["experiment"])
    t = exp.train
    threads_before = torch.get_num_threads()
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    state: WorkerState | None = None
    try:
        state = build_worker(exp, config)
        for epoch in range(state.start_epoch, state.num_epochs):
            if state.rank == 0:
                append_progress(state.run_dir, {"event": "epoch_start", "epoch": epoch})
            metrics = train_epoch(state, epoch)
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == state.num_epochs:
                metrics.update(validate(state))
            metrics.setdefault(t.checkpoint_metric, math.nan)  # no validation: ranked last, still resumable
            report_epoch(state, epoch, metrics)
    finally:
        if state is not None and state.logger is not None:
            state.logger.close()
        if t.torch_threads:
            torch.set_num_threads(threads_before)


# ---- build ----------------------------------------------------------------------------


def build_worker(exp: ExperimentConfig, config: dict[str, Any]) -> WorkerState:
    """Corpus, method (resumed, or initialised and fitted), optimizer, sharded loader and
    rank 0's MLflow logger of one worker."""
    import ray.train
    import ray.train.torch

    from talkmesh.data import open_corpus
    from talkmesh.eval.evaluate import condition_subjects

    t = exp.train
    sched = exp.schedule()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_mode = bool(config.get("local_mode", False))
    run_dir = Path(config["storage_path"]) / config["run_name"]
    corpus = open_corpus(exp.data)
    method = _build_method(exp, corpus)
    trainer_state, resumed_metrics = _resume(method, local_mode, run_dir)
    if trainer_state is None and t.init_from:
        _load_init_weights(method, t.init_from, config.get("tracking_uri"))
    device = ray.train.torch.get_device()
    fit_logs = _fit_stage(method, corpus, t.seed, device) if trainer_state is None else {}
    model, optimizer = _build_optimizer(method, sched, t.weight_decay, device)
    start_epoch, global_step = _restore_trainer(optimizer, trainer_state)
    torch.manual_seed(t.seed + 7919 * (rank + 1) + start_epoch)  # dropout etc.: per rank, per resume
    train_ds, loader, generator = _build_loader(exp, corpus, method, sched, rank, world)
    state = WorkerState(
        exp=exp,
        sched=sched,
        corpus=corpus,
        method=method,
        model=model,
        optimizer=optimizer,
        train_ds=train_ds,
        loader=loader,
        generator=generator,
        device=device,
        rank=rank,
        world=world,
        run_dir=run_dir,
        local_mode=local_mode,
        start_epoch=start_epoch,
        num_epochs=1 if optimizer is None else sched.epochs,  # a fit-only stage: one epoch
        global_step=global_step,
        steps_per_epoch=len(loader) if not t.limit_train_batches else min(len(loader), t.limit_train_batches),
        conditions=condition_subjects(method.facts.train_subjects, exp.data.max_conditions, t.seed),
        fit_logs=fit_logs,
    )
    state.logger = _run_logger(config, t.system_metrics) if rank == 0 else None
    _record_start(state, resumed_metrics)
    return state


def _node_id() -> str:
    """The Ray node id of this process ("local" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _record_start(s: WorkerState, resumed_metrics: dict[str, Any] | None) -> None:
    """Every rank's (pid, Ray node id) gathered; rank 0 appends the group's ``start`` event to
    ``progress.jsonl``, tags the MLflow run with the node ids and the number of starts, and,
    on a resume, logs the resumed checkpoint's metrics when MLflow lacks that epoch (a worker
    lost after the checkpoint was persisted but before its metrics were logged)."""
    workers = _all_gather({"rank": s.rank, "pid": os.getpid(), "node_id": _node_id()}, s.world)
    if s.rank != 0:
        return
    append_progress(s.run_dir, {"event": "start", "start_epoch": s.start_epoch, "workers": workers})
    if s.logger is None:
        return
    starts = sum(e.get("event") == "start" for e in read_progress(s.run_dir))
    nodes = ",".join(w["node_id"] for w in workers)
    s.logger.set_tags({"talkmesh.worker_nodes": nodes, "talkmesh.worker_starts": starts})
    s.logged_epochs = s.logger.logged_steps("epoch")
    done = s.start_epoch - 1
    if resumed_metrics and done >= 0 and done not in s.logged_epochs:
        s.logger.log_metrics(resumed_metrics, step=done)
        s.logged_epochs.add(done)


def _run_logger(config: dict[str, Any], system_metrics: bool) -> RunLogger | None:
    """Rank 0's MLflow logger of the run ``config["mlflow_run_id"]`` (None: no MLflow)."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    from talkmesh.ops.tracking import RunLogger

    return RunLogger(run_id, uri=config.get("tracking_uri"), system_metrics=system_metrics)


def _build_method(exp: ExperimentConfig, corpus: Corpus) -> MotionMethod:
    """The method of ``exp`` on the corpus's facts, seeded so every rank starts alike."""
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method

    facts = DataFacts.from_corpus(corpus)
    torch.manual_seed(exp.train.seed)  # identical init on every rank
    method = build_method(exp.method, exp.model, facts, preset=exp.preset or None)
    if exp.train.stage:
        method.set_stage(exp.train.stage)
    if method.template_input == "vertices":  # carried into every checkpoint: audio alone animates
        method.set_templates(_training_templates(corpus, facts.train_subjects))
    return method


def _training_templates(corpus: Corpus, subjects: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The (V, 3) neutral templates of the training ``subjects`` the corpus has (a parameter
    corpus without a face model has none; FLAME-parameter methods carry their identities'
    shapes in their own buffers instead)."""
    out: dict[str, np.ndarray] = {}
    for subject in subjects:
        tmpl = corpus.template(subject)
        if tmpl is not None:
            out[subject] = np.asarray(tmpl, dtype=np.float32)
    return out


def _resume(
    method: MotionMethod, local_mode: bool, run_dir: Path
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Load the checkpoint to resume from into ``method``; (its trainer state, its metrics),
    (None, None) for a fresh run."""
    with _resume_source(local_mode, run_dir) as resume_dir:
        if resume_dir is None:
            return None, None
        method.load_state_dict(torch.load(resume_dir / MODEL_FILE, map_location="cpu", weights_only=True))
        trainer_state = load_trainer_state(resume_dir)
        metrics = read_metrics(resume_dir)
    if trainer_state.get("stage"):
        method.set_stage(trainer_state["stage"])
    return trainer_state, metrics


def _restore_trainer(optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any] | None) -> tuple[int, int]:
    """(first epoch to train, global step so far); a resumed optimizer gets its saved state."""
    if trainer_state is None:
        return 0, 0
    if optimizer is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    return int(trainer_state["epoch"]) + 1, int(trainer_state.get("global_step", 0))


def _fit_stage(method: MotionMethod, corpus: Corpus, seed: int, device: torch.device) -> dict[str, float]:
    """The method's non-gradient fitting of its stage on whole training sequences; its logs
    as ``train/fit/<key>``."""
    from talkmesh.data.dataset import ClipDataset

    method.to(device)
    fit_ds = ClipDataset(corpus, "train", mode="sequence", seed=seed)
    return {f"train/fit/{k}": float(v) for k, v in method.fit_stage(fit_ds).items()}


def _build_optimizer(
    method: MotionMethod, sched: StageSchedule, weight_decay: float, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """(model, optimizer): the prepared (DDP when world > 1) method and its config's
    optimizer; a stage without trainable parameters (e.g. k-means) gets no optimizer."""
    import ray.train.torch

    params = method.trainable_parameters()
    if not params:
        return method.to(device), None
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = method.config.build_optimizer(params, stage=method.stage, lr=sched.lr, weight_decay=weight_decay)
    return model, optimizer


def _build_loader(
    exp: ExperimentConfig, corpus: Corpus, method: MotionMethod, sched: StageSchedule, rank: int, world: int
) -> tuple[ClipDataset, DataLoader, torch.Generator]:
    """Training windows, sharded over ranks by a seeded ``DistributedSampler`` (world > 1)."""
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from talkmesh.data.dataset import ClipDataset

    t = exp.train
    facts = method.facts
    with_vertices = facts.motion == "params" and facts.num_vertices > 0 and method.trains_on_vertices
    train_ds = ClipDataset(
        corpus,
        "train",
        mode="window",
        seed=t.seed,
        with_vertices=with_vertices,
        style_reference_frames=method.style_reference_frames(),
    )
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
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
    return train_ds, loader, generator


# ---- train one epoch ------------------------------------------------------------------


def train_epoch(s: WorkerState, epoch: int) -> dict[str, Any]:
    """One epoch on the training windows (none for a fit-only stage); the metrics so far:
    ``train/*`` averaged over every rank's batches, ``epoch``, ``step``, ``lr``, ..."""
    from torch.utils.data import DistributedSampler

    t0 = time.perf_counter()
    s.train_ds.set_epoch(epoch)
    s.generator.manual_seed(s.exp.train.seed * 1_000_003 + epoch)
    if isinstance(s.loader.sampler, DistributedSampler):
        s.loader.sampler.set_epoch(epoch)
    s.model.train()
    if s.optimizer is not None:
        factor = s.method.config.lr_factor(s.method.stage, epoch)
        for group in s.optimizer.param_groups:
            group["lr"] = s.sched.lr * float(factor)
    s.method.on_epoch_start(epoch)
    sums, batches = _train_batches(s, epoch) if s.optimizer is not None else ({}, 0)
    train_s = time.perf_counter() - t0
    totals: dict[str, float] = {}
    n_total = 0
    for part_sums, part_n in _all_gather((sums, batches), s.world):
        n_total += part_n
        for k, v in part_sums.items():
            totals[k] = totals.get(k, 0.0) + v
    metrics: dict[str, Any] = {f"train/{k}": v / max(n_total, 1) for k, v in totals.items()}
    if epoch == s.start_epoch:
        metrics.update(s.fit_logs)
    metrics.update(
        {
            "epoch": epoch,
            "step": s.global_step,
            "world_size": s.world,
            "lr": s.optimizer.param_groups[0]["lr"] if s.optimizer is not None else 0.0,
            "time/train_s": train_s,
        }
    )
    return metrics


def _train_batches(s: WorkerState, epoch: int) -> tuple[dict[str, float], int]:
    """Forward, backward and (every ``grad_accum`` batches) optimizer steps over this rank's
    share of the epoch; the summed logs and the number of batches."""
    assert s.optimizer is not None
    t = s.exp.train
    use_bf16 = t.bf16 and s.device.type == "cuda"
    sums: dict[str, float] = {}
    batches = 0
    s.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(s.loader):
        if i >= s.steps_per_epoch:
            break
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with autocast:
            loss, logs = s.model(batch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{s.exp.method}: non-finite loss {float(loss)} at epoch {epoch}, batch {i}")
        (loss / s.sched.grad_accum).backward()
        if (i + 1) % s.sched.grad_accum == 0 or i + 1 == s.steps_per_epoch:
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(s.method.trainable_parameters(), t.grad_clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            s.global_step += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        batches += 1
    return sums, batches


# ---- validate -------------------------------------------------------------------------


def validate(s: WorkerState) -> dict[str, float]:
    """Whole sequences of ``train.eval_split``, sharded over ranks and gathered: the
    ``<split>/*`` metrics and ``time/eval_s``."""
    from talkmesh.eval.evaluate import EvalProtocol, flat_metrics, score_method, summarize

    t = s.exp.train
    t1 = time.perf_counter()
    _sync_buffers(s.method, s.world)  # every rank validates the weights rank 0 checkpoints
    protocol = EvalProtocol(
        limit=t.limit_eval_sequences,
        max_conditions=s.exp.data.max_conditions,
        seed=t.seed,
        shard=(s.rank, s.world),
        adapted=t.eval_adapted,
    )
    scored = score_method(s.method, s.corpus, t.eval_split, protocol)
    scored = [x for part in _all_gather(scored, s.world) for x in part]
    metrics = flat_metrics(summarize(scored, t.eval_split, s.conditions), t.eval_split)
    metrics["time/eval_s"] = time.perf_counter() - t1
    return metrics


# ---- report and checkpoint ------------------------------------------------------------


def report_epoch(s: WorkerState, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the epoch's checkpoint straight into the run directory (Ray's storage for
    the run, :func:`_write_checkpoint`); every rank reports it (``ray.train.report``); then rank
    0 queues ``metrics`` for MLflow (``RunLogger.log_metrics``: at most one epoch in flight) and
    appends the epoch's end to ``progress.jsonl`` (after the checkpoint is on storage, so a
    restart never logs an epoch twice).

    The report is asynchronous: Ray's controller takes a worker's report only when it next
    polls the workers, and a worker's next report waits until the previous one is taken, which
    used to stall every epoch shorter than the poll interval. The checkpoint is already where
    Ray keeps it, so the upload step returns it as is (no copy, nothing deleted) and the report
    waits for its turn on Ray's upload thread while training goes on. Ray registers it (ranking,
    ``num_to_keep``, restarts) when it takes the report; a restart before that resumes from the
    newest checkpoint ``progress.jsonl`` ends (:func:`_resume_source`), and the training thread's
    end waits for the reports still queued."""
    import ray.train
    from ray.train import CheckpointUploadMode

    t = s.exp.train
    checkpoint = None
    if s.rank == 0:
        target = _write_checkpoint(s, epoch, metrics)
        checkpoint = ray.train.Checkpoint.from_directory(str(target))
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_dir_name=checkpoint_dir_name(epoch),
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        checkpoint_upload_fn=_already_stored,
        delete_local_checkpoint_after_upload=False,
    )
    if s.local_mode and s.rank == 0:
        _prune_local(s.run_dir, t.checkpoint_num_to_keep, t.checkpoint_metric, t.checkpoint_mode)
    # Already logged: a restart repeated an epoch whose checkpoint Ray had not registered.
    if s.logger is not None and epoch not in s.logged_epochs:
        s.logger.log_metrics(metrics, step=epoch)
    if s.rank == 0:
        append_progress(s.run_dir, {"event": "epoch_end", "epoch": epoch, "step": s.global_step})
        shown = {k: metrics[k] for k in ("train/loss", t.checkpoint_metric) if k in metrics}
        print(f"[talkmesh] {s.exp.method} epoch {epoch + 1}/{s.num_epochs} {shown}", flush=True)


def _write_checkpoint(s: WorkerState, epoch: int, metrics: dict[str, Any]) -> Path:
    """``<run dir>/epoch-NNNN/``, written whole or not at all: into a hidden sibling first, then
    renamed (a repeated epoch replaces its earlier directory), so a worker lost mid-write
    leaves no half checkpoint under a checkpoint's name (its hidden sibling is removed by the
    next write of that epoch)."""
    import shutil

    target = s.run_dir / checkpoint_dir_name(epoch)
    partial = s.run_dir / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_checkpoint(partial, s.model, s.optimizer, epoch, metrics, extra={"global_step": s.global_step})
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _already_stored(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
    """Ray's upload step for a checkpoint rank 0 wrote into the run directory itself: nothing to copy."""
    return checkpoint
