"""The Ray Serve application: few-shot style adaptation as a service.

    serve run serve/config.yaml              # against a running Ray (see serve/README.md)
    talkmesh serve --config serve/config.yaml  # starts a loopback-only Ray itself

Two deployments:

* ``StyleModel`` loads ``models:/talkmesh-<method>@<alias>`` (or a local method
  directory) once per replica and animates with ``method.generate``. Adaptation
  (``method.adapt(reference)``) runs as durable jobs (:mod:`talkmesh.serving.jobs`): each
  replica runs ``adapt_workers`` job runners that claim this model version's jobs from the
  service database and run them in a child process (:mod:`talkmesh.serving.adapt_worker`)
  that is killed at ``adapt_timeout_s``; a job whose replica died is taken over when its
  lease runs out. The result goes to the :class:`StyleStore`, so every replica sees it.
  Styles are loaded per request through Serve model multiplexing (``@serve.multiplexed``):
  the multiplexed model id is ``<tenant>/<canonical style spec>`` (a ``sty_...`` id, a
  training speaker name, or a weighted mix ``a:0.7,b:0.3``); a cached style is checked
  against the store (its generation) before each use, so a DELETE on any replica is
  honoured by every replica.
* ``Ingress`` (FastAPI) authenticates the caller (:mod:`talkmesh.serving.tenants`: an API
  key, or loopback-only development mode), bounds and decodes uploads off the event loop
  (:mod:`talkmesh.serving.inputs`, :mod:`talkmesh.serving.limits`) and answers HTTP:

  ``GET  /healthz``                 the model deployment answers; method, model version (no key)
  ``GET  /v1/info``                 method, fps, vertex count, training speakers, limits
  ``POST /v1/styles``               multipart ``audio`` + ``motion`` (.npy) [+ ``template``,
                                    ``name``, ``source`` audio|expression (methods whose
                                    ``adapt`` takes it: DEEPTalk's emotion source)]
                                    -> ``style_id``; 201 ready, 200 already stored and
                                    ready, 202 still adapting (poll GET)
  ``GET  /v1/styles``               the tenant's styles, a page at a time (``limit``, ``cursor``)
  ``GET  /v1/styles/{style_id}``    pending | ready | failed | absent (+ the adaptation summary)
  ``DELETE /v1/styles/{style_id}``  remove a style
  ``POST /v1/animate``              multipart ``audio`` + ``style_id`` [+ ``template``,
                                    ``format`` npz|npy|json|mp4, ``preview``; generate
                                    options ``emotion``, ``intensity``, ``emotion_audio``,
                                    ``sample``, ``temperature``, ``seed``] -> motion
  ``GET  /docs``                    OpenAPI documentation

Styles belong to the tenant that stored them; another tenant's style answers exactly like a
missing one (404). Adaptation is idempotent (the style id is the hash of the reference clip,
its adapt options and the tenant) and asynchronous, because the HTTP proxy may retry a
request (notes §4). Every error is answered in one schema, ``{"error": {"code", "message",
"field"}}`` (:mod:`talkmesh.serving.errors`); bad input gets a 4xx naming the field and never
reaches the model; a full adaptation queue answers 503 (429 for a tenant over its quota)
with ``Retry-After``.

The generate options of ``/v1/animate`` reach ``method.generate`` as keyword options only
when the method lists them in ``generate_options`` (``GET /v1/info`` shows them); otherwise
the answer is a 422 naming the field and the method. A ``ValueError`` of ``generate`` (an
emotion label the model does not know) is a 422 too.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures at run
# time, and Serve's ingress wrapper cannot resolve postponed (string) annotations.
import asyncio
import base64
import dataclasses
import functools
import hashlib
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.types import ASGIApp

from talkmesh.config import ConfigError, from_dict
from talkmesh.serving.adapt_worker import AdaptSpec, adapt_job, adaptation_status, submit_adaptation
from talkmesh.serving.errors import ERROR_RESPONSES, ServiceError, install_error_handlers
from talkmesh.serving.inputs import (
    EMOTION_LABEL,
    MAX_SEED,
    MAX_TEMPERATURE,
    MOTION_RANKS,
    TEMPLATE_RANKS,
    InputError,
    InputLimits,
    animate_options,
    check_supported,
    parse_style_spec,
    read_array,
    read_audio,
    reference_motion,
    template_array,
)
from talkmesh.serving.jobs import JobQueue, JobRunner, QueueFull, TenantQuotaExceeded
from talkmesh.serving.limits import BlockingRunner, BodyLimitMiddleware
from talkmesh.serving.store import StyleNotFound, StyleStore, resolve_store_uri
from talkmesh.serving.tenants import KeyStore, Principal, default_db_url, tenant_dependency

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import MotionMethod

__all__ = ["Ingress", "ServeConfig", "StyleModel", "build_app", "input_limits", "load_serve_config"]

log = logging.getLogger("talkmesh.serving")
SAMPLE_RATE = 16000
MAX_STYLES_PER_REPLICA = 32  # multiplexing LRU size (fixed when the class is defined)
MiB = 2**20


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
    # $TALKMESH_SERVICE_DB, else sqlite:///<cwd of build_app>/outputs/service.db.
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
    preview_size: int = 256
    torch_threads: int = 0  # intra-op threads per model replica; 0 = Ray's default (its CPUs)
    model_num_cpus: float = 1.0
    model_replicas: int = 1
    model_max_ongoing_requests: int = 4

    def __post_init__(self) -> None:
        for name in ("adapt_timeout_s", "wait_s", "max_upload_mb", "max_audio_seconds", "max_reference_seconds"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        counts = ("adapt_workers", "adapt_attempts", "adapt_queue_max", "adapt_queue_per_tenant", "decode_workers")
        counts += ("model_replicas", "model_max_ongoing_requests", "max_channels")
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("adapt_lease_s", "max_decoded_mb", "max_array_mb"):
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


def _job_queue(cfg: ServeConfig) -> JobQueue:
    return JobQueue(
        cfg.service_db,
        max_queued=cfg.adapt_queue_max,
        max_queued_per_tenant=cfg.adapt_queue_per_tenant,
        max_attempts=cfg.adapt_attempts,
    )


class _Problem(Exception):
    """An error of the model deployment; it crosses the handle as a dict in the error schema
    (plus the HTTP status and headers) and the ingress raises it again as a ServiceError."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, e: ServiceError) -> "_Problem":
        return cls(e.status, e.code, e.message, e.field, e.headers)

    def as_dict(self) -> dict[str, Any]:
        detail = {"code": self.code, "message": self.message, "field": self.field}
        return {"error": detail, "status": self.status, "headers": self.headers}


