"""The HTTP ingress of the style service (FastAPI on Ray Serve): the routes of
:mod:`talkmesh.serving.app`.

It authenticates the caller (:mod:`talkmesh.serving.tenants`), bounds and decodes uploads off
the event loop (:mod:`talkmesh.serving.inputs`, :mod:`talkmesh.serving.limits`), keeps the
reference side of the style store and the adaptation queue, and calls the model deployment
(:mod:`talkmesh.serving.model`) through its handle.
"""

# No `from __future__ import annotations`: FastAPI and Serve resolve signatures at run time.
import asyncio
import base64
import io
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, Security, UploadFile, WebSocket
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel
from ray import serve
from starlette.types import ASGIApp

from talkmesh.serving.adapt_worker import adaptation_status, submit_adaptation
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
    canonical_style_spec,
    check_supported,
    read_array,
    read_audio,
    reference_motion,
    template_array,
)
from talkmesh.serving.jobs import QueueFull
from talkmesh.serving.limits import BlockingRunner, BodyLimitMiddleware
from talkmesh.serving.observe import ObserveMiddleware, current_request_id, install_request_logging
from talkmesh.serving.page import mount_page
from talkmesh.serving.schemas import ANIMATE_RESPONSES, Health, Info, LeaderboardPage, ModelCard, Style, StylePage
from talkmesh.serving.settings import (
    SAMPLE_RATE,
    MiB,
    input_limits,
    job_queue,
    load_serve_config,
    queue_error,
    raise_problem,
    resolve_locations,
)
from talkmesh.serving.store import StyleNotFound, StyleStore
from talkmesh.serving.streaming import StreamSessions
from talkmesh.serving.tenants import KeyStore, Principal, tenant_dependency

if TYPE_CHECKING:  # pragma: no cover
    pass


__all__ = ["KEYED", "Ingress", "api"]

log = logging.getLogger("talkmesh.serving")

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
mount_page(api)
api.add_middleware(ReplicaBodyLimit)
api.add_middleware(ObserveMiddleware)  # added last = outermost: request ids and metrics of every answer, 413s included

# OpenAPI security schemes of the /v1 routes (the check itself is the tenant dependency,
# talkmesh.serving.tenants: these only read the headers, so that /docs shows them).
KEYED = [
    Security(HTTPBearer(auto_error=False, description="an API key from `talkmesh keys create`")),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in this header instead")),
]

Format = Literal["npz", "npy", "json", "mp4", "glb"]
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
        "X-Talkmesh-Batch-Size": str(result.get("batch", 1)),
    }
    if format == "mp4":
        return Response(result["preview_mp4"], media_type="video/mp4", headers=headers)
    if format == "glb":
        return Response(result["glb"], media_type="model/gltf-binary", headers=headers)
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


