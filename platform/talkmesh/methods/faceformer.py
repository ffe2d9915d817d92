"""FaceFormer: Speech-Driven 3D Facial Animation with Transformers.

Paper: Yingruo Fan, Zhaojiang Lin, Jun Saito, Wenping Wang, Taku Komura, CVPR 2022,
arXiv:2112.05329.
Reference code: EvelynFan/FaceFormer@dfaea81 (faceformer.py, wav2vec.py, main.py).
Specification: specs/faceformer.md (section numbers below refer to it).

The model (§3): a wav2vec 2.0 encoder (CNN frozen, projection + transformer fine-tuned)
turns 16 kHz speech into features aligned to the motion frames; a one-layer transformer
decoder predicts per-frame vertex offsets autoregressively. Its self-attention carries an
ALiBi-style causal bias with a period, its inputs a periodic positional encoding (PPE), and
its cross-attention an alignment mask. Speaking style is a bias-free linear embedding of a
one-hot over the training subjects, added to every decoder input. The output layer is
zero-initialised, so an untrained model outputs the template.

Deviations from the reference code (all spec DECISIONS unless noted):
  1. Q1: the PPE and the biased mask are computed for any length (the reference pre-builds
     600 frames and fails beyond); the values within 600 frames are identical.
  2. Q2: the teacher-forced path starts with the style token alone, like the
     autoregressive path. ``reference_tf_start_quirk=True`` restores E(0) + s.
  3. Q8: inside the autoregressive loop the output layer maps only the newest frame; the
     last step's decoder output is mapped once at the end (numerically identical).
  4. Batches larger than 1 are allowed: frames past ``motion_mask`` are padding and the
     loss is averaged over valid frames only (the paper presets keep batch size 1).
  5. Audio is normalised per utterance inside the encoder (README G8), as the processor did.
  6. (Not a deviation; §3.1, Q3.) ``alignment="double"`` (BIWI) is exactly the reference:
     the whole waveform is normalised and goes through the CNN, whose 50 Hz frames are
     trimmed to an even count and to at most 2T before the feature projection and the
     transformer. ``"interp"`` (VOCASET) interpolates the whole waveform's CNN frames to T.
  7. Style interface (§7, §11): ``encode_style(subject=k)`` is the one-hot of k;
     ``encode_style(reference)`` and ``adapt(reference)`` decode the reference once per
     training one-hot and select the lowest vertex MSE; ``adapt(mode="optimize")``
     refines a free style vector with the model frozen. ``generate(style=None)`` uses the
     one-hot ``default_subject``.
  8. The ``debug`` preset turns SpecAugment off (tiny clips would be mostly masked with
     the checkpoint's minimum of 2 masks of 10 frames); the paper presets keep it (Q4).
  9. Inference decodes incrementally (:class:`IncrementalDecoder`, issue 15): cached keys
     and values per layer instead of re-running the decoder over the whole prefix for every
     frame as the reference does; equal up to float rounding (the reference path stays as
     ``decode(..., incremental=False)`` and in training mode).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.align import frames_from_audio
from talkmesh.audio.encoders import AudioEncoderConfig, build_audio_encoder
from talkmesh.methods.base import (
    Batch,
    DataFacts,
    MethodConfig,
    MotionMethod,
    Reference,
    StyleState,
    StyleStateError,
    make_style_state,
    masked_mse,
    reference_field,
    weighted_loss,
)
from talkmesh.methods.streaming import MotionStream, StreamContext

__all__ = [
    "FaceFormer",
    "FaceFormerConfig",
    "EncodedBatch",
    "FaceFormerLossWeights",
    "IncrementalDecoder",
    "PeriodicPositionalEncoding",
    "alibi_slopes",
    "alignment_mask",
    "biased_causal_mask",
    "condition_filename",
    "periodic_alibi_bias",
    "periodic_positional_encoding",
    "tokens_per_frame",
]

Alignment = Literal["interp", "double"]


# --------------------------------------------------------------------------------------
# Config (§10)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaceFormerLossWeights:
    """Loss weights (§4): the vertex MSE is the only term."""

    rec: float = 1.0


@dataclasses.dataclass(frozen=True)
class FaceFormerConfig(MethodConfig):
    """FaceFormer hyper-parameters. The class defaults are the VOCASET paper setting;
    presets: :meth:`vocaset`, :meth:`biwi`, :meth:`flame25` (MEAD / 3D-HDTF), :meth:`debug`.
    One stage, Adam with default betas and a constant learning rate: the
    :class:`MethodConfig` defaults (``train.weight_decay`` 0 makes AdamW Adam)."""

    # ---- architecture (§3) ----
    d_model: int = 64
    period: int = 30  # PPE period p and the period of the attention bias
    n_heads: int = 4
    ff_mult: int = 2  # feed-forward width = ff_mult * d_model
    n_layers: int = 1
    dropout: float = 0.1  # decoder layers and after the PPE
    audio_encoder: AudioEncoderConfig = dataclasses.field(
        default_factory=lambda: AudioEncoderConfig(kind="wav2vec2", freeze_feature_encoder=True, trainable_layers=-1)
    )
    # "interp": CNN features interpolated to exactly T frames, frame t sees audio token t.
    # "double": 50 Hz kept (trimmed to even and <= 2T), frame t sees tokens 2t and 2t+1.
    alignment: Alignment = "interp"
    # ---- training (§4, §5) ----
    teacher_forcing: bool = False  # the reference trains autoregressively
    reference_tf_start_quirk: bool = False  # Q2: teacher-forced first token E(0) + s
    loss_weights: FaceFormerLossWeights = dataclasses.field(default_factory=FaceFormerLossWeights)
    lr: float = 1e-4  # Adam, default betas, no scheduler
    epochs: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    checkpoint_every: int = 25  # epochs
    # ---- style (§7) ----
    default_subject: int = 0  # one-hot used by generate(style=None)
    adapt_mode: Literal["select", "optimize"] = "select"
    adapt_seconds: float = 10.0  # reference length used by encode_style / adapt
    adapt_lr: float = 1e-3  # optimize mode: Adam on a free style vector
    adapt_steps: int = 100

    def __post_init__(self) -> None:
        if self.d_model < 2 or self.d_model % 2:
            raise ValueError(f"d_model must be even and >= 2 (sinusoidal PPE), got {self.d_model}")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("period", "ff_mult", "n_layers", "epochs", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.adapt_lr <= 0 or self.adapt_seconds <= 0:
            raise ValueError("lr, adapt_lr and adapt_seconds must be positive")
        if self.adapt_steps < 0 or self.default_subject < 0:
            raise ValueError("adapt_steps and default_subject must be >= 0")

    # ---- presets ----
    PRESETS: ClassVar[tuple[str, ...]] = ("vocaset", "biwi", "flame25", "debug")

    @classmethod
    def vocaset(cls) -> FaceFormerConfig:
        """VOCASET (30 fps, 5023 vertices, 8 training subjects): d 64, period 30, interp."""
        return cls()

    @classmethod
    def biwi(cls) -> FaceFormerConfig:
        """BIWI (25 fps, 23370 vertices, 6 training subjects): d 128, period 25, double."""
        return cls(d_model=128, period=25, alignment="double")

    @classmethod
    def flame25(cls) -> FaceFormerConfig:
        """25 fps FLAME-vertex corpora (MEAD, 3D-HDTF; §11): d 64, period 25, double."""
        return cls(d_model=64, period=25, alignment="double")

    @classmethod
    def debug(cls) -> FaceFormerConfig:
        """Tiny CPU model for tests: d 16, 2 heads, 1 layer, no dropout, tiny random
        wav2vec2 (hidden 32, 2 layers), teacher forcing, SpecAugment off."""
        return cls(
            d_model=16,
            period=25,
            n_heads=2,
            ff_mult=2,
            n_layers=1,
            dropout=0.0,
            audio_encoder=AudioEncoderConfig(kind="wav2vec2", tiny=True, spec_augment=False),
            alignment="interp",
            teacher_forcing=True,
            lr=1e-3,
            epochs=2,
            batch_size=2,
            adapt_steps=20,
        )


# --------------------------------------------------------------------------------------
# Building blocks (§3.2)
# --------------------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi per-head slopes (H,): the geometric sequence 2^(-8/n), 2^(-16/n), ... for a
    power of two n (4 heads: 1/4, 1/16, 1/64, 1/256); otherwise the slopes of the next
    lower power of two followed by every other slope of twice that power."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def biased_causal_mask(
    n_heads: int, length: int, period: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Additive self-attention bias (H, L, L): bias[h, i, j] = -slope_h * floor((i - j) / p)
    for j <= i, -inf for j > i (future frames are never seen)."""
    pos = torch.arange(length, device=device)
    dist = pos[:, None] - pos[None, :]  # (L, L) i - j
    bias = periodic_alibi_bias(alibi_slopes(n_heads).to(device), dist.clamp_min(0), period)  # (H, L, L)
    return bias.masked_fill((dist < 0)[None], float("-inf"))


