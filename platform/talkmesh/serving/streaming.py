"""``/v1/stream``: motion frames while the client is still sending speech (WebSocket).

The protocol (``talkmesh.serving.client.StyleClient.stream`` speaks it):

1. Connect with the API key in ``Authorization: Bearer <key>`` or ``X-API-Key`` (development
   mode: keyless from loopback). Send one JSON text message::

       {"type": "start", "style_id": "sty_... | a training speaker | a:0.7,b:0.3",
        "encoding": "f32le" | "s16le", "template": "<base64 of a .npy (V, 3)>",
        "left_s": 2.0, "right_s": 0.5, "emotion": ..., "intensity": ..., "sample": ...,
        "temperature": ..., "seed": ...}

   Every field is optional; the options are those of ``POST /v1/animate`` (the method must
   list them in ``generate_options``), ``left_s`` / ``right_s`` override the method's stream
   context (:mod:`talkmesh.methods.streaming`).
2. The service answers ``{"type": "ready", "stream_id", "fps", "lookahead_s", "model",
   "encoding", "max_chunk_seconds", "max_stream_seconds", "idle_s"}``.
3. The client sends binary messages of mono 16 kHz PCM (little-endian float32 or int16), of
   at most ``max_chunk_seconds`` each. After each, the service sends the frames that became
   final as binary messages (:mod:`talkmesh.serving.wire`), none while a frame still waits
   for its look-ahead.
4. ``{"type": "end"}`` (text): the service sends the remaining frames, then ``{"type": "end",
   "frames": T, "seconds": S}``, and closes (1000). In all, T = the frames ``/v1/animate``
   returns for the same audio.

A problem is one text message ``{"type": "error", "status": <HTTP-like status>, "error":
{"code", "message", "field"}}`` followed by a close: 1008 (bad key, unknown style, bad field,
idle for ``stream_idle_s``), 1003 (a malformed audio message), 1009 (a chunk or the stream
too long), 1013 (every stream slot of this replica busy, or the model unavailable: retry).

A session runs in the ingress replica that accepted the connection (Serve keeps a WebSocket
on one replica), on the replica's own copy of the served model, loaded at its first stream;
the style is resolved by the model deployment exactly as for ``/v1/animate``. A replica holds
at most ``max_streams`` sessions. A client that disconnects, stops sending or stops reading
for ``stream_idle_s`` ends its session, and the session's state (the audio window and the
decoder's cache) is released with it.
"""

# No `from __future__ import annotations`: FastAPI resolves signatures at run time.
import asyncio
import base64
import binascii
import json
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import WebSocket
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from talkmesh.serving.errors import ServiceError, validation_summary
from talkmesh.serving.inputs import (
    EMOTION_LABEL,
    MAX_SEED,
    MAX_TEMPERATURE,
    TEMPLATE_RANKS,
    InputError,
    animate_options,
    canonical_style_spec,
    read_array,
    template_array,
)
from talkmesh.serving.observe import service_metrics
from talkmesh.serving.settings import SAMPLE_RATE, ServeConfig, raise_problem
from talkmesh.serving.wire import pack_frames

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.methods.base import MotionMethod

__all__ = ["CLOSE_CODES", "StreamSessions", "StreamStart"]

log = logging.getLogger("talkmesh.serving")

WIDTHS = {"f32le": 4, "s16le": 2}
# WebSocket close codes by the HTTP-like status of the error sent before closing.
CLOSE_CODES = {400: 1003, 413: 1009, 429: 1013, 503: 1013}
POLICY = 1008


