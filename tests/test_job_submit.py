"""`ray job submit` of jobs/faceformer.py against a real local Ray head, tracked by a real
MLflow server (SQLite backend, proxied artifacts): both started by talkmesh.dev.localstack on
127.0.0.1 with ports chosen at run time, and stopped afterwards.

The head is its own cluster (own ports, own temp dir), independent of the session-wide
``ray_cluster`` fixture; this test never calls ``ray.init``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


@pytest.mark.slow
def test_ray_job_submit_trains_tracks_and_registers(tmp_path):
    work = tmp_path / "stack"
    stack = LocalStack(work, num_cpus=2)
    t0 = time.perf_counter()
    with stack:
        start_s = time.perf_counter() - t0
        env = stack.env()
        assert env["RAY_AUTH_MODE"] == "token" and env["MLFLOW_TRACKING_URI"] == stack.mlflow_uri
        assert stack.dashboard_url.startswith("http://127.0.0.1:")
        assert stack.ray_address.startswith("127.0.0.1:")
        ports = stack.all_ports()
        assert is_listening(int(stack.ray_address.rsplit(":", 1)[1])) and is_listening(stack.ports["mlflow"])

        sid = f"tm-test-{os.getpid()}-{int(time.time())}"
        t1 = time.perf_counter()
        res = stack.submit_job(
            [
                "python", "jobs/faceformer.py", "--preset", "small",
                "train.epochs=2",
                "train.limit_train_batches=4",
                "train.limit_eval_sequences=4",
                "train.preview=false",
                "train.system_metrics=false",
                f"train.storage_path={tmp_path / 'ray-results'}",
            ],
            working_dir=REPO,
            env_vars={"TALKMESH_CACHE": os.environ["TALKMESH_CACHE"], "HF_HUB_OFFLINE": "1"},
            submission_id=sid,
            timeout=600,
        )  # fmt: skip
        job_s = time.perf_counter() - t1
        assert res.succeeded and res.returncode == 0 and not res.timed_out, res.logs[-6000:]
        assert res.submission_id == sid
        assert "registered talkmesh-faceformer version" in res.logs  # the job's own output came back

        # The MLflow server holds the finished run, tagged with the submission id.
        uri = stack.mlflow_uri
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_id = tracking.find_run("talkmesh-faceformer", f"faceformer-{sid}", uri=uri)
        assert run_id is not None
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["ray.job_submission_id"] == sid
        assert run.data.tags["talkmesh.num_workers"] == "2"
        assert "val/lve" in run.data.metrics and "test/test-A/lve" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1]

        # ... and the registry: talkmesh-faceformer@champion is this run's model (a fresh store).
        version = tracking.get_alias_version("faceformer", "champion", uri=uri)
        assert version is not None
        assert client.get_model_version("talkmesh-faceformer", str(version)).run_id == run_id
        # Artifacts went through the server into the stack's artifact store.
        assert any((work / "mlartifacts").rglob("model.pt"))

        # A failing entrypoint is reported as FAILED with its output.
        (tmp_path / "empty").mkdir()
        bad = stack.submit_job(
            ["python", "-c", "import sys; print('boom-from-job'); sys.exit(3)"], working_dir=tmp_path / "empty"
        )
        assert bad.status == "FAILED" and not bad.succeeded
        assert "boom-from-job" in bad.logs

    stop_s = time.perf_counter() - t0 - start_s - job_s

    # Everything it started is gone: no port of the stack answers, no process names its temp dir.
    assert stack.listening_ports() == []
    assert not any(is_listening(p) for p in ports)
    assert stack.leftover_pids() == []
    stack.stop()  # idempotent
    print(f"\nstack start {start_s:.1f} s, faceformer job {job_s:.1f} s, failing job + stop {stop_s:.1f} s")


_CHILD = """
import json, sys, time
from talkmesh.dev.localstack import LocalStack
stack = LocalStack(sys.argv[1], num_cpus=1).start()
groups = [p.pid for p in (stack._ray, stack._mlflow)]
print(json.dumps({"ports": stack.all_ports(), "groups": groups, "temp": str(stack.temp_dir)}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_sigterm_to_the_owner_stops_the_stack(tmp_path):
    """An interrupted demo (SIGTERM to the process that owns the stack) leaves nothing running."""
    import json
    import signal
    import subprocess
    import sys

    from talkmesh.dev.localstack import _pids_in_group, _pids_mentioning

    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "stack")], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # the stack is up when the child prints
        assert line, f"child exited with {child.wait()} before starting the stack"
        info = json.loads(line)
        assert any(is_listening(p) for p in info["ports"])
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
    assert not any(is_listening(p) for p in info["ports"])
    assert all(_pids_in_group(g) == [] for g in info["groups"])
    assert _pids_mentioning(info["temp"]) == []
