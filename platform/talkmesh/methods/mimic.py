"""Mimic: Speaking Style Disentanglement for Speech-Driven 3D Facial Animation.

Paper: Hui Fu, Zeqing Wang, Ke Gong, Keze Wang, Tianshui Chen, Haojie Li, Haifeng Zeng,
Wenxiong Kang, AAAI 2024, arXiv:2312.10877.
Reference code: huifu99/Mimic@9e71299 (models/network.py, models/lib/*, losses/loss_collections.py,
config/HDTF/config.yaml, train.py, demo.py).
Specification: specs/mimic.md (section, quirk Qn and decision Dn numbers below refer to it).

The model (§2-§4): a content encoder E_c turns vertex offsets into frame-level content
codes c (B, T, d) and a style encoder E_s into a clip-level style code s (B, d) (both:
conv blocks + transformer; instance norm in E_c, or E_s's layer norms with
``content_norm="layer"``; layer norm and a temporal mean in E_s). A
wav2vec 2.0 encoder gives audio features a (B, T, d) at the motion rate. One
autoregressive transformer decoder, whose layer norms are style-adaptive (SALN, driven by
s), decodes offsets from either a (audio branch) or c (content branch), with a periodic
PE, FaceFormer's biased causal mask and a diagonal cross-attention mask. Four constraints
disentangle the spaces: a style classifier on s, an inverse classifier on mean_t c behind a
gradient-reversal layer, a CLIP-style contrastive loss between c and a, and two latent
cycle losses after decoding c with a batch-shuffled style. At test time a reference clip's
last ``style_ref_frames`` frames give the style code; audio is decoded in overlapping
windows, so any length works.

Deviations from the reference code (spec DECISIONS unless noted):
  1. D1/Q1: the encoders add a proper temporal sinusoidal PE; ``reference_pe_quirk=True``
     reproduces the reference's batch-index PE exactly (constant over time).
  2. D2/Q3: ``init_state`` is an offset (previous frame minus template, zeros at the
     sequence start) in training and inference. The shared window sampler does not hand
     over the frame before its window, so (project deviation) the method crops its own
     random ``window_frames`` windows from longer items and takes the true previous frame;
     items that are not cropped use a batch's optional ``init_state`` (B, V, 3) offsets, else
     zeros. The presets therefore load whole sequences (``data.window_seconds`` large).
  3. D4/Q6: padded frames are masked out of every loss and every encoder statistic
     (``mask_padding``); ``mask_padding=False`` restores the reference behaviour.
  4. Autoregression is computed incrementally (each new frame once, attending to the
     cached prefix), then one full decoder pass over [init, own outputs] returns the
     sequence, as the reference's last step does. In eval mode this equals the reference's
     per-step recomputation; with dropout the fed-back frames carry per-step dropout
     samples, as there.
  5. The periodic PE and the biased mask are computed for any length (reference tables:
     600 frames); windows are still limited to ``max_len``.
  6. The GRL weight schedule needs the epoch: the shared loop's ``on_epoch_start(epoch)``
     hook calls :meth:`Mimic.set_epoch`, which stores it in a buffer, so it survives
     checkpoints. A caller that never sets the epoch trains at the epoch-0 weight.
  7. ``items_per_video`` (40 random windows per HDTF video per epoch) is not a method
     setting but the data's: ``data.items_per_sequence`` (40 in configs/mimic/hdtf.yaml), so
     the reference's 150 epochs, its number of updates and its epoch-based GRL schedule
     carry over unchanged.
  8. ``generate(style=subject)`` / ``encode_style(subject=...)`` use an exponential moving
     average of that training subject's style codes, recorded during training (project
     DECISION; the reference has no subject-indexed path); ``style=None`` uses the mean
     of the recorded subject codes (zeros before any training).
  9. Windowed inference encodes each window's audio on its own (per-window utterance
     normalisation, README G8). Every window, the last one included, gets the samples of
     its whole frames only, as the reference's windowing cuts them (samples past the last
     whole frame are not used), and the frame count is floor(samples * fps / 16000) in
     exact arithmetic (the reference's samples // 640 at 25 fps). Sample boundaries are
     round(frame * 16000 / fps); at 30 fps this keeps 533.3 samples per frame where the
     reference's (unexercised) integer stride would be 533.
 10. D9: CTC, ArcFace and content-class heads are not implemented. D10: ``style_fuse``
     ``add`` adds s to every decoder input token and ``cat`` maps [token, s] through
     Linear(2d -> d), both with plain LayerNorms (the reference's exact variants are not
     part of the evidence).
 11. Auxiliary terms whose weight is 0 (or ``constraints=False``, the ablation switch) are
     still computed for the logs, without gradient. Classifier terms skip items whose
     subject is not a training identity (-1).
 12. The ``debug`` preset turns dropout and SpecAugment off (tiny windows would be mostly
     masked), as FaceFormer's does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.align import StridedConvAligner, frames_from_audio
from talkmesh.audio.encoders import AudioEncoderConfig, build_audio_encoder
from talkmesh.methods.base import (
    Batch,
    DataFacts,
    LossWeights,
    MethodConfig,
    MotionMethod,
    Reference,
    StyleState,
    StyleStateError,
    check_style_state,
    make_style_state,
    masked_mse,
    reference_field,
    weighted_loss,
)
from talkmesh.methods.faceformer import biased_causal_mask, periodic_positional_encoding
from talkmesh.methods.streaming import MotionStream, StreamContext
from talkmesh.nn.grl import GradientReversal
from talkmesh.nn.motion_encoder import MotionSequenceEncoder, masked_mean
from talkmesh.nn.saln import StyleAdaptiveLayerNorm

__all__ = [
    "AUX_TERMS",
    "Mimic",
    "MimicConfig",
    "MimicDecoder",
    "MimicLossWeights",
    "clip_loss",
    "content_cycle_loss",
    "diagonal_mask",
    "inference_windows",
    "mix_styles",
    "shuffle_index",
    "style_cycle_loss",
]

METHOD_NAME = "mimic"
STYLE_VERSION = 1
#: The auxiliary terms: the four constraints (the cycle pair counts as one).
AUX_TERMS: tuple[str, ...] = ("style_cls", "grl", "clip", "style_cycle", "content_cycle")


# --------------------------------------------------------------------------------------
# Config (§9)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MimicLossWeights(LossWeights):
    """Loss weights (§4, ``ComposeCycleLoss`` defaults). ``grl`` is the weight before the
    epoch schedule (``grl_decay_epochs`` / ``grl_decay_factors``)."""

    rec_a: float = 1.0  # MSE, audio branch
    rec_c: float = 1.0  # MSE, content branch
    style_cls: float = 2.5e-7  # CE of the style classifier on s
    grl: float = 5e-7  # CE of the inverse classifier on GRL(mean_t c)
    clip: float = 5e-7  # contrastive content <-> audio
    style_cycle: float = 2e-5  # 1 - cos(sg(s~), s_cyc)
    content_cycle: float = 5e-6  # margin contrastive between c_cyc and sg(c)


@dataclasses.dataclass(frozen=True)
class MimicConfig(MethodConfig):
    """Mimic hyper-parameters. The class defaults are the 3D-HDTF paper setting; presets:
    :meth:`hdtf`, :meth:`vocaset`, :meth:`biwi`, :meth:`debug`. One stage, Adam with a
    constant learning rate (§5): the :class:`MethodConfig` defaults for the optimizer and
    the learning-rate factor; ``grad_accum`` is the base default, 1."""

    # ---- encoders (§2.1, §2.2) ----
    d_model: int = 128
    enc_layers: int = 4
    enc_heads: int = 4
    enc_ff: int = 256
    enc_convs: int = 5
    enc_dropout: float = 0.1  # transformer + after the PE
    # E_c's norms, conv blocks and projection (§2.1); "layer" gives E_s's layout
    content_norm: Literal["instance", "layer"] = "instance"
    style_pool: Literal["mean", "max"] = "mean"
    reference_pe_quirk: bool = False  # Q1/D1: True = the reference's batch-index PE
    # ---- decoder (§2.4) ----
    dec_layers: int = 1
    dec_heads: int = 4
    dec_ff: int = 256
    dec_dropout: float = 0.1
    ppe_period: int = 30  # Q2: kept at 30 even at 25 fps
    max_len: int = 600  # longest window (training crop, inference window, style reference)
    style_fuse: Literal["saln", "add", "cat"] = "saln"
    # ---- audio (§2.3) ----
    audio_encoder: AudioEncoderConfig = dataclasses.field(
        default_factory=lambda: AudioEncoderConfig(kind="wav2vec2", freeze_feature_encoder=True, trainable_layers=-1)
    )
    # "conv": transformer at 50 Hz, Conv1d(k 15, stride 2) to the motion rate (HDTF, BIWI);
    # "interp": CNN features interpolated to exactly T before the transformer (VOCASET).
    audio_align: Literal["conv", "interp"] = "conv"
    audio_conv_kernel: int = 15
    # ---- identities (D7) ----
    n_ids: int = 0  # 0 = the number of training subjects in the data facts; else must match it
    # ---- losses (§4) ----
    loss_weights: MimicLossWeights = dataclasses.field(default_factory=MimicLossWeights)
    constraints: bool = True  # False = ablation: all auxiliary weights 0 (terms still logged)
    grl_decay_epochs: tuple[int, ...] = (20, 40)  # 0-based epoch from which each factor applies
    grl_decay_factors: tuple[float, ...] = (0.1, 0.5)  # cumulative: 5e-7 -> 5e-8 -> 2.5e-8
    grl_alpha: float = 1.0  # gradient multiplier of the reversal layer
    logit_scale_init: float = math.log(1.0 / 0.07)
    content_cycle_margin: float = 1.0
    cycle_shuffle: Literal["random", "derangement"] = "random"  # Q4
    mask_padding: bool = True  # Q6/D4
    # ---- training (§5, D3, D5) ----
    teacher_forcing: bool = False  # reconstruction branches
    cycle_teacher_forcing: bool = False  # debugging only: leaks the source style
    window_frames: int = 150  # random training crop of longer items (0 = never crop)
    lr: float = 1e-4  # Adam, constant
    epochs: int = 150
    batch_size: int = 6
    subject_style_momentum: float = 0.9  # EMA of each training subject's style code (deviation 8)
    # ---- inference and style (§6, §10) ----
    style_ref_frames: int = 150  # the last 6 s of the reference
    infer_window: int = 150
    infer_overlap: int = 10
    # How much of a subject's style-reference pool the evaluator hands to encode_style
    # (seconds; the last style_ref_frames frames of it are encoded, D13).
    reference_seconds: float = 600.0

    def __post_init__(self) -> None:
        self._check_architecture()
        self._check_losses()
        self._check_schedule_and_windows()

    def _check_architecture(self) -> None:
        if self.d_model < 2 or self.d_model % 2:
            raise ValueError(f"d_model must be even and >= 2 (sinusoidal PE), got {self.d_model}")
        for heads in ("enc_heads", "dec_heads"):
            h = getattr(self, heads)
            if h < 1 or self.d_model % h:
                raise ValueError(f"d_model={self.d_model} must be divisible by {heads}={h}")
        for name in ("enc_ff", "dec_layers", "dec_ff", "ppe_period", "max_len", "audio_conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("enc_layers", "enc_convs", "n_ids"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.audio_conv_kernel % 2 == 0:
            raise ValueError(f"audio_conv_kernel must be odd, got {self.audio_conv_kernel}")
        for name in ("enc_dropout", "dec_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.style_fuse not in ("saln", "add", "cat"):
            raise ValueError(f"style_fuse must be 'saln', 'add' or 'cat', got {self.style_fuse!r}")
        if self.audio_align not in ("conv", "interp"):
            raise ValueError(f"audio_align must be 'conv' or 'interp', got {self.audio_align!r}")

    def _check_losses(self) -> None:
        if self.cycle_shuffle not in ("random", "derangement"):
            raise ValueError(f"cycle_shuffle must be 'random' or 'derangement', got {self.cycle_shuffle!r}")
        if len(self.grl_decay_epochs) != len(self.grl_decay_factors):
            raise ValueError(
                f"grl_decay_epochs {list(self.grl_decay_epochs)} and grl_decay_factors "
                f"{list(self.grl_decay_factors)} must have the same length"
            )
        if any(e < 0 for e in self.grl_decay_epochs) or list(self.grl_decay_epochs) != sorted(self.grl_decay_epochs):
            raise ValueError(f"grl_decay_epochs must be non-negative and ascending, got {list(self.grl_decay_epochs)}")
        if any(not (math.isfinite(f) and f >= 0.0) for f in self.grl_decay_factors):
            raise ValueError(f"grl_decay_factors must be finite and >= 0, got {list(self.grl_decay_factors)}")
        for name in ("grl_alpha", "content_cycle_margin"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if not math.isfinite(self.logit_scale_init):
            raise ValueError("logit_scale_init must be finite")
        if not 0.0 <= self.subject_style_momentum < 1.0:
            raise ValueError(f"subject_style_momentum must lie in [0, 1), got {self.subject_style_momentum}")

    def _check_schedule_and_windows(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "style_ref_frames", "infer_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window_frames", "infer_overlap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.infer_overlap >= self.infer_window:
            raise ValueError(
                f"infer_overlap={self.infer_overlap} must be smaller than infer_window={self.infer_window}"
            )
        for name in ("window_frames", "infer_window", "style_ref_frames"):
            if getattr(self, name) > self.max_len:
                raise ValueError(f"{name}={getattr(self, name)} exceeds max_len={self.max_len}")
        if not self.reference_seconds > 0:
            raise ValueError(f"reference_seconds must be positive, got {self.reference_seconds}")

    @property
    def active_weights(self) -> dict[str, float]:
        """Loss weights with ``constraints=False`` applied (the GRL schedule is not)."""
        w = dataclasses.asdict(self.loss_weights)
        if not self.constraints:
            w.update({k: 0.0 for k in AUX_TERMS})
        return w

    def grl_weight(self, epoch: int) -> float:
        """The inverse-classifier weight at a 0-based epoch (§4 schedule)."""
        w = self.active_weights["grl"]
        for e, f in zip(self.grl_decay_epochs, self.grl_decay_factors, strict=True):
            if epoch >= e:
                w *= f
        return w

    # ---- presets ----
    PRESETS: ClassVar[tuple[str, ...]] = ("hdtf", "vocaset", "biwi", "debug")

    @classmethod
    def hdtf(cls) -> MimicConfig:
        """3D-HDTF (25 fps FLAME vertices, 150 training ids): the reference config."""
        return cls(n_ids=150)

    @classmethod
    def vocaset(cls) -> MimicConfig:
        """VOCASET (30 fps, 8 training subjects; D5, D7): interpolation alignment."""
        return cls(n_ids=8, audio_align="interp")

    @classmethod
    def biwi(cls) -> MimicConfig:
        """BIWI (25 fps, 6 training subjects; D5-D7): strided-conv alignment."""
        return cls(n_ids=6, audio_align="conv")

    @classmethod
    def debug(cls) -> MimicConfig:
        """Tiny CPU model for tests (§9 debug column): d 16, 1-layer encoders with 2 convs,
        tiny random wav2vec2, teacher forcing, windows of 50 frames, no dropout."""
        return cls(
            d_model=16,
            enc_layers=1,
            enc_heads=2,
            enc_ff=32,
            enc_convs=2,
            enc_dropout=0.0,
            dec_layers=1,
            dec_heads=2,
            dec_ff=32,
            dec_dropout=0.0,
            ppe_period=25,
            audio_encoder=AudioEncoderConfig(kind="wav2vec2", tiny=True, spec_augment=False),
            audio_align="interp",
            grl_decay_epochs=(1, 2),
            window_frames=50,
            teacher_forcing=True,
            lr=1e-3,
            epochs=2,
            batch_size=4,
            style_ref_frames=50,
            infer_window=50,
            infer_overlap=10,
        )


# --------------------------------------------------------------------------------------
# Losses (§4) and small helpers
# --------------------------------------------------------------------------------------


def clip_loss(
    content: torch.Tensor, audio: torch.Tensor, logit_scale: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE between content codes and audio features (§4).

    content, audio: (B, T, d); mask (B, T) True = valid (None = all). The N valid frames of
    the batch are flattened and L2-normalised; logits = exp(logit_scale) c a^T (N, N);
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2. Other frames of the same clip are
    negatives too.
    """
    if mask is not None:
        keep = mask.to(torch.bool)
        c, a = content[keep], audio[keep]  # (N, d)
    else:
        c, a = content.reshape(-1, content.shape[-1]), audio.reshape(-1, audio.shape[-1])
    c = F.normalize(c, dim=-1)
    a = F.normalize(a, dim=-1)
    logits = logit_scale.exp() * c @ a.t()  # (N, N)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def style_cycle_loss(style_target: torch.Tensor, style_cycle: torch.Tensor) -> torch.Tensor:
    """mean_i [1 - cos(sg(s~_i), s_cyc_i)] (§4); the target (B, d) is detached here."""
    return (1.0 - F.cosine_similarity(style_target.detach(), style_cycle, dim=-1)).mean()


