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
from pathlib import Path
from typing import Any

import pytest

from service_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.learning]  # ~100 s: with the long checks (make test-learning)

REPO = Path(__file__).resolve().parents[1]
NAME = "resume"
EPOCHS = 3  # the kill needs a registered checkpoint and a last epoch not ended yet
TRIALS = 2  # one finishes, one is killed mid-run; each trial's start costs ~15 s (processes)
SWEEP = """\
method: faceformer
preset: small
overrides:
  - preset=debug
  - train.epochs={epochs}
  - train.num_workers=1
  - train.batch_size=2
  - train.torch_threads=1
  - train.limit_train_batches=8
  - train.limit_eval_sequences=2
  - train.preview=false
  - train.log_checkpoint=false
  - train.system_metrics=false
  - train.storage_path={storage}
metric: val/lve
mode: min
num_samples: {trials}
max_concurrent_trials: 1
scheduler: {{type: fifo}}
search: {{type: random, seed: 0}}
space:
  train.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}
"""


def latest_checkpoint(run_dir: Path) -> int | None:
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


def sweep_runs(client: Any) -> list[Any]:
    """Every MLflow run of the sweep NAME: its parent and its trials' child runs."""
    exp = client.get_experiment_by_name("talkmesh-faceformer")
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

    return next((j["JobID"] for j in jobs() if str(j.get("DriverPid")) == str(pid)), "")


def job_actors(job_id: str) -> dict[str, list[tuple[str, str]]]:
    """The job's actors as (class, state): ``owned`` (fate-shared with the job's driver) and
    ``detached`` (they outlive it by design, e.g. Ray Train's PlacementGroupCleaner)."""
    from ray._private.state import actors

    out: dict[str, list[tuple[str, str]]] = {"owned": [], "detached": []}
    for a in actors().values():
        if a["JobID"] == job_id:
            out["detached" if a["IsDetached"] else "owned"].append((a["ActorClassName"], a["State"]))
    return out


def live_owned(job_id: str) -> list[tuple[str, str]]:
    """The job's owned actors that are not DEAD yet."""
    return [a for a in job_actors(job_id)["owned"] if a[1] != "DEAD"]


def free_slots(ray: Any) -> dict[str, float]:
    """The cluster's available CPUs and TRAIN_DRIVER slots."""
    free = ray.available_resources()
    return {k: free.get(k, 0.0) for k in ("CPU", "TRAIN_DRIVER")}


