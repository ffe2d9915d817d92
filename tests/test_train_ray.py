"""The training loop on a real local Ray cluster: 2 TorchTrainer workers (DDP over gloo),
metrics in a real MLflow store, a checkpoint per epoch, resume by re-running the same name.

One loopback-only Ray cluster (2 CPUs) is shared by every test of the session.
"""

from __future__ import annotations

import time

import pytest
import torch

from talkmesh.ops import tracking
from talkmesh.train.checkpoint import list_checkpoints, load_method, load_trainer_state
from talkmesh.train.config import load_experiment
from talkmesh.train.runner import run_training

pytestmark = pytest.mark.slow


def test_two_worker_ddp_training_tracks_and_resumes(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "preset=debug",
        "data.window_seconds=2.0",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.torch_threads=1",
        "train.system_metrics=false",
        "train.limit_train_batches=6",
        "train.limit_eval_sequences=4",
        "train.checkpoint_num_to_keep=0",
        f"train.storage_path={tmp_path / 'ray'}",
        "train.run_name=ddp",
    ]
    t0 = time.perf_counter()
    result = run_training(load_experiment(None, [*common, "train.epochs=2"]), tracking_uri=uri)
    first_s = time.perf_counter() - t0

    # A checkpoint per epoch, written by rank 0 and persisted by Ray under <storage>/<name>/.
    cks = list_checkpoints(result.run_dir)
    assert [c.epoch for c in cks] == [0, 1]
    state = load_trainer_state(cks[-1].path)
    assert state["epoch"] == 1 and state["global_step"] == 12 and state["optimizer"]["state"]
    assert cks[-1].metrics["world_size"] == 2
    load_method(cks[-1].path)  # a checkpoint rebuilds the method

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["talkmesh.num_workers"] == "2"
    for key in ("train/loss", "val/lve", "val/unseen/lve", "val/seen/lve"):
        assert [m.step for m in client.get_metric_history(result.mlflow_run_id, key)] == [0, 1], key
    # Validation was sharded over the 2 ranks and gathered: 4 sequences, seen and unseen.
    assert cks[-1].metrics["val/lve"] == pytest.approx(run.data.metrics["val/lve"])

    # Resume: the same name continues from the latest checkpoint (epoch 2 only).
    t1 = time.perf_counter()
    with pytest.warns(UserWarning, match="train.epochs"):
        again = run_training(load_experiment(None, [*common, "train.epochs=3"]), tracking_uri=uri)
    second_s = time.perf_counter() - t1
    assert again.mlflow_run_id == result.mlflow_run_id
    assert [c.epoch for c in list_checkpoints(again.run_dir)] == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(again.mlflow_run_id, "epoch")) == [0, 1, 2]
    assert load_trainer_state(list_checkpoints(again.run_dir)[-1].path)["global_step"] == 18
    a = torch.load(cks[0].path / "model.pt", weights_only=True)
    b = torch.load(list_checkpoints(again.run_dir)[-1].path / "model.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    print(f"\n2-worker DDP run: 2 epochs {first_s:.1f} s, resumed 1 epoch {second_s:.1f} s")
    assert tracking.find_run("talkmesh-faceformer", "ddp", uri=uri) == result.mlflow_run_id
