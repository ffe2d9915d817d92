"""The Ray Serve application: few-shot style adaptation as a service.

    serve run serve/config.yaml              # against a running Ray (see serve/README.md)
    talkmesh serve --config serve/config.yaml  # starts a loopback-only Ray itself

Two deployments:

* ``StyleModel`` loads ``models:/talkmesh-<method>@<alias>`` (or a local method
  directory) once per replica. It adapts styles in a background thread pool
  (``method.adapt(reference)``; the result goes to the :class:`StyleStore`, so every
  replica sees it) and animates with ``method.generate``. Styles are loaded per request
  through Serve model multiplexing (``@serve.multiplexed``): the multiplexed model id is
  the canonical style spec (``sty_...``, a training speaker name, or a weighted mix
  ``a:0.7,b:0.3``), so requests for one style go to replicas that already hold it.
* ``Ingress`` (FastAPI) decodes and validates uploads and answers HTTP:

  ``GET  /healthz``                 the model deployment answers; method, model version
  ``GET  /v1/info``                 method, fps, vertex count, training speakers, limits
  ``POST /v1/styles``               multipart ``audio`` + ``motion`` (.npy) [+ ``template``,
                                    ``name``, ``source`` audio|expression (methods whose
                                    ``adapt`` takes it: DEEPTalk's emotion source)]
                                    -> ``style_id``; 201 ready, 200 already stored and
                                    ready, 202 still adapting (poll GET)
  ``GET  /v1/styles``               every stored style
  ``GET  /v1/styles/{style_id}``    pending | ready | failed (+ the adaptation summary)
  ``DELETE /v1/styles/{style_id}``  remove a style
  ``POST /v1/animate``              multipart ``audio`` + ``style_id`` [+ ``template``,
                                    ``format`` npz|npy|json|mp4, ``preview``; generate
                                    options ``emotion``, ``intensity``, ``emotion_audio``,
                                    ``sample``, ``temperature``, ``seed``] -> motion
  ``GET  /docs``                    OpenAPI documentation

Adaptation is idempotent (the style id is the hash of the reference clip and its adapt
options) and asynchronous, because the HTTP proxy may retry a request (notes §4). Bad input
gets a 4xx naming the field (:mod:`talkmesh.serving.inputs`) and never reaches the model.

The generate options of ``/v1/animate`` reach ``method.generate`` as keyword options only
when the method lists them in ``generate_options`` (``GET /v1/info`` shows them); otherwise
the answer is a 422 naming the field and the method. A ``ValueError`` of ``generate`` (an
emotion label the model does not know) is a 422 too.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures at run
# time, and Serve's ingress wrapper cannot resolve postponed (string) annotations.
import asyncio
import base64
import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from ray import serve

from talkmesh.config import ConfigError, from_dict
from talkmesh.serving.inputs import (
    EMOTION_LABEL,
    MAX_SEED,
    MAX_TEMPERATURE,
    InputError,
    animate_options,
    check_supported,
    parse_style_spec,
    read_array,
    read_audio,
    reference_motion,
    template_array,
)
from talkmesh.serving.store import StyleNotFound, StyleStore

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import MotionMethod

__all__ = ["Ingress", "ServeConfig", "StyleModel", "build_app", "load_serve_config"]

log = logging.getLogger("talkmesh.serving")
SAMPLE_RATE = 16000
MAX_STYLES_PER_REPLICA = 32  # multiplexing LRU size (fixed when the class is defined)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The ``args`` of the Serve application (``serve/config.yaml``)."""

    method: str = "faceformer"
    # "" = models:/talkmesh-<method>@<alias> in the tracking store; else a models:/ or
    # runs:/ URI, or a local method/checkpoint directory (method.json + model.pt).
    model: str = ""
    alias: str = "champion"
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    style_dir: str = "./outputs/styles"  # the style store (shared storage on a cluster)
    faces: str = ""  # .npy (F, 3) mesh triangles for preview videos; "" = the face model's, else points
    # FLAME model file (generic_model.pkl or npz) for FLAME-parameter methods, so that they
    # return vertices too (never stored in the registry: licence). "" = parameters only.
    face_model: str = ""
    adapt_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # kwargs of method.adapt
    adapt_workers: int = 1  # concurrent adaptations per replica
    adapt_timeout_s: float = 900.0  # a pending adaptation older than this reads as failed
    wait_s: float = 15.0  # POST /v1/styles waits up to this long before answering 202
    max_upload_mb: float = 50.0
    max_audio_seconds: float = 120.0  # /v1/animate
    max_reference_seconds: float = 60.0  # /v1/styles
    min_reference_seconds: float = 1.0
    preview_size: int = 256
    torch_threads: int = 0  # intra-op threads per model replica; 0 = Ray's default (its CPUs)
    model_num_cpus: float = 1.0
    model_replicas: int = 1
    model_max_ongoing_requests: int = 4

    def __post_init__(self) -> None:
        for name in ("adapt_timeout_s", "wait_s", "max_upload_mb", "max_audio_seconds", "max_reference_seconds"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.adapt_workers < 1 or self.model_replicas < 1 or self.model_max_ongoing_requests < 1:
            raise ConfigError("adapt_workers, model_replicas and model_max_ongoing_requests must be >= 1")
        if self.min_reference_seconds > self.max_reference_seconds:
            raise ConfigError("min_reference_seconds must not exceed max_reference_seconds")
        if not 32 <= self.preview_size <= 2048:
            raise ConfigError(f"preview_size: 32..2048, got {self.preview_size}")


def load_serve_config(args: Mapping[str, Any] | None) -> ServeConfig:
    """Strict: unknown keys and wrong types raise :class:`ConfigError` naming the key."""
    return from_dict(ServeConfig, dict(args or {}))


# --------------------------------------------------------------------------------------
# The model deployment
# --------------------------------------------------------------------------------------


class _Problem(Exception):
    """An error the ingress turns into an HTTP status (crosses the handle as a dict)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message}}


def _scalars(state: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-friendly summary of a StyleState (its scalar fields)."""
    return {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str))}


