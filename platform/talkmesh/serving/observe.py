"""Request ids and service metrics: what an operator needs to follow one request through the
logs and to watch the service's rates, latencies and adaptation queue.

**Request ids.** :class:`ObserveMiddleware` (pure ASGI, so streamed bodies and
:class:`talkmesh.serving.limits.BodyLimitMiddleware` work unchanged) gives every HTTP request
an id: the client's ``X-Request-Id`` when it is a sane token (1..128 of ``[A-Za-z0-9._:-]``),
else a fresh one; arbitrary client input is never reflected nor logged. Ray Serve's proxy
already puts an ``x-request-id`` on every request it forwards (the client's, or a uuid4 it
made) and appends ``X-Request-ID`` to every response it sends, including its own 503s and
timeouts; reusing that id makes Serve's access log and ours agree. So inside a Serve replica
the middleware leaves the response header to the proxy (adding it again would duplicate the
header); anywhere else (tests, a bare ASGI server) it sets it on every response, the 413 of
the body limit and 500s included. The id lives in a contextvar for the request:
:class:`RequestIdFilter` puts it on log records as ``request_id`` ("-" outside a request),
:func:`install_request_logging` attaches filter and formatter to a logger (idempotent), and
:func:`request_context` carries an id across a Serve handle call (the callee sets it from an
argument).

**Metrics.** :class:`ServiceMetrics` records, through a pluggable :class:`MetricSink`:

* ``talkmesh_requests_total`` (counter) and ``talkmesh_request_seconds`` (histogram, 5 ms ..
  120 s) by ``route`` (the route TEMPLATE, e.g. ``/v1/styles/{style_id}``; an unknown path is
  ``other``, so a fuzzer cannot grow the series), ``method`` and ``status`` (499: the request
  was cancelled, e.g. the client went away; 500: an exception);
* ``talkmesh_adapt_queue_depth`` (gauge) by ``state`` (queued, running);
* ``talkmesh_adaptations_total`` (counter) and ``talkmesh_adaptation_seconds`` (histogram,
  1 s .. 1 h) by ``outcome`` (ready, failed, timeout, requeued).

In a Ray worker (a Serve replica) the sink is :class:`RayMetricSink` (``ray.util.metrics``:
each node's metrics agent exports them in Prometheus format, with Ray's ``ray_`` prefix);
outside Ray it is :class:`MemoryMetricSink` (bounded: sums and bucket counts only), which is
also what tests install to see what would be recorded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import dataclasses
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talkmesh.serving.errors import INTERNAL_MESSAGE, error_response
from talkmesh.serving.jobs import FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobQueue

__all__ = [
    "ADAPTATIONS_TOTAL",
    "ADAPTATION_SECONDS",
    "ADAPT_QUEUE_DEPTH",
    "CANCELLED_STATUS",
    "REQUESTS_TOTAL",
    "REQUEST_ID_HEADER",
    "REQUEST_SECONDS",
    "STREAMS_ACTIVE",
    "STREAMS_TOTAL",
    "STREAM_CHUNK_SECONDS",
    "HistogramSnapshot",
    "MemoryMetricSink",
    "MetricSink",
    "MetricSpec",
    "ObserveMiddleware",
    "RayMetricSink",
    "RequestIdFilter",
    "ServiceMetrics",
    "adaptation_outcome",
    "current_request_id",
    "install_request_logging",
    "new_request_id",
    "record_adaptation",
    "request_context",
    "route_template",
    "sane_request_id",
    "service_metrics",
    "set_metric_sink",
    "set_queue_depth",
    "update_queue_depth",
]

log = logging.getLogger("talkmesh.serving.observe")

REQUEST_ID_HEADER = "x-request-id"  # Ray Serve's name too (SERVE_HTTP_REQUEST_ID_HEADER)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("talkmesh_request_id", default=None)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
CANCELLED_STATUS = 499  # the request was cancelled before it finished (nginx's "client closed request")
OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


# ---- request ids ---------------------------------------------------------------------------
def new_request_id() -> str:
    """A fresh id: 32 hex digits (a uuid4)."""
    return uuid.uuid4().hex


def sane_request_id(value: str | bytes | None) -> str | None:
    """``value`` when it is a token safe to log and echo (1..128 of ``[A-Za-z0-9._:-]``), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _SANE_ID.fullmatch(value):
        return value
    return None


