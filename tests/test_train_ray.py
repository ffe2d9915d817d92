"""The training loop on a real local Ray cluster: 2 TorchTrainer workers (DDP over gloo),
metrics in a real MLflow store, a checkpoint per epoch, resume by re-running the same name,
and a worker killed mid-run (``train.max_failures`` restarts the group from the latest checkpoint).

One loopback-only Ray cluster (2 CPUs) is shared by every test of the session.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from service_helpers import wait_for
from talkmesh.ops import tracking
from talkmesh.train.checkpoint import list_checkpoints, load_method, load_trainer_state, read_progress
from talkmesh.train.config import load_experiment
from talkmesh.train.runner import RunResult, run_training

pytestmark = pytest.mark.slow

EPOCHS = 4


def overrides(tmp: Path, *extra: str) -> list[str]:
    return [
        "preset=debug",
        "data.window_seconds=2.0",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.torch_threads=1",
        "train.system_metrics=false",
        "train.limit_train_batches=6",
        "train.limit_eval_sequences=4",
        "train.checkpoint_num_to_keep=0",
        f"train.storage_path={tmp / 'ray'}",
        *extra,
    ]


@dataclasses.dataclass
class Reference:
    tmp: Path
    uri: str
    result: RunResult
    wall_s: float


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> Reference:
    """An uninterrupted 2-worker run of EPOCHS epochs (seed 0), shared by the tests."""
    tmp = tmp_path_factory.mktemp("train-ray")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the conftest's per-test cache is not set yet
        mp.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))
        t0 = time.perf_counter()
        exp = load_experiment(None, overrides(tmp, f"train.epochs={EPOCHS}", "train.run_name=ddp"))
        result = run_training(exp, tracking_uri=uri)
    return Reference(tmp, uri, result, time.perf_counter() - t0)


def test_two_worker_ddp_training_tracks_and_resumes(reference):
    result, uri = reference.result, reference.uri
    # A checkpoint per epoch, written by rank 0 and persisted by Ray under <storage>/<name>/.
    cks = list_checkpoints(result.run_dir)
    assert [c.epoch for c in cks] == list(range(EPOCHS))
    state = load_trainer_state(cks[-1].path)
    assert state["epoch"] == EPOCHS - 1 and state["global_step"] == 6 * EPOCHS and state["optimizer"]["state"]
    assert cks[-1].metrics["world_size"] == 2
    load_method(cks[-1].path)  # a checkpoint rebuilds the method

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["talkmesh.num_workers"] == "2"
    assert len(run.data.tags["talkmesh.worker_nodes"].split(",")) == 2
    for key in ("train/loss", "val/lve", "val/unseen/lve", "val/seen/lve"):
        assert [m.step for m in client.get_metric_history(result.mlflow_run_id, key)] == list(range(EPOCHS)), key
    # Validation was sharded over the 2 ranks and gathered: 4 sequences, seen and unseen.
    assert cks[-1].metrics["val/lve"] == pytest.approx(run.data.metrics["val/lve"])

    # Resume: the same name continues from the latest checkpoint (one more epoch only).
    t1 = time.perf_counter()
    with pytest.warns(UserWarning, match="train.epochs"):
        exp = load_experiment(None, overrides(reference.tmp, f"train.epochs={EPOCHS + 1}", "train.run_name=ddp"))
        again = run_training(exp, tracking_uri=uri)
    second_s = time.perf_counter() - t1
    assert again.mlflow_run_id == result.mlflow_run_id
    assert [c.epoch for c in list_checkpoints(again.run_dir)] == list(range(EPOCHS + 1))
    steps = sorted(m.step for m in client.get_metric_history(again.mlflow_run_id, "epoch"))
    assert steps == list(range(EPOCHS + 1))
    assert load_trainer_state(list_checkpoints(again.run_dir)[-1].path)["global_step"] == 6 * (EPOCHS + 1)
    a = torch.load(cks[0].path / "model.pt", weights_only=True)
    b = torch.load(list_checkpoints(again.run_dir)[-1].path / "model.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    print(f"\n2-worker DDP run: {EPOCHS} epochs {reference.wall_s:.1f} s, resumed 1 epoch {second_s:.1f} s")
    assert tracking.find_run("talkmesh-faceformer", "ddp", uri=uri) == result.mlflow_run_id


def test_a_worker_killed_mid_run_restarts_from_the_latest_checkpoint(reference):
    """max_failures (default 1): a training worker SIGKILLed at a random point of a random
    middle epoch; the run completes, at most one epoch runs twice, the MLflow run continues
    with each epoch logged once, and the final val LVE is within the seed-to-seed spread."""
    tmp, uri = reference.tmp, reference.uri
    t0 = time.perf_counter()
    seed1 = run_training(
        load_experiment(None, overrides(tmp, f"train.epochs={EPOCHS}", "train.seed=1", "train.run_name=seed1")),
        tracking_uri=uri,
    )
    seed1_s = time.perf_counter() - t0

    rng = random.Random()
    kill_epoch, delay, victim = rng.randint(1, EPOCHS - 2), rng.uniform(0.0, 0.5), rng.randint(0, 1)
    exp = load_experiment(None, overrides(tmp, f"train.epochs={EPOCHS}", "train.run_name=killed"))
    run_dir = Path(exp.train.storage_path) / "killed"
    outcome: dict[str, object] = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(exp, tracking_uri=uri)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            outcome["error"] = e

    t1 = time.perf_counter()
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    wait_for(
        f"epoch {kill_epoch} to start",
        lambda: [e for e in read_progress(run_dir) if e["event"] == "epoch_start" and e["epoch"] == kill_epoch],
        300.0,
        0.05,
    )
    time.sleep(delay)  # the random point of the epoch at which the worker dies
    starts = [e for e in read_progress(run_dir) if e["event"] == "start"]
    pid = next(w["pid"] for w in starts[0]["workers"] if w["rank"] == victim)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    killed_s = time.perf_counter() - t1
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, RunResult)

    progress = read_progress(run_dir)
    starts = [e for e in progress if e["event"] == "start"]
    begun = [e["epoch"] for e in progress if e["event"] == "epoch_start"]
    assert len(starts) == 2, f"the worker group should have restarted once: {starts}"
    repeated = len(begun) - EPOCHS
    assert 0 <= repeated <= 1, f"epochs started: {begun}"
    assert sorted(set(begun)) == list(range(EPOCHS))
    assert starts[1]["start_epoch"] >= kill_epoch  # resumed from the checkpoint before the kill, or later
    assert {w["pid"] for w in starts[1]["workers"]}.isdisjoint({w["pid"] for w in starts[0]["workers"]})

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["talkmesh.worker_starts"] == "2"
    assert tracking.find_run("talkmesh-faceformer", "killed", uri=uri) == result.mlflow_run_id  # one run, continued
    for key in ("epoch", "train/loss", "val/lve"):
        assert [m.step for m in client.get_metric_history(result.mlflow_run_id, key)] == list(range(EPOCHS)), key
    assert [c.epoch for c in list_checkpoints(result.run_dir)] == list(range(EPOCHS))

    lve = result.last_metrics["val/lve"]
    ref0 = reference.result.last_metrics["val/lve"]
    ref1 = seed1.last_metrics["val/lve"]
    spread = abs(ref0 - ref1)
    print(
        f"\nkilled rank {victim} {delay:.2f} s into epoch {kill_epoch}; resumed at epoch {starts[1]['start_epoch']}, "
        f"{repeated} epoch repeated; run {killed_s:.1f} s (uninterrupted seed 1: {seed1_s:.1f} s); final val/lve "
        f"killed {lve:.6e}, uninterrupted seed 0 {ref0:.6e}, seed 1 {ref1:.6e} (seed spread {spread:.3e}, "
        f"killed - seed 0 {lve - ref0:+.3e})"
    )
    assert abs(lve - ref0) <= spread
