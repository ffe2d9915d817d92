"""Durable adaptation jobs (talkmesh.serving.jobs): leases, attempts, backpressure and a
runner whose timeout kills the work. Fast, no Ray: SQLite files under tmp_path, spawned
child processes. Timing-dependent checks wait on conditions (a fake clock, or polling with
a deadline), never on fixed sleeps."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from talkmesh.serving.jobs import Job, JobQueue, JobRunner, QueueFull, TenantQuotaExceeded


class Clock:
    """A settable clock for the queue's timestamps."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'service.db'}"


def _queue(tmp_path: Path, **kw) -> JobQueue:
    """A queue on its own engine (not the per-process shared one), so tests stay independent."""
    return JobQueue(engine=sa.create_engine(_url(tmp_path), connect_args={"timeout": 30.0}), **kw)


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


# ---------------------------------------------------------------------- job functions (run in the child)


def succeed(job: Job) -> dict:
    return {"style": job.style_id, "pid": os.getpid()}


def explode(job: Job) -> dict:
    raise ValueError(f"bad reference for {job.style_id}")


def hang(job: Job) -> dict:
    Path(job.options["pid_file"]).write_text(str(os.getpid()))
    time.sleep(600)
    return {}


# ---------------------------------------------------------------------- the queue


def _claim_all(url: str, start, worker: str, out) -> None:
    """A worker process: its own engine, claim until the queue is empty."""
    queue = JobQueue(url)  # engine_for: this process's engine
    queue.counts()  # connected and ready before the race starts
    start.wait(30)
    got = []
    while (job := queue.claim(worker, lease_s=60)) is not None:
        got.append(job.job_id)
        assert queue.complete(job.job_id, worker, {"by": worker})
    out.put(got)


def test_claim_is_atomic_across_processes(tmp_path):
    queue = _queue(tmp_path, max_queued_per_tenant=100)
    ids = {queue.submit(f"sty_{i:03d}", "t", "m-v1").job_id for i in range(24)}
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(_url(tmp_path), start, f"w{i}", out)) for i in range(2)]
    for p in procs:
        p.start()
    start.set()
    claimed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    a, b = (set(c) for c in claimed)
    assert not a & b, "a job was claimed by two workers"
    assert a | b == ids and len(claimed[0]) + len(claimed[1]) == len(ids)
    assert queue.counts()["succeeded"] == 24


def test_submit_is_idempotent_and_a_failed_job_is_queued_again(tmp_path):
    queue = _queue(tmp_path)
    job = queue.submit("sty_a", "t1", "m-v1", {"steps": 5})
    assert job.state == "queued" and job.options == {"steps": 5} and job.tenant == "t1"
    assert queue.submit("sty_a", "t1", "m-v1").job_id == job.job_id
    assert queue.submit("sty_a", "t1", "m-v2").job_id != job.job_id  # per model version
    claimed = queue.claim("w1")
    assert claimed.job_id == job.job_id and claimed.attempts == 1
    assert queue.fail(job.job_id, "w1", "ValueError: nope")
    assert queue.status(job)["status"] == "failed" and queue.status(job)["error"] == "ValueError: nope"
    again = queue.submit("sty_a", "t1", "m-v1")
    assert again.job_id == job.job_id and again.state == "queued" and again.attempts == 0 and again.error is None
    with pytest.raises(ValueError, match="options"):
        queue.submit("sty_b", "t1", "m-v1", {"x": object()})


def test_lease_expiry_lets_another_worker_take_over(tmp_path):
    clock = Clock()
    queue = _queue(tmp_path, clock=clock)
    job = queue.submit("sty_a", "t", "m-v1")
    assert queue.claim("dead", lease_s=10).worker_id == "dead"  # then never heartbeats
    assert queue.claim("alive", lease_s=10) is None  # the lease still holds
    clock.t += 8
    assert queue.status(job)["status"] == "running"
    clock.t += 3  # 11 s: the lease ran out
    taken = queue.claim("alive", lease_s=10)
    assert taken.job_id == job.job_id and taken.attempts == 2 and taken.worker_id == "alive"
    assert not queue.complete(job.job_id, "dead", {"late": True})  # only the lease holder
    assert not queue.heartbeat(job.job_id, "dead")
    assert queue.complete(job.job_id, "alive", {"ok": 1})
    st = queue.status(job)
    assert st["status"] == "succeeded" and st["result"] == {"ok": 1} and st["attempts"] == 2


def test_heartbeat_extends_the_lease(tmp_path):
    clock = Clock()
    queue = _queue(tmp_path, clock=clock)
    job = queue.submit("sty_a", "t", "m-v1")
    queue.claim("w1", lease_s=10)
    clock.t += 8
    assert queue.heartbeat(job.job_id, "w1", lease_s=10)
    clock.t += 8  # 16 s after the claim, 8 after the heartbeat
    assert queue.claim("w2", lease_s=10) is None


def test_max_attempts_then_failed_for_good(tmp_path):
    clock = Clock()
    queue = _queue(tmp_path, clock=clock, max_attempts=2)
    job = queue.submit("sty_a", "t", "m-v1")
    for worker in ("w1", "w2"):
        assert queue.claim(worker, lease_s=5).worker_id == worker
        clock.t += 6  # that worker died
    assert queue.claim("w3", lease_s=5) is None
    st = queue.status(job)
    assert st["status"] == "failed" and st["attempts"] == 2 and "every attempt (2 attempts)" in st["error"]


