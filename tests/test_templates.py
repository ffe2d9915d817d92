"""Audio alone animates every method (issue 13): a model carries its training speakers'
neutral templates (``MotionMethod.set_templates`` / ``templates`` / ``template_for``), they
survive a method directory's save and load (``templates.npz``) and the MLflow registry, and a
vertex method's ``generate(audio, None, style)`` animates on the style's training speaker's
template, else on the default (the mean of the carried ones). FLAME-parameter methods need no
template (zero shape). Debug presets on the small synthetic corpus; no Ray."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.corpus import Corpus
from talkmesh.methods import available_methods, build_method, get_method
from talkmesh.methods.base import DataFacts, MotionMethod
from talkmesh.ops.importers.base import read_template_source
from talkmesh.ops.importers.keymap import CheckpointImportError
from talkmesh.train.checkpoint import (
    MODEL_FILE,
    TEMPLATES_FILE,
    load_method,
    read_templates,
    save_method,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

METHODS = available_methods()
VERTEX_METHODS = [m for m in METHODS if get_method(m).template_input == "vertices"]
NO_TEMPLATES = r"carries no templates; send a \(V, 3\) template"


def _corpus(flame: bool = False) -> Corpus:
    flavour = "flame" if flame else "vertex"
    return open_corpus(DataConfig(format="synthetic", synthetic_preset="small", synthetic_flavour=flavour))


def _templates(corpus: Corpus) -> dict[str, np.ndarray]:
    return {s: corpus.template(s) for s in corpus.info.train_subjects}


def _method(name: str, corpus: Corpus, templates: bool = True) -> MotionMethod:
    torch.manual_seed(0)
    method = build_method(name, None, DataFacts.from_corpus(corpus), preset="debug")
    if templates:
        method.set_templates(_templates(corpus))
    return method


def _audio(seconds: float = 1.0) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 0.1, int(seconds * 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return _corpus()


@pytest.mark.parametrize("name", METHODS)
def test_audio_alone_animates_every_method(name: str) -> None:
    """generate(audio, None, None): vertex methods on the default template, FLAME-parameter
    methods on the zero shape (they carry no templates and need none)."""
    flame = get_method(name).template_input == "shape"
    corpus = _corpus(flame)
    method = _method(name, corpus, templates=not flame)
    if flame:
        method.set_face_model(corpus.face_model())
        assert dict(method.templates) == {}
    out = method.generate(_audio(), None, None)
    verts = out["vertices"]
    v = method.facts.num_vertices
    assert verts.ndim == 3 and verts.shape[1:] == (v, 3) and verts.shape[0] == method.frames_for_audio(16000)
    assert torch.isfinite(verts).all()
    if not flame:  # the default style's speaker's template when it is one (FaceFormer), else the mean
        carried = _templates(corpus)
        mean = np.mean(np.stack(list(carried.values())), axis=0).astype(np.float32)
        want = carried.get(method.default_style, mean)
        np.testing.assert_allclose(method.template_for(None), want, rtol=0, atol=1e-6)
        assert torch.equal(verts, method.generate(_audio(), method.template_for(None), None)["vertices"])


@pytest.mark.parametrize("name", VERTEX_METHODS)
def test_a_model_without_templates_says_so(name: str, corpus: Corpus) -> None:
    method = _method(name, corpus, templates=False)
    assert dict(method.templates) == {} and method.template_for(None) is None
    with pytest.raises(ValueError, match=NO_TEMPLATES):
        method.generate(_audio(), None, None)
    with pytest.raises(ValueError, match=NO_TEMPLATES):
        method.as_template(None)


@pytest.mark.parametrize("name", VERTEX_METHODS)
def test_a_training_speaker_animates_on_its_own_template(name: str, corpus: Corpus) -> None:
    """Style = a training speaker (name or one-hot index) -> its template; the explicit
    template path is bit-identical whether or not the model carries templates."""
    method, bare = _method(name, corpus), _method(name, corpus, templates=False)
    if name == "mimic":  # an untrained Mimic has no style code per training speaker yet: pretend it has
        with torch.no_grad():
            method.subject_style_counts.fill_(1)
            bare.subject_style_counts.fill_(1)
    audio = _audio()
    subjects = method.facts.train_subjects
    own = corpus.template(subjects[2])
    np.testing.assert_array_equal(method.template_for(subjects[2]), own)
    np.testing.assert_array_equal(method.template_for(2), own)
    for style in (subjects[2], 2):
        got = method.generate(audio, None, style)["vertices"]
        assert torch.equal(got, method.generate(audio, own, style)["vertices"])
    # No style: the default style's speaker's; anything else that is not a carried speaker: the mean.
    mean = method.template_for(99)
    assert mean is method.template_for("nobody") is method.template_for(method.encode_style(subject=subjects[1]))
    np.testing.assert_allclose(mean, np.mean(np.stack(list(method.templates.values())), axis=0), atol=1e-6)
    default = method.default_style
    assert method.template_for(None) is (method.templates[default] if default in method.templates else mean)
    other = corpus.template(corpus.subjects("test-B")[0])
    for style in (None, 1):
        want = bare.generate(audio, other, style)["vertices"]
        assert torch.equal(method.generate(audio, other, style)["vertices"], want)


def test_templates_are_checked_and_read_only(corpus: Corpus) -> None:
    method = _method("faceformer", corpus, templates=False)
    subject = method.facts.train_subjects[0]
    good = corpus.template(subject)
    v = method.facts.num_vertices
    method.set_templates({subject: good.reshape(-1)})  # flat (3V,) is accepted
    assert method.templates[subject].shape == (v, 3)
    with pytest.raises(TypeError):
        method.templates["S02"] = good  # type: ignore[index]
    with pytest.raises(ValueError):
        method.templates[subject][0, 0] = 1.0
    bad_cases = [
        ({"U9": good}, "not a training subject"),
        ({subject: good[:5]}, rf"must be \({v}, 3\)"),
        ({subject: np.full((v, 3), np.nan, np.float32)}, "non-finite"),
        ({"": good}, "non-empty strings"),
    ]
    for mapping, needle in bad_cases:
        with pytest.raises(ValueError, match=needle):
            method.set_templates(mapping)
    assert list(method.templates) == [subject]  # a failed set keeps what was carried
    method.set_templates({})
    assert dict(method.templates) == {} and method.template_for(subject) is None


def test_save_load_round_trip(corpus: Corpus, tmp_path: Path) -> None:
    method = _method("mimic", corpus)
    save_method(tmp_path / "m", method)
    assert (tmp_path / "m" / TEMPLATES_FILE).is_file()
    loaded = load_method(tmp_path / "m").method
    assert list(loaded.templates) == list(method.facts.train_subjects)
    for name, tmpl in method.templates.items():
        np.testing.assert_array_equal(loaded.templates[name], tmpl)
    audio = _audio()
    assert torch.equal(loaded.generate(audio, None, None)["vertices"], method.generate(audio, None, None)["vertices"])
    # Saving a model without templates over it removes the stale file.
    save_method(tmp_path / "m", _method("mimic", corpus, templates=False))
    assert not (tmp_path / "m" / TEMPLATES_FILE).exists()
    assert dict(load_method(tmp_path / "m").method.templates) == {}


def test_a_directory_saved_before_templates_still_loads(corpus: Corpus, tmp_path: Path) -> None:
    """method.json + model.pt only (as every earlier talkmesh wrote): loads, carries none,
    animates with an explicit template exactly as before."""
    method = _method("faceformer", corpus, templates=False)
    save_method(tmp_path / "old", method)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["method.json", MODEL_FILE]
    loaded = load_method(tmp_path / "old").method
    assert dict(loaded.templates) == {}
    tmpl = corpus.template(method.facts.train_subjects[0])
    assert torch.equal(loaded.generate(_audio(), tmpl, 0)["vertices"], method.generate(_audio(), tmpl, 0)["vertices"])
    with pytest.raises(ValueError, match=NO_TEMPLATES):
        loaded.generate(_audio(), None, None)


def test_a_malformed_templates_file_is_named(corpus: Corpus, tmp_path: Path) -> None:
    d = save_method(tmp_path / "m", _method("faceformer", corpus))
    (d / TEMPLATES_FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=TEMPLATES_FILE):
        load_method(d)
    np.savez(d / TEMPLATES_FILE, names=np.array(["S01"]), templates=np.zeros((1, 4, 3), np.float32))
    with pytest.raises(ValueError, match=rf"{TEMPLATES_FILE}.*must be \(170, 3\)"):
        load_method(d)
    np.savez(d / TEMPLATES_FILE, names=np.array(["S01", "S02"]), templates=np.zeros((1, 170, 3), np.float32))
    with pytest.raises(ValueError, match="expected 'names'"):
        read_templates(d)


def test_the_registered_model_carries_its_templates(corpus: Corpus, tmp_path: Path) -> None:
    """register_model from a method directory (what the jobs and sweeps do) and from a method
    (the importer): load_registered gives the templates back."""
    from talkmesh.ops import tracking

    method = _method("faceformer", corpus)
    d = save_method(tmp_path / "m", method)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("talkmesh-faceformer", "templates", uri=uri)
    versions = [
        tracking.register_model("faceformer", run_id, method_dir=d, uri=uri),
        tracking.register_model("faceformer", run_id, method, uri=uri),
    ]
    tracking.end_run(run_id, uri=uri)
    for version in versions:
        served, _, _ = tracking.load_registered("faceformer", str(version), uri=uri)
        assert list(served.templates) == list(method.facts.train_subjects)
        np.testing.assert_array_equal(served.template_for(None), method.template_for(None))


def test_an_import_reads_the_datasets_templates(corpus: Corpus, tmp_path: Path) -> None:
    """``talkmesh import --templates``: a dataset's templates.pkl (flat (3V,) meshes, extra
    test speakers) or a talkmesh templates.npz -> the training speakers' templates."""
    facts = DataFacts.from_corpus(corpus)
    every = {s: corpus.template(s) for s in corpus.subjects()}
    pkl = tmp_path / "templates.pkl"
    pkl.write_bytes(pickle.dumps({s: t.reshape(-1) for s, t in every.items()}, protocol=2))
    got = read_template_source(pkl, facts)
    assert sorted(got) == sorted(facts.train_subjects)
    method = _method("faceformer", corpus, templates=False)
    method.set_templates(got)
    np.testing.assert_array_equal(method.templates["S03"], corpus.template("S03"))
    d = save_method(tmp_path / "m", method)
    assert sorted(read_template_source(d / TEMPLATES_FILE, facts)) == sorted(facts.train_subjects)
    pkl.write_bytes(pickle.dumps({"nobody": every["S01"]}))
    with pytest.raises(CheckpointImportError, match="none of the training subjects"):
        read_template_source(pkl, facts)
    with pytest.raises(CheckpointImportError, match="no such file"):
        read_template_source(tmp_path / "missing.pkl", facts)