@serve.deployment(max_ongoing_requests=4, health_check_period_s=10)
class StyleModel:
    """One replica: the registered model, a background adaptation pool, multiplexed styles."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        import torch

        self.cfg = load_serve_config(args)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.method, self.model_ref, self.version, self.model_key = _load_model(self.cfg)
        self.facts = self.method.facts
        self.store = StyleStore(self.cfg.style_dir)
        self.faces = _load_faces(self.cfg.faces, self.facts.num_vertices)
        if self.cfg.face_model:
            from talkmesh.data.corpus import load_face_model

            layer = load_face_model(self.cfg.face_model)
            self.method.set_face_model(layer)
            if self.faces is None:
                self.faces = np.asarray(layer.faces, dtype=np.int64)  # (F, 3)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.cfg.adapt_workers, thread_name_prefix="adapt")
        self.jobs: dict[str, concurrent.futures.Future] = {}
        log.info("talkmesh serving %s (%s), model key %s", self.cfg.method, self.model_ref, self.model_key)

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
            "limits": {
                "max_upload_mb": self.cfg.max_upload_mb,
                "max_audio_seconds": self.cfg.max_audio_seconds,
                "max_reference_seconds": self.cfg.max_reference_seconds,
                "min_reference_seconds": self.cfg.min_reference_seconds,
            },
        }

    # ---- adaptation ----------------------------------------------------------------------
    def start_adaptation(self, style_id: str, retry_failed: bool = False) -> dict[str, Any]:
        """Start adapting ``style_id`` unless it is ready or already running (idempotent).
        A failed adaptation is retried only when ``retry_failed`` (the client posted the
        clip again)."""
        try:
            st = self.store.status(style_id, self.model_key, stale_after_s=self.cfg.adapt_timeout_s)
        except StyleNotFound as e:
            return _Problem(404, str(e)).as_dict()
        job = self.jobs.get(style_id)
        if st["status"] == "ready" or (job is not None and not job.done()):
            return st
        if st["status"] == "pending":  # another replica is on it
            return st
        if st["status"] == "failed" and not retry_failed:
            return st
        self.store.set_status(style_id, self.model_key, "pending", started=time.time())
        self.jobs[style_id] = self.pool.submit(self._adapt, style_id)
        return self.store.status(style_id, self.model_key)

    def _adapt(self, style_id: str) -> None:
        t0 = time.time()
        try:
            ref = self.store.reference(style_id)
            record = {k: ref[k] for k in ("audio", "vertices", "params", "head_pose", "template") if k in ref}
            options = {**self.cfg.adapt_options, **self.store.meta(style_id).get("adapt_options", {})}
            state = self.method.adapt(record, **options)
            # The record first: the store reports ready only once the state is there too, so a
            # client never sees a ready style without its summary.
            self.store.set_status(
                style_id,
                self.model_key,
                "ready",
                started=t0,
                finished=time.time(),
                wall_s=time.time() - t0,
                summary=_scalars(state),
            )
            self.store.save_state(style_id, self.model_key, state)
        except Exception as e:  # noqa: BLE001 - recorded in the store, reported to the client
            log.warning("adaptation of %s failed: %s", style_id, traceback.format_exc())
            self.store.set_status(
                style_id, self.model_key, "failed", started=t0, finished=time.time(), error=f"{type(e).__name__}: {e}"
            )
        finally:
            self.jobs.pop(style_id, None)

    # ---- styles, multiplexed ----------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_STYLES_PER_REPLICA)
    async def get_style(self, spec: str) -> tuple[Any, np.ndarray | None]:
        """(style for ``generate``, the style's reference template or None) of a canonical spec."""
        return await asyncio.to_thread(self._resolve, spec)

    def _component(self, name: str) -> tuple[Any, np.ndarray | None]:
        if self.store.exists(name):
            st = self.store.status(name, self.model_key, stale_after_s=self.cfg.adapt_timeout_s)
            if st["status"] == "ready":
                state = self.store.load_state(name, self.model_key, self.method.name, self.method.style_version)
                ref = self.store.reference(name)
                return state, ref.get("template")
            if st["status"] in ("absent", "pending"):
                self.start_adaptation(name)  # e.g. a new champion: re-adapt from the stored reference
                raise _Problem(409, f"style {name} is being adapted for model {self.model_key}; retry shortly")
            raise _Problem(422, f"adaptation of style {name} failed: {st.get('error', 'unknown error')}")
        if name in self.facts.train_subjects:
            return name, None
        known = list(self.facts.train_subjects)
        raise _Problem(404, f"unknown style {name!r}: not a stored style id nor a training speaker {known}")

    def _resolve(self, spec: str) -> tuple[Any, np.ndarray | None]:
        parts = parse_style_spec(spec)
        if len(parts) == 1:
            return self._component(parts[0][0])
        if not self.method.supports_style_mixing:
            raise _Problem(422, f"{self.cfg.method} does not support style mixing; send one style_id")
        states, template = [], None
        for name, _ in parts:
            style, tmpl = self._component(name)
            if isinstance(style, str):
                style = self.method.encode_style(subject=style)
            states.append(style)
            template = tmpl if template is None else template
        return self.method.mix_styles(states, [w for _, w in parts]), template

    # ---- animation ------------------------------------------------------------------------
    async def animate(
        self,
        audio: np.ndarray,
        template: np.ndarray | None,
        preview: bool,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Motion for ``audio`` (S,) 16 kHz in the style of the request's multiplexed id;
        ``options`` are keyword options of ``generate`` (each listed in its ``generate_options``)."""
        options = dict(options or {})
        unlisted = sorted(set(options) - set(self.method.generate_options))
        if unlisted:
            return _Problem(422, f"{', '.join(unlisted)}: not an option of the {self.cfg.method} model").as_dict()
        spec = serve.get_multiplexed_model_id()
        try:
            style, ref_template = await self.get_style(spec) if spec else (None, None)
        except _Problem as e:
            return e.as_dict()
        except InputError as e:
            return _Problem(e.status, str(e)).as_dict()
        if template is None:
            template = ref_template
        try:
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
            raise _Problem(422, f"cannot animate: {e}") from None
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
                raise _Problem(422, "this model returns no vertices to render a preview from")
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

api = FastAPI(
    title="talkmesh",
    version="1",
    description="Few-shot speaking-style adaptation and speech-driven 3D facial animation.",
)

Format = Literal["npz", "npy", "json", "mp4"]
Source = Literal["audio", "expression"]


def _problem(e: InputError | _Problem) -> HTTPException:
    if isinstance(e, InputError):
        return HTTPException(e.status, detail=str(e))
    return HTTPException(e.status, detail=e.message)


async def _read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise InputError(413, field, f"upload is {upload.size / 2**20:.1f} MB; at most {max_bytes / 2**20:g} MB")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(413, field, f"upload exceeds {max_bytes / 2**20:g} MB")
    return data


# Defined above Ingress: the replica resolves the names the class uses from when it was decorated.
def _motion_response(result: Mapping[str, Any], format: Format) -> Response:
    """The body of ``POST /v1/animate`` in the requested ``format`` from the model's result
    (``outputs`` (T, ...) arrays, ``fps``, ``model_key``, optional ``preview_mp4``)."""
    outputs: dict[str, np.ndarray] = result["outputs"]
    frames = int(next(iter(outputs.values())).shape[0]) if outputs else 0
    headers = {
        "X-Talkmesh-Fps": f"{result['fps']:g}",
        "X-Talkmesh-Frames": str(frames),
        "X-Talkmesh-Model": result["model_key"],
        "X-Talkmesh-Generate-Seconds": f"{result['generate_s']:.4f}",
    }
    if format == "mp4":
        return Response(result["preview_mp4"], media_type="video/mp4", headers=headers)
    if format == "npy":
        if "vertices" not in outputs:
            raise HTTPException(422, detail="format: this model returns no vertices; use npz or json")
        buf = io.BytesIO()
        np.save(buf, outputs["vertices"])
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    if format == "json":
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
    """HTTP front: validation, the style store's reference side, responses."""

    def __init__(self, model: Any, args: Mapping[str, Any]) -> None:
        self.model = model  # DeploymentHandle of StyleModel
        self.cfg = load_serve_config(args)
        self.store = StyleStore(self.cfg.style_dir)
        self._info: dict[str, Any] | None = None
        self._info_t = 0.0

    async def info(self) -> dict[str, Any]:
        if self._info is None or time.monotonic() - self._info_t > 30:
            self._info = await self.model.info.remote()
            self._info_t = time.monotonic()
        return self._info

    def _check_length(self, request: Request) -> int:
        max_bytes = int(self.cfg.max_upload_mb * 2**20)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 2 * max_bytes + 2**20:
            mb = int(length) / 2**20
            raise InputError(413, "body", f"request is {mb:.1f} MB; at most {self.cfg.max_upload_mb:g} MB per file")
        return max_bytes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """The service and its model deployment answer."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(503, detail=f"model deployment unavailable: {type(e).__name__}: {e}") from None
        self._info, self._info_t = info, time.monotonic()
        return {"status": "ok", **{k: info[k] for k in ("method", "model", "model_version")}}

    @api.get("/v1/info")
    async def get_info(self) -> dict[str, Any]:
        """Method, model version, fps, vertex count, training speakers and request limits."""
        return await self.info()

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
        while adapting."""
        try:
            max_bytes = self._check_length(request)
            info = await self.info()
            if source is not None and "source" not in info["adapt_options"]:
                raise InputError(422, "source", f"the {info['method']} model's adaptation takes no source option")
            arrays, meta = await self._read_reference(audio, motion, template, max_bytes, info)
        except InputError as e:
            raise _problem(e) from None
        options = {"source": source} if source is not None else None
        sid, created = await asyncio.to_thread(
            self.store.put_reference, info["method"], arrays, {"name": name, **meta}, options
        )
        started = await self.model.start_adaptation.remote(sid, retry_failed=True)
        if "error" in started:
            raise HTTPException(started["error"]["status"], detail=started["error"]["message"])
        wait = self.cfg.wait_s if wait_s is None else wait_s
        st = await self._wait(sid, info["model_key"], wait)
        body = self._style_body(sid, st, info)
        if st["status"] == "failed":
            raise HTTPException(422, detail=f"adaptation failed for {sid}: {st.get('error', 'unknown error')}")
        if st["status"] == "ready":
            return JSONResponse(body, status_code=201 if created else 200)
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/styles/{sid}", "Retry-After": "1"})

    async def _read_reference(
        self,
        audio: UploadFile,
        motion: UploadFile,
        template: UploadFile | None,
        max_bytes: int,
        info: Mapping[str, Any],
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The checked arrays of a reference clip (audio, motion record, optional template)
        and its metadata; raises :class:`InputError` naming the bad field."""
        audio_arr = read_audio(
            await _read_upload(audio, "audio", max_bytes),
            "audio",
            self.cfg.max_reference_seconds,
            min_seconds=self.cfg.min_reference_seconds,
        )
        motion_arr = read_array(await _read_upload(motion, "motion", max_bytes), "motion")
        record = reference_motion(
            motion_arr,
            info,
            fps=info["fps"],
            min_seconds=self.cfg.min_reference_seconds,
            max_seconds=self.cfg.max_reference_seconds,
        )
        frames = next(iter(record.values())).shape[0]
        a_s, m_s = audio_arr.shape[0] / SAMPLE_RATE, frames / info["fps"]
        if abs(a_s - m_s) > max(0.5, 0.1 * m_s):
            msg = f"{m_s:.2f} s of motion but {a_s:.2f} s of audio; send one synchronised clip"
            raise InputError(422, "motion", msg)
        if template is not None:
            record["template"] = template_array(
                read_array(await _read_upload(template, "template", max_bytes), "template"), info
            )
        meta = {"seconds": round(a_s, 3), "frames": int(frames), "fps": info["fps"]}
        return {"audio": audio_arr, **record}, meta

    async def _wait(self, sid: str, key: str, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            st = await asyncio.to_thread(self.store.status, sid, key, self.cfg.adapt_timeout_s)
            if st["status"] in ("ready", "failed") or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    def _style_body(self, sid: str, st: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
        meta = self.store.meta(sid)
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
        for k in ("error", "wall_s", "summary"):
            if k in st:
                body[k] = st[k]
        return body

    @api.get("/v1/styles")
    async def list_styles(self) -> dict[str, Any]:
        """Every stored style with its status for the served model."""
        info = await self.info()
        styles = []
        for meta in await asyncio.to_thread(self.store.list):
            if meta.get("method") != info["method"]:
                continue
            st = self.store.status(meta["style_id"], info["model_key"], self.cfg.adapt_timeout_s)
            styles.append(self._style_body(meta["style_id"], st, info))
        return {"styles": styles, "train_subjects": info["train_subjects"]}

    @api.get("/v1/styles/{style_id}")
    async def get_style(self, style_id: str) -> dict[str, Any]:
        """A style's status for the served model: pending, ready or failed ("absent": not
        adapted for this model version yet; it is on first use)."""
        info = await self.info()
        try:
            st = await asyncio.to_thread(self.store.status, style_id, info["model_key"], self.cfg.adapt_timeout_s)
            return self._style_body(style_id, st, info)
        except StyleNotFound as e:
            raise HTTPException(404, detail=str(e)) from None

    @api.delete("/v1/styles/{style_id}", status_code=204)
    async def delete_style(self, style_id: str) -> Response:
        """Remove a style (its reference and every adapted state)."""
        try:
            await asyncio.to_thread(self.store.delete, style_id)
        except StyleNotFound as e:
            raise HTTPException(404, detail=str(e)) from None
        return Response(status_code=204)

    # ---- animation ---------------------------------------------------------------------
    async def _animate_options(
        self,
        fields: dict[str, Any],
        emotion_audio: UploadFile | None,
        max_bytes: int,
        info: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The ``generate`` options of a request's option fields (``None`` = not sent); the
        ``emotion_audio`` upload is bounded like ``audio``. Raises :class:`InputError`."""
        accepted = tuple(info["generate_options"])
        fields = {**fields, "emotion_audio": None}
        if emotion_audio is not None:
            sent = [k for k, v in fields.items() if v is not None]
            check_supported([*sent, "emotion_audio"], accepted, info["method"])  # before reading the upload
            data = await _read_upload(emotion_audio, "emotion_audio", max_bytes)
            fields["emotion_audio"] = read_audio(data, "emotion_audio", self.cfg.max_audio_seconds)
        return animate_options(fields, accepted, info["method"])

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
        fields = dict(emotion=emotion, intensity=intensity, sample=sample, temperature=temperature, seed=seed)
        try:
            max_bytes = self._check_length(request)
            info = await self.info()
            options = await self._animate_options(fields, emotion_audio, max_bytes, info)
            audio_arr = read_audio(await _read_upload(audio, "audio", max_bytes), "audio", self.cfg.max_audio_seconds)
            tmpl = None
            if template is not None:
                tmpl = template_array(read_array(await _read_upload(template, "template", max_bytes), "template"), info)
            spec = ",".join(f"{n}:{w:.6g}" for n, w in parse_style_spec(style_id)) if style_id.strip() else ""
            if spec and "," not in spec:
                spec = spec.split(":")[0]
        except InputError as e:
            raise _problem(e) from None
        handle = self.model.options(multiplexed_model_id=spec) if spec else self.model
        result = await handle.animate.remote(audio_arr, tmpl, bool(preview or format == "mp4"), options)
        if "error" in result:
            raise HTTPException(result["error"]["status"], detail=result["error"]["message"])
        return _motion_response(result, format)


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Serve application (``import_path: talkmesh.serving.app:build_app``; ``args`` =
    :class:`ServeConfig` fields)."""
    cfg = load_serve_config(args)
    plain = dataclasses.asdict(cfg)
    model = StyleModel.options(
        num_replicas=cfg.model_replicas,
        max_ongoing_requests=cfg.model_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.model_num_cpus},
    ).bind(plain)
    return Ingress.bind(model, plain)
