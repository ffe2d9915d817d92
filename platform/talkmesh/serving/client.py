"""A small HTTP client of the style service (``requests`` only; no Ray).

client = StyleClient("http://127.0.0.1:8000", api_key="tmk_...")   # api_key default: $TALKMESH_API_KEY
style = client.create_style("ref.wav", "ref_vertices.npy", template="template.npy")  # waits until ready
motion = client.animate("speech.wav", style["style_id"])            # {"vertices": (T, V, 3), "fps": ...}
client.animate("speech.wav", style["style_id"], fmt="mp4", out="preview.mp4")
# DEEPTalk: an emotion label, another clip's emotion, seeded sampling; a style's emotion from its motion
client.animate("speech.wav", emotion="happy", intensity=0.5, sample=True, temperature=0.2, seed=3)
client.animate("speech.wav", style["style_id"], emotion_audio="angry.wav")
client.create_style("ref.wav", "ref_flame.npy", source="expression")
# streaming (/v1/stream): frames while the speech is still being sent
with client.stream(style["style_id"]) as stream:
    for chunk in chunks:                                             # (S,) float 16 kHz mono each
        stream.send(chunk)
        for start, frames in stream.receive():                       # frames that are final by now
            show(start, frames["vertices"])
    rest = stream.finish()                                           # every frame: {"vertices": (T, V, 3)}
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ServiceError", "StreamSession", "StyleClient"]

PathOrBytes = str | Path | bytes


API_KEY_ENV = "TALKMESH_API_KEY"
RETRY_STATUSES = (409, 429, 503)  # a style being adapted, a full queue, a busy or restarting service


class ServiceError(RuntimeError):
    """The service answered with an error status: ``status``, and from the error body
    ``code``, ``detail`` (the message) and ``field`` (the form field at fault, or None)."""

    def __init__(self, status: int, detail: Any, code: str = "", field: str | None = None) -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"HTTP {status}{f' {code}' if code else ''}{where}: {detail}")
        self.status = status
        self.detail = detail
        self.code = code
        self.field = field


def _retry_after(r: Any, default: float = 1.0) -> float:
    """The response's ``Retry-After`` in seconds (bounded to 1..60), else ``default``."""
    try:
        return min(60.0, max(1.0, float(r.headers.get("Retry-After", default))))
    except (TypeError, ValueError):
        return default


def _payload(x: PathOrBytes | np.ndarray, name: str) -> tuple[str, bytes]:
    if isinstance(x, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, x)
        return f"{name}.npy", buf.getvalue()
    if isinstance(x, bytes):
        return name, x
    p = Path(x)
    return p.name, p.read_bytes()


