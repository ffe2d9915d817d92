"""Resumable sweeps (talkmesh.ops.sweep): a sweep driver killed mid-sweep (SIGKILL, no
clean-up of its own) and run again under the same name finishes the sweep without re-running
finished trials, continues the interrupted trial from its checkpoint, and leaves one MLflow
parent run with one child run per trial, none of them RUNNING.

The first driver is ``sweeps/run.py`` in a subprocess attached to the session's Ray cluster
(``RAY_ADDRESS`` = its GCS address). That cluster uses token authentication: ``ray.init`` in
this process set ``RAY_AUTH_MODE=token`` in ``os.environ`` and keeps the token in
``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``), so the subprocess gets
both by inheriting the environment. The second run is ``run_sweep`` in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAME = "resume"
EPOCHS = 2
SWEEP = """\
method: faceformer
preset: small
overrides:
  - preset=debug
  - train.epochs={epochs}
  - train.num_workers=1
  - train.batch_size=2
  - train.torch_threads=1
  - train.limit_train_batches=16
  - train.limit_eval_sequences=2
  - train.preview=false
  - train.log_checkpoint=false
  - train.system_metrics=false
  - train.storage_path={storage}
metric: val/lve
mode: min
num_samples: 3
max_concurrent_trials: 1
scheduler: {{type: fifo}}
search: {{type: random, seed: 0}}
space:
  train.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}
"""


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 0.1) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train has committed for the run (what a resumed
    run starts after): its checkpoint manager snapshot, written after each registration."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name") or ""
    return int(name.removeprefix("epoch-")) if name.startswith("epoch-") else None


def tune_statuses(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved (what a restore reads)."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    trials = (json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def sweep_runs(client: Any, experiment: str) -> list[Any]:
    """Every MLflow run of the sweep NAME: its parent and its trials' child runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`talkmesh.sweep` = '{NAME}'")


def epoch_history(client: Any, run_id: str) -> list[tuple[int, int]]:
    """(step, timestamp ms) of every val/lve value logged to the run, in step order."""
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "val/lve"))


def checkpoint_files(run_dir: Path) -> dict[str, int]:
    """Every file of the run's epoch-NNNN/ checkpoints with its modification time (ns)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.glob("epoch-*/*"))}


def job_of(pid: int) -> str:
    """The Ray job id of the driver process ``pid``."""
    from ray._private.state import jobs

    return next((j["JobID"] for j in jobs() if j.get("DriverPid") == str(pid) or j.get("DriverPid") == pid), "")


def live_actors(job_id: str) -> list[str]:
    """Actors of the job that the GCS does not list as DEAD."""
    from ray._private.state import actors

    return [a["ActorClassName"] for a in actors().values() if a["JobID"] == job_id and a["State"] != "DEAD"]


def all_free(ray: Any) -> bool:
    """Whether every CPU and TRAIN_DRIVER slot of the cluster is available."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return all(free.get(k, 0.0) == total[k] for k in ("CPU", "TRAIN_DRIVER"))


