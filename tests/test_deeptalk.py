"""DEEPTalk (specs/deeptalk.md): the method's stages, losses, inference and style (§13 items 1,
5-9, 12, 14 as unit checks on the debug preset), and the learning checks on the synthetic
corpus (§13 items 3, 4, 8, 10-13; ``make test-learning``). The networks' own checks (CSD
algebra, GPO, DEE, the TH-VQVAE and the code predictors) are in test_deeptalk_emotion.py and
test_deeptalk_prior.py."""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import pytest
import torch

from talkmesh.methods import build_method
from talkmesh.methods.base import DataFacts, StyleStateError, load_style_state, save_style_state
from talkmesh.methods.deeptalk import DEEPTalk, DEEPTalkConfig, swap_pairs
from talkmesh.methods.deeptalk.emotion import Gaussian, sample_embedding
from talkmesh.methods.deeptalk.prior import DecodeOutput

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

V = 24
LIPS = (0, 1, 2, 3, 4, 5)
FACTS = DataFacts(fps=25.0, num_vertices=V, param_dim=53, train_subjects=("A", "B", "C"), lip_indices=LIPS,
                  upper_indices=(10, 11, 12), motion="params", has_head_pose=True)


@functools.lru_cache(maxsize=1)
def face_model() -> torch.nn.Module:
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame

    return FlameLayer.from_arrays(**make_surrogate_flame(V, seed=0))


def model(stage: str = "fer", seed: int = 0, **overrides: object) -> DEEPTalk:
    torch.manual_seed(seed)
    m = build_method("deeptalk", dict(overrides), FACTS, preset="debug")
    assert isinstance(m, DEEPTalk)
    m.set_face_model(face_model())
    m.set_stage(stage)
    return m


def batch(b: int = 4, t: int = 24, seed: int = 1, emotions: tuple[int, ...] = (0, 1, 2, 6)) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = t * 640
    audio = torch.randn(b, n, generator=g) * 0.1
    return {
        "audio": audio,
        "audio_lengths": torch.full((b,), n),
        "params": torch.randn(b, t, 53, generator=g) * 0.3,
        "motion_mask": torch.ones(b, t, dtype=torch.bool),
        "emotion": torch.tensor([emotions[i % len(emotions)] for i in range(b)]),
        "subject": torch.tensor([i % 3 for i in range(b)]),
    }


# --------------------------------------------------------------------------------------
# Config and stages
# --------------------------------------------------------------------------------------


def test_presets_follow_the_spec():
    d, m = DEEPTalkConfig.debug(), DEEPTalkConfig.mead()
    assert m.fer.hidden == (256, 512, 1024, 512, 256, 128, 64) and m.fer.feature_dim == 128
    assert (m.dee.audio_trunk_layers, m.dee.exp_layers, m.dee.exp_d, m.dee.embed_dim) == (2, 6, 512, 128)
    assert (m.dee.match, m.dee.vib_weight, m.dee.alpha_init, m.dee.exp_window_frames) == ("label", 1e-6, 5.0, 50)
    assert m.dee.audio_encoder.trainable_layers == 2 and not m.dee.audio_encoder.spec_augment
    assert (m.vq.top_codes, m.vq.top_dim, m.vq.bottom_codes, m.vq.bottom_dim) == (256, 128, 256, 256)
    assert (m.vq.beta, m.vq.decay, m.vq.rec_weight) == (0.25, 0.95, 1e6) and not m.vq.reference_ema_quirk
    lw = m.generator.loss_weights
    assert (lw.emo, lw.lip, lw.swap_emo) == (1e-4, 1e-3, 2.5e-5) and m.generator.use_swap
    assert (m.generator.tau_start, m.generator.tau_end, m.window_frames) == (2.0, 0.1, 32)
    assert d.fer.feature_dim == 16 and d.dee.embed_dim == 16 and d.vq.top_codes == 16 and d.window_frames == 16
    assert d.emotion_classes == (0, 1, 2, 6) and m.n_emotions == 8


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"window_frames": 18}, "multiple of 4"),
        ({"vq.bottom_dim": 20}, "bottom_dim"),
        ({"emotion_classes": [0, 0, 1]}, "emotion_classes"),
        ({"generator.emo_loss": "cosine"}, "emo_loss"),
        ({"generator.content_encoder.trainable_layers": 1}, "content_encoder"),
        ({"dee.match": "soft"}, "match"),
    ],
)
def test_config_validation_names_the_field(override, match):
    from talkmesh.methods import build_config

    with pytest.raises(Exception, match=match):
        build_config("deeptalk", override, preset="debug")