class StyleClient:
    """Client of ``talkmesh.serving.app`` (see its module docstring for the routes)."""

    def __init__(self, url: str, timeout: float = 300.0, api_key: str | None = None) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        if key:  # none: development mode (a loopback service that admits keyless requests)
            self.session.headers["Authorization"] = f"Bearer {key}"

    def _check(self, r: Any) -> Any:
        if r.status_code >= 400:
            try:
                err = r.json().get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            raise ServiceError(r.status_code, err.get("message") or r.text, err.get("code", ""), err.get("field"))
        return r

    def health(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/healthz", timeout=self.timeout)).json()

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``/healthz`` until the service answers 200 (a deployment is starting)."""
        import requests

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.health()
            except (requests.RequestException, ServiceError) as e:
                last = e
                time.sleep(1.0)
        raise TimeoutError(f"{self.url}/healthz did not answer within {timeout:g} s: {last}")

    def info(self) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/v1/info", timeout=self.timeout)).json()

    def create_style(
        self,
        audio: PathOrBytes,
        motion: PathOrBytes | np.ndarray,
        template: PathOrBytes | np.ndarray | None = None,
        name: str = "",
        wait: bool = True,
        poll_s: float = 1.0,
        source: str | None = None,
    ) -> dict[str, Any]:
        """POST a reference clip; with ``wait``, poll until the style is ready (or raise).
        ``source`` ("audio" | "expression", methods whose adapt takes it: DEEPTalk) picks
        what the style's emotion is taken from."""
        files = {"audio": _payload(audio, "audio"), "motion": _payload(motion, "motion")}
        if template is not None:
            files["template"] = _payload(template, "template")
        data = {"name": name, **({"source": source} if source is not None else {})}
        r = self._post("/v1/styles", files, data, retry_s=60.0)
        body = self._check(r).json()
        while wait and body["status"] == "pending":
            time.sleep(poll_s)
            body = self.style(body["style_id"])
        if body["status"] == "failed":
            raise ServiceError(422, body.get("error", "adaptation failed"))
        return body

    def _post(self, path: str, files: dict[str, Any], data: dict[str, Any], retry_s: float) -> Any:
        """POST, retried while the answer is 409/429/503 (after its ``Retry-After``) for up to ``retry_s``."""
        deadline = time.monotonic() + retry_s
        while True:
            r = self.session.post(f"{self.url}{path}", files=files, data=data, timeout=self.timeout)
            if r.status_code not in RETRY_STATUSES or time.monotonic() > deadline:
                return r
            time.sleep(_retry_after(r))

    def style(self, style_id: str) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/v1/styles/{style_id}", timeout=self.timeout)).json()

    def styles(self, limit: int = 100) -> list[dict[str, Any]]:
        """Every style of the caller's tenant (the pages of ``GET /v1/styles`` followed)."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            page = self._check(self.session.get(f"{self.url}/v1/styles", params=params, timeout=self.timeout)).json()
            out += page["styles"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def delete_style(self, style_id: str) -> None:
        self._check(self.session.delete(f"{self.url}/v1/styles/{style_id}", timeout=self.timeout))

    def animate(
        self,
        audio: PathOrBytes,
        style_id: str = "",
        template: PathOrBytes | np.ndarray | None = None,
        fmt: str = "npz",
        preview: bool = False,
        out: str | Path | None = None,
        retry_s: float = 120.0,
        *,
        emotion: str | None = None,
        intensity: float | None = None,
        emotion_audio: PathOrBytes | None = None,
        sample: bool | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """POST /v1/animate. Returns ``{name: array}`` (npz/npy/json) or ``{"mp4"|"glb": bytes}``;
        with ``out`` the raw response is also written there. A style still being adapted
        (409) or a busy service (429/503) is retried for up to ``retry_s``.

        Generate options (sent only when given; for methods that list them, e.g. DEEPTalk;
        others answer 422): ``emotion`` a label such as "happy" with ``intensity`` in [0, 1],
        or ``emotion_audio`` a clip whose emotion drives the motion; ``sample`` instead of
        the deterministic argmax, with ``temperature`` (> 0, both code levels) and ``seed``."""
        files = {"audio": _payload(audio, "audio")}
        if template is not None:
            files["template"] = _payload(template, "template")
        if emotion_audio is not None:
            files["emotion_audio"] = _payload(emotion_audio, "emotion_audio")
        data = {"style_id": style_id, "format": fmt, "preview": str(bool(preview)).lower()}
        options = {"emotion": emotion, "intensity": intensity, "temperature": temperature, "seed": seed}
        data.update({k: str(v) for k, v in options.items() if v is not None})
        if sample is not None:
            data["sample"] = str(bool(sample)).lower()
        r = self._check(self._post("/v1/animate", files, data, retry_s))
        if out is not None:
            Path(out).write_bytes(r.content)
        if fmt in ("mp4", "glb"):
            return {fmt: r.content, "fps": float(r.headers["X-Talkmesh-Fps"])}
        if fmt == "json":
            body = r.json()
            return {**{k: np.asarray(v, dtype=np.float32) for k, v in body["outputs"].items()}, "fps": body["fps"]}
        if fmt == "npy":
            return {"vertices": np.load(io.BytesIO(r.content)), "fps": float(r.headers["X-Talkmesh-Fps"])}
        with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def stream(
        self,
        style_id: str = "",
        template: np.ndarray | None = None,
        *,
        encoding: str = "f32le",
        left_s: float | None = None,
        right_s: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> StreamSession:
        """Open a ``/v1/stream`` session (a context manager; the protocol is in
        :mod:`talkmesh.serving.streaming`): ``template`` (V, 3), the stream context and the
        generate options (``emotion``, ``intensity``, ``sample``, ``temperature``, ``seed``)
        are sent in its start message. Raises :class:`ServiceError` when the service refuses it."""
        from websockets.sync.client import connect

        ws_url = "ws" + self.url.removeprefix("http") + "/v1/stream"
        headers = {k: v for k, v in self.session.headers.items() if k == "Authorization"}
        ws = connect(ws_url, additional_headers=headers, open_timeout=timeout or self.timeout, max_size=2**26)
        ws.__enter__()  # the session is the context manager: its close() exits the connection's
        start: dict[str, Any] = {"type": "start", "style_id": style_id, "encoding": encoding, **options}
        start.update({k: v for k, v in (("left_s", left_s), ("right_s", right_s)) if v is not None})
        if template is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(template, dtype=np.float32))
            start["template"] = base64.b64encode(buf.getvalue()).decode()
        session = StreamSession(ws, encoding, timeout or self.timeout)
        try:
            ws.send(json.dumps({k: v for k, v in start.items() if v is not None}))
            session.ready = session._control("ready")
        except BaseException:
            session.close()
            raise
        return session


class StreamSession:
    """An open ``/v1/stream`` session: :meth:`send` audio, :meth:`receive` the frames that are
    final, :meth:`finish` for the rest. ``ready`` is the service's ready message (``fps``,
    ``lookahead_s``, ``model``, limits); ``frames`` collects every frame received so far."""

    def __init__(self, ws: Any, encoding: str, timeout: float) -> None:
        self.ws, self.encoding, self.timeout = ws, encoding, timeout
        self.ready: dict[str, Any] = {}
        self.end: dict[str, Any] = {}
        self._pieces: list[dict[str, np.ndarray]] = []

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ws.__exit__(None, None, None)

    def send(self, audio: np.ndarray) -> None:
        """Send a chunk (S,) of mono 16 kHz audio (floats in [-1, 1])."""
        a = np.asarray(audio, dtype=np.float32).reshape(-1)
        if self.encoding == "s16le":
            self.ws.send((np.clip(a, -1, 1) * 32767).astype("<i2").tobytes())
        else:
            self.ws.send(a.astype("<f4").tobytes())

    def receive(self, timeout: float = 0.0) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The frames messages that arrived, waiting up to ``timeout`` s for the first:
        [(first frame index, {output: (n, ...)})]. An error message raises ServiceError."""
        out = []
        wait: float | None = timeout
        while True:
            try:
                msg = self.ws.recv(timeout=wait)
            except TimeoutError:
                return out
            out.append(self._frames(msg))
            wait = 0.0

    def finish(self) -> dict[str, np.ndarray]:
        """End the audio; returns every frame of the session ({output: (T, ...)})."""
        self.ws.send(json.dumps({"type": "end"}))
        self.end = self._control("end")
        keys = self._pieces[0].keys() if self._pieces else ()
        return {k: np.concatenate([p[k] for p in self._pieces]) for k in keys}

    @property
    def frames(self) -> int:
        """Frames received so far."""
        return sum(next(iter(p.values())).shape[0] for p in self._pieces if p)

    def _frames(self, msg: bytes | str) -> tuple[int, dict[str, np.ndarray]]:
        from talkmesh.serving.wire import unpack_frames

        if isinstance(msg, str):
            body = json.loads(msg)
            if body.get("type") == "error":
                err = body.get("error") or {}
                status = int(body.get("status", 400))
                raise ServiceError(status, err.get("message"), err.get("code", ""), err.get("field"))
            raise ServiceError(400, f"unexpected message {body.get('type')!r} before the end of the stream")
        header, outputs = unpack_frames(msg)
        if int(header["start"]) != self.frames:
            raise ServiceError(400, f"frames start at {header['start']}, expected {self.frames}")
        self._pieces.append(outputs)
        return int(header["start"]), outputs

    def _control(self, kind: str) -> dict[str, Any]:
        """Wait for the control message ``kind``, collecting frames on the way."""
        while True:
            msg = self.ws.recv(timeout=self.timeout)
            if isinstance(msg, str):
                body = json.loads(msg)
                if body.get("type") == kind:
                    return body
            self._frames(msg)
