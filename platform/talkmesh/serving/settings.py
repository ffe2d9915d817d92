"""The configuration of the style service and what both of its deployments share.

:class:`ServeConfig` is the ``args`` of the Serve application (``serve/config.yaml``); the
model deployment (:mod:`talkmesh.serving.model`) and the ingress (:mod:`talkmesh.serving.ingress`)
read it the same way, with the style store location and the service database URL resolved once
(:func:`resolve_locations`). :class:`ModelProblem` is how the model deployment answers a 4xx
across a Serve handle: a dict in the one error schema that the ingress raises again.
No Ray here.
"""

# No `from __future__ import annotations`: FastAPI and Serve resolve signatures at run time.
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from talkmesh.config import ConfigError, from_dict
from talkmesh.render.inputs import check_views
from talkmesh.serving.errors import ServiceError
from talkmesh.serving.inputs import (
    InputLimits,
)
from talkmesh.serving.jobs import JobQueue, QueueFull, TenantQuotaExceeded
from talkmesh.serving.store import resolve_store_uri
from talkmesh.serving.tenants import default_db_url

if TYPE_CHECKING:  # pragma: no cover
    pass


__all__ = [
    "DEPLOYMENT_NAMES",
    "DEPLOYMENT_OPTIONS",
    "ModelProblem",
    "ServeConfig",
    "deployment_options",
    "input_limits",
    "job_queue",
    "limits_info",
    "load_serve_config",
    "queue_error",
    "raise_problem",
    "resolve_locations",
]

SAMPLE_RATE = 16000
MiB = 2**20