def _raise_problem(result: Mapping[str, Any]) -> None:
    """Raise the model deployment's problem (``_Problem.as_dict``) as a ServiceError."""
    err = result["error"]
    raise ServiceError(int(result["status"]), err["code"], err["message"], err.get("field"), result.get("headers"))


def _queue_error(e: QueueFull) -> ServiceError:
    """503 (queue full) or 429 (the tenant's quota) with ``Retry-After``."""
    code = "tenant_quota_exceeded" if isinstance(e, TenantQuotaExceeded) else "queue_full"
    return ServiceError(e.status, code, str(e), None, {"Retry-After": str(e.retry_after)})


# --------------------------------------------------------------------------------------
# The model deployment
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoadedStyle:
    """A multiplexed style: what ``generate`` takes, the reference template, and the store
    generation of every stored style in it (checked before each use)."""

    style: Any
    template: np.ndarray | None
    generations: dict[str, str]


def _limits_info(cfg: ServeConfig) -> dict[str, Any]:
    """The request limits ``GET /v1/info`` shows."""
    names = ("max_upload_mb", "max_audio_seconds", "max_reference_seconds", "min_reference_seconds")
    names += ("max_sample_rate", "max_channels", "max_decoded_mb", "max_array_mb", "max_page")
    values = dataclasses.asdict(cfg)
    out = {k: values[k] for k in names}
    out["max_body_mb"] = round(input_limits(cfg).max_body_bytes / MiB, 3)
    out["adapt_queue_max"], out["adapt_queue_per_tenant"] = cfg.adapt_queue_max, cfg.adapt_queue_per_tenant
    return out


