"""The style service under fuzz: an OpenAPI-driven fuzzer (schemathesis, from the running
service's ``/openapi.json``) over every route with positive and negative data, then a
hand-made hostile corpus (audio headers that lie, ``.npy`` headers declaring huge shapes,
pickles, non-finite arrays, chunked bodies over the limit, ``Content-Length`` lies,
traversal in style ids, weighted-mix abuse, bad and revoked keys, DELETE racing POST,
cursor garbage, ...). Over 1,000 requests in all: no answer may be >= 500, every 4xx body
must be exactly the service's error schema (bytes that are not HTTP/1.1 at all are refused by
Serve's proxy before the application, with its own plain-text 400: :data:`PROXY_400`, counted
apart), hostile input must not be accepted, ``/healthz`` must answer 200 throughout (a
thread polls it) and after, and the ingress replica's RSS may grow by at most
:data:`RSS_GROWTH_BOUND_MB`. One keyed Serve application of a debug FaceFormer on the
session's loopback Ray (slow)."""

from __future__ import annotations

import collections
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from service_helpers import (
    HealthPoller,
    RssSampler,
    Service,
    error_schema_problem,
    ingress_pid,
    npy,
    npy_declaring,
    start_service,
    wav,
    wav_declaring,
)

# The ingress replica's resident memory may grow by at most this much while fuzzing. Why 300
# MB: uploads are capped at 4 MB a file (13 MiB a body); a decode at max_decoded_mb (96) of
# samples, of which the ingress keeps a mono copy (12 s at 192 kHz: 9 MB; 2x as float64 while
# resampling); at most decode_workers (2) decodes at once; and the fuzz sends one request at a
# time apart from the DELETE/POST race: ~2 x (13 + 96) MB in the very worst case. A believed
# header (a 2 GB decode, a terabyte .npy) blows far past it, and so does memory kept after the
# requests: measured +135..165 MB with the ingress's glibc malloc arenas capped
# (MALLOC_ARENA_MAX=2), +520 MB without (every thread that ever decoded keeps its own arena
# at its peak, so the :func:`_silence_bombs` ratchet the RSS up by ~28 MB each).
RSS_GROWTH_BOUND_MB = 300.0
MIN_REQUESTS = 1000
EXAMPLES_PER_OPERATION = 100  # schemathesis examples per operation and generation mode
RACE_ROUNDS = 12
SILENCE_BOMBS = 16  # valid 18 KB FLACs that each decode 2.3 M frames x 8 channels
MAX_BODY = (3 * 4 + 1) * 2**20  # max_upload_mb 4: three files and 1 MiB of form fields
# What Serve's HTTP proxy (uvicorn) answers, before any request reaches the application, to
# bytes that are not HTTP/1.1 (bad or repeated Content-Length, NUL in a header, a request
# line or header over h11's 16 KiB): a plain-text 400 the application cannot shape.
PROXY_400 = b"Invalid HTTP request received."


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory) -> Iterator[Service]:
    """The keyed service (tenants alice, bob, racer, mallory; mallory's key is revoked
    before the fuzz), with an adaptation queue the fuzz cannot fill legitimately."""
    from ray import serve

    root = tmp_path_factory.mktemp("fuzz")
    svc = start_service(
        serve_url, root, "fuzz", ("alice", "bob", "racer", "mallory"),
        adapt_queue_max=10_000, adapt_queue_per_tenant=10_000,
    )  # fmt: skip
    svc.keys.revoke(svc.tokens["mallory"].split("_")[1])
    yield svc
    serve.delete("fuzz")


