"""The method contract (DESIGN.md "Method", specs/README.md G2-G5), for every registered method.

Each test runs over ``available_methods()`` with the method's ``debug`` preset on a tiny
in-memory corpus (V = 20, three training subjects) at 25 and 30 fps, so a method added to
the registry is held to the same contract. FLAME-parameter methods (``template_input =
"shape"``) get the same clips (they carry ``params`` and ``head_pose``) with parameter-corpus
facts and a seeded surrogate face model of V vertices injected with ``set_face_model``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from talkmesh.config import ConfigError, apply_overrides, flatten, from_dict
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.dataset import collate_clips
from talkmesh.data.regions import Regions
from talkmesh.methods import (
    UnknownMethodError,
    available_methods,
    build_config,
    build_method,
    get_config_class,
    get_method,
)
from talkmesh.methods.base import (
    DataFacts,
    MotionMethod,
    StyleStateError,
    check_style_state,
    load_style_state,
    save_style_state,
)

METHODS = available_methods()
V = 20
SUBJECTS = ("S1", "S2", "S3")
FPS_CASES = [25.0, 30.0]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------
# A tiny in-memory corpus and batch
# --------------------------------------------------------------------------------------


def _template(subject: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, subject)))
    return rng.normal(0.0, 0.1, (V, 3)).astype(np.float32)


def make_clip(subject: str, seconds: float, fps: float, seed: int) -> Clip:
    """Audio with syllable-rate envelope; lips (vertices 0..3) follow the envelope."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000.0
    env = 0.5 + 0.5 * np.sin(2 * np.pi * (3.0 + seed % 3) * t)
    audio = (env * np.sin(2 * np.pi * 220.0 * t) + 0.01 * rng.normal(size=n)).astype(np.float32)
    frames = int(round(seconds * fps))
    ft = np.arange(frames) / fps
    open_ = 0.5 + 0.5 * np.sin(2 * np.pi * (3.0 + seed % 3) * ft)  # (T,)
    offsets = np.zeros((frames, V, 3), np.float32)
    offsets[:, :4, 1] = -0.01 * open_[:, None]
    offsets += 0.001 * rng.normal(size=offsets.shape).astype(np.float32)
    tmpl = _template(subject)
    params = np.zeros((frames, 53), np.float32)
    params[:, 50] = open_
    return Clip(
        name=f"{subject}_seq{seed:02d}",
        subject=subject,
        audio=audio,
        fps=fps,
        vertices=tmpl[None] + offsets,
        params=params,
        head_pose=np.zeros((frames, 3), np.float32),
        template=tmpl,
        emotion=0,
        intensity=0,
        text="abc",
    )


class TinyCorpus(Corpus):
    """In-memory corpus: three training subjects, one unseen (U1)."""

    format_name = "tiny"

    def __init__(self, fps: float) -> None:
        from talkmesh.config import DataConfig

        super().__init__(DataConfig())
        self._fps = fps

    @property
    def info(self) -> CorpusInfo:
        return CorpusInfo(
            format="tiny", root="", fps=self._fps, motion="vertices", num_vertices=V, param_dim=0,
            has_head_pose=False, train_subjects=SUBJECTS, splits=("train", "test"),
            eval_splits=("test",), unseen_splits=("test",),
        )

    def _index(self) -> list[SequenceInfo]:
        return [SequenceInfo(name=f"{s}_seq00", subject=s, split="train", num_frames=int(self._fps)) for s in SUBJECTS]

    def _load(self, seq: SequenceInfo) -> Clip:
        return make_clip(seq.subject, 1.0, self._fps, 0)

    def template(self, subject: str) -> np.ndarray:
        return _template(subject)

    def regions(self) -> Regions:
        return Regions(lips=np.arange(4), upper=np.arange(10, 16))


def facts_for(fps: float, params: bool = False) -> DataFacts:
    facts = DataFacts.from_corpus(TinyCorpus(fps))
    if params:  # the params-flavoured corpus: FLAME-56 motion, vertices through a face model
        facts = dataclasses.replace(facts, motion="params", param_dim=53, has_head_pose=True)
    return facts


def is_flame_method(name: str) -> bool:
    return getattr(get_method(name), "template_input", "vertices") == "shape"


