"""The style service: upload validation and the style store (fast, no Ray), and the real
Ray Serve application answering HTTP on 127.0.0.1 with a model from a real MLflow registry
(slow: one shared local Ray, cold ``serve.run`` ~10 s)."""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.config import ConfigError, DataConfig
from talkmesh.methods.base import make_style_state
from talkmesh.methods.registry import available_methods
from talkmesh.serving.inputs import (
    InputError,
    parse_style_spec,
    read_array,
    read_audio,
    reference_motion,
    template_array,
)
from talkmesh.serving.store import StyleNotFound, StyleStore, style_id_for

V = 30
FACTS = {"num_vertices": V, "motion": "vertices", "fps": 25.0}


def _wav(seconds: float, rate: int = 22050, stereo: bool = False) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    if stereo:
        x = np.stack([x, x], axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ------------------------------------------------------------------------------ inputs


def test_read_audio_resamples_any_rate_and_channels():
    a = read_audio(_wav(1.5, 44100, stereo=True), "audio", max_seconds=10)
    assert a.dtype == np.float32 and a.ndim == 1
    assert abs(a.shape[0] - 24000) <= 2  # 1.5 s at 16 kHz


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (b"", 400, "empty"),
        (b"this is not audio at all" * 10, 400, "not a readable audio file"),
        (_npy(np.zeros(100, np.float32)), 400, ".npy"),
        (_wav(0.05), 422, "at least"),
        (_wav(4.0), 413, "at most 3"),
    ],
)
def test_read_audio_errors_name_the_field(data, status, needle):
    with pytest.raises(InputError) as e:
        read_audio(data, "audio", max_seconds=3)
    assert e.value.status == status and e.value.field == "audio"
    assert needle in str(e.value) and str(e.value).startswith("audio: ")


