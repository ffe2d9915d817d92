"""Mimic's released checkpoint (``Epoch_125.pth``, 3D-HDTF) onto talkmesh's Mimic.

The reference (huifu99/Mimic@9e71299, ``models/network.py`` class ``DisNetAutoregCycle``,
saved by ``train.py`` as ``{"params": <config.yaml>, "model": state_dict, "optimizer": ...,
"start_epoch": ...}``; the ``"model"`` entry is unwrapped) names its modules as in the left
column. ``E`` is ``content_encoder`` or ``style_encoder`` (the same layout; the content
encoder's norms hold no tensors with ``content_norm: IN``):

====================================================  ==================================  ==============================
reference                                             talkmesh (methods/mimic)            what
====================================================  ==================================  ==============================
``E.motion_map.*``                                    ``E.input.*``                       Linear 3V -> d
``E.conv_layers.{i}.conv.weight``                     ``E.convs.{i}.weight``              Conv1d(d, d, 3), no bias
``E.conv_layers.{i}.layer_norm.*``                    ``E.conv_norms.{i}.ln.*``           LayerNorm of ``Conv1DLN``
``E.feature_projection.layer_norm.*``                 ``E.proj_norm.ln.*``                LayerNorm, then the projection
``E.feature_projection.projection.*``                 ``E.proj.*``                        Linear d -> d
``E.PE.pe``                                           (not loaded)                        sinusoid table (5000, 1, d),
                                                                                          checked equal
``E.transformer_encoder.*``                           ``E.transformer.*``                 nn.TransformerEncoder
``E.feature_map.*``                                   ``E.output.*``                      Linear d -> d
``audio_encoder.audio_encoder.*``                     ``audio_encoder.model.*``           wav2vec2-base, HF names (the
                                                                                          weight norm's ``weight_g`` /
                                                                                          ``weight_v`` of transformers
                                                                                          4.x as in :mod:`.faceformer`)
``audio_encoder.down_sample.*``                       ``audio_aligner.conv.*``            Conv1d(768, 768, 15, stride 2)
                                                                                          (HDTF's ``conv`` alignment)
``audio_encoder.audio_feature_map.*``                 ``audio_proj.*``                    Linear 768 -> d
``decoder.motion_map.*`` / ``decoder.motion_map_r.*`` same names                          Linear 3V -> d / d -> 3V
``decoder.transformer_decoder.layers.{j}.multihead_   ``decoder.layers.{j}.cross_attn.*`` cross-attention, diagonal mask
attn.*``
``decoder.transformer_decoder.layers.{j}.norm{k}.     ``decoder.layers.{j}.norm{k}.       SALN projection d -> 2d
style.affine.*``                                      affine.*``                          (gamma half first)
``decoder.transformer_decoder.layers.*``              ``decoder.layers.*``                self_attn, linear1, linear2
``decoder.transformer_decoder.encoder.*`` /           (not loaded)                        see below
``decoder.transformer_decoder.decoder.*``
``decoder.PPE.pe``                                    (not loaded)                        periodic PE (1, 630, d) of
                                                                                          period 30, checked equal
``style_class_head.class_head.*``                     ``style_classifier.*``              Linear d -> N_id
``content_grl_head.class_head.*``                     ``inverse_classifier.*``            Linear d -> N_id (behind GRL)
``logit_scale``                                       ``logit_scale``                     CLIP log-temperature
``content_head.*``, ``content_cls_head.*``,           (not loaded)                        heads disabled in the released
``audio_cls_head.*``, ``metric_fc.*``                                                     config (CTC, content-id,
                                                                                          ArcFace; D9)
====================================================  ==================================  ==============================

``i`` runs over the reference config's 5 conv blocks, ``j`` over its 1 decoder layer
(:data:`REFERENCE_CONVS`, :data:`REFERENCE_DECODER_LAYERS`). The reference's
``TransformerDecoder`` subclasses ``nn.Transformer`` and calls its ``__init__`` with the
defaults, so the checkpoint also holds a default ``nn.Transformer``'s encoder and decoder
(d 512, 6 + 6 layers, 184 tensors) that its forward never runs: listed as unused. Modules
without tensors: the decoder's ``biased_mask`` (a plain attribute; talkmesh builds the same
bias), instance norms (no affine), the GRL. The SALN's inner LayerNorm has no affine.

Talkmesh tensors no reference checkpoint holds (:attr:`MimicImporter.talkmesh_only`): the
GRL schedule's ``epoch`` and the per-subject style codes (deviation 8) keep their built
values, so ``generate(style=<training subject>)`` is refused; styles come from
``encode_style(reference clip)`` (the reference's only path; the evaluator and the service
use it).

Presets: ``hdtf`` is the released one (d 128, 5023 vertices, 25 fps, ``conv`` alignment,
150 training ids "1".."150": the reference's one-hot index is id - 1). ``vocaset`` / ``biwi``
read checkpoints trained with the reference code on those corpora (not released, spec §5;
D5-D7: interpolation / conv alignment, FaceFormer's subject orders). Flags set for every
preset, as the reference code trains: ``reference_pe_quirk=True`` (Q1/D1, the batch-index
encoder PE; it changes the style code, so it is needed for the released numbers) and
``mask_padding=False`` (Q6, training only). Teacher forcing stays off and SpecAugment on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from talkmesh.methods.base import DataFacts
from talkmesh.methods.faceformer import periodic_positional_encoding
from talkmesh.methods.mimic import MimicConfig
from talkmesh.ops.importers.base import HDTF_TRAIN_SUBJECTS, Importer, published_facts
from talkmesh.ops.importers.keymap import CheckpointImportError, KeyRule

__all__ = [
    "HDTF_TRAIN_SUBJECTS",
    "MIMIC_KEY_MAP",
    "REFERENCE_CONVS",
    "REFERENCE_DECODER_LAYERS",
    "MimicImporter",
    "mimic_key_map",
]

REFERENCE_CONVS = 5  # config.yaml num_conv_layers
REFERENCE_DECODER_LAYERS = 1  # config.yaml decoder.num_layers

_POS_CONV = "encoder.pos_conv_embed.conv."
_W2V = "audio_encoder.audio_encoder."


def _encoder_rules(name: str, n_convs: int) -> list[KeyRule]:
    rules = [KeyRule(f"{name}.motion_map.", f"{name}.input.", "Linear 3V -> d")]
    for i in range(n_convs):
        ref = f"{name}.conv_layers.{i}."
        rules.append(KeyRule(f"{ref}conv.weight", f"{name}.convs.{i}.weight", "Conv1d(d, d, 3), no bias"))
        rules.append(KeyRule(f"{ref}layer_norm.", f"{name}.conv_norms.{i}.ln.", "LayerNorm of a conv block"))
    return [
        *rules,
        KeyRule(f"{name}.feature_projection.layer_norm.", f"{name}.proj_norm.ln.", "LayerNorm, then the projection"),
        KeyRule(f"{name}.feature_projection.projection.", f"{name}.proj.", "Linear d -> d"),
        KeyRule(f"{name}.PE.pe", None, "sinusoid table (5000, 1, d), recomputed; checked equal"),
        KeyRule(f"{name}.transformer_encoder.", f"{name}.transformer.", "nn.TransformerEncoder"),
        KeyRule(f"{name}.feature_map.", f"{name}.output.", "Linear d -> d"),
    ]


def _decoder_rules(layers: int) -> list[KeyRule]:
    ref = "decoder.transformer_decoder."
    rules = [
        KeyRule("decoder.motion_map_r.", "decoder.motion_map_r.", "Linear d -> 3V, output layer"),
        KeyRule("decoder.motion_map.", "decoder.motion_map.", "Linear 3V -> d, motion embedding"),
    ]
    for j in range(layers):
        rules.append(KeyRule(f"{ref}layers.{j}.multihead_attn.", f"decoder.layers.{j}.cross_attn.", "cross-attention"))
        for k in (1, 2, 3):
            rules.append(
                KeyRule(f"{ref}layers.{j}.norm{k}.style.affine.", f"decoder.layers.{j}.norm{k}.affine.", "SALN d -> 2d")
            )
    return [
        *rules,
        KeyRule(f"{ref}layers.", "decoder.layers.", "self_attn, linear1, linear2"),
        KeyRule(f"{ref}encoder.", None, "default nn.Transformer encoder built by the reference, never run"),
        KeyRule(f"{ref}decoder.", None, "default nn.Transformer decoder built by the reference, never run"),
        KeyRule("decoder.PPE.pe", None, "periodic PE table (1, 630, d), recomputed; checked equal"),
    ]


def mimic_key_map(
    n_convs: int = REFERENCE_CONVS, decoder_layers: int = REFERENCE_DECODER_LAYERS
) -> tuple[KeyRule, ...]:
    """The explicit key map (module docstring) for encoders of ``n_convs`` conv blocks and a
    decoder of ``decoder_layers`` layers; exact and per-index rules come before prefixes."""
    audio = [
        KeyRule(
            f"{_W2V}{_POS_CONV}weight_g",
            f"audio_encoder.model.{_POS_CONV}parametrizations.weight.original0",
            "weight-norm magnitude, transformers 4.x name",
        ),
        KeyRule(
            f"{_W2V}{_POS_CONV}weight_v",
            f"audio_encoder.model.{_POS_CONV}parametrizations.weight.original1",
            "weight-norm direction, transformers 4.x name",
        ),
        KeyRule(_W2V, "audio_encoder.model.", "wav2vec2-base, HF Wav2Vec2Model names"),
        KeyRule("audio_encoder.down_sample.", "audio_aligner.conv.", "Conv1d(768, 768, 15, stride 2): 50 -> 25 Hz"),
        KeyRule("audio_encoder.audio_feature_map.", "audio_proj.", "Linear 768 -> d"),
    ]
    heads = [
        KeyRule("style_class_head.class_head.", "style_classifier.", "style classifier d -> N_id"),
        KeyRule("content_grl_head.class_head.", "inverse_classifier.", "inverse classifier d -> N_id"),
        KeyRule("logit_scale", "logit_scale", "CLIP log-temperature"),
        KeyRule("content_head.", None, "CTC head, disabled in the released config (D9)"),
        KeyRule("content_cls_head.", None, "content-id head, disabled in the released config (D9)"),
        KeyRule("audio_cls_head.", None, "audio-id head, disabled in the released config (D9)"),
        KeyRule("metric_fc.", None, "ArcFace head, disabled in the released config (D9)"),
    ]
    encoders = _encoder_rules("content_encoder", n_convs) + _encoder_rules("style_encoder", n_convs)
    return (*encoders, *audio, *_decoder_rules(decoder_layers), *heads)


MIMIC_KEY_MAP: tuple[KeyRule, ...] = mimic_key_map()


def _check_table(key: str, table: torch.Tensor | None, expected_of: Any, shape: str) -> None:
    """``table`` must equal ``expected_of(L)`` (same shape); L is its longest axis."""
    if table is None:
        return
    length = max(table.shape) if table.ndim == 3 else -1
    expected = expected_of(length) if length > 0 else None
    if expected is None or tuple(table.shape) != tuple(expected.shape):
        raise CheckpointImportError(f"{key!r} {tuple(table.shape)}: expected {shape}")
    if not torch.allclose(table.float(), expected, atol=1e-5):
        raise CheckpointImportError(f"{key!r} is not the table the preset's Mimic computes ({shape})")


class MimicImporter(Importer):
    """``talkmesh import mimic --checkpoint Epoch_125.pth --preset hdtf`` (or vocaset / biwi)."""

    method: ClassVar[str] = "mimic"
    reference: ClassVar[str] = "huifu99/Mimic@9e71299 models/network.py DisNetAutoregCycle.state_dict()"
    presets: ClassVar[tuple[str, ...]] = ("hdtf", "vocaset", "biwi")
    key_map: ClassVar[tuple[KeyRule, ...]] = MIMIC_KEY_MAP
    talkmesh_only: ClassVar[tuple[str, ...]] = ("epoch", "subject_style_codes", "subject_style_counts")

    @staticmethod
    def reference_flags(config: MimicConfig) -> MimicConfig:
        """``config`` with the behaviour the reference code trains with (module docstring)
        and the audio encoder built from its config only."""
        encoder = dataclasses.replace(config.audio_encoder, from_config_only=True)
        return dataclasses.replace(config, audio_encoder=encoder, reference_pe_quirk=True, mask_padding=False)

    def config(self, preset: str) -> MimicConfig:
        self.check_preset(preset)
        base = {"hdtf": MimicConfig.hdtf, "vocaset": MimicConfig.vocaset, "biwi": MimicConfig.biwi}[preset]()
        return self.reference_flags(base)

    def facts(self, preset: str) -> DataFacts:
        self.check_preset(preset)
        return published_facts(preset)

    def flags(self, config: Any) -> dict[str, Any]:
        cfg = config
        return {
            "reference_pe_quirk": cfg.reference_pe_quirk,
            "mask_padding": cfg.mask_padding,
            "content_norm": cfg.content_norm,
            "style_fuse": cfg.style_fuse,
            "audio_align": cfg.audio_align,
            "ppe_period": cfg.ppe_period,
            "teacher_forcing": cfg.teacher_forcing,
            "spec_augment": cfg.audio_encoder.spec_augment,
        }

    def check_unused(self, method: torch.nn.Module, unused: Mapping[str, torch.Tensor]) -> None:
        """The encoders' sinusoid tables (L, 1, d) and the decoder's periodic table (1, L, d)
        must be what the built model computes (same d, the preset's period)."""
        cfg = method.config
        d, period = cfg.d_model, cfg.ppe_period
        for name in ("content_encoder", "style_encoder"):
            _check_table(
                f"{name}.PE.pe",
                unused.get(f"{name}.PE.pe"),
                lambda n: periodic_positional_encoding(n, d, n)[:, None],  # (L, 1, d): no period
                f"the sinusoid table (L, 1, {d})",
            )
        _check_table(
            "decoder.PPE.pe",
            unused.get("decoder.PPE.pe"),
            lambda n: periodic_positional_encoding(n, d, period)[None],  # (1, L, d)
            f"the periodic table (1, L, {d}) of period {period}",
        )

    def describe(self, reference: Mapping[str, torch.Tensor]) -> str:
        def dim(key: str, axis: int) -> str:
            t = reference.get(key)
            return "?" if t is None or t.ndim <= axis else str(int(t.shape[axis]))

        d, three_v, ids = (
            dim("decoder.motion_map.weight", 0),
            dim("decoder.motion_map.weight", 1),
            dim("style_class_head.class_head.weight", 0),
        )
        verts = str(int(three_v) // 3) if three_v.isdigit() else "?"
        convs = sum(1 for k in reference if k.startswith("style_encoder.conv_layers.") and k.endswith(".conv.weight"))
        norm = "LN" if "content_encoder.conv_layers.0.layer_norm.weight" in reference else "IN"
        align = "conv" if "audio_encoder.down_sample.weight" in reference else "interpolation"
        guess = {("128", "5023", "150"): "hdtf", ("128", "5023", "8"): "vocaset", ("128", "23370", "6"): "biwi"}.get(
            (d, verts, ids)
        )
        return (
            f"d={d}, {verts} vertices, {ids} training ids, {convs} conv blocks, content_norm {norm}, "
            f"audio alignment {align}" + (f" (the {guess} preset)" if guess else "")
        )
