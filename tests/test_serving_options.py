"""The service's generate options (``POST /v1/animate``: ``emotion``, ``intensity``,
``emotion_audio``, ``sample``, ``temperature``, ``seed``) and the style ``source`` of
``POST /v1/styles``: the field -> option mapping and its checks (fast, no Ray), the adapt
options in the style id, and a real Serve application of a debug DEEPTalk next to a debug
FaceFormer (which lists no generate options) on 127.0.0.1 (slow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.serving.inputs import ANIMATE_OPTIONS, InputError, animate_options
from talkmesh.serving.store import StyleStore, style_id_for

DEEPTALK_OPTIONS = (
    "sample", "temp_top", "temp_bottom", "logvar_scale", "seed", "audio_emotion", "emotion", "intensity",
)  # fmt: skip


def _wav(seconds: float, rate: int = 16000, hz: float = 220.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ------------------------------------------------------------------------------ fields -> options


def test_animate_options_map_fields_to_generate_options():
    audio = np.zeros(1600, np.float32)
    fields = {"emotion": " Happy ", "intensity": 0.25, "sample": True, "temperature": 0.5, "seed": 7}
    assert animate_options(fields, DEEPTALK_OPTIONS, "deeptalk") == {
        "emotion": "happy",
        "intensity": 0.25,
        "sample": True,
        "temp_top": 0.5,
        "temp_bottom": 0.5,
        "seed": 7,
    }
    out = animate_options({"emotion_audio": audio, "sample": False, "seed": None}, DEEPTALK_OPTIONS, "deeptalk")
    assert set(out) == {"audio_emotion", "sample"} and out["audio_emotion"] is audio and out["sample"] is False
    assert animate_options(dict.fromkeys(ANIMATE_OPTIONS), (), "faceformer") == {}  # nothing sent: no options


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"temperature": 0.0, "sample": True}, "temperature", "> 0"),
        ({"temperature": -1.0, "sample": True}, "temperature", "> 0"),
        ({"temperature": float("nan"), "sample": True}, "temperature", "> 0"),
        ({"seed": -1, "sample": True}, "seed", "[0, 2**63)"),
        ({"seed": 1.5, "sample": True}, "seed", "integer"),
        ({"emotion": "happy", "intensity": 1.5}, "intensity", "[0, 1]"),
        ({"emotion": "happy!"}, "emotion", "not an emotion label"),
        ({"intensity": 0.5}, "intensity", "send emotion too"),
        ({"temperature": 0.5}, "temperature", "sample=true"),
        ({"seed": 3, "sample": False}, "seed", "sample=true"),
        ({"emotion": "happy", "emotion_audio": np.zeros(10, np.float32)}, "emotion_audio", "one emotion source"),
    ],
)
def test_animate_options_reject_bad_values_naming_the_field(fields, field, needle):
    with pytest.raises(InputError) as e:
        animate_options(fields, DEEPTALK_OPTIONS, "deeptalk")
    assert e.value.status == 422 and e.value.field == field and needle in e.value.message, str(e.value)


@pytest.mark.parametrize("field", list(ANIMATE_OPTIONS))
def test_options_the_method_does_not_list_are_422(field):
    value = {"emotion_audio": np.zeros(10, np.float32), "sample": True, "emotion": "happy"}.get(field, 1)
    with pytest.raises(InputError) as e:
        animate_options({field: value}, (), "faceformer")
    assert e.value.status == 422 and e.value.field == field
    assert "faceformer" in e.value.message and ANIMATE_OPTIONS[field][0] in e.value.message


def test_a_field_needs_every_option_it_sets():
    with pytest.raises(InputError, match="temperature: the deeptalk model does not accept temp_bottom"):
        animate_options({"temperature": 1.0, "sample": True}, ("sample", "temp_top"), "deeptalk")


def test_style_id_covers_the_adapt_options(tmp_path):
    store = StyleStore(tmp_path)
    ref = {"audio": np.ones(1600, np.float32), "params": np.zeros((5, 53), np.float32)}
    plain, _ = store.put_reference("deeptalk", ref)
    assert plain == style_id_for("deeptalk", ref)  # no options: the id of the clip alone (ids unchanged)
    expr, created = store.put_reference("deeptalk", ref, {"name": "e"}, {"source": "expression"})
    audio, _ = store.put_reference("deeptalk", ref, None, {"source": "audio"})
    assert created and len({plain, expr, audio}) == 3
    assert store.meta(expr)["adapt_options"] == {"source": "expression"} and "adapt_options" not in store.meta(plain)
    assert store.put_reference("deeptalk", ref, None, {"source": "expression"}) == (expr, False)


# ------------------------------------------------------------------------------ the service


def _deeptalk(corpus) -> torch.nn.Module:
    """A debug DEEPTalk whose emotion prototypes are set as if stage1 had fitted them."""
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method

    torch.manual_seed(0)
    model = build_method("deeptalk", None, DataFacts.from_corpus(corpus), preset="debug")
    with torch.no_grad():  # random unit prototypes (the debug classes: neutral, happy, sad, angry)
        protos = torch.randn(model.emotion_prototypes.shape)  # (n_emotions, E)
        model.emotion_prototypes.copy_(torch.nn.functional.normalize(protos, dim=-1))
        model.emotion_prototype_counts.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def apps(serve_url, tmp_path_factory):
    """DEEPTalk (FLAME synthetic corpus) at /deeptalk and FaceFormer (vertex corpus) at
    /faceformer, both loaded from local method directories, on one Serve HTTP proxy."""
    from ray import serve

    from talkmesh.data import open_corpus
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.serving.app import build_app
    from talkmesh.train.checkpoint import save_method

    root = tmp_path_factory.mktemp("serve-options")
    synth = generate_corpus(root / "synth", "small")
    flame = open_corpus(DataConfig(format="synthetic", root=str(synth), synthetic_flavour="flame"))
    vertex = open_corpus(DataConfig(format="synthetic", root=str(synth)))
    save_method(root / "deeptalk", _deeptalk(flame))
    torch.manual_seed(0)
    save_method(root / "faceformer", build_method("faceformer", None, DataFacts.from_corpus(vertex), preset="debug"))
    common = {"max_audio_seconds": 12.0, "max_reference_seconds": 12.0, "max_upload_mb": 4.0, "wait_s": 60.0}
    common |= {"model_num_cpus": 0.0, "torch_threads": 1, "dev_mode": True}
    common |= {"service_db": f"sqlite:///{root / 'service.db'}"}
    for method, extra in (("deeptalk", {"face_model": str(flame.root / "face_model.npz")}), ("faceformer", {})):
        args = {**common, **extra, "method": method, "model": str(root / method)}
        args["style_dir"] = str(root / f"styles-{method}")
        serve.run(build_app(args), name=f"options-{method}", route_prefix=f"/{method}")
    yield {
        "url": serve_url,
        "flame": flame,
        "facts": DataFacts.from_corpus(flame),
        "vertex_facts": DataFacts.from_corpus(vertex),
    }
    for method in ("deeptalk", "faceformer"):
        serve.delete(f"options-{method}")


def _animate(url: str, data: dict | None = None, files: dict | None = None, seconds: float = 2.0):
    import requests

    files = {"audio": ("a.wav", _wav(seconds)), **(files or {})}
    return requests.post(f"{url}/v1/animate", files=files, data=data or {}, timeout=120)


def _params(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as z:
        return z["params"]


@pytest.mark.slow
def test_deeptalk_options_reach_generate(apps):
    import requests

    url, facts = f"{apps['url']}/deeptalk", apps["facts"]
    info = requests.get(f"{url}/v1/info", timeout=30).json()
    assert info["generate_options"] == list(DEEPTALK_OPTIONS) and "source" in info["adapt_options"]

    r = _animate(url)  # the same response schema as every method: npz of the outputs + fps, headers
    with np.load(io.BytesIO(r.content)) as z:
        frames = int(r.headers["X-Talkmesh-Frames"])
        assert z["params"].shape == (frames, 53) and z["vertices"].shape == (frames, facts.num_vertices, 3)
        argmax = z["params"]
    np.testing.assert_array_equal(_params(_animate(url)), argmax)  # argmax decoding: bitwise repeatable

    seeded = _params(_animate(url, {"sample": "true", "seed": "3"}))
    np.testing.assert_array_equal(_params(_animate(url, {"sample": "true", "seed": "3"})), seeded)
    assert not np.array_equal(_params(_animate(url, {"sample": "true", "seed": "4"})), seeded)
    assert not np.array_equal(seeded, argmax)
    hot = _params(_animate(url, {"sample": "true", "seed": "3", "temperature": "5"}))
    assert not np.array_equal(hot, seeded)  # the temperature reaches both code levels

    happy = _params(_animate(url, {"emotion": "happy"}))
    assert not np.array_equal(happy, argmax) and not np.array_equal(_params(_animate(url, {"emotion": "sad"})), happy)
    assert not np.array_equal(_params(_animate(url, {"emotion": "happy", "intensity": "0.3"})), happy)
    other = {"emotion_audio": ("e.wav", _wav(3.0, 22050, hz=330.0))}  # another clip's emotion, any rate
    assert not np.array_equal(_params(_animate(url, files=other)), argmax)


@pytest.mark.slow
def test_deeptalk_styles_from_audio_or_expression(apps):
    import requests

    url, flame, facts = f"{apps['url']}/deeptalk", apps["flame"], apps["facts"]
    ref = flame.reference_clip(flame.subjects("test-B")[0], 4.0)
    motion = np.concatenate([ref.params, ref.head_pose], axis=1)  # (T, 56)
    files = {"audio": ("r.wav", _wav(len(motion) / facts.fps)), "motion": ("m.npy", _npy(motion))}
    ids = {}
    for source in ("expression", "audio"):
        r = requests.post(f"{url}/v1/styles", files=files, data={"source": source}, timeout=120)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["adapt_options"] == {"source": source} and body["summary"]["emotion_source"] == source
        ids[source] = body["style_id"]
    assert ids["expression"] != ids["audio"]  # the source is part of the style id
    again = requests.post(f"{url}/v1/styles", files=files, data={"source": "expression"}, timeout=120)
    assert again.status_code == 200 and again.json()["style_id"] == ids["expression"]
    bad = requests.post(f"{url}/v1/styles", files=files, data={"source": "motion"}, timeout=60)
    assert bad.status_code == 422 and "source" in bad.text

    data = {"style_id": ids["expression"], "sample": "true", "seed": "5"}
    styled = _params(_animate(url, data))
    np.testing.assert_array_equal(_params(_animate(url, data)), styled)
    assert not np.array_equal(_params(_animate(url, {"style_id": ids["expression"]})), styled)


@pytest.mark.slow
def test_bad_options_are_4xx_naming_the_field_and_the_service_stays_up(apps):
    import requests

    dt, ff = f"{apps['url']}/deeptalk", f"{apps['url']}/faceformer"
    sample = {"sample": "true"}
    cases = [
        (dt, {**sample, "temperature": "0"}, None, 422, "temperature"),
        (dt, {**sample, "temperature": "-0.5"}, None, 422, "temperature"),
        (dt, {**sample, "seed": "-1"}, None, 422, "seed"),
        (dt, {**sample, "seed": "x"}, None, 422, "seed"),
        (dt, {"emotion": "happy", "intensity": "1.5"}, None, 422, "intensity"),
        (dt, {"emotion": "bogus"}, None, 422, "unknown label 'bogus'"),  # generate's ValueError: 422, not 500
        (dt, {"emotion": "fear"}, None, 422, "unknown label 'fear'"),  # a label this model was not trained on
        (dt, {"emotion": "Happy!"}, None, 422, "emotion"),
        (dt, {"intensity": "0.5"}, None, 422, "intensity"),
        (dt, {"temperature": "0.5"}, None, 422, "temperature"),
        (dt, {"emotion": "happy"}, {"emotion_audio": ("e.wav", _wav(1.0))}, 422, "emotion_audio"),
        (dt, {}, {"emotion_audio": ("e.wav", b"not audio")}, 400, "emotion_audio"),
        (dt, {}, {"emotion_audio": ("e.wav", _wav(13.0))}, 413, "emotion_audio"),
    ]
    for field, value in (("emotion", "happy"), ("sample", "true"), ("seed", "1"), ("temperature", "1")):
        cases.append((ff, {field: value}, None, 422, field))  # FaceFormer lists no generate options
    cases.append((ff, {}, {"emotion_audio": ("e.wav", _wav(1.0))}, 422, "emotion_audio"))
    for i, (url, data, files, status, needle) in enumerate(cases):
        r = _animate(url, data, files)
        assert r.status_code == status, (i, r.status_code, r.text[:300])
        assert needle in r.text, (i, r.text[:300])
        if url == ff and status == 422:
            assert "faceformer" in r.text, r.text
    ref_files = {"audio": ("r.wav", _wav(2.0)), "motion": ("m.npy", _npy(np.zeros((50, 30, 3), np.float32)))}
    r = requests.post(f"{ff}/v1/styles", files=ref_files, data={"source": "audio"}, timeout=60)
    assert r.status_code == 422 and "source" in r.text and "faceformer" in r.text, r.text
    for url in (dt, ff):  # still up
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert _animate(dt).status_code == 200  # plain requests still answer
    tmpl = {"template": ("t.npy", _npy(np.zeros((apps["vertex_facts"].num_vertices, 3), np.float32)))}
    assert _animate(ff, {"style_id": apps["vertex_facts"].train_subjects[0]}, tmpl).status_code == 200