def test_stage_schedules_and_optimizers():
    cfg = DEEPTalkConfig.mead()
    assert cfg.stage_schedule("dee").epochs == 300 and cfg.stage_schedule("dee").batch_size == 64
    assert cfg.stage_schedule("vq").lr == 5e-4 and cfg.stage_schedule("stage2").epochs == 3
    assert cfg.lr_factor("dee", 0) == 1.0 and abs(cfg.lr_factor("dee", 300) - 1e-2) < 1e-9  # cosine to 1e-6
    assert cfg.lr_factor("vq", 0) == pytest.approx(1 / 46) and cfg.lr_factor("vq", 100) == 1.0
    assert cfg.lr_factor("stage1", 49) == 1.0 and cfg.lr_factor("stage1", 50) == 0.5
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert type(cfg.build_optimizer(p, stage="vq", lr=1e-3, weight_decay=0.0)) is torch.optim.AdamW
    assert type(cfg.build_optimizer(p, stage="stage1", lr=1e-3, weight_decay=0.0)) is torch.optim.Adam


def test_each_stage_trains_only_its_modules_and_logs_its_terms():
    expected = {
        "fer": ({"fer"}, {"fer_ce", "fer_acc"}),
        "dee": ({"dee"}, {"dee", "dee_match", "dee_vib"}),
        "vq": ({"vq", "reader"}, {"vq_rec", "vq_commit", "reader_feat", "vq_used_top"}),
        "stage1": ({"audio_proj", "emotion_map", "condition", "face", "decoder"}, {"rec", "emo", "tau", "emo_to_rec"}),
        "stage2": ({"audio_proj", "emotion_map", "condition", "face", "decoder"},
                   {"rec", "emo", "lip", "swap_emo", "swap_lip"}),
    }
    m = model()
    for stage, (modules, terms) in expected.items():
        m.set_stage(stage)
        m.train()
        trained = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
        assert trained == modules, stage
        loss, logs = m(batch())
        assert torch.isfinite(loss) and loss.requires_grad and terms <= set(logs), (stage, set(logs))
    m.set_stage("stage1")
    _, logs = m(batch())
    assert "lip" not in logs and "swap_emo" not in logs  # stage 1 is L_rec + lambda_emo L_emo


def test_dee_audio_encoder_keeps_its_frozen_layers():
    m = model("dee")
    enc = m.dee.audio_encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and not any("feature_extractor" in n for n in trainable)
    assert len(trainable) < len(list(enc.parameters()))


def test_unknown_emotion_code_is_an_error():
    m = model("fer")
    with pytest.raises(ValueError, match=r"code 3 \(surprised\).*emotion_classes"):
        m(batch(emotions=(0, 3)))


# --------------------------------------------------------------------------------------
# §13 item 5: frozen parts stay frozen; item 6: the straight-through path; item 7: tau
# --------------------------------------------------------------------------------------