def current_request_id(default: str = "-") -> str:
    """The id of the request being served: ours (set by the middleware or
    :func:`request_context`), else Ray Serve's for this call when sane, else ``default``."""
    return _REQUEST_ID.get() or _serve_request_id() or default


def _serve_request_id() -> str | None:
    """Ray Serve's request id of the current call (Serve passes it along handle calls); None
    outside Serve. Serve keeps it in a private context, read defensively: a Ray release that
    moves it only loses this fallback."""
    context_module = sys.modules.get("ray.serve.context")  # never import Ray from a log filter
    getter = getattr(context_module, "_get_serve_request_context", None)
    if getter is None:
        return None
    try:
        return sane_request_id(getattr(getter(), "request_id", None))
    except Exception:  # noqa: BLE001 - best effort only
        return None


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[str]:
    """Log under ``request_id`` inside the block (a fresh id when it is None or not sane);
    yields the id used. For the callee of a Serve handle call, which gets the caller's
    :func:`current_request_id` as an argument."""
    rid = sane_request_id(request_id) or new_request_id()
    token = _REQUEST_ID.set(rid)
    try:
        yield rid
    finally:
        _REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (:func:`current_request_id`) to every record it sees; filters nothing.
    A record that already has one (``extra={"request_id": ...}``) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id()
        return True


class _RequestLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`install_request_logging` adds (its class marks it as installed)."""


def install_request_logging(
    logger_name: str = "talkmesh", level: int = logging.INFO, fmt: str = LOG_FORMAT
) -> logging.Handler:
    """Log ``logger_name`` and its children to stderr with the request id in every line.

    Idempotent: a second call returns the handler the first one added. The filter sits on the
    handler (a logger's own filters never see its children's records) and on the logger (so
    records of that logger carry ``request_id`` to other handlers too). The logger's level is
    set only when it has none. In a Serve replica stderr is Serve's replica log."""
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if isinstance(handler, _RequestLogHandler):
            return handler
    handler = _RequestLogHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
        logger.addFilter(RequestIdFilter())
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    return handler


# ---- metric definitions and sinks ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: ``kind`` is counter, histogram or gauge; ``boundaries`` (histograms) in seconds."""

    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
ADAPTATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)
REQUESTS_TOTAL = MetricSpec(
    "talkmesh_requests_total", "counter", "HTTP requests answered, by route template, method and status",
    ("route", "method", "status"),
)  # fmt: skip
REQUEST_SECONDS = MetricSpec(
    "talkmesh_request_seconds", "histogram", "HTTP request latency in seconds (until the last body byte)",
    ("route", "method", "status"), REQUEST_BUCKETS,
)  # fmt: skip
ADAPT_QUEUE_DEPTH = MetricSpec(
    "talkmesh_adapt_queue_depth", "gauge", "adaptation jobs waiting (queued) or running, service-wide", ("state",)
)
ADAPTATIONS_TOTAL = MetricSpec(
    "talkmesh_adaptations_total", "counter", "adaptation attempts ended, by outcome", ("outcome",)
)
ADAPTATION_SECONDS = MetricSpec(
    "talkmesh_adaptation_seconds", "histogram", "adaptation attempt run time in seconds (queue time excluded)",
    ("outcome",), ADAPTATION_BUCKETS,
)  # fmt: skip
STREAMS_ACTIVE = MetricSpec(
    "talkmesh_streams_active", "gauge", "open /v1/stream sessions of an ingress replica", ("replica",)
)
STREAMS_TOTAL = MetricSpec("talkmesh_streams_total", "counter", "/v1/stream sessions ended, by outcome", ("outcome",))
STREAM_CHUNK_SECONDS = MetricSpec(
    "talkmesh_stream_chunk_seconds", "histogram", "/v1/stream: seconds from a chunk's arrival to its frames sent",
    (), REQUEST_BUCKETS,
)  # fmt: skip
SPECS = (REQUESTS_TOTAL, REQUEST_SECONDS, ADAPT_QUEUE_DEPTH, ADAPTATIONS_TOTAL, ADAPTATION_SECONDS)
SPECS += (STREAMS_ACTIVE, STREAMS_TOTAL, STREAM_CHUNK_SECONDS)