def test_read_array_never_unpickles():
    obj = np.array([{"x": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    with pytest.raises(InputError, match="not a readable .npy") as e:
        read_array(buf.getvalue(), "motion")
    assert e.value.status == 400
    with pytest.raises(InputError) as e:
        read_array(pickle.dumps(np.zeros(3)), "motion")
    assert e.value.status == 400
    with pytest.raises(InputError, match="non-finite") as e:
        read_array(_npy(np.array([1.0, np.nan])), "motion")
    assert e.value.status == 422
    assert read_array(_npy(np.ones((2, 3), np.float64)), "motion").dtype == np.float32


def test_reference_motion_shapes():
    kw = {"fps": 25.0, "min_seconds": 1.0, "max_seconds": 10.0}
    v = np.zeros((50, V, 3), np.float32)
    assert reference_motion(v, FACTS, **kw)["vertices"].shape == (50, V, 3)
    assert reference_motion(v.reshape(50, -1), FACTS, **kw)["vertices"].shape == (50, V, 3)
    with pytest.raises(InputError, match=rf"expected \(T, {V}, 3\)") as e:
        reference_motion(np.zeros((50, V + 1, 3), np.float32), FACTS, **kw)
    assert e.value.status == 422
    with pytest.raises(InputError, match="at least 1") as e:
        reference_motion(v[:10], FACTS, **kw)
    with pytest.raises(InputError, match="at most 10") as e:
        reference_motion(np.zeros((300, V, 3), np.float32), FACTS, **kw)
    assert e.value.status == 413
    flame = {"num_vertices": V, "motion": "params"}
    out = reference_motion(np.zeros((50, 56), np.float32), flame, **kw)
    assert out["params"].shape == (50, 53) and out["head_pose"].shape == (50, 3)
    with pytest.raises(InputError, match="FLAME parameters"):
        reference_motion(v, flame, **kw)


def test_template_array():
    assert template_array(np.zeros(3 * V, np.float32), FACTS).shape == (V, 3)
    with pytest.raises(InputError, match=rf"\({V}, 3\)"):
        template_array(np.zeros((V, 2), np.float32), FACTS)


def test_parse_style_spec():
    assert parse_style_spec("sty_abc") == [("sty_abc", 1.0)]
    mix = parse_style_spec("a:3, b:1")
    assert [n for n, _ in mix] == ["a", "b"] and mix[0][1] == pytest.approx(0.75)
    for bad, needle in [
        ("", "empty"),
        ("a:x", "not a number"),
        ("a:-1", ">= 0"),
        ("a:0,b:0", "sum to 0"),
        ("a,a", "twice"),
        ("../etc", "not a style id"),
        (",".join(f"s{i}" for i in range(9)), "at most"),
    ]:
        with pytest.raises(InputError, match=needle) as e:
            parse_style_spec(bad)
        assert e.value.status == 422


# ------------------------------------------------------------------------------ store


def test_style_store_is_write_once_and_persistent(tmp_path):
    store = StyleStore(tmp_path / "styles")
    ref = {"audio": np.ones(1600, np.float32), "vertices": np.zeros((5, V, 3), np.float32)}
    sid, created = store.put_reference("faceformer", ref, {"name": "alice"})
    assert created and sid == style_id_for("faceformer", ref) and sid.startswith("sty_")
    again, created2 = store.put_reference("faceformer", ref, {"name": "other label"})
    assert again == sid and not created2 and store.meta(sid)["name"] == "alice"  # untouched
    assert store.put_reference("mimic", ref)[0] != sid  # the method is part of the id
    assert store.status(sid, "faceformer-v1") == {"status": "absent"}

    store.set_status(sid, "faceformer-v1", "pending", started=time.time() - 100)
    assert store.status(sid, "faceformer-v1")["status"] == "pending"
    stale = store.status(sid, "faceformer-v1", stale_after_s=10)
    assert stale["status"] == "failed" and "did not finish" in stale["error"]

    # An adapter writes its ready record (with the summary) before the state: until the state
    # is stored the style reads as pending, then as ready with the record's summary.
    store.set_status(sid, "faceformer-v1", "ready", started=time.time() - 100, summary={"index": 2})
    assert store.status(sid, "faceformer-v1")["status"] == "pending"
    assert store.status(sid, "faceformer-v1", stale_after_s=10)["status"] == "failed"  # the adapter died
    state = make_style_state("faceformer", 1, kind="onehot", index=2, vector=torch.ones(4))
    store.save_state(sid, "faceformer-v1", state)
    ready = store.status(sid, "faceformer-v1")
    assert ready["status"] == "ready" and ready["summary"] == {"index": 2}
    assert store.status(sid, "faceformer-v2") == {"status": "absent"}  # per model version

    reopened = StyleStore(tmp_path / "styles")  # a new process sees the same styles
    loaded = reopened.load_state(sid, "faceformer-v1", "faceformer", 1)
    assert loaded["index"] == 2 and torch.equal(loaded["vector"], torch.ones(4))
    np.testing.assert_array_equal(reopened.reference(sid)["audio"], ref["audio"])
    assert [m["style_id"] for m in reopened.list()] == [sid, store.put_reference("mimic", ref)[0]]

    reopened.delete(sid)
    assert not store.exists(sid)
    for call in (lambda: store.meta(sid), lambda: store.delete(sid), lambda: store.status("../x", "k")):
        with pytest.raises(StyleNotFound):
            call()
    assert not [p for p in (tmp_path / "styles").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_serve_config_is_strict():
    from talkmesh.serving.app import load_serve_config

    assert load_serve_config({"method": "faceformer", "wait_s": 1}).wait_s == 1.0
    with pytest.raises(ConfigError, match="wiat_s"):
        load_serve_config({"wiat_s": 1})
    with pytest.raises(ConfigError, match="preview_size"):
        load_serve_config({"preview_size": 4})
    assert load_serve_config({"preview_view": "three_quarter"}).preview_view == "three_quarter"
    with pytest.raises(ConfigError, match="preview_view: expected one of 'front'"):
        load_serve_config({"preview_view": "top"})


def test_build_app_is_a_builder_serve_deploy_accepts(tmp_path):
    """`serve deploy` imports ``talkmesh.serving.app:build_app`` and calls it with the config
    file's args through Serve's own check (a builder takes exactly one parameter)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from talkmesh.serving.app import build_app

    args = {"method": "faceformer", "style_dir": str(tmp_path / "styles"), "service_db": f"sqlite:///{tmp_path}/s.db"}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert type(app).__name__ == "Application"


# ------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory):
    """A debug FaceFormer registered as talkmesh-faceformer@champion in a real MLflow
    SQLite store, served by the real Serve app on 127.0.0.1."""
    from ray import serve

    from talkmesh.data import open_corpus
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.ops import tracking
    from talkmesh.serving.app import build_app

    root = tmp_path_factory.mktemp("serve")
    corpus = open_corpus(DataConfig(format="synthetic", root=str(generate_corpus(root / "synth", "small"))))
    facts = DataFacts.from_corpus(corpus)
    torch.manual_seed(0)
    method = build_method("faceformer", None, facts, preset="debug")
    method.set_templates({s: corpus.template(s) for s in facts.train_subjects})  # as a trained model carries them
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = tracking.start_run("talkmesh-faceformer", "serve-test", uri=uri)
    version = tracking.register_model("faceformer", run_id, method, metrics={"val/lve": 1.0}, uri=uri)
    tracking.set_alias("faceformer", "champion", version, uri=uri)
    tracking.end_run(run_id, uri=uri)

    faces = corpus.face_model().faces
    faces = faces() if callable(faces) else faces
    np.save(root / "faces.npy", np.asarray(faces, dtype=np.int64))
    args = {
        "method": "faceformer",
        "tracking_uri": uri,
        "style_dir": str(root / "styles"),
        "service_db": f"sqlite:///{root / 'service.db'}",
        "dev_mode": True,  # keyless from loopback (tests/test_service_tenancy.py uses keys)
        "faces": str(root / "faces.npy"),
        "max_audio_seconds": 12.0,
        "max_reference_seconds": 12.0,
        "max_upload_mb": 4.0,
        "wait_s": 30.0,
        "model_num_cpus": 0.0,
        "torch_threads": 1,
        "preview_size": 96,
    }
    serve.run(build_app(args), name="talkmesh", route_prefix="/")
    ref = corpus.reference_clip(corpus.subjects("test-B")[0], 6.0)
    yield {
        "url": serve_url,
        "corpus": corpus,
        "facts": facts,
        "reference": ref,
        "args": args,
        "uri": uri,
        "root": root,
        "method": method,
    }
    serve.delete("talkmesh")


def _post_style(url, ref, *, template=True, rate=44100, **extra):
    import requests
    from scipy.signal import resample_poly

    audio = resample_poly(ref.audio, rate // 100, 160).astype(np.float32)  # 16 kHz -> `rate`
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    files = {"audio": ("ref.wav", buf.getvalue()), "motion": ("ref.npy", _npy(ref.vertices))}
    if template:
        files["template"] = ("template.npy", _npy(ref.template))
    return requests.post(f"{url}/v1/styles", files=files, **extra, timeout=120)


@pytest.mark.slow
def test_service_adapts_and_animates(service):
    import requests

    url, ref, facts = service["url"], service["reference"], service["facts"]
    h = requests.get(f"{url}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model_version"] == 1
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/styles", "/v1/animate", "/v1/styles/{style_id}", "/healthz"} <= set(paths)
    r = requests.get(f"{url}/v1/info", timeout=30)
    assert r.headers["X-Talkmesh-Auth"] == "dev-mode"  # keyless from loopback: development mode says so
    info = r.json()
    assert info["tenant"] == "dev" and info["limits"]["max_channels"] == 8
    assert info["num_vertices"] == facts.num_vertices and info["train_subjects"] == list(facts.train_subjects)
    assert info["templates"] == list(facts.train_subjects) and info["default_template"] is True
    assert info["default_style"] == facts.train_subjects[0]  # FaceFormer's default one-hot

    # Audio alone: the default speaker's style on its own face, which the registered model carries.
    alone = requests.post(f"{url}/v1/animate", files={"audio": ("a.wav", _wav(2.0))}, timeout=120)
    assert alone.status_code == 200, alone.text
    default_face = service["corpus"].template(facts.train_subjects[0])
    np.testing.assert_allclose(np.load(io.BytesIO(alone.content))["vertices"][0], default_face, atol=0.05)

    # Adaptation: FaceFormer picks the training one-hot that reconstructs the reference best.
    r = _post_style(url, ref, data={"name": "new speaker"})
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["style_id"]
    assert body["status"] == "ready" and body["summary"]["subject_name"] in facts.train_subjects
    expected = service["method"].adapt({"audio": ref.audio, "vertices": ref.vertices, "template": ref.template})
    assert body["summary"]["index"] == expected["index"]  # the service runs the registered model
    again = _post_style(url, ref)  # idempotent: same clip, same id, nothing recomputed
    assert again.status_code == 200 and again.json()["style_id"] == sid
    st = requests.get(f"{url}/v1/styles/{sid}", timeout=30).json()
    assert st["status"] == "ready" and st["name"] == "new speaker"
    assert sid in [s["style_id"] for s in requests.get(f"{url}/v1/styles", timeout=30).json()["styles"]]
    assert (Path(service["args"]["style_dir"]) / sid / "faceformer-v1.state.pt").is_file()  # persisted

    # Animation at another sample rate; the style's template is used when none is sent.
    files = {"audio": ("a.wav", _wav(3.0, 22050))}
    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid}, timeout=120)
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    frames = service["method"].frames_for_audio(48000)
    assert z["vertices"].shape == (frames, facts.num_vertices, 3) and float(z["fps"]) == facts.fps
    assert r.headers["X-Talkmesh-Frames"] == str(frames) and r.headers["X-Talkmesh-Fps"] == "25"
    np.testing.assert_allclose(z["vertices"][0], ref.template, atol=0.05)  # near the style's template

    # A training speaker by name, vertices as .npy and as JSON; a preview video.
    speaker = facts.train_subjects[1]
    tmpl = ("t.npy", _npy(ref.template))
    r = requests.post(
        f"{url}/v1/animate", files={**files, "template": tmpl}, data={"style_id": speaker, "format": "npy"}, timeout=120
    )
    assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (frames, facts.num_vertices, 3)
    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid, "format": "json"}, timeout=120)
    assert r.status_code == 200 and np.asarray(r.json()["outputs"]["vertices"]).shape == z["vertices"].shape
    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid, "format": "mp4"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"

    # The same motion as glTF: morph targets on the style's template, keyed at the frame times.
    from talkmesh.export import read_glb

    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid, "format": "glb"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "model/gltf-binary" and r.content[:4] == b"glTF"
    (service["root"] / "motion.glb").write_bytes(r.content)
    glb = read_glb(service["root"] / "motion.glb")
    assert glb["faces"] is not None and glb["faces"].shape == np.load(service["args"]["faces"]).shape
    np.testing.assert_allclose(glb["times"], np.arange(frames) / facts.fps, atol=1e-5)
    scale = np.abs(z["vertices"] - ref.template).max()
    assert np.abs(glb["vertices"] - z["vertices"]).max() <= 0.02 * scale + 1e-5  # 32 targets hold this motion


@pytest.mark.slow
def test_service_rejects_bad_input_and_stays_up(service):
    import requests

    url, ref = service["url"], service["reference"]
    wav = ("a.wav", _wav(2.0))

    def animate(files, data=None):
        return requests.post(f"{url}/v1/animate", files=files, data=data or {}, timeout=60)

    cases = [
        (animate({"audio": ("x.wav", b"definitely not audio")}, {"style_id": "S"}), 400, "audio"),
        (animate({"audio": ("x.wav", b"")}), 400, "audio"),
        (animate({"audio": ("long.wav", _wav(13.0))}), 413, "at most 12"),
        (animate({"audio": wav}, {"style_id": "sty_000000000000000000000000"}), 404, "unknown style"),
        (animate({"audio": wav}, {"style_id": "../../etc/passwd"}), 422, "style_id"),
        (animate({"audio": wav}, {"style_id": "sty_a:1,sty_b:1"}), 422, "mixing"),
        (animate({"audio": wav}, {"format": "gif"}), 422, "format"),
        (animate({"audio": wav, "template": ("t.npy", _npy(np.zeros((7, 3))))}), 422, "template"),
        (animate({}, {"style_id": "x"}), 422, "audio"),
        (requests.post(f"{url}/v1/animate", data=b"\x00" * 100, timeout=60), 422, ""),
        (requests.get(f"{url}/v1/styles/sty_unknown", timeout=60), 404, "not found"),
        (requests.delete(f"{url}/v1/styles/sty_unknown", timeout=60), 404, "not found"),
    ]
    bad_motion = ref.vertices[:, :-1]  # one vertex short
    files = {"audio": ("r.wav", _wav(len(ref.vertices) / 25.0)), "motion": ("m.npy", _npy(bad_motion))}
    cases.append((requests.post(f"{url}/v1/styles", files=files, timeout=60), 422, "motion"))
    files = {"audio": ("r.wav", _wav(2.0)), "motion": ("m.npy", _npy(ref.vertices))}  # 6 s of motion, 2 s audio
    cases.append((requests.post(f"{url}/v1/styles", files=files, timeout=60), 422, "synchronised"))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    files = {"audio": ("r.wav", _wav(2.0)), "motion": ("m.npy", pickled.getvalue())}
    cases.append((requests.post(f"{url}/v1/styles", files=files, timeout=60), 400, "motion"))
    big = {"audio": ("r.wav", b"RIFF" + b"\x00" * (5 * 2**20)), "motion": ("m.npy", _npy(ref.vertices))}
    cases.append((requests.post(f"{url}/v1/styles", files=big, timeout=60), 413, "MB"))
    for i, (r, status, needle) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text[:300])
        assert needle in json.dumps(r.json()), (i, r.text[:300])
        body = r.json()  # the one error schema
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, (i, body)
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # still up


@pytest.mark.slow
def test_new_champion_readapts_stored_styles(service):
    """Styles outlive a model version: after a new champion is deployed, a stored style
    is adapted again from its persisted reference on first use."""
    import requests
    from ray import serve

    from talkmesh.ops import tracking
    from talkmesh.serving.app import build_app

    url, ref, uri = service["url"], service["reference"], service["uri"]
    sid = _post_style(url, ref).json()["style_id"]
    run_id = tracking.start_run("talkmesh-faceformer", "serve-test-2", uri=uri)
    version = tracking.register_model("faceformer", run_id, service["method"], uri=uri)
    tracking.set_alias("faceformer", "champion", version, uri=uri)
    tracking.end_run(run_id, uri=uri)
    serve.run(build_app(service["args"]), name="talkmesh", route_prefix="/")  # redeploy: the new champion
    assert requests.get(f"{url}/healthz", timeout=60).json()["model_version"] == version
    assert requests.get(f"{url}/v1/styles/{sid}", timeout=30).json()["status"] == "absent"
    files = {"audio": ("a.wav", _wav(2.0))}
    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid}, timeout=60)
    deadline = time.time() + 60
    while r.status_code == 409 and time.time() < deadline:  # being re-adapted
        time.sleep(0.5)
        r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": sid}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-Talkmesh-Model"] == f"faceformer-v{version}"
    assert requests.get(f"{url}/v1/styles/{sid}", timeout=30).json()["status"] == "ready"


def test_serve_config_file_loads_with_overrides():
    from talkmesh.serving.launch import read_serve_file

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    doc = read_serve_file(path, ["style_dir=/tmp/styles", "wait_s=2"])
    app = doc["applications"][0]
    assert app["import_path"] == "talkmesh.serving.app:build_app"
    assert app["args"]["style_dir"] == "/tmp/styles" and app["args"]["wait_s"] == 2
    assert doc["http_options"]["host"] == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"config.yaml: applications\[0\].args: unknown key.*wiat_s"):
        read_serve_file(path, ["wiat_s=2"])


def test_serve_config_file_sets_backpressure_autoscaling_and_health_checks(tmp_path):
    """serve/config.yaml is a valid Serve deploy config (Ray's own schema), and its deployments
    section (bounded queues, autoscaling, health checks) is what ``talkmesh serve`` applies."""
    from ray.serve.schema import ServeDeploySchema

    from talkmesh.config import yaml_load
    from talkmesh.serving.launch import deployment_sections, read_serve_file

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    ServeDeploySchema.model_validate(yaml_load(path.read_text()))
    opts = deployment_sections(read_serve_file(path)["applications"][0])
    assert set(opts) == {"StyleModel", "Ingress"}
    for name in opts:
        assert opts[name]["max_queued_requests"] >= 1 and opts[name]["health_check_period_s"] > 0
    scaling = opts["StyleModel"]["autoscaling_config"]
    assert scaling["max_replicas"] > scaling["min_replicas"] >= 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("max_queued_requests: 64", "max_queue_requests: 64"))
    match = r"bad.yaml: applications\[0\].deployments.StyleModel: unknown option.*max_queue_requests"
    with pytest.raises(ConfigError, match=match):
        read_serve_file(bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in available_methods() if m != "faceformer"])
def test_service_serves_every_method(service, method):
    """The same service contract for every registered method other than FaceFormer (served by
    the ``service`` fixture), each as its own application next to FaceFormer's: Mimic (vertex
    styles, weighted style mixing), AdaMesh (FLAME parameters, MoLoRA adaptation in the
    background, head pose), DualTalker (one-hot selection from the reference). A method that
    cannot mix styles refuses a mix with a 422."""
    import requests
    from ray import serve

    from talkmesh.data import open_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method, get_method
    from talkmesh.ops import tracking
    from talkmesh.serving.app import build_app

    root, uri = service["root"], service["uri"]
    cls = get_method(method)
    flame = cls.template_input == "shape"  # FLAME parameters in, vertices through the face model
    corpus = open_corpus(
        DataConfig(format="synthetic", root=str(root / "synth"), synthetic_flavour="flame" if flame else "vertex")
    )
    facts = DataFacts.from_corpus(corpus)
    torch.manual_seed(0)
    model = build_method(method, None, facts, preset="debug")
    if not flame:  # a trained vertex model carries its training speakers' templates
        model.set_templates({s: corpus.template(s) for s in facts.train_subjects})
    run_id = tracking.start_run(f"talkmesh-{method}", f"serve-test-{method}", uri=uri)
    version = tracking.register_model(method, run_id, model, uri=uri)
    tracking.set_alias(method, "champion", version, uri=uri)
    tracking.end_run(run_id, uri=uri)
    args = {**service["args"], "method": method, "style_dir": str(root / f"styles-{method}"), "wait_s": 0.0}
    if flame:  # vertices through the corpus's FLAME-structured face model
        steps = {"steps": 3} if method == "adamesh" else {}  # DEEPTalk's adapt has no steps
        args.update(faces="", face_model=str(corpus.root / "face_model.npz"), adapt_options=steps)
    serve.run(build_app(args), name=f"talkmesh-{method}", route_prefix=f"/{method}")
    url = f"{service['url']}/{method}"
    assert requests.get(f"{url}/healthz", timeout=60).json()["method"] == method

    ids = []
    for subject in corpus.subjects("test-B")[:2]:
        ref = corpus.reference_clip(subject, 4.0)
        motion = np.concatenate([ref.params, ref.head_pose], axis=1) if flame else ref.vertices
        files = {"audio": ("r.wav", _wav(len(motion) / facts.fps, 16000)), "motion": ("m.npy", _npy(motion))}
        if not flame:
            files["template"] = ("t.npy", _npy(ref.template))
        r = requests.post(f"{url}/v1/styles", files=files, timeout=120)
        assert r.status_code in (201, 202), r.text  # wait_s=0: answered at once, adapted in the background
        sid = r.json()["style_id"]
        deadline = time.time() + 120
        while (st := requests.get(f"{url}/v1/styles/{sid}", timeout=30).json())["status"] == "pending":
            assert time.time() < deadline
            time.sleep(0.5)
        assert st["status"] == "ready", st
        if method == "deeptalk":  # the selected actor's index (and the emotion's source)
            assert 0 <= st["summary"]["actor_index"] < len(facts.train_subjects), st
        elif cls.conditioning == "onehot":  # adapted by selecting a training speaker's one-hot
            assert st["summary"]["subject_name"] in facts.train_subjects, st
        ids.append(sid)

    files = {"audio": ("a.wav", _wav(2.0))}
    r = requests.post(f"{url}/v1/animate", files=files, data={"style_id": ids[0]}, timeout=120)
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    frames = model.frames_for_audio(32000)
    assert z["vertices"].shape == (frames, facts.num_vertices, 3)
    alone = requests.post(f"{url}/v1/animate", files=files, timeout=120)  # no style, no template
    assert alone.status_code == 200, alone.text
    assert np.load(io.BytesIO(alone.content))["vertices"].shape == z["vertices"].shape
    assert requests.get(f"{url}/v1/info", timeout=30).json()["default_template"] is True
    if flame:
        assert z["params"].shape == (frames, 53)
        assert method == "deeptalk" or z["head_pose"].shape == (frames, 3)  # DEEPTalk predicts no head pose
    if not cls.supports_style_mixing:
        mix = {"style_id": f"{ids[0]}:0.5,{ids[1]}:0.5"}
        refused = requests.post(f"{url}/v1/animate", files=files, data=mix, timeout=120)
        assert refused.status_code == 422 and "mixing" in refused.text, refused.text
    else:  # weighted mixing of two stored styles; the endpoints are the styles themselves
        mixed = requests.post(
            f"{url}/v1/animate", files=files, data={"style_id": f"{ids[0]}:0.5,{ids[1]}:0.5"}, timeout=120
        )
        assert mixed.status_code == 200, mixed.text
        assert np.load(io.BytesIO(mixed.content))["vertices"].shape == z["vertices"].shape
        pure = requests.post(f"{url}/v1/animate", files=files, data={"style_id": f"{ids[0]}:1,{ids[1]}:0"}, timeout=120)
        np.testing.assert_allclose(np.load(io.BytesIO(pure.content))["vertices"], z["vertices"], atol=1e-5)
    serve.delete(f"talkmesh-{method}")
