"""`ray job submit` of jobs/faceformer.py against a real local Ray head, tracked by a real
MLflow server (SQLite backend, proxied artifacts): both started by talkmesh.dev.localstack on
127.0.0.1 with ports chosen at run time, and stopped afterwards.

The head is its own cluster (own ports, own temp dir), independent of the session-wide
``ray_cluster`` fixture; this test never calls ``ray.init``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from talkmesh.dev.localstack import LocalStack, StackError, free_ports, is_listening
from talkmesh.ops import tracking

REPO = Path(__file__).resolve().parents[1]


def test_unstarted_stack_has_no_addresses(tmp_path):
    stack = LocalStack(tmp_path / "s")
    with pytest.raises(StackError, match="not started"):
        _ = stack.dashboard_url
    stack.stop()  # stopping what never started is a no-op
    stack.stop()
    with pytest.raises(StackError, match="cannot be restarted"):
        stack.start()
    with pytest.raises(ValueError, match="nothing to start"):
        LocalStack(tmp_path / "s", start_ray=False, start_mlflow=False)
    with pytest.raises(ValueError, match="num_cpus"):
        LocalStack(tmp_path / "s", num_cpus=0)


def test_free_ports_are_distinct_and_free():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert not any(is_listening(p) for p in ports)


def _check_client_settings(stack: LocalStack) -> None:
    env = stack.env()
    assert env["RAY_AUTH_MODE"] == "token" and env["MLFLOW_TRACKING_URI"] == stack.mlflow_uri
    assert env["RAY_AUTH_TOKEN_PATH"] == str(stack.token_file) and stack.token_file.stat().st_mode & 0o077 == 0
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on: no token, no answer
        urllib.request.urlopen(f"{stack.dashboard_url}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    assert stack.dashboard_url.startswith("http://127.0.0.1:")
    assert stack.ray_address.startswith("127.0.0.1:")
    assert is_listening(int(stack.ray_address.rsplit(":", 1)[1])) and is_listening(stack.ports["mlflow"])


def _check_tracked(stack: LocalStack, sid: str) -> None:
    """The MLflow server holds the finished run, tagged with the submission id, and the registry
    says talkmesh-faceformer@champion is this run's model (a fresh store)."""
    from mlflow import MlflowClient

    uri = stack.mlflow_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = tracking.find_run("talkmesh-faceformer", f"faceformer-{sid}", uri=uri)
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.job_submission_id"] == sid
    assert run.data.tags["talkmesh.num_workers"] == "2"
    assert "val/lve" in run.data.metrics and "test/test-A/lve" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1]
    version = tracking.get_alias_version("faceformer", "champion", uri=uri)
    assert version is not None
    assert client.get_model_version("talkmesh-faceformer", str(version)).run_id == run_id
    assert any((stack.artifacts_dir).rglob("model.pt"))  # artifacts went through the server


