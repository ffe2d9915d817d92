"""AdaMesh specifics (specs/adamesh.md §4, §6-§9, §14) on the debug preset.

Fast tests use the contract module's tiny in-memory clips; the staged job test
(``@pytest.mark.slow``) runs jobs/adamesh.py on the synthetic corpus. The learning checks
(§14.5-§14.9, training all four stages) are in test_adamesh_learning.py.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pytest
import torch

from talkmesh.config import ConfigError, DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.dataset import ClipDataset, collate_clips
from talkmesh.data.regions import Regions
from talkmesh.methods import build_method
from talkmesh.methods.adamesh import (
    AdaMesh,
    AdaMeshConfig,
    ExpressionAdapter,
    log_mel,
    mel_filterbank,
    molora_selector,
    pose_style_distances,
)
from talkmesh.methods.base import DataFacts, StageSchedule, StyleStateError, check_style_state
from talkmesh.nn.lora import MoLoRA, adapter_parameters, apply_adapters, molora_parameter_count
from talkmesh.train.config import load_experiment
from test_methods_contract import SUBJECTS, V, make_clip, tiny_face_model

FACTS = DataFacts(fps=25.0, num_vertices=V, train_subjects=SUBJECTS, motion="params", param_dim=53, has_head_pose=True)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def model(facts: DataFacts = FACTS, seed: int = 0, face: bool = True, **overrides: object) -> AdaMesh:
    torch.manual_seed(seed)
    m = build_method("adamesh", dict(overrides), facts, preset="debug")
    assert isinstance(m, AdaMesh)
    if face:
        m.set_face_model(tiny_face_model())
    return m


def perturb(m: AdaMesh, scale: float = 0.05) -> None:
    """Move every trained (non-MoLoRA) weight so outputs depend on all of them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in ("expression", "pose_vq", "posegpt"):
            m.set_stage(stage)
            for p in m.trainable_parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    m.set_stage("expression")


def batch(fps: float = 25.0, seconds: tuple[float, float] = (1.6, 1.2)) -> dict:
    clips = [make_clip("S1", seconds[0], fps, 1), make_clip("S3", seconds[1], fps, 2)]
    return collate_clips(clips, [SUBJECTS.index(c.subject) for c in clips])


def serve_reference(seconds: float = 2.0, head_pose: bool = True) -> dict:
    """A reference exactly as the Serve app sends it: numpy arrays, 16 kHz audio."""
    clip = make_clip("U1", seconds, 25.0, 7)
    rng = np.random.default_rng(0)
    ref = {
        "audio": clip.audio.astype(np.float32),
        "params": (clip.params + 0.1 * rng.normal(size=clip.params.shape)).astype(np.float32),
    }
    if head_pose:
        t = np.arange(clip.num_frames) / 25.0
        ref["head_pose"] = (0.05 * np.stack([np.sin(t), np.cos(2 * t), 0 * t], 1)).astype(np.float32)
    return ref


# --------------------------------------------------------------------------------------
# Shapes and configuration (§12, §14.1)
# --------------------------------------------------------------------------------------


def test_shapes_of_every_part():
    m = model().eval()
    b = batch()
    t = int(b["motion_lengths"].max())
    both = m._audio_inputs(b["audio"], b["audio_lengths"], b["motion_lengths"])
    h, mel = m.audio_encoder.hidden_size, m.config.mel_bins
    assert both.shape == (2, 2 * t, h + mel)
    y = m._norm_expr(b["params"])
    mid, post, style, ident = m.expression(both, b["motion_mask"], y, b["motion_mask"], torch.zeros(2, 100))
    assert mid.shape == post.shape == (2, t, 53) and style.shape == ident.shape == (2, m.config.expression.d_model)
    pose = torch.randn(2, 48, 3)
    rec, vq = m.pose_vq(pose)
    assert rec.shape == (2, 48, 3) and vq.indices.shape == (2, 12)
    tokens = m.posegpt.audio_tokens(torch.randn(2, 96, h + mel))
    assert tokens.shape == (2, 12, m.config.posegpt.d)
    logits = m.posegpt(tokens, vq.indices, torch.tensor([0, 2]))
    assert logits.shape == (2, 12, m.config.pose_vq.codebook_size)
    out = m.generate(make_clip("S2", 1.3, 25.0, 3).audio, None)
    n = m.frames_for_audio(int(1.3 * 16000))
    assert out["params"].shape == (n, 53) and out["head_pose"].shape == (n, 3) and out["vertices"].shape == (n, V, 3)