class MetricSink(Protocol):
    """Where metric points go: ``value`` is an increment (counter), an observation (histogram)
    or the new value (gauge); ``tags`` has exactly ``spec.tag_keys``."""

    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None: ...


class RayMetricSink:
    """Records through ``ray.util.metrics`` (instruments made on first use, once per process).
    Needs a Ray worker or driver (``ray.is_initialized()``): outside one Ray accepts the points
    and exports nothing."""

    def __init__(self) -> None:
        self._instruments: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _instrument(self, spec: MetricSpec) -> Any:
        found = self._instruments.get(spec.name)
        if found is not None:
            return found
        from ray.util import metrics as ray_metrics

        with self._lock:
            if spec.name not in self._instruments:
                if spec.kind == "counter":
                    made = ray_metrics.Counter(spec.name, spec.description, spec.tag_keys)
                elif spec.kind == "histogram":
                    made = ray_metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tag_keys)
                elif spec.kind == "gauge":
                    made = ray_metrics.Gauge(spec.name, spec.description, spec.tag_keys)
                else:
                    raise ValueError(f"{spec.name}: kind must be counter, histogram or gauge, got {spec.kind!r}")
                self._instruments[spec.name] = made
            return self._instruments[spec.name]

    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        instrument = self._instrument(spec)
        if spec.kind == "counter":
            if value > 0:  # Ray refuses increments <= 0
                instrument.inc(value, tags=dict(tags))
        elif spec.kind == "histogram":
            instrument.observe(value, tags=dict(tags))
        else:
            instrument.set(value, tags=dict(tags))


@dataclasses.dataclass
class HistogramSnapshot:
    """A histogram series as :class:`MemoryMetricSink` keeps it: ``buckets[i]`` counts the
    observations <= ``boundaries[i]``, the last one those above every boundary."""

    count: int = 0
    sum: float = 0.0
    buckets: list[int] = dataclasses.field(default_factory=list)


def _series(spec_name: str, tags: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return spec_name, tuple(sorted(tags.items()))


class MemoryMetricSink:
    """Keeps metrics in this process: counter sums, gauge values, histogram counts, sums and
    bucket counts (memory bounded by the number of series). The fallback outside Ray, and
    what tests install to read what was recorded."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.histograms: dict[tuple[str, tuple[tuple[str, str], ...]], HistogramSnapshot] = {}
        self._lock = threading.Lock()

    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        key = _series(spec.name, tags)
        with self._lock:
            if spec.kind == "counter":
                self.counters[key] = self.counters.get(key, 0.0) + value
            elif spec.kind == "gauge":
                self.gauges[key] = float(value)
            else:
                snap = self.histograms.setdefault(key, HistogramSnapshot(buckets=[0] * (len(spec.boundaries) + 1)))
                snap.count += 1
                snap.sum += float(value)
                snap.buckets[bisect.bisect_left(spec.boundaries, value)] += 1

    def value(self, name: str, **tags: str) -> float | None:
        """A counter's sum or a gauge's value for exactly these tags (None: never recorded)."""
        key = _series(name, tags)
        return self.counters.get(key, self.gauges.get(key))

    def histogram(self, name: str, **tags: str) -> HistogramSnapshot | None:
        """A histogram series for exactly these tags (None: never observed)."""
        return self.histograms.get(_series(name, tags))

    def series(self, name: str) -> list[dict[str, str]]:
        """The tag sets recorded for metric ``name``."""
        keys = [*self.counters, *self.gauges, *self.histograms]
        return [dict(tags) for metric, tags in keys if metric == name]


def default_sink() -> MetricSink:
    """Ray's metrics inside a Ray worker or driver, else an in-memory sink (Ray is not imported
    here when nothing imported it yet: then this process is no Ray worker)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return RayMetricSink()
    return MemoryMetricSink()