@functools.lru_cache(maxsize=1)
def tiny_face_model() -> torch.nn.Module:
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame

    return FlameLayer.from_arrays(**make_surrogate_flame(V, seed=0))


def tiny_batch(fps: float) -> dict:
    """Two clips of different lengths (padding exercised), two training subjects."""
    clips = [make_clip("S1", 1.2, fps, 1), make_clip("S3", 0.9, fps, 2)]
    return collate_clips(clips, [SUBJECTS.index(c.subject) for c in clips])


def build(name: str, fps: float, **overrides: object) -> MotionMethod:
    torch.manual_seed(0)
    flame = is_flame_method(name)
    model = build_method(name, dict(overrides), facts_for(fps, params=flame), preset="debug")
    if flame:
        model.set_face_model(tiny_face_model())
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------
# Registry and facts
# --------------------------------------------------------------------------------------


def test_registry_import_is_light():
    code = (
        "import sys, talkmesh.methods as m; "
        "assert m.available_methods(); "
        "heavy = [k for k in ('torch', 'transformers', 'numpy') if k in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_errors():
    assert METHODS and METHODS == sorted(METHODS)
    with pytest.raises(UnknownMethodError, match="unknown method"):
        get_method("no-such-method")
    with pytest.raises(TypeError):
        build_method(METHODS[0], None, {"fps": 25})  # type: ignore[arg-type]


def test_data_facts_from_corpus_and_dict_round_trip():
    facts = facts_for(30.0)
    assert facts.fps == 30.0 and facts.num_vertices == V and facts.train_subjects == SUBJECTS
    assert facts.num_train_subjects == 3 and facts.lip_indices == (0, 1, 2, 3)
    assert facts.upper_indices == tuple(range(10, 16))
    assert math.isclose(facts.samples_per_frame, 16000 / 30)
    assert DataFacts.from_dict(facts.to_dict()) == facts
    assert facts.subject_index("S2") == 1 and facts.subject_index(2) == 2
    with pytest.raises(ValueError):
        facts.subject_index("U1")
    with pytest.raises(ValueError):
        DataFacts.from_dict({**facts.to_dict(), "colour": 1})
    with pytest.raises(ValueError):
        DataFacts(fps=0.0, num_vertices=V)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip_and_presets(name):
    cls = get_config_class(name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    presets = getattr(cls, "PRESETS", ())
    assert "debug" in presets
    for preset in presets:
        cfg = cls.preset(preset)
        flat = flatten(cfg)
        assert all(not isinstance(v, dict) for v in flat.values())
        assert from_dict(cls, apply_overrides({}, flat)) == cfg
    # Mapping overrides land on top of the preset; nested sections keep their other values.
    debug = cls.preset("debug")
    first_float = next(k for k, v in flatten(debug).items() if isinstance(v, float) and not isinstance(v, bool))
    cfg = build_config(name, {first_float: 0.5}, preset="debug")
    assert flatten(cfg)[first_float] == 0.5
    assert {k: v for k, v in flatten(cfg).items() if k != first_float} == {
        k: v for k, v in flatten(debug).items() if k != first_float
    }


@pytest.mark.parametrize("name", METHODS)
def test_unknown_or_mistyped_config_keys_are_errors(name):
    cls = get_config_class(name)
    with pytest.raises(ConfigError, match="no_such_key"):
        from_dict(cls, {"no_such_key": 1})
    with pytest.raises(ConfigError, match="no_such_key"):
        build_method(name, {"no_such_key": 1}, facts_for(25.0), preset="debug")
    with pytest.raises(ConfigError):
        build_config(name, {"audio_encoder.no_such_key": True}, preset="debug")
    some_int = next(k for k, v in flatten(cls.preset("debug")).items() if type(v) is int)
    with pytest.raises(ConfigError, match=some_int.split(".")[-1]):
        build_config(name, {some_int: "many"}, preset="debug")


# --------------------------------------------------------------------------------------
# Training contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", FPS_CASES)
@pytest.mark.parametrize("name", METHODS)
def test_forward_returns_scalar_loss_and_flat_logs(name, fps):
    model = build(name, fps).train()
    assert model.stages and model.stage == model.stages[0]
    loss, logs = model(tiny_batch(fps))
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad
    assert torch.isfinite(loss)
    assert isinstance(logs, dict) and logs
    for key, value in logs.items():
        assert isinstance(key, str) and type(value) is float and math.isfinite(value), (key, value)
    assert math.isclose(logs["loss"], float(loss.detach()), rel_tol=1e-6)
    weights = getattr(model.config, "loss_weights", None)
    if weights is not None:
        for term in flatten(weights):
            assert term in logs and f"{term}_weighted" in logs, term


@pytest.mark.parametrize("name", METHODS)
def test_one_optimizer_step_changes_parameters(name):
    model = build(name, 25.0).train()
    trainable = model.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    loss, _ = model(tiny_batch(25.0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True))
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(frozen_before[n], p.detach()), f"frozen parameter {n} changed"


# --------------------------------------------------------------------------------------
# Inference contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", FPS_CASES)
@pytest.mark.parametrize("name", METHODS)
def test_generate_is_deterministic_without_grad_and_has_the_right_length(name, fps):
    model = build(name, fps).train()
    tmpl = _template("S2")
    for seconds in (1.0, 2.3):
        clip = make_clip("S2", seconds, fps, 5)
        n = clip.audio.shape[0]
        expected = model.frames_for_audio(n)
        assert abs(expected - seconds * fps) <= 2
        out1 = model.generate(torch.from_numpy(clip.audio), torch.from_numpy(tmpl))
        out2 = model.generate(clip.audio[None], tmpl)  # numpy, (1, S)
        v = out1["vertices"]
        assert isinstance(v, torch.Tensor) and v.shape == (expected, V, 3)
        assert not v.requires_grad and torch.isfinite(v).all()
        assert torch.equal(v, out2["vertices"])
    assert model.training, "generate must restore the training mode"


# --------------------------------------------------------------------------------------
# Style contract
# --------------------------------------------------------------------------------------


def _reference(fps: float) -> Clip:
    return make_clip("U1", 1.2, fps, 7)


@pytest.mark.parametrize("name", METHODS)
def test_style_state_round_trips_and_drives_generate(name):
    fps = 25.0
    model = build(name, fps).eval()
    ref = _reference(fps)
    audio = make_clip("U1", 1.0, fps, 8).audio
    for state in (model.encode_style(ref), model.adapt(ref)):
        check_style_state(state, method=model.name, version=model.style_version)
        buf = io.BytesIO()
        torch.save(state, buf)
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        assert loaded.keys() == state.keys()
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, loaded[k])
            else:
                assert v == loaded[k] and type(v) is type(loaded[k])
        buf2 = io.BytesIO()
        save_style_state(state, buf2)
        assert load_style_state(buf2.getvalue(), method=model.name).keys() == state.keys()
        a = model.generate(audio, ref.template, style=state)["vertices"]
        b = model.generate(audio, ref.template, style=loaded)["vertices"]
        assert torch.equal(a, b)
        with pytest.raises(StyleStateError):
            model.generate(audio, ref.template, style={**state, "method": "someone-else"})


@pytest.mark.parametrize("name", METHODS)
def test_encode_style_and_adapt_never_mutate_the_model(name):
    model = build(name, 25.0).train()
    # Make the output depend on everything (e.g. zero-initialised output layers).
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = snapshot(model)
    ref = _reference(25.0)
    model.encode_style(ref)
    model.adapt(ref)
    assert_same_state(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_check_style_state_rejects_bad_states():
    good = {"method": "m", "version": 1, "v": torch.zeros(3), "k": "onehot", "i": 2, "f": 0.5}
    assert check_style_state(good) is good
    bad = [
        [],
        {"version": 1},
        {"method": "m"},
        {"method": "m", "version": "1"},
        {"method": "m", "version": 1, "x": [1, 2]},
        {"method": "m", "version": 1, "x": np.zeros(2)},
        {"method": "m", "version": 1, "x": torch.tensor([float("nan")])},
        {"method": "m", "version": 1, "x": float("inf")},
        {"method": "m", "version": 1, 3: "x"},
    ]
    for state in bad:
        with pytest.raises(StyleStateError):
            check_style_state(state)
    with pytest.raises(StyleStateError, match="method"):
        check_style_state(good, method="other")
    with pytest.raises(StyleStateError, match="version"):
        check_style_state(good, version=2)
    with pytest.raises(StyleStateError):
        load_style_state(b"not a torch file")