@pytest.mark.slow
def test_ray_job_submit_trains_tracks_and_registers(tmp_path):
    stack = LocalStack(tmp_path / "stack", num_cpus=2)
    t0 = time.perf_counter()
    with stack:
        start_s = time.perf_counter() - t0
        _check_client_settings(stack)
        ports = stack.all_ports()
        sid = f"tm-test-{os.getpid()}-{int(time.time())}"
        entry = ["python", "jobs/faceformer.py", "--preset", "small", "train.epochs=2", "train.limit_train_batches=4",
                 "train.limit_eval_sequences=4", "train.preview=false", "train.system_metrics=false",
                 f"train.storage_path={tmp_path / 'ray-results'}"]  # fmt: skip
        env_vars = {"TALKMESH_CACHE": os.environ["TALKMESH_CACHE"], "HF_HUB_OFFLINE": "1"}
        t1 = time.perf_counter()
        res = stack.submit_job(entry, working_dir=REPO, env_vars=env_vars, submission_id=sid, timeout=900)
        job_s = time.perf_counter() - t1
        assert res.succeeded and res.returncode == 0 and not res.timed_out, res.logs[-6000:]
        assert res.submission_id == sid
        assert "registered talkmesh-faceformer version" in res.logs  # the job's own output came back
        _check_tracked(stack, sid)

        # A failing entrypoint is reported as FAILED with its output and exit code.
        (tmp_path / "empty").mkdir()
        bad = stack.submit_job(
            ["python", "-c", "import sys; print('boom-from-job'); sys.exit(3)"], working_dir=tmp_path / "empty"
        )
        assert bad.status == "FAILED" and not bad.succeeded and bad.returncode == 3
        assert "boom-from-job" in bad.logs
        # A job past its timeout is stopped, and says so.
        slow = stack.submit_job(["python", "-c", "import time; time.sleep(600)"], working_dir=tmp_path / "empty",
                                timeout=5)  # fmt: skip
        assert slow.timed_out and slow.status == "STOPPED"

    stop_s = time.perf_counter() - t0 - start_s - job_s
    # Everything it started is gone: no port of the stack answers, no process of its trees runs.
    assert stack.listening_ports() == []
    assert not any(is_listening(p) for p in ports)
    assert stack.leftover_pids() == []
    stack.stop()  # idempotent
    print(f"\nstack start {start_s:.1f} s, faceformer job {job_s:.1f} s, other jobs + stop {stop_s:.1f} s")


_CHILD = """
import json, os, sys, time
import psutil
from talkmesh.dev.localstack import LocalStack
stack = LocalStack(sys.argv[1], num_cpus=1).start()
procs = [psutil.Process(pid) for pid in stack.leftover_pids()]
info = {"ports": stack.listening_ports(), "temp": str(stack.temp_dir),
        "procs": [(p.pid, p.create_time()) for p in procs]}
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])  # the stack is up when this file appears
time.sleep(600)
"""


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)


def _still_running(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigterm_to_the_owner_stops_the_stack(tmp_path):
    """An interrupted demo (SIGTERM to the process that owns the stack) leaves nothing running."""
    ready = tmp_path / "stack-up.json"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "stack"), str(ready)])
    try:
        _wait_for(lambda: ready.exists() or child.poll() is not None, 600, "the child's stack")
        assert ready.exists(), f"child exited with {child.returncode} before starting the stack"
        info = json.loads(ready.read_text())
        assert info["ports"] and len(info["procs"]) > 3  # a Ray head (gcs, raylet, dashboard, ...) and MLflow
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
    # stop() waits until every killed process has exited; a short bound covers what left its tree
    _wait_for(lambda: not any(_still_running(pid, t) for pid, t in info["procs"]), 60, "the stack's processes")
    _wait_for(lambda: not _mentioning(info["temp"]), 60, "processes naming the stack's temp dir")
    assert not any(is_listening(p) for p in info["ports"])


def _mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(text in a for a in p.info["cmdline"] or ())]


@pytest.mark.parametrize("methods", [(), ("adamesh",), ("faceformer", "faceformer")])
def test_the_demo_refuses_jobs_it_cannot_rank_together(tmp_path, methods):
    """The demo trains the vertex-corpus default jobs (one leaderboard ranks them), each once;
    it says so before starting anything (no stack, no corpus)."""
    from talkmesh.dev.demo import DEMO_METHODS, run_demo

    assert DEMO_METHODS == ("faceformer", "mimic", "dualtalker")
    with pytest.raises(ValueError, match="methods: one or more of faceformer, mimic, dualtalker"):
        run_demo(tmp_path / "demo", methods=methods)
    assert not (tmp_path / "demo").exists()


def test_the_demo_command_line_names_a_bad_methods_list(tmp_path, capsys):
    """--methods is a comma-separated list, so trailing key=value overrides stay overrides."""
    from talkmesh.dev.demo import main

    with pytest.raises(SystemExit) as e:
        main(["--work-dir", str(tmp_path / "demo"), "--methods", "faceformer,adamesh", "train.epochs=1"])
    assert e.value.code == 2 and "--methods: one or more of" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
