"""Durable adaptation jobs: a persistent queue with leases, and a runner whose timeout really stops the work.

:class:`JobQueue` keeps one row per (style, model version) in the service database
(:func:`talkmesh.serving.db.engine_for`: SQLite by default, any SQLAlchemy URL for replicas
on several nodes); its table is created on first use. A job moves

    queued --claim--> running --complete--> succeeded
                         |  \\--fail-------> failed   (for good: the adaptation raised or timed out)
                         \\--lease expired--> claimable again (its worker died), attempt n+1;
                                             failed once ``max_attempts`` attempts were used

* **Leases.** ``claim`` hands a job to one worker (a conditional UPDATE: exactly one of
  several racing workers, in any process or node, wins) until ``lease_until``; the worker
  extends it with ``heartbeat``. A replica that dies stops heartbeating, its lease runs out
  and another replica's claim takes the job over. Only the lease holder may ``complete`` or
  ``fail`` a job, so a worker presumed dead cannot overwrite its successor's result.
* **Idempotent submit.** One job per (style_id, model_key): submitting again returns the
  existing job, unless it failed, in which case it is queued afresh.
* **Backpressure.** ``submit`` refuses when ``max_queued`` jobs wait (:class:`QueueFull`) or
  the tenant already has ``max_queued_per_tenant`` waiting (:class:`TenantQuotaExceeded`);
  both carry ``retry_after`` (seconds), estimated from recent run times and active workers.
  The bound is checked and the row written in one transaction; on a server database under
  concurrent submits it may be exceeded by at most the number of simultaneous submitters.
* **Queue time is not run time.** ``queued_at``, ``started_at`` (of the current attempt) and
  ``finished_at`` are kept apart; ``status`` reports ``queue_s`` and ``run_s``.

Timestamps are wall-clock seconds (``clock``, default ``time.time``) so they compare across
processes; workers on several nodes need synchronised clocks (NTP) to well within a lease.

:class:`JobRunner` claims jobs and runs a picklable callable ``fn(job) -> dict`` in a child
process (multiprocessing ``spawn``; the child is kept between jobs so a model it loads is
loaded once), heartbeats while it runs, and kills the child at the job's deadline: a hung
adaptation cannot block later jobs, and its memory and threads are gone with the process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from talkmesh.serving.db import engine_for

__all__ = ["Job", "JobNotFound", "JobQueue", "JobRunner", "QueueFull", "TenantQuotaExceeded"]

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"

_METADATA = sa.MetaData()
JOBS = sa.Table(
    "talkmesh_adapt_jobs",
    _METADATA,
    sa.Column("job_id", sa.String(40), primary_key=True),
    sa.Column("style_id", sa.String(128), nullable=False),
    sa.Column("model_key", sa.String(128), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=True),
    sa.Column("options", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.String(200), nullable=True),
    sa.Column("lease_until", sa.Double, nullable=True),
    sa.Column("queued_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.UniqueConstraint("style_id", "model_key", name="uq_talkmesh_adapt_jobs_style_model"),
    sa.Index("ix_talkmesh_adapt_jobs_state", "state", "queued_at"),
    sa.Index("ix_talkmesh_adapt_jobs_tenant", "tenant", "state"),
)


class JobNotFound(KeyError):
    """No job with this id (it finished and was forgotten, or never existed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class QueueFull(RuntimeError):
    """The queue holds ``max_queued`` waiting jobs: retry after ``retry_after`` seconds (HTTP 503)."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = int(retry_after)


class TenantQuotaExceeded(QueueFull):
    """The tenant already has its quota of waiting jobs: retry after ``retry_after`` s (HTTP 429)."""

    status = 429


@dataclasses.dataclass(frozen=True)
class Job:
    """One adaptation job as stored (picklable: it is what the runner's callable receives)."""

    job_id: str
    style_id: str
    model_key: str
    tenant: str | None
    options: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_until: float | None
    queued_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        values = dict(row)
        values["options"] = json.loads(values["options"] or "{}")
        values["result"] = json.loads(values["result"]) if values["result"] else None
        return cls(**values)

    def queue_s(self, now: float) -> float:
        """Seconds waited before the current attempt started (until ``now`` while queued)."""
        end = self.started_at if self.started_at is not None and self.state != QUEUED else now
        return max(0.0, end - self.queued_at)

    def run_s(self, now: float) -> float | None:
        """Seconds the current attempt ran (until ``now`` while running); None before a start."""
        if self.started_at is None or self.state == QUEUED:
            return None
        return max(0.0, (self.finished_at if self.finished_at is not None else now) - self.started_at)


def _json_dict(value: Mapping[str, Any] | None, field: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise ValueError(f"{field}: expected a mapping, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: not JSON-serialisable ({e})") from None


class JobQueue:
    """The persistent adaptation queue (see the module docstring)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: Any = None,
        max_queued: int = 100,
        max_queued_per_tenant: int = 10,
        max_attempts: int = 3,
        default_run_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (url is None) == (engine is None):
            raise ValueError("JobQueue: give exactly one of url (a SQLAlchemy URL) or engine")
        for name, value in (("max_queued", max_queued), ("max_queued_per_tenant", max_queued_per_tenant)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts}")
        self.engine = engine if engine is not None else engine_for(url)
        self.max_queued, self.max_queued_per_tenant = int(max_queued), int(max_queued_per_tenant)
        self.max_attempts, self.default_run_s, self.clock = int(max_attempts), float(default_run_s), clock
        self._created = False

    # ---- plumbing --------------------------------------------------------------------
    def _begin(self) -> Any:
        if not self._created:
            try:
                _METADATA.create_all(self.engine)
            except sa.exc.DatabaseError:  # another process created it at the same moment
                _METADATA.create_all(self.engine)
            self._created = True
        return self.engine.begin()

    def _row(self, conn: Any, **where: Any) -> Job | None:
        q = sa.select(JOBS)
        for col, value in where.items():
            q = q.where(JOBS.c[col] == value)
        row = conn.execute(q).mappings().first()
        return Job.from_row(row) if row is not None else None

    def get(self, job_id: str) -> Job:
        """The stored job; :class:`JobNotFound` when there is none."""
        with self._begin() as conn:
            job = self._row(conn, job_id=job_id)
        if job is None:
            raise JobNotFound(f"job {job_id!r} not found")
        return job

    def find(self, style_id: str, model_key: str) -> Job | None:
        """The job of a style for one model version, if any."""
        with self._begin() as conn:
            return self._row(conn, style_id=style_id, model_key=model_key)

    # ---- submitting ------------------------------------------------------------------
    def submit(
        self, style_id: str, tenant: str | None, model_key: str, options: Mapping[str, Any] | None = None
    ) -> Job:
        """Queue the adaptation of ``style_id`` for ``model_key`` (idempotent: the existing job
        unless it failed, which is queued afresh). Raises :class:`QueueFull` /
        :class:`TenantQuotaExceeded` when the queue or the tenant's share of it is full."""
        opts = _json_dict(options, "options")
        for name, value in (("style_id", style_id), ("model_key", model_key)):
            if not isinstance(value, str) or not value or len(value) > 128:
                raise ValueError(f"{name}: expected a non-empty string of at most 128 characters, got {value!r}")
        try:
            with self._begin() as conn:
                existing = self._row(conn, style_id=style_id, model_key=model_key)
                if existing is not None and existing.state != FAILED:
                    return existing
                self._check_capacity(conn, tenant)
                fresh = {
                    "tenant": tenant,
                    "options": opts,
                    "state": QUEUED,
                    "attempts": 0,
                    "max_attempts": self.max_attempts,
                    "worker_id": None,
                    "lease_until": None,
                    "queued_at": self.clock(),
                    "started_at": None,
                    "finished_at": None,
                    "error": None,
                    "result": None,
                }
                if existing is not None:
                    conn.execute(
                        JOBS.update().where(JOBS.c.job_id == existing.job_id, JOBS.c.state == FAILED).values(**fresh)
                    )
                    job_id = existing.job_id
                else:
                    job_id = "job_" + uuid.uuid4().hex
                    conn.execute(JOBS.insert().values(job_id=job_id, style_id=style_id, model_key=model_key, **fresh))
                return self._row(conn, job_id=job_id)
        except sa.exc.IntegrityError:  # a concurrent submit inserted it first
            job = self.find(style_id, model_key)
            if job is None:
                raise
            return job

    def _check_capacity(self, conn: Any, tenant: str | None) -> None:
        count = sa.select(sa.func.count()).select_from(JOBS).where(JOBS.c.state == QUEUED)
        queued = conn.execute(count).scalar_one()
        if queued >= self.max_queued:
            wait = self._retry_after(conn, queued - self.max_queued + 1)
            raise QueueFull(f"the adaptation queue is full ({queued} jobs waiting); retry in {wait} s", wait)
        mine = JOBS.c.tenant.is_(None) if tenant is None else JOBS.c.tenant == tenant
        own = conn.execute(count.where(mine)).scalar_one()
        if own >= self.max_queued_per_tenant:
            wait = self._retry_after(conn, own - self.max_queued_per_tenant + 1)
            msg = f"this tenant already has {own} adaptations waiting (quota {self.max_queued_per_tenant})"
            raise TenantQuotaExceeded(f"{msg}; retry in {wait} s", wait)

    def _retry_after(self, conn: Any, ahead: int) -> int:
        """Seconds until ``ahead`` more jobs have started: the mean run time of the last 20
        successes (``default_run_s`` before any) times ``ahead`` over the active workers."""
        recent = (
            sa.select((JOBS.c.finished_at - JOBS.c.started_at).label("run"))
            .where(JOBS.c.state == SUCCEEDED)
            .order_by(JOBS.c.finished_at.desc())
            .limit(20)
            .subquery()
        )
        mean = conn.execute(sa.select(sa.func.avg(recent.c.run))).scalar_one()
        busy = sa.select(sa.func.count(sa.distinct(JOBS.c.worker_id))).where(JOBS.c.state == RUNNING)
        workers = max(1, conn.execute(busy).scalar_one())
        per_job = float(mean) if mean is not None else self.default_run_s
        return int(min(3600, max(1, math.ceil(per_job * ahead / workers))))

    # ---- working ---------------------------------------------------------------------
    def _reap(self, conn: Any, now: float) -> None:
        """Fail for good the running jobs whose lease ran out on their last allowed attempt."""
        conn.execute(
            JOBS.update()
            .where(JOBS.c.state == RUNNING, JOBS.c.lease_until < now, JOBS.c.attempts >= JOBS.c.max_attempts)
            .values(
                state=FAILED,
                finished_at=now,
                lease_until=None,
                error=sa.literal("its worker stopped responding on every attempt (")
                + sa.cast(JOBS.c.attempts, sa.Text)
                + sa.literal(" attempts)"),
            )
        )

    def claim(self, worker_id: str, lease_s: float = 30.0, model_key: str | None = None) -> Job | None:
        """Take the oldest claimable job (queued, or running with an expired lease) for
        ``lease_s`` seconds, counting an attempt; None when there is none. Atomic: of several
        workers racing for one job exactly one gets it. ``model_key`` limits the claim to that
        model version's jobs (a worker can only adapt for the model it holds)."""
        for _ in range(10):  # lost races: look again
            now = self.clock()
            with self._begin() as conn:
                self._reap(conn, now)
                claimable = sa.or_(
                    JOBS.c.state == QUEUED,
                    sa.and_(JOBS.c.state == RUNNING, JOBS.c.lease_until < now),
                )
                q = sa.select(JOBS.c.job_id, JOBS.c.state, JOBS.c.attempts).where(claimable)
                if model_key is not None:
                    q = q.where(JOBS.c.model_key == model_key)
                candidates = conn.execute(q.order_by(JOBS.c.queued_at).limit(8)).all()
            if not candidates:
                return None
            for job_id, state, attempts in candidates:
                with self._begin() as conn:
                    won = conn.execute(
                        JOBS.update()
                        .where(JOBS.c.job_id == job_id, JOBS.c.state == state, JOBS.c.attempts == attempts)
                        .where(claimable)
                        .values(
                            state=RUNNING,
                            worker_id=worker_id,
                            lease_until=now + lease_s,
                            attempts=attempts + 1,
                            started_at=now,
                            finished_at=None,
                            error=None,
                        )
                    ).rowcount
                    if won == 1:
                        return self._row(conn, job_id=job_id)
        return None

    @staticmethod
    def _by_holder(conn: Any, job_id: str, holder: str, **values: Any) -> bool:
        """Update the job only while ``holder`` runs it; whether it did."""
        q = JOBS.update().where(JOBS.c.job_id == job_id, JOBS.c.worker_id == holder, JOBS.c.state == RUNNING)
        return conn.execute(q.values(**values)).rowcount == 1

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float = 30.0) -> bool:
        """Extend the lease; False when ``worker_id`` no longer holds the job (stop working on it)."""
        with self._begin() as conn:
            return self._by_holder(conn, job_id, worker_id, lease_until=self.clock() + lease_s)

    def complete(self, job_id: str, worker_id: str, result: Mapping[str, Any] | None = None) -> bool:
        """Mark the job succeeded with a small JSON-able ``result``; False when not the lease holder."""
        payload = _json_dict(result, "result")
        with self._begin() as conn:
            return self._by_holder(
                conn, job_id, worker_id, state=SUCCEEDED, finished_at=self.clock(), lease_until=None, result=payload
            )

    def fail(self, job_id: str, worker_id: str, error: str, retry: bool = False) -> bool:
        """Mark the job failed with ``error``; with ``retry`` (a transient failure, e.g. the
        worker process crashed) it is queued again while attempts remain. False when not the
        lease holder."""
        now = self.clock()
        with self._begin() as conn:
            if retry:
                again = (
                    JOBS.update()
                    .where(JOBS.c.job_id == job_id, JOBS.c.worker_id == worker_id, JOBS.c.state == RUNNING)
                    .where(JOBS.c.attempts < JOBS.c.max_attempts)
                    .values(state=QUEUED, worker_id=None, lease_until=None, error=str(error))
                )
                if conn.execute(again).rowcount == 1:
                    return True
            return self._by_holder(
                conn, job_id, worker_id, state=FAILED, finished_at=now, lease_until=None, error=str(error)
            )

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a running job back to the queue without counting the attempt (a graceful
        shutdown); False when not the lease holder."""
        with self._begin() as conn:
            return self._by_holder(
                conn, job_id, worker_id, state=QUEUED, worker_id=None, lease_until=None, attempts=JOBS.c.attempts - 1
            )

    # ---- reading ---------------------------------------------------------------------
    def status(self, job: Job | str) -> dict[str, Any]:
        """``{"status": queued|running|succeeded|failed, "job_id", "attempts", "queued_at",
        "started_at", "finished_at", "queue_s", "run_s"[, "error"][, "result"]}``; a job whose
        worker died on its last attempt reads as failed."""
        job_id = job.job_id if isinstance(job, Job) else job
        now = self.clock()
        with self._begin() as conn:
            self._reap(conn, now)
            current = self._row(conn, job_id=job_id)
        if current is None:
            raise JobNotFound(f"job {job_id!r} not found")
        out: dict[str, Any] = {
            "status": current.state,
            "job_id": current.job_id,
            "style_id": current.style_id,
            "model_key": current.model_key,
            "attempts": current.attempts,
            "max_attempts": current.max_attempts,
            "queued_at": current.queued_at,
            "started_at": current.started_at,
            "finished_at": current.finished_at,
            "queue_s": current.queue_s(now),
            "run_s": current.run_s(now),
        }
        if current.error is not None:
            out["error"] = current.error
        if current.result is not None:
            out["result"] = current.result
        return out

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, 0 when none): the queue-depth metric."""
        with self._begin() as conn:
            rows = conn.execute(sa.select(JOBS.c.state, sa.func.count()).group_by(JOBS.c.state)).all()
        return {QUEUED: 0, RUNNING: 0, SUCCEEDED: 0, FAILED: 0, **{s: int(n) for s, n in rows}}

    def forget(self, style_id: str) -> int:
        """Drop every job of a style (it was deleted): a worker still on one can no longer
        complete it. Returns the number dropped."""
        with self._begin() as conn:
            return conn.execute(JOBS.delete().where(JOBS.c.style_id == style_id)).rowcount


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """Exit this process as soon as its parent (the runner's replica) is gone: an orphaned
    worker must not go on adapting, or write a style, after its job was handed to another."""
    while os.getppid() == parent:
        time.sleep(period_s)
    os._exit(1)


def _child_main(conn: Any) -> None:
    """The child process: announce itself, then run ``(fn, job)`` requests until told to stop
    (or its parent dies: :func:`_exit_with_parent`)."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        fn, job = request
        try:
            result = fn(job)
            conn.send(("ok", dict(result or {})))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which records it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Child:
    """One spawned worker process and its pipe."""

    def __init__(self, ctx: Any, name: str, start_timeout_s: float) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child_conn,), name=name, daemon=True)
        self.process.start()
        child_conn.close()
        if not self.conn.poll(start_timeout_s):
            self.kill()
            raise RuntimeError(f"the adaptation worker process did not start within {start_timeout_s:g} s")
        self.conn.recv()  # ("ready", pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def kill(self) -> None:
        """Stop the process now (SIGKILL) and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()

    def close(self) -> None:
        """Ask the process to exit, kill it if it does not."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(5)
        self.kill()


class JobRunner:
    """Claims jobs from a :class:`JobQueue` and runs ``fn(job) -> dict`` (a picklable,
    module-level function or a ``functools.partial`` of one) in a child process, at most
    ``timeout_s`` seconds per job: past it the child is killed and the job fails
    ("timed out after N s"). ``fn`` raising fails the job with its message; the child dying
    (e.g. out of memory) puts the job back while attempts remain. The child is kept between
    jobs. Use :meth:`run_once` (one job, blocking) or :meth:`start`/:meth:`stop` (a thread).
    ``on_done(job, seconds)``, when given, is called after each attempt with the job as stored
    afterwards (succeeded, failed, or queued again) and the attempt's wall time: metrics."""

    def __init__(
        self,
        queue: JobQueue,
        fn: Callable[[Job], Mapping[str, Any] | None],
        *,
        worker_id: str | None = None,
        timeout_s: float = 900.0,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        start_timeout_s: float = 120.0,
        model_key: str | None = None,
        on_done: Callable[[Job, float], None] | None = None,
    ) -> None:
        try:
            pickle.dumps(fn)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the child cannot get it
            raise TypeError(f"fn: must be picklable (a module-level function or a partial of one): {e}") from None
        if timeout_s <= 0 or lease_s <= 0 or poll_s <= 0:
            raise ValueError("timeout_s, lease_s and poll_s must be > 0")
        self.queue, self.fn = queue, fn
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.timeout_s, self.lease_s, self.poll_s = float(timeout_s), float(lease_s), float(poll_s)
        self.start_timeout_s = float(start_timeout_s)
        self.model_key = model_key  # claim only this model version's jobs (None: any)
        self.on_done = on_done  # (the job as stored after an attempt, the attempt's seconds): metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._child: _Child | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def child_pid(self) -> int | None:
        """The pid of the current child process (None when none is running)."""
        return self._child.pid if self._child is not None else None

    def _ensure_child(self) -> _Child:
        if self._child is None or not self._child.process.is_alive():
            self._child = _Child(self._ctx, f"talkmesh-adapt-{self.worker_id}", self.start_timeout_s)
        return self._child

    def _kill_child(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def run_once(self) -> Job | None:
        """Claim one job and run it to its end; the job as stored afterwards, None when none was claimable."""
        job = self.queue.claim(self.worker_id, self.lease_s, self.model_key)
        if job is None:
            return None
        started = time.monotonic()
        try:
            child = self._ensure_child()
            child.conn.send((self.fn, job))
        except Exception as e:  # noqa: BLE001 - the worker process could not be started or reached
            self._kill_child()
            self.queue.fail(job.job_id, self.worker_id, f"adaptation worker unavailable: {e}", retry=True)
        else:
            self._supervise(job, child)
        try:
            done = self.queue.get(job.job_id)
        except JobNotFound:  # forgotten meanwhile (its style was deleted)
            return None
        self._report(done, time.monotonic() - started)
        return done

    def _report(self, job: Job, seconds: float) -> None:
        """Hand the attempt's end to ``on_done``; a failing callback never stops the runner."""
        if self.on_done is None:
            return
        try:
            self.on_done(job, seconds)
        except Exception:  # noqa: BLE001 - observers must not break job processing
            log.exception("adaptation runner %s: on_done failed for job %s", self.worker_id, job.job_id)

    def _supervise(self, job: Job, child: _Child) -> None:
        """Wait for the child's answer, heartbeating; kill it at the deadline, on stop or
        when the lease is lost."""
        deadline = time.monotonic() + self.timeout_s
        beat_every = self.lease_s / 3
        next_beat = time.monotonic() + beat_every
        while True:
            if child.conn.poll(max(0.0, min(0.2, deadline - time.monotonic(), next_beat - time.monotonic()))):
                self._finish(job, child)
                return
            now = time.monotonic()
            if now >= deadline:
                self._kill_child()
                self.queue.fail(job.job_id, self.worker_id, f"timed out after {self.timeout_s:g} s")
                return
            if self._stop.is_set():
                self._kill_child()
                self.queue.release(job.job_id, self.worker_id)
                return
            if now >= next_beat:
                if not self.queue.heartbeat(job.job_id, self.worker_id, self.lease_s):
                    self._kill_child()  # another worker holds the job now
                    return
                next_beat = now + beat_every

    def _finish(self, job: Job, child: _Child) -> None:
        try:
            kind, payload = child.conn.recv()
        except (EOFError, OSError):
            child.process.join(5)
            code = child.process.exitcode
            self._kill_child()
            msg = f"the adaptation worker process died (exit code {code})"
            self.queue.fail(job.job_id, self.worker_id, msg, retry=True)
            return
        if kind == "ok":
            try:
                self.queue.complete(job.job_id, self.worker_id, payload)
            except ValueError as e:
                self.queue.fail(job.job_id, self.worker_id, f"the job's result is unusable: {e}")
            return
        self.queue.fail(job.job_id, self.worker_id, str(payload))

    # ---- background thread -----------------------------------------------------------
    def start(self) -> None:
        """Run jobs in a daemon thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"adapt-runner-{self.worker_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.run_once()
            except Exception:  # noqa: BLE001 - e.g. the database is briefly unreachable: try again later
                log.exception("adaptation runner %s: a job round failed; retrying", self.worker_id)
                job = None
            if job is None:
                self._stop.wait(self.poll_s)

    @property
    def alive(self) -> bool:
        """Whether the runner's thread runs (the model replica's health check asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread: a running job's child is killed and the job handed back to the
        queue (another worker takes it), then the child process exits."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._child is not None:
            self._child.close()
            self._child = None
