"""The style service under load: locust, headless, in a subprocess (its gevent patches stay
out of this process and its Ray), :data:`USERS` users for :data:`DURATION_S` seconds against
the loopback service. Valid ``POST /v1/animate`` requests (1-3 s of speech in a stored,
ready style or as a training speaker) run concurrently with a stream of hostile requests
mixed in. Every valid request must answer 200, every hostile one a 4xx in the error schema,
``/healthz`` 200 throughout; the latencies of the valid requests (p50/p95) and the counts are
printed and written to ``load_summary.json`` under the test's tmp dir. One keyed Serve
application of a debug FaceFormer on the session's loopback Ray (slow)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service_helpers import HealthPoller, Service, npy, npy_declaring, start_service, wav, wav_declaring

USERS = 8
DURATION_S = 20
MIN_VALID = 50  # fewer valid answers than this would measure nothing (a stalled run)

# The load generator: each simulated user picks a task by weight; every request appends one
# JSON line (kind, name, status, ms, ok, why) to $TALKMESH_LOAD_LOG. The inputs (key, style
# id, uploads) come from $TALKMESH_LOAD_CFG, written by the test.
LOCUSTFILE = textwrap.dedent('''
    import json
    import os
    import random
    import threading

    from locust import HttpUser, between, task

    CFG = json.load(open(os.environ["TALKMESH_LOAD_CFG"]))
    FILES = {k: open(v, "rb").read() for k, v in CFG["files"].items()}
    LOG = open(os.environ["TALKMESH_LOAD_LOG"], "a", buffering=1)
    LOCK = threading.Lock()
    ERROR_KEYS = {"code", "message", "field"}


    def in_schema(body):
        try:
            doc = json.loads(body)
        except ValueError:
            return False
        return isinstance(doc, dict) and set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS


    class Client(HttpUser):
        wait_time = between(0.0, 0.1)

        def _post(self, kind, name, files, data, headers, ok_if):
            with self.client.post("/v1/animate", files=files, data=data, headers=headers, name=name,
                                  catch_response=True, timeout=120) as r:
                ok, why = ok_if(r)
                if ok:
                    r.success()
                else:
                    r.failure(why)
                line = {"kind": kind, "name": name, "status": r.status_code,
                        "ms": r.request_meta["response_time"], "ok": ok, "why": why}
                with LOCK:
                    LOG.write(json.dumps(line) + "\\n")

        @task(3)
        def animate_stored_style(self):
            clip = random.choice(CFG["clips"])
            files = {"audio": ("a.wav", FILES[clip])}
            self._post("valid", "valid: stored style", files, {"style_id": CFG["style_id"]}, CFG["auth"], valid)

        @task(3)
        def animate_training_speaker(self):
            clip = random.choice(CFG["clips"])
            files = {"audio": ("a.wav", FILES[clip]), "template": ("t.npy", FILES["template"])}
            data = {"style_id": random.choice(CFG["speakers"]), "format": random.choice(["npz", "npy", "json"])}
            self._post("valid", "valid: training speaker", files, data, CFG["auth"], valid)

        @task(4)
        def hostile(self):
            case = random.choice(CFG["hostile"])
            files = {k: (k, FILES[v]) for k, v in case["files"].items()}
            headers = CFG["auth"] if case["auth"] else {}
            self._post("hostile", "hostile: " + case["name"], files, case["data"], headers, refused)


    def valid(r):
        return r.status_code == 200, None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


    def refused(r):
        if not 400 <= r.status_code < 500:
            return False, f"{r.status_code} {r.text[:200]}"
        return (True, None) if in_schema(r.content) else (False, f"off the error schema: {r.text[:200]}")
''')


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory) -> Any:
    from ray import serve

    svc = start_service(serve_url, tmp_path_factory.mktemp("load"), "load", ("alice",))
    yield svc
    serve.delete("load")


def _inputs(svc: Service, root: Path) -> dict[str, Any]:
    """Store the reference as a style (ready), write the uploads and the locust config."""
    import requests

    ref, auth = svc.reference, {"Authorization": f"Bearer {svc.tokens['alice']}"}
    files = {"audio": ("r.wav", wav(ref.audio)), "motion": ("m.npy", npy(ref.vertices))}
    files["template"] = ("t.npy", npy(ref.template))
    r = requests.post(f"{svc.url}/v1/styles", headers=auth, files=files, params={"wait_s": 120}, timeout=180)
    assert r.status_code in (200, 201) and r.json()["status"] == "ready", r.text
    v = ref.template.shape[0]
    uploads = {f"clip{s}s": wav(ref.audio[: s * 16000]) for s in (1, 2, 3)}  # 1-3 s of speech
    uploads["template"] = npy(ref.template)  # (V, 3): a training speaker's request brings the face
    uploads.update({
        "wav_655khz": wav_declaring(655_360, 8, 16, 655_360 * 30, b"\0" * 170_000),
        "npy_huge": npy_declaring("(1000000, 1000000, 3)"),
        "npy_nan": npy(np.full((v, 3), np.nan, np.float32)),
        "npy_pickle": npy(np.array([{"x": 1}], dtype=object), allow_pickle=True),
        "riff_cut": uploads["clip2s"][:1000],
    })  # fmt: skip
    hostile = [
        {"name": "655 kHz wav", "files": {"audio": "wav_655khz"}, "data": {"style_id": "S01"}, "auth": True},
        {"name": "truncated riff", "files": {"audio": "riff_cut"}, "data": {"style_id": "S01"}, "auth": True},
        {"name": "huge npy template", "files": {"audio": "clip1s", "template": "npy_huge"}, "data": {}, "auth": True},
        {"name": "NaN template", "files": {"audio": "clip1s", "template": "npy_nan"}, "data": {}, "auth": True},
        {"name": "pickled template", "files": {"audio": "clip1s", "template": "npy_pickle"}, "data": {},
         "auth": True},
        {"name": "traversal style", "files": {"audio": "clip1s"}, "data": {"style_id": "../../x"}, "auth": True},
        {"name": "mix abuse", "files": {"audio": "clip1s"}, "data": {"style_id": "S01:1e308,S02:-1"}, "auth": True},
        {"name": "unknown style", "files": {"audio": "clip1s"}, "data": {"style_id": "sty_" + "0" * 24},
         "auth": True},
        {"name": "no key", "files": {"audio": "clip1s"}, "data": {"style_id": "S01"}, "auth": False},
    ]  # fmt: skip
    paths = {}
    for name, data in uploads.items():
        paths[name] = str(root / f"{name}.bin")
        Path(paths[name]).write_bytes(data)
    return {"auth": auth, "style_id": r.json()["style_id"], "speakers": svc.train_subjects[:3],
            "clips": ["clip1s", "clip2s", "clip3s"], "files": paths, "hostile": hostile}  # fmt: skip


def _run_locust(svc: Service, cfg: dict[str, Any], root: Path) -> tuple[list[dict[str, Any]], float]:
    """locust --headless in a subprocess; (one record per request, wall seconds)."""
    (root / "locustfile.py").write_text(LOCUSTFILE)
    (root / "cfg.json").write_text(json.dumps(cfg))
    log = root / "requests.jsonl"
    env = {**os.environ, "TALKMESH_LOAD_CFG": str(root / "cfg.json"), "TALKMESH_LOAD_LOG": str(log)}
    cmd = [sys.executable, "-m", "locust", "-f", str(root / "locustfile.py"), "--headless", "--host", svc.url,
           "-u", str(USERS), "-r", str(USERS), "-t", f"{DURATION_S}s", "--stop-timeout", "30", "--only-summary",
           "--csv", str(root / "locust"), "--loglevel", "WARNING"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=DURATION_S + 120)
    wall = time.perf_counter() - t0
    assert done.returncode in (0, 1), f"locust failed ({done.returncode}):\n{done.stderr[-3000:]}"  # 1: failures
    crashed = (root / "locust_exceptions.csv").read_text().splitlines()[1:]  # the locustfile's own errors
    assert not crashed, "\n".join(crashed[:20])
    return [json.loads(line) for line in log.read_text().splitlines()], wall


def _summary(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Counts, statuses and valid-request latencies (ms) of a run."""
    valid = [r for r in records if r["kind"] == "valid"]
    ms = np.array([r["ms"] for r in valid], dtype=float)
    by_name = collections.defaultdict(collections.Counter)
    for r in records:
        by_name[r["name"]][str(r["status"])] += 1
    return {
        "users": USERS,
        "duration_s": DURATION_S,
        "wall_s": round(wall, 1),
        "requests": len(records),
        "valid": len(valid),
        "hostile": len(records) - len(valid),
        "valid_rps": round(len(valid) / DURATION_S, 2),
        "valid_p50_ms": round(float(np.percentile(ms, 50)), 1) if ms.size else None,
        "valid_p95_ms": round(float(np.percentile(ms, 95)), 1) if ms.size else None,
        "valid_max_ms": round(float(ms.max()), 1) if ms.size else None,
        "statuses": {k: dict(v) for k, v in sorted(by_name.items())},
        "failures": [f"{r['name']}: {r['why']}" for r in records if not r["ok"]][:50],
    }


@pytest.mark.slow
def test_concurrent_valid_animations_all_succeed_among_hostile_requests(service, tmp_path):
    cfg = _inputs(service, tmp_path)
    health = HealthPoller(service.url)
    health.start()
    try:
        records, wall = _run_locust(service, cfg, tmp_path)
    finally:
        polled = health.stop()
    summary = {**_summary(records, wall), "healthz": polled}
    out = tmp_path / "load_summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nload: {json.dumps({k: v for k, v in summary.items() if k != 'failures'})}\nsummary: {out}")
    failures = [r for r in records if not r["ok"]]
    assert summary["valid"] >= MIN_VALID, summary
    assert not [r for r in failures if r["kind"] == "valid"], summary["failures"]
    assert not failures, summary["failures"]  # hostile requests: each a 4xx in the error schema
    assert set(polled["statuses"]) == {"200"}, polled