def content_cycle_loss(
    content_cycle: torch.Tensor, content_target: torch.Tensor, margin: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Margin contrastive loss between re-encoded and original content (§4).

    content_cycle, content_target: (B, T, d) (the target is detached here); mask (B, T)
    zeroes padded frames. Each clip is flattened to one T*d vector and L2-normalised;
    d_ij = ||c_cyc_i - c_j||; loss = [sum_i d_ii^2 + sum_{i != j} max(0, margin - d_ij)^2] / (2B).
    """
    cc, ct = content_cycle, content_target.detach()
    if mask is not None:
        w = mask.to(cc.dtype)[..., None]
        cc, ct = cc * w, ct * w
    b = cc.shape[0]
    u = F.normalize(cc.reshape(b, -1), dim=-1)  # (B, T*d)
    v = F.normalize(ct.reshape(b, -1), dim=-1)
    diff = u[:, None, :] - v[None, :, :]  # (B, B, T*d)
    dist = torch.sqrt((diff**2).sum(-1) + 1e-12)  # (B, B); the epsilon keeps the gradient finite at 0
    eye = torch.eye(b, dtype=torch.bool, device=dist.device)
    pos = (dist[eye] ** 2).sum()
    neg = (F.relu(margin - dist[~eye]) ** 2).sum()
    return (pos + neg) / (2 * b)


def diagonal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Cross-attention mask (T, T), True where attention is blocked: query t sees memory t only."""
    return ~torch.eye(length, dtype=torch.bool, device=device)


def shuffle_index(batch: int, mode: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
    """Partner of each item in the cycle branch (§3.3, Q4): a uniform random permutation
    (may leave items in place, the reference) or a random cyclic permutation that never
    does ("derangement"; the identity when batch == 1)."""
    perm = torch.randperm(batch, generator=generator)
    if mode == "random" or batch < 2:
        return perm
    if mode != "derangement":
        raise ValueError(f"cycle_shuffle must be 'random' or 'derangement', got {mode!r}")
    out = torch.empty_like(perm)
    out[perm] = perm.roll(-1)  # item perm[i] takes the style of perm[i + 1]
    return out


def inference_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the sliding decoding windows (§6): the first starts at 0; each
    later one starts ``overlap`` frames before the previous one's end; lengths are at most
    ``window``; together they cover exactly ``num_frames`` frames."""
    if num_frames < 1:
        raise ValueError("no frames to decode")
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    out = [(0, min(window, num_frames))]
    while out[-1][0] + out[-1][1] < num_frames:
        start = out[-1][0] + out[-1][1] - overlap
        out.append((start, min(window, num_frames - start)))
    return out


# --------------------------------------------------------------------------------------
# Decoder (§2.4)
# --------------------------------------------------------------------------------------


class MimicDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer whose three norms are SALN(., s) (``fuse="saln"``)
    or plain LayerNorms (``add`` / ``cat``). Self-attention takes an additive bias (the
    biased causal mask); the cross-attention uses the diagonal alignment (query t sees
    memory t only).

    With one visible key the attention weight is 1, so the cross-attention output is
    out_proj(dropout_per_head(W_v m_t + b_v)) whatever the query: :meth:`diagonal_cross`
    computes it for all frames at once (equal to ``cross_attn`` with :func:`diagonal_mask`,
    attention dropout included), which lets the autoregressive loop run one frame at a time
    (:meth:`step`) with cached keys and values.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float, fuse: str) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, ff)
        self.linear2 = nn.Linear(ff, d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.saln = fuse == "saln"
        make = (lambda: StyleAdaptiveLayerNorm(d, d)) if self.saln else (lambda: nn.LayerNorm(d))
        self.norm1, self.norm2, self.norm3 = make(), make(), make()

    def modulations(self, style: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """SALN (gamma, beta) of the three norms for style codes (B, d); None without SALN."""
        if not self.saln:
            return None
        return [n.modulation(style) for n in (self.norm1, self.norm2, self.norm3)]  # type: ignore[operator]

    def _norm(self, i: int, x: torch.Tensor, mods: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        norm = (self.norm1, self.norm2, self.norm3)[i]
        if mods is None:
            return norm(x)
        return norm.modulate(x, *mods[i])  # type: ignore[operator]

    def diagonal_cross(self, memory: torch.Tensor) -> torch.Tensor:
        """Cross-attention output under the diagonal mask for memory (B, T, d) -> (B, T, d)."""
        mha = self.cross_attn
        d = memory.shape[-1]
        v = F.linear(memory, mha.in_proj_weight[2 * d :], mha.in_proj_bias[2 * d :])  # (B, T, d)
        if self.training and mha.dropout > 0:  # dropout of the (single) attention weight, per head
            b, t = v.shape[:2]
            keep = F.dropout(v.new_ones(b, t, self.heads, 1), mha.dropout)
            v = (v.reshape(b, t, self.heads, -1) * keep).reshape(b, t, d)
        return mha.out_proj(v)

    def _rest(
        self, x: torch.Tensor, cross: torch.Tensor, mods: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> torch.Tensor:
        x = self._norm(1, x + self.dropout2(cross), mods)
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self._norm(2, x + self.dropout3(ff), mods)

    def forward(
        self,
        x: torch.Tensor,
        cross: torch.Tensor,
        mods: list[tuple[torch.Tensor, torch.Tensor]] | None,
        self_bias: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, L, d), cross (B, L, d) = :meth:`diagonal_cross` of the memory, mods from
        :meth:`modulations`, self_bias (B*H, L, L) additive."""
        sa = self.self_attn(x, x, x, attn_mask=self_bias, need_weights=False)[0]
        x = self._norm(0, x + self.dropout1(sa), mods)
        return self._rest(x, cross, mods)

    def step(
        self,
        x: torch.Tensor,
        cache: dict[str, torch.Tensor],
        cross_t: torch.Tensor,
        mods: list[tuple[torch.Tensor, torch.Tensor]] | None,
        bias_row: torch.Tensor,
    ) -> torch.Tensor:
        """The newest position only: x (B, 1, d) its input; ``cache`` holds the keys and
        values of the earlier positions ((B, H, n-1, d/H), updated in place); cross_t
        (B, 1, d) its cross-attention output; bias_row (B, H, 1, n). Equals row n-1 of
        :meth:`forward` (in eval mode exactly, up to float rounding)."""
        mha = self.self_attn
        b, _, d = x.shape
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)  # (B, 1, d) each
        q, k, v = (z.reshape(b, 1, self.heads, -1).transpose(1, 2) for z in (q, k, v))  # (B, H, 1, d/H)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        p = mha.dropout if self.training else 0.0
        sa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_row, dropout_p=p)  # (B, H, 1, d/H)
        sa = mha.out_proj(sa.transpose(1, 2).reshape(b, 1, d))
        x = self._norm(0, x + self.dropout1(sa), mods)
        return self._rest(x, cross_t, mods)


