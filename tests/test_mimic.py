"""Mimic specifics (specs/mimic.md §2-§12) on the debug preset, the shared blocks it uses
(SALN, gradient reversal, the motion encoder), the style-consistency metrics and the
speaker-identity network. The learning checks on the synthetic corpus (§12.9, §12.10) are in
test_mimic_learning.py."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from talkmesh.config import ConfigError
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.dataset import collate_clips
from talkmesh.eval import metrics as M
from talkmesh.eval.speaker_id import SpeakerIdConfig, SpeakerIdNet, style_consistency, train_speaker_id
from talkmesh.methods import build_config, build_method
from talkmesh.methods.base import DataFacts, StyleStateError, load_style_state, save_style_state
from talkmesh.methods.mimic import (
    AUX_TERMS,
    Mimic,
    MimicConfig,
    clip_loss,
    content_cycle_loss,
    diagonal_mask,
    inference_windows,
    mix_styles,
    shuffle_index,
    style_cycle_loss,
)
from talkmesh.nn.grl import GradientReversal, grad_reverse
from talkmesh.nn.motion_encoder import MotionSequenceEncoder, masked_instance_norm
from talkmesh.nn.saln import StyleAdaptiveLayerNorm
from test_methods_contract import SUBJECTS, TinyCorpus, V, make_clip

FACTS25 = DataFacts(fps=25.0, num_vertices=V, train_subjects=SUBJECTS, lip_indices=(0, 1, 2, 3))
FACTS30 = dataclasses.replace(FACTS25, fps=30.0)
TERMS = ("rec_a", "rec_c", *AUX_TERMS)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def model(facts: DataFacts = FACTS25, seed: int = 0, **overrides: object) -> Mimic:
    torch.manual_seed(seed)
    m = build_method("mimic", dict(overrides), facts, preset="debug")
    assert isinstance(m, Mimic)
    return m


def randomise(m: nn.Module, scale: float = 0.05) -> None:
    """Perturb every parameter (the output layer starts at zero)."""
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def styled_clip(subject: str, seconds: float, fps: float, seed: int) -> Clip:
    """make_clip with a subject-specific lip amplitude (S1 small ... S3 large) and a
    subject-specific static offset, so speakers differ in style."""
    clip = make_clip(subject, seconds, fps, seed)
    k = SUBJECTS.index(subject) if subject in SUBJECTS else 1
    off = clip.vertices - clip.template
    off[:, :4] *= 0.5 + 0.75 * k
    off[:, 4:8, 2] += 0.004 * (k - 1)
    return dataclasses.replace(clip, vertices=(clip.template + off).astype(np.float32))


def styled_batch(fps: float = 25.0, seconds: float = 1.6, per_subject: int = 2) -> dict:
    clips = [styled_clip(s, seconds, fps, 10 * i + j) for i, s in enumerate(SUBJECTS) for j in range(per_subject)]
    return collate_clips(clips, [SUBJECTS.index(c.subject) for c in clips])


@pytest.fixture(scope="module")
def trained() -> Mimic:
    """The debug model after 40 Adam steps on subject-styled clips (audio-driven lips)."""
    m = model(window_frames=40).train()
    batch = styled_batch()
    opt = torch.optim.Adam(m.trainable_parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = m(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


# --------------------------------------------------------------------------------------
# Config (§9)
# --------------------------------------------------------------------------------------


def test_presets_follow_the_spec():
    hdtf = MimicConfig.hdtf()
    assert (hdtf.d_model, hdtf.enc_layers, hdtf.enc_heads, hdtf.enc_ff, hdtf.enc_convs) == (128, 4, 4, 256, 5)
    assert (hdtf.dec_layers, hdtf.dec_heads, hdtf.dec_ff, hdtf.ppe_period, hdtf.max_len) == (1, 4, 256, 30, 600)
    assert (hdtf.style_fuse, hdtf.audio_align, hdtf.n_ids) == ("saln", "conv", 150)
    w = hdtf.loss_weights
    assert (w.rec_a, w.rec_c, w.style_cls, w.grl, w.clip, w.style_cycle, w.content_cycle) == (
        1.0,
        1.0,
        2.5e-7,
        5e-7,
        5e-7,
        2e-5,
        5e-6,
    )
    assert (hdtf.grl_decay_epochs, hdtf.grl_decay_factors) == ((20, 40), (0.1, 0.5))
    assert (hdtf.content_cycle_margin, hdtf.grl_alpha) == (1.0, 1.0)
    assert math.isclose(math.exp(hdtf.logit_scale_init), 1 / 0.07)
    assert (hdtf.window_frames, hdtf.batch_size, hdtf.lr, hdtf.epochs) == (150, 6, 1e-4, 150)
    assert (hdtf.teacher_forcing, hdtf.cycle_teacher_forcing) == (False, False)
    assert (hdtf.reference_pe_quirk, hdtf.mask_padding, hdtf.cycle_shuffle) == (False, True, "random")
    assert (hdtf.style_ref_frames, hdtf.infer_window, hdtf.infer_overlap) == (150, 150, 10)
    assert hdtf.audio_encoder.freeze_feature_encoder and not hdtf.audio_encoder.tiny
    assert (MimicConfig.vocaset().audio_align, MimicConfig.vocaset().n_ids) == ("interp", 8)
    assert (MimicConfig.biwi().audio_align, MimicConfig.biwi().n_ids) == ("conv", 6)
    dbg = MimicConfig.debug()
    assert (dbg.d_model, dbg.enc_layers, dbg.enc_heads, dbg.enc_ff, dbg.enc_convs) == (16, 1, 2, 32, 2)
    assert (dbg.dec_layers, dbg.dec_heads, dbg.dec_ff, dbg.ppe_period, dbg.audio_align) == (1, 2, 32, 25, "interp")
    assert (dbg.grl_decay_epochs, dbg.window_frames, dbg.batch_size, dbg.lr, dbg.epochs) == ((1, 2), 50, 4, 1e-3, 2)
    assert (dbg.teacher_forcing, dbg.style_ref_frames, dbg.infer_window, dbg.infer_overlap) == (True, 50, 50, 10)
    assert dbg.loss_weights == hdtf.loss_weights and dbg.audio_encoder.tiny


@pytest.mark.parametrize(
    "override, field",
    [
        ({"d_model": 15}, "d_model"),
        ({"d_model": 18, "enc_heads": 4}, "enc_heads"),
        ({"infer_overlap": 50}, "infer_overlap"),
        ({"loss_weights.grl": -1.0}, "grl"),
        ({"loss_weights.clip": float("nan")}, "clip"),
        ({"grl_decay_epochs": [3]}, "grl_decay_epochs"),
        ({"grl_decay_epochs": [5, 2]}, "grl_decay_epochs"),
        ({"window_frames": 700}, "window_frames"),
        ({"subject_style_momentum": 1.0}, "subject_style_momentum"),
        ({"enc_dropout": 1.0}, "enc_dropout"),
        ({"audio_conv_kernel": 14}, "audio_conv_kernel"),
        ({"style_fuse": "film"}, "style_fuse"),
        ({"cycle_shuffle": "sorted"}, "cycle_shuffle"),
    ],
)
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        build_config("mimic", override, preset="debug")


def test_construction_errors():
    with pytest.raises(ValueError, match="n_ids"):
        model(n_ids=8)  # 3 training subjects in the facts (D7)
    with pytest.raises(ValueError, match="training subject"):
        model(facts=DataFacts(fps=25.0, num_vertices=V))
    with pytest.raises(ValueError, match="num_vertices"):
        model(facts=DataFacts(fps=25.0, num_vertices=0, train_subjects=SUBJECTS))


def test_cnn_frozen_and_the_rest_trainable():
    m = model()
    assert not any(p.requires_grad for p in m.audio_encoder.model.feature_extractor.parameters())
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    for part in ("content_encoder.", "style_encoder.", "decoder.", "style_classifier.", "inverse_classifier."):
        assert any(n.startswith(part) for n in names), part
    assert "logit_scale" in names


# --------------------------------------------------------------------------------------
# Shared blocks: SALN, GRL, motion encoder (§2)
# --------------------------------------------------------------------------------------


def test_saln_starts_as_layer_norm_and_zero_weights_ignore_the_style():
    torch.manual_seed(0)
    saln = StyleAdaptiveLayerNorm(8, 5)
    assert torch.equal(saln.affine.bias[:8], torch.ones(8)) and torch.equal(saln.affine.bias[8:], torch.zeros(8))
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        saln.affine.weight.zero_()
    plain = nn.functional.layer_norm(x, (8,))
    for _ in range(3):
        torch.testing.assert_close(saln(x, 10 * torch.randn(3, 5)), plain)
    with torch.no_grad():
        saln.affine.weight.normal_()
    s1, s2 = torch.randn(3, 5), torch.randn(3, 5)
    assert not torch.allclose(saln(x, s1), saln(x, s2))
    torch.testing.assert_close(saln(x[:, 0], s1), saln(x, s1)[:, 0])  # (B, d) inputs too


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.5) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))
    y = torch.randn(2, 3)
    assert torch.equal(GradientReversal(2.0)(y), y)
    with pytest.raises(ValueError):
        GradientReversal(-1.0)


def test_masked_instance_norm_matches_instance_norm_per_item():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    out = masked_instance_norm(x, mask)
    ref = nn.InstanceNorm1d(4)(x[1:, :6].transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out[1:, :6], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, 6:], torch.zeros(3, 4))


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_motion_encoder_codes_do_not_depend_on_padding(norm):
    torch.manual_seed(0)
    enc = MotionSequenceEncoder(12, 16, n_convs=2, norm=norm, n_layers=1, n_heads=2, ff_dim=32, pool="mean").eval()
    x = torch.randn(1, 10, 12)
    padded = torch.cat([x, 5 * torch.ones(1, 4, 12)], dim=1)
    mask = torch.tensor([[True] * 10 + [False] * 4])
    with torch.no_grad():
        torch.testing.assert_close(enc(padded, mask), enc(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.frames(padded, mask)[:, :10], enc.frames(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Shapes, positional encoding, initialisation (§12.1-12.4)
# --------------------------------------------------------------------------------------


def test_shapes_and_logs():
    m = model().train()
    b, t = 4, 50
    clips = [make_clip(s, 2.0, 25.0, i) for i, s in enumerate(("S1", "S2", "S3", "S1"))]
    batch = collate_clips(clips, [SUBJECTS.index(c.subject) for c in clips])
    offsets = (batch["vertices"] - batch["template"][:, None]).reshape(b, t, 3 * V)
    assert m.content_codes(offsets).shape == (b, t, 16)
    assert m.style_codes(offsets).shape == (b, 16)
    a = m.encode_audio(batch["audio"], batch["audio_lengths"], batch["motion_lengths"])
    assert a.shape == (b, t, 16)
    assert m.decoder(a, m.style_codes(offsets), torch.zeros(b, 3 * V)).shape == (b, t, 3 * V)
    loss, logs = m(batch)
    assert loss.ndim == 0
    for term in TERMS:
        assert term in logs and f"{term}_weighted" in logs
    for key in ("grl_weight", "logit_scale", "style_cls_acc", "grl_acc", "frames"):
        assert key in logs
    assert logs["grl_weight"] == 5e-7 and logs["frames"] == b * t
    assert math.isclose(logs["logit_scale"], 1 / 0.07, rel_tol=1e-5)


def test_reference_pe_quirk_depends_on_the_batch_index():
    """§12.2: with the quirk a clip's style code depends on its batch position."""
    x = torch.randn(1, 30, 3 * V) * 0.01
    other = torch.randn(1, 30, 3 * V) * 0.01
    for quirk, same in ((True, False), (False, True)):
        m = model(reference_pe_quirk=quirk).eval()
        with torch.no_grad():
            first = m.style_codes(torch.cat([x, other]))[0]
            second = m.style_codes(torch.cat([other, x]))[1]
        assert torch.allclose(first, second, atol=1e-6) is same


