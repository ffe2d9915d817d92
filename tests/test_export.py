"""Exports (glTF morph-target animation, rig blendshape weights as CSV/JSON) and the
`talkmesh animate` / `talkmesh export` commands, on the synthetic corpus's real motion.

The .glb files are checked by the Khronos glTF validator (npm ``gltf-validator``, installed
by `make setup` into web/node_modules) and re-imported; the rig solver is checked on a
synthetic rig whose true weights are known.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from service_helpers import randomize_weights
from talkmesh.cli import main
from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.synthetic import generate_corpus
from talkmesh.export import ARKIT_COLUMNS, load_rig, make_rig, read_glb, solve_weights, write_csv, write_glb, write_json

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO / "web" / "validate-gltf.mjs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return open_corpus(DataConfig(format="synthetic", root=str(generate_corpus(tmp_path_factory.mktemp("c"), "small"))))


@pytest.fixture(scope="module")
def clip(corpus):
    """(vertices (T, V, 3), template (V, 3), faces (F, 3), audio (S,)) of a real corpus clip."""
    subject = corpus.subjects("test-A")[0]
    ref = corpus.reference_clip(subject, 4.0)
    faces = corpus.face_model().faces
    faces = np.asarray(faces() if callable(faces) else faces, dtype=np.int64)
    return np.asarray(ref.vertices, dtype=np.float64), np.asarray(ref.template, dtype=np.float64), faces, ref.audio


def validate(path: Path) -> dict:
    """The Khronos validator's report of ``path`` (fails the test when it cannot run)."""
    node = shutil.which("node")
    assert node, "node is not installed: the glTF validator runs on Node (README: set-up)"
    assert (REPO / "web" / "node_modules" / "gltf-validator").is_dir(), "run `make setup` (npm ci in web/)"
    out = subprocess.run([node, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout, out.stderr
    return json.loads(out.stdout)


def test_glb_round_trip_is_valid_and_replays_the_motion(tmp_path, clip):
    vertices, template, faces, _ = clip
    exact = write_glb(tmp_path / "exact.glb", vertices, 25, faces, template, max_targets=len(vertices))
    report = validate(exact.path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0, report["issues"]
    assert report["info"]["hasMorphTargets"] and report["info"]["animationCount"] == 1
    assert report["info"]["totalTriangleCount"] == len(faces)
    back = read_glb(exact.path)
    scale = np.linalg.norm(vertices - template, axis=2).max()
    assert exact.relative_error < 1e-6
    assert np.abs(back["vertices"] - vertices).max() < 1e-5 * max(1.0, np.abs(vertices).max())
    np.testing.assert_array_equal(back["faces"], faces)
    np.testing.assert_allclose(back["times"], np.arange(len(vertices)) / 25, atol=1e-6)  # the audio's timing
    assert back["fps"] == 25 and back["extras"]["seconds"] == pytest.approx(len(vertices) / 25)

    # The default compresses to 32 targets; the stated error is what a player reproduces.
    small = write_glb(tmp_path / "small.glb", vertices, 25, faces, template)
    assert small.targets == 32 and validate(small.path)["issues"]["numErrors"] == 0
    err = np.linalg.norm(read_glb(small.path)["vertices"] - vertices, axis=2).max() / scale
    assert err == pytest.approx(small.relative_error, rel=0.01, abs=1e-5) and err < 0.05, err


def test_glb_without_triangles_is_a_point_cloud(tmp_path, clip):
    vertices = clip[0][:10]
    s = write_glb(tmp_path / "points.glb", vertices, 30)
    report = validate(s.path)
    assert report["issues"]["numErrors"] == 0 and report["info"]["totalTriangleCount"] == 0
    back = read_glb(s.path)
    assert back["faces"] is None and np.abs(back["vertices"] - vertices).max() < 1e-5


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"path": "x.gltf"}, "path: a glTF binary must end in .glb"),
        ({"vertices": np.zeros((4, 10))}, "vertices: expected shape (T, V, 3)"),
        ({"vertices": np.full((4, 10, 3), np.nan)}, "vertices: non-finite"),
        ({"faces": np.array([[0, 1, 99]])}, "faces: vertex indices must lie in [0, 9]"),
        ({"rest": np.zeros((9, 3))}, "rest: expected shape (10, 3)"),
        ({"fps": 0}, "fps: expected a positive number"),
        ({"max_targets": 0}, "max_targets: expected an integer >= 1"),
    ],
)
def test_glb_refuses_bad_input_naming_it(tmp_path, change, needle):
    args = {"path": "m.glb", "vertices": np.zeros((4, 10, 3)), "fps": 25, "faces": None, "rest": None, "max_targets": 8}
    args.update(change)
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError) as e:
        write_glb(args.pop("path"), args.pop("vertices"), args.pop("fps"), **args)
    assert needle in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def synthetic_rig(template: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """k blendshapes (k, V, 3) = template + a smooth bump of a random direction around a
    random vertex each (named like ARKit's), as a rig's shapes are local deformations."""
    rng = np.random.default_rng(seed)
    centers = template[rng.choice(len(template), k, replace=False)]
    radius = 0.3 * np.ptp(template, axis=0).max()
    shapes = []
    for c in centers:
        bump = np.exp(-(np.linalg.norm(template - c, axis=1) / radius) ** 2)[:, None]  # (V, 1)
        shapes.append(template + 0.01 * bump * rng.normal(size=3))
    return np.stack(shapes), list(ARKIT_COLUMNS[:k])


def true_weights(t: int, k: int, seed: int) -> np.ndarray:
    """(t, k) smooth weights in [0, 1] (up to 0.1 rad per frame), many of them at the bounds."""
    rng = np.random.default_rng(seed)
    phase, speed = rng.uniform(0, 6.3, k), rng.uniform(0.02, 0.1, k)
    return np.clip(0.5 + 0.8 * np.sin(phase + speed * np.arange(t)[:, None]), 0.0, 1.0)


def test_rig_weights_are_recovered_on_a_rig_with_known_weights(clip):
    _, template, _, _ = clip
    k, t = 12, 120
    shapes, names = synthetic_rig(template, k, seed=1)
    rig = make_rig(template, shapes, names)
    w = true_weights(t, k, seed=2)
    motion = template + np.einsum("tk,kvc->tvc", w, shapes - template)
    result = solve_weights(motion, template, rig, 30)
    assert np.abs(result.weights - w).max() < 1e-6 and result.residual.max() < 1e-9
    assert ((w == 0) | (w == 1)).mean() > 0.2  # the bounds are active, not only the interior

    # Noise on the motion: bounded weights stay near the truth, and smoothing brings them nearer.
    noisy = motion + np.random.default_rng(3).normal(0, 2e-3, motion.shape)  # a fifth of the shapes' peak
    rough = solve_weights(noisy, template, rig, 30)
    smooth = solve_weights(noisy, template, rig, 30, smooth=0.3)
    assert rough.weights.min() >= 0 and rough.weights.max() <= 1
    assert smooth.weights.min() >= -1e-9 and smooth.weights.max() <= 1 + 1e-9
    rough_err, smooth_err = np.abs(rough.weights - w).mean(), np.abs(smooth.weights - w).mean()
    assert rough_err < 0.05 and smooth_err < 0.75 * rough_err, (rough_err, smooth_err)  # 0.038 -> 0.021 here


def test_rig_of_another_face_and_units_follows_through_a_correspondence(clip):
    _, template, _, _ = clip
    k, t = 8, 40
    rng = np.random.default_rng(4)
    corr = rng.permutation(len(template))[: len(template) // 2]  # rig vertex i follows motion vertex corr[i]
    shapes, names = synthetic_rig(template, k, seed=5)
    w = true_weights(t, k, seed=6)
    motion = template + np.einsum("tk,kvc->tvc", w, shapes - template)
    other = 100 * (template[corr] + np.array([0.0, 0.02, 0.01]))  # another identity, in centimetres
    rig_shapes = other + 100 * (shapes - template)[:, corr]
    rig = make_rig(other, rig_shapes, [n.lower() for n in names], corr)
    result = solve_weights(motion, template, rig, 30, scale=100.0)
    assert np.abs(result.weights - w).max() < 1e-6


def test_rig_weights_are_written_in_the_capture_csv_layout_and_as_json(tmp_path, clip):
    _, template, _, _ = clip
    shapes, names = synthetic_rig(template, 5, seed=7)
    w = true_weights(31, 5, seed=8)
    motion = template + np.einsum("tk,kvc->tvc", w, shapes - template)
    result = solve_weights(motion, template, make_rig(template, shapes, [n.lower() for n in names]), 30)
    rows = list(csv.reader(write_csv(tmp_path / "w.csv", result).open()))
    assert rows[0] == ["Timecode", "BlendShapeCount", *ARKIT_COLUMNS] and len(rows) == 32
    assert len(ARKIT_COLUMNS) == 61 and all(r[1] == "61" for r in rows[1:])
    assert rows[1][0] == "00:00:00:00.000" and rows[31][0] == "00:00:01:00.000"  # frame 30 at 30 fps = 1 s
    values = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(values[:, :5], w, atol=1e-6)  # EyeBlinkLeft.. are the rig's first five
    assert not values[:, 5:].any()

    own = make_rig(template, shapes, ["open", "smile", "pucker", "blink", "brow"])
    other = solve_weights(motion, template, own, 30)
    rows = list(csv.reader(write_csv(tmp_path / "own.csv", other).open()))
    assert rows[0] == ["Timecode", "BlendShapeCount", "open", "smile", "pucker", "blink", "brow"]
    body = json.loads(write_json(tmp_path / "w.json", result).read_text())
    assert body["fps"] == 30 and body["names"] == [n.lower() for n in names]
    np.testing.assert_allclose(body["weights"], w, atol=1e-6)


def test_rig_files_and_arguments_are_checked(tmp_path, clip):
    _, template, _, _ = clip
    shapes, names = synthetic_rig(template, 3, seed=9)
    np.savez(tmp_path / "rig.npz", neutral=template, shapes=shapes, names=np.array(names))
    rig = load_rig(tmp_path / "rig.npz")
    assert rig.names == tuple(names) and rig.deltas.shape == shapes.shape
    np.savez(tmp_path / "bad.npz", neutral=template, shapes=shapes)
    with pytest.raises(ValueError, match="missing array 'names'"):
        load_rig(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="names must be 3 distinct"):
        make_rig(template, shapes, ["a", "a", "b"])
    with pytest.raises(ValueError, match="give a correspondence"):
        solve_weights(template[None, :-1], template[:-1], rig, 30)
    with pytest.raises(ValueError, match="bounds: expected lower < upper"):
        solve_weights(template[None], template, rig, 30, bounds=(1.0, 0.0))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, corpus):
    """A debug FaceFormer with moving random weights and its training speakers' templates."""
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.train.checkpoint import save_method

    torch.manual_seed(0)
    facts = DataFacts.from_corpus(corpus)
    method = randomize_weights(build_method("faceformer", None, facts, preset="debug"), 0.05)
    method.set_templates({s: corpus.template(s) for s in facts.train_subjects})
    root = tmp_path_factory.mktemp("model")
    save_method(root / "model", method)
    return root / "model", method


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_animate_and_export_from_the_command_line(tmp_path, capsys, corpus, clip, saved_model):
    import soundfile as sf

    model_dir, method = saved_model
    _, _, faces, audio = clip
    sf.write(tmp_path / "a.wav", audio, 16000)
    np.save(tmp_path / "faces.npy", faces)
    speaker = method.facts.train_subjects[1]
    code, out, err = run(capsys, "animate", "--model", model_dir, "--audio", tmp_path / "a.wav",
                         "--style", speaker, "--out", tmp_path / "m.npz")  # fmt: skip
    assert code == 0, err
    with np.load(tmp_path / "m.npz") as z:
        motion = {k: z[k] for k in z.files}
    want = method.generate(audio, None, speaker)["vertices"].numpy()
    np.testing.assert_allclose(motion["vertices"], want, atol=1e-5)
    np.testing.assert_array_equal(motion["template"], corpus.template(speaker))
    assert float(motion["fps"]) == method.facts.fps and "frames at 25 fps" in out

    code, _, err = run(capsys, "animate", "--model", model_dir, "--audio", tmp_path / "a.wav", "--style", speaker,
                       "--faces", tmp_path / "faces.npy", "--out", tmp_path / "m.glb")  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(read_glb(tmp_path / "m.glb")["vertices"], want, atol=2e-3)
    code, _, err = run(capsys, "animate", "--model", model_dir, "--audio", tmp_path / "a.wav",
                       "--faces", tmp_path / "faces.npy", "--out", tmp_path / "m.mp4")  # fmt: skip
    assert code == 0 and (tmp_path / "m.mp4").read_bytes()[4:8] == b"ftyp", err

    # A new speaker from a reference clip: FaceFormer's adapt picks a training one-hot.
    ref = corpus.reference_clip(corpus.subjects("test-B")[0], 6.0)
    sf.write(tmp_path / "ref.wav", ref.audio, 16000)
    np.save(tmp_path / "ref.npy", ref.vertices)
    np.save(tmp_path / "face.npy", ref.template)
    reference = ["--reference-audio", tmp_path / "ref.wav", "--reference-motion", tmp_path / "ref.npy",
                 "--template", tmp_path / "face.npy"]  # fmt: skip
    code, _, err = run(capsys, "animate", "--model", model_dir, "--audio", tmp_path / "a.wav", *reference,
                       "--out", tmp_path / "r.npz")  # fmt: skip
    assert code == 0, err
    chosen = method.adapt({"audio": ref.audio, "vertices": ref.vertices, "template": ref.template})
    with np.load(tmp_path / "r.npz") as z:
        again = method.generate(audio, ref.template, chosen)["vertices"].numpy()
        np.testing.assert_allclose(z["vertices"], again, atol=1e-5)

    # export: the .npz to a .glb, and to a rig's weights (the rig is the corpus face's own shapes).
    code, out, err = run(capsys, "export", "--motion", tmp_path / "m.npz", "--faces", tmp_path / "faces.npy",
                         "--out", tmp_path / "e.glb")  # fmt: skip
    assert code == 0 and "morph targets (relative error" in out, err
    assert validate(tmp_path / "e.glb")["issues"]["numErrors"] == 0
    shapes, names = synthetic_rig(motion["template"].astype(np.float64), 6, seed=10)
    np.savez(tmp_path / "rig.npz", neutral=motion["template"], shapes=shapes, names=np.array(names))
    code, out, err = run(capsys, "export", "--motion", tmp_path / "m.npz", "--rig", tmp_path / "rig.npz",
                         "--out", tmp_path / "w.csv")  # fmt: skip
    assert code == 0 and "6 blendshapes" in out, err
    rows = list(csv.reader((tmp_path / "w.csv").open()))
    assert len(rows) == len(want) + 1 and rows[0][2:] == list(ARKIT_COLUMNS)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["animate", "--model", "{model}", "--audio", "{wav}", "--out", "{tmp}/m.obj"], "--out"),
        (["animate", "--model", "{tmp}/nowhere", "--audio", "{wav}", "--out", "{tmp}/m.npz"], "--model"),
        (["animate", "--model", "models:/other@x", "--audio", "{wav}", "--out", "{tmp}/m.npz"], "models:/talkmesh-"),
        (["animate", "--model", "champion", "--audio", "{wav}", "--out", "{tmp}/m.npz"], "needs --method"),
        (["animate", "--model", "{model}", "--audio", "{wav}", "--style", "nobody", "--out", "{tmp}/m.npz"],
         "cannot animate"),
        (["animate", "--model", "{model}", "--audio", "{wav}", "--reference-audio", "{wav}", "--out", "{tmp}/m.npz"],
         "give both"),
        (["export", "--motion", "{tmp}/none.npz", "--out", "{tmp}/e.glb"], "--motion"),
        (["export", "--motion", "{wav}", "--out", "{tmp}/e.glb"], "not a readable .npz"),
        (["export", "--motion", "{motion}", "--out", "{tmp}/e.csv"], "--rig"),
        (["export", "--motion", "{motion}", "--out", "{tmp}/e.fbx"], "--out"),
        (["export", "--motion", "{motion}", "--rig", "{wav}", "--out", "{tmp}/e.csv"], "rig:"),
    ],
)
def test_command_line_errors_name_the_argument(tmp_path, capsys, clip, saved_model, args, needle):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", clip[3], 16000)
    np.savez(tmp_path / "motion.npz", vertices=clip[0], fps=np.float32(25), template=clip[1])
    fill = {"model": saved_model[0], "wav": tmp_path / "a.wav", "tmp": tmp_path, "motion": tmp_path / "motion.npz"}
    code, _, err = run(capsys, *(a.format(**fill) for a in args))
    assert code == 2 and needle in err, err