def test_queue_time_is_not_run_time(tmp_path):
    clock = Clock(0.0)
    queue = _queue(tmp_path, clock=clock)
    job = queue.submit("sty_a", "t", "m-v1")
    clock.t = 100.0
    st = queue.status(job)
    assert st["status"] == "queued" and st["queue_s"] == 100.0 and st["run_s"] is None
    queue.claim("w1")
    clock.t = 102.0
    running = queue.status(job)
    assert running["queue_s"] == 100.0 and running["run_s"] == 2.0
    clock.t = 103.0
    queue.complete(job.job_id, "w1")
    st = queue.status(job)
    assert (st["queued_at"], st["started_at"], st["finished_at"]) == (0.0, 100.0, 103.0)
    assert st["queue_s"] == 100.0 and st["run_s"] == 3.0


def test_bounded_queue_and_tenant_quota(tmp_path):
    clock = Clock()
    queue = _queue(tmp_path, clock=clock, max_queued=3, max_queued_per_tenant=2, default_run_s=40.0)
    queue.submit("sty_a1", "a", "m")
    queue.submit("sty_a2", "a", "m")
    with pytest.raises(TenantQuotaExceeded) as quota:
        queue.submit("sty_a3", "a", "m")
    assert quota.value.status == 429 and quota.value.retry_after == 40 and "quota 2" in str(quota.value)
    queue.submit("sty_b1", "b", "m")  # another tenant still fits
    with pytest.raises(QueueFull) as full:
        queue.submit("sty_c1", "c", "m")
    assert full.value.status == 503 and not isinstance(full.value, TenantQuotaExceeded)
    assert full.value.retry_after == 40  # one job must start: the default run time, one worker
    assert queue.submit("sty_a1", "a", "m").state == "queued"  # an existing job is still answered
    # Once work has been done, the estimate follows the observed run time.
    job = queue.claim("w1")
    clock.t += 4
    queue.complete(job.job_id, "w1")
    queue.submit("sty_c1", "c", "m")
    with pytest.raises(QueueFull) as full:
        queue.submit("sty_c2", "c", "m")
    assert full.value.retry_after == 4
    assert queue.counts() == {"queued": 3, "running": 0, "succeeded": 1, "failed": 0}


# ---------------------------------------------------------------------- the runner


def test_runner_runs_jobs_and_records_failures(tmp_path):
    queue = _queue(tmp_path)
    ok = queue.submit("sty_ok", "t", "m")
    runner = JobRunner(queue, succeed, worker_id="r1", timeout_s=60, lease_s=5)
    try:
        done = runner.run_once()
        assert done.job_id == ok.job_id and done.state == "succeeded" and done.worker_id == "r1"
        assert done.result["style"] == "sty_ok" and done.result["pid"] == runner.child_pid != os.getpid()
        assert runner.run_once() is None  # nothing left
    finally:
        runner.stop()
    bad = queue.submit("sty_bad", "t", "m")
    runner = JobRunner(queue, explode, worker_id="r2", timeout_s=60, lease_s=5)
    try:
        failed = runner.run_once()
        assert failed.job_id == bad.job_id and failed.state == "failed"
        assert failed.error == "ValueError: bad reference for sty_bad" and failed.attempts == 1
    finally:
        runner.stop()
    with pytest.raises(TypeError, match="picklable"):
        JobRunner(queue, lambda job: {})


def test_timeout_kills_the_child_process(tmp_path):
    queue = _queue(tmp_path)
    pid_file = tmp_path / "child.pid"
    job = queue.submit("sty_hang", "t", "m", {"pid_file": str(pid_file)})
    runner = JobRunner(queue, hang, worker_id="r1", timeout_s=3, lease_s=1)
    try:
        t0 = time.monotonic()
        done = runner.run_once()
        assert time.monotonic() - t0 < 30
    finally:
        runner.stop()
    assert done.job_id == job.job_id and done.state == "failed" and done.error == "timed out after 3 s"
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid), "the timed-out adaptation is still running"
    assert runner.child_pid is None


def test_a_dead_workers_job_is_completed_by_another(tmp_path):
    queue = _queue(tmp_path)
    job = queue.submit("sty_a", "t", "m")
    assert queue.claim("dead-replica", lease_s=0.5).job_id == job.job_id  # it never heartbeats
    runner = JobRunner(queue, succeed, worker_id="survivor", timeout_s=60, lease_s=5, poll_s=0.05)
    runner.start()
    try:
        st = _wait_for(lambda: (s := queue.status(job))["status"] == "succeeded" and s, what="the job's takeover")
    finally:
        runner.stop()
    assert st["attempts"] == 2 and st["result"]["style"] == "sty_a"
    assert queue.get(job.job_id).worker_id == "survivor"


def test_stop_hands_a_running_job_back(tmp_path):
    queue = _queue(tmp_path)
    pid_file = tmp_path / "child.pid"
    job = queue.submit("sty_hang", "t", "m", {"pid_file": str(pid_file)})
    runner = JobRunner(queue, hang, worker_id="r1", timeout_s=300, lease_s=5, poll_s=0.05)
    runner.start()
    try:
        _wait_for(pid_file.exists, what="the job's start")
    finally:
        runner.stop()
    assert not psutil.pid_exists(int(pid_file.read_text()))
    st = queue.status(job)
    assert st["status"] == "queued" and st["attempts"] == 0  # not counted against the job