def periodic_alibi_bias(slopes: torch.Tensor, distance: torch.Tensor, period: int) -> torch.Tensor:
    """slopes (H,), non-negative frame distances (...) -> bias (H, ...) = -slope_h * floor(distance / p)."""
    steps = torch.div(distance, period, rounding_mode="floor").to(torch.float32)  # (...)
    return -slopes.reshape(-1, *([1] * distance.ndim)) * steps[None]  # (H, ...)


def tokens_per_frame(mode: Alignment) -> int:
    """Audio tokens each motion frame attends to: 1 ("interp") or 2 ("double")."""
    if mode not in ("interp", "double"):
        raise ValueError(f"alignment must be 'interp' or 'double', got {mode!r}")
    return 1 if mode == "interp" else 2


def alignment_mask(
    num_frames: int, num_tokens: int, mode: Alignment, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cross-attention (memory) mask (T, S), True where attention is **blocked**.

    "interp": frame t sees audio token t. "double": frame t sees tokens 2t and 2t + 1.
    """
    per = tokens_per_frame(mode)
    t = torch.arange(num_frames, device=device)[:, None]  # (T, 1)
    s = torch.arange(num_tokens, device=device)[None, :]  # (1, S)
    return (s < per * t) | (s >= per * (t + 1))  # allowed: per * t <= s < per * (t + 1)


def periodic_positional_encoding(length: int, d_model: int, period: int) -> torch.Tensor:
    """(L, d) sinusoidal encoding of the position modulo ``period`` (PE(t) = PE(t + p)):
    pe[t, 2i] = sin(t' w_i), pe[t, 2i + 1] = cos(t' w_i), t' = t mod p, w_i = 10000^(-2i/d)."""
    pos = (torch.arange(length) % period).to(torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))  # (d/2,)
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class PeriodicPositionalEncoding(nn.Module):
    """Adds the PPE to (B, L, d) inputs, then dropout."""

    def __init__(self, d_model: int, period: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.period = period
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = periodic_positional_encoding(x.shape[1], self.d_model, self.period).to(x)  # (L, d)
        return self.dropout(x + pe[None])  # (B, L, d)


class EncodedBatch(NamedTuple):
    """One training batch after the audio encoder (:meth:`FaceFormer.encode_batch`)."""

    features: torch.Tensor  # (B, S_mem, H) audio encoder output before audio_proj
    memory: torch.Tensor  # (B, S_mem, d) decoder memory = audio_proj(features)
    offsets: torch.Tensor  # (B, T, 3V) ground-truth vertex offsets from the template
    valid: torch.Tensor  # (B, T) bool, frames that count in the losses
    style: torch.Tensor  # (B, d) style embeddings of the batch's subjects


def condition_filename(sequence: str, subject: str) -> str:
    """Prediction file of one (sequence, training-subject condition) pair (metrics.md §6.1)."""
    return f"{sequence}_condition_{subject}.npy"


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class FaceFormer(MotionMethod):
    """FaceFormer on vertex motion. ``facts`` gives fps, vertex count V and the training
    subjects (the one-hot order)."""

    name: ClassVar[str] = "faceformer"
    config_class: ClassVar[type[FaceFormerConfig]] = FaceFormerConfig
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = ("main",)
    conditioning: ClassVar[Literal["reference", "onehot"]] = "onehot"  # style = a training subject's one-hot
    config: FaceFormerConfig

    def __init__(self, config: FaceFormerConfig, facts: DataFacts) -> None:
        super().__init__(config, facts)
        if not isinstance(config, FaceFormerConfig):
            raise TypeError(f"config must be FaceFormerConfig, got {type(config).__name__}")
        if facts.num_vertices < 1:
            raise ValueError("FaceFormer predicts vertices: DataFacts.num_vertices must be >= 1")
        if facts.num_train_subjects < 1:
            raise ValueError("FaceFormer needs at least one training subject for its style one-hot")
        if config.default_subject >= facts.num_train_subjects:
            raise ValueError(
                f"default_subject={config.default_subject} but there are {facts.num_train_subjects} training subjects"
            )
        d, dim = config.d_model, 3 * facts.num_vertices
        self.num_subjects = facts.num_train_subjects
        self.output_dim = dim  # 3V

        self.audio_encoder = build_audio_encoder(config.audio_encoder)
        if config.alignment == "double" and abs(self.audio_encoder.output_rate - 2.0 * facts.fps) > 1e-6:
            raise ValueError(
                f'alignment="double" pairs two {self.audio_encoder.output_rate:g} Hz audio tokens with each motion '
                f'frame, so it needs {self.audio_encoder.output_rate / 2:g} fps motion, got {facts.fps:g} fps; '
                'use alignment="interp"'
            )
        self.audio_proj = nn.Linear(self.audio_encoder.hidden_size, d)
        self.style_embedding = nn.Linear(self.num_subjects, d, bias=False)
        self.motion_encoder = nn.Linear(dim, d)
        self.ppe = PeriodicPositionalEncoding(d, config.period, config.dropout)
        layer = nn.TransformerDecoderLayer(
            d_model=d,
            nhead=config.n_heads,
            dim_feedforward=config.ff_mult * d,
            dropout=config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=config.n_layers)
        self.motion_decoder = nn.Linear(d, dim)
        nn.init.zeros_(self.motion_decoder.weight)  # Q5: the untrained model outputs the template
        nn.init.zeros_(self.motion_decoder.bias)

    # ------------------------------------------------------------------ frame counts
    def frames_for_audio(self, num_samples: int) -> int:
        """Frames ``generate`` returns for ``num_samples`` samples (§3.1 inference rules):
        "interp": int(CNN frames / 50 * fps); "double": floor(CNN frames / 2)."""
        n_cnn = int(self.audio_encoder.frames_for_samples(int(num_samples)))
        if self.config.alignment == "double":
            return n_cnn // 2
        return frames_from_audio(
            int(num_samples), self.facts.fps, basis="encoder", encoder_rate=self.audio_encoder.output_rate
        )

    # ------------------------------------------------------------------ audio
    def encode_audio(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor | None = None,
        motion_frames: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio (B, S) raw 16 kHz, valid samples (B,) -> decoder memory (B, S_mem, d) and
        motion frames (B,) per §3.1: :meth:`audio_features` through ``audio_proj``."""
        feats, frames = self.audio_features(audio, audio_lengths, motion_frames)  # (B, S_mem, H), (B,)
        return self.audio_proj(feats), frames  # (B, S_mem, d), (B,)

    def audio_features(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor | None = None,
        motion_frames: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio (B, S) raw 16 kHz, valid samples (B,) -> the audio encoder's output
        (B, S_mem, H) before ``audio_proj``, and motion frames (B,).

        Training (``motion_frames`` = the motion lengths T_b): "interp" interpolates the CNN
        features to T_b; "double" keeps min(T_b, CNN frames // 2) frames and 2 tokens each.
        Inference (None): T_b from the audio length (:meth:`frames_for_audio`).
        S_mem = T_max for "interp", 2 * T_max for "double".
        """
        enc = self.audio_encoder
        b, s = audio.shape
        lens = (
            torch.full((b,), s, dtype=torch.long, device=audio.device)
            if audio_lengths is None
            else audio_lengths.to(device=audio.device, dtype=torch.long)
        )  # (B,)
        if self.config.alignment == "interp":
            if motion_frames is None:
                frames = torch.tensor([self.frames_for_audio(int(n)) for n in lens.tolist()], device=audio.device)
            else:
                frames = motion_frames.to(device=audio.device, dtype=torch.long)
        else:
            cap = enc.frames_for_samples(lens) // 2  # (B,) pairs of CNN frames (an odd last frame dropped)
            assert isinstance(cap, torch.Tensor)
            frames = cap if motion_frames is None else torch.minimum(cap, motion_frames.to(cap))
        self._check_frames(frames)
        x, keep_arg = (audio[:, : int(lens[0])], None) if b == 1 else (audio[:, : int(lens.max())], lens)
        if self.config.alignment == "interp":
            feats = enc(x, keep_arg, num_frames=frames).features  # (B, T, H)
        else:
            # The whole waveform through the CNN; its frames trimmed to 2 T_b (§3.1).
            feats = enc(x, keep_arg, max_frames=2 * frames).features  # (B, 2T, H)
        return feats, frames  # (B, S_mem, H), (B,)

    @staticmethod
    def _check_frames(frames: torch.Tensor) -> None:
        if bool((frames < 1).any()):
            raise ValueError("audio too short: it gives no motion frame (FaceFormer needs at least one)")

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        memory: torch.Tensor,
        style: torch.Tensor,
        num_frames: int,
        targets: torch.Tensor | None = None,
        *,
        incremental: bool = True,
    ) -> torch.Tensor:
        """Predict vertex offsets (B, T, 3V).

        memory: (B, S_mem, d) audio tokens; style: (B, d) style embeddings s.
        targets None: autoregressive (§3.2), inputs [s, E(y_1) + s, ..., E(y_{T-1}) + s]
        with the model's own predictions y. targets (B, T, 3V) ground-truth offsets:
        teacher forcing, inputs [s, E(m_1) + s, ..., E(m_{T-1}) + s] (first token E(0) + s
        with ``reference_tf_start_quirk``).

        Autoregressive decoding outside training steps one frame at a time with cached
        keys and values (:class:`IncrementalDecoder`, cost linear in T); ``incremental=False``
        (or a module in training mode, where dropout makes each step's prefix differ) re-runs
        the decoder over the whole prefix for every frame as the reference code does (cost
        quadratic in T) and is the reference the incremental path is tested against.
        """
        b, t = memory.shape[0], int(num_frames)
        h = self.config.n_heads
        self_bias = biased_causal_mask(h, t, self.config.period, memory.device).to(memory.dtype)  # (H, T, T)
        self_bias = self_bias.repeat(b, 1, 1)  # (B*H, T, T), index b*H + h as MHA expects
        cross_mask = alignment_mask(t, memory.shape[1], self.config.alignment, memory.device)  # (T, S_mem)
        s = style[:, None, :]  # (B, 1, d)
        if targets is not None:
            first = s  # (B, 1, d)
            if self.config.reference_tf_start_quirk:  # Q2: the reference's E(0) + s
                first = self.motion_encoder(targets.new_zeros(b, 1, self.output_dim)) + s
            rest = self.motion_encoder(targets[:, : t - 1]) + s  # (B, T-1, d)
            tokens = torch.cat([first, rest], dim=1)  # (B, T, d)
            hidden = self.decoder(self.ppe(tokens), memory, tgt_mask=self_bias, memory_mask=cross_mask)  # (B, T, d)
            return self.motion_decoder(hidden)  # (B, T, 3V)
        if incremental and not self.training:
            return IncrementalDecoder(self, memory, style, t).run(t)  # (B, T, 3V)
        tokens = s  # (B, 1, d)
        hidden = memory.new_zeros(b, 0, self.config.d_model)
        for k in range(t):
            n = k + 1
            hidden = self.decoder(
                self.ppe(tokens), memory, tgt_mask=self_bias[:, :n, :n], memory_mask=cross_mask[:n]
            )  # (B, n, d)
            if n < t:  # Q8: map only the newest frame inside the loop
                newest = self.motion_decoder(hidden[:, -1:])  # (B, 1, 3V)
                tokens = torch.cat([tokens, self.motion_encoder(newest) + s], dim=1)  # (B, n + 1, d)
        return self.motion_decoder(hidden)  # (B, T, 3V)

    # ------------------------------------------------------------------ style
    def style_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,) training-subject indices -> style embeddings (B, d) = W_s onehot."""
        onehot = F.one_hot(indices.to(torch.long), self.num_subjects).to(self.style_embedding.weight.dtype)
        return self.style_embedding(onehot)  # (B, d)

    def _style_state(self, index: int, selection: str, **extra: Any) -> StyleState:
        return make_style_state(
            self.name,
            self.style_version,
            kind="onehot",
            index=int(index),
            subject_name=self.facts.train_subjects[index],
            num_subjects=self.num_subjects,
            selection=selection,
            **extra,
        )

    def resolve_style(self, style: StyleState | int | str | None) -> torch.Tensor:
        """Style embedding (d,) from None (``default_subject``), a training-subject index or
        name, or a FaceFormer StyleState (kind "onehot" or "vector")."""
        if style is None:
            style = self.config.default_subject
        if isinstance(style, dict):
            state = self.check_style(style)
            kind = state.get("kind")
            if state.get("num_subjects") != self.num_subjects:
                raise StyleStateError(
                    f"StyleState was made for {state.get('num_subjects')} training subjects, "
                    f"this model has {self.num_subjects}"
                )
            if kind == "onehot":
                index = state.get("index")
                if not isinstance(index, int) or not 0 <= index < self.num_subjects:
                    raise StyleStateError(f"StyleState index {index!r} outside [0, {self.num_subjects})")
                name = state.get("subject_name")
                if name is not None and name != self.facts.train_subjects[index]:
                    raise StyleStateError(
                        f"StyleState names subject {name!r} at index {index}, this model has "
                        f"{self.facts.train_subjects[index]!r} there"
                    )
                return self.style_vectors(torch.tensor([index], device=self.device))[0]
            if kind == "vector":
                vec = state.get("vector")
                if not isinstance(vec, torch.Tensor) or tuple(vec.shape) != (self.config.d_model,):
                    raise StyleStateError(f"StyleState 'vector' must be a ({self.config.d_model},) tensor")
                return vec.to(device=self.device, dtype=self.style_embedding.weight.dtype)
            raise StyleStateError(f"unknown FaceFormer StyleState kind {kind!r}; expected 'onehot' or 'vector'")
        if isinstance(style, (int, np.integer, str)) and not isinstance(style, bool):
            index = self.facts.subject_index(style)
            return self.style_vectors(torch.tensor([index], device=self.device))[0]
        raise TypeError(
            f"style must be None, a subject index or name, or a StyleState dict; got {type(style).__name__}"
        )

    # ------------------------------------------------------------------ training
    def encode_batch(self, batch: Batch) -> EncodedBatch:
        """A training batch (specs/README.md schema): ``audio`` (B, S), ``audio_lengths`` (B,),
        ``vertices`` (B, T, V, 3), ``template`` (B, V, 3), ``subject`` (B,) training indices,
        ``motion_mask`` (B, T) -> the audio encoded once, the target offsets, the valid
        frames and the style embeddings (:class:`EncodedBatch`)."""
        for key in ("audio", "vertices", "template", "subject"):
            if key not in batch:
                raise KeyError(f"{self.name} batch needs {key!r}")
        dev = self.device
        audio = batch["audio"].to(dev)  # (B, S)
        verts = batch["vertices"].to(dev, torch.float32)  # (B, T, V, 3)
        b, t_max = verts.shape[:2]
        template = batch["template"].to(dev, torch.float32)  # (B, V, 3)
        subject = torch.as_tensor(batch["subject"], device=dev).to(torch.long)  # (B,)
        if bool(((subject < 0) | (subject >= self.num_subjects)).any()):
            raise ValueError(
                f"{self.name} trains on training subjects only (indices 0..{self.num_subjects - 1}), got "
                f"{subject.tolist()}"
            )
        mask = batch.get("motion_mask")
        mask = torch.ones(b, t_max, dtype=torch.bool, device=dev) if mask is None else mask.to(dev, torch.bool)
        lengths = batch.get("motion_lengths")
        lengths = mask.sum(dim=1) if lengths is None else lengths.to(dev, torch.long)  # (B,)

        feats, frames = self.audio_features(audio, batch.get("audio_lengths"), lengths)  # (B, S_mem, H), (B,)
        t = int(frames.max())
        offsets = (verts[:, :t] - template[:, None]).reshape(b, t, self.output_dim)  # (B, T, 3V)
        valid = mask[:, :t] & (torch.arange(t, device=dev)[None] < frames[:, None])  # (B, T)
        return EncodedBatch(feats, self.audio_proj(feats), offsets, valid, self.style_vectors(subject))

    def predict_offsets(self, enc: EncodedBatch) -> torch.Tensor:
        """The decoder's offsets (B, T, 3V) for an encoded batch: teacher-forced on the
        targets when ``teacher_forcing``, else autoregressive."""
        targets = enc.offsets if self.config.teacher_forcing else None
        return self.decode(enc.memory, enc.style, enc.offsets.shape[1], targets=targets)  # (B, T, 3V)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a batch (see :meth:`encode_batch`). Returns (loss, {"rec", "rec_weighted",
        "loss", "frames"})."""
        enc = self.encode_batch(batch)
        pred = self.predict_offsets(enc)  # (B, T, 3V)
        rec = masked_mse(pred, enc.offsets, enc.valid)  # MSE over valid frames and coordinates
        loss, logs = weighted_loss({"rec": rec}, dataclasses.asdict(self.config.loss_weights))
        logs["frames"] = float(enc.valid.sum())
        return loss, logs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Animate one utterance: audio (S,) or (1, S) raw 16 kHz, template (V, 3).
        Returns {"vertices": (T, V, 3)} (template + predicted offsets) on this model's
        device, T = :meth:`frames_for_audio` (S). Deterministic (eval mode, no sampling)."""
        a = self.as_audio(audio)  # (1, S)
        tmpl = self.as_template(template, style)  # (V, 3); None: the carried one (MotionMethod.template_for)
        vec = self.resolve_style(style)[None]  # (1, d)
        with self.eval_mode():
            memory, frames = self.encode_audio(a)  # (1, S_mem, d)
            offsets = self.decode(memory, vec, int(frames[0]))  # (1, T, 3V)
        return {"vertices": offsets[0].reshape(-1, self.facts.num_vertices, 3) + tmpl}  # (T, V, 3)

    @torch.no_grad()
    def generate_batch(
        self,
        audio: Sequence[torch.Tensor | np.ndarray],
        template: Sequence[torch.Tensor | np.ndarray | None],
        style: Sequence[StyleState | int | str | None],
        **options: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`generate` for several utterances at once: the audio encoded as one padded
        batch (each item's valid samples masked), the decoder stepped for all items up to the
        longest one's frames with each item's style; item b keeps its first T_b frames, which
        see only earlier frames and its own audio tokens (equal to its own ``generate`` up to
        float rounding, tests/test_precision.py)."""
        if options:
            raise TypeError(f"{self.name}.generate_batch: unknown generate option(s) {sorted(options)}")
        if not len(audio) == len(template) == len(style) or not audio:
            raise ValueError(f"generate_batch: {len(audio)} audios, {len(template)} templates, {len(style)} styles")
        clips = [self.as_audio(a)[0] for a in audio]  # B x (S_b,)
        lengths = torch.tensor([c.shape[0] for c in clips], device=self.device)  # (B,)
        padded = nn.utils.rnn.pad_sequence(clips, batch_first=True)  # (B, S_max)
        templates = [self.as_template(t, s) for t, s in zip(template, style, strict=True)]  # B x (V, 3)
        vectors = torch.stack([self.resolve_style(s) for s in style])  # (B, d)
        with self.eval_mode():
            memory, frames = self.encode_audio(padded, lengths)  # (B, S_mem, d), (B,)
            offsets = self.decode(memory, vectors, int(frames.max()))  # (B, T_max, 3V)
        v = self.facts.num_vertices
        return [
            {"vertices": offsets[b, : int(frames[b])].reshape(-1, v, 3) + templates[b]}  # (T_b, V, 3)
            for b in range(len(clips))
        ]

    def make_stream(
        self, template: torch.Tensor | np.ndarray | None, style: StyleState | int | str | None, context: StreamContext
    ) -> MotionStream:
        """One cached decoder for the whole utterance (:class:`CachedDecoderStream`): the audio
        encoder runs on the sliding window, the decoder steps as tokens arrive."""
        return CachedDecoderStream(self, template, style, context)

    @torch.no_grad()
    def generate_conditions(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        subjects: Sequence[int | str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unseen-subject protocol (metrics.md §6.1): decode once per training one-hot.

        ``subjects`` = the conditions (indices or names; None = every training subject,
        pass a seeded subset of 8 where there are more). Returns {subject name:
        vertices (T, V, 3)}, in the order given; the audio is encoded once and the
        conditions are decoded as one batch. Save each with :func:`condition_filename`.
        """
        names = list(self.facts.train_subjects) if subjects is None else [
            self.facts.train_subjects[self.facts.subject_index(s)] for s in subjects
        ]
        if not names:
            raise ValueError("no conditions to decode")
        index = torch.tensor([self.facts.train_subjects.index(n) for n in names], device=self.device)
        a = self.as_audio(audio)
        tmpl = self.as_template(template)
        with self.eval_mode():
            memory, frames = self.encode_audio(a)  # (1, S_mem, d)
            memory = memory.expand(len(names), -1, -1)  # (C, S_mem, d)
            offsets = self.decode(memory, self.style_vectors(index), int(frames[0]))  # (C, T, 3V)
        verts = offsets.reshape(len(names), offsets.shape[1], self.facts.num_vertices, 3) + tmpl  # (C, T, V, 3)
        return {n: verts[i] for i, n in enumerate(names)}

    # ------------------------------------------------------------------ style interface
    @property
    def default_style(self) -> str:
        """The one-hot ``default_subject``'s name (what ``generate(style=None)`` uses)."""
        return self.facts.train_subjects[self.config.default_subject]

    @property
    def reference_seconds(self) -> float:
        """``adapt_seconds``: the reference length :meth:`encode_style` / :meth:`adapt` use."""
        return self.config.adapt_seconds

    def _reference_inputs(self, reference: Reference) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Reference clip -> audio (1, S) cut to the motion, offsets (1, T, 3V), T; at most
        ``adapt_seconds`` of it."""
        audio = reference_field(reference, "audio")
        verts = reference_field(reference, "vertices")
        template = reference_field(reference, "template")
        if audio is None or verts is None or template is None:  # its own template: offsets are its motion
            raise ValueError(
                "a FaceFormer style reference needs 'audio' (S,), 'vertices' (T, V, 3) and 'template' (V, 3)"
            )
        tmpl = self.as_template(template)  # (V, 3)
        v = torch.as_tensor(np.asarray(verts) if not isinstance(verts, torch.Tensor) else verts)
        v = v.to(self.device, torch.float32)
        if v.ndim == 2 and v.shape[1] == self.output_dim:
            v = v.reshape(v.shape[0], -1, 3)
        if v.ndim != 3 or tuple(v.shape[1:]) != (self.facts.num_vertices, 3):
            raise ValueError(f"reference vertices must be (T, {self.facts.num_vertices}, 3), got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("reference vertices hold non-finite values")
        t = min(int(v.shape[0]), int(round(self.config.adapt_seconds * self.facts.fps)))
        a = self.as_audio(audio)[0]  # (S,)
        n = int(round(t * self.facts.samples_per_frame))
        a = a[:n] if a.shape[0] >= n else F.pad(a, (0, n - a.shape[0]))  # audio matched to the motion
        offsets = (v[:t] - tmpl).reshape(1, t, self.output_dim)  # (1, T, 3V)
        return a[None], offsets, t

    @torch.no_grad()
    def _select(self, reference: Reference) -> tuple[StyleState, torch.Tensor, torch.Tensor]:
        """Decode the reference once per training one-hot (autoregressively, as one batch)
        and pick the lowest vertex MSE. Returns (state, memory (1, S_mem, d), offsets)."""
        audio, offsets, t = self._reference_inputs(reference)
        with self.eval_mode():
            memory, frames = self.encode_audio(audio, None, torch.tensor([t], device=self.device))
            t = int(frames[0])
            offsets = offsets[:, :t]  # (1, T, 3V)
            all_subjects = torch.arange(self.num_subjects, device=self.device)
            pred = self.decode(memory.expand(self.num_subjects, -1, -1), self.style_vectors(all_subjects), t)
        scores = ((pred - offsets) ** 2).mean(dim=(1, 2))  # (C,) vertex MSE per condition
        best = int(torch.argmin(scores))
        state = self._style_state(best, "reconstruction", scores=scores.float(), frames=t)
        return state, memory, offsets

    def encode_style(self, reference: Reference | None = None, *, subject: int | str | None = None) -> StyleState:
        """StyleState {method, version, kind "onehot", index, subject_name, num_subjects,
        selection[, scores (C,), frames]}.

        ``subject`` given (index or training name): its own one-hot, no decoding (§7).
        Otherwise the training one-hot that best reconstructs ``reference`` (a clip
        record: audio (S,), vertices (T, V, 3), template (V, 3)); ``scores`` holds the
        vertex MSE of every condition (ties go to the lowest index). Parameters are never
        updated.
        """
        if subject is not None:
            return self._style_state(self.facts.subject_index(subject), "given")
        if reference is None:
            raise ValueError("encode_style needs a reference clip or a training subject")
        return self._select(reference)[0]

    def _optimize_style(
        self, memory: torch.Tensor, offsets: torch.Tensor, index: int, steps: int, lr: float
    ) -> tuple[torch.Tensor, float]:
        """Adam on a free style vector, initialised at training subject ``index``'s embedding,
        teacher-forced on the reference (memory (1, S_mem, d), offsets (1, T, 3V)) with every
        model parameter fixed. Returns (the vector (1, d) detached, its final vertex MSE)."""
        t = offsets.shape[1]
        vec = self.style_vectors(torch.tensor([index], device=self.device)).detach().clone()  # (1, d)
        vec.requires_grad_(True)
        opt = torch.optim.Adam([vec], lr=lr)
        with self.eval_mode():
            with torch.enable_grad():
                for _ in range(steps):
                    pred = self.decode(memory, vec, t, targets=offsets)  # (1, T, 3V)
                    loss = ((pred - offsets) ** 2).mean()
                    # Gradients w.r.t. the style vector only: no .grad lands on model parameters.
                    (grad,) = torch.autograd.grad(loss, [vec])
                    vec.grad = grad
                    opt.step()
            with torch.no_grad():
                final = float(((self.decode(memory, vec, t, targets=offsets) - offsets) ** 2).mean())
        return vec.detach(), final

    def adapt(
        self,
        reference: Reference,
        *,
        mode: Literal["select", "optimize"] | None = None,
        steps: int | None = None,
        lr: float | None = None,
    ) -> StyleState:
        """Few-shot adaptation on a reference clip; the model is never modified.

        "select" (default ``adapt_mode``): as :meth:`encode_style` (one-hot selection).
        "optimize": after selection, a free style vector initialised at the selected
        embedding is optimised with Adam (``adapt_lr``, ``adapt_steps``, teacher forcing)
        on the reference with every model parameter fixed; returns kind "vector" with
        ``vector`` (d,), plus the selection's ``index``/``scores`` and ``final_loss``.
        """
        mode = mode or self.config.adapt_mode
        if mode not in ("select", "optimize"):
            raise ValueError(f"adapt mode must be 'select' or 'optimize', got {mode!r}")
        state, memory, offsets = self._select(reference)
        if mode == "select":
            return state
        steps = self.config.adapt_steps if steps is None else int(steps)
        lr = self.config.adapt_lr if lr is None else float(lr)
        vec, final = self._optimize_style(memory, offsets, int(state["index"]), steps, lr)
        fields = {k: v for k, v in state.items() if k not in ("method", "version", "kind", "selection")}
        return make_style_state(
            self.name,
            self.style_version,
            kind="vector",
            vector=vec[0],
            selection="optimize",
            steps=steps,
            final_loss=final,
            **fields,
        )


# --------------------------------------------------------------------------------------
# Incremental decoding (issue 15)
# --------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, d) -> (B, H, L, d / H)."""
    b, length, d = x.shape
    return x.view(b, length, n_heads, d // n_heads).transpose(1, 2)


def _attend(
    mha: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One query per batch row against cached heads: q (B, 1, d) already projected, k and v
    (B, H, L, d / H), additive bias broadcastable to (B, H, 1, L) or None -> (B, 1, d) after the
    output projection (as :class:`torch.nn.MultiheadAttention` in eval mode)."""
    out = F.scaled_dot_product_attention(_heads(q, mha.num_heads), k, v, attn_mask=bias)  # (B, H, 1, d/H)
    return mha.out_proj(out.transpose(1, 2).reshape(q.shape[0], 1, -1))  # (B, 1, d)


class IncrementalDecoder:
    """FaceFormer's autoregressive decoder stepped one frame at a time (§3.2) with each
    layer's self-attention keys and values cached, so frame k costs O(k) instead of the full
    prefix's O(k^2). Each step adds the frame's periodic positional encoding, uses row k of
    the periodic ALiBi bias (:func:`biased_causal_mask`), attends to the audio tokens row k
    of the alignment mask (:func:`alignment_mask`) allows, and feeds E(y_k) + s back as the
    next input. Equal to ``FaceFormer.decode(..., incremental=False)`` in eval mode up to
    float rounding (tests/test_incremental_decoding.py).

    Audio tokens may arrive in pieces (:meth:`append_memory`, for streaming): frame k needs
    token k ("interp") or tokens 2k and 2k + 1 ("double"); :attr:`ready` says whether the
    next frame's tokens are there. Use under ``torch.no_grad()`` on a model in eval mode.
    """

    def __init__(self, model: FaceFormer, memory: torch.Tensor, style: torch.Tensor, max_frames: int | None = None):
        """model in eval mode; memory (B, S, d) audio tokens so far (S may be 0); style (B, d)."""
        if model.training:
            raise RuntimeError("IncrementalDecoder needs the model in eval mode (dropout would differ per step)")
        self.model = model
        cfg = model.config
        self.n_heads, self.period, self.alignment = cfg.n_heads, cfg.period, cfg.alignment
        self.per = tokens_per_frame(cfg.alignment)  # audio tokens per frame
        self.layers: list[nn.TransformerDecoderLayer] = list(model.decoder.layers)  # type: ignore[arg-type]
        for layer in self.layers:
            for mha in (layer.self_attn, layer.multihead_attn):
                if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
                    raise ValueError("IncrementalDecoder supports packed in-projections without bias_k/zero attention")
        self.style = style[:, None, :]  # (B, 1, d)
        self.slopes = alibi_slopes(cfg.n_heads).to(memory.device)  # (H,)
        self.pe = periodic_positional_encoding(cfg.period, cfg.d_model, cfg.period).to(memory)  # (p, d): one period
        dec, enc = model.motion_decoder, model.motion_encoder  # y = W_d x + b_d, E(y) = W_e y + b_e
        w_e = enc.weight.double()  # (d, 3V)
        self._feedback_w = (w_e @ dec.weight.double()).to(memory.dtype)  # (d, d)
        self._feedback_b = (w_e @ dec.bias.double() + enc.bias.double()).to(memory.dtype)  # (d,)
        self.max_frames = max_frames
        self._bias_rev = memory.new_zeros(1, cfg.n_heads, 1, 0)
        self._grow_bias(max_frames or 256)
        self.frame = 0  # frames decoded so far
        self.next_input = self.style  # (B, 1, d): s, then E(y_k) + s
        b, d = memory.shape[0], cfg.d_model
        empty = memory.new_zeros(b, cfg.n_heads, 0, d // cfg.n_heads)  # (B, H, 0, d/H)
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor]] = [(empty, empty) for _ in self.layers]
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = [(empty, empty) for _ in self.layers]  # "double"
        self.cross_out: list[torch.Tensor] = [memory.new_zeros(b, 0, d) for _ in self.layers]  # "interp"
        self.num_tokens = 0
        self.append_memory(memory)

    def _grow_bias(self, length: int) -> None:
        """Precompute ``length`` bias columns in reverse order: column i holds the bias at
        distance length - 1 - i, -slope_h * floor(distance / p), so row k of the causal bias
        is the last k + 1 columns (a view, no work per step)."""
        dist = torch.arange(length - 1, -1, -1, device=self.slopes.device)  # (M,) M-1 .. 0
        bias = periodic_alibi_bias(self.slopes, dist, self.period)  # (H, M)
        self._bias_rev = bias.to(self._bias_rev.dtype)[None, :, None, :]  # (1, H, 1, M)

    def append_memory(self, memory: torch.Tensor) -> None:
        """Add audio tokens (B, S_new, d): each layer's cross-attention keys and values are
        projected once here, never again per frame."""
        d = memory.shape[-1]
        for i, layer in enumerate(self.layers):
            mha = layer.multihead_attn
            w, bias = mha.in_proj_weight, mha.in_proj_bias
            v = F.linear(memory, w[2 * d :], None if bias is None else bias[2 * d :])  # (B, S_new, d)
            if self.alignment == "interp":
                # One allowed token per frame: its softmax weight is exactly 1, so the attention
                # output is that token's projected value, computed here once for every frame.
                self.cross_out[i] = torch.cat([self.cross_out[i], mha.out_proj(v)], dim=1)  # (B, S, d)
                continue
            k = _heads(F.linear(memory, w[d : 2 * d], None if bias is None else bias[d : 2 * d]), self.n_heads)
            old_k, old_v = self.cross_kv[i]
            self.cross_kv[i] = (torch.cat([old_k, k], dim=2), torch.cat([old_v, _heads(v, self.n_heads)], dim=2))
        self.num_tokens += memory.shape[1]

    @property
    def tokens_needed(self) -> int:
        """Audio tokens the next frame needs in total (its own included)."""
        return self.per * (self.frame + 1)

    @property
    def ready(self) -> bool:
        """Whether the next frame can be decoded (its audio tokens are there, frames left)."""
        more = self.max_frames is None or self.frame < self.max_frames
        return more and self.num_tokens >= self.tokens_needed

    def step_hidden(self) -> torch.Tensor:
        """Decode the next frame up to the decoder's output (B, 1, d), before the output layer."""
        if self.max_frames is not None and self.frame >= self.max_frames:
            raise RuntimeError(f"all {self.max_frames} frames are decoded")
        k = self.frame
        if k >= self._bias_rev.shape[-1]:
            self._grow_bias(max(2 * self._bias_rev.shape[-1], k + 1))
        self_bias = self._bias_rev[:, :, :, -(k + 1) :]  # (1, H, 1, k+1): row k of biased_causal_mask
        # The alignment mask's row k allows token k ("interp") or tokens 2k, 2k + 1 ("double")
        # and blocks the rest, whose softmax weights are exactly 0: attend to the allowed ones only.
        allowed = (min(self.per * k, self.num_tokens), min(self.per * (k + 1), self.num_tokens))
        x = self.next_input + self.pe[k % self.period]  # (B, 1, d)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, self_bias, allowed)
        if self.model.decoder.norm is not None:
            x = self.model.decoder.norm(x)
        # E(y_k) + s with y_k = W_d x + b_d folded into one (d, d) map: the (3V)-wide output
        # layer is then needed for the returned frames only (decode maps them all at once).
        self.next_input = F.linear(x, self._feedback_w, self._feedback_b) + self.style  # (B, 1, d)
        self.frame += 1
        return x

    def step(self) -> torch.Tensor:
        """Decode the next frame: vertex offsets (B, 1, 3V)."""
        return self.model.motion_decoder(self.step_hidden())  # (B, 1, 3V)

    def run(self, frames: int) -> torch.Tensor:
        """Decode the next ``frames`` frames: vertex offsets (B, frames, 3V), the output layer
        applied once to all of them."""
        hidden = torch.cat([self.step_hidden() for _ in range(frames)], dim=1)  # (B, frames, d)
        return self.model.motion_decoder(hidden)  # (B, frames, 3V)

    def _layer(
        self, i: int, layer: nn.TransformerDecoderLayer, x: torch.Tensor, self_bias: torch.Tensor,
        allowed: tuple[int, int],
    ) -> torch.Tensor:
        """One decoder layer for the newest position x (B, 1, d), post- or pre-norm as the layer is."""

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            mha = layer.self_attn
            q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, 1, d)
            old_k, old_v = self.self_kv[i]
            keys = torch.cat([old_k, _heads(k, self.n_heads)], dim=2)  # (B, H, k+1, d/H)
            values = torch.cat([old_v, _heads(v, self.n_heads)], dim=2)
            self.self_kv[i] = (keys, values)
            return _attend(mha, q, keys, values, self_bias)

        def cross_attention(h: torch.Tensor) -> torch.Tensor:
            if self.alignment == "interp":
                return self.cross_out[i][:, allowed[0] : allowed[1]]  # (B, 1, d), see append_memory
            mha, d = layer.multihead_attn, h.shape[-1]
            bias = mha.in_proj_bias
            q = F.linear(h, mha.in_proj_weight[:d], None if bias is None else bias[:d])  # (B, 1, d)
            keys, values = (kv[:, :, allowed[0] : allowed[1]] for kv in self.cross_kv[i])  # (B, H, 1 or 2, d/H)
            return _attend(mha, q, keys, values, None)

        def feed_forward(h: torch.Tensor) -> torch.Tensor:
            hidden = layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias))  # eval: no dropout
            return F.linear(hidden, layer.linear2.weight, layer.linear2.bias)

        if layer.norm_first:
            x = x + self_attention(layer.norm1(x))
            x = x + cross_attention(layer.norm2(x))
            return x + feed_forward(layer.norm3(x))
        x = layer.norm1(x + self_attention(x))
        x = layer.norm2(x + cross_attention(x))
        return layer.norm3(x + feed_forward(x))


class CachedDecoderStream(MotionStream):
    """FaceFormer's stream (and DualTalker's, which inherits the generator): the
    bidirectional audio encoder runs on the sliding window of :class:`StreamContext`, and the
    frames' audio tokens are appended to one :class:`IncrementalDecoder` kept for the whole
    utterance, which decodes each frame as soon as its tokens are there, with its cached
    keys and values (so the autoregression is the offline one; only the audio tokens see
    less context). Look-ahead: ``right_s`` of audio after a frame."""

    def __init__(
        self, model: FaceFormer, template: Any, style: StyleState | int | str | None, context: StreamContext
    ) -> None:
        super().__init__(model, context)
        self.model = model
        self.template = model.as_template(template, style)  # (V, 3)
        vec = model.resolve_style(style)[None]  # (1, d)
        self.per = tokens_per_frame(model.config.alignment)
        with torch.no_grad(), model.eval_mode():
            self.decoder = IncrementalDecoder(model, vec.new_zeros(1, 0, model.config.d_model), vec)
        self.token_frames = 0  # frames whose audio tokens the decoder holds
        self._last: torch.Tensor | None = None  # (1, per, d) the newest frame's tokens

    def _next_needed(self) -> int:
        return self.token_frames

    def _frames(self, ready: int, final: bool) -> dict[str, torch.Tensor]:
        if ready > self.token_frames:
            first, sample = self._window_start(self.token_frames)
            audio = self._window(sample)  # (S_w,)
            if self.model.frames_for_audio(int(audio.shape[0])) >= 1:
                memory, frames = self.model.encode_audio(audio[None])  # (1, per * m, d), (1,)
                take = min(ready, first + int(frames[0]))
                if take > self.token_frames:
                    new = memory[:, self.per * (self.token_frames - first) : self.per * (take - first)]
                    self.decoder.append_memory(new)
                    self._last, self.token_frames = new[:, -self.per :], take
            if final and self.token_frames < ready and self._last is not None:  # a window rounded short
                self.decoder.append_memory(self._last.repeat(1, ready - self.token_frames, 1))
                self.token_frames = ready
        hidden = []
        while self.decoder.ready:
            hidden.append(self.decoder.step_hidden())  # (1, 1, d)
        if not hidden:
            return {}
        offsets = self.model.motion_decoder(torch.cat(hidden, dim=1))[0]  # (n, 3V)
        return {"vertices": offsets.reshape(-1, self.model.facts.num_vertices, 3) + self.template}  # (n, V, 3)