@dataclasses.dataclass
class Outcome:
    """What the fuzz saw: a status histogram, the failures, the request count."""

    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_phase: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)
    server_errors: list[str] = dataclasses.field(default_factory=list)
    schema_problems: list[str] = dataclasses.field(default_factory=list)
    accepted: list[str] = dataclasses.field(default_factory=list)  # hostile input answered 2xx
    by_proxy: list[str] = dataclasses.field(default_factory=list)  # protocol errors the proxy refused (400)
    closed: list[str] = dataclasses.field(default_factory=list)  # connections closed without an answer
    negative_2xx: list[str] = dataclasses.field(default_factory=list)  # schemathesis' invalid data answered 2xx
    refused_valid: list[str] = dataclasses.field(default_factory=list)  # valid requests in odd forms not answered
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def record(
        self, case: str, status: int | None, body: bytes, expect_4xx: bool = True, protocol: bool = False,
        phase: str = "hostile",
    ) -> None:
        """One answer (``None``: the server closed the connection without one); ``protocol``:
        the request breaks HTTP itself, so the proxy's own plain-text 400 is a right answer."""
        with self.lock:
            key = "closed" if status is None else str(status)
            self.statuses[key] += 1
            self.by_phase.setdefault(phase, collections.Counter())[key] += 1
            if status is None:
                self.closed.append(case)
            elif protocol and status == 400 and body == PROXY_400:
                self.by_proxy.append(case)
            elif status >= 500:
                self.server_errors.append(f"{case}: {status} {body[:300]!r}")
            elif status >= 400:
                problem = error_schema_problem(status, body)
                if problem:
                    self.schema_problems.append(f"{case}: {problem}")
            elif expect_4xx:
                self.accepted.append(f"{case}: {status}")
            elif phase == "schemathesis negative":
                self.negative_2xx.append(f"{case}: {status}")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@pytest.mark.slow
def test_fuzz_and_a_hostile_corpus_get_no_5xx_one_error_schema_healthy_bounded_memory(service):
    import requests

    out = Outcome()
    rss = RssSampler(ingress_pid(service.app_name))
    health = HealthPoller(service.url)
    rss.start()
    health.start()
    t0 = time.perf_counter()
    try:
        fuzzed = _schemathesis_phase(service, out)
        hostile = _hostile_phase(service, out)
        _race_phase(service, out)
    finally:
        mem, polled = rss.stop(), health.stop()
    after = requests.get(f"{service.url}/healthz", timeout=30)
    wall = time.perf_counter() - t0
    raced = out.total - fuzzed - hostile
    print(f"\nfuzz: {out.total} requests in {wall:.1f} s ({fuzzed} schemathesis, {hostile} hostile corpus, "
          f"{raced} DELETE/POST race); statuses {dict(sorted(out.statuses.items()))}")  # fmt: skip
    print("by phase:", {k: dict(sorted(v.items())) for k, v in out.by_phase.items()})
    print(f"ingress RSS MB: {mem} (bound: growth <= {RSS_GROWTH_BOUND_MB})")
    print(f"/healthz while fuzzing: {polled}; after: {after.status_code}")
    print(f"refused by the proxy as not HTTP/1.1 ({len(out.by_proxy)}): {out.by_proxy}")
    print(f"closed without an answer ({len(out.closed)}): {out.closed}")
    print(f"schemathesis negative data answered 2xx ({len(out.negative_2xx)}):", *out.negative_2xx[:10], sep="\n  ")
    for name, found in (("5xx", out.server_errors), ("error schema", out.schema_problems)):
        print(f"{name} failures ({len(found)}):", *found[:50], sep="\n  ")
    assert out.total >= MIN_REQUESTS
    assert not out.server_errors, f"{len(out.server_errors)} answers >= 500:\n" + "\n".join(out.server_errors)
    assert not out.schema_problems, "4xx bodies off the error schema:\n" + "\n".join(out.schema_problems)
    assert not out.accepted, "hostile requests answered 2xx:\n" + "\n".join(out.accepted)
    assert not out.refused_valid, "valid requests refused:\n" + "\n".join(out.refused_valid)
    assert set(polled["statuses"]) == {"200"}, polled
    assert after.status_code == 200, after.text
    assert mem["growth"] <= RSS_GROWTH_BOUND_MB, mem


# ------------------------------------------------------------------------------ schemathesis


def _schemathesis_phase(svc: Service, out: Outcome) -> int:
    """Every operation of the service's OpenAPI schema, positive and negative data, with a
    valid key; returns the number of requests sent."""
    import requests
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{svc.url}/openapi.json", timeout=30)
    sent = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                sent += _fuzz_operation(result.ok(), mode, svc, session, out)
    return sent