class MimicDecoder(nn.Module):
    """``DecoderAutoregSALN`` (§2.4): offsets (B, T, 3V) from memory (B, T, d) aligned to
    the output frames, a style code (B, d) and an initial state (B, 3V) (offsets)."""

    def __init__(
        self, out_dim: int, d: int, heads: int, ff: int, layers: int, dropout: float, period: int, fuse: str
    ) -> None:
        super().__init__()
        self.d_model, self.heads, self.period, self.fuse = d, heads, period, fuse
        self.motion_map = nn.Linear(out_dim, d)
        self.fuse_proj = nn.Linear(2 * d, d) if fuse == "cat" else None
        self.pe_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(MimicDecoderLayer(d, heads, ff, dropout, fuse) for _ in range(layers))
        self.motion_map_r = nn.Linear(d, out_dim)
        nn.init.zeros_(self.motion_map_r.weight)  # Q5: the untrained model outputs the template
        nn.init.zeros_(self.motion_map_r.bias)

    def embed(self, frames: torch.Tensor, style: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        """frames (B, L, 3V) offsets, style (B, d), pe (L, d) -> decoder inputs (B, L, d)."""
        e = self.motion_map(frames)  # (B, L, d)
        if self.fuse == "add":
            e = e + style[:, None]
        elif self.fuse == "cat":
            assert self.fuse_proj is not None
            e = self.fuse_proj(torch.cat([e, style[:, None].expand_as(e)], dim=-1))
        return self.pe_dropout(e + pe[None])

    def forward(
        self,
        memory: torch.Tensor,
        style: torch.Tensor,
        init: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """memory (B, T, d), style (B, d), init (B, 3V). targets None: autoregressive, the
        step-0 input is init and each output frame is re-embedded as the next input; targets
        (B, T, 3V): teacher forcing with inputs [init, targets_1..T-1]. Returns (B, T, 3V)."""
        b, t = memory.shape[:2]
        pe = periodic_positional_encoding(t, self.d_model, self.period).to(memory)  # (T, d)
        bias = biased_causal_mask(self.heads, t, self.period, memory.device).to(memory.dtype)  # (H, T, T)
        ctx = [(layer.diagonal_cross(memory), layer.modulations(style)) for layer in self.layers]
        if targets is None:  # autoregression, one new frame per step (deviation 4)
            caches: list[dict[str, torch.Tensor]] = [{} for _ in self.layers]
            frames = [init[:, None]]  # decoder inputs as offsets, (B, 1, 3V) each
            for k in range(t - 1):  # the last output comes from the full pass below
                h = self.embed(frames[-1], style, pe[k : k + 1])  # (B, 1, d)
                row = bias[None, :, k : k + 1, : k + 1]  # (1, H, 1, k + 1)
                for layer, cache, (cross, mods) in zip(self.layers, caches, ctx, strict=True):
                    h = layer.step(h, cache, cross[:, k : k + 1], mods, row)
                frames.append(self.motion_map_r(h))  # (B, 1, 3V): y_{k+1}
            tokens = torch.cat(frames, dim=1)  # (B, T, 3V)
        else:
            tokens = torch.cat([init[:, None], targets[:, : t - 1]], dim=1)  # (B, T, 3V)
        h = self.embed(tokens, style, pe)  # (B, T, d)
        full_bias = bias.repeat(b, 1, 1)  # (B*H, T, T), index b*H + h as MultiheadAttention expects
        for layer, (cross, mods) in zip(self.layers, ctx, strict=True):
            h = layer(h, cross, mods, full_bias)
        return self.motion_map_r(h)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class Mimic(MotionMethod):
    """Mimic on vertex motion. ``facts`` gives fps, vertex count V and the training
    subjects (the classifier classes)."""

    name: ClassVar[str] = METHOD_NAME
    config_class: ClassVar[type[MimicConfig]] = MimicConfig
    style_version: ClassVar[int] = STYLE_VERSION
    stages: ClassVar[tuple[str, ...]] = ("main",)
    supports_style_mixing: ClassVar[bool] = True  # :meth:`mix_styles`
    config: MimicConfig

    def __init__(self, config: MimicConfig, facts: DataFacts) -> None:
        super().__init__(config, facts)
        if not isinstance(config, MimicConfig):
            raise TypeError(f"config must be MimicConfig, got {type(config).__name__}")
        if facts.num_vertices < 1:
            raise ValueError("Mimic predicts vertices: DataFacts.num_vertices must be >= 1")
        n_ids = facts.num_train_subjects
        if n_ids < 1:
            raise ValueError("Mimic's style and inverse classifiers need at least one training subject")
        if config.n_ids and config.n_ids != n_ids:
            raise ValueError(f"n_ids={config.n_ids} but the data has {n_ids} training subjects (D7); set n_ids=0")
        d, dim = config.d_model, 3 * facts.num_vertices
        self.output_dim = dim  # 3V
        self.num_ids = n_ids
        self._build_encoders(config, dim)  # content_encoder, style_encoder
        self._build_audio(config, facts.fps)  # audio_encoder, audio_aligner, audio_proj
        self.decoder = MimicDecoder(
            dim,
            d,
            config.dec_heads,
            config.dec_ff,
            config.dec_layers,
            config.dec_dropout,
            config.ppe_period,
            config.style_fuse,
        )
        self.style_classifier = nn.Linear(d, n_ids)
        self.grl = GradientReversal(config.grl_alpha)
        self.inverse_classifier = nn.Linear(d, n_ids)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # Deviation 6 and 8: schedule epoch and per-subject style codes travel with checkpoints.
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("subject_style_codes", torch.zeros(n_ids, d))
        self.register_buffer("subject_style_counts", torch.zeros(n_ids, dtype=torch.long))

    def _build_encoders(self, config: MimicConfig, dim: int) -> None:
        """E_c and E_s (§2.1, §2.2) over offsets of width ``dim`` = 3V."""
        pe = "batch_quirk" if config.reference_pe_quirk else "temporal"
        common = dict(
            in_dim=dim,
            d_model=config.d_model,
            n_convs=config.enc_convs,
            n_layers=config.enc_layers,
            n_heads=config.enc_heads,
            ff_dim=config.enc_ff,
            dropout=config.enc_dropout,
            proj_dropout=0.0,
            pe=pe,
            max_len=config.max_len,
        )
        self.content_encoder = MotionSequenceEncoder(norm=config.content_norm, **common)
        self.style_encoder = MotionSequenceEncoder(norm="layer", pool=config.style_pool, **common)

    def _build_audio(self, config: MimicConfig, fps: float) -> None:
        """The speech encoder, its alignment to ``fps`` motion frames and the projection to d (§2.3)."""
        self.audio_encoder = build_audio_encoder(config.audio_encoder)
        hidden = self.audio_encoder.hidden_size
        rate = self.audio_encoder.output_rate
        self.audio_aligner = (
            StridedConvAligner(hidden, hidden, rate, fps, kernel_size=config.audio_conv_kernel)
            if config.audio_align == "conv"
            else None
        )
        self.audio_proj = nn.Linear(hidden, config.d_model)

    # ------------------------------------------------------------------ schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the model the 0-based training epoch (drives the GRL weight schedule)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch.fill_(int(epoch))

    def on_epoch_start(self, epoch: int) -> None:
        """The loop's per-epoch hook (every rank, after resuming too): :meth:`set_epoch`.
        Mimic's learning rate is constant (§5), so the config keeps the base ``lr_factor``."""
        self.set_epoch(epoch)

    @property
    def grl_weight(self) -> float:
        """The current inverse-classifier weight (§4 schedule at :meth:`set_epoch`'s epoch)."""
        return self.config.grl_weight(int(self.epoch))

    # ------------------------------------------------------------------ frame counts
    def frames_for_audio(self, num_samples: int) -> int:
        """floor(samples * fps / 16000) in exact arithmetic: samples // 640 at 25 fps (§6)."""
        return frames_from_audio(int(num_samples), self.facts.fps, basis="samples", exact=True)

    # ------------------------------------------------------------------ encoders
    def encode_audio(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor | None, frames: torch.Tensor
    ) -> torch.Tensor:
        """Audio (B, S) raw 16 kHz, valid samples (B,) (None = all), motion frames (B,) ->
        features (B, T_max, d) aligned to the motion frames, zero past each T_b (§2.3)."""
        enc = self.audio_encoder
        b = audio.shape[0]
        if b == 1 and audio_lengths is not None:
            audio, audio_lengths = audio[:, : int(audio_lengths[0])], None
        if self.audio_aligner is None:
            feats = enc(audio, audio_lengths, num_frames=frames).features  # (B, T, H)
        else:
            out = enc(audio, audio_lengths)  # (B, N, H) at 50 Hz
            feats = self.audio_aligner(out.features, num_frames=frames, lengths=out.lengths).features  # (B, T, H)
        a = self.audio_proj(feats)  # (B, T, d)
        if b > 1 and bool((frames != a.shape[1]).any()):
            a = a * (torch.arange(a.shape[1], device=a.device)[None] < frames[:, None].to(a.device))[..., None]
        return a

    def content_codes(self, offsets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """E_c: offsets (B, T, 3V) -> content codes (B, T, d)."""
        return self.content_encoder.frames(offsets, mask)

    def style_codes(self, offsets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """E_s: offsets (B, T, 3V) -> style codes (B, d)."""
        return self.style_encoder(offsets, mask)

    # ------------------------------------------------------------------ training
    def _crop(self, batch: dict[str, Any]) -> None:
        """D2/D5: a random ``window_frames`` window of each longer item, in place; its
        init_state becomes the frame before the window (offsets), zeros at frame 0."""
        w = self.config.window_frames
        verts = batch["vertices"]
        t_max = verts.shape[1]
        if not w or t_max <= w:
            return
        lengths, spf = batch["motion_lengths"], self.facts.samples_per_frame
        b, dev = verts.shape[0], verts.device
        s_new = int(round(w * spf))
        new_verts = verts.new_zeros(b, w, *verts.shape[2:])
        new_audio = batch["audio"].new_zeros(b, s_new)
        new_len = torch.zeros(b, dtype=torch.long, device=dev)
        new_alen = torch.zeros(b, dtype=torch.long, device=dev)
        init = batch["init_state"].clone()
        for i in range(b):
            n = int(lengths[i])
            start = int(torch.randint(0, n - w + 1, ())) if n > w else 0
            keep = min(n, w)
            new_verts[i, :keep] = verts[i, start : start + keep]
            a0 = int(round(start * spf))
            a1 = min(int(round((start + keep) * spf)), int(batch["audio_lengths"][i]), batch["audio"].shape[1])
            new_audio[i, : a1 - a0] = batch["audio"][i, a0:a1]
            new_len[i], new_alen[i] = keep, a1 - a0
            if start > 0:
                init[i] = verts[i, start - 1] - batch["template"][i]
        batch.update(
            vertices=new_verts,
            audio=new_audio,
            motion_lengths=new_len,
            audio_lengths=new_alen,
            motion_mask=torch.arange(w, device=dev)[None] < new_len[:, None],
            init_state=init,
        )

    def _prepare(self, batch: Batch) -> dict[str, Any]:
        for key in ("audio", "vertices", "template"):
            if key not in batch:
                raise KeyError(f"Mimic batch needs {key!r} (got {sorted(batch)})")
        dev = self.device
        verts = batch["vertices"].to(dev, torch.float32)  # (B, T, V, 3)
        if verts.ndim != 4 or tuple(verts.shape[2:]) != (self.facts.num_vertices, 3):
            raise ValueError(f"batch vertices must be (B, T, {self.facts.num_vertices}, 3), got {tuple(verts.shape)}")
        b, t = verts.shape[:2]
        template = batch["template"].to(dev, torch.float32)  # (B, V, 3)
        mask = batch.get("motion_mask")
        mask = torch.ones(b, t, dtype=torch.bool, device=dev) if mask is None else mask.to(dev, torch.bool)
        lengths = batch.get("motion_lengths")
        lengths = mask.sum(dim=1) if lengths is None else lengths.to(dev, torch.long)
        audio = batch["audio"].to(dev, torch.float32)  # (B, S)
        alens = batch.get("audio_lengths")
        alens = torch.full((b,), audio.shape[1], dtype=torch.long, device=dev) if alens is None else alens.to(dev)
        subject = batch.get("subject")
        subject = (
            torch.full((b,), -1, dtype=torch.long, device=dev)
            if subject is None
            else torch.as_tensor(subject, device=dev).to(torch.long)
        )
        init = batch.get("init_state")
        if init is None:
            init = verts.new_zeros(b, self.facts.num_vertices, 3)
        else:
            init = torch.as_tensor(init).to(dev, torch.float32).reshape(b, self.facts.num_vertices, 3)
        out = dict(
            vertices=verts,
            template=template,
            motion_mask=mask,
            motion_lengths=lengths,
            audio=audio,
            audio_lengths=alens,
            subject=subject,
            init_state=init,
        )
        if self.training:
            self._crop(out)
        if int(out["vertices"].shape[1]) > self.config.max_len:
            raise ValueError(
                f"training window of {out['vertices'].shape[1]} frames exceeds max_len={self.config.max_len}; "
                "set window_frames"
            )
        return out

    def _classifier_loss(self, logits: torch.Tensor, subject: torch.Tensor) -> tuple[torch.Tensor, float]:
        """CE over items with a training identity (0 when there are none) and its accuracy."""
        known = subject >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0, 0.0
        if bool((subject >= self.num_ids).any()):
            raise ValueError(f"subject indices must lie in [-1, {self.num_ids}), got {subject.tolist()}")
        ce = F.cross_entropy(logits[known], subject[known])
        acc = float((logits[known].argmax(-1) == subject[known]).float().mean())
        return ce, acc

    @torch.no_grad()
    def _record_subject_styles(self, s: torch.Tensor, subject: torch.Tensor) -> None:
        m = self.config.subject_style_momentum
        for k in torch.unique(subject[subject >= 0]).tolist():
            mean = s[subject == k].mean(dim=0)
            if int(self.subject_style_counts[k]) == 0:
                self.subject_style_codes[k] = mean
            else:
                self.subject_style_codes[k].mul_(m).add_(mean, alpha=1.0 - m)
            self.subject_style_counts[k] += int((subject == k).sum())

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a batch (specs/README.md schema): ``audio`` (B, S), ``audio_lengths`` (B,),
        ``vertices`` (B, T, V, 3), ``template`` (B, V, 3), ``subject`` (B,) (-1 = unseen),
        ``motion_mask`` (B, T), optional ``init_state`` (B, V, 3) offsets. Items longer than
        ``window_frames`` are cropped at random (training mode).

        Returns (loss, logs): the 7 terms of §4 unweighted and ``<term>_weighted``, ``loss``,
        ``grl_weight`` (scheduled), ``logit_scale`` (exp), ``style_cls_acc``, ``grl_acc``
        (inverse-classifier accuracy) and ``frames``.
        """
        cfg = self.config
        p = self._prepare(batch)
        verts, template, subject = p["vertices"], p["template"], p["subject"]
        b, t = verts.shape[:2]
        offsets = (verts - template[:, None]).reshape(b, t, self.output_dim)  # (B, T, 3V)
        init = p["init_state"].reshape(b, self.output_dim)  # (B, 3V)
        valid, enc_mask, frames, alens = self._padding(p)

        c = self.content_codes(offsets, enc_mask)  # (B, T, d)
        s = self.style_codes(offsets, enc_mask)  # (B, d)
        a = self.encode_audio(p["audio"], alens, frames)  # (B, T, d)
        if self.training:
            self._record_subject_styles(s.detach(), subject)

        weights = cfg.active_weights
        weights["grl"] = self.grl_weight
        s_tilde = s[shuffle_index(b, cfg.cycle_shuffle).to(verts.device)]  # (B, d)
        cycle_grad = weights["style_cycle"] > 0 or weights["content_cycle"] > 0
        pred_a, pred_c, m_tilde = self._decode_branches(a, c, s, s_tilde, init, offsets, cycle_grad)
        with contextlib.nullcontext() if cycle_grad else torch.no_grad():
            s_cyc = self.style_codes(m_tilde, enc_mask)  # (B, d)
            c_cyc = self.content_codes(m_tilde, enc_mask)  # (B, T, d)

        terms = self._reconstruction_terms(pred_a, pred_c, offsets, valid)
        aux, style_acc, grl_acc = self._constraint_terms(
            {"a": a, "c": c, "s": s, "s_tilde": s_tilde, "s_cyc": s_cyc, "c_cyc": c_cyc}, subject, valid
        )
        terms.update(aux)
        terms = {k: (v if weights[k] > 0 else v.detach()) for k, v in terms.items()}  # deviation 11
        loss, logs = weighted_loss(terms, weights)
        logs.update(
            grl_weight=float(weights["grl"]),
            logit_scale=float(self.logit_scale.detach().exp()),
            style_cls_acc=style_acc,
            grl_acc=grl_acc,
            frames=float(valid.sum()),
        )
        return loss, logs

    def _padding(
        self, p: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Of a prepared batch: valid frames (B, T), the encoders' mask (None = all valid),
        motion frames (B,) and audio lengths (B,) for the audio encoder (None = all samples).
        ``mask_padding=False`` is the reference behaviour (Q6): padded frames are data."""
        verts = p["vertices"]
        b, t = verts.shape[:2]
        if self.config.mask_padding:
            valid = p["motion_mask"][:, :t]  # (B, T)
            enc_mask = None if bool(valid.all()) else valid
            return valid, enc_mask, p["motion_lengths"], p["audio_lengths"]
        valid = torch.ones(b, t, dtype=torch.bool, device=verts.device)
        return valid, None, torch.full((b,), t, dtype=torch.long, device=verts.device), None

    def _decode_branches(
        self,
        a: torch.Tensor,
        c: torch.Tensor,
        s: torch.Tensor,
        s_tilde: torch.Tensor,
        init: torch.Tensor,
        offsets: torch.Tensor,
        cycle_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three decoder branches (§3): audio a (B, T, d) and content c (B, T, d) under
        their own style s (B, d), and c under the shuffled style s~ (B, d) for the cycle.
        init (B, 3V), offsets (B, T, 3V) the teacher-forcing targets. Returns offsets
        (pred_a, pred_c, m~), each (B, T, 3V); m~ has no graph unless ``cycle_grad``."""
        cfg, b = self.config, a.shape[0]
        tf_targets = offsets if cfg.teacher_forcing else None
        if cycle_grad and cfg.teacher_forcing == cfg.cycle_teacher_forcing:  # one decoder call for 3 branches
            out = self.decoder(
                torch.cat([a, c, c]),
                torch.cat([s, s, s_tilde]),
                init.repeat(3, 1),
                None if tf_targets is None else tf_targets.repeat(3, 1, 1),
            )  # (3B, T, 3V)
            return out[:b], out[b : 2 * b], out[2 * b :]
        out = self.decoder(
            torch.cat([a, c]),
            torch.cat([s, s]),
            init.repeat(2, 1),
            None if tf_targets is None else tf_targets.repeat(2, 1, 1),
        )  # (2B, T, 3V)
        with contextlib.nullcontext() if cycle_grad else torch.no_grad():
            m_tilde = self.decoder(c, s_tilde, init, offsets if cfg.cycle_teacher_forcing else None)
        return out[:b], out[b:], m_tilde

    def _reconstruction_terms(
        self, pred_a: torch.Tensor, pred_c: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``rec_a`` / ``rec_c``: vertex MSE (B, T, 3V) of both branches over the valid (B, T) frames."""
        return {"rec_a": masked_mse(pred_a, offsets, valid), "rec_c": masked_mse(pred_c, offsets, valid)}

    def _constraint_terms(
        self, codes: dict[str, torch.Tensor], subject: torch.Tensor, valid: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """The four constraints (§4), in :data:`AUX_TERMS` order, and the two classifier
        accuracies. ``codes``: a, c (B, T, d); s, s_tilde, s_cyc (B, d); c_cyc (B, T, d)."""
        c = codes["c"]
        terms: dict[str, torch.Tensor] = {}
        terms["style_cls"], style_acc = self._classifier_loss(self.style_classifier(codes["s"]), subject)
        pooled_c = masked_mean(c, valid)  # (B, d)
        terms["grl"], grl_acc = self._classifier_loss(self.inverse_classifier(self.grl(pooled_c)), subject)
        terms["clip"] = clip_loss(c, codes["a"], self.logit_scale, valid)
        terms["style_cycle"] = style_cycle_loss(codes["s_tilde"], codes["s_cyc"])
        terms["content_cycle"] = content_cycle_loss(codes["c_cyc"], c, self.config.content_cycle_margin, valid)
        return terms, style_acc, grl_acc

    # ------------------------------------------------------------------ inference
    def resolve_style(self, style: StyleState | int | str | None) -> torch.Tensor:
        """Style code (d,) from a Mimic StyleState, a training subject (index or name: its
        recorded code, deviation 8) or None (the mean recorded code; zeros before training)."""
        d = self.config.d_model
        if isinstance(style, dict):
            state = self.check_style(style)
            code = state.get("style_code")
            if not isinstance(code, torch.Tensor) or tuple(code.shape) != (d,):
                shape = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
                raise StyleStateError(f"Mimic StyleState 'style_code' must be a ({d},) tensor, got {shape}")
            return code.to(self.device, torch.float32)
        if style is None:
            seen = self.subject_style_counts > 0
            if not bool(seen.any()):
                return torch.zeros(d, device=self.device)
            return self.subject_style_codes[seen].mean(dim=0)
        if isinstance(style, (int, np.integer, str)) and not isinstance(style, bool):
            k = self.facts.subject_index(style)
            if int(self.subject_style_counts[k]) == 0:
                raise ValueError(
                    f"no style code recorded for training subject {self.facts.train_subjects[k]!r} (the model has "
                    "not trained on it); pass a StyleState from encode_style(reference) instead"
                )
            return self.subject_style_codes[k].clone()
        raise TypeError(
            f"style must be None, a subject index or name, or a StyleState dict; got {type(style).__name__}"
        )

    def _audio_window(self, audio: torch.Tensor, start: int, length: int, offset: int = 0) -> torch.Tensor:
        """The samples of the whole frames [start, start + length) of a (S,) utterance (the
        last window too: samples past its last whole frame are left out, as the reference's
        windowing does), zero-padded to the encoder's receptive field. ``offset``: the
        utterance's sample index of ``audio[0]`` (a stream keeps only its tail)."""
        spf = self.facts.samples_per_frame
        a0 = int(round(start * spf))
        a1 = min(int(round((start + length) * spf)), audio.shape[0] + offset)
        x = audio[a0 - offset : a1 - offset]
        need = max(self.audio_encoder.receptive_field, int(round(length * spf)))
        if x.shape[0] < need:
            x = F.pad(x, (0, need - x.shape[0]))
        return x[None]  # (1, S_w)

    def _decode_windows(self, memory_for: Any, total: int, code: torch.Tensor) -> torch.Tensor:
        """Sliding-window decoding (§6): memory_for(start, length) -> (1, L, d).
        Returns offsets (T, 3V)."""
        cfg = self.config
        pieces = []
        init = torch.zeros(1, self.output_dim, device=self.device)
        windows = inference_windows(total, cfg.infer_window, cfg.infer_overlap)
        for i, (start, length) in enumerate(windows):
            memory = memory_for(start, length)  # (1, L, d)
            y = self.decoder(memory, code[None], init)  # (1, L, 3V)
            pieces.append(y[0] if i == 0 else y[0, cfg.infer_overlap :])
            init = y[:, -cfg.infer_overlap] if cfg.infer_overlap else y[:, -1]  # offsets
        return torch.cat(pieces, dim=0)  # (T, 3V)

    @torch.no_grad()
    def generate(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Animate one utterance: audio (S,) or (1, S) raw 16 kHz, template (V, 3), style a
        StyleState (:meth:`encode_style`, :func:`mix_styles`), a training subject or None.
        Returns {"vertices": (T, V, 3)}, T = :meth:`frames_for_audio` (S), decoded in
        windows of ``infer_window`` frames overlapping by ``infer_overlap``."""
        a = self.as_audio(audio)[0]  # (S,)
        tmpl = self.as_template(template, style)  # (V, 3); None: the carried one (MotionMethod.template_for)
        code = self.resolve_style(style)  # (d,)
        total = self.frames_for_audio(a.shape[0])
        if total < 1:
            raise ValueError(f"audio too short: {a.shape[0]} samples give no motion frame at {self.facts.fps:g} fps")

        def memory_for(start: int, length: int) -> torch.Tensor:
            x = self._audio_window(a, start, length)
            return self.encode_audio(x, None, torch.tensor([length], device=self.device))

        with self.eval_mode():
            offsets = self._decode_windows(memory_for, total, code)
        return {"vertices": offsets.reshape(total, self.facts.num_vertices, 3) + tmpl}  # (T, V, 3)

    def make_stream(
        self, template: torch.Tensor | np.ndarray | None, style: StyleState | int | str | None, context: StreamContext
    ) -> MotionStream:
        """:meth:`generate`'s own decoding windows (:class:`MimicStream`): equal to ``generate``,
        with a look-ahead of one window less a frame. ``context`` does not apply (the windows
        are the method's)."""
        return MimicStream(self, template, style)

    @torch.no_grad()
    def generate_from_motion(
        self,
        vertices: torch.Tensor | np.ndarray,
        driving_template: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray,
        style: StyleState | int | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Motion-driven animation (§6 "other uses"): the content codes of a driving motion
        (T, V, 3) with its template replace the audio features; same windows as
        :meth:`generate`. Returns {"vertices": (T, V, 3)} on ``template``."""
        drive = self._offsets(vertices, driving_template, "driving vertices")  # (T, 3V)
        tmpl = self.as_template(template)
        code = self.resolve_style(style)

        def memory_for(start: int, length: int) -> torch.Tensor:
            return self.content_codes(drive[None, start : start + length])

        with self.eval_mode():
            offsets = self._decode_windows(memory_for, drive.shape[0], code)
        return {"vertices": offsets.reshape(-1, self.facts.num_vertices, 3) + tmpl}

    # ------------------------------------------------------------------ style interface
    @property
    def reference_seconds(self) -> float:
        """``reference_seconds``: how much of a style-reference pool the evaluator hands to
        :meth:`encode_style`, which encodes its last ``style_ref_frames`` frames (D13)."""
        return self.config.reference_seconds

    def _offsets(self, vertices: Any, template: Any, what: str, last: int | None = None) -> torch.Tensor:
        """(T, V, 3) or (T, 3V) vertices minus a (V, 3) template -> offsets (T, 3V); with
        ``last``, of the last ``last`` frames only (the others are neither checked nor used)."""
        if vertices is None:
            raise ValueError(f"{what}: missing; expected (T, {self.facts.num_vertices}, 3)")
        if template is None:  # offsets need the motion's own template, never a carried one
            raise ValueError(f"{what}: needs its own ({self.facts.num_vertices}, 3) template")
        tmpl = self.as_template(template)
        v = torch.as_tensor(np.asarray(vertices) if not isinstance(vertices, torch.Tensor) else vertices)
        v = v.to(self.device, torch.float32)
        if v.ndim == 2 and v.shape[1] == self.output_dim:
            v = v.reshape(v.shape[0], -1, 3)
        if v.ndim != 3 or tuple(v.shape[1:]) != (self.facts.num_vertices, 3) or v.shape[0] < 1:
            raise ValueError(f"{what} must be (T >= 1, {self.facts.num_vertices}, 3), got {tuple(v.shape)}")
        v = v[-last:] if last is not None else v
        # A sum of finite values is finite unless it overflows: one pass instead of isfinite's
        # four on the common path; the exact check decides otherwise.
        if not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what} hold non-finite values")
        return (v - tmpl).reshape(v.shape[0], self.output_dim)

    def _state(self, code: torch.Tensor, source: str, ref_frames: int, **extra: Any) -> StyleState:
        return make_style_state(
            self.name,
            self.style_version,
            style_code=code.detach().float(),
            d_model=self.config.d_model,
            ref_frames=int(ref_frames),
            source=source,
            **extra,
        )

    @torch.no_grad()
    def encode_style(self, reference: Reference | None = None, *, subject: int | str | None = None) -> StyleState:
        """StyleState {method "mimic", version, style_code (d,), d_model, ref_frames, source}.

        ``reference``: a clip record with ``vertices`` (T, V, 3) and ``template`` (V, 3)
        (audio is not needed): E_s on the offsets of its last ``style_ref_frames`` frames
        (all of them when shorter), in eval mode (§10). ``subject`` (training index or
        name): its recorded code (deviation 8). Parameters are never updated.
        """
        if subject is not None:
            k = self.facts.subject_index(subject)
            code = self.resolve_style(k)
            return self._state(code, "subject", 0, subject_name=self.facts.train_subjects[k])
        if reference is None:
            raise ValueError("encode_style needs a reference clip (vertices + template) or a training subject")
        offsets = self._offsets(
            reference_field(reference, "vertices"),
            reference_field(reference, "template"),
            "reference vertices",
            last=self.config.style_ref_frames,
        )  # (T_ref, 3V)
        with self.eval_mode():
            code = self.style_codes(offsets[None])[0]  # (d,)
        return self._state(code, "reference", offsets.shape[0])

    def adapt(self, reference: Reference, **kwargs: Any) -> StyleState:
        """Mimic needs no optimisation: the same as :meth:`encode_style` (§10)."""
        if kwargs:
            raise TypeError(f"Mimic.adapt takes no options, got {sorted(kwargs)}")
        return self.encode_style(reference)

    def mix_styles(self, states: Sequence[StyleState], weights: Sequence[float]) -> StyleState:
        """:func:`mix_styles` for this model (also checks the codes fit its d_model)."""
        mixed = mix_styles(states, weights)
        self.resolve_style(mixed)
        return mixed


def mix_styles(states: Sequence[StyleState], weights: Sequence[float]) -> StyleState:
    """Convex combination of Mimic StyleStates (style interpolation, §6, §10).

    ``weights`` are finite, non-negative, with a positive sum, one per state; they are
    normalised to sum 1. All states must be Mimic states of the same version and d_model.
    Returns a StyleState with ``style_code`` = sum_i w_i code_i, ``source`` "mix",
    ``mix_weights`` (n,) (normalised) and ``ref_frames`` the smallest of the inputs'.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or len(states) == 0:
        raise ValueError("mix_styles needs a non-empty list of StyleStates")
    w = [float(x) if isinstance(x, (int, float, np.number)) and not isinstance(x, bool) else None for x in weights]
    if len(w) != len(states):
        raise ValueError(f"mix_styles: {len(states)} styles but {len(w)} weights")
    if any(x is None or not math.isfinite(x) for x in w):
        raise ValueError(f"mix_styles: weights must be finite numbers, got {list(weights)}")
    ws = torch.tensor(w, dtype=torch.float64)
    if bool((ws < 0).any()):
        raise ValueError(f"mix_styles: weights must be non-negative, got {w}")
    total = float(ws.sum())
    if not total > 0:
        raise ValueError(f"mix_styles: weights must have a positive sum, got {w}")
    ws = ws / total
    first = check_style_state(states[0], method=METHOD_NAME)
    version, d = first["version"], first.get("d_model")
    codes = []
    for i, st in enumerate(states):
        st = check_style_state(st, method=METHOD_NAME, version=version)
        code = st.get("style_code")
        if not isinstance(code, torch.Tensor) or code.ndim != 1 or st.get("d_model") != d or code.shape[0] != d:
            raise StyleStateError(f"mix_styles: style {i} has no ({d},) 'style_code' matching the first style")
        codes.append(code.to(torch.float64))
    mixed = (torch.stack(codes) * ws[:, None]).sum(dim=0).to(torch.float32)  # (d,)
    frames = [int(st.get("ref_frames", 0)) for st in states]
    return make_style_state(
        METHOD_NAME,
        version,
        style_code=mixed,
        d_model=int(d),
        ref_frames=min(frames),
        source="mix",
        mix_weights=ws.to(torch.float32),
    )


class MimicStream(MotionStream):
    """Mimic's stream: :meth:`Mimic.generate` decodes fixed windows of ``infer_window`` frames
    (each later one starting ``infer_overlap`` frames before the previous one's end, its
    initial state the previous window's frame there) and its audio encoder sees only the
    window's audio, so a window is decoded as soon as all its audio has arrived and the stream
    equals ``generate`` frame for frame. Look-ahead: one window less a frame
    (``(infer_window - 1) / fps`` s, 4.97 s at paper settings); the last window at ``finish``."""

    def __init__(self, model: Mimic, template: Any, style: StyleState | int | str | None) -> None:
        super().__init__(model, StreamContext(left_s=0.0, right_s=0.0))
        self.model = model
        self.template = model.as_template(template, style)  # (V, 3)
        self.code = model.resolve_style(style)  # (d,)
        self.init = torch.zeros(1, model.output_dim, device=model.device)  # offsets before the window
        self.covered = 0  # frames covered by the windows decoded so far

    @property
    def lookahead_s(self) -> float:
        """A window's first frame waits for the rest of its window."""
        return (self.model.config.infer_window - 1) / self.fps

    def _next_needed(self) -> int:
        return max(0, self.covered - self.model.config.infer_overlap)

    def _frames(self, ready: int, final: bool) -> dict[str, torch.Tensor]:
        cfg, total = self.model.config, self.model.frames_for_audio(self.samples)
        pieces = []
        while self.covered < total:
            start = self.covered - cfg.infer_overlap if self.covered else 0
            length = min(cfg.infer_window, total - start)
            if length < cfg.infer_window and not final:
                break  # not all of the window's audio is here yet
            x = self.model._audio_window(self._buf, start, length, offset=self._start)  # (1, S_w)
            memory = self.model.encode_audio(x, None, torch.tensor([length], device=self.model.device))
            y = self.model.decoder(memory, self.code[None], self.init)  # (1, L, 3V)
            pieces.append(y[0] if not self.covered else y[0, cfg.infer_overlap :])
            self.init = y[:, -cfg.infer_overlap] if cfg.infer_overlap else y[:, -1]
            self.covered = start + length
        if not pieces:
            return {}
        offsets = torch.cat(pieces)  # (n, 3V)
        return {"vertices": offsets.reshape(-1, self.model.facts.num_vertices, 3) + self.template}  # (n, V, 3)
