"""The method contract (DESIGN.md "Method", specs/README.md G2-G5, methods/README.md), for
every registered method.

Each contract check runs over ``available_methods()`` with the method's ``debug`` preset on
a tiny in-memory corpus (V = 20, three training subjects) at 25 and 30 fps, so a method
added to the registry is held to the same contract without touching this file. The checks
are also collected in ``CONTRACT_CHECKS``: the worked example of ``methods/README.md`` is
extracted, registered under its name for one test and run through all of them, so the
documentation cannot drift from the contract. FLAME-parameter methods (``template_input =
"shape"``) get the same clips (they carry ``params`` and ``head_pose``) with parameter-corpus
facts and a seeded surrogate face model of V vertices injected with ``set_face_model``.

Two static checks close the loop: no module of the platform outside ``methods/`` probes a
method or a method config with ``getattr`` / ``hasattr`` (the base declares every hook), and
no method keeps a hook the platform no longer calls (e.g. ``lr_multiplier``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    register_method,
    unregister_method,
)
from talkmesh.methods.base import (
    DataFacts,
    MethodConfig,
    MotionMethod,
    StageSchedule,
    StyleStateError,
    check_style_state,
    load_style_state,
    save_style_state,
)

REPO = Path(__file__).resolve().parents[1]
METHODS = available_methods()
V = 20
SUBJECTS = ("S1", "S2", "S3")
FPS_CASES = [25.0, 30.0]
# Hooks the platform used to find by probing and no longer calls; no method may define them.
LEGACY_HOOKS = ("lr_multiplier",)

# Every contract check, in definition order; test_readme_example_passes_the_contract runs
# them on the README's example method. A check takes ``name`` (and ``fps`` where it is
# parametrised over FPS_CASES) and returns nothing.
CONTRACT_CHECKS: list[Callable[..., None]] = []


def contract(check: Callable[..., None]) -> Callable[..., None]:
    """Register ``check`` in CONTRACT_CHECKS (it stays a normal, parametrised test)."""
    CONTRACT_CHECKS.append(check)
    return check


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
    return get_method(name).template_input == "shape"


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


def perturb(model: MotionMethod, seed: int = 0) -> MotionMethod:
    """Make the output depend on every trainable parameter (e.g. zero-initialised output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
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


@contract
@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip_and_presets(name):
    cls = get_config_class(name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    for preset in cls.PRESETS:
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


@contract
@pytest.mark.parametrize("name", METHODS)
def test_config_is_a_method_config_with_a_debug_preset(name):
    cls = get_config_class(name)
    assert issubclass(cls, MethodConfig), f"{cls.__name__} must subclass MethodConfig"
    assert "preset" not in vars(cls), "the presets factory belongs to MethodConfig; list PRESETS instead"
    assert "debug" in cls.PRESETS and len(set(cls.PRESETS)) == len(cls.PRESETS)
    for preset in cls.PRESETS:
        assert isinstance(inspect.getattr_static(cls, preset, None), classmethod), (
            f"preset {preset!r} is not a classmethod of {cls.__name__}"
        )
        assert type(cls.preset(preset)) is cls
    label = cls.__name__.removesuffix("Config")
    with pytest.raises(ValueError, match=rf"unknown {label} preset 'no-such-preset'; presets: \["):
        cls.preset("no-such-preset")
    assert isinstance(cls.reads_face_model_file, bool)
    if not cls.reads_face_model_file:  # the jobs never ask it: it must not want a file either
        assert cls.debug().face_model_overrides("/corpus/flame.npz") == {}
    build(name, 25.0)  # the debug preset builds


@contract
@pytest.mark.parametrize("name", METHODS)
def test_class_declarations_are_valid(name):
    cls = get_method(name)
    assert issubclass(cls, MotionMethod) and not inspect.isabstract(cls)
    assert cls.name == name, "the registry name is the class's name"
    assert isinstance(cls.config_class, type) and issubclass(cls.config_class, MethodConfig)
    assert type(cls.style_version) is int and cls.style_version >= 1
    assert isinstance(cls.stages, tuple) and cls.stages and len(set(cls.stages)) == len(cls.stages)
    assert all(isinstance(s, str) and s for s in cls.stages)
    assert cls.conditioning in ("reference", "onehot")
    assert cls.template_input in ("vertices", "shape")
    assert type(cls.trains_on_vertices) is bool and type(cls.supports_style_mixing) is bool
    assert cls.supports_style_mixing == (cls.mix_styles is not MotionMethod.mix_styles), (
        "supports_style_mixing must be True exactly when mix_styles is implemented"
    )
    assert isinstance(inspect.getattr_static(cls, "reference_seconds"), property)
    params = inspect.signature(cls.generate).parameters
    for option in cls.generate_options:  # each listed option is a keyword-only argument of generate
        assert option in params and params[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    adapt_params = inspect.signature(cls.adapt).parameters
    for option in cls.style_options:  # each listed option is a keyword-only argument of adapt
        assert option in adapt_params and adapt_params[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    assert isinstance(cls.method_metric_names, tuple) and all(isinstance(k, str) for k in cls.method_metric_names)
    assert bool(cls.method_metric_names) == (cls.method_metrics is not MotionMethod.method_metrics), (
        "method_metric_names must be non-empty exactly when method_metrics is implemented"
    )
    seconds = build(name, 25.0).reference_seconds
    assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


@contract
@pytest.mark.parametrize("name", METHODS)
def test_no_legacy_hooks(name):
    """Hooks the platform no longer calls would be silently ignored: declare the base's instead
    (``lr_multiplier`` -> ``MethodConfig.lr_factor`` and ``MotionMethod.on_epoch_start``)."""
    cls = get_method(name)
    for hook in LEGACY_HOOKS:
        assert not hasattr(cls, hook), f"{cls.__name__}.{hook}: use the MotionMethod/MethodConfig hooks"
        assert not hasattr(cls.config_class, hook), f"{cls.config_class.__name__}.{hook}: use MethodConfig hooks"


@contract
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


@contract
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


@contract
@pytest.mark.parametrize("name", METHODS)
def test_one_optimizer_step_changes_parameters(name):
    model = build(name, 25.0).train()
    trainable = model.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    opt = model.config.build_optimizer(trainable, stage=model.stage, lr=1e-3, weight_decay=0.0)
    loss, _ = model(tiny_batch(25.0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True))
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(frozen_before[n], p.detach()), f"frozen parameter {n} changed"


@contract
@pytest.mark.parametrize("name", METHODS)
def test_stage_schedule_is_valid_for_every_stage(name):
    cls, stages = get_config_class(name), get_method(name).stages
    for preset in cls.PRESETS:
        cfg = cls.preset(preset)
        assert cfg.stage_schedule("") == cfg.stage_schedule(stages[0]), '"" is the first stage'
        for stage in stages:
            sched = cfg.stage_schedule(stage)
            assert isinstance(sched, StageSchedule), (preset, stage)
            for field in ("epochs", "batch_size", "grad_accum"):
                value = getattr(sched, field)
                assert type(value) is int and value >= 1, (preset, stage, field, value)
            assert isinstance(sched.lr, float) and math.isfinite(sched.lr) and sched.lr > 0, (preset, stage)
            for epoch in range(min(sched.epochs, 200)):
                factor = cfg.lr_factor(stage, epoch)
                assert isinstance(factor, float) and math.isfinite(factor) and factor > 0, (preset, stage, epoch)


@contract
@pytest.mark.parametrize("name", METHODS)
def test_build_optimizer_covers_the_trainable_parameters(name):
    model = build(name, 25.0)
    for stage in model.stages:
        model.set_stage(stage)
        params = model.trainable_parameters()
        if not params:  # a fit-only stage: the loop builds no optimizer
            continue
        lr = model.config.stage_schedule(stage).lr
        opt = model.config.build_optimizer(params, stage=stage, lr=lr, weight_decay=0.0)
        assert isinstance(opt, torch.optim.Optimizer)
        in_opt = [p for group in opt.param_groups for p in group["params"]]
        assert len(in_opt) == len({id(p) for p in in_opt}), f"{stage}: a parameter appears twice"
        assert {id(p) for p in in_opt} == {id(p) for p in params}, f"{stage}: optimizer != trainable_parameters()"
        assert all(math.isclose(group["lr"], lr) for group in opt.param_groups), stage


# --------------------------------------------------------------------------------------
# Inference contract
# --------------------------------------------------------------------------------------


@contract
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


@contract
@pytest.mark.parametrize("name", METHODS)
def test_onehot_methods_decode_every_condition(name):
    """``conditioning == "onehot"``: ``generate_conditions`` gives one entry per subject, in
    the order asked, each what ``generate`` gives under that subject's one-hot."""
    model = build(name, 25.0)
    if model.conditioning != "onehot":
        return
    perturb(model).eval()
    clip = make_clip("U1", 1.1, 25.0, 4)
    order = [SUBJECTS[2], SUBJECTS[0], SUBJECTS[1]]
    outs = model.generate_conditions(clip.audio, clip.template, order)
    assert list(outs) == order
    frames = model.frames_for_audio(clip.audio.shape[0])
    for subject, verts in outs.items():
        alone = model.generate(clip.audio, clip.template, subject)["vertices"]
        assert verts.shape == alone.shape == (frames, V, 3)
        torch.testing.assert_close(verts, alone, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Style contract
# --------------------------------------------------------------------------------------


def _reference(fps: float) -> Clip:
    return make_clip("U1", 1.2, fps, 7)


@contract
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


@contract
@pytest.mark.parametrize("name", METHODS)
def test_encode_style_and_adapt_never_mutate_the_model(name):
    model = perturb(build(name, 25.0).train())
    before = snapshot(model)
    ref = _reference(25.0)
    model.encode_style(ref)
    model.adapt(ref)
    assert_same_state(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters())
    assert model.training


@contract
@pytest.mark.parametrize("name", METHODS)
def test_style_mixing_matches_the_declaration(name):
    """``supports_style_mixing`` methods mix StyleStates into one that drives ``generate``
    (all weight on one style = that style); the others raise NotImplementedError."""
    fps = 25.0
    model = perturb(build(name, fps)).eval()
    a, b = model.encode_style(_reference(fps)), model.encode_style(make_clip("U1", 1.2, fps, 9))
    if not model.supports_style_mixing:
        with pytest.raises(NotImplementedError):
            model.mix_styles([a, b], [0.5, 0.5])
        return
    audio, tmpl = make_clip("U1", 1.0, fps, 8).audio, _reference(fps).template
    mixed = model.mix_styles([a, b], [0.3, 0.7])
    check_style_state(mixed, method=model.name, version=model.style_version)
    out = model.generate(audio, tmpl, mixed)["vertices"]
    assert out.shape == (model.frames_for_audio(audio.shape[0]), V, 3) and torch.isfinite(out).all()
    only_a = model.generate(audio, tmpl, model.mix_styles([a, b], [1.0, 0.0]))["vertices"]
    torch.testing.assert_close(only_a, model.generate(audio, tmpl, a)["vertices"], rtol=1e-4, atol=1e-5)


@contract
@pytest.mark.parametrize("name", METHODS)
def test_encode_style_of_a_training_subject(name):
    """``encode_style(subject=...)`` (the service resolves training speakers in a style mix
    this way) gives a StyleState that drives ``generate``, after training has seen the subject."""
    fps = 25.0
    model = build(name, fps).train()
    model(tiny_batch(fps))  # a training step that sees S1 (some methods record subject styles)
    model.eval()
    state = model.encode_style(subject="S1")
    check_style_state(state, method=model.name, version=model.style_version)
    clip = make_clip("S1", 1.0, fps, 3)
    out = model.generate(clip.audio, clip.template, state)["vertices"]
    assert out.shape == (model.frames_for_audio(clip.audio.shape[0]), V, 3)


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


# --------------------------------------------------------------------------------------
# Static checks: the platform calls methods through the base type only
# --------------------------------------------------------------------------------------

PLATFORM = REPO / "platform" / "talkmesh"
# Packages that hold a method (the loop, evaluator, jobs, service, tools) but must not probe it.
CALLER_PACKAGES = ("train", "eval", "ops", "serving", "dev")
# Variables that hold a method or a method config in those packages.
METHOD_VARIABLES = frozenset({"method", "model", "mc", "cfg", "config"})


def probes_in(source: str) -> list[tuple[int, str]]:
    """(line, call) of every ``getattr`` / ``hasattr`` whose first argument is a name in
    METHOD_VARIABLES or an attribute access ending in one (``self.method``, ``exp.config``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        if node.func.id not in ("getattr", "hasattr"):
            continue
        target = node.args[0]
        label = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""
        if label in METHOD_VARIABLES:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_probe_scanner_finds_probes():
    source = (
        "a = getattr(method, 'fit_stage', None)\n"
        "b = hasattr(self.method, 'mix_styles')\n"
        "c = getattr(mc, 'stage_schedule')\n"
        "d = getattr(self, 'name')\n"
        "e = getattr(layer, 'faces', None)\n"
    )
    assert [line for line, _ in probes_in(source)] == [1, 2, 3]


def test_platform_never_probes_methods():
    """The loop, evaluator, jobs, service and tools call the hooks ``MotionMethod`` and
    ``MethodConfig`` declare; none of them asks a method or its config whether it has one."""
    probes = [
        f"{path.relative_to(REPO)}:{line}: {call}"
        for package in CALLER_PACKAGES
        for path in sorted((PLATFORM / package).rglob("*.py"))
        for line, call in probes_in(path.read_text(encoding="utf-8"))
    ]
    assert not probes, "declare the hook on the base class and call it:\n" + "\n".join(probes)


# --------------------------------------------------------------------------------------
# The worked example of methods/README.md passes the contract
# --------------------------------------------------------------------------------------

README = PLATFORM / "methods" / "README.md"


def readme_block(marker: str, language: str) -> str:
    """The fenced ``language`` block that follows the line ``<!-- marker -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```{language}\n(.*?)\n```", text, re.DOTALL)
    assert found, f"methods/README.md has no {language} block after <!-- {marker} -->"
    return found.group(1) + "\n"


def run_contract_checks(name: str) -> None:
    for check in CONTRACT_CHECKS:
        if "fps" in inspect.signature(check).parameters:
            for fps in FPS_CASES:
                check(name, fps)
        else:
            check(name)


def test_readme_example_passes_the_contract(tmp_path, monkeypatch):
    """The README's example method file, its registry line and its YAML preset, run through
    every contract check as a registered method."""
    module = "readme_example_method"
    (tmp_path / f"{module}.py").write_text(readme_block("example: method file", "python"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry_line = readme_block("example: registry line", "python").strip()
    found = re.fullmatch(r'"(\w+)": "([\w.]+):(\w+)",', registry_line)
    assert found, f"the README's registry line is not one `\"name\": \"module:Class\",` entry: {registry_line}"
    name, cls_name = found.group(1), found.group(3)
    assert name not in METHODS, f"{name!r} is registered for real: the README example should use another name"
    register_method(name, f"{module}:{cls_name}")
    try:
        assert name in available_methods()
        run_contract_checks(name)
        from talkmesh.train.config import ExperimentConfig, load_experiment

        preset = tmp_path / "small.yaml"
        preset.write_text(readme_block("example: preset", "yaml"), encoding="utf-8")
        exp = load_experiment(preset)
        assert isinstance(exp, ExperimentConfig) and exp.method == name
        assert isinstance(exp.method_config(), get_config_class(name))
    finally:
        unregister_method(name)
        sys.modules.pop(module, None)
    assert name not in available_methods()