@serve.deployment(max_ongoing_requests=4, health_check_period_s=10)
class StyleModel:
    """One replica: the registered model, adaptation job runners, multiplexed styles."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        import torch

        self.cfg = resolve_locations(load_serve_config(args))
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.method, self.model_ref, self.version, self.model_key = _load_model(self.cfg)
        self.facts = self.method.facts
        self.store = StyleStore(self.cfg.style_dir)
        self.queue = _job_queue(self.cfg)
        self.faces = _load_faces(self.cfg.faces, self.facts.num_vertices)
        self.runners = self._start_runners()  # before the face model: the saved model has none
        if self.cfg.face_model:
            from talkmesh.data.corpus import load_face_model

            layer = load_face_model(self.cfg.face_model)
            self.method.set_face_model(layer)
            if self.faces is None:
                self.faces = np.asarray(layer.faces, dtype=np.int64)  # (F, 3)
        log.info("talkmesh serving %s (%s), model key %s", self.cfg.method, self.model_ref, self.model_key)

    def _start_runners(self) -> list[JobRunner]:
        """``adapt_workers`` job runners for this model version; their child processes load
        the model from a method directory (the configured one, else a private copy)."""
        from talkmesh.train.checkpoint import save_method

        local = Path(self.cfg.model).expanduser() if self.cfg.model else None
        self._model_copy: str | None = None
        if local is not None and local.is_dir():
            model_dir = str(local.resolve())
        else:
            self._model_copy = model_dir = tempfile.mkdtemp(prefix="talkmesh-model-")
            save_method(model_dir, self.method)
        spec = AdaptSpec(model_dir, self.model_key, self.cfg.style_dir, self.cfg.face_model, self.cfg.torch_threads)
        runners = []
        for _ in range(self.cfg.adapt_workers):
            runner = JobRunner(
                self.queue,
                functools.partial(adapt_job, spec),
                timeout_s=max(self.cfg.adapt_timeout_s, 1.0),
                lease_s=self.cfg.adapt_lease_s,
                poll_s=0.25,
                model_key=self.model_key,
            )
            runner.start()
            runners.append(runner)
        return runners

    def __del__(self) -> None:
        """Replica shutdown: running jobs go back to the queue (another replica takes them)."""
        for runner in getattr(self, "runners", ()):
            runner.stop(timeout_s=10)
        if getattr(self, "_model_copy", None):
            shutil.rmtree(self._model_copy, ignore_errors=True)

    def check_health(self) -> None:
        if self.method is None:
            raise RuntimeError("model not loaded")

    def info(self) -> dict[str, Any]:
        f = self.facts
        return {
            "method": self.cfg.method,
            "model": self.model_ref,
            "model_version": self.version,
            "model_key": self.model_key,
            "style_version": int(self.method.style_version),
            "fps": float(f.fps),
            "num_vertices": int(f.num_vertices),
            "motion": f.motion,
            "param_dim": int(f.param_dim),
            "train_subjects": list(f.train_subjects),
            "supports_mix": self.method.supports_style_mixing,
            "generate_options": list(self.method.generate_options),
            "adapt_options": list(self.method.style_options),
            "limits": _limits_info(self.cfg),
        }

    # ---- styles, multiplexed ----------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_STYLES_PER_REPLICA)
    async def get_style(self, model_id: str) -> _LoadedStyle:
        """The style of a multiplexed model id ``<tenant>/<canonical spec>``."""
        tenant, _, spec = model_id.partition("/")
        return await asyncio.to_thread(self._resolve, spec, tenant)

    async def _style(self, model_id: str) -> tuple[Any, np.ndarray | None]:
        """(style, reference template) of a multiplexed id; a cached style whose stored styles
        were deleted (or stored again) on any replica is resolved afresh."""
        loaded = await self.get_style(model_id)
        tenant, _, spec = model_id.partition("/")
        if not await asyncio.to_thread(self._fresh, loaded, tenant):
            fresh = await asyncio.to_thread(self._resolve, spec, tenant)
            loaded.style, loaded.template, loaded.generations = fresh.style, fresh.template, fresh.generations
        return loaded.style, loaded.template

    def _fresh(self, loaded: _LoadedStyle, tenant: str) -> bool:
        return all(self.store.exists_fresh(n, tenant, g) for n, g in loaded.generations.items())

    def _component(self, name: str, tenant: str) -> tuple[Any, np.ndarray | None, str | None]:
        """(style, template, generation) of one stored style or training speaker."""
        if self.store.exists(name, tenant):
            generation = self.store.generation(name, tenant)
            st = adaptation_status(self.store, self.queue, name, self.model_key, tenant)
            if st["status"] == "ready":
                state = self.store.load_state(
                    name, self.model_key, self.method.name, self.method.style_version, tenant
                )  # fmt: skip
                return state, self.store.reference(name, tenant).get("template"), generation
            if st["status"] == "failed":
                msg = f"adaptation of style {name} failed: {st.get('error', 'unknown error')}"
                raise _Problem(422, "adaptation_failed", msg, "style_id")
            try:  # e.g. a new champion: adapt again from the stored reference
                submit_adaptation(self.store, self.queue, name, self.model_key, tenant, self.cfg.adapt_options)
            except QueueFull as e:
                raise _Problem.of(_queue_error(e)) from None
            msg = f"style {name} is being adapted for model {self.model_key}; retry shortly"
            raise _Problem(409, "style_pending", msg, "style_id", {"Retry-After": "1"})
        if name in self.facts.train_subjects:
            return name, None, None
        known = list(self.facts.train_subjects)
        msg = f"unknown style {name!r}: not a stored style id nor a training speaker {known}"
        raise _Problem(404, "not_found", msg, "style_id")

    def _resolve(self, spec: str, tenant: str) -> _LoadedStyle:
        """The style of a canonical spec for ``tenant``; every failure is a _Problem (4xx)."""
        from talkmesh.methods.base import StyleStateError

        try:
            return self._resolve_spec(spec, tenant)
        except InputError as e:
            raise _Problem.of(e) from None
        except StyleNotFound:  # deleted while being loaded
            raise _Problem(404, "not_found", f"unknown style in {spec!r}: it was deleted", "style_id") from None
        except (StyleStateError, OSError, ValueError, RuntimeError, KeyError) as e:
            log.warning("style %s of tenant %s cannot be loaded: %s", spec, tenant, e)
            msg = f"the stored style {spec!r} cannot be loaded for model {self.model_key}: {type(e).__name__}"
            raise _Problem(422, "style_unusable", msg, "style_id") from None

    def _resolve_spec(self, spec: str, tenant: str) -> _LoadedStyle:
        parts = parse_style_spec(spec)
        if len(parts) == 1:
            style, template, gen = self._component(parts[0][0], tenant)
            return _LoadedStyle(style, template, {parts[0][0]: gen} if gen else {})
        if not self.method.supports_style_mixing:
            msg = f"{self.cfg.method} does not support style mixing; send one style_id"
            raise _Problem(422, "mixing_unsupported", msg, "style_id")
        states, template, generations = [], None, {}
        for name, _ in parts:
            style, tmpl, gen = self._component(name, tenant)
            if isinstance(style, str):  # a training speaker
                style = self.method.encode_style(subject=style)
            states.append(style)
            template = tmpl if template is None else template
            if gen:
                generations[name] = gen
        return _LoadedStyle(self.method.mix_styles(states, [w for _, w in parts]), template, generations)

    # ---- animation ------------------------------------------------------------------------
    async def animate(
        self,
        audio: np.ndarray,
        template: np.ndarray | None,
        preview: bool,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Motion for ``audio`` (S,) 16 kHz in the style of the request's multiplexed id;
        ``options`` are keyword options of ``generate`` (each listed in its ``generate_options``).
        A problem is returned as ``_Problem.as_dict`` (the ingress answers it)."""
        options = dict(options or {})
        unlisted = sorted(set(options) - set(self.method.generate_options))
        try:
            if unlisted:
                msg = f"{', '.join(unlisted)}: not an option of the {self.cfg.method} model"
                raise _Problem(422, "invalid_input", msg, unlisted[0])
            model_id = serve.get_multiplexed_model_id()
            style, ref_template = await self._style(model_id) if model_id else (None, None)
            template = ref_template if template is None else template
            return await asyncio.to_thread(self._generate, audio, template, style, preview, options)
        except _Problem as e:
            return e.as_dict()

    def _generate(
        self,
        audio: np.ndarray,
        template: np.ndarray | None,
        style: Any,
        preview: bool,
        options: Mapping[str, Any],
    ) -> dict[str, Any]:
        import torch

        from talkmesh.methods.base import StyleStateError

        t0 = time.perf_counter()
        try:
            out = self.method.generate(audio, template, style, **options)
        except (ValueError, TypeError, StyleStateError) as e:
            raise _Problem(422, "cannot_animate", f"cannot animate: {e}") from None
        gen_s = time.perf_counter() - t0
        arrays = {k: v.detach().float().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
        result: dict[str, Any] = {
            "outputs": arrays,
            "fps": float(self.facts.fps),
            "model_key": self.model_key,
            "generate_s": gen_s,
            "audio_s": audio.shape[0] / SAMPLE_RATE,
        }
        if preview:
            if "vertices" not in arrays:
                raise _Problem(422, "no_vertices", "this model returns no vertices to render a preview from", "preview")
            if not np.isfinite(arrays["vertices"]).all():
                raise _Problem(422, "non_finite_output", "the motion holds non-finite values; no preview", "preview")
            result["preview_mp4"] = self._render(arrays["vertices"], audio)
        return result

    def _render(self, vertices: np.ndarray, audio: np.ndarray) -> bytes:
        from talkmesh.render import render_motion

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "preview.mp4"
            size = (self.cfg.preview_size, self.cfg.preview_size)
            render_motion(vertices, self.faces, path, float(self.facts.fps), audio=audio, size=size)
            return path.read_bytes()


def _load_model(cfg: ServeConfig) -> tuple["MotionMethod", str, int | None, str]:
    """(method in eval mode, model reference, registry version or None, model key)."""
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import MODEL_FILE, load_method

    uri = cfg.tracking_uri or None
    ref = cfg.model
    local = Path(ref).expanduser() if ref else None
    if local is not None and local.is_dir():
        loaded = load_method(local)
        digest = hashlib.sha256((local / MODEL_FILE).read_bytes()).hexdigest()[:12]
        if loaded.info.get("method") != cfg.method:
            raise ConfigError(f"model: {local} holds {loaded.info.get('method')!r}, not {cfg.method!r}")
        return loaded.method, str(local), None, f"{cfg.method}-local-{digest}"
    if ref and not ref.startswith("models:/"):
        raise ConfigError(f"model: {ref!r} is neither a method directory nor a models:/ URI")
    alias = cfg.alias
    if ref:  # models:/talkmesh-<method>@alias or models:/talkmesh-<method>/<version>
        body = ref.removeprefix("models:/")
        name, sep, alias = body.partition("@") if "@" in body else body.partition("/")
        if name != tracking.model_name(cfg.method) or not sep or not alias:
            raise ConfigError(f"model: expected models:/{tracking.model_name(cfg.method)}@<alias> or /<version>")
    version = int(alias) if alias.isdigit() else tracking.get_alias_version(cfg.method, alias, uri=uri)
    if version is None:
        raise RuntimeError(
            f"no models:/{tracking.model_name(cfg.method)}@{alias} in the tracking store "
            f"{uri or tracking.tracking_uri()}: train and register one first (python jobs/{cfg.method}.py)"
        )
    method, _, _ = tracking.load_registered(cfg.method, str(version), uri=uri)
    return method, f"models:/{tracking.model_name(cfg.method)}/{version}", version, f"{cfg.method}-v{version}"


def _load_faces(path: str, num_vertices: int) -> np.ndarray | None:
    if not path:
        return None
    faces = np.load(Path(path).expanduser(), allow_pickle=False)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.kind not in "iu":
        raise ConfigError(f"faces: {path} must hold an integer (F, 3) array, got {faces.dtype} {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ConfigError(f"faces: {path} indexes vertices outside [0, {num_vertices})")
    return faces.astype(np.int64)


# --------------------------------------------------------------------------------------
# The HTTP ingress
# --------------------------------------------------------------------------------------

# The body limit of this process's ingress replica: Ingress.__init__ sets it before the app
# serves (Starlette builds its middleware stack, and with it the limit, at the first request).
_BODY_LIMIT = {"max_bytes": InputLimits().max_body_bytes}


def _set_body_limit(max_bytes: int) -> None:
    _BODY_LIMIT["max_bytes"] = int(max_bytes)


class ReplicaBodyLimit(BodyLimitMiddleware):
    """:class:`BodyLimitMiddleware` with this replica's configured limit (a request body
    over it is refused with a 413 while it streams in, chunked or not)."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, _BODY_LIMIT["max_bytes"])


api = FastAPI(
    title="talkmesh",
    version="1",
    description=(
        "Few-shot speaking-style adaptation and speech-driven 3D facial animation. Send an API key as "
        "`Authorization: Bearer <key>` (or `X-API-Key`); every error has the body "
        '`{"error": {"code", "message", "field"}}`.'
    ),
    responses=ERROR_RESPONSES,
)
install_error_handlers(api)
api.add_middleware(ReplicaBodyLimit)

Format = Literal["npz", "npy", "json", "mp4"]
Source = Literal["audio", "expression"]
DEV_HEADERS = {"X-Talkmesh-Auth": "dev-mode"}


async def _read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        msg = f"upload is {upload.size / MiB:.1f} MB; at most {max_bytes / MiB:g} MB"
        raise InputError(413, field, msg, "too_large")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(413, field, f"upload exceeds {max_bytes / MiB:g} MB", "too_large")
    return data


def _reference_arrays(
    audio: bytes, motion: bytes, template: bytes | None, info: Mapping[str, Any], limits: InputLimits
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The checked arrays of a reference clip (audio, motion record, optional template) and
    its metadata; raises :class:`InputError` naming the bad field. Blocking (decoding)."""
    lo, hi = limits.min_reference_seconds, limits.max_reference_seconds
    audio_arr = read_audio(audio, "audio", hi, min_seconds=lo, limits=limits)
    motion_arr = read_array(motion, "motion", limits=limits, ranks=MOTION_RANKS)
    record = reference_motion(motion_arr, info, fps=info["fps"], min_seconds=lo, max_seconds=hi)
    frames = next(iter(record.values())).shape[0]
    a_s, m_s = audio_arr.shape[0] / SAMPLE_RATE, frames / info["fps"]
    if abs(a_s - m_s) > max(0.5, 0.1 * m_s):
        msg = f"{m_s:.2f} s of motion but {a_s:.2f} s of audio; send one synchronised clip"
        raise InputError(422, "motion", msg, "not_synchronised")
    if template is not None:
        record["template"] = template_array(read_array(template, "template", limits=limits, ranks=TEMPLATE_RANKS), info)
    meta = {"seconds": round(a_s, 3), "frames": int(frames), "fps": info["fps"]}
    return {"audio": audio_arr, **record}, meta


def _animate_inputs(
    audio: bytes,
    template: bytes | None,
    emotion_audio: bytes | None,
    fields: dict[str, Any],
    info: Mapping[str, Any],
    limits: InputLimits,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(audio, template or None, generate options) of an animate request. Blocking (decoding)."""
    if emotion_audio is not None:
        fields = {
            **fields,
            "emotion_audio": read_audio(emotion_audio, "emotion_audio", limits.max_audio_seconds, limits=limits),
        }
    options = animate_options(fields, tuple(info["generate_options"]), info["method"])
    audio_arr = read_audio(audio, "audio", limits.max_audio_seconds, limits=limits)
    tmpl = None
    if template is not None:
        tmpl = template_array(read_array(template, "template", limits=limits, ranks=TEMPLATE_RANKS), info)
    return audio_arr, tmpl, options


def _canonical_spec(style_id: str) -> str:
    """The multiplexing key of a style field: one name, or ``a:w,b:w`` with normalised weights."""
    if not style_id.strip():
        return ""
    parts = parse_style_spec(style_id)
    return parts[0][0] if len(parts) == 1 else ",".join(f"{n}:{w:.6g}" for n, w in parts)


def _motion_response(result: Mapping[str, Any], format: Format, headers: Mapping[str, str]) -> Response:
    """The body of ``POST /v1/animate`` in the requested ``format`` from the model's result
    (``outputs`` (T, ...) arrays, ``fps``, ``model_key``, optional ``preview_mp4``). Blocking
    (serialising); JSON cannot carry NaN or inf, so such motion is refused for it (422)."""
    outputs: dict[str, np.ndarray] = result["outputs"]
    frames = int(next(iter(outputs.values())).shape[0]) if outputs else 0
    headers = {
        **headers,
        "X-Talkmesh-Fps": f"{result['fps']:g}",
        "X-Talkmesh-Frames": str(frames),
        "X-Talkmesh-Model": result["model_key"],
        "X-Talkmesh-Generate-Seconds": f"{result['generate_s']:.4f}",
    }
    if format == "mp4":
        return Response(result["preview_mp4"], media_type="video/mp4", headers=headers)
    if format == "npy":
        if "vertices" not in outputs:
            raise ServiceError(422, "no_vertices", "this model returns no vertices; use npz or json", "format")
        buf = io.BytesIO()
        np.save(buf, outputs["vertices"])
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    if format == "json":
        if not all(np.isfinite(v).all() for v in outputs.values()):
            msg = "the model's motion holds non-finite values, which JSON cannot carry; ask for npz or npy"
            raise ServiceError(422, "non_finite_output", msg, "format")
        body: dict[str, Any] = {"fps": result["fps"], "frames": frames, "model": result["model_key"]}
        body["outputs"] = {k: v.tolist() for k, v in outputs.items()}
        if "preview_mp4" in result:
            body["preview_mp4_base64"] = base64.b64encode(result["preview_mp4"]).decode()
        return JSONResponse(body, headers=headers)
    extra = {"fps": np.float32(result["fps"])}
    if "preview_mp4" in result:
        extra["preview_mp4"] = np.frombuffer(result["preview_mp4"], dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **outputs, **extra)
    return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """HTTP front: who is calling, bounded decoding, the style store's reference side, responses."""

    def __init__(self, model: Any, args: Mapping[str, Any]) -> None:
        self.model = model  # DeploymentHandle of StyleModel
        self.cfg = resolve_locations(load_serve_config(args))
        self.limits = input_limits(self.cfg)
        _set_body_limit(self.limits.max_body_bytes)
        self.store = StyleStore(self.cfg.style_dir)
        self.queue = _job_queue(self.cfg)
        self.keys = KeyStore(self.cfg.service_db)
        self._auth = tenant_dependency(self.keys, self.cfg.dev_mode)
        self.decoder = BlockingRunner(self.cfg.decode_workers, self.cfg.decode_queue)
        self._info: dict[str, Any] | None = None
        self._info_t = 0.0
        if self.cfg.dev_mode:
            log.warning("talkmesh: DEVELOPMENT MODE: requests without an API key from 127.0.0.1/::1 act as tenant dev")

    async def info(self) -> dict[str, Any]:
        if self._info is None or time.monotonic() - self._info_t > 30:
            self._info = await self._call(self.model.info.remote())
            self._info_t = time.monotonic()
        return self._info

    async def _call(self, response: Any) -> Any:
        """The model deployment's answer; its absence is a 503 (not a 500)."""
        try:
            return await response
        except Exception as e:  # noqa: BLE001 - the replica died, restarts, or the handle timed out
            log.warning("model deployment call failed: %s: %s", type(e).__name__, e)
            msg = f"the model deployment is unavailable ({type(e).__name__}); retry shortly"
            raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "2"}) from None

    async def _principal(self, request: Request) -> Principal:
        """Who is calling (401 in the error schema when no valid key is sent)."""
        return await asyncio.to_thread(self._auth, request, Response())

    @staticmethod
    def _headers(principal: Principal) -> dict[str, str]:
        return dict(DEV_HEADERS) if principal.dev else {}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """The service and its model deployment answer (no key needed)."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            msg = f"model deployment unavailable: {type(e).__name__}: {e}"
            raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "5"}) from None
        self._info, self._info_t = info, time.monotonic()
        return {"status": "ok", **{k: info[k] for k in ("method", "model", "model_version")}}

    @api.get("/v1/info")
    async def get_info(self, request: Request) -> JSONResponse:
        """Method, model version, fps, vertex count, training speakers and request limits."""
        principal = await self._principal(request)
        body = {**await self.info(), "tenant": principal.tenant, "dev_mode": self.cfg.dev_mode}
        return JSONResponse(body, headers=self._headers(principal))

    # ---- styles ------------------------------------------------------------------------
    @api.post("/v1/styles", status_code=201)
    async def create_style(
        self,
        request: Request,
        audio: Annotated[UploadFile, File(description="reference speech: WAV/FLAC/OGG, any sample rate")],
        motion: Annotated[UploadFile, File(description=".npy (T, V, 3) / (T, V*3) vertices or (T, 53|56) params")],
        template: Annotated[UploadFile | None, File(description=".npy (V, 3) neutral face (vertex models)")] = None,
        name: Annotated[str, Form(max_length=200, description="a label for the style")] = "",
        source: Annotated[
            Source | None,
            Form(description="what the style's emotion is taken from (DEEPTalk): the reference's audio or motion"),
        ] = None,
        wait_s: Annotated[float | None, Query(ge=0, le=120, description="wait this long for adaptation")] = None,
    ) -> JSONResponse:
        """Store a reference clip of a new speaker and adapt the model to it (idempotent:
        the same clip and ``source`` give the same ``style_id``). 201/200 when ready, 202
        while adapting; 503/429 with ``Retry-After`` when the adaptation queue is full."""
        principal = await self._principal(request)
        info = await self.info()
        if source is not None and "source" not in info["adapt_options"]:
            raise InputError(422, "source", f"the {info['method']} model's adaptation takes no source option")
        limit = self.limits.max_upload_bytes
        data = [await _read_upload(audio, "audio", limit), await _read_upload(motion, "motion", limit)]
        data.append(await _read_upload(template, "template", limit) if template is not None else None)
        arrays, meta = await self.decoder.run(_reference_arrays, *data, info, self.limits)
        options = {"source": source} if source is not None else None
        tenant = principal.tenant
        sid, created = await asyncio.to_thread(
            self.store.put_reference, info["method"], arrays, {"name": name, **meta}, options, tenant
        )
        await self._submit(sid, info["model_key"], tenant)
        st = await self._wait(sid, info["model_key"], tenant, self.cfg.wait_s if wait_s is None else wait_s)
        body = await asyncio.to_thread(self._style_body, sid, st, info, tenant)
        headers = self._headers(principal)
        if st["status"] == "failed":
            msg = f"adaptation failed for {sid}: {st.get('error', 'unknown error')}"
            raise ServiceError(422, "adaptation_failed", msg, "motion", headers)
        if st["status"] == "ready":
            return JSONResponse(body, status_code=201 if created else 200, headers=headers)
        headers.update({"Location": f"/v1/styles/{sid}", "Retry-After": "1"})
        return JSONResponse(body, status_code=202, headers=headers)

    async def _submit(self, sid: str, model_key: str, tenant: str) -> None:
        """Queue the style's adaptation (a failed one again: the client posted the clip again)."""
        try:
            await asyncio.to_thread(
                submit_adaptation, self.store, self.queue, sid, model_key, tenant, self.cfg.adapt_options
            )
        except QueueFull as e:
            raise _queue_error(e) from None
        except StyleNotFound:  # a DELETE raced this POST
            raise ServiceError(409, "conflict", f"style {sid} was deleted while being stored; post it again") from None

    async def _wait(self, sid: str, key: str, tenant: str, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            st = await self._status(sid, key, tenant)
            if st["status"] in ("ready", "failed") or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    async def _status(self, sid: str, key: str, tenant: str) -> dict[str, Any]:
        """The style's adaptation status; 404 when it is not the tenant's (or was deleted)."""
        try:
            return await asyncio.to_thread(adaptation_status, self.store, self.queue, sid, key, tenant)
        except StyleNotFound:
            raise ServiceError(404, "not_found", f"style {sid!r} not found", "style_id") from None

    def _style_body(self, sid: str, st: Mapping[str, Any], info: Mapping[str, Any], tenant: str) -> dict[str, Any]:
        try:
            meta = self.store.meta(sid, tenant)
        except StyleNotFound:
            raise ServiceError(404, "not_found", f"style {sid!r} not found", "style_id") from None
        body = {
            "style_id": sid,
            "status": st["status"],
            "method": meta.get("method"),
            "model": info["model_key"],
            "name": meta.get("name", ""),
            "seconds": meta.get("seconds"),
            "created": meta.get("created"),
        }
        if meta.get("adapt_options"):
            body["adapt_options"] = meta["adapt_options"]
        for k in ("error", "wall_s", "summary", "attempts", "queue_s", "run_s"):
            if k in st:
                body[k] = st[k]
        return body

    @api.get("/v1/styles")
    async def list_styles(
        self,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="styles per page")] = 50,
        cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
    ) -> JSONResponse:
        """The tenant's stored styles with their status for the served model, oldest first, a
        page at a time: pass the answer's ``next_cursor`` as ``cursor`` (null: the last page)."""
        principal = await self._principal(request)
        info = await self.info()
        limit = min(limit, self.cfg.max_page)
        body = await asyncio.to_thread(self._page, principal.tenant, limit, cursor, info)
        return JSONResponse(body, headers=self._headers(principal))

    def _page(self, tenant: str, limit: int, cursor: str | None, info: Mapping[str, Any]) -> dict[str, Any]:
        try:
            page = self.store.list_page(tenant, limit, cursor)
        except ValueError as e:
            raise ServiceError(422, "invalid_input", str(e).removeprefix("cursor: "), "cursor") from None
        styles = []
        for meta in page.items:
            if meta.get("method") != info["method"]:
                continue
            try:
                st = adaptation_status(self.store, self.queue, meta["style_id"], info["model_key"], tenant)
                styles.append(self._style_body(meta["style_id"], st, info, tenant))
            except (StyleNotFound, ServiceError):  # deleted while listing
                continue
        return {"styles": styles, "next_cursor": page.next_cursor, "train_subjects": info["train_subjects"]}

    @api.get("/v1/styles/{style_id}")
    async def get_style(self, request: Request, style_id: str) -> JSONResponse:
        """A style's status for the served model: pending (with ``queue_s``, ``run_s``,
        ``attempts``), ready, failed (with the error) or absent (not adapted for this model
        version yet; it is on first use). Another tenant's style is a 404."""
        principal = await self._principal(request)
        info = await self.info()
        st = await self._status(style_id, info["model_key"], principal.tenant)
        body = await asyncio.to_thread(self._style_body, style_id, st, info, principal.tenant)
        return JSONResponse(body, headers=self._headers(principal))

    @api.delete("/v1/styles/{style_id}", status_code=204)
    async def delete_style(self, request: Request, style_id: str) -> Response:
        """Remove a style (its reference, every adapted state and its adaptation jobs); every
        replica stops using it. Another tenant's style is a 404."""
        principal = await self._principal(request)
        try:
            await asyncio.to_thread(self.store.delete, style_id, principal.tenant)
        except StyleNotFound:
            raise ServiceError(404, "not_found", f"style {style_id!r} not found", "style_id") from None
        await asyncio.to_thread(self.queue.forget, style_id)
        return Response(status_code=204, headers=self._headers(principal))

    # ---- animation ---------------------------------------------------------------------
    @api.post("/v1/animate")
    async def animate(
        self,
        request: Request,
        audio: Annotated[UploadFile, File(description="speech: WAV/FLAC/OGG, any sample rate")],
        style_id: Annotated[str, Form(description="style id, training speaker or mix 'id:0.7,id2:0.3'")] = "",
        template: Annotated[
            UploadFile | None, File(description=".npy (V, 3) neutral face; default: the style's")
        ] = None,
        format: Annotated[Format, Form(description="npz (all outputs + fps), npy (vertices), json, mp4")] = "npz",
        preview: Annotated[
            bool, Form(description="also render a preview MP4 (npz: preview_mp4; json: base64)")
        ] = False,
        emotion: Annotated[
            str | None,
            Form(pattern=rf"^{EMOTION_LABEL.pattern}$", description="emotion label, e.g. happy (DEEPTalk)"),
        ] = None,
        intensity: Annotated[
            float | None, Form(ge=0, le=1, allow_inf_nan=False, description="of the emotion label, 0..1 (default 1)")
        ] = None,
        emotion_audio: Annotated[
            UploadFile | None, File(description="speech whose emotion drives the motion (DEEPTalk)")
        ] = None,
        sample: Annotated[
            bool | None, Form(description="sample instead of the deterministic argmax decoding (DEEPTalk)")
        ] = None,
        temperature: Annotated[
            float | None,
            Form(gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="code temperature (top and bottom)"),
        ] = None,
        seed: Annotated[int | None, Form(ge=0, le=MAX_SEED, description="seed of the sampling")] = None,
    ) -> Response:
        """Animate ``audio`` in a style: motion at the model's fps. The generate options
        (``emotion`` ... ``seed``) are for methods that list them (``GET /v1/info``
        ``generate_options``); others answer 422."""
        principal = await self._principal(request)
        info = await self.info()
        fields = dict(emotion=emotion, intensity=intensity, sample=sample, temperature=temperature, seed=seed)
        limit = self.limits.max_upload_bytes
        emo = None
        if emotion_audio is not None:  # refused before reading when the method takes no such option
            check_supported([*(k for k, v in fields.items() if v is not None), "emotion_audio"],
                            tuple(info["generate_options"]), info["method"])  # fmt: skip
            emo = await _read_upload(emotion_audio, "emotion_audio", limit)
        data = await _read_upload(audio, "audio", limit)
        tmpl = await _read_upload(template, "template", limit) if template is not None else None
        audio_arr, tmpl_arr, options = await self.decoder.run(
            _animate_inputs, data, tmpl, emo, fields, info, self.limits
        )
        spec = _canonical_spec(style_id)
        handle = self.model.options(multiplexed_model_id=f"{principal.tenant}/{spec}") if spec else self.model
        result = await self._call(handle.animate.remote(audio_arr, tmpl_arr, bool(preview or format == "mp4"), options))
        if "error" in result:
            _raise_problem(result)
        return await self.decoder.run(_motion_response, result, format, self._headers(principal))


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Serve application (``import_path: talkmesh.serving.app:build_app``; ``args`` =
    :class:`ServeConfig` fields). The style store location and the service database URL are
    resolved here, once, and every replica gets the same absolute ones."""
    cfg = resolve_locations(load_serve_config(args))
    plain = dataclasses.asdict(cfg)
    model = StyleModel.options(
        num_replicas=cfg.model_replicas,
        max_ongoing_requests=cfg.model_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.model_num_cpus},
    ).bind(plain)
    return Ingress.bind(model, plain)