class ServiceMetrics:
    """The service's metrics over one :class:`MetricSink` (chosen by :func:`default_sink` on
    first use when none is given). Recording never raises: a failing sink is logged once."""

    def __init__(self, sink: MetricSink | None = None) -> None:
        self._sink = sink
        self._warned: set[str] = set()

    @property
    def sink(self) -> MetricSink:
        if self._sink is None:
            self._sink = default_sink()
        return self._sink

    def _record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        try:
            self.sink.record(spec, float(value), tags)
        except Exception:  # noqa: BLE001 - metrics must never fail a request or a job
            if spec.name not in self._warned:
                self._warned.add(spec.name)
                log.warning("metric %s could not be recorded (reported once)", spec.name, exc_info=True)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: ``route`` a template or ``other``; unknown methods become ``other``."""
        method = method.upper() if method.upper() in _METHODS else OTHER
        tags = {"route": route, "method": method, "status": str(int(status))}
        self._record(REQUESTS_TOTAL, 1, tags)
        self._record(REQUEST_SECONDS, max(0.0, seconds), tags)

    def set_streams_active(self, replica: str, count: int) -> None:
        """Open /v1/stream sessions of one ingress replica."""
        self._record(STREAMS_ACTIVE, int(count), {"replica": replica})

    def record_stream(self, outcome: str) -> None:
        """One /v1/stream session ended with ``outcome`` (ended, disconnected, idle, error ...)."""
        self._record(STREAMS_TOTAL, 1, {"outcome": outcome})

    def record_stream_chunk(self, seconds: float) -> None:
        """Seconds from an audio chunk's arrival to its frames sent."""
        self._record(STREAM_CHUNK_SECONDS, max(0.0, seconds), {})

    def set_queue_depth(self, counts: Mapping[str, int]) -> None:
        """The adaptation queue's depth from :meth:`JobQueue.counts` (``queued`` and ``running``)."""
        for state in (QUEUED, RUNNING):
            self._record(ADAPT_QUEUE_DEPTH, int(counts.get(state, 0)), {"state": state})

    def record_adaptation(self, outcome: str, seconds: float) -> None:
        """One adaptation attempt ended with ``outcome`` after ``seconds`` of run time."""
        tags = {"outcome": outcome}
        self._record(ADAPTATIONS_TOTAL, 1, tags)
        self._record(ADAPTATION_SECONDS, max(0.0, seconds), tags)


_PROCESS: dict[str, ServiceMetrics] = {}
_PROCESS_LOCK = threading.Lock()


def service_metrics() -> ServiceMetrics:
    """This process's :class:`ServiceMetrics` (made on first use)."""
    with _PROCESS_LOCK:
        if "metrics" not in _PROCESS:
            _PROCESS["metrics"] = ServiceMetrics()
        return _PROCESS["metrics"]


def set_metric_sink(sink: MetricSink | None) -> ServiceMetrics:
    """Replace this process's metrics with ones over ``sink`` (None: choose again on first use)."""
    with _PROCESS_LOCK:
        _PROCESS["metrics"] = ServiceMetrics(sink)
        return _PROCESS["metrics"]


# ---- adaptation --------------------------------------------------------------------------
def adaptation_outcome(job: Job) -> str:
    """``ready`` | ``failed`` | ``timeout`` | ``requeued`` for a job as stored after an attempt
    (requeued: its worker died or stopped, or another worker holds it now)."""
    if job.state == SUCCEEDED:
        return "ready"
    if job.state == FAILED:
        return "timeout" if (job.error or "").startswith("timed out") else "failed"
    return "requeued"


