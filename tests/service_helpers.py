"""Shared pieces of the style service's fuzz and load tests (tests/test_service_fuzz.py,
tests/test_service_load.py): a keyed service of a tiny debug FaceFormer on the session's
loopback Ray, upload builders, the error-schema check, and two watchers that run beside a
test: a ``/healthz`` poller and an RSS sampler of the ingress replica's process; and
``wait_for``, the polling wait of the fault tests (tests/test_train_ray.py, tests/test_sweep_resume.py).

Not a test module (no ``test_`` prefix); the test files import it by name (pytest puts
``tests/`` on ``sys.path``, as it has no ``__init__.py``)."""

from __future__ import annotations

import collections
import dataclasses
import io
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ERROR_KEYS = frozenset({"code", "message", "field"})
MiB = 2**20


@dataclasses.dataclass
class Service:
    """A running keyed style service: its URL, tokens per tenant, the key store, a reference
    clip (audio 16 kHz (S,), vertices (T, V, 3), template (V, 3)) and the training speakers."""

    url: str
    tokens: dict[str, str]
    keys: Any  # talkmesh.serving.tenants.KeyStore
    reference: Any  # talkmesh.data clip with .audio, .vertices, .template
    train_subjects: list[str]
    app_name: str
    model_dir: Path  # the served method directory


def randomize_weights(method: Any, std: float) -> Any:
    """Draw every weight matrix of ``method`` from N(0, std), so that an untrained debug model
    moves (its output layers start at zero); returns ``method``."""
    import torch

    with torch.no_grad():
        for p in method.parameters():
            if p.ndim > 1:
                p.normal_(0.0, std)
    return method


def start_service(
    url: str,
    root: Path,
    app_name: str,
    tenants: tuple[str, ...],
    init_std: float = 0.0,
    templates: bool = False,
    **overrides: Any,
) -> Service:
    """Serve a debug FaceFormer (a local method directory under ``root``) with API keys
    required (``dev_mode`` False) as application ``app_name`` at ``url`` (the session's Serve) on the local
    Ray; one key per tenant. ``init_std`` > 0 draws every weight matrix from N(0, init_std) so
    that the untrained model moves (its output layer starts at zero: the template); with
    ``templates`` the model carries its training speakers' templates. ``overrides`` replace
    entries of the application args."""
    import torch
    from ray import serve

    from talkmesh.config import DataConfig
    from talkmesh.data import open_corpus
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.serving.app import build_app
    from talkmesh.serving.tenants import KeyStore
    from talkmesh.train.checkpoint import save_method

    corpus = open_corpus(DataConfig(format="synthetic", root=str(generate_corpus(root / "synth", "small"))))
    torch.manual_seed(0)
    facts = DataFacts.from_corpus(corpus)
    method = build_method("faceformer", None, facts, preset="debug")
    if init_std > 0:
        randomize_weights(method, init_std)
    if templates:
        method.set_templates({s: corpus.template(s) for s in facts.train_subjects})
    save_method(root / "model", method)
    db = f"sqlite:///{root / 'service.db'}"
    keys = KeyStore(db)
    tokens = {t: keys.create(t, "test")[1] for t in tenants}
    args = {
        "method": "faceformer",
        "model": str(root / "model"),
        "style_dir": str(root / "styles"),
        "service_db": db,
        "dev_mode": False,
        "max_audio_seconds": 12.0,
        "max_reference_seconds": 12.0,
        "max_upload_mb": 4.0,
        "wait_s": 60.0,
        "model_num_cpus": 0.0,
        "torch_threads": 1,
        **overrides,
    }
    serve.run(build_app(args), name=app_name, route_prefix="/")
    ref = corpus.reference_clip(corpus.subjects("test-B")[0], 4.0)
    return Service(url, tokens, keys, ref, list(facts.train_subjects), app_name, root / "model")


def wav(audio: np.ndarray, rate: int = 16000) -> bytes:
    """``audio`` (S,) or (S, C) as a float WAV file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, dtype=np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    """``arr`` in numpy.save format."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def wav_declaring(rate: int, channels: int, bits: int, frames: int, payload: bytes, tag: int = 1) -> bytes:
    """A RIFF/WAVE file whose header declares ``rate`` Hz, ``channels``, ``bits`` per sample, a
    format ``tag`` (1: PCM) and ``frames`` frames - whatever the ``payload`` after it holds."""
    block = channels * bits // 8
    data_size = min(frames * block, 2**32 - 1)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) % 2**32, block % 2**16, bits)
    riff = min(4 + 8 + len(fmt) + 8 + data_size, 2**32 - 1)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + \
        struct.pack("<I", data_size) + payload  # fmt: skip