def test_training_carries_the_corpus_templates(tmp_path: Path) -> None:
    """A (1-epoch, 2-batch, local-mode) training run's checkpoints carry the training
    speakers' templates from the corpus, and so does the model registered from one."""
    from talkmesh.ops import tracking
    from talkmesh.train.config import load_experiment
    from talkmesh.train.runner import run_training

    exp = load_experiment(None, [
        "preset=debug", "data.window_seconds=2.0", "train.batch_size=2", "train.torch_threads=1",
        "train.system_metrics=false", "train.limit_eval_sequences=2", "train.epochs=1",
        "train.limit_train_batches=2", f"train.storage_path={tmp_path / 'ray'}",
    ])  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_training(exp, tracking_uri=uri)
    assert result.selected_checkpoint is not None
    corpus = open_corpus(exp.data)
    ckpt = result.selected_checkpoint
    version = tracking.register_model("faceformer", result.mlflow_run_id, method_dir=ckpt, uri=uri)
    served, facts, _ = tracking.load_registered("faceformer", str(version), uri=uri)
    for method in (load_method(ckpt).method, served):
        assert list(method.templates) == list(facts.train_subjects)
        for name, tmpl in method.templates.items():
            np.testing.assert_array_equal(tmpl, corpus.template(name))
    assert served.generate(_audio(), None, None)["vertices"].shape == (24, facts.num_vertices, 3)