def _fuzz_operation(op: Any, mode: Any, svc: Service, session: Any, out: Outcome) -> int:
    """Up to ``EXAMPLES_PER_OPERATION`` generated requests to one operation (hypothesis drives
    schemathesis' strategy for it); returns the number sent."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    # Both security schemes the schema declares carry the valid key: left to the generator,
    # X-API-Key would be a random string and every request a 401 (the auth corpus covers those).
    token = svc.tokens["alice"]
    auth = {"Authorization": f"Bearer {token}", "X-API-Key": token}
    sent = 0

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode, headers=auth))
    def send(case: Any) -> None:
        nonlocal sent
        r = case.call(base_url=svc.url, session=session, timeout=120)
        sent += 1
        name = f"schemathesis {mode.value} {op.label}: {case.as_curl_command()[:300]}"
        out.record(name, r.status_code, r.content, expect_4xx=False, phase=f"schemathesis {mode.value}")

    try:
        send()
    except Unsatisfiable:  # nothing in this operation to make negative (no parameters)
        pass
    return sent


# ------------------------------------------------------------------------------ the hostile corpus


@dataclasses.dataclass
class Hostile:
    """One hand-made request: sent with requests unless ``raw`` (bytes on a socket)."""

    name: str
    method: str = "POST"
    path: str = "/v1/animate"
    who: str | None = "alice"
    files: Any = None
    data: Any = None
    params: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: Any = None  # bytes or an iterator of bytes (chunked, no Content-Length)
    raw: bytes | None = None
    expect_4xx: bool = True
    protocol: bool = False  # not valid HTTP/1.1: the proxy may refuse it before the app sees it
    half_close: bool = False  # raw: end the stream after sending (the body is shorter than declared)
    must_succeed: bool = False  # a valid request in an unusual form: must answer 200


def _hostile_phase(svc: Service, out: Outcome) -> int:
    """Every case of the corpus once; returns the number of requests sent."""
    import requests

    builders: list[Callable[[Service], list[Hostile]]] = [
        _audio_cases, _silence_bombs, _array_cases, _form_cases, _style_id_cases, _auth_cases, _listing_cases,
        _body_cases,
    ]  # fmt: skip
    cases = [case for build in builders for case in build(svc)]
    lenient = []  # cases a correct service may also answer 2xx: what it did
    with requests.Session() as session:
        for case in cases:
            status, body = _send(svc, session, case)
            out.record(case.name, status, body, case.expect_4xx, case.protocol)
            if not case.expect_4xx:
                lenient.append(f"{case.name}: {status}")
            if case.must_succeed and status != 200:
                out.refused_valid.append(f"{case.name}: {status} {body[:300]!r}")
    print("\nhostile cases that may succeed:", *lenient, sep="\n  ")
    return len(cases)


def _send(svc: Service, session: Any, case: Hostile) -> tuple[int | None, bytes]:
    if case.raw is not None:
        return _raw(svc.url, case.raw, case.half_close)
    headers = dict(case.headers)
    if case.who is not None:
        headers.setdefault("Authorization", f"Bearer {svc.tokens[case.who]}")
    r = session.request(case.method, f"{svc.url}{case.path}", headers=headers, files=case.files, data=case.body
                        if case.body is not None else case.data, params=case.params, timeout=120)  # fmt: skip
    return r.status_code, r.content


def _raw(url: str, request: bytes, half_close: bool = False, timeout_s: float = 20.0) -> tuple[int | None, bytes]:
    """Send ``request`` as is (``half_close``: then signal the end of the stream, for a body
    shorter than it declares) and read the answer: (status, body), or (None, b"") when the
    server closed the connection without answering."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/1."):
        return None, data
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(head.split(b" ", 2)[1]), body


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


def _request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *(f"{k}: {v}" for k, v in
             headers.items())]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _flac_declaring(rate: int, channels: int, seconds: float) -> bytes:
    """A real FLAC of 0.05 s whose STREAMINFO then claims ``seconds`` of audio (patched)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * 0.05), channels), np.float32), rate, format="FLAC")
    data = bytearray(buf.getvalue())
    # STREAMINFO starts at byte 8; bytes 18..26 hold rate (20 bits), channels-1 (3), bps-1 (5), total samples (36)
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~(2**36 - 1)) | int(rate * seconds)
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def _silence_bombs(svc: Service) -> list[Hostile]:
    """Valid animate requests whose audio is a tiny FLAC of silence that decodes to the most
    the limits allow (192 kHz, 8 channels, just under 12 s: 18 KB on the wire, 73 MB of
    samples), ``SILENCE_BOMBS`` times: each must animate, and the ingress must not keep what
    the decodes allocated (see :data:`RSS_GROWTH_BOUND_MB`)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    frames = int(192_000 * 11.9)
    sf.write(buf, np.zeros((frames, 8), np.int16), 192_000, format="FLAC", subtype="PCM_16")
    files = {"audio": ("a.flac", buf.getvalue()), "template": ("t.npy", npy(svc.reference.template))}
    return [Hostile(f"animate: 192 kHz 8 ch 11.9 s FLAC of silence #{i}", files=files, data={"style_id": "S01"},
                    expect_4xx=False, must_succeed=True) for i in range(SILENCE_BOMBS)]  # fmt: skip


