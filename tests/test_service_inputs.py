"""Bounded inputs of the style service (issue 13), fast and without Ray: hostile uploads are
refused from their headers before decoding, with the documented status and the one error
schema; the body limit holds while a body streams in; unexpected failures answer a 500 in
the schema without a traceback; decoding runs off the event loop.

HTTP goes through raw ASGI calls on small FastAPI apps (no server, no sockets)."""

import asyncio
import io
import logging
import struct
import threading
import time
import tracemalloc

import anyio
import anyio.to_thread
import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from numpy.lib import format as npy

from talkmesh.serving.errors import ERROR_RESPONSES, ServiceError, error_body, install_error_handlers
from talkmesh.serving.inputs import (
    MOTION_RANKS,
    InputError,
    InputLimits,
    probe_array,
    probe_audio,
    read_array,
    read_audio,
)
from talkmesh.serving.limits import BlockingRunner, BodyLimitMiddleware, run_blocking

LIMITS = InputLimits()

# ------------------------------------------------------------------------------ hostile files


def _audio(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = np.repeat((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _flac_declaring(rate: int, channels: int, seconds: float) -> bytes:
    """A small real FLAC whose STREAMINFO declares ``rate`` Hz and ``seconds`` of audio: the
    shape of the issue's 170 KB file that decodes to gigabytes (its data holds 0.1 s)."""
    data = bytearray(_audio(0.1, 48000, channels, fmt="FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    bits = int.from_bytes(data[18:26], "big")  # rate:20 channels-1:3 bps-1:5 total:36
    keep = bits & ((1 << 44) - 1) & ~((1 << 36) - 1)
    data[18:26] = ((rate << 44) | keep | int(seconds * rate)).to_bytes(8, "big")
    return bytes(data)


def _wav_with_rate(rate: int) -> bytes:
    data = bytearray(_audio(1.0))
    assert data[12:16] == b"fmt "
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (2 * rate) & 0xFFFFFFFF)
    return bytes(data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npy_declaring(shape: tuple, descr: str = "<f4", data: bytes = b"\0" * 64) -> bytes:
    """An .npy header declaring ``shape`` followed by only ``data``."""
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3))
    return buf.getvalue()


AUDIO_CASES = [
    # (id, data, status, code)
    ("flac-655kHz-8ch-30s", _flac_declaring(655350, 8, 30.0), 422, "unsupported_sample_rate"),
    ("wav-rate-2^31", _wav_with_rate(2**31 - 1), 422, "unsupported_sample_rate"),
    ("wav-rate-1Hz", _wav_with_rate(1), 422, "unsupported_sample_rate"),
    ("wav-rate-0", _wav_with_rate(0), 400, "unreadable_audio"),
    ("wav-10-channels", _audio(0.5, 8000, channels=10), 422, "too_many_channels"),
    ("flac-declares-30s-holds-0.1s", _flac_declaring(48000, 2, 30.0), 400, "truncated"),
    ("wav-61s", _audio(61.0, 8000), 413, "too_long"),
    ("wav-0.5s", _audio(0.5), 422, "too_short"),
    ("empty", b"", 400, "empty_upload"),
    ("wav-header-only", _audio(1.0)[:30], 400, "unreadable_audio"),
    ("not-audio", b"GIF89a" + b"\0" * 500, 400, "unreadable_audio"),
    ("npy-as-audio", _npy(np.zeros(16000, np.float32)), 400, "wrong_type"),
]

V = 30
MOTION_CASES = [
    ("shape-1e12-elements", _npy_declaring((10**6, 10**6, 3)), 413, "too_large"),
    ("shape-2^62", _npy_declaring((2**62, 3), "<f8"), 413, "too_large"),
    ("object-dtype", _npy(np.array([{"x": 1}, None], dtype=object)), 400, "object_array"),
    ("unicode-dtype", _npy(np.array([["a", "b"]])), 422, "unsupported_dtype"),
    ("complex-dtype", _npy(np.zeros((4, 3), np.complex64)), 422, "unsupported_dtype"),
    ("structured-dtype", _npy(np.zeros((4, 3), dtype=[("a", "<f4")])), 422, "unsupported_dtype"),
    ("bool-dtype", _npy(np.zeros((4, 3), bool)), 422, "unsupported_dtype"),
    ("rank-4", _npy(np.zeros((2, 2, 2, 2), np.float32)), 422, "wrong_shape"),
    ("rank-1-motion", _npy(np.zeros(90, np.float32)), 422, "wrong_shape"),
    ("zero-frames", _npy(np.zeros((0, V, 3), np.float32)), 422, "wrong_shape"),
    ("nan", _npy(np.array([[0.0, np.nan, 1.0]] * 4, np.float32)), 422, "non_finite"),
    ("inf", _npy(np.array([[0.0, np.inf, 1.0]] * 4, np.float64)), 422, "non_finite"),
    ("beyond-float32", _npy(np.full((4, 3), 1e300)), 422, "non_finite"),
    ("data-truncated", _npy(np.zeros((50, V, 3), np.float32))[:-100], 400, "truncated"),
    ("header-truncated", _npy(np.zeros((50, V, 3), np.float32))[:20], 400, "unreadable_array"),
    ("negative-dim", _npy_declaring((-1, 3)), 400, "unreadable_array"),
    ("bad-magic", b"\x93NUMPY\x07\x00" + b"\0" * 100, 400, "unreadable_array"),
    ("pickle", b"\x80\x04\x95" + b"\0" * 40, 400, "unreadable_array"),
    ("npz", _npz(), 400, "wrong_type"),
    ("empty", b"", 400, "empty_upload"),
]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any audio sample gets decoded."""

    def refuse(*args, **kwargs):
        raise AssertionError("decoded audio that the header should have refused")

    monkeypatch.setattr(sf.SoundFile, "read", refuse)


@pytest.mark.parametrize(
    "limits",
    [LIMITS, InputLimits(max_sample_rate=1_048_575)],  # the second one gets past the rate check
    ids=["default", "any-rate"],
)
def test_issue_flac_is_refused_from_its_header_without_allocating(limits, no_decoding):
    data = _flac_declaring(655350, 8, 30.0)
    assert sf.info(io.BytesIO(data)).frames * 8 * 4 > 500 * 2**20  # what a float32 decode would take
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError) as e:
            read_audio(data, "audio", limits.max_reference_seconds, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 8 * 2**20, f"allocated {peak / 2**20:.1f} MiB"
    assert e.value.field == "audio" and e.value.status in (413, 422)
    if limits is not LIMITS:
        assert (e.value.status, e.value.code) == (413, "too_large") and "MiB" in e.value.message


def test_npy_declaring_a_huge_shape_allocates_nothing():
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as e:
            read_array(_npy_declaring((10**6, 10**6, 3)), "motion")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (e.value.status, e.value.code, e.value.field) == (413, "too_large", "motion")
    assert peak < 2**20


@pytest.mark.parametrize(("name", "data", "status", "code"), AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_hostile_audio_is_4xx_naming_the_field(name, data, status, code):
    with pytest.raises(InputError) as e:
        read_audio(data, "audio", LIMITS.max_reference_seconds, LIMITS.min_reference_seconds, limits=LIMITS)
    assert (e.value.status, e.value.code, e.value.field) == (status, code, "audio"), e.value.message
    assert str(e.value).startswith("audio: ") and "BytesIO" not in e.value.message


@pytest.mark.parametrize(("name", "data", "status", "code"), MOTION_CASES, ids=[c[0] for c in MOTION_CASES])
def test_hostile_arrays_are_4xx_naming_the_field(name, data, status, code):
    with pytest.raises(InputError) as e:
        read_array(data, "motion", ranks=MOTION_RANKS)
    assert (e.value.status, e.value.code, e.value.field) == (status, code, "motion"), e.value.message
    assert isinstance(e.value, ValueError) and isinstance(e.value, ServiceError)


def test_good_inputs_pass_intact():
    a = read_audio(_audio(2.0, 48000, channels=2, fmt="FLAC"), "audio", 10)
    assert a.dtype == np.float32 and abs(a.shape[0] - 32000) <= 2
    assert 0.2 < float(np.abs(a).max()) < 0.31  # the mono mix of two equal channels, not their sum
    assert read_audio(_audio(1.0, 8000, channels=8), "audio", 10).shape[0] == 16000  # at the limits
    motion = np.random.default_rng(0).standard_normal((50, V, 3))
    assert np.allclose(read_array(_npy(motion), "motion", ranks=MOTION_RANKS), motion.astype(np.float32))
    fortran = np.asfortranarray(motion.astype(">f4"))
    out = read_array(_npy(fortran), "motion")
    assert out.dtype == np.float32 and np.array_equal(out, motion.astype(np.float32)) and out.flags.writeable
    assert read_array(_npy(np.arange(12, dtype=np.int16).reshape(4, 3)), "template").dtype == np.float32


def test_headers_are_read_without_the_data():
    head = probe_audio(_flac_declaring(48000, 2, 30.0), "audio", LIMITS, max_seconds=60, min_seconds=1)
    assert (head.sample_rate, head.channels, head.frames) == (48000, 2, 1_440_000)
    assert head.decoded_bytes == 1_440_000 * 2 * 4 and head.seconds == 30.0
    arr = probe_array(_npy(np.zeros((5, 4), "<f8")), "motion", LIMITS)
    assert arr.shape == (5, 4) and arr.nbytes == 160 and arr.dtype == np.float64


def test_limits_are_checked_and_derived():
    with pytest.raises(ValueError, match="max_channels"):
        InputLimits(max_channels=0)
    with pytest.raises(ValueError, match="min_sample_rate"):
        InputLimits(min_sample_rate=48000, max_sample_rate=16000)
    lim = InputLimits.from_megabytes(10, max_audio_seconds=30)
    assert lim.max_upload_bytes == 10 * 2**20 and lim.max_body_bytes == 31 * 2**20 and lim.max_audio_seconds == 30


# ------------------------------------------------------------------------------ raw ASGI


async def _call(app, method: str, path: str, chunks=(b"",), headers=()) -> tuple[int, dict, bytes, int]:
    """One request: (status, headers, body, number of body chunks the app pulled)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if pulled < len(messages):
            pulled += 1
            return messages[pulled - 1]
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    try:
        await app(scope, receive, send)
    except Exception:
        # Starlette re-raises an unexpected exception after answering it (for the server's log).
        if not sent:
            raise
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], {k.decode(): v.decode() for k, v in starts[0]["headers"]}, body, pulled


def _request(app, method: str, path: str, chunks=(b"",), headers=()) -> tuple[int, dict, bytes, int]:
    return asyncio.run(_call(app, method, path, chunks, headers))


def _error(body: bytes) -> dict:
    import json

    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "field"}, doc
    return doc["error"]


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "talkmesh-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _service(limits: InputLimits = LIMITS, runner: BlockingRunner | None = None) -> FastAPI:
    """The ingress in miniature: error schema, body limit, decoding on a runner."""
    runner = runner or BlockingRunner(max_workers=2)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/audio")
    async def audio(audio: UploadFile = File(...)) -> dict:  # noqa: B008
        data = await audio.read(limits.max_upload_bytes + 1)
        arr = await runner.run(read_audio, data, "audio", limits.max_reference_seconds, 1.0, limits=limits)
        return {"samples": int(arr.shape[0])}

    @app.post("/motion")
    async def motion(motion: UploadFile = File(...)) -> dict:  # noqa: B008
        data = await motion.read(limits.max_upload_bytes + 1)
        arr = await runner.run(read_array, data, "motion", limits=limits, ranks=MOTION_RANKS)
        return {"shape": list(arr.shape)}

    return app


def _post_file(app, route: str, field: str, data: bytes, chunk: int = 0) -> tuple[int, dict, bytes, int]:
    body, ctype = _multipart(field, "upload.bin", data)
    if chunk:  # chunked transfer: no Content-Length
        chunks = tuple(body[i : i + chunk] for i in range(0, len(body), chunk))
        return _request(app, "POST", route, chunks, [("content-type", ctype)])
    headers = [("content-type", ctype), ("content-length", str(len(body)))]
    return _request(app, "POST", route, (body,), headers)


def test_hostile_corpus_over_http_gets_the_schema_and_the_service_stays_healthy():
    app = _service()
    cases = [("/audio", "audio", *c) for c in AUDIO_CASES] + [("/motion", "motion", *c) for c in MOTION_CASES]
    for route, field, name, data, status, code in cases:
        got, _, body, _ = _post_file(app, route, field, data)
        err = _error(body)
        assert (got, err["code"], err["field"]) == (status, code, field), (name, err)
        assert "Traceback" not in err["message"]
        assert _request(app, "GET", "/healthz")[0] == 200
    assert _post_file(app, "/audio", "audio", _audio(1.5, 44100, 2))[0] == 200
    status, _, body, _ = _post_file(app, "/motion", "motion", _npy(np.zeros((50, V, 3), np.float32)), chunk=1000)
    assert status == 200 and b"[50,30,3]" in body.replace(b" ", b"")


# ------------------------------------------------------------------------------ body limit


def _echo_app(max_bytes: int) -> tuple[FastAPI, list]:
    calls: list = []
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        calls.append(1)
        body = await request.body()
        return {"n": len(body), "sum": int(np.frombuffer(body, np.uint8).sum())}

    return app, calls


def test_content_length_over_the_limit_is_413_before_the_body_is_read():
    app, calls = _echo_app(1000)
    status, headers, body, pulled = _request(app, "POST", "/echo", (b"x" * 5000,), [("content-length", "5000")])
    assert status == 413 and pulled == 0 and not calls
    err = _error(body)
    assert err["code"] == "too_large" and err["field"] == "body" and "1000" in err["message"]
    assert headers["connection"] == "close"


def test_chunked_body_is_cut_off_once_past_the_limit():
    app, calls = _echo_app(2500)
    chunks = tuple(bytes([i]) * 1000 for i in range(10))  # 10 kB, no Content-Length
    status, _, body, pulled = _request(app, "POST", "/echo", chunks)
    assert status == 413 and _error(body)["field"] == "body"
    assert pulled == 3  # stopped at the chunk that crossed the limit; the rest never read
    # A Content-Length that understates the body is caught the same way.
    status, _, _, pulled = _request(app, "POST", "/echo", chunks, [("content-length", "10")])
    assert status == 413 and pulled == 3


def test_bodies_within_the_limit_pass_intact():
    app, _ = _echo_app(2500)
    chunks = (b"\x01" * 1000, b"\x02" * 1000, b"\x03" * 500)  # exactly at the limit
    status, _, body, _ = _request(app, "POST", "/echo", chunks)
    assert status == 200 and body == b'{"n":2500,"sum":4500}'
    length = [("content-length", "2500")]
    assert _request(app, "POST", "/echo", (b"".join(chunks),), length)[2] == body


def test_malformed_content_length_is_400():
    app, calls = _echo_app(2500)
    for value in ("abc", "-1", "1e3"):
        status, _, body, _ = _request(app, "POST", "/echo", (b"x",), [("content-length", value)])
        assert status == 400 and _error(body)["field"] == "content-length" and not calls
    status, _, _, _ = _request(app, "POST", "/echo", (b"x",), [("content-length", "1"), ("content-length", "2")])
    assert status == 400


def test_multipart_upload_over_the_limit_is_413_not_a_parse_error():
    """FastAPI turns a failed body read into 400 'error parsing the body'; the client must see the 413."""
    app = _service(InputLimits.from_megabytes(0.01, files_per_request=1))  # ~10 kB upload, ~1 MiB body
    status, _, body, pulled = _post_file(app, "/motion", "motion", b"\0" * (3 * 2**20), chunk=64 * 1024)
    assert status == 413 and _error(body)["code"] == "too_large"
    assert pulled < 20  # of 48 chunks


def test_the_limit_holds_for_a_bare_asgi_app():
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodyLimitMiddleware(app, max_bytes=100)
    status, _, body, pulled = _request(limited, "POST", "/", (b"x" * 60, b"x" * 60, b"x" * 60))
    assert status == 413 and pulled == 2 and _error(body)["code"] == "too_large"
    assert _request(limited, "POST", "/", (b"x" * 60, b"x" * 40))[:3] == (200, {}, b"ok")
    with pytest.raises(ValueError, match="max_bytes"):
        BodyLimitMiddleware(app, max_bytes=-1)


# ------------------------------------------------------------------------------ error schema


def _failing_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/items")
    async def items(n: int, name: str = "") -> dict:
        return {"n": n}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret-db-password-123 in a stack frame")

    @app.get("/busy")
    async def busy() -> dict:
        raise ServiceError(503, "busy", "the queue is full", headers={"Retry-After": "7"})

    @app.get("/input")
    async def bad_input() -> dict:
        raise InputError(422, "style_id", "'x y' is not a style id")

    @app.get("/http")
    async def http_error() -> dict:
        raise HTTPException(409, detail="style sty_1 is being deleted")

    return app


def test_validation_errors_are_422_naming_the_field():
    status, _, body, _ = _request(_failing_app(), "GET", "/items?n=not-a-number")
    err = _error(body)
    assert status == 422 and err == {"code": "invalid_input", "field": "n", "message": err["message"]}
    assert err["message"].startswith("n: ") and "not-a-number" not in err["message"]  # the input is not echoed
    err = _error(_request(_failing_app(), "GET", "/items")[2])
    assert err["field"] == "n" and "required" in err["message"].lower()


def test_unexpected_exceptions_are_500_without_a_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="talkmesh.serving.errors"):
        status, _, body, _ = _request(_failing_app(), "GET", "/boom")
    assert status == 500 and _error(body) == error_body("internal_error", _error(body)["message"])["error"]
    assert b"secret" not in body and b"Traceback" not in body and b"RuntimeError" not in body
    assert "secret-db-password-123" in caplog.text and "Traceback" in caplog.text  # logged for the operator