def record_adaptation(job: Job, seconds: float, metrics: ServiceMetrics | None = None) -> None:
    """Record one adaptation attempt: the ``on_done`` callback of
    :class:`talkmesh.serving.jobs.JobRunner` (the job as stored afterwards, the attempt's seconds)."""
    outcome = adaptation_outcome(job)
    (metrics or service_metrics()).record_adaptation(outcome, seconds)
    log.info("adaptation %s of style %s: %s after %.1f s", job.job_id, job.style_id, outcome, seconds)


def set_queue_depth(counts: Mapping[str, int], metrics: ServiceMetrics | None = None) -> None:
    """Set the queue-depth gauge from :meth:`JobQueue.counts`."""
    (metrics or service_metrics()).set_queue_depth(counts)


def update_queue_depth(queue: JobQueue, metrics: ServiceMetrics | None = None) -> bool:
    """Read ``queue.counts()`` and set the gauge; False (logged) when the database could not
    be read, so a caller such as a health check never fails because of it."""
    try:
        counts = queue.counts()
    except Exception:  # noqa: BLE001 - the next call tries again
        log.warning("adaptation queue depth not updated: the job database could not be read", exc_info=True)
        return False
    set_queue_depth(counts, metrics)
    return True


# ---- the middleware ----------------------------------------------------------------------
def route_template(scope: Scope) -> str:
    """The template of the route serving ``scope`` (``/v1/styles/{style_id}``), ``other`` when
    no route matches. Uses the route the router recorded; when the router never ran (a
    middleware answered first, e.g. a 413) the app's routes are matched here."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    from starlette.routing import Match

    for route in getattr(scope.get("app"), "routes", ()):
        try:
            match, _ = route.matches(scope)
        except Exception:  # noqa: BLE001 - a route that cannot judge this scope does not match
            continue
        if match != Match.NONE and isinstance(getattr(route, "path", None), str):
            return route.path
    return OTHER


def _inside_serve_replica() -> bool:
    """Whether this process is a Ray Serve replica (whose proxy adds ``X-Request-ID`` itself)."""
    if "ray.serve" not in sys.modules:
        return False
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - RayServeException: not a replica
        return False
    return True


class ObserveMiddleware:
    """Request ids and request metrics for every HTTP request (see the module doc).

    Add it after every other middleware (``app.add_middleware`` puts the last added
    outermost) so that it sees their answers. ``response_header``: set ``X-Request-Id`` on
    responses; None decides once per process: not inside a Serve replica (the proxy adds it)."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics | None = None, response_header: bool | None = None
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._response_header = response_header

    @property
    def metrics(self) -> ServiceMetrics:
        return self._metrics or service_metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._response_header is None:
            self._response_header = not _inside_serve_replica()
        incoming = next((v for k, v in scope.get("headers", ()) if k.lower() == REQUEST_ID_HEADER.encode()), None)
        rid = sane_request_id(incoming) or new_request_id()
        token = _REQUEST_ID.set(rid)
        exchange = _Exchange(rid, send, self._response_header)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, exchange.send)
        except Exception:
            exchange.status = 500
            if not exchange.started:  # answer now, with the id; the server still sees the error
                with contextlib.suppress(Exception):  # the client may be gone: the app's error matters
                    await error_response(500, "internal_error", INTERNAL_MESSAGE)(scope, receive, exchange.send)
                exchange.status = 500
            raise  # the contextvar stays set: the error handler's log line carries the id
        except asyncio.CancelledError:
            exchange.status = CANCELLED_STATUS
            raise
        finally:
            seconds = time.perf_counter() - start
            status = exchange.status if exchange.status is not None else 500  # the app answered nothing
            self.metrics.record_request(route_template(scope), scope.get("method", ""), status, seconds)
        _REQUEST_ID.reset(token)


class _Exchange:
    """One request's response side: the status sent, and ``send`` adding the id header."""

    def __init__(self, rid: str, send: Send, add_header: bool) -> None:
        self.rid, self._send, self.add_header = rid, send, add_header
        self.status: int | None = None
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            if self.add_header:
                name = REQUEST_ID_HEADER.encode()
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != name]
                message = {**message, "headers": [*headers, (name, self.rid.encode())]}
        await self._send(message)