def _audio_cases(svc: Service) -> list[Hostile]:
    """Audio uploads that lie, break or overflow (``/v1/animate`` and ``/v1/styles``)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 170_000, dtype=np.uint8).tobytes()
    speech = svc.reference.audio[:32000]  # 2 s, 16 kHz
    good = wav(speech)
    bad_audio = {
        "wav 655 kHz 8 ch 30 s declared": wav_declaring(655_360, 8, 16, 655_360 * 30, noise),
        "wav 48 kHz 8 ch 30 s declared": wav_declaring(48_000, 8, 16, 48_000 * 30, noise),
        "wav 16 kHz 10 s declared, 5 ms sent": wav_declaring(16_000, 1, 16, 160_000, noise[:160]),
        "wav 0 Hz": wav_declaring(0, 1, 16, 16_000, noise[:32_000]),
        "wav 7999 Hz": wav_declaring(7_999, 1, 16, 16_000, noise[:32_000]),
        "wav 0 channels": wav_declaring(16_000, 0, 16, 16_000, noise[:32_000]),
        "wav 4096 channels": wav_declaring(16_000, 4096, 16, 100, noise[:819_200 // 8]),
        "wav 7 bits": wav_declaring(16_000, 1, 7, 16_000, noise[:32_000]),
        "wav 64-bit int": wav_declaring(16_000, 1, 64, 4_000, noise[:32_000]),
        "wav unknown format tag": wav_declaring(16_000, 1, 16, 16_000, noise[:32_000], tag=0x1234),
        "wav 4 GB declared": wav_declaring(16_000, 2, 32, 2**29, noise),
        "wav NaN samples": wav(np.full(32000, np.nan)),
        "wav inf samples": wav(np.where(np.arange(32000) % 2, np.inf, -np.inf)),
        "wav 12.5 s (over 12)": wav(np.zeros(200_000)),
        "wav 1 frame": wav(np.zeros(1)),
        "riff truncated to 30 bytes": good[:30],
        "riff header only": good[:44],
        "riff cut mid-data": good[: len(good) // 3],
        "riff with lying chunk sizes": b"RIFF\xff\xff\xff\xffWAVEfmt \xff\xff\xff\xff" + good[20:200],
        "flac 655 kHz 8 ch 30 s declared": _flac_declaring(655_350, 8, 30.0),
        "flac 192 kHz 8 ch 30 s declared": _flac_declaring(192_000, 8, 30.0),
        "flac 16 kHz 11 s declared, 50 ms sent": _flac_declaring(16_000, 1, 11.0),
        "flac garbage": b"fLaC" + noise[:4096],
        "flac magic only": b"fLaC",
        "ogg garbage": b"OggS" + noise[:4096],
        "ogg page header, garbage": b"OggS\x00\x02" + b"\0" * 20 + b"\x01\x1e\x01vorbis" + noise[:2048],
        "an .npy as audio": npy(speech),
        "empty audio": b"",
        "text as audio": b"hello, I am not a wave file\n" * 100,
        "png as audio": b"\x89PNG\r\n\x1a\n" + noise[:1024],
        "zip as audio": b"PK\x03\x04" + noise[:1024],
        "random bytes": noise,
    }
    cases = [Hostile(f"animate audio: {k}", files={"audio": ("a.wav", v)}, data={"style_id": "S01"})
             for k, v in bad_audio.items()]  # fmt: skip
    motion, tmpl = npy(svc.reference.vertices), npy(svc.reference.template)
    for k in ("wav 655 kHz 8 ch 30 s declared", "flac 655 kHz 8 ch 30 s declared", "riff cut mid-data",
              "ogg garbage", "wav NaN samples", "wav 1 frame"):  # fmt: skip
        files = {"audio": ("r.wav", bad_audio[k]), "motion": ("m.npy", motion), "template": ("t.npy", tmpl)}
        cases.append(Hostile(f"styles audio: {k}", path="/v1/styles", files=files, params={"wait_s": 0}))
    emo = {"audio": ("a.wav", good), "emotion_audio": ("e.wav", bad_audio["wav 655 kHz 8 ch 30 s declared"])}
    cases.append(Hostile("animate emotion_audio (faceformer takes none)", files=emo, data={"style_id": "S01"}))
    return cases


def _array_cases(svc: Service) -> list[Hostile]:
    """``.npy`` uploads that lie, pickle, hold NaN/inf, or have the wrong rank/shape/dtype."""
    ref = svc.reference
    v = ref.template.shape[0]
    audio = wav(ref.audio[:32000])
    bad = {
        "shape (10**6, 10**6, 3)": npy_declaring("(1000000, 1000000, 3)"),
        "shape (2**62,)": npy_declaring(f"({2**62},)"),
        "shape (-1, 3)": npy_declaring("(-1, 3)"),
        "shape not a tuple": npy_declaring("'huge'"),
        "header dict is code": npy_declaring("__import__('os').getpid()"),
        "header length lies": b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f4'",
        "version 9.9": b"\x93NUMPY\x09\x09" + npy_declaring("(3,)")[8:],
        "object dtype": npy_declaring(f"({v}, 3)", descr="|O"),
        "pickled object array": npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
        "structured dtype": npy(np.zeros((v,), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])),
        "unicode dtype": npy(np.full((v, 3), "x")),
        "complex dtype": npy(np.zeros((v, 3), np.complex64)),
        "big-endian f8": npy(ref.template.astype(">f8")),
        "fortran order": npy(np.asfortranarray(ref.template)),
        "NaN template": npy(np.where(np.arange(v * 3).reshape(v, 3) == 5, np.nan, ref.template)),
        "inf template": npy(np.full((v, 3), np.inf, np.float32)),
        "float32 max template": npy(np.full((v, 3), np.finfo(np.float32).max, np.float32)),
        "scalar": npy(np.float32(1.0)),
        "rank 4": npy(np.zeros((1, 1, v, 3), np.float32)),
        "wrong vertex count": npy(np.zeros((v + 1, 3), np.float32)),
        "empty (0, 3)": npy(np.zeros((0, 3), np.float32)),
        "truncated data": npy(ref.template)[:-40],
        "wav as npy": audio,
        "empty file": b"",
    }
    legitimate = ("big-endian f8", "fortran order", "float32 max template")  # unusual but valid templates
    cases = [Hostile(f"animate template: {k}", files={"audio": ("a.wav", audio), "template": ("t.npy", b)},
                     data={"style_id": "S01"}, expect_4xx=k not in legitimate) for k, b in bad.items()]  # fmt: skip
    json_max = {"audio": ("a.wav", audio), "template": ("t.npy", bad["float32 max template"])}
    cases.append(Hostile("animate format=json, float32-max template (non-finite motion?)", files=json_max,
                         data={"style_id": "S01", "format": "json"}, expect_4xx=False))  # fmt: skip
    clip, verts = wav(ref.audio), ref.vertices  # (T, V, 3)
    one_nan = verts.copy()
    one_nan[len(verts) // 2, 0, 0] = np.nan
    motions = {
        **bad,
        "NaN motion": npy(one_nan),
        "inf motion": npy(np.full_like(verts, np.inf)),
        "motion rank 1": npy(verts.ravel()),
        "motion of 2 frames": npy(verts[:2]),
        "motion twice as long as the audio": npy(np.concatenate([verts, verts])),
    }
    for k, b in motions.items():
        files = {"audio": ("r.wav", clip), "motion": ("m.npy", b), "template": ("t.npy", npy(ref.template))}
        cases.append(Hostile(f"styles motion: {k}", path="/v1/styles", files=files, params={"wait_s": 0}))
    return cases


def _form_cases(svc: Service) -> list[Hostile]:
    """Form fields: unknown, huge, too many, out of range, options the method does not take."""
    audio = ("a.wav", wav(svc.reference.audio[:32000]))
    fields = {
        "unknown field": {"style_id": "S01", "frobnicate": "1"},
        "format=xml": {"style_id": "S01", "format": "xml"},
        "preview=maybe": {"style_id": "S01", "preview": "maybe"},
        "emotion (faceformer takes none)": {"style_id": "S01", "emotion": "happy"},
        "emotion=Robert'); DROP TABLE": {"style_id": "S01", "emotion": "Robert'); DROP TABLE keys;--"},
        "intensity=2": {"style_id": "S01", "intensity": "2"},
        "intensity=nan": {"style_id": "S01", "intensity": "nan"},
        "temperature=inf": {"style_id": "S01", "temperature": "inf", "sample": "true"},
        "temperature=-1": {"style_id": "S01", "temperature": "-1"},
        "seed=2**64": {"style_id": "S01", "seed": str(2**64), "sample": "true"},
        "seed=-1": {"style_id": "S01", "seed": "-1"},
        "sample=true": {"style_id": "S01", "sample": "true"},
        "style_id 1 MB": {"style_id": "S" * 2**20},
        "style_id 3 MB": {"style_id": "S" * 3 * 2**20},
    }
    cases = [Hostile(f"animate form: {k}", files={"audio": audio}, data=d) for k, d in fields.items()]
    many = [("x", "1")] * 3000
    cases.append(Hostile("animate form: 3000 fields", files={"audio": audio}, data=many))
    cases.append(Hostile("animate form: 1500 files", files=[("audio", audio)] * 1500))
    cases.append(Hostile("animate form: no audio", files={"template": ("t.npy", npy(svc.reference.template))}))
    cases.append(Hostile("animate form: audio as a plain field", data={"audio": "not a file", "style_id": "S01"}))
    ref = svc.reference
    files = {"audio": ("r.wav", wav(ref.audio)), "motion": ("m.npy", npy(ref.vertices))}
    for k, d, p in (("name 1 MB", {"name": "n" * 2**20}, {}), ("source=expression", {"source": "expression"}, {}),
                    ("wait_s=-1", {}, {"wait_s": "-1"}), ("wait_s=inf", {}, {"wait_s": "inf"}),
                    ("wait_s=nan", {}, {"wait_s": "nan"}), ("wait_s=1e309", {}, {"wait_s": "1e309"})):  # fmt: skip
        cases.append(Hostile(f"styles form: {k}", path="/v1/styles", files=files, data=d, params=p))
    # A valid request but for the upload's name (which the service never uses): must animate.
    filename = {"audio": ("../../../etc/passwd\x00.wav", audio[1]), "template": ("t.npy", npy(svc.reference.template))}
    cases.append(Hostile("animate: traversal in the upload's filename", files=filename, data={"style_id": "S01"},
                         expect_4xx=False, must_succeed=True))  # fmt: skip
    return cases


def _style_id_cases(svc: Service) -> list[Hostile]:
    """Traversal, NUL and junk in style ids (path and form field) and weighted-mix abuse."""
    audio = ("a.wav", wav(svc.reference.audio[:32000]))
    mix_of_all = ",".join(f"S{i:02d}:1" for i in range(1, 9))  # legitimate if the method mixes styles
    specs = [mix_of_all, "../../etc/passwd", "..", "%2e%2e", "%2e%2e%2fstyles", "a\x00b", "S01\x00", "sty_" + "0" * 24,
             "sty_../../x", "S01/../S02", "\u202eS01", "S01:1e308,S02:-1", "S01:1e308,S02:1e308", "S01:nan,S02:1",
             "S01:inf", "S01:-inf,S02:1", "S01:0,S02:0", "S01:1,S01:1", ":1", ",", "S01:", "S01:1:2", "S01:0x10",
             "S01:1," * 5000, ",".join(f"s{i}:1" for i in range(3000)),
             "S01:" + "9" * 5000, " " * 1000, "S01;S02", "*", "S0%", "$(id)"]  # fmt: skip
    cases = [Hostile(f"animate style_id {s[:40]!r}", files={"audio": audio}, data={"style_id": s},
                     expect_4xx=s != mix_of_all) for s in specs]  # fmt: skip
    paths = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e", "a%00b", "%00", "..%00", "%252e%252e",
             "x" * 10_000, "%ff%fe", "sty_" + "f" * 24, "S01", "%E2%80%AE"]  # fmt: skip
    for p in paths:
        for method in ("GET", "DELETE"):
            cases.append(Hostile(f"{method} /v1/styles/{p[:40]}", method=method, path=f"/v1/styles/{p}"))
    auth = {"Authorization": f"Bearer {svc.tokens['alice']}"}
    for p in ("/v1/styles/../../etc/passwd", "/v1/styles/../styles", "/v1/styles/./S01", "/v1/../v1/info",
              "/v1/styles/a/../../b"):  # fmt: skip
        hostile = "passwd" in p or p.endswith("/b") or p.endswith("S01")
        cases.append(Hostile(f"raw GET {p}", raw=_request("GET", p, auth), expect_4xx=hostile))
    return cases


def _auth_cases(svc: Service) -> list[Hostile]:
    """Absent, malformed, unknown, revoked and oversized keys on every /v1 route."""
    token = svc.tokens["alice"]
    forged = token[:-5] + ("AAAAA" if not token.endswith("AAAAA") else "BBBBB")
    variants = {
        "no key": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic auth": {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        "malformed token": {"Authorization": "Bearer tmk_nothex_short"},
        "forged secret": {"Authorization": f"Bearer {forged}"},
        "unknown key id": {"X-API-Key": "tmk_0123456789abcdef_" + "x" * 43},
        "revoked key": {"Authorization": f"Bearer {svc.tokens['mallory']}"},
        "8 KB token": {"Authorization": "Bearer " + "t" * 8192},
        "bearer + X-API-Key disagree": {"Authorization": f"Bearer {token}", "X-API-Key": forged},
        "token with a newline": {"Authorization": f"Bearer {token[:10]}\\n{token[10:]}"},
    }
    routes = [("GET", "/v1/info"), ("GET", "/v1/styles"), ("GET", "/v1/styles/S01"), ("DELETE", "/v1/styles/S01"),
              ("POST", "/v1/animate"), ("POST", "/v1/styles")]  # fmt: skip
    cases = []
    for k, headers in variants.items():
        for method, path in routes:
            files = {"audio": ("a.wav", b"RIFF")} if method == "POST" else None
            cases.append(Hostile(f"auth {k}: {method} {path}", method=method, path=path, who=None, headers=headers,
                                 files=files))  # fmt: skip
    raw_key = {"Authorization": "Bearer tmk_\xff\xfe\x00"}
    cases.append(Hostile("auth: non-ASCII, NUL in the key (raw)", raw=_request("GET", "/v1/info", raw_key),
                         protocol=True))  # fmt: skip
    return cases


def _listing_cases(svc: Service) -> list[Hostile]:
    """Cursor garbage and ``limit`` out of range; methods and routes that do not exist."""
    import base64

    cursors = ["garbage!", "", "=" * 10, base64.urlsafe_b64encode(b"\xff" * 30).decode(),
               base64.urlsafe_b64encode(b'{"after": 1e999}').decode(), base64.urlsafe_b64encode(b"[]").decode(),
               base64.urlsafe_b64encode(b'{"t": "bob", "after": "sty_"}').decode(), "c" * 512, "c" * 513,
               "\x00", "%00", "\u2603" * 100, "../../"]  # fmt: skip
    cases = [Hostile(f"list cursor {c[:30]!r}", method="GET", path="/v1/styles", params={"cursor": c},
                     expect_4xx=c != "") for c in cursors]  # fmt: skip
    for limit in ("0", "-1", "1001", str(10**30), "abc", "1.5", "", "nan", "1e3"):
        cases.append(Hostile(f"list limit={limit!r}", method="GET", path="/v1/styles", params={"limit": limit}))
    for method, path in (("PUT", "/v1/styles"), ("PATCH", "/v1/styles/S01"), ("POST", "/healthz"),
                         ("GET", "/v1/animate"), ("DELETE", "/v1/styles"), ("GET", "/v2/info"),
                         ("GET", "/v1/info/../../healthz%00"), ("TRACE", "/v1/info")):  # fmt: skip
        cases.append(Hostile(f"{method} {path}", method=method, path=path))
    long_query = {"q": "x" * 100_000}  # a request line over h11's 16 KiB
    cases.append(Hostile("list, 100 KB query string", method="GET", path="/v1/styles", params=long_query,
                         protocol=True))  # fmt: skip
    return cases


def _body_cases(svc: Service) -> list[Hostile]:
    """Bodies: chunked over the limit, Content-Length lies, boundaries missing or wrong."""
    from urllib3 import encode_multipart_formdata

    auth = {"Authorization": f"Bearer {svc.tokens['alice']}"}
    fields = {"audio": ("a.wav", wav(svc.reference.audio[:32000])), "template": ("t.npy", npy(svc.reference.template))}
    form, ctype = encode_multipart_formdata({**fields, "style_id": "S01"})  # a valid animate request

    def chunks(total: int, size: int = 2**16) -> Iterator[bytes]:
        head = form[: form.index(b"RIFF")]
        yield head
        for _ in range(total // size):
            yield b"\0" * size

    cases = [
        Hostile("chunked multipart 20 MiB (no Content-Length)", body=chunks(20 * 2**20),
                headers={"Content-Type": ctype}),
        Hostile("chunked 14 MiB to /v1/styles", path="/v1/styles", body=chunks(14 * 2**20),
                headers={"Content-Type": ctype}),
        Hostile("chunked valid animate", body=iter([form[:1000], form[1000:]]), headers={"Content-Type": ctype},
                expect_4xx=False, must_succeed=True),
        Hostile("multipart without boundary", body=form, headers={"Content-Type": "multipart/form-data"}),
        Hostile("multipart, wrong boundary", body=form, headers={"Content-Type": "multipart/form-data; boundary=zz"}),
        Hostile("multipart boundary 5000 chars", body=form, headers={"Content-Type": "multipart/form-data; boundary="
                + "b" * 5000}),  # fmt: skip
        Hostile("multipart, body cut after the first part", body=form[: len(form) // 2],
                headers={"Content-Type": ctype}),
        Hostile("json body", body=b'{"audio": "x", "style_id": "S01"}', headers={"Content-Type": "application/json"}),
        Hostile("text/plain body", body=b"audio=x", headers={"Content-Type": "text/plain"}),
        Hostile("no content type", body=form, headers={"Content-Type": ""}),
        Hostile("urlencoded form", data={"audio": "x", "style_id": "S01"}),
    ]
    lies = {
        "Content-Length larger than the body": _request("POST", "/v1/animate", {**auth, "Content-Type": ctype,
                                                        "Content-Length": str(len(form) + 5000)}, form),
        "Content-Length smaller than the body": _request("POST", "/v1/animate", {**auth, "Content-Type": ctype,
                                                         "Content-Length": "100"}, form),
        "Content-Length over the limit, tiny body": _request("POST", "/v1/animate", {**auth, "Content-Type": ctype,
                                                             "Content-Length": str(MAX_BODY + 1)}, form[:100]),
        "Content-Length 10**30": _request("POST", "/v1/animate", {**auth, "Content-Length": str(10**30)}, b"x"),
        "Content-Length -1": _request("POST", "/v1/animate", {**auth, "Content-Length": "-1"}, b"x"),
        "Content-Length abc": _request("POST", "/v1/animate", {**auth, "Content-Length": "abc"}, b"x"),
        "two Content-Lengths": _request("POST", "/v1/animate", {**auth, "Content-Length": "1"}, b"")[:-2]
        + b"Content-Length: 2\r\n\r\nxx",
        "chunked with a bad chunk size": _request("POST", "/v1/animate", {**auth, "Content-Type": ctype,
                                                  "Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
        "chunked and Content-Length": _request("POST", "/v1/animate", {**auth, "Content-Type": ctype,
                                               "Transfer-Encoding": "chunked", "Content-Length": "5"}, b"0\r\n\r\n"),
    }  # fmt: skip
    cases += [Hostile(f"raw: {k}", raw=v, protocol=True, half_close="larger" in k) for k, v in lies.items()]
    return cases


# ------------------------------------------------------------------------------ DELETE racing POST


def _race_phase(svc: Service, out: Outcome) -> None:
    """A reference clip POSTed and DELETEd at the same moment, ``RACE_ROUNDS`` times (threads
    released together by a barrier): each answer must be a 2xx or a 4xx in the schema."""
    import requests

    ref = svc.reference
    files = {"audio": ("r.wav", wav(ref.audio)), "motion": ("m.npy", npy(ref.vertices)),
             "template": ("t.npy", npy(ref.template))}  # fmt: skip
    auth = {"Authorization": f"Bearer {svc.tokens['racer']}"}
    first = requests.post(f"{svc.url}/v1/styles", headers=auth, files=files, params={"wait_s": 0}, timeout=120)
    out.record("race: first POST", first.status_code, first.content, expect_4xx=False, phase="race")
    assert first.status_code in (200, 201, 202), f"the race's reference clip was refused: {first.text[:300]}"
    sid = first.json()["style_id"]
    for i in range(RACE_ROUNDS):
        barrier = threading.Barrier(2)

        def post(i: int = i, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            r = requests.post(f"{svc.url}/v1/styles", headers=auth, files=files, params={"wait_s": 0.5}, timeout=120)
            out.record(f"race {i}: POST", r.status_code, r.content, expect_4xx=False, phase="race")

        def delete(i: int = i, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for _ in range(i % 3):  # land at different points of the POST: 0-2 status reads first
                r = requests.get(f"{svc.url}/v1/styles/{sid}", headers=auth, timeout=120)
                out.record(f"race {i}: GET", r.status_code, r.content, expect_4xx=False, phase="race")
            r = requests.delete(f"{svc.url}/v1/styles/{sid}", headers=auth, timeout=120)
            out.record(f"race {i}: DELETE", r.status_code, r.content, expect_4xx=False, phase="race")

        threads = [threading.Thread(target=post), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