def test_frame_rules_for_25_and_30_fps():
    m25 = model(face=False)
    assert m25.alignment == "trim"
    assert m25.frames_for_audio(160000) == (((160000 - 400) // 320) + 1) // 2 == 249  # §8: floor(frames / 2)
    m30 = model(dataclasses.replace(FACTS, fps=30.0), face=False)
    assert m30.alignment == "interp" and abs(m30.frames_for_audio(160000) - 300) <= 1
    with pytest.raises(ValueError, match="trim"):
        model(dataclasses.replace(FACTS, fps=30.0), audio_alignment="trim")


def test_log_mel_matches_the_hubert_frame_count():
    fb = mel_filterbank(201, 16)
    assert fb.shape == (16, 201) and torch.all(fb >= 0) and torch.all(fb.sum(1) > 0)
    audio = torch.randn(2, 16000)
    mel = log_mel(audio, torch.tensor([16000, 8000]), fb)
    assert mel.shape == (2, (16000 - 400) // 320 + 1, 16)
    assert torch.all(mel[1, (8000 - 400) // 320 + 1 :] == 0)


def test_config_validation_and_stage_schedules():
    cfg = AdaMeshConfig()
    assert cfg.molora.ranks == (1, 2, 4, 8) and cfg.posegpt.layers == 6 and cfg.pose_index.kmeans_k == 512
    assert cfg.stage_schedule("expression") == StageSchedule(epochs=50, batch_size=8, lr=1e-4)
    assert cfg.stage_schedule("") == cfg.stage_schedule("expression")
    assert cfg.stage_schedule("pose_vq") == StageSchedule(epochs=200, batch_size=32, lr=1e-4)
    assert cfg.stage_schedule("posegpt") == StageSchedule(epochs=100, batch_size=16, lr=1e-4)
    assert cfg.stage_schedule("pose_index") == StageSchedule(epochs=1, batch_size=8, lr=1e-4)
    with pytest.raises(ValueError, match="unknown stage"):
        cfg.stage_schedule("nope")
    for section, bad, match in (
        ("molora", {"ranks": ()}, "ranks"),
        ("molora", {"targets": ("pw1", "attn")}, "targets"),
        ("pose_vq", {"downsample": 3}, "downsample"),
        ("pose_vq", {"window": 10}, "window"),
        ("expression", {"heads": 3}, "heads"),
        ("adaptation", {"steps": -1}, "steps"),
        ("adaptation", {"schedule": "linear"}, "schedule"),
        ("adaptation", {"holdout_s": -1.0}, "holdout_s"),
        ("adaptation", {"patience": 0}, "patience"),
        ("posegpt", {"dropout": 1.0}, "dropout"),
        ("pose_index", {"kmeans_k": 0}, "kmeans_k"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(getattr(cfg, section), **bad)
    for bad, match in (
        ({"audio_encoder": dataclasses.replace(cfg.audio_encoder, trainable_layers=-1)}, "frozen"),
        ({"posegpt": dataclasses.replace(cfg.posegpt, max_steps=8)}, "max_steps"),
        ({"lr_step": -1}, "lr_step"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(cfg, **bad)
    with pytest.raises(ConfigError, match=r"model\.pose_vq: window=10"):  # sections errors name their path
        load_experiment(None, ["method=adamesh", "preset=debug", "model.pose_vq.window=10"]).method_config()
    # The experiment schedule follows train.stage; explicit train.* values win.
    base = ["method=adamesh", "preset=debug", "model.pose_vq.epochs=7", "model.posegpt.lr=0.002"]
    assert load_experiment(None, [*base, "train.stage=pose_vq"]).schedule().epochs == 7
    assert load_experiment(None, [*base, "train.stage=posegpt"]).schedule().lr == 0.002
    assert load_experiment(None, [*base, "train.stage=posegpt", "train.lr=0.1"]).schedule().lr == 0.1


def test_lr_factor_is_step_lr_per_stage():
    cfg = AdaMeshConfig.debug()
    cfg = dataclasses.replace(cfg, lr_step=5, lr_gamma=0.5, pose_vq=dataclasses.replace(cfg.pose_vq, lr_step=20))
    for stage in ("", "expression"):
        assert [cfg.lr_factor(stage, e) for e in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert cfg.lr_factor("pose_vq", 19) == 1.0 and cfg.lr_factor("pose_vq", 20) == 0.5
    assert cfg.lr_factor("posegpt", 100) == 1.0 and cfg.lr_factor("pose_index", 100) == 1.0
    assert AdaMeshConfig.debug().lr_factor("expression", 50) == 1.0  # lr_step 0: constant


def test_contract_declarations_and_face_model_overrides():
    assert AdaMesh.template_input == "shape" and AdaMesh.trains_on_vertices is False
    m = model(face=False, reference_seconds=4.0)
    assert m.reference_seconds == 4.0
    assert AdaMeshConfig.reads_face_model_file
    assert AdaMeshConfig().face_model_overrides("/corpus/flame.npz") == {"face_model": "/corpus/flame.npz"}
    assert AdaMeshConfig(face_model="/own/flame.npz").face_model_overrides("/corpus/flame.npz") == {}
    with pytest.raises(ValueError, match="unknown AdaMesh preset"):
        AdaMeshConfig.preset("nope")


def test_checkpoints_saved_with_the_flat_config_of_stop_7_still_load(tmp_path):
    """method.json written before the config was grouped into sections: the debug preset as
    that version saved it (tests/data) loads into the same config and the same weights."""
    import json
    from pathlib import Path

    from talkmesh.config import from_dict, to_dict
    from talkmesh.train.checkpoint import METHOD_FILE, load_method, save_method

    legacy = json.loads((Path(__file__).parent / "data" / "adamesh_config_stop7_debug.json").read_text())
    assert "pose_vq_epochs" in legacy and "pose_vq" not in legacy  # really the old, flat form
    # Fields added since (e.g. hubert_chunk_*) take their defaults; the adaptation keeps the
    # crops it was saved with (deviation 16 changed the preset's).
    then = dataclasses.replace(
        AdaMeshConfig.debug(),
        adaptation=dataclasses.replace(AdaMeshConfig.debug().adaptation, batch=4, crop_s=4.0, steps=150),
    )
    assert from_dict(AdaMeshConfig, AdaMeshConfig.upgrade(legacy)) == then
    assert AdaMeshConfig.upgrade(to_dict(AdaMeshConfig.debug())) == to_dict(AdaMeshConfig.debug())

    m = model(face=False)
    save_method(tmp_path, m)
    info = json.loads((tmp_path / METHOD_FILE).read_text())
    (tmp_path / METHOD_FILE).write_text(json.dumps({**info, "config": legacy}))
    loaded = load_method(tmp_path)
    assert loaded.config == then
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.method.state_dict()[k], v), k


# --------------------------------------------------------------------------------------
# MoLoRA (§4, §14.2-§14.3)
# --------------------------------------------------------------------------------------


def test_molora_is_an_exact_no_op_at_initialisation():
    cfg = AdaMeshConfig.debug()
    torch.manual_seed(0)
    plain = ExpressionAdapter(cfg.expression, 48).eval()
    torch.manual_seed(0)
    wrapped = ExpressionAdapter(cfg.expression, 48)
    apply_adapters(wrapped, molora_selector(cfg.molora.targets), lambda s: MoLoRA(s, cfg.molora.ranks))
    wrapped.eval()
    x, mask = torch.randn(2, 20, 48), torch.ones(2, 10, dtype=torch.bool)
    ref, shape = torch.randn(2, 6, 53), torch.randn(2, 100)
    a = plain(x, mask, ref, mask[:, :6], shape)
    b = wrapped(x, mask, ref, mask[:, :6], shape)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-7)


def test_molora_placement_and_parameter_count_at_paper_sizes():
    cfg = AdaMeshConfig()
    adapter = ExpressionAdapter(cfg.expression, 8)  # the audio width does not touch the adapted layers
    names = apply_adapters(adapter, molora_selector(cfg.molora.targets), lambda s: MoLoRA(s, cfg.molora.ranks))
    assert len(names) == 27  # 9 Conformer blocks x (pw1, dw, pw2), §4.2
    assert {n.split(".")[0] for n in names} == {"audio_encoder", "style_encoder", "identity_encoder", "decoder"}
    params = adapter_parameters(adapter)
    assert sum(p.numel() for p in params.values()) == 209493
    shapes = [adapter.get_submodule(n).base.weight.shape for n in names]
    assert molora_parameter_count(shapes, cfg.molora.ranks) == 209493
    # The method places its experts with this selector: the debug model's adapted layers.
    m = model(face=False)
    select = molora_selector(m.config.molora.targets)
    layers = (torch.nn.Conv1d, torch.nn.Linear)
    debug = ExpressionAdapter(m.config.expression, 48)
    expected = [n for n, mod in debug.named_modules() if isinstance(mod, layers) and n and select(n, mod)]
    assert expected and m.molora_layers == expected


def test_trainable_parameters_per_stage():
    m = model(face=False)
    molora = {id(p) for p in m.adaptation_parameters().values()}
    groups = {}
    for stage in m.stages:
        m.set_stage(stage)
        params = m.trainable_parameters()
        assert all(p.requires_grad for p in params)
        assert not molora & {id(p) for p in params}, f"MoLoRA trains in {stage}"
        groups[stage] = {id(p) for p in params}
    assert groups["pose_index"] == set()
    assert groups["expression"] == {id(p) for p in m.expression.parameters()} - molora
    assert groups["pose_vq"] == {id(p) for p in m.pose_vq.parameters()}
    assert groups["posegpt"] == {id(p) for p in m.posegpt.parameters()}
    with pytest.raises(RuntimeError, match="fit_stage"):
        m(batch())
    assert sorted(m.state_dict()) == sorted(model(face=False).state_dict())  # HuBERT not in the state dict
    assert not any(k.startswith("audio_encoder") for k in m.state_dict())


def test_pretraining_step_leaves_molora_at_zero():
    m = model(face=False).train()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss, logs = m(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) >= {"l1_mid", "l1_post", "l1_mid_weighted", "l1_post_weighted", "loss"}
    for name, p in m.adaptation_parameters().items():
        if name.endswith(".B"):
            assert torch.count_nonzero(p) == 0, name
        assert p.grad is None, name


# --------------------------------------------------------------------------------------
# Adaptation and the style interface (§6, §9, §14.4)
# --------------------------------------------------------------------------------------


def test_adapt_trains_only_molora_and_never_mutates_the_model():
    m = model()
    perturb(m)
    m.train()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    audio = make_clip("S2", 1.2, 25.0, 4).audio
    out_before = m.generate(audio, None)
    ref = serve_reference()
    state = m.adapt(ref, steps=6)
    for k, v in m.state_dict().items():  # weights, BatchNorm running statistics, buffers
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in m.parameters())
    assert m.training
    for k, v in m.generate(audio, None).items():
        assert torch.equal(v, out_before[k]), k
    names = {f"molora/{k}" for k in m.adaptation_parameters()}
    assert names == {k for k in state if k.startswith("molora/")}
    moved = [k for k in names if k.endswith(".B") and torch.count_nonzero(state[k]) > 0]
    assert moved, "adaptation left every MoLoRA B at zero"
    for k in names:  # only MoLoRA tensors are in the state; the model's own stay as they were
        name = k[len("molora/") :]
        assert state[k].shape == m.adaptation_parameters()[name].shape
    assert state["adapt_steps"] == 6 and state["kind"] == "adapted"
    assert state["adapt_loss_last"] < state["adapt_loss_first"]
    adapted = m.generate(audio, None, style=state)
    assert not torch.equal(adapted["params"], m.generate(audio, None, style=m.encode_style(ref))["params"])


def test_adapt_is_seeded_deterministic_and_bounded():
    m = model(**{"adaptation.crop_s": 1.0})
    perturb(m)
    ref = serve_reference(seconds=3.0)  # longer than the crops: the seed picks where they start
    a, b = m.adapt(ref, steps=4, seed=3), m.adapt(ref, steps=4, seed=3)
    c = m.adapt(ref, steps=4, seed=4)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("molora/")), "another seed draws other crops"
    assert m.adapt(ref, steps=0)["adapt_steps"] == 0
    t0 = time.perf_counter()
    bounded = m.adapt(ref, steps=10_000, max_seconds=0.3)
    assert time.perf_counter() - t0 < 5.0 and 0 < bounded["adapt_steps"] < 10_000
    assert bounded["adapt_seconds"] < 5.0
    with pytest.raises(ValueError, match="max_seconds"):
        m.adapt(ref, max_seconds=0)


def test_adapt_runs_hubert_once_on_the_reference(monkeypatch):
    """The optimisation's audio inputs and the pose retrieval share one HuBERT pass."""
    m = model()
    perturb(m)
    with torch.no_grad():  # a filled pose index, so retrieval runs its full path
        g = torch.Generator().manual_seed(0)
        m.cluster_centroids.copy_(torch.randn(m.cluster_centroids.shape, generator=g))
        m.pose_style_matrix.copy_(torch.randn(m.pose_style_matrix.shape, generator=g))
        m.pose_style_counts.fill_(1.0)
        m.fitted.fill_(True)
    calls = []
    forward = type(m._hubert).forward
    monkeypatch.setattr(type(m._hubert), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    state = m.adapt(serve_reference(), steps=2)
    assert state["pose_selection"] == "masked cluster distance"
    assert len(calls) == 1
    m.encode_style(serve_reference())
    assert len(calls) == 2


def test_adapt_stops_early_on_the_held_out_tail_and_keeps_the_best_parameters():
    """A learning rate large enough to overfit 2 s of reference: the held-out L1 stops falling,
    adaptation ends ``patience`` measurements later and returns the parameters of its lowest
    held-out L1, the same as a run stopped at that step; without a tail, every step runs."""
    over = {"adaptation.holdout_s": 0.6, "adaptation.eval_every": 2, "adaptation.patience": 2, "adaptation.lr": 0.05}
    m = model(**over, **{"adaptation.crop_s": 0.5})
    perturb(m)
    ref = serve_reference(seconds=2.4)
    state = m.adapt(ref, steps=80, seed=1)
    steps, best = state["adapt_steps"], state["adapt_best_step"]
    assert steps < 80 and steps - best == 2 * 2, (steps, best)  # patience x eval_every after the best
    assert best > 0 and state["adapt_holdout_l1"] > 0
    again = m.adapt(ref, steps=best, seed=1)  # the same crops and steps up to the best one
    assert again["adapt_best_step"] == best
    for k in (k for k in state if k.startswith("molora/")):
        assert torch.equal(state[k], again[k]), k
    plain = model(**{**over, "adaptation.holdout_s": 0.0}, **{"adaptation.crop_s": 0.5})
    perturb(plain)
    full = plain.adapt(ref, steps=12, seed=1)
    assert full["adapt_steps"] == full["adapt_best_step"] == 12 and "adapt_holdout_l1" not in full
    short = m.adapt(serve_reference(seconds=1.0), steps=3)  # shorter than twice the tail: no tail
    assert "adapt_holdout_l1" not in short and short["adapt_steps"] == 3


def test_style_states_round_trip_through_weights_only_load():
    m = model()
    perturb(m)
    audio = make_clip("S2", 1.0, 25.0, 8).audio
    for ref in (serve_reference(), serve_reference(head_pose=False)):
        for state in (m.encode_style(ref), m.adapt(ref, steps=3), m.encode_style(subject="S2")):
            check_style_state(state, method="adamesh", version=1)
            buf = io.BytesIO()
            torch.save(state, buf)
            loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            assert loaded.keys() == state.keys()
            a = m.generate(audio, None, style=state)
            b = m.generate(audio, None, style=loaded)
            for k in a:
                assert torch.equal(a[k], b[k]), k
    enc = m.encode_style(serve_reference(head_pose=False))
    assert not any(k.startswith("molora/") for k in enc)
    assert enc["pose_identity"] == m.config.default_pose_identity and enc["pose_selection"].startswith("default")
    assert enc["style_vector"].shape == (m.config.expression.d_model,) and enc["ref_expression"].shape == (50, 53)


def test_bad_styles_and_references_are_clear_errors():
    m = model()
    state = m.adapt(serve_reference(), steps=1)
    audio = make_clip("S2", 1.0, 25.0, 8).audio
    name = next(k for k in state if k.startswith("molora/"))
    bad_states = [
        ({**state, "method": "faceformer"}, "method"),
        ({**state, "style_vector": torch.zeros(3)}, "style_vector"),
        ({**state, "pose_identity": 99}, "pose_identity"),
        ({**state, "num_identities": 7}, "training identities"),
        ({**state, name: torch.zeros(1)}, name),
        ({k: v for k, v in state.items() if k != name}, "MoLoRA"),
        ({**state, "molora/nope": torch.zeros(1)}, "nope"),
    ]
    for bad, match in bad_states:
        with pytest.raises(StyleStateError, match=match):
            m.generate(audio, None, style=bad)
    with pytest.raises(ValueError, match="'params'"):
        m.encode_style({"audio": audio})
    with pytest.raises(ValueError, match=r"\(T, 53\)"):
        m.adapt({"audio": audio, "params": np.zeros((10, 50), np.float32)})
    with pytest.raises(ValueError, match="head_pose"):
        m.encode_style({**serve_reference(), "head_pose": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="template"):
        m.generate(audio, np.zeros((7, 2), np.float32))
    with pytest.raises(ValueError, match="not a training subject"):
        m.generate(audio, None, style="U9")


def test_generate_templates_and_head_pose_in_vertices():
    m = model()
    perturb(m)
    audio = make_clip("S2", 1.0, 25.0, 8).audio
    layer = tiny_face_model()
    beta = torch.randn(100) * 0.5
    out = m.generate(audio, beta)
    expected = layer(beta[None], out["params"][:, :50], out["params"][:, 50:53])
    torch.testing.assert_close(out["vertices"], expected)  # FLAME(beta, expression, jaw), no head rotation
    tmpl = torch.randn(V, 3) * 0.1
    out_t = m.generate(audio, tmpl)
    # A (V, 3) mesh gets the zero-shape model's expression/jaw displacements added to it.
    neutral = layer(None, torch.zeros(1, 50), torch.zeros(1, 3))
    moved = layer(None, out_t["params"][:, :50], out_t["params"][:, 50:53])
    torch.testing.assert_close(out_t["vertices"], tmpl + moved - neutral)
    rotated = m.generate(audio, None, head_pose_in_vertices=True)
    plain = m.generate(audio, None)
    torch.testing.assert_close(rotated["params"], plain["params"])
    assert not torch.allclose(rotated["vertices"], plain["vertices"])
    no_face = model(face=False)
    assert "vertices" not in no_face.generate(audio, None)
    with pytest.warns(UserWarning, match="not found"):
        missing = model(face=False, face_model="/nonexistent/flame.npz")
        assert "vertices" not in missing.generate(audio, None)


def test_pose_style_distance_masks_absent_clusters():
    k, d = 5, 3
    ref = torch.randn(k, d)
    ref_counts = torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0])  # clusters 1 and 3 absent from the reference
    base = torch.randn(k, d)
    other = base.clone()
    other[[1, 3]] += 10.0  # differs only on clusters the reference lacks
    counts = torch.ones(2, k)
    dist, shared = pose_style_distances(ref, ref_counts, torch.stack([base, other]), counts)
    assert dist[0] == dist[1] and shared.tolist() == [3, 3]
    expected = torch.linalg.vector_norm(ref - base, dim=-1)[[0, 2, 4]].mean()
    torch.testing.assert_close(dist[0], expected)
    dist, _ = pose_style_distances(ref, ref_counts, torch.stack([base, other]), counts, min_shared=4)
    assert torch.isinf(dist).all()


# --------------------------------------------------------------------------------------
# The staged job (jobs/adamesh.py): stages as MLflow child runs, one stage re-run alone
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_staged_job_trains_evaluates_registers_and_reruns_one_stage(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from talkmesh.ops import tracking
    from talkmesh.ops.jobs import parse_args, run_job
    from talkmesh.train.checkpoint import MODEL_FILE, load_method

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = [
        "train.num_workers=0",
        "model.epochs=2",
        "model.pose_vq.epochs=1",
        "model.posegpt.epochs=1",
        "train.eval_every=1",
        "train.limit_eval_sequences=2",
        "train.preview=false",
        "train.system_metrics=false",
        f"train.storage_path={tmp_path / 'ray'}",
    ]
    out = run_job(parse_args("adamesh", [*base, "train.run_name=staged"]))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(out["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["talkmesh.stages"] == ",".join(AdaMesh.stages)
    children = tracking.child_runs(out["run_id"], uri=uri)
    assert [c["run_name"] for c in children] == [f"staged-{s}" for s in AdaMesh.stages]
    assert all(c["status"] == "FINISHED" for c in children)
    runs = {c["run_name"].split("-", 1)[1]: client.get_run(c["run_id"]) for c in children}
    for stage, run in runs.items():
        assert run.data.tags["talkmesh.stage"] == stage and run.data.params["train.stage"] == stage
    assert runs["pose_vq"].data.params["train.init_from"].endswith("epoch-0001")  # the expression run's pick
    assert "train/fit/params_frames" in runs["expression"].data.metrics
    assert "train/fit/head_pose_frames" in runs["pose_vq"].data.metrics
    assert runs["pose_index"].data.metrics["train/fit/kmeans_frames"] > 0
    assert "train/code_ce" in runs["posegpt"].data.metrics and "train/perplexity" in runs["pose_vq"].data.metrics
    # Evaluated (with the adapted row for the unseen test speakers) and registered from the parent.
    assert {"test/test-B/lve", "test/test-B/adapted/lve"} <= set(client.get_run(out["run_id"]).data.metrics)
    assert out["version"] == 1 and out["champion"] == 1
    # Its model card: the registry description and an artifact of the run, with the exact command.
    card = client.get_model_version("talkmesh-adamesh", "1").description
    assert card.startswith("# talkmesh-adamesh version 1") and "arXiv 2310.07236" in card
    stage_params = client.get_run(children[-1]["run_id"]).data.params  # the parent holds no data params
    assert "format **synthetic**" in card and stage_params["data.fingerprint"] in card
    assert "python jobs/adamesh.py --preset small train.num_workers=0" in card and "train.run_name=staged" in card
    assert "| test-B |" in card and " tm-" in card.split("| test-B |")[1].splitlines()[0]
    assert [a.path for a in client.list_artifacts(out["run_id"], "model_card")] == ["model_card/v1.md"]
    loaded = load_method(out["checkpoint"]).method
    assert loaded.stage == "pose_index" and bool(loaded.fitted.all())
    state = loaded.adapt(serve_reference_for(loaded), steps=2)
    gen = loaded.generate(np.zeros(16000, np.float32) + 0.01, None, style=state)
    assert gen["vertices"].shape[1:] == (loaded.facts.num_vertices, 3)  # face model file recorded in the config

    # Re-run PoseGPT alone on the pose_vq run's artifact; expression and prior come from it.
    rerun = run_job(
        parse_args(
            "adamesh",
            [
                "--stage",
                "posegpt",
                "--init-from",
                f"runs:/{runs['pose_vq'].info.run_id}/checkpoints/epoch-0000",
                "--no-register",
                *base,
                "train.run_name=rerun",
            ],
        ),
    )
    assert [c["run_name"] for c in tracking.child_runs(rerun["run_id"], uri=uri)] == ["rerun-posegpt"]
    before = torch.load(f"{runs['pose_vq'].data.tags['talkmesh.selected_checkpoint']}/{MODEL_FILE}", weights_only=True)
    after = torch.load(f"{rerun['checkpoint']}/{MODEL_FILE}", weights_only=True)
    for k in before:
        if k.startswith(("expression.", "pose_vq.")):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("posegpt."))


def serve_reference_for(m: AdaMesh) -> dict:
    """A Serve-shaped reference of the model's own fps: audio (S,), params (T, 53), head_pose (T, 3)."""
    t = int(round(3.0 * m.facts.fps))
    rng = np.random.default_rng(1)
    return {
        "audio": (0.1 * rng.normal(size=int(round(t * m.facts.samples_per_frame)))).astype(np.float32),
        "params": (0.2 * rng.normal(size=(t, 53))).astype(np.float32),
        "head_pose": (0.02 * rng.normal(size=(t, 3))).astype(np.float32),
    }


def _sync_worker(rank: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    from talkmesh.train.loop import _sync_buffers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = model(face=False)
        with torch.no_grad():  # each rank's own BatchNorm statistics / fitted flags
            m.expr_std.fill_(2.0 + rank)
            m.fitted[1] = bool(rank)
            m.expression.postnet.bn1.running_mean.fill_(float(rank))
        _sync_buffers(m, 2)
        queue.put((rank, float(m.expr_std[0]), bool(m.fitted[1]), float(m.expression.postnet.bn1.running_mean[0])))
    finally:
        dist.destroy_process_group()


def test_validation_syncs_rank_zero_buffers_before_scoring():
    """Under DDP each rank updates its BatchNorm statistics on its own batches; the loop
    copies rank 0's buffers (incl. bool ones, which gloo cannot send) before validating."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, 2.0, False, 0.0), (1, 2.0, False, 0.0)]


# --------------------------------------------------------------------------------------
# HuBERT on long files: chunks of encoder frames (§2, Q6)
# --------------------------------------------------------------------------------------


def reference_chunked_hubert(m: AdaMesh, audio: np.ndarray, chunk_frames: int) -> torch.Tensor:
    """The reference extraction, written out on the HF model: the whole file normalised
    once; chunk i is samples [i C 320, i C 320 + (C - 1) 320 + 400) (C frames), the rest
    after the last whole chunk one more pass unless shorter than 400 samples; the frames
    concatenated, padded or trimmed to floor((N - 80) / 320). Returns (N', H)."""
    hf = m.audio_encoder.model
    a = torch.from_numpy(audio).to(torch.float64)
    x = ((a - a.mean()) / torch.sqrt(a.var(unbiased=False) + 1e-7)).to(torch.float32)[None]  # (1, S)
    step, span = 320 * chunk_frames, 320 * (chunk_frames - 1) + 400
    whole = x.shape[1] // step
    parts = [hf(x[:, i * step : i * step + span]).last_hidden_state[0] for i in range(whole)]
    rest = x[:, whole * step :] if whole else x
    if rest.shape[1] >= 400:
        parts.append(hf(rest).last_hidden_state[0])
    out = torch.cat(parts)  # (N', H)
    n = (x.shape[1] - 80) // 320
    return out[:n] if out.shape[0] >= n else torch.nn.functional.pad(out, (0, 0, 0, n - out.shape[0]))


def long_audio(seconds: float, extra: int = 0) -> np.ndarray:
    clip = make_clip("S1", 1.0, 25.0, 5).audio
    n = int(round(seconds * 16000)) + extra
    return np.resize(clip * np.linspace(0.5, 1.5, clip.shape[0], dtype=np.float32), n).astype(np.float32)


def test_hubert_past_20_s_is_encoded_in_chunks_of_1000_frames():
    m = model(face=False).eval()
    assert (m.config.hubert_chunk_frames, m.config.hubert_chunk_after_s) == (1000, 20.0)
    h = m.audio_encoder.hidden_size
    audio = long_audio(20.6, 37)  # 1029 frames: one chunk of 1000 frames and the rest
    with torch.no_grad():
        want = reference_chunked_hubert(m, audio, 1000)
        one_pass = torch.from_numpy(m.audio_encoder.encode(audio))
        got = m._clip_features(audio)[:, :h]
    assert want.shape == one_pass.shape == got.shape == (1029, h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, one_pass, atol=1e-3)


@pytest.mark.parametrize("extra", [150, 100, 50])  # the rest after the last chunk: >= 400, < 400, < 80 samples
def test_hubert_chunking_for_training_clips_generate_and_the_feature_cache(tmp_path, extra):
    from talkmesh.audio.cache import FeatureCache

    m = model(face=False, hubert_chunk_frames=20, hubert_chunk_after_s=1.0).eval()
    h = m.audio_encoder.hidden_size
    long = long_audio(1.2, extra) if extra != 150 else long_audio(2.3, extra)
    short = long_audio(0.9, 7)
    cache = FeatureCache(tmp_path)
    with torch.no_grad():
        want = reference_chunked_hubert(m, long, 20)
        one_pass = torch.from_numpy(m.audio_encoder.encode(long))
        assert want.shape == one_pass.shape and not torch.allclose(want, one_pass, atol=1e-3)
        # Whole training clips (pose-index stage), with and without the disk cache.
        torch.testing.assert_close(m._clip_features(long)[:, :h], want, atol=1e-5, rtol=1e-5)
        for _ in range(2):
            torch.testing.assert_close(m._clip_features(long, cache)[:, :h], want, atol=1e-5, rtol=1e-5)
        assert cache.stats()["hits"] == 1
        # generate's and training's audio path (trim alignment: the first 2T frames).
        t = m.frames_for_audio(long.shape[0])
        both = m._audio_inputs(torch.from_numpy(long)[None], None, torch.tensor([t]))
        torch.testing.assert_close(both[0, :, :h], want[: 2 * t], atol=1e-5, rtol=1e-5)
        # A padded batch with one long and one short item: the short one is one pass.
        batch_audio = torch.zeros(2, long.shape[0])
        batch_audio[0], batch_audio[1, : short.shape[0]] = torch.from_numpy(long), torch.from_numpy(short)
        frames = torch.tensor([t, m.frames_for_audio(short.shape[0])])
        both = m._audio_inputs(batch_audio, torch.tensor([long.shape[0], short.shape[0]]), frames)
        torch.testing.assert_close(both[0, :, :h], want[: 2 * t], atol=1e-5, rtol=1e-5)
        short_want = torch.from_numpy(m.audio_encoder.encode(short))
        n = 2 * int(frames[1])
        torch.testing.assert_close(both[1, :n, :h], short_want[:n], atol=1e-5, rtol=1e-5)
        # Shorter than the threshold: one pass, as before.
        torch.testing.assert_close(m._clip_features(short)[:, :h], short_want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m._clip_features(short, cache)[:, :h], short_want, atol=1e-6, rtol=1e-6)
        assert cache.path_for(short, m.audio_encoder).exists()  # one-pass entries keep their old keys


def test_chunk_spans_give_every_encoder_frame_once():
    from talkmesh.audio.chunks import chunk_spans

    def frames(n: int) -> int:
        return (n - 400) // 320 + 1 if n >= 400 else 0

    for n in (400, 6399, 6480, 12800, 19250, 19300, 36950, 320000, 320079, 320080, 640399, 640400):
        spans = chunk_spans(n, 20 if n < 100000 else 1000)
        assert spans[0][0] == 0 and n - spans[-1][1] < 320  # a rest under 400 samples has no frame of its own
        starts = [a // 320 for a, _ in spans]  # first frame of each piece
        counts = [frames(b - a) for a, b in spans]
        assert sum(counts) == frames(n) == (n - 80) // 320
        assert all(starts[i] + counts[i] == starts[i + 1] for i in range(len(spans) - 1))  # no gap, no overlap


# --------------------------------------------------------------------------------------
# Pre-training style references (§5): never the item's own training window
# --------------------------------------------------------------------------------------

# name -> (frames, emotion, intensity); the number after the speaker letter is the clip number.
LABELLED_CLIPS = {
    "A1": (30, 1, 0),
    "A2": (20, 1, 0),  # A1 <-> A2: same speaker, same labels
    "A3": (30, 2, 1),  # no other clip with its labels, longer than a window: its own frames outside the window
    "B4": (40, 0, 0),  # B's only clip: its own frames outside the window
    "C5": (8, 0, 0),  # fits in one window, no other clip with its labels: another clip of C
    "C6": (25, 3, 2),
    "D7": (6, 0, 0),  # D's only clip fits in one window: no reference
}
EXPECTED_SOURCE = {"A1": "same_labels", "A2": "same_labels", "A3": "same_clip", "B4": "same_clip"}
EXPECTED_SOURCE |= {"C5": "other_labels", "C6": "same_clip", "D7": "none"}


class LabelledFlameCorpus(Corpus):
    """FLAME clips in memory, 10-frame windows; ``params[:, 0]`` = 1000 x clip number + frame."""

    format_name = "labelled-memory"

    def __init__(self) -> None:
        super().__init__(DataConfig(window_seconds=0.4))

    @property
    def info(self) -> CorpusInfo:
        return CorpusInfo(
            format="labelled-memory", root="", fps=25.0, motion="params", num_vertices=0, param_dim=53,
            has_head_pose=True, train_subjects=("A", "B", "C", "D"), splits=("train",), eval_splits=(),
            unseen_splits=(),
        )  # fmt: skip

    def _index(self) -> list[SequenceInfo]:
        return [
            SequenceInfo(
                name=k, subject=k[0], split="train", num_frames=n, audio_seconds=n / 25.0, emotion=e, intensity=i
            )
            for k, (n, e, i) in LABELLED_CLIPS.items()
        ]

    def _load(self, seq: SequenceInfo) -> Clip:
        n = seq.num_frames
        params = np.zeros((n, 53), np.float32)
        params[:, 0] = 1000 * int(seq.name[1:]) + np.arange(n)
        audio = np.random.default_rng(n).normal(scale=0.1, size=n * 640).astype(np.float32)
        return Clip(
            name=seq.name, subject=seq.subject, audio=audio, fps=25.0, params=params,
            head_pose=np.zeros((n, 3), np.float32), shape=np.zeros(100, np.float32),
            emotion=seq.emotion, intensity=seq.intensity,
        )  # fmt: skip

    def template(self, subject: str) -> np.ndarray | None:
        return None

    def regions(self) -> Regions:
        return Regions(lips=np.arange(2), upper=np.arange(2, 4))


def frame_ids(params: np.ndarray | torch.Tensor) -> set[tuple[int, int]]:
    """(clip number, frame) of each row of params encoded as in LabelledFlameCorpus."""
    code = np.asarray(params)[:, 0].round().astype(int)
    return {(int(c) // 1000, int(c) % 1000) for c in code}


def test_style_references_come_from_other_clips_or_frames_outside_the_window():
    corpus = LabelledFlameCorpus()
    ds = ClipDataset(corpus, "train", mode="window", seed=5, style_reference_frames=12)
    plain = ClipDataset(corpus, "train", mode="window", seed=5)
    spans = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i, seq in enumerate(ds.sequences):
            item, span = ds[i], ds.style_reference_span(i)
            spans.append(span)
            np.testing.assert_array_equal(item.params, plain[i].params)  # the windows themselves are unchanged
            ref, own = item.style_reference, frame_ids(item.params)
            assert item.style_source == span.source == EXPECTED_SOURCE[seq.name], seq.name
            assert ref.num_frames == span.stop - span.start <= 12
            assert not frame_ids(ref.params) & own  # never a frame of the training window
            other = ds.sequences[span.sequence]
            if span.source == "none":
                assert ref.num_frames == 0
                continue
            w0 = ds.window_start(i)
            free = max(w0, seq.num_frames - w0 - ds.window_frames) if other is seq else other.num_frames
            assert ref.num_frames == min(12, free)  # the longer side of the window, or the other clip, cropped
            assert other.subject == seq.subject and frame_ids(ref.params) <= frame_ids(corpus.load(other).params)
            if span.source == "same_labels":
                assert other.name != seq.name and (other.emotion, other.intensity) == (seq.emotion, seq.intensity)
            if span.source == "other_labels":
                assert other.name != seq.name and seq.num_frames <= ds.window_frames
            if span.source == "same_clip":
                assert other is seq and seq.num_frames > ds.window_frames
    again = ClipDataset(corpus, "train", mode="window", seed=5, style_reference_frames=12)
    again.set_epoch(3)
    assert [again.style_reference_span(i) for i in range(len(again))] == spans[-len(again) :]  # seeded
    assert len(set(spans)) > len(again)  # crops move between epochs
    b = ds.collate([ds[i] for i in range(len(ds))])
    lengths = [ds.style_reference_span(i).stop - ds.style_reference_span(i).start for i in range(len(ds))]
    assert b["style_params"].shape == (len(ds), max(lengths), 53) and b["style_head_pose"].shape[:2] == (7, 12)
    assert b["style_lengths"].tolist() == lengths and b["style_mask"].sum(1).tolist() == lengths
    assert b["style_source"] == [EXPECTED_SOURCE[s.name] for s in ds.sequences]
    assert b["style_names"][-1] == "" and b["style_names"][0] == "A2"
    assert not any(k.startswith("style_") for k in plain.collate([plain[i] for i in range(len(plain))]))


def test_pretraining_never_feeds_the_target_window_to_the_style_encoder():
    seen: list[torch.Tensor] = []

    def spy(m: AdaMesh) -> None:
        encode = m.expression.encode_style

        def record(ref: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
            seen.append(torch.cat([ref[k][ref_mask[k]] for k in range(len(ref))]).detach())  # valid rows
            return encode(ref, ref_mask)

        m.expression.encode_style = record

    # Each speaker has a single clip in the batch: no reference, so no style input at all.
    m = model(face=False).train()
    spy(m)
    b = batch()
    loss, logs = m(b)
    target = m._norm_expr(b["params"])[b["motion_mask"]]  # (N, 53) valid target rows
    assert all(not (rows[:, None] == target[None]).all(-1).any() for rows in seen)
    assert logs["style_missing"] == 1.0 and torch.isfinite(loss)
    # Batches from the loader: references from other clips or other frames of the speaker.
    corpus = LabelledFlameCorpus()
    facts = DataFacts.from_corpus(corpus)
    m = model(facts, face=False).train()
    assert m.style_reference_frames() == round(m.config.expression.style_seconds * 25.0)
    spy(m)
    ds = ClipDataset(corpus, "train", mode="window", seed=1, style_reference_frames=m.style_reference_frames())
    b = ds.collate([ds[i] for i in range(len(ds))])
    seen.clear()
    loss, logs = m(b)
    with_ref = [i for i in range(len(ds)) if b["style_lengths"][i] > 0]
    assert torch.isfinite(loss) and logs["style_missing"] == pytest.approx(1 / 7)
    assert len(seen) == 1 and len(seen[0]) == int(b["style_lengths"].sum())
    rows = iter(seen[0].split(b["style_lengths"][with_ref].tolist()))
    for i in with_ref:
        ids = frame_ids(next(rows))
        assert ids == frame_ids(b["style_params"][i][b["style_mask"][i]])  # what the loader drew
        assert not ids & frame_ids(b["params"][i][b["motion_mask"][i]])  # none of the item's own window
    m.set_stage("pose_vq")
    assert m.style_reference_frames() == 0  # only the expression stage asks the loader for references