def test_frozen_parts_stay_frozen_in_generator_training():
    m = model("stage2")
    m.train()
    frozen = [m.dee, m.fer, m.reader, m.vq, m.content_encoder]
    assert all(not mod.training for mod in frozen), "D18: frozen modules stay in eval mode after train()"
    before = {id(mod): {k: v.detach().clone() for k, v in mod.state_dict().items()} for mod in frozen}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    for seed in range(3):
        loss, _ = m(batch(seed=seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for mod in frozen:  # parameters, BatchNorm statistics and EMA codebooks bitwise unchanged
        for k, v in mod.state_dict().items():
            assert torch.equal(v, before[id(mod)][k]), (type(mod).__name__, k)
    a = batch()["audio"]
    with torch.no_grad():
        assert torch.equal(m.audio_emotion(a).mu, m.audio_emotion(a).mu)  # no dropout in the frozen DEE


def test_reference_dee_train_mode_keeps_dropout_in_the_frozen_dee():
    m = model("stage1", **{"generator.reference_dee_train_mode": True})
    m.train()
    assert m.dee.training and not m.vq.training
    m.eval()
    assert not m.dee.training


def test_straight_through_gradients_reach_both_predictors():
    m = model("stage1")
    m.train()
    loss, _ = m(batch())
    loss.backward()
    for name in ("top", "bottom"):
        grads = [p.grad for n, p in m.decoder.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.norm()) for g in grads) > 0, name


def test_tau_schedule_is_linear_from_2_to_0_1_and_logged():
    m = model("stage1", **{"generator.stage1_epochs": 5})
    taus = []
    for epoch in range(5):
        m.on_epoch_start(epoch)
        taus.append(m.tau)
    assert taus == pytest.approx([2.0, 1.525, 1.05, 0.575, 0.1])
    m.train()
    _, logs = m(batch())
    assert logs["tau"] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------
# §13 item 9: swap mechanics and pairing (Q17)
# --------------------------------------------------------------------------------------


def test_swap_pairs_leave_an_odd_last_item_unpaired():
    partner, paired = swap_pairs(5)
    assert partner.tolist() == [1, 0, 3, 2, 4] and paired.tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("reference", [False, True])
def test_swap_lip_term_pairs_each_output_with_its_content_ground_truth(monkeypatch, reference):
    """A stub generator whose output encodes the index of its content audio: the fixed
    pairing compares ground truth i with the swapped output of content i; the reference
    pairing with the output of i's partner."""
    m = model("stage2", **{"generator.reference_swap_lip_pairing": reference})
    b, t = 5, 8
    seen: dict[str, torch.Tensor] = {}
    taus: list[float] = []

    def stub_decode(audio, emotion, actors, frames, **mode):  # noqa: ANN001, ANN003, ANN202
        taus.append(mode["tau"])
        content = audio[:, 0]  # (B,) the content audio's index
        motion = content[:, None, None].expand(-1, frames, 53).clone()
        return DecodeOutput(motion, None, None, None, None)

    def stub_lip(pred, gt):  # noqa: ANN001, ANN202
        seen["pred"], seen["gt"] = pred[:, 0, 0, 0], gt[:, 0, 0, 0]
        return pred.sum() * 0

    monkeypatch.setattr(m, "decode_motion", stub_decode)
    monkeypatch.setattr(m, "lip_loss", stub_lip)
    monkeypatch.setattr(m, "emotion_loss", lambda target, motion: motion.sum() * 0)
    monkeypatch.setattr(m, "flame_offsets", lambda p: p[:, :, :1, None].expand(-1, -1, 1, 3))
    idx = torch.arange(b, dtype=torch.float32)
    from talkmesh.methods.deeptalk.method import Windows

    win = Windows(idx[:, None, None].expand(b, t, 53).clone(), idx[:, None].expand(b, t * 640).clone(),
                  torch.ones(b, t, dtype=torch.bool), torch.zeros(b, dtype=torch.long),
                  torch.zeros(b, dtype=torch.long))
    m.tau = 1.3
    cond = Gaussian(torch.randn(b, 16), torch.zeros(b, 16))
    terms = m.swap_terms(win, cond, m.flame_offsets(win.params))
    assert set(terms) == {"swap_emo", "swap_lip"}
    assert seen["gt"].tolist() == [0, 1, 2, 3]  # the odd last item is left out
    assert seen["pred"].tolist() == ([1, 0, 3, 2] if reference else [0, 1, 2, 3])
    assert taus == [0.1 if reference else 1.3]


# --------------------------------------------------------------------------------------
# §13 items 1, 8, 14, D19: inference
# --------------------------------------------------------------------------------------


def trained_enough(m: DEEPTalk) -> DEEPTalk:
    """Perturb the generator and the prototypes so outputs depend on the codes and emotions."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in m.generator_modules():
            for p in mod.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        m.emotion_prototypes.copy_(torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1))
        m.emotion_prototype_counts.fill_(1.0)
    return m.eval()


def test_generator_shapes_on_the_debug_preset():
    m = trained_enough(model("stage1"))
    out = m.decode_motion(torch.randn(2, 16 * 640), torch.randn(2, 16), torch.tensor([0, 2]), 16, mode="argmax")
    assert out.logits_top.shape == (2, 4, 16) and out.logits_bottom.shape == (2, 8, 16)
    assert out.motion.shape == (2, 16, 53)
    g = m.audio_emotion(torch.randn(2, 16 * 640))
    assert g.mu.shape == (2, 16) and torch.allclose(g.mu.norm(dim=-1), torch.ones(2)) and g.logvar.shape == (2, 16)
    assert m.fer.features(torch.randn(2, 16, 53)).shape == (2, 16, 16)


@pytest.mark.parametrize("seconds", [1.0, 1.13])
def test_generate_trims_to_the_frame_count_and_is_deterministic(seconds):
    m = trained_enough(model("stage2"))
    audio = torch.randn(int(seconds * 16000)) * 0.1
    t = m.frames_for_audio(audio.shape[0])
    a, b = m.generate(audio, None), m.generate(audio, None)
    assert a["params"].shape == (t, 53) and a["vertices"].shape == (t, V, 3)
    assert torch.equal(a["params"], b["params"])  # argmax: bitwise repeatable (D7)
    s1, s1b, s2 = (m.generate(audio, None, sample=True, seed=k)["params"] for k in (1, 1, 2))
    assert torch.equal(s1, s1b) and not torch.equal(s1, s2)


def test_lower_logvar_scale_widens_the_sampled_emotions():
    g = Gaussian(torch.nn.functional.normalize(torch.randn(1, 16), dim=-1).expand(400, -1), torch.full((400, 16), -2.0))
    spread = {}
    for c in (1.0, 0.5, 0.25):
        z = sample_embedding(g, c, torch.Generator().manual_seed(0))
        spread[c] = float((z - g.mu).norm(dim=-1).mean())
    assert spread[0.25] > spread[0.5] > spread[1.0]


def test_emotion_sources_change_the_condition():
    m = trained_enough(model("stage2"))
    audio = torch.randn(1, 16000) * 0.1
    other = torch.randn(16000) * 0.3

    def mu(**kw: object) -> torch.Tensor:
        with torch.no_grad():
            return m.emotion_condition(audio, None, **kw).mu  # type: ignore[arg-type]

    def logits(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m.decode_motion(audio[:, : 24 * 640], z, torch.tensor([0]), 24, mode="argmax").logits_top

    base = mu()
    assert not torch.equal(base, mu(audio_emotion=other))
    happy, sad = mu(emotion="happy"), mu(emotion="sad")
    torch.testing.assert_close(happy, m.emotion_prototypes[1][None])
    assert not torch.allclose(happy, sad)
    weak = mu(emotion="happy", intensity=0.2)  # between the neutral prototype and happy
    neutral = m.emotion_prototypes[0][None]
    assert float((weak - neutral).norm()) < float((happy - neutral).norm())
    assert not torch.allclose(logits(happy), logits(sad))  # the condition reaches the code predictors
    with pytest.raises(ValueError, match="unknown label 'surprised'"):
        m.generate(audio, None, emotion="surprised")  # not among the debug preset's classes
    with pytest.raises(ValueError, match="intensity"):
        m.generate(audio, None, emotion="happy", intensity=1.5)


def test_batch_invariance_of_the_emotion_and_the_motion():
    """§13 item 14: eval mode, argmax, items of the same length alone or batched."""
    m = trained_enough(model("stage2"))
    audio = torch.randn(3, 24 * 640) * 0.1
    actors = torch.tensor([0, 1, 2])
    with torch.no_grad():
        g = m.audio_emotion(audio)
        together = m.infer(audio, 24, actors, g)
        for i in range(3):
            alone = m.audio_emotion(audio[i : i + 1])
            torch.testing.assert_close(alone.mu, g.mu[i : i + 1], rtol=0, atol=1e-5)
            params = m.infer(audio[i : i + 1], 24, actors[i : i + 1], alone)
            torch.testing.assert_close(params, together[i : i + 1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# §9, §13 item 12: style
# --------------------------------------------------------------------------------------


def reference(seconds: float = 1.2, seed: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = int(seconds * 25)
    return {"audio": (torch.randn(t * 640, generator=g) * 0.1).numpy(),
            "params": (torch.randn(t, 53, generator=g) * 0.3).numpy()}


@pytest.mark.parametrize("source", ["audio", "expression"])
def test_style_round_trip_gives_identical_output(source):
    m = trained_enough(model("stage2"))
    state = m.adapt(reference(), source=source)
    assert state["emotion_source"] == source and state["actor_scores"].shape == (3,)
    assert state["actor_index"] == int(state["actor_scores"].argmin())
    buf = io.BytesIO()
    save_style_state(state, buf)
    loaded = load_style_state(buf.getvalue(), method="deeptalk")
    audio = torch.randn(20000) * 0.1
    assert torch.equal(m.generate(audio, None, state)["params"], m.generate(audio, None, loaded)["params"])
    with torch.no_grad():  # the stored emotion replaces the driving audio's
        cond = m.emotion_condition(m.as_audio(audio), state)
        assert torch.equal(cond.mu[0], state["emotion_mu"])
        assert not torch.equal(cond.mu, m.emotion_condition(m.as_audio(audio), None).mu)


def test_subject_style_defers_to_the_driving_audio_and_bad_states_are_refused():
    m = trained_enough(model("stage2"))
    audio = torch.randn(20000) * 0.1
    state = m.encode_style(subject="B")
    assert state["emotion_source"] == "driving" and state["actor_index"] == 1
    assert torch.equal(m.generate(audio, None, state)["params"], m.generate(audio, None, "B")["params"])
    with pytest.raises(StyleStateError, match="actor_index"):
        m.generate(audio, None, {**state, "actor_index": 7})
    with pytest.raises(ValueError, match="params"):
        m.encode_style({"audio": reference()["audio"]}, source="expression")


def test_method_metrics_report_every_declared_key():
    from talkmesh.data.clip import Clip

    m = trained_enough(model("stage2"))
    clips = []
    for i, emotion in enumerate((0, 1, 2, 6, 0, 1)):
        r = reference(2.4, seed=i)
        clips.append(Clip(name=f"c{i}", subject="A", audio=r["audio"], fps=25.0, params=r["params"],
                          emotion=emotion, template=None))
    out = m.method_metrics(clips)
    assert set(out) == set(DEEPTalk.method_metric_names)
    assert out["sample_diversity_params"] > 0
    with torch.no_grad():  # emo_acc: the MLP's clip logits of the argmax output against the clip's label
        pred = [int(m.fer(m.generate(c.audio, None)["params"]).mean(0).argmax()) for c in clips]
    labels = m.emotion_class(torch.tensor([c.emotion for c in clips])).tolist()
    assert out["emo_acc"] == pytest.approx(np.mean([p == y for p, y in zip(pred, labels, strict=True)]))
    assert out["emo_retrieval_chance"] == pytest.approx((2 / 6) ** 2 * 2 + (1 / 6) ** 2 * 2)


def test_vertices_from_a_shape_or_a_template():
    m = trained_enough(model("stage2"))
    audio = torch.randn(16000) * 0.1
    zero = m.generate(audio, None)["vertices"]
    shaped = m.generate(audio, torch.full((100,), 0.5))["vertices"]
    assert not torch.equal(zero, shaped)
    tmpl = torch.randn(V, 3)
    moved = m.generate(audio, tmpl)["vertices"]
    neutral = face_model()(None, torch.zeros(1, 50), torch.zeros(1, 3))[0]
    torch.testing.assert_close(moved - tmpl, zero - neutral, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="template"):
        m.generate(audio, torch.zeros(7, 3))


def test_losses_need_a_face_model():
    torch.manual_seed(0)
    m = build_method("deeptalk", {}, FACTS, preset="debug")
    m.set_stage("vq")
    with pytest.raises(RuntimeError, match="face_model"):
        m(batch())
    out = m.eval().generate(torch.randn(16000), None)
    assert "vertices" not in out and out["params"].shape[1] == 53


def test_dataclass_fields_round_trip_through_the_config_dict():
    from talkmesh.config import from_dict, to_dict

    cfg = DEEPTalkConfig.debug()
    assert from_dict(DEEPTalkConfig, to_dict(cfg)) == cfg
    assert dataclasses.replace(cfg, default_actor=2).default_actor == 2


def test_dee_mel_option_adds_log_mel_frames_and_keeps_padding_invariance():
    m = model("dee", **{"dee.audio_mel_bins": 8}).eval()
    assert m.dee.audio_proj.in_features == m.dee.audio_encoder.hidden_size + 8
    audio = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 11000])
    with torch.no_grad():
        both = m.dee.encode_audio(audio, lengths)
        alone = m.dee.encode_audio(audio[1:, :11000])
    torch.testing.assert_close(both.mu[1:], alone.mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.logvar[1:], alone.logvar, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# The staged job (jobs/deeptalk.py): five stages as MLflow child runs of one parent
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_staged_job_chains_the_five_stages_evaluates_and_registers(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from talkmesh.ops import tracking
    from talkmesh.ops.jobs import parse_args, run_job
    from talkmesh.train.checkpoint import load_method

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = [
        "train.num_workers=0", "model.fer.epochs=1", "model.dee.epochs=1", "model.vq.epochs=1",
        "model.generator.stage1_epochs=1", "model.generator.stage2_epochs=1", "train.eval_every=1",
        "train.limit_eval_sequences=4", "train.preview=false", "train.system_metrics=false",
        f"train.storage_path={tmp_path / 'ray'}", "train.run_name=staged",
    ]
    out = run_job(parse_args("deeptalk", args))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    children = tracking.child_runs(out["run_id"], uri=uri)
    assert [c["run_name"] for c in children] == [f"staged-{s}" for s in DEEPTalk.stages]
    runs = {c["run_name"].split("-", 1)[1]: client.get_run(c["run_id"]) for c in children}
    for prev, stage in zip(DEEPTalk.stages, DEEPTalk.stages[1:], strict=False):
        assert runs[stage].data.params["train.stage"] == stage
        assert runs[prev].data.tags["talkmesh.selected_checkpoint"].endswith(
            runs[stage].data.params["train.init_from"].rsplit("/", 1)[-1])  # each stage from the previous one's pick
    assert "train/fit/frames_happy" in runs["fer"].data.metrics and "train/dee_match" in runs["dee"].data.metrics
    assert "train/fit/reader_scale_lips" in runs["vq"].data.metrics and "train/swap_lip" in runs["stage2"].data.metrics
    assert runs["stage1"].data.metrics["train/fit/prototype_clips"] > 0
    metrics = client.get_run(out["run_id"]).data.metrics
    for key in ("lve", "emo_acc", "emo_retrieval", "sample_diversity_params"):
        assert f"test/test-A/{key}" in metrics, key
    assert out["version"] == 1
    loaded = load_method(out["checkpoint"]).method
    assert loaded.stage == "stage2" and float(loaded.emotion_prototype_counts.sum()) > 0
    gen = loaded.generate(np.zeros(16000, np.float32) + 0.01, None, emotion="happy", sample=True, seed=1)
    assert gen["vertices"].shape[1:] == (loaded.facts.num_vertices, 3)  # the face model file is in the config


def test_generator_stages_refuse_to_start_without_the_priors():
    m = model("stage1")
    with pytest.raises(ValueError, match=r"not been through \['fer', 'dee', 'vq'\].*train.init_from"):
        m.fit_stage([])
    m.stages_fitted[:3] = True  # as after fer, dee and vq (the checkpoint carries the marks)
    m.set_stage("stage2")
    with pytest.raises(ValueError, match=r"\['stage1'\]"):
        m.fit_stage([])
