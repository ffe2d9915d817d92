"""FaceFormer's released checkpoints (``vocaset.pth``, ``biwi.pth``) onto talkmesh's FaceFormer.

The reference (EvelynFan/FaceFormer@dfaea81, ``faceformer.py`` class ``Faceformer``, saved
with ``torch.save(model.state_dict())``) names its modules as in the left column:

=============================  ==============================  ==========================================
reference                      talkmesh (methods/faceformer)   what
=============================  ==============================  ==========================================
``audio_encoder.*``            ``audio_encoder.model.*``       wav2vec2-base (``wav2vec.py`` subclasses
                                                               ``Wav2Vec2Model``; HF names unchanged):
                                                               CNN (frozen), feature projection,
                                                               transformer, ``masked_spec_embed``
``audio_encoder.encoder.pos_   ``...conv.parametrizations.     the positional conv's weight norm, saved
conv_embed.conv.weight_g/_v``  weight.original0/1``            by transformers 4.6 as ``weight_g``/``_v``
``audio_feature_map.*``        ``audio_proj.*``                Linear 768 -> d
``vertice_map.*``              ``motion_encoder.*``            Linear 3V -> d (motion embedding)
``PPE.pe``                     (not loaded)                    periodic PE table (1, p*(600//p+1), d);
                                                               talkmesh computes it for any length (Q1),
                                                               the table is checked equal
``transformer_decoder.*``      ``decoder.*``                   nn.TransformerDecoder, 1 layer, same
                                                               PyTorch names
``vertice_map_r.*``            ``motion_decoder.*``            Linear d -> 3V (output layer)
``obj_vector.weight``          ``style_embedding.weight``      bias-free Linear(n_subjects -> d)
=============================  ==============================  ==========================================

``biased_mask`` is a plain tensor attribute of the reference module, not in its state dict
(talkmesh builds the same bias on the fly); ``relu``-like modules have no tensors. A state
dict re-saved with a newer transformers (``parametrizations.weight.original0/1``) maps
through the ``audio_encoder.`` prefix unchanged.

Presets (main.py's arguments for the released runs, specs/faceformer.md §2-§3, datasets.md
§2.3, §3.3): VOCASET d 64, period 30, 5023 vertices, 30 fps, ``interp`` alignment, 8
training subjects; BIWI d 128, period 25, 23370 vertices, 25 fps, ``double`` alignment, 6
training subjects. The one-hot order is the reference's ``--train_subjects`` order.
Flags: the checkpoints were trained autoregressively (``teacher_forcing=False``) with
SpecAugment on (Q4, values of wav2vec2-base-960h's config); ``reference_tf_start_quirk``
(Q2) concerns only the teacher-forced path, which they were not trained with, so it stays
False. ``DataFacts.lip_indices`` / ``upper_indices`` stay empty: FaceFormer does not use
them, and the evaluator takes the regions from the user's corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from talkmesh.data import biwi, vocaset
from talkmesh.methods.base import DataFacts
from talkmesh.methods.faceformer import FaceFormerConfig, periodic_positional_encoding
from talkmesh.ops.importers.base import Importer, published_facts
from talkmesh.ops.importers.keymap import CheckpointImportError, KeyRule

__all__ = ["BIWI_TRAIN_SUBJECTS", "FACEFORMER_KEY_MAP", "VOCASET_TRAIN_SUBJECTS", "FaceFormerImporter"]

# datasets.md §2.3 / §3.3: the training subjects in the reference's one-hot order (the readers' own).
VOCASET_TRAIN_SUBJECTS: tuple[str, ...] = vocaset.TRAIN_SUBJECTS
BIWI_TRAIN_SUBJECTS: tuple[str, ...] = biwi.TRAIN_SUBJECTS

_POS_CONV = "encoder.pos_conv_embed.conv."
FACEFORMER_KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule(
        f"audio_encoder.{_POS_CONV}weight_g",
        f"audio_encoder.model.{_POS_CONV}parametrizations.weight.original0",
        "weight-norm magnitude (1, 1, 128), transformers 4.6 name",
    ),
    KeyRule(
        f"audio_encoder.{_POS_CONV}weight_v",
        f"audio_encoder.model.{_POS_CONV}parametrizations.weight.original1",
        "weight-norm direction (768, 48, 128), transformers 4.6 name",
    ),
    KeyRule("audio_encoder.", "audio_encoder.model.", "wav2vec2-base, HF Wav2Vec2Model names"),
    KeyRule("audio_feature_map.", "audio_proj.", "Linear 768 -> d"),
    KeyRule("vertice_map_r.", "motion_decoder.", "Linear d -> 3V, output layer"),
    KeyRule("vertice_map.", "motion_encoder.", "Linear 3V -> d, motion embedding"),
    KeyRule("obj_vector.", "style_embedding.", "bias-free Linear n_subjects -> d, style"),
    KeyRule("transformer_decoder.", "decoder.", "nn.TransformerDecoder (1 layer)"),
    KeyRule("PPE.pe", None, "periodic PE table, recomputed on the fly (Q1); checked equal"),
)


def _period_of(table: torch.Tensor) -> int | None:
    """The first t > 0 whose row equals row 0 of a (L, d) table, or None."""
    for t in range(1, table.shape[0]):
        if torch.allclose(table[t], table[0], atol=1e-6):
            return t
    return None


class FaceFormerImporter(Importer):
    """``talkmesh import faceformer --checkpoint vocaset.pth|biwi.pth --preset vocaset|biwi``."""

    method: ClassVar[str] = "faceformer"
    reference: ClassVar[str] = "EvelynFan/FaceFormer@dfaea81 faceformer.py Faceformer.state_dict()"
    presets: ClassVar[tuple[str, ...]] = ("vocaset", "biwi")
    key_map: ClassVar[tuple[KeyRule, ...]] = FACEFORMER_KEY_MAP

    def config(self, preset: str) -> FaceFormerConfig:
        self.check_preset(preset)
        cfg = FaceFormerConfig.vocaset() if preset == "vocaset" else FaceFormerConfig.biwi()
        encoder = dataclasses.replace(cfg.audio_encoder, from_config_only=True)
        return dataclasses.replace(cfg, audio_encoder=encoder)

    def facts(self, preset: str) -> DataFacts:
        self.check_preset(preset)
        return published_facts(preset)

    def flags(self, config: Any) -> dict[str, Any]:
        cfg = config
        return {
            "teacher_forcing": cfg.teacher_forcing,
            "reference_tf_start_quirk": cfg.reference_tf_start_quirk,
            "alignment": cfg.alignment,
            "spec_augment": cfg.audio_encoder.spec_augment,
        }

    def check_unused(self, method: torch.nn.Module, unused: Mapping[str, torch.Tensor]) -> None:
        """``PPE.pe`` (1, L, d) must be the periodic encoding of the model's d and period."""
        pe = unused.get("PPE.pe")
        if pe is None:
            return
        cfg = method.config
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != cfg.d_model:
            raise CheckpointImportError(f"'PPE.pe' {tuple(pe.shape)}: expected (1, L, {cfg.d_model})")
        expected = periodic_positional_encoding(pe.shape[1], cfg.d_model, cfg.period)  # (L, d)
        if not torch.allclose(pe[0].float(), expected, atol=1e-5):
            raise CheckpointImportError(
                f"'PPE.pe' has period {_period_of(pe[0].float())}, the preset's FaceFormer has period {cfg.period}"
            )

    def describe(self, reference: Mapping[str, torch.Tensor]) -> str:
        def dim(key: str, axis: int) -> str:
            t = reference.get(key)
            return "?" if t is None or t.ndim <= axis else str(int(t.shape[axis]))

        three_v = dim("vertice_map_r.weight", 0)
        verts = str(int(three_v) // 3) if three_v.isdigit() else "?"
        pe = reference.get("PPE.pe")
        period = _period_of(pe[0].float()) if pe is not None and pe.ndim == 3 else None
        guess = {("64", "5023"): " (the vocaset preset)", ("128", "23370"): " (the biwi preset)"}.get(
            (dim("audio_feature_map.weight", 0), verts), ""
        )
        return (
            f"d={dim('audio_feature_map.weight', 0)}, {verts} vertices, "
            f"{dim('obj_vector.weight', 1)} training subjects, period {period or '?'}{guess}"
        )