class StreamStart(BaseModel):
    """The first message of a ``/v1/stream`` session (JSON text)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"] = "start"
    style_id: str = Field("", max_length=4000, description="style id, training speaker or mix 'id:0.7,id2:0.3'")
    encoding: Literal["f32le", "s16le"] = Field("f32le", description="of the binary audio messages (mono 16 kHz)")
    template: str | None = Field(None, max_length=16 * 2**20, description="base64 of a .npy (V, 3) neutral face")
    left_s: float | None = Field(None, ge=0, le=30, allow_inf_nan=False, description="encoder context before")
    right_s: float | None = Field(None, ge=0, le=10, allow_inf_nan=False, description="look-ahead after a frame")
    emotion: str | None = Field(None, pattern=rf"^{EMOTION_LABEL.pattern}$")
    intensity: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class _Closed(Exception):
    """The session ended (``outcome``); nothing more is sent."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class StreamSessions:
    """The ``/v1/stream`` sessions of one ingress replica and the model copy they share."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.active = 0
        self.replica = f"{os.getpid()}"
        self._engine: MotionMethod | None = None
        self._engine_key = ""
        self._engine_lock = asyncio.Lock()
        self._compute_lock = threading.Lock()  # the model copy is used by one session at a time

    # ---- the model copy ---------------------------------------------------------------------
    async def engine(self, model_key: str) -> "MotionMethod":
        """The served model (loaded on first use, again when the model deployment serves another
        version than the one loaded)."""
        async with self._engine_lock:
            if self._engine is None or self._engine_key != model_key:
                self._engine, self._engine_key = await asyncio.to_thread(self._load)
            if self._engine_key != model_key:
                msg = "the served model is changing version; reconnect shortly"
                raise ServiceError(503, "unavailable", msg, headers={"Retry-After": "5"})
            return self._engine

    def _load(self) -> tuple["MotionMethod", str]:
        import torch

        from talkmesh.serving.model import load_served_model

        torch.set_num_threads(self.cfg.stream_threads)
        method, _, _, key = load_served_model(self.cfg)
        if self.cfg.face_model:
            from talkmesh.data.corpus import load_face_model

            method.set_face_model(load_face_model(self.cfg.face_model))
        method.eval()
        log.info("stream model %s loaded in the ingress", key)
        return method, key

    # ---- one session ------------------------------------------------------------------------
    async def serve(self, ws: WebSocket, ingress: Any) -> None:
        """Run one session on an accepted-to-be WebSocket; ``ingress`` is the replica's
        :class:`~talkmesh.serving.ingress.Ingress` (its key check, model handle and info)."""
        await ws.accept()
        metrics = service_metrics()
        outcome = "error"
        counted = False
        try:
            principal = await asyncio.to_thread(ingress._auth, ws, Response())
            if self.active >= self.cfg.max_streams:
                msg = f"this replica holds its {self.cfg.max_streams} streams; retry shortly"
                raise ServiceError(503, "too_many_streams", msg, headers={"Retry-After": "2"})
            self.active += 1
            counted = True
            metrics.set_streams_active(self.replica, self.active)
            outcome = await self._session(ws, ingress, principal.tenant)
        except _Closed as e:
            outcome = e.outcome
        except ServiceError as e:
            outcome = e.code
            await self._fail(ws, e)
        except Exception:  # noqa: BLE001 - a session never takes the replica down
            log.exception("stream session failed")
            await self._fail(ws, ServiceError(503, "unavailable", "the stream failed; retry"))
        finally:
            if counted:
                self.active -= 1
                metrics.set_streams_active(self.replica, self.active)
            metrics.record_stream(outcome)

    async def _fail(self, ws: WebSocket, e: ServiceError) -> None:
        body = {"type": "error", "status": e.status, "error": {"code": e.code, "message": e.message, "field": e.field}}
        if "Retry-After" in e.headers:
            body["retry_after"] = e.headers["Retry-After"]
        try:
            await asyncio.wait_for(ws.send_text(json.dumps(body)), timeout=5)
            await asyncio.wait_for(ws.close(CLOSE_CODES.get(e.status, POLICY), e.code[:120]), timeout=5)
        except Exception:  # noqa: BLE001 - the client is gone already
            pass

    async def _receive(self, ws: WebSocket) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=self.cfg.stream_idle_s)
        except asyncio.TimeoutError:
            msg = f"nothing received for {self.cfg.stream_idle_s:g} s; the stream is closed"
            raise ServiceError(408, "idle_timeout", msg) from None
        if msg["type"] == "websocket.disconnect":
            raise _Closed("disconnected")
        return msg

    async def _send(self, ws: WebSocket, data: bytes | str) -> None:
        """Send within ``stream_idle_s``: a client that stops reading ends its session."""
        send = ws.send_bytes(data) if isinstance(data, bytes) else ws.send_text(data)
        try:
            await asyncio.wait_for(send, timeout=self.cfg.stream_idle_s)
        except asyncio.TimeoutError:
            raise _Closed("stalled") from None
        except Exception:  # noqa: BLE001 - the connection closed under us
            raise _Closed("disconnected") from None

    async def _start(self, ws: WebSocket) -> StreamStart:
        msg = await self._receive(ws)
        text = msg.get("text")
        if text is None:
            raise InputError(400, "start", "the first message must be the JSON start message (text)")
        try:
            return StreamStart.model_validate_json(text)
        except ValidationError as e:
            field, message = validation_summary(e.errors())
            raise ServiceError(422, "invalid_input", message, field) from None

    async def _session(self, ws: WebSocket, ingress: Any, tenant: str) -> str:
        start = await self._start(ws)
        info = await ingress.info()
        fields = {k: getattr(start, k) for k in ("emotion", "intensity", "sample", "temperature", "seed")}
        options = animate_options(fields, tuple(info["generate_options"]), info["method"])
        template = None
        if start.template is not None:
            template = await ingress.decoder.run(_template, start.template, info, ingress.limits)
        spec = canonical_style_spec(start.style_id)
        handle = ingress.model.options(multiplexed_model_id=f"{tenant}/{spec}") if spec else ingress.model
        resolved = await ingress._call(handle.stream_style.remote())
        if "error" in resolved:
            raise_problem(resolved)
        engine = await self.engine(resolved["model_key"])
        tmpl = template if template is not None else resolved["template"]
        try:
            stream = engine.open_stream(tmpl, resolved["style"], left_s=start.left_s, right_s=start.right_s, **options)
        except (ValueError, TypeError) as e:
            raise ServiceError(422, "cannot_animate", f"cannot animate: {e}") from None
        sid = f"str_{uuid.uuid4().hex[:16]}"
        ready = {
            "type": "ready", "stream_id": sid, "fps": float(engine.facts.fps), "lookahead_s": stream.lookahead_s,
            "model": resolved["model_key"], "encoding": start.encoding, "max_chunk_seconds": self.cfg.max_chunk_seconds,
            "max_stream_seconds": self.cfg.max_stream_seconds, "idle_s": self.cfg.stream_idle_s,
        }  # fmt: skip
        await self._send(ws, json.dumps(ready))
        log.info("stream %s opened (style %r, model %s)", sid, spec, resolved["model_key"])
        return await self._pump(ws, stream, start.encoding)

    async def _pump(self, ws: WebSocket, stream: Any, encoding: str) -> str:
        """Audio in, frames out. A reader task takes the client's messages as they come (so a
        client is never blocked by the model); each push takes every chunk that arrived while
        the previous one ran, so a stream that falls behind catches up instead of queueing."""
        inbox: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()
        reader = asyncio.create_task(self._read(ws, encoding, inbox))
        metrics = service_metrics()
        try:
            while True:
                items = [await inbox.get()]
                while not inbox.empty() and items[-1][0] == "audio":
                    items.append(inbox.get_nowait())
                audio = [item for item in items if item[0] == "audio"]
                if audio:
                    first = stream.emitted
                    out = await asyncio.to_thread(self._compute, stream.push, np.concatenate([a[1] for a in audio]))
                    if out:
                        await self._send(ws, pack_frames(first, out))
                    done = time.perf_counter()
                    for _, _, arrived in audio:
                        metrics.record_stream_chunk(done - arrived)
                kind, value, _ = items[-1]
                if kind == "error":
                    raise value
                if kind == "end":
                    return await self._end(ws, stream)
        finally:
            reader.cancel()

    async def _read(self, ws: WebSocket, encoding: str, inbox: "asyncio.Queue[tuple[str, Any, float]]") -> None:
        """Check each message and queue it: ("audio", (S,) float32, arrival), ("end", None, t)
        or, at the first problem, ("error", exception, t) and stop."""
        width = WIDTHS[encoding]
        max_chunk = int(self.cfg.max_chunk_seconds * SAMPLE_RATE) * width
        max_samples = int(self.cfg.max_stream_seconds * SAMPLE_RATE)
        samples = 0
        try:
            while True:
                msg = await self._receive(ws)
                arrived = time.perf_counter()
                if msg.get("bytes") is None:
                    try:
                        end = json.loads(msg.get("text") or "null")
                    except json.JSONDecodeError:
                        end = None
                    if not (isinstance(end, dict) and end.get("type") == "end"):
                        raise InputError(400, "message", 'expected binary audio or {"type": "end"}')
                    if samples == 0:
                        raise InputError(422, "audio", "the stream ended before any audio")
                    inbox.put_nowait(("end", None, arrived))
                    return
                data = msg["bytes"]
                if len(data) > max_chunk:
                    raise InputError(413, "audio", f"a chunk holds at most {self.cfg.max_chunk_seconds:g} s of audio")
                if len(data) % width:
                    raise InputError(400, "audio", f"{encoding} audio: the chunk's length is not a multiple of {width}")
                samples += len(data) // width
                if samples > max_samples:
                    raise InputError(413, "audio", f"a stream holds at most {self.cfg.max_stream_seconds:g} s of audio")
                audio = _pcm(data, encoding)
                if not np.isfinite(audio).all():
                    raise InputError(422, "audio", "the chunk holds non-finite samples")
                inbox.put_nowait(("audio", audio, arrived))
        except Exception as e:  # noqa: BLE001 - any problem ends the session through the pump
            inbox.put_nowait(("error", e, time.perf_counter()))

    async def _end(self, ws: WebSocket, stream: Any) -> str:
        first = stream.emitted
        try:
            out = await asyncio.to_thread(self._compute, stream.finish)
        except ValueError as e:
            raise ServiceError(422, "cannot_animate", f"cannot animate: {e}", "audio") from None
        if out:
            await self._send(ws, pack_frames(first, out))
        body = {"type": "end", "frames": stream.emitted, "seconds": stream.samples / SAMPLE_RATE}
        await self._send(ws, json.dumps(body))
        await ws.close(1000)
        return "ended"

    def _compute(self, step: Any, *args: Any) -> dict[str, np.ndarray]:
        """One push/finish on the replica's model copy (sessions take turns), as numpy."""
        from talkmesh.methods.base import mixed_precision

        with self._compute_lock, mixed_precision(self._engine.device, self.cfg.precision):
            out = step(*args)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def _pcm(data: bytes, encoding: str) -> np.ndarray:
    if encoding == "s16le":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    return np.frombuffer(data, "<f4").astype(np.float32)


def _template(text: str, info: dict[str, Any], limits: Any) -> np.ndarray:
    """The start message's template: base64 of a .npy (V, 3). Blocking (decoding)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(422, "template", "expected base64 of a .npy (V, 3) array") from None
    return template_array(read_array(raw, "template", limits=limits, ranks=TEMPLATE_RANKS), info)
