"""Replica failures of the style service, on the session's local Ray (loopback only).

Two Serve applications (``/a`` and ``/b``) serve the same model directory over one style store
and one service database, as replicas on two nodes would: their adaptation runners share the
job queue and their model replicas cache styles independently.

* A model replica killed (SIGKILL, as when its node dies) while it adapts a style: its worker
  process exits with it, the job is taken over when its lease runs out, and the style becomes
  ready; a style stored before is untouched.
* A style deleted through one application is refused by the other, whose replica had it cached.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from service_helpers import npy, wav
from talkmesh.config import DataConfig

SLOW_STEPS = 1000  # optimisation steps of the slow adaptation: ~4 s on one idle core of this machine
LEASE_S = 6.0  # a busier machine starved the heartbeats of a 2 s lease three times in a row


def _until(predicate, timeout_s: float, what: str, period_s: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` at the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="module")
def pair(serve_url, tmp_path_factory):
    """Applications /a (slow optimising adaptation) and /b (fast selection) of one debug
    FaceFormer directory, sharing ``styles/`` and ``service.db``."""
    from ray import serve

    from talkmesh.data import open_corpus
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.serving.app import build_app
    from talkmesh.train.checkpoint import save_method

    root = tmp_path_factory.mktemp("failover")
    corpus = open_corpus(DataConfig(format="synthetic", root=str(generate_corpus(root / "synth", "small"))))
    torch.manual_seed(0)
    save_method(root / "model", build_method("faceformer", None, DataFacts.from_corpus(corpus), preset="debug"))
    common = {
        "method": "faceformer",
        "model": str(root / "model"),
        "style_dir": str(root / "styles"),
        "service_db": f"sqlite:///{root / 'service.db'}",
        "dev_mode": True,
        "max_audio_seconds": 12.0,
        "max_reference_seconds": 12.0,
        "max_upload_mb": 4.0,
        "adapt_lease_s": LEASE_S,
        "model_num_cpus": 0.0,
        "torch_threads": 1,
    }
    slow = {"mode": "optimize", "steps": SLOW_STEPS}
    serve.run(build_app({**common, "adapt_options": slow, "wait_s": 0.0}), name="failover-a", route_prefix="/a")
    serve.run(build_app({**common, "wait_s": 60.0}), name="failover-b", route_prefix="/b")
    subjects = corpus.subjects("test-B")
    refs = [corpus.reference_clip(s, 4.0) for s in subjects[:2]]
    yield {"url": serve_url, "refs": refs, "db": common["service_db"]}
    for name in ("failover-a", "failover-b"):
        serve.delete(name)


def _post(url: str, ref) -> dict:
    import requests

    files = {"audio": ("r.wav", wav(ref.audio)), "motion": ("m.npy", npy(ref.vertices))}
    files["template"] = ("t.npy", npy(ref.template))
    r = requests.post(f"{url}/v1/styles", files=files, timeout=120)
    assert r.status_code in (200, 201, 202), r.text
    return r.json()


def _animate(url: str, sid: str) -> int:
    import requests

    files = {"audio": ("a.wav", wav(np.random.default_rng(0).normal(0, 0.1, 16000)))}
    return requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid}, timeout=120).status_code


def _model_replicas() -> list:
    """psutil processes of the live StyleModel replicas of both applications (Ray titles a
    replica's process ``ray::ServeReplica:<app>:StyleModel``)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:failover-") and ":StyleModel" in title:
            found.append(p)
    return found


@pytest.mark.slow
def test_a_killed_replica_does_not_lose_its_adaptation(pair):
    import psutil
    import requests

    url = pair["url"]
    before = _post(f"{url}/b", pair["refs"][0])  # adapted by selection, ready at once
    assert before["status"] == "ready", before
    slow = _post(f"{url}/a", pair["refs"][1])
    sid = slow["style_id"]

    def running() -> dict | None:
        st = requests.get(f"{url}/a/v1/styles/{sid}", timeout=30).json()
        return st if st.get("status") == "pending" and st.get("run_s", 0) > 0.5 else None

    _until(running, 120, "the slow adaptation to run")
    replicas = _model_replicas()
    assert len(replicas) == 2, replicas
    workers = [c for p in replicas for c in p.children(recursive=True)]
    assert workers, "no adaptation worker process under the model replicas"
    for p in replicas:  # as when their node dies: no shutdown, no hand-back
        p.kill()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"adaptation workers outlived their replica: {alive}"

    def settled() -> dict | None:
        r = requests.get(f"{url}/a/v1/styles/{sid}", timeout=30)
        st = r.json() if r.status_code == 200 else {}
        return st if st.get("status") in ("ready", "failed") else None

    st = _until(settled, 240, "the style to become ready after the replicas died", period_s=1.0)
    assert st["status"] == "ready", st
    assert st.get("summary"), st
    from talkmesh.serving.jobs import JobQueue

    job = JobQueue(pair["db"]).find(sid, st["model"])
    assert job is not None and job.attempts == 2, job  # run again after the first run's worker died
    assert _animate(f"{url}/a", sid) == 200
    kept = requests.get(f"{url}/b/v1/styles/{before['style_id']}", timeout=30).json()
    assert kept["status"] == "ready", kept  # stored before the failure: untouched
    assert _animate(f"{url}/b", before["style_id"]) == 200


@pytest.mark.slow
def test_a_style_deleted_on_one_application_is_refused_by_the_other(pair):
    import requests

    url = pair["url"]
    sid = _post(f"{url}/b", pair["refs"][0])["style_id"]
    _until(lambda: requests.get(f"{url}/b/v1/styles/{sid}", timeout=30).json()["status"] == "ready", 120, "ready")
    for app in ("a", "b"):  # both model replicas load and cache the style
        assert _animate(f"{url}/{app}", sid) == 200
    assert requests.delete(f"{url}/a/v1/styles/{sid}", timeout=30).status_code == 204
    assert _animate(f"{url}/b", sid) == 404  # b's replica had it cached
    assert requests.get(f"{url}/b/v1/styles/{sid}", timeout=30).status_code == 404
    assert _animate(f"{url}/a", sid) == 404
