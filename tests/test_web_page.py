"""The web page at the service's root, driven in a real headless Chromium (Debian's
``chromium`` package) by Playwright: speech in, a style picked or adapted, the face animated
in 3D (three.js from npm), two faces side by side, downloads, the leaderboard and the model
card. The screenshot check: the rendered face differs between two audio times."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "outputs" / "web-page"  # the screenshots of the last run (README's comes from here)


@pytest.fixture(scope="module")
def page_service(serve_url, tmp_path_factory):
    """A keyed service at / of a registered debug FaceFormer (random weights that move, its
    training speakers' templates, a model card), with faces, and a leaderboard logged."""
    from ray import serve

    from service_helpers import randomize_weights
    from talkmesh.data import open_corpus
    from talkmesh.data.synthetic import generate_corpus
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.ops import tracking
    from talkmesh.ops.leaderboard import build_leaderboard, log_leaderboard
    from talkmesh.ops.model_card import write_model_card
    from talkmesh.serving.app import build_app
    from talkmesh.serving.tenants import KeyStore

    root = tmp_path_factory.mktemp("page")
    corpus = open_corpus(DataConfig(format="synthetic", root=str(generate_corpus(root / "synth", "small"))))
    facts = DataFacts.from_corpus(corpus)
    torch.manual_seed(0)
    method = randomize_weights(build_method("faceformer", None, facts, preset="debug"), 0.012)
    method.set_templates({s: corpus.template(s) for s in facts.train_subjects})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = tracking.start_run("talkmesh-faceformer", "page-test", uri=uri)
    version = tracking.register_model("faceformer", run_id, method, uri=uri)
    tracking.set_alias("faceformer", "champion", version, uri=uri)
    tracking.end_run(run_id, uri=uri)
    write_model_card("faceformer", version, uri)
    board = build_leaderboard(corpus, "test-A", [("faceformer v1", "models:/talkmesh-faceformer/1", method)], limit=2)
    log_leaderboard(board, uri)
    faces = np.asarray(corpus.face_model().faces, dtype=np.int64)
    np.save(root / "faces.npy", faces)
    db = f"sqlite:///{root / 'service.db'}"
    token = KeyStore(db).create("web", "page test")[1]
    args = {"method": "faceformer", "tracking_uri": uri, "style_dir": str(root / "styles"), "service_db": db,
            "dev_mode": False, "faces": str(root / "faces.npy"), "max_audio_seconds": 12.0,
            "max_reference_seconds": 12.0, "wait_s": 60.0, "model_num_cpus": 0.0, "torch_threads": 1,
            "preview_size": 96}  # fmt: skip
    serve.run(build_app(args), name="talkmesh-page", route_prefix="/")
    ref = corpus.reference_clip(corpus.subjects("test-B")[0], 4.0)
    yield {"url": serve_url, "token": token, "root": root, "reference": ref, "protocol": board.protocol.id,
           "speaker": facts.train_subjects[1]}  # fmt: skip
    serve.delete("talkmesh-page")


def _wav(audio: np.ndarray, path: Path) -> Path:
    import soundfile as sf

    sf.write(path, audio, 16000)
    return path


def _canvas_png(page, selector: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), dtype=np.float64)


def _at(page, t: float) -> None:
    """Move the faces to audio time ``t`` and wait until two frames were drawn there."""
    page.evaluate("t => talkmesh.seek(t)", t)
    page.evaluate("() => new Promise(ok => requestAnimationFrame(() => requestAnimationFrame(ok)))")


