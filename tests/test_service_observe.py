"""Request ids and metrics (talkmesh.serving.observe) on a tiny FastAPI app, without Ray:
ids generated, propagated and refused when hostile; the header on every kind of answer; log
records carrying the id; route templates, not raw paths; counts and latencies by status; the
adaptation metrics fed by JobRunner's on_done; the fallback sink outside Ray."""

import asyncio
import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from talkmesh.serving import observe
from talkmesh.serving.errors import install_error_handlers
from talkmesh.serving.jobs import Job, JobQueue, JobRunner
from talkmesh.serving.limits import BodyLimitMiddleware
from talkmesh.serving.observe import (
    ADAPT_QUEUE_DEPTH,
    REQUEST_SECONDS,
    REQUESTS_TOTAL,
    MemoryMetricSink,
    ObserveMiddleware,
    RayMetricSink,
    RequestIdFilter,
    ServiceMetrics,
)

HEX_ID = re.compile(r"[0-9a-f]{32}")
app_log = logging.getLogger("talkmesh.test_observe")


class Records(logging.Handler):
    """Collects records that passed a RequestIdFilter."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = Records()
    for name in ("talkmesh.test_observe", "talkmesh.serving.errors"):
        logging.getLogger(name).addHandler(handler)
    app_log.setLevel(logging.INFO)
    yield handler
    for name in ("talkmesh.test_observe", "talkmesh.serving.errors"):
        logging.getLogger(name).removeHandler(handler)


def make_app(sink: MemoryMetricSink, max_bytes: int = 1000, response_header: bool = True) -> FastAPI:
    """The service's middleware order: the body limit first, the observer added last (outermost)."""
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    app.add_middleware(ObserveMiddleware, metrics=ServiceMetrics(sink), response_header=response_header)

    @app.get("/v1/styles/{style_id}")
    async def get_style(style_id: str):
        app_log.info("looking up %s", style_id)
        return {"style_id": style_id, "request_id": observe.current_request_id()}

    @app.post("/v1/styles")
    async def post_style(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/v1/items")
    async def items(limit: int = Query(ge=1)):
        return {"limit": limit}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    @app.get("/stream")
    async def stream():
        async def chunks():
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


@pytest.fixture
def sink():
    return MemoryMetricSink()


@pytest.fixture
def client(sink):
    with TestClient(make_app(sink), raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------------- request ids


def test_an_id_is_generated_and_seen_by_the_route(client):
    r = client.get("/v1/styles/abc")
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and HEX_ID.fullmatch(rid)
    assert r.json()["request_id"] == rid
    assert client.get("/v1/styles/abc").headers["x-request-id"] != rid  # one per request


@pytest.mark.parametrize("rid", ["abc-123", "9f1c.e2:x_Y", "a" * 128, "0"])
def test_a_sane_client_id_is_kept(client, rid):
    r = client.get("/v1/styles/abc", headers={"X-Request-Id": rid})
    assert r.headers["x-request-id"] == rid and r.json()["request_id"] == rid
    assert r.headers.get_list("x-request-id") == [rid]  # set once, never duplicated


@pytest.mark.parametrize(
    "hostile",
    ["a" * 129, "two words", "<script>alert(1)</script>", "id,other", "${jndi:ldap://x}", "ü".encode("latin-1"), ""],
)
def test_a_hostile_client_id_is_replaced(client, hostile):
    r = client.get("/v1/styles/abc", headers={"X-Request-Id": hostile})
    rid = r.headers["x-request-id"]
    assert HEX_ID.fullmatch(rid) and r.json()["request_id"] == rid
    assert r.headers.get_list("x-request-id") == [rid]


def test_the_header_is_on_every_kind_of_answer(sink):
    app = make_app(sink, max_bytes=100)
    with TestClient(app, raise_server_exceptions=False) as c:
        answers = {
            "200": c.get("/v1/styles/abc"),
            "404": c.get("/no/such/route"),
            "405": c.delete("/v1/items"),
            "422": c.get("/v1/items", params={"limit": "0"}),
            "413 declared": c.post("/v1/styles", content=b"x" * 500),
            "413 chunked": c.post("/v1/styles", content=iter([b"x" * 60] * 5)),
            "500": c.get("/boom", headers={"X-Request-Id": "req-500"}),
            "stream": c.get("/stream"),
        }
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {
        "200": 200, "404": 404, "405": 405, "422": 422,
        "413 declared": 413, "413 chunked": 413, "500": 500, "stream": 200,
    }  # fmt: skip
    for name, r in answers.items():
        assert r.headers.get_list("x-request-id"), f"{name}: no X-Request-Id"
    assert answers["500"].headers["x-request-id"] == "req-500"
    assert answers["500"].json()["error"]["code"] == "internal_error"  # the service's schema, no traceback
    assert answers["413 chunked"].json()["error"]["field"] == "body"
    assert answers["stream"].text == "chunk0;chunk1;chunk2;"


def test_inside_serve_the_proxy_sets_the_header_but_the_id_is_still_used(sink, records):
    with TestClient(make_app(sink, response_header=False)) as c:
        r = c.get("/v1/styles/abc", headers={"x-request-id": "serve-made-id"})
    assert "x-request-id" not in r.headers  # Ray Serve's proxy appends it: no duplicate
    assert r.json()["request_id"] == "serve-made-id"
    assert [rec.request_id for rec in records.records] == ["serve-made-id"]


def test_outside_a_replica_the_header_is_set_by_default(sink):
    app = FastAPI()
    app.add_middleware(ObserveMiddleware, metrics=ServiceMetrics(sink))
    with TestClient(app) as c:
        assert HEX_ID.fullmatch(c.get("/x").headers["x-request-id"])


# ---------------------------------------------------------------------- logging


def test_log_records_carry_the_request_id(client, records):
    r = client.get("/v1/styles/abc", headers={"X-Request-Id": "req-log-1"})
    boom = client.get("/boom", headers={"X-Request-Id": "req-log-2"})
    app_log.info("between requests")
    by_message = {rec.getMessage(): rec.request_id for rec in records.records}
    assert r.status_code == 200 and boom.status_code == 500
    assert by_message["looking up abc"] == "req-log-1"
    assert by_message["between requests"] == "-"
    # the error handler's traceback line (logged after the middleware re-raised) carries the id
    assert by_message["GET /boom -> 500: unexpected RuntimeError"] == "req-log-2"


def test_install_request_logging_is_idempotent_and_formats_the_id():
    name = "talkmesh.test_observe_install"
    first = observe.install_request_logging(name)
    try:
        assert observe.install_request_logging(name) is first
        logger = logging.getLogger(name)
        assert sum(isinstance(h, type(first)) for h in logger.handlers) == 1
        assert sum(isinstance(f, RequestIdFilter) for f in logger.filters) == 1
        stream = io.StringIO()
        first.setStream(stream)
        with observe.request_context("req-fmt") as rid:
            logging.getLogger(f"{name}.child").info("inside")  # a child's record, through the handler
        logger.warning("outside")
        lines = stream.getvalue().splitlines()
        assert rid == "req-fmt"
        assert lines[0].endswith(f"INFO {name}.child [req-fmt] inside")
        assert lines[1].endswith(f"WARNING {name} [-] outside")
    finally:
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).filters.clear()


def test_request_context_carries_an_id_across_a_call_and_refuses_junk():
    assert observe.current_request_id() == "-"
    with observe.request_context("from-ingress") as rid:
        assert rid == observe.current_request_id() == "from-ingress"
        with observe.request_context("bad id\n") as inner:
            assert HEX_ID.fullmatch(inner) and observe.current_request_id() == inner
        assert observe.current_request_id() == "from-ingress"
    assert observe.current_request_id() == "-"
    assert observe.current_request_id(default="none") == "none"


# ---------------------------------------------------------------------- request metrics


def test_routes_are_templates_never_raw_paths(client, sink):
    for i in range(20):
        client.get(f"/v1/styles/sty_{i}")
        client.get(f"/fuzz/{i}/../../etc/passwd")
    client.request("BREW", "/v1/styles/x")
    routes = {tags["route"] for tags in sink.series(REQUESTS_TOTAL.name)}
    methods = {tags["method"] for tags in sink.series(REQUESTS_TOTAL.name)}
    assert routes == {"/v1/styles/{style_id}", "other"}
    assert methods == {"GET", "other"}
    assert sink.value(REQUESTS_TOTAL.name, route="/v1/styles/{style_id}", method="GET", status="200") == 20
    assert sink.value(REQUESTS_TOTAL.name, route="other", method="GET", status="404") == 20
    assert sink.value(REQUESTS_TOTAL.name, route="/v1/styles/{style_id}", method="other", status="405") == 1


def test_counts_and_latencies_by_status(sink):
    with TestClient(make_app(sink, max_bytes=100), raise_server_exceptions=False) as c:
        for _ in range(3):
            c.get("/v1/items", params={"limit": 5})
        c.get("/v1/items", params={"limit": -1})
        c.get("/boom")
        c.post("/v1/styles", content=b"x" * 500)  # refused by the body limit before routing
    expect = {
        ("/v1/items", "GET", "200"): 3,
        ("/v1/items", "GET", "422"): 1,
        ("/boom", "GET", "500"): 1,
        ("/v1/styles", "POST", "413"): 1,
    }
    for (route, method, status), n in expect.items():
        tags = {"route": route, "method": method, "status": status}
        assert sink.value(REQUESTS_TOTAL.name, **tags) == n, tags
        hist = sink.histogram(REQUEST_SECONDS.name, **tags)
        assert hist.count == n and 0 < hist.sum < 30 * n and sum(hist.buckets) == n
    assert len(sink.series(REQUESTS_TOTAL.name)) == len(expect)


def _call(app, scope_path: str = "/x") -> tuple[MemoryMetricSink, list[dict]]:
    """Run ``app`` behind the middleware once, as a server would, swallowing what it raises."""
    sink = MemoryMetricSink()
    middleware = ObserveMiddleware(app, metrics=ServiceMetrics(sink), response_header=True)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def main():
        scope = {"type": "http", "method": "GET", "path": scope_path, "headers": []}
        try:
            await middleware(scope, receive, send)
        except (Exception, asyncio.CancelledError):
            pass

    asyncio.run(main())
    return sink, sent


def test_cancelled_requests_and_silent_apps_are_counted():
    async def cancelled(scope, receive, send):
        raise asyncio.CancelledError  # what Serve does to a request whose client went away

    async def silent(scope, receive, send):
        return None

    async def broken_midway(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise OSError("connection reset")

    tags = {"route": "other", "method": "GET"}
    assert _call(cancelled)[0].value(REQUESTS_TOTAL.name, status="499", **tags) == 1
    silent_sink, silent_sent = _call(silent)
    assert silent_sink.value(REQUESTS_TOTAL.name, status="500", **tags) == 1 and silent_sent == []
    midway, midway_sent = _call(broken_midway)
    assert midway.value(REQUESTS_TOTAL.name, status="500", **tags) == 1
    assert [m["status"] for m in midway_sent if m["type"] == "http.response.start"] == [200]  # nothing sent twice


# ---------------------------------------------------------------------- sinks


def test_outside_ray_the_default_sink_is_in_memory(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert isinstance(observe.default_sink(), MemoryMetricSink)
    metrics = observe.set_metric_sink(None)
    try:
        assert isinstance(metrics.sink, MemoryMetricSink) and observe.service_metrics() is metrics
    finally:
        observe.set_metric_sink(None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert isinstance(observe.default_sink(), RayMetricSink)


def test_ray_metrics_made_outside_ray_neither_crash_nor_warn():
    """In a fresh process (this one may hold the session's Ray): no crash, no warning, no Ray started."""
    code = textwrap.dedent(
        """
        import warnings
        import ray
        from talkmesh.serving.observe import RayMetricSink, ServiceMetrics
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = ServiceMetrics(RayMetricSink())
            metrics.record_request("/v1/info", "GET", 200, 0.01)
            metrics.set_queue_depth({"queued": 0, "running": 2})
            metrics.record_adaptation("ready", 12.0)
        assert not caught, [str(w.message) for w in caught]
        assert not ray.is_initialized()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_failing_sink_never_breaks_a_request_and_warns_once(caplog):
    class Broken:
        def record(self, spec, value, tags):
            raise RuntimeError("exporter down")

    app = FastAPI()
    app.add_middleware(ObserveMiddleware, metrics=ServiceMetrics(Broken()), response_header=True)

    @app.get("/ok")
    async def ok():
        return {}

    with caplog.at_level(logging.WARNING, logger="talkmesh.serving.observe"), TestClient(app) as c:
        assert [c.get("/ok").status_code for _ in range(3)] == [200, 200, 200]
    warned = [r.getMessage() for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert sorted(warned) == [f"metric {n} could not be recorded (reported once)" for n in sorted(
        [REQUEST_SECONDS.name, REQUESTS_TOTAL.name])]  # fmt: skip


# ---------------------------------------------------------------------- adaptation metrics


def adapt_or_fail(job: Job) -> dict:
    """Runs in the runner's child process."""
    if job.options.get("fail"):
        raise ValueError("unusable reference")
    return {"pid": os.getpid()}


def _queue(tmp_path: Path) -> JobQueue:
    return JobQueue(engine=sa.create_engine(f"sqlite:///{tmp_path / 'service.db'}", connect_args={"timeout": 30.0}))


def test_queue_depth_gauge_follows_the_queue(tmp_path):
    sink = MemoryMetricSink()
    metrics = ServiceMetrics(sink)
    queue = _queue(tmp_path)
    for i in range(3):
        queue.submit(f"sty_{i}", "t", "m")
    queue.claim("w1", 30.0)
    assert observe.update_queue_depth(queue, metrics) is True
    assert sink.value(ADAPT_QUEUE_DEPTH.name, state="queued") == 2
    assert sink.value(ADAPT_QUEUE_DEPTH.name, state="running") == 1

    class Unreachable:
        def counts(self):
            raise sa.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    assert observe.update_queue_depth(Unreachable(), metrics) is False  # logged, not raised
    assert sink.value(ADAPT_QUEUE_DEPTH.name, state="queued") == 2


def test_job_runner_reports_each_attempt_to_on_done(tmp_path):
    sink = MemoryMetricSink()
    metrics = ServiceMetrics(sink)
    seen: list[tuple[str, float]] = []

    def on_done(job: Job, seconds: float) -> None:
        seen.append((job.state, seconds))
        observe.record_adaptation(job, seconds, metrics)

    queue = _queue(tmp_path)
    queue.submit("sty_ok", "t", "m")
    queue.submit("sty_bad", "t", "m", {"fail": True})
    runner = JobRunner(queue, adapt_or_fail, worker_id="r1", timeout_s=120, lease_s=10, on_done=on_done)
    try:
        assert runner.run_once().state == "succeeded"
        assert runner.run_once().state == "failed"
        queue.submit("sty_late", "t", "m")
        runner.on_done = lambda job, seconds: 1 / 0  # a broken observer does not stop the runner
        assert runner.run_once().state == "succeeded"
    finally:
        runner.stop()
    assert [state for state, _ in seen] == ["succeeded", "failed"]
    assert all(0 < s < 120 for _, s in seen)
    for outcome in ("ready", "failed"):
        assert sink.value(observe.ADAPTATIONS_TOTAL.name, outcome=outcome) == 1
        assert sink.histogram(observe.ADAPTATION_SECONDS.name, outcome=outcome).count == 1


def test_adaptation_outcomes():
    base = Job(
        "j1", "sty", "m", "t", {}, "succeeded", 1, 3, "w", None, time.time(), time.time(), time.time(), None, None
    )
    assert observe.adaptation_outcome(base) == "ready"
    assert observe.adaptation_outcome(dataclasses.replace(base, state="failed", error="ValueError: x")) == "failed"
    timed_out = dataclasses.replace(base, state="failed", error="timed out after 900 s")
    assert observe.adaptation_outcome(timed_out) == "timeout"
    assert observe.adaptation_outcome(dataclasses.replace(base, state="queued")) == "requeued"


# ---------------------------------------------------------------------- with Ray


@pytest.mark.slow
def test_metrics_recorded_in_a_ray_worker_reach_the_prometheus_endpoint(ray_cluster):
    """An actor records through the default sink (Ray's, in a worker); the node's metrics
    agent exports the points with Ray's ``ray_`` prefix on its metrics export port."""
    import urllib.request

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self) -> str:
            from talkmesh.serving import observe as obs

            metrics = obs.ServiceMetrics()
            metrics.record_request("/v1/styles/{style_id}", "DELETE", 418, 0.02)  # a series no service records
            metrics.set_queue_depth({"queued": 3, "running": 1})
            metrics.record_adaptation("timeout", 900.0)
            return type(metrics.sink).__name__

    recorder = Recorder.remote()
    try:
        assert ray.get(recorder.record.remote(), timeout=120) == "RayMetricSink"
        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
        wanted = ('status="418"', "ray_talkmesh_adapt_queue_depth{", 'outcome="timeout"')
        deadline, text = time.monotonic() + 90, ""
        while time.monotonic() < deadline and not all(w in text for w in wanted):
            time.sleep(1.0)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
    finally:
        ray.kill(recorder)
    lines = [line for line in text.splitlines() if line.startswith("ray_talkmesh_")]
    requests = [line for line in lines if line.startswith("ray_talkmesh_requests_total{")]
    assert any('route="/v1/styles/{style_id}"' in line and 'status="418"' in line for line in requests), requests
    assert any('state="queued"' in line and line.endswith(" 3.0") for line in lines)
    buckets = [line for line in lines if line.startswith("ray_talkmesh_adaptation_seconds_bucket{")]
    assert any('outcome="timeout"' in line for line in buckets)