def test_encoder_pe_is_temporal_by_default_and_per_item_with_the_quirk():
    """D1: the fixed PE is the sinusoid of the frame index; the quirk's is PE(batch index),
    constant over time (Q1)."""
    from talkmesh.nn.motion_encoder import sinusoidal_encoding

    h = torch.zeros(3, 7, 16)
    fixed = model().content_encoder.positional(h)
    torch.testing.assert_close(fixed, sinusoidal_encoding(7, 16)[None])
    quirk = model(reference_pe_quirk=True).content_encoder.positional(h)
    assert quirk.shape == (3, 1, 16)
    torch.testing.assert_close(quirk[:, 0], sinusoidal_encoding(3, 16))


def test_untrained_generate_returns_the_template():
    m = model()
    clip = make_clip("S2", 1.3, 25.0, 1)
    out = m.generate(clip.audio, clip.template)["vertices"]
    assert out.shape == (32, V, 3)
    assert torch.equal(out, torch.from_numpy(clip.template).expand_as(out))


# --------------------------------------------------------------------------------------
# Decoder (§2.4, §12.11)
# --------------------------------------------------------------------------------------


def test_diagonal_cross_attention_equals_masked_attention():
    m = model(dec_dropout=0.0).eval()
    randomise(m, 0.2)
    layer = m.decoder.layers[0]
    mem = torch.randn(2, 12, 16)
    ref = layer.cross_attn(mem, mem, mem, attn_mask=diagonal_mask(12), need_weights=False)[0]
    torch.testing.assert_close(layer.diagonal_cross(mem), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fuse", ["saln", "add", "cat"])
def test_teacher_forcing_on_own_outputs_reproduces_autoregression(fuse):
    """§12.11, for each fusion (D10) and two decoder layers."""
    m = model(style_fuse=fuse, dec_layers=2).eval()
    randomise(m, 0.1)
    mem, s, init = torch.randn(3, 25, 16), torch.randn(3, 16), 0.01 * torch.randn(3, 3 * V)
    with torch.no_grad():
        ar = m.decoder(mem, s, init)
        tf = m.decoder(mem, s, init, targets=ar)
    torch.testing.assert_close(tf, ar, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal_and_starts_from_the_initial_state():
    m = model().eval()
    randomise(m, 0.1)
    mem, s = torch.randn(1, 20, 16), torch.randn(1, 16)
    with torch.no_grad():
        a = m.decoder(mem, s, torch.zeros(1, 3 * V))
        mem2 = mem.clone()
        mem2[:, 12:] += 1.0
        b = m.decoder(mem2, s, torch.zeros(1, 3 * V))
        c = m.decoder(mem, s, 0.05 * torch.ones(1, 3 * V))
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    assert not torch.allclose(a[:, 0], c[:, 0])


def test_style_enters_the_decoder_only_through_saln():
    """§12.3: two styles give different outputs; with zero SALN weights they do not."""
    m = model().eval()
    randomise(m, 0.1)
    mem, init = torch.randn(1, 15, 16), torch.zeros(1, 3 * V)
    with torch.no_grad():
        y1 = m.decoder(mem, torch.randn(1, 16), init)
        y2 = m.decoder(mem, torch.randn(1, 16), init)
        assert not torch.allclose(y1, y2)
        for layer in m.decoder.layers:
            for norm in (layer.norm1, layer.norm2, layer.norm3):
                norm.affine.weight.zero_()
        torch.testing.assert_close(m.decoder(mem, torch.randn(1, 16), init), m.decoder(mem, torch.randn(1, 16), init))


# --------------------------------------------------------------------------------------
# Losses (§4, §12.5-12.7)
# --------------------------------------------------------------------------------------


def _inverse_classifier_grads(m: Mimic, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the inverse-classifier CE alone on E_c's last layer and on the head."""
    m.zero_grad(set_to_none=True)
    offsets = (batch["vertices"] - batch["template"][:, None]).reshape(*batch["vertices"].shape[:2], -1)
    c = m.content_codes(offsets, batch["motion_mask"])
    logits = m.inverse_classifier(m.grl(c.mean(dim=1)))
    m._classifier_loss(logits, batch["subject"])[0].backward()
    return m.content_encoder.output.weight.grad.clone(), m.inverse_classifier.weight.grad.clone()


def test_inverse_classifier_gradient_reaches_the_content_encoder_reversed():
    """§12.5: opposite sign to the gradient with the GRL replaced by the identity; the
    head's own gradient is unchanged."""
    m = model().train()
    randomise(m)
    batch = styled_batch(per_subject=1)
    enc_grl, head_grl = _inverse_classifier_grads(m, batch)
    m.grl = nn.Identity()
    enc_id, head_id = _inverse_classifier_grads(m, batch)
    assert enc_grl.abs().sum() > 0
    torch.testing.assert_close(enc_grl, -enc_id)
    torch.testing.assert_close(head_grl, head_id)


def test_style_classifier_loss_falls_when_style_codes_separate():
    """Training E_s + C_s on the style-classifier CE alone separates the subjects."""
    m = model().train()
    batch = styled_batch()
    offsets = (batch["vertices"] - batch["template"][:, None]).reshape(*batch["vertices"].shape[:2], -1)
    params = list(m.style_encoder.parameters()) + list(m.style_classifier.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(100):
        ce, acc = m._classifier_loss(m.style_classifier(m.style_codes(offsets)), batch["subject"])
        opt.zero_grad()
        ce.backward()
        opt.step()
        losses.append(float(ce.detach()))
    assert losses[-1] < 0.3 * losses[0] and acc == 1.0


def test_classifier_terms_skip_unseen_subjects():
    m = model()
    logits = torch.randn(3, 3, requires_grad=True)
    ce, acc = m._classifier_loss(logits, torch.tensor([-1, -1, -1]))
    assert float(ce.detach()) == 0.0 and acc == 0.0 and ce.requires_grad
    ce2, _ = m._classifier_loss(logits, torch.tensor([0, -1, 2]))
    torch.testing.assert_close(ce2, nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="subject"):
        m._classifier_loss(logits, torch.tensor([0, 5, 1]))


def test_clip_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    a = torch.randn(2, 20, 16)
    scale = torch.tensor(math.log(1 / 0.07))
    aligned = clip_loss(a.clone(), a, scale)
    shuffled = clip_loss(a[:, torch.randperm(20)], a, scale)
    assert aligned < shuffled
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    junk = a.clone()
    junk[1, 15:] = torch.randn(5, 16)  # padded frames do not count
    torch.testing.assert_close(clip_loss(junk, a, scale, mask), clip_loss(a.clone(), a, scale, mask))


def test_style_cycle_loss_zero_when_consistent_and_target_detached():
    s = torch.randn(4, 16, requires_grad=True)
    s_cyc = s.detach().clone().requires_grad_(True)
    loss = style_cycle_loss(s, s_cyc)
    assert abs(float(loss.detach())) < 1e-6
    loss = style_cycle_loss(s, torch.randn(4, 16, requires_grad=True))
    assert float(loss.detach()) > 0.1
    # §12.7: no gradient reaches the branch that produced s~
    target = torch.randn(4, 16, requires_grad=True)
    cyc = torch.randn(4, 16, requires_grad=True)
    style_cycle_loss(target, cyc).backward()
    assert target.grad is None and cyc.grad is not None and cyc.grad.abs().sum() > 0


def test_content_cycle_loss_zero_when_consistent_and_target_detached():
    # Orthogonal clips: all off-diagonal distances are sqrt(2) >= margin 1.
    c = torch.zeros(3, 4, 6)
    for i in range(3):
        c[i, i, i] = 1.0
    assert float(content_cycle_loss(c.clone(), c, margin=1.0)) == pytest.approx(0.0, abs=1e-10)
    # Identical clips: off-diagonal distances 0 < margin, and a mismatch costs too.
    same = torch.ones(3, 4, 6)
    assert float(content_cycle_loss(same.clone(), same, margin=1.0)) == pytest.approx(6 / 6, abs=1e-5)
    assert float(content_cycle_loss(c.roll(1, dims=0), c, margin=1.0)) > 0.5
    target = c.clone().requires_grad_(True)
    cyc = (c + 0.1 * torch.randn_like(c)).requires_grad_(True)
    content_cycle_loss(cyc, target).backward()
    assert target.grad is None and cyc.grad is not None and torch.isfinite(cyc.grad).all()


def test_training_lowers_both_reconstructions():
    m = model().train()
    batch = styled_batch(per_subject=1)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-3)
    logs = first = {}
    for _ in range(60):
        loss, logs = m(batch)
        first = first or logs  # the untrained model outputs the template: MSE = offset power
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["rec_a"] < 0.7 * first["rec_a"] and logs["rec_c"] < 0.7 * first["rec_c"]


def test_shuffle_index_modes():
    g = torch.Generator().manual_seed(0)
    for b in (2, 3, 7):
        for _ in range(20):
            p = shuffle_index(b, "derangement", g)
            assert sorted(p.tolist()) == list(range(b)) and all(p[i] != i for i in range(b))
    fixed = sum(int((shuffle_index(4, "random", g) == torch.arange(4)).any()) for _ in range(50))
    assert fixed > 0  # the reference's shuffle may leave items in place (Q4)
    assert shuffle_index(1, "derangement", g).tolist() == [0]


def test_grl_weight_schedule_and_epoch_hook():
    m = model()
    assert [m.config.grl_weight(e) for e in (0, 1, 2, 9)] == pytest.approx([5e-7, 5e-8, 2.5e-8, 2.5e-8])
    m.on_epoch_start(1)
    assert m.grl_weight == pytest.approx(5e-8)
    _, logs = m.train()(styled_batch(per_subject=1))
    assert logs["grl_weight"] == pytest.approx(5e-8)
    assert logs["grl_weighted"] == pytest.approx(5e-8 * logs["grl"])
    m.set_epoch(0)
    state = m.state_dict()
    assert int(state["epoch"]) == 0
    with pytest.raises(ValueError):
        m.set_epoch(-1)


def test_constraints_off_is_the_ablation_and_zero_terms_get_no_gradient():
    m = model(constraints=False).train()
    loss, logs = m(styled_batch(per_subject=1))
    for term in AUX_TERMS:
        assert logs[f"{term}_weighted"] == 0.0 and logs[term] > 0.0  # still logged
    assert logs["loss"] == pytest.approx(logs["rec_a"] + logs["rec_c"], rel=1e-6)
    loss.backward()
    assert m.style_classifier.weight.grad is None and m.inverse_classifier.weight.grad is None
    assert m.logit_scale.grad is None


def test_padding_is_masked_out_of_every_loss():
    """D4/Q6: padded frames change nothing with mask_padding, everything without."""
    clips = [styled_clip("S1", 1.6, 25.0, 1), styled_clip("S3", 1.2, 25.0, 2)]
    batch = collate_clips(clips, [0, 2])
    junk = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    junk["vertices"][1, 30:] = 0.3
    for mask_padding, same in ((True, True), (False, False)):
        m = model(mask_padding=mask_padding, window_frames=0).train()
        randomise(m)
        torch.manual_seed(1)
        _, a = m(batch)
        torch.manual_seed(1)
        _, b = m(junk)
        for term in TERMS:
            assert math.isclose(a[term], b[term], rel_tol=1e-6, abs_tol=1e-14) is same, term


def test_training_crops_long_items_and_takes_the_previous_frame_as_init_state():
    """D2/D5: items longer than window_frames are cut to a random window, whose
    init_state is the frame before it (offsets), zeros at frame 0."""
    m = model(window_frames=20).train()
    clips = [styled_clip("S1", 1.6, 25.0, 1), styled_clip("S2", 0.6, 25.0, 2)]
    batch = collate_clips(clips, [0, 1])
    torch.manual_seed(3)
    p = m._prepare(batch)
    assert p["vertices"].shape[1] == 20 and p["motion_lengths"].tolist() == [20, 15]
    full = batch["vertices"][0]
    start = next(s for s in range(21) if torch.equal(full[s : s + 20], p["vertices"][0]))
    expected = full[start - 1] - batch["template"][0] if start > 0 else torch.zeros(V, 3)
    torch.testing.assert_close(p["init_state"][0], expected)
    torch.testing.assert_close(p["init_state"][1], torch.zeros(V, 3))  # not cropped, no init_state given
    assert p["audio"].shape[1] == 20 * 640 and p["audio_lengths"].tolist() == [20 * 640, 15 * 640]
    s0 = round(start * 640)
    torch.testing.assert_close(p["audio"][0], batch["audio"][0, s0 : s0 + 20 * 640])
    # a batch may hand over init_state itself (offsets) for items that are not cropped
    init = torch.full((2, V, 3), 0.01)
    p = m._prepare(
        {
            **batch,
            "init_state": init,
            "vertices": batch["vertices"][:, :20],
            "motion_mask": None,
            "motion_lengths": None,
        }
    )
    torch.testing.assert_close(p["init_state"], init)


def test_forward_errors():
    m = model().train()
    batch = styled_batch(per_subject=1)
    with pytest.raises(KeyError, match="vertices"):
        m({k: v for k, v in batch.items() if k != "vertices"})
    with pytest.raises(ValueError, match="vertices"):
        m({**batch, "vertices": batch["vertices"][:, :, :5]})
    with pytest.raises(ValueError, match="max_len"):
        model(window_frames=0, max_len=30).train()(batch)


# --------------------------------------------------------------------------------------
# Inference (§6, §12.8)
# --------------------------------------------------------------------------------------


def test_inference_windows():
    assert inference_windows(30, 50, 10) == [(0, 30)]
    assert inference_windows(50, 50, 10) == [(0, 50)]
    assert inference_windows(51, 50, 10) == [(0, 50), (40, 11)]
    w = inference_windows(400, 150, 10)
    assert w == [(0, 150), (140, 150), (280, 120)]
    assert sum(n for _, n in w) - 10 * (len(w) - 1) == 400
    with pytest.raises(ValueError):
        inference_windows(0, 50, 10)
    with pytest.raises(ValueError):
        inference_windows(10, 50, 50)


def test_short_audio_is_one_window_equal_to_single_pass_decoding(trained):
    clip = make_clip("S2", 1.9, 25.0, 3)
    state = trained.encode_style(styled_clip("S3", 2.0, 25.0, 4))
    out = trained.generate(clip.audio, clip.template, style=state)["vertices"]
    t = trained.frames_for_audio(clip.audio.shape[0])
    assert t == 47 and out.shape == (t, V, 3)
    with torch.no_grad():
        audio = torch.from_numpy(clip.audio[: t * 640])[None]  # the samples of the t whole frames (§6)
        mem = trained.encode_audio(audio, None, torch.tensor([t]))
        single = trained.decoder(mem, state["style_code"][None], torch.zeros(1, 3 * V))[0]
    torch.testing.assert_close(out, single.reshape(t, V, 3) + torch.from_numpy(clip.template))


def test_long_audio_is_decoded_in_windows_without_jumps(trained):
    """§12.8: 400 frames -> floor(samples / 640) frames, and no step at a window join is
    larger than the largest step inside the windows."""
    clip = make_clip("S2", 16.0, 25.0, 4)
    out = trained.generate(clip.audio, clip.template, style=1)["vertices"]
    assert out.shape == (clip.audio.shape[0] // 640, V, 3) == (400, V, 3)
    steps = (out[1:] - out[:-1]).reshape(399, -1).norm(dim=1)  # step k: frame k -> k + 1
    joins = [s + 10 - 1 for s, _ in inference_windows(400, 50, 10)[1:]]  # first kept frame of each later window
    inner = torch.ones(399, dtype=torch.bool)
    inner[joins] = False
    assert float(steps[joins].max()) <= float(steps[inner].max())
    assert torch.isfinite(out).all()
    # any audio length works, including a tail window shorter than the overlap + 1
    odd = trained.generate(clip.audio[: 640 * 91 + 17], clip.template, style=1)["vertices"]
    assert odd.shape == (91, V, 3)


@pytest.mark.parametrize("facts, align", [(FACTS25, "conv"), (FACTS30, "conv"), (FACTS30, "interp")])
def test_audio_alignment_modes_give_exact_frame_counts(facts, align):
    m = model(facts, audio_align=align, window_frames=0).train()
    clips = [make_clip("S1", 1.4, facts.fps, 1), make_clip("S2", 0.9, facts.fps, 2)]
    batch = collate_clips(clips, [0, 1])
    a = m.encode_audio(batch["audio"], batch["audio_lengths"], batch["motion_lengths"])
    assert a.shape[1] == batch["vertices"].shape[1]
    assert torch.equal(a[1, batch["motion_lengths"][1] :], torch.zeros_like(a[1, batch["motion_lengths"][1] :]))
    loss, _ = m(batch)
    loss.backward()
    if align == "conv":
        assert m.audio_aligner is not None and m.audio_aligner.conv.weight.grad is not None
    clip = make_clip("S1", 7.3, facts.fps, 5)
    out = m.generate(clip.audio, clip.template)["vertices"]
    assert out.shape[0] == int(clip.audio.shape[0] * facts.fps // 16000)


def test_generate_from_motion(trained):
    drive = styled_clip("S1", 3.0, 25.0, 6)
    tmpl = make_clip("S2", 1.0, 25.0, 0).template
    out = trained.generate_from_motion(drive.vertices, drive.template, tmpl, style=2)["vertices"]
    assert out.shape == (75, V, 3) and torch.isfinite(out).all()


def test_generate_errors(trained):
    clip = make_clip("S1", 1.0, 25.0, 1)
    with pytest.raises(ValueError, match="too short"):
        trained.generate(clip.audio[:300], clip.template)
    with pytest.raises(ValueError, match="template"):
        trained.generate(clip.audio, clip.template[:5])
    with pytest.raises(TypeError, match="style"):
        trained.generate(clip.audio, clip.template, style=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="training subject"):
        trained.generate(clip.audio, clip.template, style="U9")
    state = trained.encode_style(styled_clip("S1", 1.0, 25.0, 2))
    with pytest.raises(StyleStateError, match="style_code"):
        trained.generate(clip.audio, clip.template, style={**state, "style_code": torch.zeros(5)})


# --------------------------------------------------------------------------------------
# Style interface (§10, deviation 8)
# --------------------------------------------------------------------------------------


def test_encode_style_uses_the_last_style_ref_frames(trained):
    ref = styled_clip("S3", 3.0, 25.0, 7)
    state = trained.encode_style(ref)
    assert state["method"] == "mimic" and state["ref_frames"] == 50 and state["source"] == "reference"
    assert state["style_code"].shape == (16,) and state["d_model"] == 16
    earlier = ref.vertices.copy()
    earlier[:25] += 0.05  # frames before the last 50 do not matter
    torch.testing.assert_close(
        trained.encode_style({**vars(ref), "vertices": earlier})["style_code"], state["style_code"]
    )
    short = trained.encode_style({"vertices": ref.vertices[:20], "template": ref.template})
    assert short["ref_frames"] == 20
    assert trained.adapt(ref).keys() == state.keys()
    torch.testing.assert_close(trained.adapt(ref)["style_code"], state["style_code"])
    with pytest.raises(TypeError):
        trained.adapt(ref, steps=3)
    with pytest.raises(ValueError, match="reference vertices"):
        trained.encode_style({"template": ref.template})
    with pytest.raises(ValueError, match="non-finite"):
        trained.encode_style({"vertices": np.full_like(ref.vertices, np.nan), "template": ref.template})
    inf_late = ref.vertices.copy()
    inf_late[-1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        trained.encode_style({"vertices": inf_late, "template": ref.template})
    huge = np.full_like(ref.vertices, 3e38)  # finite, but their sum overflows: the exact check passes it
    assert trained._offsets(huge, ref.template, "reference vertices", last=5).shape == (5, trained.output_dim)


def test_style_codes_of_different_speakers_drive_different_motion(trained):
    audio = make_clip("S2", 2.0, 25.0, 9)
    low = trained.encode_style(styled_clip("S1", 2.0, 25.0, 11))
    high = trained.encode_style(styled_clip("S3", 2.0, 25.0, 12))
    a = trained.generate(audio.audio, audio.template, style=low)["vertices"]
    b = trained.generate(audio.audio, audio.template, style=high)["vertices"]
    assert not torch.allclose(a, b)


def test_training_subject_styles_are_recorded():
    m = model()
    clip = make_clip("S1", 1.0, 25.0, 1)
    with pytest.raises(ValueError, match="no style code recorded"):
        m.generate(clip.audio, clip.template, style="S1")
    assert torch.equal(m.resolve_style(None), torch.zeros(16))  # before training: zeros
    m.train()
    batch = styled_batch(per_subject=1)
    m(batch)
    m.eval()
    offsets = (batch["vertices"] - batch["template"][:, None]).reshape(3, batch["vertices"].shape[1], -1)
    with torch.no_grad():
        codes = m.style_codes(offsets)  # debug: no dropout, so the same as in training
    torch.testing.assert_close(m.resolve_style("S2"), codes[1])
    torch.testing.assert_close(m.resolve_style(1), codes[1])
    torch.testing.assert_close(m.resolve_style(None), codes.mean(0))
    st = m.encode_style(subject="S3")
    assert st["source"] == "subject" and st["subject_name"] == "S3"
    torch.testing.assert_close(st["style_code"], codes[2])
    a = m.generate(clip.audio, clip.template, style="S3")["vertices"]
    torch.testing.assert_close(a, m.generate(clip.audio, clip.template, style=st)["vertices"])


def test_mix_styles_endpoints_midpoint_and_round_trip(trained):
    a = trained.encode_style(styled_clip("S1", 2.0, 25.0, 21))
    b = trained.encode_style(styled_clip("S3", 2.0, 25.0, 22))
    audio = make_clip("S2", 1.5, 25.0, 23)
    gen = lambda st: trained.generate(audio.audio, audio.template, style=st)["vertices"]  # noqa: E731
    for w, ref in (([1.0, 0.0], a), ([0.0, 3.0], b)):
        mixed = trained.mix_styles([a, b], w)
        assert torch.equal(mixed["style_code"], ref["style_code"])
        assert torch.equal(gen(mixed), gen(ref))
    mid = mix_styles([a, b], [2, 2])
    torch.testing.assert_close(mid["style_code"], (a["style_code"] + b["style_code"]) / 2)
    assert mid["source"] == "mix" and mid["mix_weights"].tolist() == [0.5, 0.5]
    assert mid["ref_frames"] == 50
    buf = io.BytesIO()
    save_style_state(mid, buf)
    assert torch.equal(gen(load_style_state(buf.getvalue(), method="mimic")), gen(mid))


@pytest.mark.parametrize(
    "states, weights, match",
    [
        ([], [], "non-empty"),
        (["a", "b"], [1.0], "2 styles but 1 weights"),
        (["a", "b"], [1.0, -0.5], "non-negative"),
        (["a", "b"], [1.0, float("nan")], "finite"),
        (["a", "b"], [0.0, 0.0], "positive sum"),
        (["a", "b"], [1.0, True], "finite numbers"),
        (["a", "other"], [1.0, 1.0], "method"),
        (["a", "v2"], [1.0, 1.0], "version"),
        (["a", "d8"], [1.0, 1.0], "style_code"),
    ],
)
def test_mix_styles_validation(trained, states, weights, match):
    a = trained.encode_style(styled_clip("S1", 2.0, 25.0, 21))
    pool = {
        "a": a,
        "b": trained.encode_style(styled_clip("S2", 2.0, 25.0, 22)),
        "other": {**a, "method": "faceformer"},
        "v2": {**a, "version": 2},
        "d8": {**a, "style_code": torch.zeros(8), "d_model": 8},
    }
    with pytest.raises((ValueError, StyleStateError), match=match):
        mix_styles([pool[s] for s in states], weights)


def test_style_state_from_another_model_size_is_refused(trained):
    other = model(d_model=32)
    state = other.encode_style(styled_clip("S1", 1.0, 25.0, 1))
    with pytest.raises(StyleStateError, match=r"\(16,\)"):
        trained.mix_styles([state], [1.0])


# --------------------------------------------------------------------------------------
# Style-consistency metrics and the speaker-identity network (metrics.md §7.4)
# --------------------------------------------------------------------------------------


def test_scs_and_speaker_retrieval_hand_cases():
    e = np.eye(3)
    assert M.scs(e, e) == pytest.approx(1.0)
    assert M.scs(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)
    assert M.scs(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0]])) == pytest.approx(1.0)  # scale-free
    assert M.scs(np.array([[1.0, 0.0]]), np.array([[-3.0, 0.0]])) == pytest.approx(-1.0)
    res = M.speaker_retrieval_accuracy(e, ["a", "b", "c"], e, ["a", "b", "c"])
    assert res == {"accuracy": 1.0, "chance": pytest.approx(1 / 3)}
    # ties go to the lowest gallery index
    tie = M.speaker_retrieval_accuracy(np.ones((1, 2)), ["b"], np.array([[1.0, 1.0], [2.0, 2.0]]), ["a", "b"])
    assert tie["accuracy"] == 0.0 and tie["chance"] == 0.5
    with pytest.raises(ValueError, match="row by row"):
        M.scs(e, e[:2])
    with pytest.raises(ValueError, match="non-finite"):
        M.scs(np.full((1, 2), np.nan), np.ones((1, 2)))
    with pytest.raises(ValueError, match="labels"):
        M.speaker_retrieval_accuracy(e, ["a"], e, ["a", "b", "c"])


class StyledCorpus(TinyCorpus):
    """Three training subjects with subject-specific lip amplitude, four sequences each."""

    def _index(self) -> list[SequenceInfo]:
        n = int(2 * self._fps)
        return [
            SequenceInfo(name=f"{s}_seq{j:02d}", subject=s, split="train", num_frames=n)
            for s in SUBJECTS
            for j in range(4)
        ]

    def _load(self, seq: SequenceInfo) -> Clip:
        j = int(seq.name[-2:])
        return styled_clip(seq.subject, 2.0, self._fps, 7 * j + SUBJECTS.index(seq.subject))


SPEAKER_CFG = dataclasses.replace(SpeakerIdConfig.small(), steps=200, d_model=16, window_frames=30, lr=3e-3)


@pytest.fixture(scope="module")
def speaker_net() -> SpeakerIdNet:
    return train_speaker_id(StyledCorpus(25.0), SPEAKER_CFG)


def test_speaker_id_network_trains_saves_and_loads(speaker_net, tmp_path):
    corpus, net = StyledCorpus(25.0), speaker_net
    assert net.train_info["accuracy"] > 0.8 and not net.training
    clip = corpus.load(corpus.sequences("train")[5])
    emb = net.embed_motion(clip.vertices, clip.template)
    assert emb.shape == (16,) and emb.dtype == np.float64
    # longer than a window: frame-weighted mean of the chunks
    chunks = [net.embed_motion(clip.vertices[s : s + 30], clip.template) for s in (0, 30)]
    np.testing.assert_allclose(emb, (30 * chunks[0] + 20 * chunks[1]) / 50, rtol=1e-5, atol=1e-7)
    path = tmp_path / "spk.pt"
    net.save(path)
    again = SpeakerIdNet.load(path)
    np.testing.assert_allclose(again.embed_motion(clip.vertices, clip.template), emb, rtol=1e-6)
    assert again.fingerprint() == net.fingerprint() and again.subjects == SUBJECTS
    assert train_speaker_id(corpus, SPEAKER_CFG).fingerprint() == net.fingerprint()  # seeded
    with pytest.raises(ValueError, match="steps"):
        SpeakerIdConfig(steps=0)
    with pytest.raises(ValueError):
        net.embed_motion(clip.vertices[:, :5], clip.template)


def test_style_consistency_scores_a_method(trained, speaker_net):
    res = style_consistency(trained, StyledCorpus(25.0), "train", speaker_net, limit=6)
    assert res["sequences"] == 6 and res["speakers"] == list(SUBJECTS)
    assert res["speaker_acc_chance"] == pytest.approx(1 / 3)
    assert res["gt_speaker_acc"] == 1.0 and res["gt_scs"] > 0.99  # the ground truth is recognised as itself
    # A cosine below the ground truth's ceiling. Whether a model carries its speakers' style is
    # checked at the spec's terms in test_mimic_learning.py: this 40-step debug model carries none
    # reliably (scs 0.03-0.18 by the CPU's kernels: avx2, avx512, default; an untrained one alike).
    assert -1.0 <= res["scs"] < res["gt_scs"] and 0.0 <= res["speaker_acc"] <= res["gt_speaker_acc"]
    assert res["fingerprint"] == speaker_net.fingerprint()


# --------------------------------------------------------------------------------------
# Issue 12: content_norm="layer" (§2.1) and whole-frame inference windows (§6)
# --------------------------------------------------------------------------------------


def test_content_norm_layer_gives_the_content_encoder_the_style_encoder_layout():
    """§2.1: ``content_norm="layer"`` switches E_c's conv blocks and its projection to
    LayerNorm (the reference's Conv1DLN + FeatureProjection), i.e. the style encoder's
    layout: with E_s's weights, E_c's frame codes equal E_s's. The default keeps instance
    norm everywhere in E_c."""
    m = model(content_norm="layer")
    enc = m.content_encoder
    n_ln = sum(isinstance(mod, nn.LayerNorm) for mod in enc.conv_norms.modules())
    assert n_ln == m.config.enc_convs
    assert sum(isinstance(mod, nn.LayerNorm) for mod in enc.proj_norm.modules()) == 1
    assert not any(isinstance(mod, (nn.BatchNorm1d, nn.InstanceNorm1d)) for mod in enc.modules())
    randomise(m.style_encoder)
    enc.load_state_dict(m.style_encoder.state_dict())  # strict: the same modules
    x = 0.01 * torch.randn(2, 30, 3 * V)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().content_codes(x), m.style_encoder.frames(x))
    default = model().content_encoder
    assert not any(isinstance(mod, nn.LayerNorm) for mod in default.conv_norms.modules())
    assert not any(isinstance(mod, nn.LayerNorm) for mod in default.proj_norm.modules())


@pytest.mark.parametrize("norm, local", [("layer", True), ("instance", False)])
def test_content_norm_layer_keeps_the_conv_stack_local(norm, local):
    """Without the transformer, LayerNorm conv blocks (content_norm="layer") make a frame's
    content code depend only on the frames within the convolutions' reach (enc_convs
    frames each side); instance norm (the default) mixes in statistics of the whole clip."""
    m = model(content_norm=norm, enc_layers=0).eval()
    randomise(m.content_encoder)
    x = 0.01 * torch.randn(1, 30, 3 * V)
    far = x.clone()
    far[:, 10:] += 0.05 * torch.randn(1, 20, 3 * V)  # frames >= 10: beyond frame 0's reach (2 convs)
    with torch.no_grad():
        a, b = m.content_codes(x)[0, :5], m.content_codes(far)[0, :5]
    assert torch.allclose(a, b, atol=1e-6) is local


@pytest.mark.parametrize("facts, align", [(FACTS25, "interp"), (FACTS30, "interp"), (FACTS25, "conv")])
def test_last_inference_window_is_cut_at_whole_frames(facts, align):
    """§6 (reference windowing): every window, the last included, gets the samples of its
    whole frames only, so samples past the last whole frame change nothing: a clip whose
    length is not a whole number of frames is decoded exactly as the same audio cut at
    whole frames, in every window (the last one included)."""
    m = model(facts, audio_align=align).eval()
    randomise(m)
    clip = make_clip("S2", 5.0, facts.fps, 7)
    total = 115  # windows (0, 50), (40, 50), (80, 35): the last one gives frames 90..114
    whole = math.ceil(total * facts.samples_per_frame - 1e-6)  # samples of 115 whole frames
    audio = clip.audio[: whole + int(0.8 * facts.samples_per_frame)]  # a fraction of a frame more
    assert m.frames_for_audio(audio.shape[0]) == m.frames_for_audio(whole) == total
    out = m.generate(audio, clip.template, style=None)["vertices"]
    cut = m.generate(audio[:whole], clip.template, style=None)["vertices"]
    assert out.shape == (total, V, 3)
    assert not torch.allclose(out[90:], out[90:91].expand_as(out[90:]))  # the last window moves
    torch.testing.assert_close(out, cut, atol=0.0, rtol=0.0)


def test_frame_count_is_whole_frames_of_audio_exactly():
    """§6: samples // 640 at 25 fps (the reference's integer count), with no floating-point
    loss below an integer (115 * 640 samples are 115 frames, not 114)."""
    m = model()
    n = np.arange(1, 2000)
    assert [m.frames_for_audio(int(k) * 640) for k in n] == n.tolist()
    assert [m.frames_for_audio(int(k) * 640 - 1) for k in n] == (n - 1).tolist()
    m30 = model(FACTS30)
    assert [m30.frames_for_audio(int(k) * 1600) for k in n] == (3 * n).tolist()  # 1600 samples = 3 frames