def npy_declaring(shape: str, descr: str = "<f4", fortran: str = "False", payload: bytes = b"\0" * 64) -> bytes:
    """An .npy v1.0 file with a hand-written header dict (whatever it declares) and ``payload``."""
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def error_schema_problem(status: int, body: bytes) -> str | None:
    """Why a 4xx body is not exactly ``{"error": {"code", "message", "field"}}`` (None when it is)."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status}: not JSON: {body[:120]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return f"{status}: not the error schema: {str(doc)[:200]}"
    err = doc["error"]
    if set(err) != ERROR_KEYS:
        return f"{status}: error keys {sorted(err)}"
    if not isinstance(err["code"], str) or not isinstance(err["message"], str):
        return f"{status}: code/message not strings: {str(err)[:200]}"
    if err["field"] is not None and not isinstance(err["field"], str):
        return f"{status}: field neither a string nor null: {err['field']!r}"
    return None


def ingress_pid(app_name: str) -> int:
    """The process id of the application's ingress replica: from Ray's state API
    (``list_actors``, the actor whose class name contains "Ingress"), or, when the state API
    is unavailable (it is served by the dashboard, which the session's test Ray leaves out),
    from the process title Ray gives the replica (``ray::ServeReplica:<app>:Ingress``) among
    this process's descendants (the local Ray's workers)."""
    import psutil
    import ray
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        address = ray.get_runtime_context().gcs_address  # this session's Ray (others may run on the machine)
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, detail=True,
                             raise_on_missing_output=False)  # fmt: skip
        pids = [a.pid for a in actors if f"ServeReplica:{app_name}:Ingress" in (a.class_name or "")]
        pids = pids or [a.pid for a in actors if "Ingress" in (a.class_name or "")]
    except (RayStateApiException, ConnectionError):
        title = f"ServeReplica:{app_name}:Ingress"
        pids = [p.pid for p in psutil.Process().children(recursive=True) if title in " ".join(_cmdline(p))]
    if len(pids) != 1:
        raise RuntimeError(f"expected one live Ingress replica of {app_name!r}, found pids {pids}")
    return int(pids[0])


def _cmdline(proc: Any) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:  # exited or not ours
        return []


class RssSampler(threading.Thread):
    """Samples a process's resident set size every ``period_s`` until :meth:`stop`; keeps
    the first, last and largest sample (bytes)."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        import psutil

        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)
        self.period_s = period_s
        self.before = self.peak = self.after = self.proc.memory_info().rss
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the figures in MB: before, peak, after and peak growth."""
        self._halt.set()
        self.join(timeout=5)
        self.after = self.proc.memory_info().rss
        self.peak = max(self.peak, self.after)
        mb = {k: getattr(self, k) / MiB for k in ("before", "peak", "after")}
        return {**{k: round(v, 1) for k, v in mb.items()}, "growth": round(mb["peak"] - mb["before"], 1)}


class HealthPoller(threading.Thread):
    """GETs ``/healthz`` every ``period_s`` until :meth:`stop`; counts the answers by status
    (``"exc:<type>"`` for a request that failed outright) and keeps the slowest latency."""

    def __init__(self, url: str, period_s: float = 0.25, timeout_s: float = 15.0) -> None:
        super().__init__(daemon=True, name="healthz-poller")
        self.url, self.period_s, self.timeout_s = f"{url}/healthz", period_s, timeout_s
        self.statuses: collections.Counter[str] = collections.Counter()
        self.slowest_s = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        import requests

        with requests.Session() as s:
            while not self._halt.is_set():
                t0 = time.perf_counter()
                try:
                    self.statuses[str(s.get(self.url, timeout=self.timeout_s).status_code)] += 1
                except requests.RequestException as e:
                    self.statuses[f"exc:{type(e).__name__}"] += 1
                self.slowest_s = max(self.slowest_s, time.perf_counter() - t0)
                self._halt.wait(self.period_s)

    def stop(self) -> dict[str, Any]:
        """Stop polling; the statuses seen and the slowest answer in seconds."""
        self._halt.set()
        self.join(timeout=self.timeout_s + 5)
        return {"statuses": dict(self.statuses), "slowest_s": round(self.slowest_s, 3)}


def wait_for(
    what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 0.1, show: Callable[[], Any] | None = None
) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); fail after ``timeout_s``
    (with what ``show`` returns then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f": {show()}" if show else ""))
        time.sleep(every_s)