def test_a_killed_sweep_resumes_under_its_name(ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from talkmesh.ops.sweep import load_sweep, run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(SWEEP.format(epochs=EPOCHS, storage=tmp_path / "ray"))
    sweep_dir = tmp_path / "ray" / "sweeps" / NAME
    client = MlflowClient(tracking_uri=uri)
    experiment = "talkmesh-faceformer"

    # 1. The first driver, a process of its own on the session's cluster.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri}
    log = (tmp_path / "driver1.log").open("w")
    cmd = [sys.executable, "sweeps/run.py", str(cfg_path), "--name", NAME, "--no-register"]
    t0 = time.perf_counter()
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def driver_log() -> str:
        return textwrap.indent((tmp_path / "driver1.log").read_text()[-6000:], "  | ")

    def kill_point() -> dict[str, Any] | None:
        """(finished trial, interrupted trial) once one trial's run is FINISHED and another,
        still RUNNING, has a committed checkpoint before its last epoch and no epoch logged
        past it (a kill after rank 0 logs an epoch and before Train commits its checkpoint
        would repeat that epoch: the loop logs first)."""
        if driver.poll() is not None:
            pytest.fail(f"the first driver ended (rc {driver.returncode}) before the kill point:\n{driver_log()}")
        cut = {d.name: ck for d in (sweep_dir / "train").glob(f"{NAME}-*")
               if (ck := latest_checkpoint_epoch(d)) is not None and ck < EPOCHS - 1}  # fmt: skip
        if not cut:  # checked first: no MLflow query until a trial is past its first checkpoint
            return None
        children = [r for r in sweep_runs(client, experiment) if "talkmesh.trial_id" in r.data.tags]
        finished = [r for r in children if r.info.status == "FINISHED"]
        for r in children:
            if not finished or r.info.status != "RUNNING" or r.info.run_name not in cut:
                continue
            steps = [s for s, _ in epoch_history(client, r.info.run_id)]
            if steps and max(steps) == cut[r.info.run_name]:
                return {"finished": finished[0], "interrupted": r, "checkpoint": cut[r.info.run_name]}
        return None

    try:
        point = wait_for("a finished trial and an interrupted one with a checkpoint", kill_point, 300.0, 0.05)
        driver.send_signal(signal.SIGKILL)
        killed_at = time.time()
        t_kill = time.perf_counter() - t0
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    done, cut, ck = point["finished"], point["interrupted"], point["checkpoint"]
    saved = tune_statuses(sweep_dir)
    cut_dir, done_dir = sweep_dir / "train" / cut.info.run_name, sweep_dir / "train" / done.info.run_name

    # The killed driver's trial actors (trial driver, Train controller, Train worker) die with
    # its job, and the resources they held come back.
    job = job_of(driver.pid)
    assert job, "the first driver's Ray job was not found"
    wait_for("the killed driver's actors to die", lambda: not live_actors(job), 60.0, 0.2)
    wait_for("the killed driver's CPUs and TRAIN_DRIVER slots to be freed", lambda: all_free(ray_cluster), 60.0, 0.2)
    t_dead = time.perf_counter() - t0
    before = {
        "done_history": epoch_history(client, done.info.run_id),
        "done_end": client.get_run(done.info.run_id).info.end_time,
        "done_files": checkpoint_files(done_dir),
        "cut_files": checkpoint_files(cut_dir),
        "cut_steps": [s for s, _ in epoch_history(client, cut.info.run_id)],
    }
    assert client.get_run(cut.info.run_id).info.status == "RUNNING"  # what a killed driver leaves behind

    # 2. The same name again, in this process: the sweep is restored and runs to its end.
    t1 = time.perf_counter()
    result = run_sweep(load_sweep(cfg_path, name=NAME), tracking_uri=uri, register=False)
    resume_s = time.perf_counter() - t1
    table = "\n".join(f"{t.trial_id} {t.status} {t.epochs}/{t.planned_epochs} {t.metric}" for t in result.trials)
    assert result.resumed and len(result.trials) == 3, table
    assert all(t.status == "FINISHED" and t.epochs == EPOCHS and t.error is None for t in result.trials), table
    by_name = {t.run_name: t for t in result.trials}
    assert {done.info.run_name, cut.info.run_name} <= set(by_name), table

    # The finished trial was not run again: same epochs, same checkpoints, same end.
    assert epoch_history(client, done.info.run_id) == before["done_history"]
    assert [s for s, _ in before["done_history"]] == list(range(EPOCHS))
    assert checkpoint_files(done_dir) == before["done_files"]
    assert client.get_run(done.info.run_id).info.end_time == before["done_end"]

    # The interrupted trial went on from its checkpoint: every epoch once, those after the
    # checkpoint logged after the kill, the checkpoints it had kept as they were.
    history = epoch_history(client, cut.info.run_id)
    assert [s for s, _ in history] == list(range(EPOCHS)), history
    resumed_steps = [s for s, ts in history if ts > killed_at * 1000]
    assert resumed_steps and resumed_steps[0] == ck + 1 and before["cut_steps"] == list(range(ck + 1)), history
    assert {k: v for k, v in checkpoint_files(cut_dir).items() if k in before["cut_files"]} == before["cut_files"]
    assert by_name[cut.info.run_name].run_id == cut.info.run_id

    # MLflow: one parent run, one child run per trial, the trials' runs, nothing RUNNING.
    runs = sweep_runs(client, experiment)
    parents = [r for r in runs if r.info.run_name == f"sweep-{NAME}"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [r.info.run_id for r in parents] == [result.parent_run_id]
    assert sorted(r.info.run_name for r in children) == sorted(by_name), [r.info.run_name for r in children]
    assert {r.info.run_id for r in children} == {t.run_id for t in result.trials}
    assert len(runs) == 1 + len(result.trials)
    assert {r.info.run_id: r.info.status for r in runs if r.info.status != "FINISHED"} == {}
    total = time.perf_counter() - t0
    print(
        f"\nresumable sweep of 3 trials x {EPOCHS} epochs: killed after {t_kill:.1f} s "
        f"(trial {cut.info.run_name} at checkpoint epoch {ck}, {done.info.run_name} finished), "
        f"its actors dead and resources free {t_dead - t_kill:.1f} s later; resumed sweep {resume_s:.1f} s "
        f"(sweep's own wall {result.wall_s:.1f} s); total {total:.1f} s; Tune's saved state at the kill: {saved}"
    )