# The deployments of the application, and what a Serve config file's ``deployments`` section
# may set for each (``talkmesh serve`` applies it the way ``serve deploy`` does).
DEPLOYMENT_NAMES = frozenset({"StyleModel", "Ingress"})
DEPLOYMENT_OPTIONS = frozenset({
    "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
    "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "ray_actor_options",
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The ``args`` of the Serve application (``serve/config.yaml`` documents each field)."""

    method: str = "faceformer"
    # "" = models:/talkmesh-<method>@<alias> in the tracking store; else a models:/ or
    # runs:/ URI, or a local method/checkpoint directory (method.json + model.pt).
    model: str = ""
    alias: str = "champion"
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    # The style store: a directory or an fsspec URL (s3://...). A relative path is resolved
    # once, by build_app, under $TALKMESH_HOME (default ~/.local/share/talkmesh), not a cwd.
    style_dir: str = "styles"
    # SQLAlchemy URL of the service database (API keys, adaptation jobs); "" = default_db_url():
    # $TALKMESH_SERVICE_DB, else sqlite:///$TALKMESH_HOME/service.db (default ~/.local/share/talkmesh).
    service_db: str = ""
    dev_mode: bool = False  # keyless requests from loopback peers only act as tenant "dev"
    faces: str = ""  # .npy (F, 3) mesh triangles for preview videos; "" = the face model's, else points
    # FLAME model file (generic_model.pkl or npz) for FLAME-parameter methods, so that they
    # return vertices too (never stored in the registry: licence). "" = parameters only.
    face_model: str = ""
    adapt_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # kwargs of method.adapt
    adapt_workers: int = 1  # adaptation worker processes per model replica
    adapt_timeout_s: float = 900.0  # an adaptation running longer is killed and fails
    adapt_attempts: int = 3  # runs of a job whose worker died before it fails for good
    adapt_lease_s: float = 30.0  # a job whose worker stops heartbeating is taken over after this
    adapt_queue_max: int = 100  # waiting adaptations (all tenants) before 503
    adapt_queue_per_tenant: int = 10  # waiting adaptations of one tenant before 429
    wait_s: float = 15.0  # POST /v1/styles waits up to this long before answering 202
    max_upload_mb: float = 50.0  # one uploaded file; a request body holds at most 3 of them + 1 MiB
    max_audio_seconds: float = 120.0  # /v1/animate
    max_reference_seconds: float = 60.0  # /v1/styles
    min_reference_seconds: float = 1.0
    max_sample_rate: int = 192_000  # audio uploads, checked from the header (min 8 kHz)
    max_channels: int = 8
    max_decoded_mb: float = 96.0  # frames x channels x 4 bytes of a decoded audio upload
    max_array_mb: float = 128.0  # an .npy upload's data as its header declares it
    decode_workers: int = 2  # threads decoding uploads per ingress replica (off the event loop)
    decode_queue: int = 32  # uploads waiting for a decode thread before 503
    max_page: int = 1000  # GET /v1/styles: the largest ``limit``
    preview_size: int = 384  # pixels, each side of a preview's panel
    preview_view: str = "front_three_quarter"  # talkmesh.render views: front | three-quarter panels
    torch_threads: int = 0  # intra-op threads per model replica; 0 = Ray's default (its CPUs)
    model_num_cpus: float = 1.0
    model_replicas: int = 1
    model_max_ongoing_requests: int = 4
    model_timeout_s: float = 300.0  # an ingress call to the model deployment answers 503 after this
    # /v1/stream (WebSocket): sessions run in the ingress replica that accepted them, on its own
    # copy of the model (loaded at the first stream). 0 streams = the route refuses every session.
    max_streams: int = 4  # open sessions per ingress replica; more are refused (close 1013)
    stream_idle_s: float = 30.0  # a session that sends nothing (or reads nothing) this long is closed
    max_stream_seconds: float = 600.0  # audio of one session
    max_chunk_seconds: float = 2.0  # audio of one binary message
    stream_threads: int = 1  # torch intra-op threads of the ingress's stream model
    # "bf16": generate, adaptation and streams under torch.autocast in bfloat16 (for GPUs with
    # bf16 units; on a CPU it is usually slower). "fp32": full precision.
    precision: str = "fp32"
    # Serve batching of /v1/animate requests of one style without generate options: up to
    # max_batch_size in one generate_batch (1 = none), waiting at most batch_wait_s to fill one.
    # Keep it <= model_max_ongoing_requests.
    max_batch_size: int = 1
    batch_wait_s: float = 0.01

    def __post_init__(self) -> None:
        for name in ("adapt_timeout_s", "wait_s", "max_upload_mb", "max_audio_seconds", "max_reference_seconds"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        counts = ("adapt_workers", "adapt_attempts", "adapt_queue_max", "adapt_queue_per_tenant", "decode_workers")
        counts += ("model_replicas", "model_max_ongoing_requests", "max_channels")
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: 'fp32' or 'bf16', got {self.precision!r}")
        if not 1 <= self.max_batch_size <= self.model_max_ongoing_requests or not 0 <= self.batch_wait_s <= 5:
            raise ConfigError("max_batch_size must lie in 1..model_max_ongoing_requests and batch_wait_s in 0..5 s")
        if self.max_streams < 0 or self.stream_threads < 1:
            raise ConfigError("max_streams must be >= 0 and stream_threads >= 1")
        names = ("adapt_lease_s", "max_decoded_mb", "max_array_mb", "model_timeout_s", "stream_idle_s")
        for name in (*names, "max_stream_seconds", "max_chunk_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.decode_queue < 0 or not 1 <= self.max_page <= 1000:
            raise ConfigError("decode_queue must be >= 0 and max_page 1..1000")
        if not 8000 <= self.max_sample_rate <= 768_000:
            raise ConfigError(f"max_sample_rate: 8000..768000 Hz, got {self.max_sample_rate}")
        if self.min_reference_seconds > self.max_reference_seconds:
            raise ConfigError("min_reference_seconds must not exceed max_reference_seconds")
        if not 32 <= self.preview_size <= 2048:
            raise ConfigError(f"preview_size: 32..2048, got {self.preview_size}")
        try:
            check_views(self.preview_view)
        except ValueError as e:
            raise ConfigError(f"preview_{e}") from None


def load_serve_config(args: Mapping[str, Any] | None) -> ServeConfig:
    """Strict: unknown keys and wrong types raise :class:`ConfigError` naming the key."""
    return from_dict(ServeConfig, dict(args or {}))


def resolve_locations(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with ``style_dir`` an absolute location (:func:`resolve_store_uri`) and
    ``service_db`` a URL (``""`` -> :func:`default_db_url`): resolved once where the app is
    built, so every replica, on any node and in any working directory, gets the same ones."""
    try:
        style_dir = resolve_store_uri(cfg.style_dir)
    except ValueError as e:
        raise ConfigError(f"style_dir: {e}") from None
    return dataclasses.replace(cfg, style_dir=style_dir, service_db=cfg.service_db or default_db_url())


def input_limits(cfg: ServeConfig) -> InputLimits:
    """The upload bounds of a config (every one checked from headers before decoding)."""
    return InputLimits.from_megabytes(
        cfg.max_upload_mb,
        max_sample_rate=cfg.max_sample_rate,
        max_channels=cfg.max_channels,
        max_audio_seconds=max(cfg.max_audio_seconds, 0.2),
        max_reference_seconds=cfg.max_reference_seconds,
        min_reference_seconds=cfg.min_reference_seconds,
        max_decoded_bytes=int(cfg.max_decoded_mb * MiB),
        max_array_bytes=int(cfg.max_array_mb * MiB),
        max_array_elements=max(1, int(cfg.max_array_mb * MiB) // 4),
    )


def job_queue(cfg: ServeConfig) -> JobQueue:
    return JobQueue(
        cfg.service_db,
        max_queued=cfg.adapt_queue_max,
        max_queued_per_tenant=cfg.adapt_queue_per_tenant,
        max_attempts=cfg.adapt_attempts,
    )


class ModelProblem(Exception):
    """An error of the model deployment; it crosses the handle as a dict in the error schema
    (plus the HTTP status and headers) and the ingress raises it again as a ServiceError."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, e: ServiceError) -> "ModelProblem":
        return cls(e.status, e.code, e.message, e.field, e.headers)

    def as_dict(self) -> dict[str, Any]:
        detail = {"code": self.code, "message": self.message, "field": self.field}
        return {"error": detail, "status": self.status, "headers": self.headers}


def raise_problem(result: Mapping[str, Any]) -> None:
    """Raise the model deployment's problem (``ModelProblem.as_dict``) as a ServiceError."""
    err = result["error"]
    raise ServiceError(int(result["status"]), err["code"], err["message"], err.get("field"), result.get("headers"))


def queue_error(e: QueueFull) -> ServiceError:
    """503 (queue full) or 429 (the tenant's quota) with ``Retry-After``."""
    code = "tenant_quota_exceeded" if isinstance(e, TenantQuotaExceeded) else "queue_full"
    return ServiceError(e.status, code, str(e), None, {"Retry-After": str(e.retry_after)})


def limits_info(cfg: ServeConfig) -> dict[str, Any]:
    """The request limits ``GET /v1/info`` shows."""
    names = ("max_upload_mb", "max_audio_seconds", "max_reference_seconds", "min_reference_seconds")
    names += ("max_sample_rate", "max_channels", "max_decoded_mb", "max_array_mb", "max_page")
    values = dataclasses.asdict(cfg)
    out = {k: values[k] for k in names}
    out["max_body_mb"] = round(input_limits(cfg).max_body_bytes / MiB, 3)
    out["adapt_queue_max"], out["adapt_queue_per_tenant"] = cfg.adapt_queue_max, cfg.adapt_queue_per_tenant
    for name in ("max_streams", "stream_idle_s", "max_stream_seconds", "max_chunk_seconds"):
        out[name] = values[name]
    return out


def deployment_options(deployments: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Serve deployment options per deployment name (``StyleModel``, ``Ingress``; each empty
    when not given), checked: an unknown deployment or option is a :class:`ConfigError`."""
    out: dict[str, dict[str, Any]] = {name: {} for name in sorted(DEPLOYMENT_NAMES)}
    for name, opts in deployments.items():
        if name not in out:
            raise ConfigError(f"deployments: unknown deployment {name!r}; expected one of {sorted(DEPLOYMENT_NAMES)}")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"deployments.{name}: expected a mapping of options")
        unknown = sorted(set(opts) - DEPLOYMENT_OPTIONS)
        if unknown:
            raise ConfigError(f"deployments.{name}: unknown option(s) {unknown}; allowed: {sorted(DEPLOYMENT_OPTIONS)}")
        out[name] = dict(opts)
    return out