def test_tune_saves_the_sweep_state_often_unless_told_otherwise(monkeypatch):
    """While a sweep runs, Tune saves its experiment state every STATE_SAVE_PERIOD_S (its own
    "auto" waits up to 10 s, and a driver killed in that time restarts a trial that had ended);
    a TUNE_GLOBAL_CHECKPOINT_S the user set wins; the environment is restored afterwards."""
    from talkmesh.ops.sweep.run import STATE_SAVE_PERIOD_S, _state_saved_every

    key = "TUNE_GLOBAL_CHECKPOINT_S"
    monkeypatch.delenv(key, raising=False)
    with _state_saved_every(STATE_SAVE_PERIOD_S):
        assert float(os.environ[key]) == STATE_SAVE_PERIOD_S <= 1.0
    assert key not in os.environ
    monkeypatch.setenv(key, "60")
    with _state_saved_every(STATE_SAVE_PERIOD_S):
        assert os.environ[key] == "60"
    assert os.environ[key] == "60"


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_both_searches_keep_to_max_concurrent_trials(tmp_path, search):
    """Tune ignores TuneConfig.max_concurrent_trials for a SearchGenerator (random search):
    the generator itself carries the cap there; Optuna is capped by Tune's ConcurrencyLimiter."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from talkmesh.ops.sweep import load_sweep
    from talkmesh.ops.sweep.run import _tune_config

    cfg_path = tmp_path / "sweep.yaml"
    body = SWEEP.format(epochs=EPOCHS, trials=TRIALS, storage=tmp_path).replace("type: random", f"type: {search}")
    cfg_path.write_text(body.replace("max_concurrent_trials: 1", "max_concurrent_trials: 2"))
    tc = _tune_config(load_sweep(cfg_path))
    if search == "random":
        assert isinstance(tc.search_alg, BasicVariantGenerator) and tc.search_alg.max_concurrent == 2
        assert tc.max_concurrent_trials is None  # Tune would warn that it ignores it
    else:
        assert tc.max_concurrent_trials == 2


def test_a_killed_sweep_resumes_under_its_name(ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from talkmesh.ops.sweep import load_sweep, run_sweep
    from talkmesh.train.checkpoint import read_progress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(SWEEP.format(epochs=EPOCHS, trials=TRIALS, storage=tmp_path / "ray"))
    sweep_dir = tmp_path / "ray" / "sweeps" / NAME
    client = MlflowClient(tracking_uri=uri)

    # 1. The first driver, a process of its own on the session's cluster.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri}
    log_path = tmp_path / "driver1.log"
    cmd = [sys.executable, "sweeps/run.py", str(cfg_path), "--name", NAME, "--no-register"]
    baseline = free_slots(ray_cluster)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished: list[Any] = []

    def resumable(run_dir: Path) -> bool:
        """Ray Train registered a checkpoint of the run, and its last epoch has not ended."""
        ended = {e.get("epoch") for e in read_progress(run_dir) if e["event"] == "epoch_end"}
        return latest_checkpoint(run_dir) is not None and EPOCHS - 1 not in ended

    def kill_point() -> dict[str, Any] | None:
        """(finished trial, interrupted trial) once a trial's run is FINISHED and another's
        is RUNNING with a registered checkpoint and epochs left to train."""
        if driver.poll() is not None:
            tail = textwrap.indent(log_path.read_text()[-6000:], "  | ")
            pytest.fail(f"the first driver ended (rc {driver.returncode}) before the kill point:\n{tail}")
        cut = {d.name for d in (sweep_dir / "train").glob(f"{NAME}-*") if resumable(d)}
        if not cut:  # checked first: no MLflow query until a trial is past its first checkpoint
            return None
        runs = [r for r in sweep_runs(client) if "talkmesh.trial_id" in r.data.tags]
        finished[:] = finished or [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING" and r.info.run_name in cut]
        return {"finished": finished[0], "interrupted": running[0]} if finished and running else None

    try:
        point = wait_for("a finished trial and an interrupted one with a checkpoint", kill_point, 300.0, 0.05)
        # The driver's job owns its trial actors (Tune trial, Train controller, Train worker),
        # read while they live: once the job is dead, the GCS may drop its dead actors' records.
        job = job_of(driver.pid)
        owned = {cls for cls, _ in job_actors(job)["owned"]}
        held = free_slots(ray_cluster)
        driver.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter() - t0
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    done, cut = point["finished"], point["interrupted"]
    done_dir, cut_dir = (sweep_dir / "train" / r.info.run_name for r in (done, cut))

    # Its trial actors die with the job, and the CPUs and TRAIN_DRIVER slots they held come back.
    assert job, "the killed driver's Ray job was not found"
    assert {"TrainController", "RayTrainWorker"} <= owned, sorted(owned)  # the trial's controller and worker
    # The Tune trial actor holds a TRAIN_DRIVER slot (its record in the GCS actor table went
    # missing in one CI run, so the slot it holds is what shows it lived and, below, that it died).
    assert held["TRAIN_DRIVER"] < baseline["TRAIN_DRIVER"], (held, baseline)
    wait_for("the killed driver's actors to die", lambda: not live_owned(job), 60.0, 0.2, lambda: live_owned(job))
    wait_for(
        "the killed driver's CPUs and TRAIN_DRIVER slots to be freed",
        lambda: all(v >= baseline[k] for k, v in free_slots(ray_cluster).items()),
        60.0,
        0.2,
        lambda: (free_slots(ray_cluster), baseline),
    )
    t_dead = time.perf_counter() - t0
    saved = tune_statuses(sweep_dir)  # what the restore will read
    registered = latest_checkpoint(cut_dir)
    ended = [e["epoch"] for e in read_progress(cut_dir) if e["event"] == "epoch_end"]
    # Ray may have registered a checkpoint whose epoch_end rank 0 had not yet written (the
    # kill fell between ray.train.report and the progress line), or rank 0 may have ended an
    # epoch Ray had not yet registered: the resume starts after the newer of the two.
    assert registered is not None and registered <= (ended[-1] if ended else -1) + 1, (registered, ended)
    newest = max([registered, *ended])
    assert newest < EPOCHS - 1, (registered, ended)
    before = {
        "done_history": epoch_history(client, done.info.run_id),
        "done_end": client.get_run(done.info.run_id).info.end_time,
        "done_files": checkpoint_files(done_dir),
        "done_progress": read_progress(done_dir),
        "cut_files": checkpoint_files(cut_dir),
        "cut_starts": len([e for e in read_progress(cut_dir) if e["event"] == "start"]),
    }
    # What the kill left of the interrupted trial's run: RUNNING when its trial actor died
    # first, FAILED when the Train controller died first and the actor's trainer.fit() raised
    # (train.runner._fit ends the run FAILED) before the GCS reached the actor. Never FINISHED.
    cut_status = client.get_run(cut.info.run_id).info.status
    assert cut_status in {"RUNNING", "FAILED"}, cut_status

    # 2. The same name again, in this process: the sweep is restored and runs to its end.
    t1 = time.perf_counter()
    result = run_sweep(load_sweep(cfg_path, name=NAME), tracking_uri=uri, register=False)
    resume_s = time.perf_counter() - t1
    table = "\n".join(f"{t.run_name} {t.status} {t.epochs}/{t.planned_epochs} {t.metric}" for t in result.trials)
    assert result.resumed and len(result.trials) == TRIALS, table  # no trial added or lost
    assert all(t.status == "FINISHED" and t.error is None for t in result.trials), table
    by_name = {t.run_name: t for t in result.trials}
    assert by_name[done.info.run_name].run_id == done.info.run_id, table
    assert by_name[cut.info.run_name].run_id == cut.info.run_id, table
    assert by_name[cut.info.run_name].epochs == EPOCHS, table  # the resumed epochs reached Tune

    # The finished trial did not run again: no new Train start, the same epochs in MLflow,
    # the same checkpoints, the same end time.
    assert read_progress(done_dir) == before["done_progress"]
    assert epoch_history(client, done.info.run_id) == before["done_history"]
    assert [s for s, _ in before["done_history"]] == list(range(EPOCHS))
    assert checkpoint_files(done_dir) == before["done_files"]
    assert client.get_run(done.info.run_id).info.end_time == before["done_end"]

    # The interrupted trial went on from its checkpoint: one more Train start, at the epoch
    # after the newest checkpoint it had (Ray's registered one, or a newer one the loop had
    # finished reporting), the checkpoints it kept as they were, every epoch in MLflow once.
    progress = read_progress(cut_dir)
    at = [i for i, e in enumerate(progress) if e["event"] == "start"][before["cut_starts"] :]
    starts = [progress[i]["start_epoch"] for i in at]
    assert starts == [newest + 1], (starts, registered, ended)
    resumed_epochs = [e["epoch"] for e in progress[at[0] :] if e["event"] == "epoch_start"]
    assert resumed_epochs == list(range(starts[0], EPOCHS)), progress
    assert {k: v for k, v in checkpoint_files(cut_dir).items() if k in before["cut_files"]} == {
        k: v for k, v in before["cut_files"].items() if k in checkpoint_files(cut_dir)
    }
    history = epoch_history(client, cut.info.run_id)
    assert [s for s, _ in history] == list(range(EPOCHS)), history

    # MLflow: one parent run, one child run per trial, every trial's epochs once each,
    # nothing left RUNNING.
    runs = sweep_runs(client)
    parents = [r for r in runs if r.info.run_name == f"sweep-{NAME}"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [r.info.run_id for r in parents] == [result.parent_run_id]
    assert sorted(r.info.run_name for r in children) == sorted(by_name), [r.info.run_name for r in children]
    assert {r.info.run_id for r in children} == {t.run_id for t in result.trials}
    assert len(runs) == 1 + len(result.trials)
    assert {r.info.run_name: r.info.status for r in runs if r.info.status != "FINISHED"} == {}
    for t in result.trials:
        assert [s for s, _ in epoch_history(client, t.run_id)] == list(range(EPOCHS)), t.run_name
    total = time.perf_counter() - t0
    print(
        f"\nresumable sweep, {TRIALS} trials x {EPOCHS} epochs: driver killed at {t_kill:.1f} s ({done.info.run_name} "
        f"finished; {cut.info.run_name} at registered checkpoint {registered}, epochs ended {ended}); "
        f"its owned actors dead and its resources free {t_dead - t_kill:.1f} s later (detached actors left: "
        f"{sorted({c for c, st in job_actors(job)['detached'] if st != 'DEAD'})}); Tune's saved state: {saved}; "
        f"interrupted run left {cut_status}; resumed sweep {resume_s:.1f} s "
        f"({cut.info.run_name} restarted at epoch {starts[0]}); total {total:.1f} s"
    )