def _json(body: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A validated response model as JSON (the fields that were set)."""
    return JSONResponse(body.model_dump(mode="json", exclude_unset=True), status_code=status_code, headers=headers)


async def _awaited(response: Any) -> Any:
    """``await response`` as a coroutine (for ``asyncio.wait_for``)."""
    return await response


@serve.deployment(
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
    # Two malloc arenas: glibc gives each decoding thread an arena that keeps its peak (a
    # decoded upload) for good; unbounded, a few large uploads grow the ingress by ~0.5 GB.
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}},
)
@serve.ingress(api)
class Ingress:
    """HTTP front: who is calling, bounded decoding, the style store's reference side, responses."""

    def __init__(self, model: Any, args: Mapping[str, Any]) -> None:
        install_request_logging()
        self.model = model  # DeploymentHandle of StyleModel
        self.cfg = resolve_locations(load_serve_config(args))
        self.limits = input_limits(self.cfg)
        _set_body_limit(self.limits.max_body_bytes)
        self.store = StyleStore(self.cfg.style_dir)
        self.queue = job_queue(self.cfg)
        self.keys = KeyStore(self.cfg.service_db)
        self._auth = tenant_dependency(self.keys, self.cfg.dev_mode)
        self.decoder = BlockingRunner(self.cfg.decode_workers, self.cfg.decode_queue)
        self.streams = StreamSessions(self.cfg)
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
        """The model deployment's answer within ``model_timeout_s`` (else the call is cancelled);
        its absence is a 503 with ``Retry-After`` (not a 500)."""
        try:
            return await asyncio.wait_for(_awaited(response), timeout=self.cfg.model_timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            response.cancel()
            log.warning("model deployment call timed out after %g s", self.cfg.model_timeout_s)
            msg = f"the model deployment did not answer within {self.cfg.model_timeout_s:g} s; retry shortly"
            raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "5"}) from None
        except Exception as e:  # noqa: BLE001 - the replica died, restarts, or is overloaded
            log.warning("model deployment call failed: %s: %s", type(e).__name__, e)
            msg = f"the model deployment is unavailable ({type(e).__name__}); retry shortly"
            raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "2"}) from None

    async def _principal(self, request: Request) -> Principal:
        """Who is calling (401 in the error schema when no valid key is sent)."""
        return await asyncio.to_thread(self._auth, request, Response())

    @staticmethod
    def _headers(principal: Principal) -> dict[str, str]:
        return dict(DEV_HEADERS) if principal.dev else {}

    async def check_health(self) -> None:
        """Serve's health check of this replica: the service database (keys, jobs) answers."""
        await asyncio.wait_for(asyncio.to_thread(self.keys.ping), timeout=20)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        """The service and its model deployment answer (no key needed)."""
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            msg = f"model deployment unavailable: {type(e).__name__}: {e}"
            raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "5"}) from None
        self._info, self._info_t = info, time.monotonic()
        return {"status": "ok", **{k: info[k] for k in ("method", "model", "model_version")}}

    @api.get("/v1/info", response_model=Info, dependencies=KEYED)
    async def get_info(self, request: Request) -> JSONResponse:
        """Method, model version, fps, vertex count, training speakers (their templates and the
        default style: what audio alone animates with) and the request limits."""
        principal = await self._principal(request)
        body = Info(**await self.info(), tenant=principal.tenant, dev_mode=self.cfg.dev_mode)
        return _json(body, headers=self._headers(principal))

    @api.get("/v1/model-card", response_model=ModelCard, dependencies=KEYED)
    async def model_card(self, request: Request) -> JSONResponse:
        """The served version's model card (its registry description); 404 for a model served
        from a directory, which has none."""
        principal = await self._principal(request)
        card = await self._call(self.model.card.remote())
        if card["card"] is None:
            raise ServiceError(404, "not_found", f"{card['model']} is not a registered version: it has no model card")
        return _json(ModelCard(**card), headers=self._headers(principal))

    @api.get("/v1/leaderboard", response_model=LeaderboardPage, dependencies=KEYED)
    async def leaderboard(self, request: Request) -> JSONResponse:
        """The newest leaderboard logged to the tracking store (`talkmesh leaderboard`)."""
        from talkmesh.ops.leaderboard import latest_leaderboard

        principal = await self._principal(request)
        board = await asyncio.to_thread(latest_leaderboard, self.cfg.tracking_uri or None)
        if board is None:
            raise ServiceError(404, "not_found", "no leaderboard in the tracking store: run `talkmesh leaderboard`")
        return _json(LeaderboardPage(**board), headers=self._headers(principal))

    # ---- styles ------------------------------------------------------------------------
    @api.post("/v1/styles", status_code=201, response_model=Style, dependencies=KEYED)
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
        try:
            sid, created = await asyncio.to_thread(
                self.store.put_reference, info["method"], arrays, {"name": name, **meta}, options, tenant
            )
        except StyleNotFound:  # a DELETE of the same clip kept removing it while it was written
            raise ServiceError(409, "conflict", "the style was deleted while being stored; post it again") from None
        await self._submit(sid, info["model_key"], tenant)
        st = await self._wait(sid, info["model_key"], tenant, self.cfg.wait_s if wait_s is None else wait_s)
        body = await asyncio.to_thread(self._style_body, sid, st, info, tenant)
        headers = self._headers(principal)
        if st["status"] == "failed":
            msg = f"adaptation failed for {sid}: {st.get('error', 'unknown error')}"
            raise ServiceError(422, "adaptation_failed", msg, "motion", headers)
        if st["status"] == "ready":
            return _json(Style(**body), status_code=201 if created else 200, headers=headers)
        headers.update({"Location": f"/v1/styles/{sid}", "Retry-After": "1"})
        return _json(Style(**body), status_code=202, headers=headers)

    async def _submit(self, sid: str, model_key: str, tenant: str) -> None:
        """Queue the style's adaptation (a failed one again: the client posted the clip again)."""
        try:
            await asyncio.to_thread(
                submit_adaptation, self.store, self.queue, sid, model_key, tenant, self.cfg.adapt_options
            )
        except QueueFull as e:
            raise queue_error(e) from None
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

    @api.get("/v1/styles", response_model=StylePage, dependencies=KEYED)
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
        return _json(StylePage(**body), headers=self._headers(principal))

    def _page(self, tenant: str, limit: int, cursor: str | None, info: Mapping[str, Any]) -> dict[str, Any]:
        try:
            page = self.store.list_page(tenant, limit, cursor, method=info["method"])
        except ValueError as e:
            raise ServiceError(422, "invalid_input", str(e).removeprefix("cursor: "), "cursor") from None
        styles = []
        for meta in page.items:
            try:
                st = adaptation_status(self.store, self.queue, meta["style_id"], info["model_key"], tenant)
                styles.append(self._style_body(meta["style_id"], st, info, tenant))
            except (StyleNotFound, ServiceError):  # deleted while listing
                continue
        return {"styles": styles, "next_cursor": page.next_cursor, "train_subjects": info["train_subjects"]}

    @api.get("/v1/styles/{style_id}", response_model=Style, dependencies=KEYED)
    async def get_style(self, request: Request, style_id: str) -> JSONResponse:
        """A style's status for the served model: pending (with ``queue_s``, ``run_s``,
        ``attempts``), ready, failed (with the error) or absent (not adapted for this model
        version yet; it is on first use). Another tenant's style is a 404."""
        principal = await self._principal(request)
        info = await self.info()
        st = await self._status(style_id, info["model_key"], principal.tenant)
        body = await asyncio.to_thread(self._style_body, style_id, st, info, principal.tenant)
        return _json(Style(**body), headers=self._headers(principal))

    @api.delete("/v1/styles/{style_id}", status_code=204, dependencies=KEYED)
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
    @api.post("/v1/animate", response_class=Response, responses=ANIMATE_RESPONSES, dependencies=KEYED)
    async def animate(
        self,
        request: Request,
        audio: Annotated[UploadFile, File(description="speech: WAV/FLAC/OGG, any sample rate")],
        style_id: Annotated[str, Form(description="style id, training speaker or mix 'id:0.7,id2:0.3'")] = "",
        template: Annotated[
            UploadFile | None, File(description=".npy (V, 3) neutral face; default: the style's")
        ] = None,
        format: Annotated[Format, Form(description="npz (all outputs + fps), npy (vertices), json, mp4, glb")] = "npz",
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
        spec = canonical_style_spec(style_id)
        handle = self.model.options(multiplexed_model_id=f"{principal.tenant}/{spec}") if spec else self.model
        preview = bool(preview or format == "mp4")
        call = handle.animate.remote(audio_arr, tmpl_arr, preview, options, current_request_id(), format == "glb")
        result = await self._call(call)
        if "error" in result:
            raise_problem(result)
        return await self.decoder.run(_motion_response, result, format, self._headers(principal))

    # ---- streaming ---------------------------------------------------------------------
    @api.websocket("/v1/stream")
    async def stream(self, websocket: WebSocket) -> None:
        """Motion frames while speech arrives (WebSocket; the protocol is in
        :mod:`talkmesh.serving.streaming`)."""
        await self.streams.serve(websocket, self)