def test_service_http_and_input_errors_share_the_schema():
    app = _failing_app()
    status, headers, body, _ = _request(app, "GET", "/busy")
    assert status == 503 and headers["retry-after"] == "7" and _error(body)["code"] == "busy"
    status, _, body, _ = _request(app, "GET", "/input")
    assert (status, _error(body)["code"], _error(body)["field"]) == (422, "invalid_input", "style_id")
    status, _, body, _ = _request(app, "GET", "/http")
    assert status == 409 and _error(body) == error_body("conflict", "style sty_1 is being deleted")["error"]
    status, _, body, _ = _request(app, "GET", "/nowhere")
    assert status == 404 and _error(body)["code"] == "not_found"
    status, headers, body, _ = _request(app, "POST", "/items")
    assert status == 405 and "GET" in headers.get("allow", "") and _error(body)["code"] == "method_not_allowed"


def test_the_schema_is_documented_in_openapi():
    app = FastAPI(responses=ERROR_RESPONSES)

    @app.get("/x")
    async def x() -> dict:
        return {}

    doc = app.openapi()
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {"code", "message", "field"}
    assert "ErrorBody" in str(doc["paths"]["/x"]["get"]["responses"]["413"])
    with pytest.raises(ValueError, match="status"):
        ServiceError(200, "ok", "not an error")


# ------------------------------------------------------------------------------ off the event loop


def test_decoding_runs_off_the_event_loop_and_backs_off_when_full():
    runner = BlockingRunner(max_workers=1, max_waiting=0, retry_after_s=2)
    app = _service(runner=runner)
    started, release = threading.Event(), threading.Event()

    def stuck_decode() -> str:
        started.set()
        release.wait(30)
        return "decoded"

    async def scenario() -> None:
        task = asyncio.create_task(runner.run(stuck_decode))
        assert await anyio.to_thread.run_sync(started.wait, 30)
        with anyio.fail_after(5):  # the loop is free while the decode blocks its thread
            assert (await _call(app, "GET", "/healthz"))[0] == 200
        with pytest.raises(ServiceError) as e:  # the one worker is busy and no waiting is allowed
            await runner.run(len, b"x")
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}
        release.set()
        assert await task == "decoded" and runner.running == runner.waiting == 0
        assert await runner.run(len, b"xyz") == 3
        with pytest.raises(InputError):  # the worker's exception reaches the caller unchanged
            await run_blocking(read_audio, b"", "audio", 10)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