def test_the_page_animates_speech_in_3d_in_a_real_browser(page_service, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (make setup installs it where apt-get can)"
    svc = page_service
    ref = svc["reference"]
    speech = _wav(ref.audio, tmp_path / "speech.wav")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        flags = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"]  # WebGL on the CPU
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(svc["url"] + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('cannot reach')")  # no key: 401
        page.fill("#key", svc["token"])
        page.dispatch_event("#key", "change")
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        assert "faceformer" in page.text_content("#model")

        # The leaderboard and the model card are browsable.
        assert page.get_attribute("#leaderboard table", "data-protocol") == svc["protocol"]
        assert "ground truth" in page.text_content("#leaderboard")
        assert "# talkmesh-faceformer version 1" in page.text_content("#card")

        # Speech and a training speaker: the face is drawn and moves with the audio's time.
        page.set_input_files("#audio", str(speech))
        page.wait_for_selector("#animate:not([disabled])")
        page.select_option("#style", svc["speaker"])
        page.click("#animate")
        page.wait_for_selector("body[data-clips='1']", timeout=120_000)
        assert not errors, errors
        _at(page, 0.4)
        a = _canvas_png(page, "#view-a canvas")
        _at(page, 2.4)
        b = _canvas_png(page, "#view-a canvas")
        page.screenshot(path=str(SHOTS / "page.png"))
        background = np.array([0xDD, 0xE3, 0xE6], dtype=np.float64)
        face = np.abs(a - background).sum(axis=2) > 30  # pixels of the face, not the backdrop
        assert face.mean() > 0.02, f"no face drawn ({face.mean():.4f} of the canvas)"
        moved = np.abs(a - b).sum(axis=2) > 30
        assert moved.sum() > 100, f"the face does not move between 0.4 s and 2.4 s ({moved.sum()} pixels changed)"

        # A new style from a reference clip, with progress, then two faces side by side.
        page.click("#new-style summary")
        page.set_input_files("#ref-audio", str(_wav(ref.audio, tmp_path / "ref.wav")))
        buf = io.BytesIO()
        np.save(buf, ref.vertices)
        (tmp_path / "ref.npy").write_bytes(buf.getvalue())
        np.save(tmp_path / "face.npy", ref.template)
        page.set_input_files("#ref-motion", str(tmp_path / "ref.npy"))
        page.set_input_files("#ref-template", str(tmp_path / "face.npy"))
        page.fill("#ref-name", "new speaker")
        page.click("#adapt")
        page.wait_for_function("document.querySelector('#adapt-status').textContent.startsWith('ready')",
                               timeout=120_000)  # fmt: skip
        assert page.eval_on_selector("#style", "s => s.selectedOptions[0].textContent") == "style new speaker"
        page.check("#compare")
        page.select_option("#style-b", svc["speaker"])
        page.click("#animate")
        page.wait_for_selector("body[data-clips='2']", timeout=120_000)
        assert page.is_visible("#view-b") and "faceformer" in page.text_content("#view-b figcaption")
        _at(page, 1.0)
        left, right = _canvas_png(page, "#view-a canvas"), _canvas_png(page, "#view-b canvas")
        assert (np.abs(right - background).sum(axis=2) > 30).mean() > 0.02  # the second face is drawn too
        assert left.shape == right.shape
        page.screenshot(path=str(SHOTS / "side-by-side.png"))

        # Downloads: motion, video and glTF of the same request.
        for fmt, magic, offset in (("npz", b"PK", 0), ("mp4", b"ftyp", 4), ("glb", b"glTF", 0)):
            with page.expect_download(timeout=120_000) as dl:
                page.click(f"#downloads button[data-format={fmt}]")
            data = Path(dl.value.path()).read_bytes()
            assert data[offset : offset + len(magic)] == magic, fmt
        assert not errors, errors
        browser.close()


def test_the_page_and_three_are_served_and_unknown_files_are_404(page_service):
    import requests

    url = page_service["url"]
    r = requests.get(url + "/", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "importmap" in r.text
    r = requests.get(url + "/ui/vendor/three/build/three.module.js", timeout=30)
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert requests.get(url + "/ui/app.js", timeout=30).status_code == 200
    assert requests.get(url + "/ui/nothing.js", timeout=30).status_code == 404
    r = requests.get(url + "/v1/leaderboard", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"]  # the API behind the page is keyed
    auth = {"Authorization": f"Bearer {page_service['token']}"}
    board = requests.get(url + "/v1/leaderboard", headers=auth, timeout=30).json()
    assert board["protocol_id"] == page_service["protocol"]
    assert requests.get(url + "/v1/model-card", headers=auth, timeout=30).json()["model_version"] == 1
