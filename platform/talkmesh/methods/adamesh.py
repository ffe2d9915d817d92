"""AdaMesh: Personalized Facial Expressions and Head Poses for Adaptive Speech-Driven 3D
Facial Animation.

Paper: Liyang Chen, Weihong Bao, Shun Lei, Boshi Tang, Zhiyong Wu, Shiyin Kang, Haozhi Huang,
Helen Meng, arXiv:2310.07236 (IEEE TMM 27:3598-3609, 2025).
Reference code: thuhcsi/AdaMesh@07f65ac (the speech-to-expression backbone only); the pose
VQ-VAE follows Doubiiu/CodeTalker@1b7cb95 stage 1.
Specification: specs/adamesh.md (section and decision numbers below refer to it).

Model. FLAME-56 motion at 25 fps: expression 50 | jaw 3 (``params``) and head rotation 3
(``head_pose``).

* Expression adapter (§3): a frozen HuBERT (50 Hz) -> Conv2dSubsampling2 (-> 25 Hz) ->
  Conformer audio encoder; a Conformer style encoder over a reference expression sequence
  (masked temporal mean -> style vector); a Conformer identity encoder over the FLAME shape
  (-> identity vector); both vectors are added to the audio features before the Conformer
  expression decoder, whose linear output (y_mid) goes through a Tacotron-style postnet
  with a residual (y). Loss: masked L1 on z-normalised targets for y_mid and y (§5).
* MoLoRA (§4): 4 LoRA experts of ranks (1, 2, 4, 8) with a static softmax gate on every
  convolution of every Conformer convolution module (pw1, dw, pw2) of the four modules.
  B = 0 at initialisation, frozen during pre-training (an exact no-op), and the only part
  optimised by :meth:`AdaMesh.adapt` (on copies, applied functionally; §6).
* Pose adapter (§7): a VQ-VAE over z-normalised head rotation (downsampling 4), PoseGPT (a
  causal transformer over code indices, HuBERT ⊕ log-mel audio at the code rate, one
  learned style embedding per training identity added through a per-layer projection
  before every block), and a semantic pose-style matrix per training identity: k-means
  clusters of HuBERT frames, the mean pre-quantisation VQ latent per cluster. A new speaker
  retrieves the nearest training identity (masked mean L2 over shared clusters); nothing
  is fine-tuned.

Stages (README G3): ``expression`` -> ``pose_vq`` -> ``posegpt`` -> ``pose_index``. The last
is fitted, not trained: :meth:`AdaMesh.fit_stage` runs k-means and the per-identity
averages (the training loop calls it because that stage has no trainable parameters).
``fit_stage`` also fits the z-normalisation statistics (buffers) of the expression and pose
targets at the start of the stages that need them.

Deviations (spec DECISIONs unless noted):
  1. D5: a Conv1d weight (m, n/g, k) is adapted as the m x ((n/g)k) matrix (not the
     figure's Conv2d-style factorisation).
  2. Style-encoder input in pre-training (§5): another window of the same speaker in the
     batch when there is one (a different clip), else the item's own window (the spec's
     "non-overlapping segment of the same clip" needs data-side support the shared
     loader does not have; the temporal mean carries only window-level statistics).
  3. The identity encoder sees the shape beta repeated over the reference frames (zeros when
     the corpus has no shape); for a training identity or no style, over
     ``reference_seconds`` frames.
  4. Relative positions in the Conformer keep Transformer-XL's relative shift (WeNet's
     encoder drops it, which scores absolute positions; see talkmesh.nn.conformer).
  5. Frame alignment for any fps: at 25 fps (HuBERT rate = 2 x fps) the features are
     trimmed / edge-padded to 2T (inference: T = floor(frames / 2), §8); otherwise they are
     linearly interpolated to 2T (T from the audio length as FaceFormer's "interp").
     Q7's length filter is not needed: the loader cuts audio to the motion, so 2T and the
     HuBERT frame count differ by at most one frame.
  6. Learning-rate schedules: the shared loop has no scheduler; StepLR is applied through
     the loop's ``lr_multiplier`` hook (lr x gamma^(epoch // step)), per stage. Weight
     decay is ``train.weight_decay`` (0.01 in the presets, Q1).
  7. Windows: every stage trains on ``data.window_seconds`` windows (the spec's 128- and
     256-frame pose windows exceed most MEAD clips); each pose batch is cropped to its
     shortest item (at most ``pose_window`` frames), rounded down to a multiple of
     ``pose_downsample`` frames.
  8. Vertices (§8.4) are produced when a face model is available (injected with
     :meth:`AdaMesh.set_face_model`, or the file in ``face_model``), **without** the head
     rotation by default, so LVE/FDD follow datasets.md §6.2 (``vertices_head_pose=True``
     applies it). A (V, 3) template instead of a shape beta gets the expression/jaw
     displacements of the zero-shape face model added to it. The face model is never stored
     in checkpoints (licence; talkmesh.face.flame).
  9. The frozen HuBERT is not part of the state dict (checkpoints would carry 1.2 GB of
     frozen weights); it is rebuilt from ``audio_encoder`` (local weights / tiny seed).
     Features of whole training clips are cached on disk in the pose-index stage (D17);
     training windows are encoded on the fly.
 10. StyleState (§9) is flat (README G5 allows no nesting): MoLoRA tensors are stored as
     ``molora/<parameter name>``; distances of identities that share fewer than
     ``min_shared_clusters`` clusters with the reference are stored as -1 (not inf).
 11. Without a reference, ``generate(style=k)`` uses training identity k's mean style
     vector and mean shape (fitted in the pose-index stage) and its pose embedding;
     ``style=None`` the mean over identities and ``default_pose_identity``.
 12. Pose context: pose batches are cropped to ``pose_window`` frames; at inference the
     VQ-VAE encodes/decodes consecutive chunks of ``pose_window`` frames and PoseGPT samples
     with a sliding context of ``pose_window / pose_downsample`` codes (positions 0..C-1, BOS
     first), so no position beyond the trained windows is ever used.
 13. ``expression_audio`` / ``pose_cluster_audio = "hubert+mel"`` (project options, used by
     the debug preset): the expression adapter and the pose-style clusters also get the
     log-mel frames PoseGPT uses. A frozen, randomly
     initialised tiny HuBERT carries almost no information about lip motion (ridge-probe
     R² 0.07 for the jaw opening on the synthetic corpus vs 0.55 for a 16-bin log-mel), so
     tests could not otherwise learn on CPU. The paper presets keep HuBERT alone.
 14. D8: the VQ-VAE conv stages have no normalisation by default (``pose_vq_norm="none"``;
     CodeTalker's InstanceNorm is ``"instance"``). InstanceNorm over time removes every
     window's per-channel mean and scale - for a 3-d rotation signal, the head-motion
     amplitude and offset that make up a speaker's pose style - so the decoder cannot
     reconstruct them and the pose-style matrices cannot tell speakers apart (synthetic
     corpus, debug preset: with InstanceNorm 0 of 8 training speakers retrieved themselves
     from held-out clips and the reconstruction L1 stalled at ~80 % of the untrained value;
     without it 6 of 8, test_pose_retrieval_picks_speakers_with_closer_head_motion_style).
 15. The debug preset adapts like the paper setting (AdamW 1e-3, 4 x 4 s crops) for 150
     steps instead of the §12 debug column's 30 steps at 1e-2 on 2 x 1 s crops: on the
     synthetic corpus the larger learning rates (1e-2, 5e-3) fit the unseen speakers' static
     expression offsets but flatten their lip motion, raising held-out LVE, while 1e-3 for
     150-300 steps lowered it for 3 of the 4 unseen speakers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.align import frames_from_audio, interpolate_features
from talkmesh.audio.encoders import AudioEncoderConfig, build_audio_encoder, normalize_waveform
from talkmesh.methods.base import (
    Batch,
    DataFacts,
    MotionMethod,
    Reference,
    StyleState,
    StyleStateError,
    make_style_state,
    reference_field,
    weighted_loss,
)
from talkmesh.nn.conformer import ConformerEncoder, Conv2dSubsampling2
from talkmesh.nn.kmeans import assign, kmeans
from talkmesh.nn.lora import MoLoRA, adapter_parameters, adapter_values, apply_adapters
from talkmesh.nn.vq import VectorQuantizer, VQOutput

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.face.flame import FlameLayer

__all__ = [
    "AdaMesh",
    "AdaMeshConfig",
    "AdaMeshLossWeights",
    "ExpressionAdapter",
    "PoseGPT",
    "PoseVQLossWeights",
    "PoseVQVAE",
    "log_mel",
    "mel_filterbank",
    "pose_style_distances",
]

EXPR_DIM = 53  # FLAME-56 columns 0:53: expression 50 | jaw 3
POSE_DIM = 3  # FLAME-56 columns 53:56: head rotation (axis-angle)
N_EXPRESSION = 50


# --------------------------------------------------------------------------------------
# Config (§12)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdaMeshLossWeights:
    """Expression pre-training / adaptation loss (§5): L1 on y_mid and on the postnet output."""

    l1_mid: float = 1.0
    l1_post: float = 1.0


@dataclasses.dataclass(frozen=True)
class PoseVQLossWeights:
    """Pose VQ-VAE loss (§7.2, D8): L1 reconstruction + quant weight x (codebook + beta commitment)."""

    rec: float = 1.0
    vq: float = 1.0


def _hubert() -> AudioEncoderConfig:
    return AudioEncoderConfig(kind="hubert", trainable_layers=0, freeze_feature_encoder=True, spec_augment=False)


@dataclasses.dataclass(frozen=True)
class AdaMeshConfig:
    """AdaMesh hyper-parameters; class defaults are the paper/decision values (§12).
    Presets: :meth:`mead` (the defaults), :meth:`codetalker_vq` and :meth:`debug`.
    Weight decay is ``train.weight_decay`` (0.01 in the presets)."""

    # ---- audio (§2, D17) ----
    audio_encoder: AudioEncoderConfig = dataclasses.field(default_factory=_hubert)  # frozen
    audio_alignment: Literal["auto", "trim", "interp"] = "auto"  # deviation 5
    # Expression-adapter input: HuBERT (paper) or HuBERT ⊕ log-mel (PoseGPT's input; the debug
    # preset's choice, deviation 13).
    expression_audio: Literal["hubert", "hubert+mel"] = "hubert"
    # ---- expression adapter (§3) ----
    d_model: int = 256
    heads: int = 4
    ffn: int = 2048
    conv_kernel: int = 15
    audio_blocks: int = 3
    decoder_blocks: int = 3
    style_blocks: int = 2
    identity_blocks: int = 1
    dropout: float = 0.1
    attention_dropout: float = 0.0
    postnet_channels: int = 128
    postnet_kernel: int = 5
    postnet_dropout: float = 0.5
    shape_dim: int = 100
    style_seconds: float = 10.0  # longest style-encoder input
    norm_min_std: float = 1e-3  # floor of the z-normalisation std (constant columns)
    loss_weights: AdaMeshLossWeights = dataclasses.field(default_factory=AdaMeshLossWeights)
    # ---- MoLoRA (§4) ----
    molora_ranks: tuple[int, ...] = (1, 2, 4, 8)
    molora_alpha: float | None = None  # None: s_i = 1; else s_i = alpha / r_i
    molora_targets: tuple[str, ...] = ("pw1", "dw", "pw2")
    # ---- stage "expression": pre-training (§5, D14) ----
    lr: float = 1e-4
    epochs: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    lr_step: int = 5  # StepLR step (epochs); 0 = constant
    lr_gamma: float = 0.5
    # ---- adaptation (§6, D6) ----
    adapt_lr: float = 1e-3
    adapt_weight_decay: float = 0.01
    adapt_steps: int = 300
    adapt_batch: int = 4
    adapt_crop_s: float = 4.0
    adapt_max_seconds: float = 600.0  # wall-time bound of one adapt() call
    reference_seconds: float = 10.0  # reference length used by encode_style / adapt / evaluation
    # ---- stage "pose_vq" (§7.2, D8, D18) ----
    pose_vq_hidden: int = 256
    pose_vq_layers: int = 4
    pose_vq_heads: int = 4
    pose_vq_ff: int = 1024
    pose_vq_dropout: float = 0.1
    # Pose context in frames (multiple of pose_downsample): pose training windows are cropped
    # to it, and inference runs the VQ-VAE on chunks of it and PoseGPT with a sliding context
    # of pose_window / pose_downsample codes (deviation 12). 128 = the spec's VQ windows.
    pose_window: int = 128
    # Normalisation in the VQ-VAE conv stages: CodeTalker's InstanceNorm ("instance"),
    # BatchNorm ("batch") or none (deviation 14).
    pose_vq_norm: Literal["instance", "batch", "none"] = "none"
    pose_codebook_size: int = 256
    pose_code_dim: int = 64
    pose_downsample: int = 4  # a power of two: one stride-2 conv per factor 2
    pose_vq_beta: float = 0.25
    pose_vq_mode: Literal["straight_through", "ema"] = "straight_through"
    pose_vq_loss_weights: PoseVQLossWeights = dataclasses.field(default_factory=PoseVQLossWeights)
    pose_vq_lr: float = 1e-4
    pose_vq_epochs: int = 200
    pose_vq_batch_size: int = 32
    pose_vq_lr_step: int = 20
    pose_vq_lr_gamma: float = 0.5
    # ---- stage "posegpt" (§7.3, D10, D11) ----
    posegpt_layers: int = 6
    posegpt_d: int = 512
    posegpt_heads: int = 8
    posegpt_ff: int = 2048
    posegpt_dropout: float = 0.1
    posegpt_max_steps: int = 1024
    mel_bins: int = 80
    posegpt_lr: float = 1e-4
    posegpt_epochs: int = 100
    posegpt_batch_size: int = 16
    pose_sampling: Literal["sample", "greedy"] = "sample"
    pose_temperature: float = 1.0
    pose_top_k: int = 0  # 0 = off
    pose_seed: int = 0  # sampling seed when a StyleState does not carry one
    # ---- stage "pose_index" (§7.4, D12) ----
    pose_kmeans_k: int = 512
    kmeans_max_frames: int = 200000
    kmeans_iters: int = 50
    min_shared_clusters: int = 1
    # Features clustered for the pose-style matrix: HuBERT (paper) or HuBERT ⊕ log-mel (debug, deviation 13).
    pose_cluster_audio: Literal["hubert", "hubert+mel"] = "hubert"
    cache_features: bool = True  # whole-clip HuBERT features on disk (talkmesh.audio.cache)
    # ---- inference ----
    default_pose_identity: int = 0
    vertices_head_pose: bool = False  # deviation 8
    face_model: str = ""  # FLAME file (.pkl/.npz) used for vertices when none is injected

    def __post_init__(self) -> None:
        positive_ints = (
            "d_model",
            "heads",
            "ffn",
            "conv_kernel",
            "audio_blocks",
            "decoder_blocks",
            "style_blocks",
            "identity_blocks",
            "postnet_channels",
            "postnet_kernel",
            "shape_dim",
            "epochs",
            "batch_size",
            "grad_accum",
            "adapt_batch",
            "pose_vq_hidden",
            "pose_vq_layers",
            "pose_vq_heads",
            "pose_vq_ff",
            "pose_codebook_size",
            "pose_code_dim",
            "pose_downsample",
            "pose_vq_epochs",
            "pose_vq_batch_size",
            "posegpt_layers",
            "posegpt_d",
            "posegpt_heads",
            "posegpt_ff",
            "posegpt_max_steps",
            "mel_bins",
            "posegpt_epochs",
            "posegpt_batch_size",
            "pose_kmeans_k",
            "kmeans_max_frames",
            "kmeans_iters",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "adapt_steps",
            "lr_step",
            "pose_vq_lr_step",
            "pose_top_k",
            "min_shared_clusters",
            "default_pose_identity",
            "pose_seed",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "lr",
            "adapt_lr",
            "pose_vq_lr",
            "posegpt_lr",
            "adapt_crop_s",
            "adapt_max_seconds",
            "reference_seconds",
            "style_seconds",
            "norm_min_std",
            "pose_temperature",
            "lr_gamma",
            "pose_vq_lr_gamma",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "postnet_dropout", "pose_vq_dropout", "posegpt_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.heads} heads of even width")
        if self.conv_kernel % 2 == 0 or self.postnet_kernel % 2 == 0:
            raise ValueError("conv_kernel and postnet_kernel must be odd")
        if self.pose_vq_hidden % self.pose_vq_heads or self.posegpt_d % self.posegpt_heads:
            raise ValueError("pose_vq_hidden / posegpt_d must be divisible by their head counts")
        if self.pose_downsample & (self.pose_downsample - 1) or self.pose_downsample < 2:
            raise ValueError(f"pose_downsample must be a power of two >= 2, got {self.pose_downsample}")
        if self.pose_window < self.pose_downsample or self.pose_window % self.pose_downsample:
            raise ValueError(f"pose_window={self.pose_window} must be a positive multiple of pose_downsample")
        if self.pose_window // self.pose_downsample > self.posegpt_max_steps:
            raise ValueError("pose_window / pose_downsample must not exceed posegpt_max_steps")
        if not self.molora_ranks or any(r < 1 for r in self.molora_ranks):
            raise ValueError(f"molora_ranks must be a non-empty tuple of ranks >= 1, got {self.molora_ranks}")
        bad = sorted(set(self.molora_targets) - {"pw1", "dw", "pw2"})
        if bad or not self.molora_targets:
            raise ValueError(f"molora_targets must be a non-empty subset of ('pw1', 'dw', 'pw2'), got {bad or '()'}")
        if self.molora_alpha is not None and not self.molora_alpha > 0:
            raise ValueError(f"molora_alpha must be positive or null, got {self.molora_alpha}")
        if self.audio_encoder.trainable_layers != 0:
            raise ValueError("audio_encoder.trainable_layers must be 0: AdaMesh uses a frozen HuBERT (§2, D17)")

    # ---- per-stage schedules (read by ExperimentConfig.schedule and the loop's lr hook) ----
    def stage_schedule(self, stage: str) -> dict[str, Any]:
        """epochs / batch size / lr of ``stage`` ("" = the first stage)."""
        if stage in ("", "expression"):
            return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        if stage == "pose_vq":
            return {"epochs": self.pose_vq_epochs, "batch_size": self.pose_vq_batch_size, "lr": self.pose_vq_lr}
        if stage == "posegpt":
            return {"epochs": self.posegpt_epochs, "batch_size": self.posegpt_batch_size, "lr": self.posegpt_lr}
        if stage == "pose_index":  # fitted once, no optimiser
            return {"epochs": 1, "batch_size": self.batch_size, "lr": self.lr}
        raise ValueError(f"adamesh: unknown stage {stage!r}; stages: {list(AdaMesh.stages)}")

    # ---- presets ----
    PRESETS: ClassVar[tuple[str, ...]] = ("mead", "codetalker_vq", "debug")

    @classmethod
    def preset(cls, name: str) -> AdaMeshConfig:
        """The preset called ``name`` (one of :attr:`PRESETS`)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown AdaMesh preset {name!r}; presets: {list(cls.PRESETS)}")
        return getattr(cls, name)()

    @classmethod
    def mead(cls) -> AdaMeshConfig:
        """MEAD-FLAME at paper sizes (the class defaults)."""
        return cls()

    @classmethod
    def codetalker_vq(cls) -> AdaMeshConfig:
        """As :meth:`mead` with CodeTalker's stage-1 VQ sizes (H 1024, 6 layers, 8 heads, FF 1536)."""
        return cls(pose_vq_hidden=1024, pose_vq_layers=6, pose_vq_heads=8, pose_vq_ff=1536)

    @classmethod
    def debug(cls) -> AdaMeshConfig:
        """Tiny CPU model for tests (§12 debug column): d 32, one block per module, ranks
        (1, 2), a tiny random HuBERT (+ log-mel into the expression adapter and the pose
        clusters, deviation 13), a 16-code pose prior, a 2-layer PoseGPT, k = 8. Adaptation
        uses the paper's lr and crops with 150 steps (deviation 15)."""
        return cls(
            audio_encoder=dataclasses.replace(_hubert(), tiny=True),
            expression_audio="hubert+mel",
            pose_cluster_audio="hubert+mel",
            d_model=32,
            heads=2,
            ffn=64,
            conv_kernel=5,
            audio_blocks=1,
            decoder_blocks=1,
            style_blocks=1,
            identity_blocks=1,
            dropout=0.0,
            postnet_channels=16,
            lr=1e-3,
            epochs=2,
            batch_size=4,
            lr_step=0,
            molora_ranks=(1, 2),
            adapt_lr=1e-3,
            adapt_steps=150,
            adapt_batch=4,
            adapt_crop_s=4.0,
            adapt_max_seconds=60.0,
            pose_vq_hidden=32,
            pose_vq_layers=1,
            pose_vq_heads=2,
            pose_vq_ff=64,
            pose_vq_dropout=0.0,
            pose_window=48,
            pose_codebook_size=16,
            pose_code_dim=8,
            pose_vq_lr=1e-3,
            pose_vq_epochs=2,
            pose_vq_batch_size=4,
            pose_vq_lr_step=0,
            posegpt_layers=2,
            posegpt_d=32,
            posegpt_heads=2,
            posegpt_ff=64,
            posegpt_dropout=0.0,
            mel_bins=16,
            posegpt_lr=1e-3,
            posegpt_epochs=2,
            posegpt_batch_size=4,
            pose_kmeans_k=8,
            kmeans_max_frames=5000,
        )


# --------------------------------------------------------------------------------------
# Audio helpers: log-mel at the HuBERT frame rate, frame alignment
# --------------------------------------------------------------------------------------


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int = 16000) -> torch.Tensor:
    """Triangular HTK-mel filters (n_mels, n_freqs) from 0 Hz to Nyquist."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).astype(np.float32))


def log_mel(audio: torch.Tensor, lengths: torch.Tensor | None, fbank: torch.Tensor) -> torch.Tensor:
    """Log-mel (B, N, M) of raw 16 kHz audio (B, S): per-utterance normalised (G8), 400-sample
    Hann window, 320-sample hop, no centring, so N = floor((S - 400) / 320) + 1 = the HuBERT
    frame count; frames past an item's length are zero."""
    x = normalize_waveform(audio, lengths)  # (B, S)
    window = torch.hann_window(400, device=x.device, dtype=x.dtype)
    spec = torch.stft(
        x, n_fft=400, hop_length=320, win_length=400, window=window, center=False, return_complex=True
    )  # (B, 201, N)
    mel = torch.log(torch.einsum("mf,bfn->bnm", fbank.to(x), spec.abs() ** 2) + 1e-6)  # (B, N, M)
    if lengths is not None:
        n = (torch.div(lengths.to(x.device) - 400, 320, rounding_mode="floor") + 1).clamp_min(0)  # (B,)
        mel = mel * (torch.arange(mel.shape[1], device=x.device)[None] < n[:, None])[..., None].to(mel.dtype)
    return mel


def _lengths_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t, device=lengths.device)[None] < lengths[:, None]  # (B, T)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Temporal mean of x (B, T, d) over valid frames -> (B, d)."""
    w = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over valid frames and every dimension (B, T, D)."""
    w = mask.to(pred.dtype)[..., None]
    return ((pred - target).abs() * w).sum() / (w.sum() * pred.shape[-1]).clamp_min(1.0)


def _sinusoids(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Absolute sinusoidal positional encoding (L, dim)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


# --------------------------------------------------------------------------------------
# Expression adapter (§3)
# --------------------------------------------------------------------------------------


class Postnet(nn.Module):
    """Tacotron-style 2-conv postnet with a linear layer and a residual (§3.2)."""

    def __init__(self, dim: int, channels: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(dim, channels, kernel, padding=kernel // 2)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, dim, kernel, padding=kernel // 2)
        self.bn2 = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y (B, T, D) -> y + postnet(y) (B, T, D)."""
        h = (y * mask[..., None].to(y.dtype)).transpose(1, 2)  # (B, D, T)
        h = self.dropout(torch.tanh(self.bn1(self.conv1(h))))
        h = self.dropout(self.bn2(self.conv2(h)))
        return y + self.linear(h.transpose(1, 2))


class ExpressionAdapter(nn.Module):
    """Audio encoder + style encoder + identity encoder + expression decoder (+ postnet)."""

    def __init__(self, cfg: AdaMeshConfig, audio_dim: int) -> None:
        super().__init__()
        d = cfg.d_model

        def conformer(blocks: int) -> ConformerEncoder:
            return ConformerEncoder(d, cfg.heads, cfg.ffn, cfg.conv_kernel, blocks, cfg.dropout, cfg.attention_dropout)

        self.subsample = Conv2dSubsampling2(audio_dim, d, d)
        self.audio_encoder = conformer(cfg.audio_blocks)
        self.style_in = nn.Linear(EXPR_DIM, d)
        self.style_encoder = conformer(cfg.style_blocks)
        self.identity_in = nn.Linear(cfg.shape_dim, d)
        self.identity_encoder = conformer(cfg.identity_blocks)
        self.decoder_in = nn.Linear(d, d)
        self.decoder = conformer(cfg.decoder_blocks)
        self.out = nn.Linear(d, EXPR_DIM)
        self.postnet = Postnet(EXPR_DIM, cfg.postnet_channels, cfg.postnet_kernel, cfg.postnet_dropout)

    def encode_style(self, ref: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """Normalised reference expression (B, R, 53), mask (B, R) -> style vector (B, d)."""
        return _masked_mean(self.style_encoder(self.style_in(ref), ref_mask), ref_mask)

    def encode_identity(self, shape: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """Shape beta (B, S) repeated over the (B, R) frames -> identity vector (B, d)."""
        x = self.identity_in(shape)[:, None].expand(-1, ref_mask.shape[1], -1)  # (B, R, d)
        return _masked_mean(self.identity_encoder(x, ref_mask), ref_mask)

    def forward(
        self,
        audio: torch.Tensor,
        mask: torch.Tensor,
        ref: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
        shape: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio (B, 2T, H) aligned HuBERT features, mask (B, T) valid motion frames; the style
        either as a normalised reference (B, R, 53) + ref_mask (B, R) or as vectors style
        (B, d); identity from shape (B, S) over ref_mask, or as vectors (B, d).
        Returns (y_mid, y, style, identity): (B, T, 53) twice (normalised), (B, d) twice."""
        if style is None:
            if ref is None or ref_mask is None:
                raise ValueError("ExpressionAdapter needs a style reference or a style vector")
            style = self.encode_style(ref, ref_mask)
        if identity is None:
            if shape is None:
                raise ValueError("ExpressionAdapter needs a shape or an identity vector")
            frames = ref_mask if ref_mask is not None else mask
            identity = self.encode_identity(shape, frames)
        a = self.subsample(audio)[:, : mask.shape[1]]  # (B, T, d)
        a = self.audio_encoder(a, mask)
        h = self.decoder(self.decoder_in(a + style[:, None] + identity[:, None]), mask)  # (B, T, d)
        mid = self.out(h)  # (B, T, 53)
        return mid, self.postnet(mid, mask), style, identity


# --------------------------------------------------------------------------------------
# Pose VQ-VAE (§7.2)
# --------------------------------------------------------------------------------------


class _ConvStage(nn.Module):
    """[optional nearest x2 upsample] -> Conv1d(k 5, replicate pad, stride s) -> LeakyReLU(0.2) -> norm."""

    def __init__(self, hidden: int, stride: int, upsample: bool, norm: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv1d(hidden, hidden, 5, stride=stride, padding=2, padding_mode="replicate")
        norms: dict[str, nn.Module] = {
            "instance": nn.InstanceNorm1d(hidden),
            "batch": nn.BatchNorm1d(hidden),
            "none": nn.Identity(),
        }
        self.norm = norms[norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T) -> (B, H, T')
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.norm(F.leaky_relu(self.conv(x), 0.2))


def _transformer(hidden: int, heads: int, ff: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class PoseVQVAE(nn.Module):
    """Head rotation (B, T, 3), T a multiple of ``downsample`` -> codes (B, T/ds) -> (B, T, 3)."""

    def __init__(self, cfg: AdaMeshConfig) -> None:
        super().__init__()
        h, n = cfg.pose_vq_hidden, int(round(math.log2(cfg.pose_downsample)))
        self.downsample = cfg.pose_downsample
        self.enc_in = nn.Linear(POSE_DIM, h)
        self.enc_convs = nn.ModuleList(_ConvStage(h, 2, False, cfg.pose_vq_norm) for _ in range(n))
        self.enc_proj = nn.Linear(h, h)
        self.enc_tf = _transformer(h, cfg.pose_vq_heads, cfg.pose_vq_ff, cfg.pose_vq_layers, cfg.pose_vq_dropout)
        self.enc_out = nn.Linear(h, cfg.pose_code_dim)
        self.quantizer = VectorQuantizer(cfg.pose_codebook_size, cfg.pose_code_dim, cfg.pose_vq_beta, cfg.pose_vq_mode)
        self.dec_in = nn.Linear(cfg.pose_code_dim, h)
        self.dec_convs = nn.ModuleList(_ConvStage(h, 1, True, cfg.pose_vq_norm) for _ in range(n))
        self.dec_proj = nn.Linear(h, h)
        self.dec_tf = _transformer(h, cfg.pose_vq_heads, cfg.pose_vq_ff, cfg.pose_vq_layers, cfg.pose_vq_dropout)
        self.dec_out = nn.Linear(h, POSE_DIM)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents (B, T/ds, D) of normalised poses x (B, T, 3)."""
        if x.shape[1] % self.downsample or x.shape[1] == 0:
            raise ValueError(f"pose VQ-VAE: T={x.shape[1]} must be a positive multiple of {self.downsample}")
        h = F.leaky_relu(self.enc_in(x), 0.2).transpose(1, 2)  # (B, H, T)
        for stage in self.enc_convs:
            h = stage(h)
        h = self.enc_proj(h.transpose(1, 2))  # (B, L, H)
        h = self.enc_tf(h + _sinusoids(h.shape[1], h.shape[2], h.device)[None])
        return self.enc_out(h)  # (B, L, D)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents/code vectors (B, L, D) -> normalised poses (B, L*ds, 3)."""
        h = self.dec_in(z).transpose(1, 2)  # (B, H, L)
        for stage in self.dec_convs:
            h = stage(h)
        h = self.dec_proj(h.transpose(1, 2))  # (B, T, H)
        h = self.dec_tf(h + _sinusoids(h.shape[1], h.shape[2], h.device)[None])
        return self.dec_out(h)  # (B, T, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQOutput]:
        vq = self.quantizer(self.encode(x))
        return self.decode(vq.quantized), vq

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices (B, T/ds) of normalised poses (B, T, 3)."""
        return self.quantizer.nearest(self.encode(x))

    def encode_chunks(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """:meth:`encode` over consecutive chunks of ``window`` frames (the trained context)."""
        return torch.cat([self.encode(x[:, i : i + window]) for i in range(0, x.shape[1], window)], dim=1)

    def decode_chunks(self, idx: torch.Tensor, window_codes: int) -> torch.Tensor:
        """:meth:`decode_indices` over consecutive chunks of ``window_codes`` codes."""
        parts = [self.decode_indices(idx[:, i : i + window_codes]) for i in range(0, idx.shape[1], window_codes)]
        return torch.cat(parts, dim=1)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices (B, L) -> normalised poses (B, L*ds, 3)."""
        return self.decode(self.quantizer.lookup(idx))


# --------------------------------------------------------------------------------------
# PoseGPT (§7.3)
# --------------------------------------------------------------------------------------


class _CausalBlock(nn.Module):
    """Pre-norm causal self-attention + feed-forward block."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.dropout = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ff(self.norm2(x)))


class PoseGPT(nn.Module):
    """Autoregressive pose-code model with per-layer identity-style injection (§7.3)."""

    def __init__(self, cfg: AdaMeshConfig, audio_dim: int, num_identities: int) -> None:
        super().__init__()
        d, k = cfg.posegpt_d, cfg.pose_codebook_size
        self.num_codes, self.bos, self.max_steps = k, k, cfg.posegpt_max_steps
        step = 2 * cfg.pose_downsample  # audio frames (50 Hz) per code
        self.audio_proj = nn.Conv1d(audio_dim, d, kernel_size=step, stride=step)
        self.token = nn.Embedding(k + 1, d)  # + BOS
        self.position = nn.Embedding(cfg.posegpt_max_steps, d)
        self.style = nn.Embedding(num_identities, d)  # one pose-style embedding per training identity
        self.inject = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.posegpt_layers))  # U_l
        self.blocks = nn.ModuleList(
            _CausalBlock(d, cfg.posegpt_heads, cfg.posegpt_ff, cfg.posegpt_dropout) for _ in range(cfg.posegpt_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, k)
        self.dropout = nn.Dropout(cfg.posegpt_dropout)

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """Aligned HuBERT ⊕ log-mel (B, 2T, A), 2T a multiple of the code step -> (B, L, d)."""
        return self.audio_proj(audio.transpose(1, 2)).transpose(1, 2)

    def forward(self, audio_tokens: torch.Tensor, codes_in: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """audio_tokens (B, L, d), codes_in (B, L) = [BOS, c_0, ..., c_{L-2}], identity (B,) ->
        logits (B, L, K)."""
        n = codes_in.shape[1]
        if n > self.max_steps:
            raise ValueError(f"PoseGPT: {n} code steps exceed posegpt_max_steps={self.max_steps}")
        x = self.token(codes_in) + audio_tokens + self.position(torch.arange(n, device=codes_in.device))[None]
        x = self.dropout(x)
        e = self.style(identity)  # (B, d)
        for inject, block in zip(self.inject, self.blocks, strict=True):
            x = block(x + inject(e)[:, None])
        return self.head(self.norm(x))  # (B, L, K)

    @torch.no_grad()
    def sample(
        self,
        audio_tokens: torch.Tensor,
        identity: torch.Tensor,
        generator: torch.Generator,
        mode: str = "sample",
        temperature: float = 1.0,
        top_k: int = 0,
        context: int | None = None,
    ) -> torch.Tensor:
        """Codes (B, L) decoded autoregressively. Step j sees the last ``context`` steps
        (default ``max_steps``) as a training window does: positions 0..C-1, BOS first, then
        the codes sampled for the earlier steps of the window (deviation 12)."""
        b, total, _ = audio_tokens.shape
        c = min(context or self.max_steps, self.max_steps)
        codes = torch.empty(b, 0, dtype=torch.long, device=audio_tokens.device)
        bos = torch.full((b, 1), self.bos, dtype=torch.long, device=audio_tokens.device)
        for j in range(total):
            start = max(0, j - c + 1)
            codes_in = torch.cat([bos, codes[:, start:j]], dim=1)  # (B, j - start + 1)
            logits = self(audio_tokens[:, start : j + 1], codes_in, identity)[:, -1]  # (B, K)
            if mode == "greedy":
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(audio_tokens.device)
            codes = torch.cat([codes, nxt[:, None]], dim=1)
        return codes  # (B, L)


# --------------------------------------------------------------------------------------
# Pose-style matrices (§7.4)
# --------------------------------------------------------------------------------------


def pose_style_distances(
    ref: torch.Tensor, ref_counts: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, min_shared: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """D(S', S_id) = mean over the clusters present in both of ||S'[c] - S_id[c]||_2 (D12).

    ref (k, D) and ref_counts (k,) of the reference; table (N, k, D) and counts (N, k) of
    the identities. Returns distances (N,) (inf where fewer than ``min_shared`` clusters
    are shared) and the shared-cluster counts (N,)."""
    shared = (ref_counts > 0)[None] & (counts > 0)  # (N, k)
    d = torch.linalg.vector_norm(ref[None] - table, dim=-1)  # (N, k)
    n = shared.sum(1)  # (N,)
    dist = (d * shared).sum(1) / n.clamp_min(1)
    dist = torch.where(n >= max(1, min_shared), dist, torch.full_like(dist, float("inf")))
    return dist, n


class _Style(NamedTuple):
    overrides: dict[str, torch.Tensor]  # MoLoRA parameters by ExpressionAdapter name
    style: torch.Tensor  # (d,)
    identity: torch.Tensor | None  # (d,) or None: from ``shape`` over the default frames
    shape: torch.Tensor  # (S,) beta used for the identity vector when it is None
    pose_identity: int
    seed: int


# --------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------


class AdaMesh(MotionMethod):
    """AdaMesh on FLAME-56 parameters (expression 50 | jaw 3, head rotation 3)."""

    name: ClassVar[str] = "adamesh"
    config_class: ClassVar[type] = AdaMeshConfig
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = ("expression", "pose_vq", "posegpt", "pose_index")
    template_input: ClassVar[str] = "shape"  # generate takes a FLAME shape beta (or None), evaluation passes it
    trains_on_vertices: ClassVar[bool] = False  # the loop need not build face-model vertices for training batches

    def __init__(self, config: AdaMeshConfig, facts: DataFacts) -> None:
        super().__init__(config, facts)
        if not isinstance(config, AdaMeshConfig):
            raise TypeError(f"config must be AdaMeshConfig, got {type(config).__name__}")
        if facts.num_train_subjects < 1:
            raise ValueError("AdaMesh needs at least one training identity (PoseGPT style embeddings)")
        if config.default_pose_identity >= facts.num_train_subjects:
            raise ValueError(
                f"default_pose_identity={config.default_pose_identity} but there are "
                f"{facts.num_train_subjects} training identities"
            )
        self.config: AdaMeshConfig = config
        self.num_identities = facts.num_train_subjects
        cfg = config

        encoder = build_audio_encoder(cfg.audio_encoder)  # frozen; kept out of the state dict (deviation 9)
        encoder.eval()
        object.__setattr__(self, "_hubert", encoder)
        object.__setattr__(self, "_face", None)
        object.__setattr__(self, "_face_missing", False)
        rate = encoder.output_rate
        mode = cfg.audio_alignment
        if mode == "auto":
            mode = "trim" if abs(rate - 2.0 * facts.fps) < 1e-6 else "interp"
        elif mode == "trim" and abs(rate - 2.0 * facts.fps) > 1e-6:
            raise ValueError(f'audio_alignment="trim" needs {rate / 2:g} fps motion, got {facts.fps:g} fps')
        self.alignment: str = mode
        h = encoder.hidden_size

        self.expression = ExpressionAdapter(cfg, h + (cfg.mel_bins if cfg.expression_audio == "hubert+mel" else 0))
        self.molora_layers = apply_adapters(
            self.expression,
            lambda name, _m: ".conv." in f".{name}" and name.rsplit(".", 1)[-1] in cfg.molora_targets,
            lambda shape: MoLoRA(shape, cfg.molora_ranks, cfg.molora_alpha),
        )
        self.pose_vq = PoseVQVAE(cfg)
        self.posegpt = PoseGPT(cfg, h + cfg.mel_bins, self.num_identities)
        self.register_buffer("mel_fbank", mel_filterbank(201, cfg.mel_bins), persistent=False)

        # z-normalisation statistics (fitted by fit_stage) and the pose-style index.
        self.register_buffer("expr_mean", torch.zeros(EXPR_DIM))
        self.register_buffer("expr_std", torch.ones(EXPR_DIM))
        self.register_buffer("pose_mean", torch.zeros(POSE_DIM))
        self.register_buffer("pose_std", torch.ones(POSE_DIM))
        self.register_buffer("fitted", torch.zeros(3, dtype=torch.bool))  # expr stats, pose stats, pose index
        n, k = self.num_identities, cfg.pose_kmeans_k
        self.register_buffer(
            "cluster_centroids", torch.zeros(k, h + (cfg.mel_bins if cfg.pose_cluster_audio != "hubert" else 0))
        )
        self.register_buffer("pose_style_matrix", torch.zeros(n, k, cfg.pose_code_dim))
        self.register_buffer("pose_style_counts", torch.zeros(n, k))
        self.register_buffer("identity_style", torch.zeros(n, cfg.d_model))  # mean style vector per identity
        self.register_buffer("identity_shape", torch.zeros(n, cfg.shape_dim))  # mean shape per identity
        self.set_stage(self.stage)

    # ================================================================== plumbing
    def _apply(self, fn: Any, recurse: bool = True) -> AdaMesh:
        """``.to()`` / ``.cuda()`` also move the frozen encoder and the injected face model."""
        super()._apply(fn, recurse)
        self._hubert._apply(fn)
        if self._face is not None:
            self._face._apply(fn)
        return self

    @property
    def audio_encoder(self) -> nn.Module:
        """The frozen HuBERT (not a submodule: it is not saved with the model)."""
        return self._hubert

    def _stage_modules(self, stage: str) -> list[nn.Module]:
        return {"expression": [self.expression], "pose_vq": [self.pose_vq], "posegpt": [self.posegpt]}.get(stage, [])

    def set_stage(self, stage: str) -> None:
        """Select the stage; only its parameters require grad (MoLoRA never does in training)."""
        super().set_stage(stage)
        adapters = set(map(id, adapter_parameters(self.expression).values()))
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self._stage_modules(stage):
            for p in module.parameters():
                if id(p) not in adapters:
                    p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> AdaMesh:
        """As ``nn.Module.train``, but modules the current stage does not train stay in eval
        mode (frozen BatchNorm statistics, no dropout in frozen targets)."""
        super().train(mode)
        if mode:
            trained = {id(m) for m in self._stage_modules(self.stage)}
            for m in (self.expression, self.pose_vq, self.posegpt):
                if id(m) not in trained:
                    m.eval()
        return self

    def adaptation_parameters(self) -> dict[str, nn.Parameter]:
        """The MoLoRA parameters (names relative to ``self.expression``): what ``adapt`` tunes."""
        return adapter_parameters(self.expression)

    def lr_multiplier(self, epoch: int) -> float:
        """StepLR factor of the current stage at ``epoch`` (the loop's lr hook, deviation 6)."""
        c = self.config
        step, gamma = {"expression": (c.lr_step, c.lr_gamma), "pose_vq": (c.pose_vq_lr_step, c.pose_vq_lr_gamma)}.get(
            self.stage, (0, 1.0)
        )
        return float(gamma ** (epoch // step)) if step > 0 else 1.0

    # ---- face model (injected dependency, README G10) ---------------------------------
    def set_face_model(self, layer: FlameLayer | None) -> None:
        """Use ``layer`` (a FlameLayer with 50 expression components) to build vertices. The
        model keeps its own copy (moved with the model), so a shared layer is never moved."""
        if layer is not None:
            if getattr(layer, "n_expr", None) != N_EXPRESSION:
                raise ValueError(f"face model must have {N_EXPRESSION} expression components, got {layer.n_expr}")
            nv = self.facts.num_vertices
            if nv and layer.num_vertices != nv:
                raise ValueError(f"face model has {layer.num_vertices} vertices, the data facts say {nv}")
            layer = copy.deepcopy(layer).to(self.device)
        object.__setattr__(self, "_face", layer)

    def face_model(self) -> FlameLayer | None:
        """The injected face model, else the one in ``config.face_model`` (loaded once), else
        None. A configured file that is missing gives a warning and None (no vertices)."""
        if self._face is None and self.config.face_model and not self._face_missing:
            from pathlib import Path

            from talkmesh.data.corpus import load_face_model

            if not Path(self.config.face_model).expanduser().is_file():
                warnings.warn(
                    f"adamesh: face_model {self.config.face_model} not found; generate returns params and head "
                    "pose without vertices (inject a FlameLayer with set_face_model)",
                    stacklevel=2,
                )
                object.__setattr__(self, "_face_missing", True)
                return None
            self.set_face_model(load_face_model(self.config.face_model))
        return self._face

    # ================================================================== normalisation
    def _norm_expr(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.expr_mean) / self.expr_std

    def _denorm_expr(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.expr_std + self.expr_mean

    def _norm_pose(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pose_mean) / self.pose_std

    def _denorm_pose(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pose_std + self.pose_mean

    # ================================================================== audio
    @torch.no_grad()
    def _features(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen HuBERT: audio (B, S) -> features (B, N, H) at 50 Hz and lengths (B,)."""
        out = self._hubert(audio.to(self.device), None if lengths is None else lengths.to(self.device))
        return out.features, out.lengths

    def _align(self, feats: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per item, the first ``lengths_b`` frames of feats (B, N, C) to exactly ``targets_b``
        frames (trim/edge-pad or interpolate, deviation 5) -> (B, max target, C), zero-padded."""
        b, _, c = feats.shape
        out = feats.new_zeros(b, int(targets.max()), c)
        for i in range(b):
            n, t = int(lengths[i]), int(targets[i])
            f = feats[i, : max(n, 1)]
            if self.alignment == "trim":
                g = f[:t] if f.shape[0] >= t else torch.cat([f, f[-1:].expand(t - f.shape[0], c)])
            else:
                g = interpolate_features(f[None], t)[0]
            out[i, :t] = g
        return out

    def _mel(self, audio: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        return log_mel(audio.to(self.device), None if lengths is None else lengths.to(self.device), self.mel_fbank)

    def frames_for_audio(self, num_samples: int) -> int:
        """Motion frames for ``num_samples`` samples: floor(HuBERT frames / 2) at 25 fps (§8),
        else FaceFormer's "interp" rule."""
        n = int(self._hubert.frames_for_samples(int(num_samples)))
        if self.alignment == "trim":
            return n // 2
        return frames_from_audio(
            int(num_samples), self.facts.fps, basis="encoder", encoder_rate=self._hubert.output_rate
        )

    # ================================================================== training
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the current stage on a batch (specs/README.md schema): ``audio`` (B, S),
        ``audio_lengths``, ``params`` (B, T, 53) (expression), ``head_pose`` (B, T, 3) (pose
        stages), ``motion_mask`` (B, T), optional ``shape`` (B, 100), ``subject`` (B,)."""
        if self.stage == "expression":
            return self._expression_loss(batch)
        if self.stage == "pose_vq":
            return self._pose_vq_loss(batch)
        if self.stage == "posegpt":
            return self._posegpt_loss(batch)
        raise RuntimeError(f"adamesh stage {self.stage!r} is fitted by fit_stage, not trained by gradient")

    def _batch_basics(self, batch: Batch, need: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if need not in batch:
            raise KeyError(
                f"AdaMesh stage {self.stage!r} needs batch[{need!r}] (FLAME-56 motion; use a FLAME-parameter "
                "corpus, e.g. data.format=mead or data.synthetic_flavour=flame)"
            )
        dev = self.device
        motion = batch[need].to(dev, torch.float32)  # (B, T, D)
        b, t = motion.shape[:2]
        mask = batch.get("motion_mask")
        mask = torch.ones(b, t, dtype=torch.bool, device=dev) if mask is None else mask.to(dev, torch.bool)
        lengths = mask.sum(1)  # (B,)
        return motion, mask, lengths

    def _style_partners(self, batch: Batch) -> list[int]:
        """Per item, another item of the same training speaker from a different clip if the
        batch has one, else itself (deviation 2)."""
        subject = torch.as_tensor(batch.get("subject", [-1] * len(batch["params"]))).tolist()
        names = batch.get("names") or [str(i) for i in range(len(subject))]
        out = []
        for i, s in enumerate(subject):
            cands = [j for j, t in enumerate(subject) if j != i and t == s and s >= 0 and names[j] != names[i]]
            out.append(cands[0] if cands else i)
        return out

    def _shape(self, batch: Batch, b: int) -> torch.Tensor:
        shape = batch.get("shape")
        if shape is None:
            return torch.zeros(b, self.config.shape_dim, device=self.device)
        shape = torch.as_tensor(shape).to(self.device, torch.float32)
        if shape.shape != (b, self.config.shape_dim):
            raise ValueError(f"batch['shape'] must be (B, {self.config.shape_dim}), got {tuple(shape.shape)}")
        return shape

    def _expression_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        params, mask, lengths = self._batch_basics(batch, "params")
        if params.shape[-1] != EXPR_DIM:
            raise ValueError(f"batch['params'] must be (B, T, {EXPR_DIM}), got {tuple(params.shape)}")
        b, t = params.shape[:2]
        audio = self._expression_audio(self._audio_inputs(batch["audio"], batch.get("audio_lengths"), lengths))
        if audio.shape[1] < 2 * t:
            audio = F.pad(audio, (0, 0, 0, 2 * t - audio.shape[1]))
        y = self._norm_expr(params)  # (B, T, 53)
        partners = self._style_partners(batch)
        r = min(t, max(1, int(round(self.config.style_seconds * self.facts.fps))))
        ref, ref_mask = y[partners, :r], mask[partners, :r]
        mid, post, _, _ = self.expression(audio, mask, ref, ref_mask, self._shape(batch, b))
        terms = {"l1_mid": _masked_l1(mid, y, mask), "l1_post": _masked_l1(post, y, mask)}
        loss, logs = weighted_loss(terms, dataclasses.asdict(self.config.loss_weights))
        logs["frames"] = float(lengths.sum())
        return loss, logs

    def _pose_crop(self, lengths: torch.Tensor) -> int:
        ds = self.config.pose_downsample
        t = min(int(lengths.min()), self.config.pose_window) // ds * ds
        if t < ds:
            raise ValueError(f"AdaMesh pose stages need windows of at least {ds} frames, got {int(lengths.min())}")
        return t

    def _pose_vq_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        pose, _, lengths = self._batch_basics(batch, "head_pose")
        t = self._pose_crop(lengths)
        x = self._norm_pose(pose[:, :t])  # (B, t, 3)
        rec, vq = self.pose_vq(x)
        terms = {"rec": (rec - x).abs().mean(), "vq": vq.loss}
        loss, logs = weighted_loss(terms, dataclasses.asdict(self.config.pose_vq_loss_weights))
        logs.update(
            perplexity=float(vq.perplexity),
            codes_used=float(vq.used),
            code_usage=self.pose_vq.quantizer.usage(),
            commitment=float(vq.commitment),
        )
        return loss, logs

    def _expression_audio(self, both: torch.Tensor) -> torch.Tensor:
        """The expression adapter's part of aligned HuBERT ⊕ log-mel (B, 2T, H + M)."""
        return both if self.config.expression_audio == "hubert+mel" else both[..., : self._hubert.hidden_size]

    def _audio_inputs(self, audio: torch.Tensor, lengths: torch.Tensor | None, frames: torch.Tensor) -> torch.Tensor:
        """HuBERT ⊕ log-mel (B, 2 max(frames), H + M), each item aligned to 2 frames_b."""
        feats, flen = self._features(audio, lengths)
        mel = self._mel(audio, lengths)[:, : feats.shape[1]]
        both = torch.cat([feats, F.pad(mel, (0, 0, 0, feats.shape[1] - mel.shape[1]))], dim=-1)
        return self._align(both, flen, 2 * frames)

    def _posegpt_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        pose, _, lengths = self._batch_basics(batch, "head_pose")
        subject = torch.as_tensor(batch["subject"]).to(self.device, torch.long)  # (B,)
        if bool(((subject < 0) | (subject >= self.num_identities)).any()):
            raise ValueError(
                f"PoseGPT trains on training identities 0..{self.num_identities - 1}, got {subject.tolist()}"
            )
        t = self._pose_crop(lengths)
        with torch.no_grad():
            codes = self.pose_vq.indices(self._norm_pose(pose[:, :t]))  # (B, L) frozen prior
        audio = self._audio_inputs(batch["audio"], batch.get("audio_lengths"), lengths)[:, : 2 * t]  # (B, 2t, A)
        tokens = self.posegpt.audio_tokens(audio)  # (B, L, d)
        codes_in = torch.cat([torch.full_like(codes[:, :1], self.posegpt.bos), codes[:, :-1]], dim=1)
        logits = self.posegpt(tokens, codes_in, subject)  # (B, L, K)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        loss, logs = weighted_loss({"code_ce": ce}, {"code_ce": 1.0})
        logs["code_accuracy"] = float((logits.argmax(-1) == codes).float().mean())
        logs["ce_ratio_log_k"] = float(ce.detach()) / math.log(self.config.pose_codebook_size)
        return loss, logs

    # ================================================================== fitted stages
    @torch.no_grad()
    def fit_stage(self, dataset: Any) -> dict[str, float]:
        """Non-gradient fitting at the start of a stage (called by the training loop on a
        fresh start, on every rank, with the training split as whole sequences; ``dataset[i]``
        is a Clip). ``expression`` / ``pose_vq``: z-normalisation statistics when not fitted
        yet; ``pose_index``: k-means + pose-style matrices + identity style tables.
        Returns logs (floats)."""
        logs: dict[str, float] = {}
        if self.stage == "expression" and not bool(self.fitted[0]):
            logs.update(self._fit_stats(dataset, "params"))
        if self.stage in ("pose_vq", "posegpt") and not bool(self.fitted[1]):
            logs.update(self._fit_stats(dataset, "head_pose"))
        if self.stage == "pose_index":
            logs.update(self._fit_pose_index(dataset))
        return logs

    def _fit_stats(self, dataset: Any, key: str) -> dict[str, float]:
        total, s1, s2 = 0, None, None
        for i in range(len(dataset)):
            x = getattr(dataset[i], key)
            if x is None:
                raise ValueError(f"AdaMesh needs {key} in every training clip to fit its normalisation")
            x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x**2).sum(0) if s2 is None else s2 + (x**2).sum(0)
            total += x.shape[0]
        if not total or s1 is None or s2 is None:
            raise ValueError("no training frames to fit the normalisation statistics")
        mean = s1 / total
        std = (s2 / total - mean**2).clamp_min(0.0).sqrt().clamp_min(self.config.norm_min_std)
        if key == "params":
            self.expr_mean.copy_(mean.float())
            self.expr_std.copy_(std.float())
            self.fitted[0] = True
        else:
            self.pose_mean.copy_(mean.float())
            self.pose_std.copy_(std.float())
            self.fitted[1] = True
        return {f"{key}_frames": float(total)}

    def _clip_features(self, audio: np.ndarray | torch.Tensor, cache: Any = None) -> torch.Tensor:
        """50 Hz features (N, C) of one whole clip that the pose-style clusters are built on:
        HuBERT (from the disk cache when enabled) [⊕ log-mel with ``pose_cluster_audio``]."""
        a = torch.as_tensor(np.asarray(audio, np.float32) if not isinstance(audio, torch.Tensor) else audio)
        a = a.to(torch.float32)
        if cache is not None:
            feats = torch.from_numpy(cache.get_or_compute(a.cpu().numpy(), self._hubert)).to(self.device)
        else:
            feats = self._features(a[None])[0][0]
        if self.config.pose_cluster_audio == "hubert+mel":
            mel = self._mel(a[None], None)[0, : feats.shape[0]]
            feats = torch.cat([feats, F.pad(mel, (0, 0, 0, feats.shape[0] - mel.shape[0]))], dim=-1)
        return feats

    def _clip_pose_stats(self, feats: torch.Tensor, head_pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cluster sums (k, D) and frame counts (k,) of one clip's pre-quantisation pose
        latents (§7.4 steps 2-3): HuBERT frame f -> code step floor(f / (2 ds))."""
        ds = self.config.pose_downsample
        t = head_pose.shape[0]
        tp = -(-t // ds) * ds  # T padded to a multiple of ds
        pose = torch.cat([head_pose, head_pose[-1:].expand(tp - t, POSE_DIM)]) if tp > t else head_pose
        z = self.pose_vq.encode_chunks(self._norm_pose(pose)[None], self.config.pose_window)[0]  # (tp / ds, D)
        a = self._align(feats[None], torch.tensor([feats.shape[0]]), torch.tensor([2 * t]))[0]  # (2t, H)
        labels = assign(a, self.cluster_centroids)  # (2t,)
        steps = torch.arange(2 * t, device=a.device) // (2 * ds)
        k = self.cluster_centroids.shape[0]
        sums = torch.zeros(k, z.shape[1], device=a.device).index_add_(0, labels, z[steps])
        counts = torch.bincount(labels, minlength=k).to(sums.dtype)
        return sums, counts

    def _fit_pose_index(self, dataset: Any) -> dict[str, float]:
        from talkmesh.audio.cache import FeatureCache

        cfg = self.config
        was_training = self.training
        self.eval()
        cache = FeatureCache() if cfg.cache_features else None
        try:
            # 1. k-means on (a seeded subsample of) the training HuBERT frames.
            seqs = getattr(dataset, "sequences", None)
            est = sum(2 * s.num_frames for s in seqs) if seqs else 0
            keep_p = min(1.0, cfg.kmeans_max_frames / est) if est else 1.0
            gen = torch.Generator().manual_seed(0)
            pool: list[torch.Tensor] = []
            for i in range(len(dataset)):
                feats = self._clip_features(dataset[i].audio, cache)
                keep = torch.rand(feats.shape[0], generator=gen) < keep_p
                pool.append(feats[keep.to(feats.device)])
            frames = torch.cat(pool)[: cfg.kmeans_max_frames]
            result = kmeans(frames.float(), cfg.pose_kmeans_k, iters=cfg.kmeans_iters, seed=0)
            self.cluster_centroids.copy_(result.centroids)
            # 2.-3. per-identity pose-style matrices; identity style / shape tables.
            n, k = self.num_identities, cfg.pose_kmeans_k
            sums = torch.zeros(n, k, cfg.pose_code_dim, device=self.device)
            counts = torch.zeros(n, k, device=self.device)
            style_sum = torch.zeros(n, cfg.d_model, device=self.device)
            shape_sum = torch.zeros(n, cfg.shape_dim, device=self.device)
            clips = torch.zeros(n, device=self.device)
            for i in range(len(dataset)):
                clip = dataset[i]
                ident = dataset.subject_index(clip.subject)
                if ident < 0 or clip.params is None:
                    continue
                feats = self._clip_features(clip.audio, cache)
                if clip.head_pose is not None:
                    s, c = self._clip_pose_stats(feats, torch.as_tensor(clip.head_pose, device=self.device))
                    sums[ident] += s
                    counts[ident] += c
                ref, ref_mask = self._reference_expression(clip.params)
                style_sum[ident] += self.expression.encode_style(ref, ref_mask)[0]
                if clip.shape is not None:
                    shape_sum[ident] += torch.as_tensor(clip.shape, device=self.device, dtype=torch.float32)
                clips[ident] += 1
            self.pose_style_matrix.copy_(sums / counts.clamp_min(1)[..., None])
            self.pose_style_counts.copy_(counts)
            self.identity_style.copy_(style_sum / clips.clamp_min(1)[:, None])
            self.identity_shape.copy_(shape_sum / clips.clamp_min(1)[:, None])
            self.fitted[2] = True
        finally:
            self.train(was_training)
        return {
            "kmeans_frames": float(frames.shape[0]),
            "kmeans_inertia_per_frame": result.inertia / max(frames.shape[0], 1),
            "kmeans_iterations": float(result.iterations),
            "clusters_used_per_identity": float((counts > 0).sum(1).float().mean()),
        }

    # ================================================================== style
    def _reference_expression(self, params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 53) reference params -> normalised (1, R, 53) (at most style_seconds) and mask (1, R)."""
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        p = p.to(self.device, torch.float32)
        if p.ndim != 2 or p.shape[1] != EXPR_DIM or p.shape[0] < 1:
            raise ValueError(f"reference 'params' must be (T, {EXPR_DIM}) = expression | jaw, got {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("reference 'params' hold non-finite values")
        r = min(p.shape[0], max(1, int(round(self.config.style_seconds * self.facts.fps))))
        return self._norm_expr(p[:r])[None], torch.ones(1, r, dtype=torch.bool, device=self.device)

    def _reference(self, reference: Reference) -> dict[str, Any]:
        """Validate a reference clip record and cut it to ``reference_seconds``."""
        audio = reference_field(reference, "audio")
        params = reference_field(reference, "params")
        if audio is None or params is None:
            have = "vertices only" if reference_field(reference, "vertices") is not None else "neither"
            raise ValueError(
                f"an AdaMesh style reference needs 'audio' (S,) 16 kHz and 'params' (T, {EXPR_DIM}) "
                f"(FLAME expression | jaw); got {have}"
            )
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        if p.ndim != 2 or p.shape[1] != EXPR_DIM or p.shape[0] < 1:
            raise ValueError(f"reference 'params' must be (T, {EXPR_DIM}), got {tuple(p.shape)}")
        t = min(int(p.shape[0]), max(1, int(round(self.config.reference_seconds * self.facts.fps))))
        a = self.as_audio(audio)[0]  # (S,)
        n = int(round(t * self.facts.samples_per_frame))
        a = a[:n] if a.shape[0] >= n else F.pad(a, (0, n - a.shape[0]))  # audio matched to the motion
        if a.shape[0] < self._hubert.receptive_field:
            raise ValueError(f"reference too short: {t} frames; AdaMesh needs at least 0.025 s of audio")
        pose = reference_field(reference, "head_pose")
        if pose is not None:
            pose = torch.as_tensor(np.asarray(pose) if not isinstance(pose, torch.Tensor) else pose)
            if pose.ndim != 2 or pose.shape[1] != POSE_DIM or pose.shape[0] < t:
                raise ValueError(f"reference 'head_pose' must be (T, 3) with T = {p.shape[0]}, got {tuple(pose.shape)}")
            pose = pose[:t].to(self.device, torch.float32)
            if not bool(torch.isfinite(pose).all()):
                raise ValueError("reference 'head_pose' holds non-finite values")
        shape = reference_field(reference, "shape")
        if shape is not None:
            shape = torch.as_tensor(np.asarray(shape) if not isinstance(shape, torch.Tensor) else shape)
            if shape.shape != (self.config.shape_dim,):
                raise ValueError(f"reference 'shape' must be ({self.config.shape_dim},), got {tuple(shape.shape)}")
            shape = shape.to(self.device, torch.float32)
        else:
            shape = torch.zeros(self.config.shape_dim, device=self.device)
        return {"audio": a, "params": p[:t].to(self.device, torch.float32), "head_pose": pose, "shape": shape, "t": t}

    @torch.no_grad()
    def _retrieve_pose(self, ref: dict[str, Any]) -> dict[str, Any]:
        """§7.4: nearest training identity by the masked mean L2 between pose-style matrices."""
        n = self.num_identities
        if ref["head_pose"] is None or not bool(self.fitted[2]):
            return {
                "pose_identity": self.config.default_pose_identity,
                "pose_selection": "default (no head pose in the reference)"
                if bool(self.fitted[2])
                else "default (pose index not fitted)",
                "pose_distances": torch.full((n,), -1.0),
                "pose_shared_clusters": torch.zeros(n, dtype=torch.long),
                "shared_clusters": 0,
            }
        with self._eval_mode():
            s, c = self._clip_pose_stats(self._clip_features(ref["audio"]), ref["head_pose"])
        s_ref = s / c.clamp_min(1)[:, None]
        dist, shared = pose_style_distances(
            s_ref, c, self.pose_style_matrix, self.pose_style_counts, self.config.min_shared_clusters
        )
        selection = "masked cluster distance"
        if not bool(torch.isfinite(dist).any()):  # fall back to the global mean latents
            g_ref = s.sum(0) / c.sum().clamp_min(1)
            g = (self.pose_style_matrix * self.pose_style_counts[..., None]).sum(1) / self.pose_style_counts.sum(
                1
            ).clamp_min(1)[:, None]
            dist = torch.linalg.vector_norm(g - g_ref[None], dim=-1)
            selection = "global mean latent (no shared clusters)"
        best = int(torch.argmin(dist))
        stored = torch.where(torch.isfinite(dist), dist, torch.full_like(dist, -1.0))
        return {
            "pose_identity": best,
            "pose_selection": selection,
            "pose_distances": stored.float().cpu(),
            "pose_shared_clusters": shared.cpu(),
            "shared_clusters": int(shared[best]),
        }

    def _state(
        self,
        kind: str,
        ref: dict[str, Any],
        style: torch.Tensor,
        identity: torch.Tensor,
        pose: dict[str, Any],
        seed: int,
        molora: Mapping[str, torch.Tensor] | None = None,
        **extra: Any,
    ) -> StyleState:
        fields: dict[str, Any] = {
            "kind": kind,
            "num_identities": self.num_identities,
            "style_vector": style,
            "identity_vector": identity,
            "ref_expression": ref["params"],
            "reference_frames": int(ref["t"]),
            "seed": int(seed),
            **pose,
            "pose_identity_name": self.facts.train_subjects[pose["pose_identity"]],
        }
        for name, value in (molora or {}).items():
            fields[f"molora/{name}"] = value
        fields.update(extra)
        return make_style_state(self.name, self.style_version, **fields)

    def _identity_state(self, index: int) -> StyleState:
        style, identity = self._table_vectors(index)
        n = self.num_identities
        return make_style_state(
            self.name,
            self.style_version,
            kind="identity",
            num_identities=n,
            style_vector=style,
            identity_vector=identity,
            pose_identity=index,
            pose_identity_name=self.facts.train_subjects[index],
            pose_selection="given",
            pose_distances=torch.full((n,), -1.0),
            pose_shared_clusters=torch.zeros(n, dtype=torch.long),
            shared_clusters=0,
            seed=self.config.pose_seed,
        )

    @torch.no_grad()
    def _table_vectors(self, index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Style / identity vectors (d,) of a training identity's tables, or their mean (None)."""
        if index is None:
            style = self.identity_style.mean(0)
            shape = self.identity_shape.mean(0)
        else:
            style, shape = self.identity_style[index], self.identity_shape[index]
        frames = max(1, int(round(self.config.reference_seconds * self.facts.fps)))
        with self._eval_mode():
            ident = self.expression.encode_identity(
                shape[None], torch.ones(1, frames, dtype=torch.bool, device=self.device)
            )[0]
        return style, ident

    @torch.no_grad()
    def encode_style(
        self, reference: Reference | None = None, *, subject: int | str | None = None, seed: int | None = None
    ) -> StyleState:
        """StyleState from a reference clip without optimisation (§9): style and identity
        vectors, the retrieved pose identity; no MoLoRA entries. ``subject`` (a training
        identity) gives that identity's fitted tables and pose embedding instead."""
        if subject is not None:
            return self._identity_state(self.facts.subject_index(subject))
        if reference is None:
            raise ValueError("encode_style needs a reference clip or a training subject")
        ref = self._reference(reference)
        with self._eval_mode():
            r, r_mask = self._reference_expression(ref["params"])
            style = self.expression.encode_style(r, r_mask)[0]
            identity = self.expression.encode_identity(ref["shape"][None], r_mask)[0]
            pose = self._retrieve_pose(ref)
        return self._state("encoded", ref, style, identity, pose, self.config.pose_seed if seed is None else seed)

    def adapt(
        self,
        reference: Reference,
        *,
        steps: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        lr: float | None = None,
    ) -> StyleState:
        """Few-shot adaptation (§6, §7.4): optimise copies of the MoLoRA parameters on the
        reference (AdamW, ``adapt_batch`` random crops of ``adapt_crop_s`` per step, eval
        mode, everything else frozen) for ``steps`` steps or ``max_seconds`` of wall time,
        whichever ends first; then retrieve the pose identity. Deterministic for a seed
        when the step bound ends it. The model itself is never modified."""
        cfg = self.config
        steps = cfg.adapt_steps if steps is None else int(steps)
        max_seconds = cfg.adapt_max_seconds if max_seconds is None else float(max_seconds)
        if steps < 0 or not max_seconds > 0:
            raise ValueError(f"adapt: steps must be >= 0 and max_seconds positive, got {steps}, {max_seconds}")
        ref = self._reference(reference)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed))
        lora = {k: p.detach().clone().requires_grad_(True) for k, p in self.adaptation_parameters().items()}
        opt = torch.optim.AdamW(
            list(lora.values()), lr=cfg.adapt_lr if lr is None else float(lr), weight_decay=cfg.adapt_weight_decay
        )
        weights = dataclasses.asdict(cfg.loss_weights)
        t = ref["t"]
        crop = max(1, min(t, int(round(cfg.adapt_crop_s * self.facts.fps))))
        losses: list[float] = []
        done = 0
        with self._eval_mode():
            audio = self._expression_audio(self._audio_inputs(ref["audio"][None], None, torch.tensor([t])))
            y = self._norm_expr(ref["params"])[None]  # (1, T, 53)
            r, r_mask = self._reference_expression(ref["params"])
            shape = ref["shape"][None]
            with torch.enable_grad():
                for _ in range(steps):
                    if time.perf_counter() - t0 >= max_seconds:
                        break
                    starts = torch.randint(0, t - crop + 1, (cfg.adapt_batch,), generator=gen).tolist()
                    yb = torch.cat([y[:, s : s + crop] for s in starts])  # (B, crop, 53)
                    ab = torch.cat([audio[:, 2 * s : 2 * (s + crop)] for s in starts])  # (B, 2 crop, H)
                    mask = torch.ones(len(starts), crop, dtype=torch.bool, device=self.device)
                    b = len(starts)
                    with adapter_values(self.expression, lora):
                        # The style encoder sees the whole reference once per step (shared by the crops).
                        style = self.expression.encode_style(r, r_mask).expand(b, -1)
                        identity = self.expression.encode_identity(shape, r_mask).expand(b, -1)
                        mid, post, _, _ = self.expression(ab, mask, style=style, identity=identity)
                    loss, _ = weighted_loss(
                        {"l1_mid": _masked_l1(mid, yb, mask), "l1_post": _masked_l1(post, yb, mask)}, weights
                    )
                    grads = torch.autograd.grad(loss, list(lora.values()))
                    for p, g in zip(lora.values(), grads, strict=True):
                        p.grad = g
                    opt.step()
                    losses.append(float(loss.detach()))
                    done += 1
            with torch.no_grad():
                adapted = {k: v.detach() for k, v in lora.items()}
                with adapter_values(self.expression, adapted):
                    style = self.expression.encode_style(r, r_mask)[0]
                    identity = self.expression.encode_identity(shape, r_mask)[0]
                pose = self._retrieve_pose(ref)
        elapsed = time.perf_counter() - t0
        return self._state(
            "adapted",
            ref,
            style,
            identity,
            pose,
            seed,
            molora=adapted,
            adapt_steps=done,
            adapt_seconds=float(elapsed),
            adapt_loss_first=losses[0] if losses else 0.0,
            adapt_loss_last=losses[-1] if losses else 0.0,
        )

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def resolve_style(self, style: StyleState | int | str | None) -> _Style:
        """What ``generate`` conditions on: None (mean tables, ``default_pose_identity``), a
        training identity (index or name) or an AdaMesh StyleState."""
        d, sd = self.config.d_model, self.config.shape_dim
        if style is None:
            s, ident = self._table_vectors(None)
            return _Style({}, s, ident, torch.zeros(sd), self.config.default_pose_identity, self.config.pose_seed)
        if isinstance(style, (int, np.integer, str)) and not isinstance(style, bool):
            k = self.facts.subject_index(style)
            s, ident = self._table_vectors(k)
            return _Style({}, s, ident, torch.zeros(sd), k, self.config.pose_seed)
        if not isinstance(style, dict):
            raise TypeError(
                f"style must be None, a training identity or an AdaMesh StyleState, got {type(style).__name__}"
            )
        state = self.check_style(style)
        if state.get("num_identities") != self.num_identities:
            raise StyleStateError(
                f"StyleState was made for {state.get('num_identities')} training identities, this model has "
                f"{self.num_identities}"
            )
        vectors = {}
        for key in ("style_vector", "identity_vector"):
            v = state.get(key)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (d,):
                raise StyleStateError(f"StyleState[{key!r}] must be a ({d},) tensor")
            vectors[key] = v.to(self.device, torch.float32)
        pid = state.get("pose_identity")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < self.num_identities:
            raise StyleStateError(f"StyleState['pose_identity'] must be an int in [0, {self.num_identities})")
        seed = state.get("seed", self.config.pose_seed)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise StyleStateError("StyleState['seed'] must be an int")
        params = self.adaptation_parameters()
        overrides: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.startswith("molora/"):
                continue
            name = key[len("molora/") :]
            if name not in params:
                raise StyleStateError(f"StyleState[{key!r}]: this model has no MoLoRA parameter {name!r}")
            if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
                raise StyleStateError(f"StyleState[{key!r}] must be a tensor of shape {tuple(params[name].shape)}")
            overrides[name] = value.to(self.device, params[name].dtype)
        if overrides and set(overrides) != set(params):
            raise StyleStateError(f"StyleState holds {len(overrides)} of the {len(params)} MoLoRA tensors")
        return _Style(overrides, vectors["style_vector"], vectors["identity_vector"], torch.zeros(sd), pid, seed)

    # ================================================================== inference
    @torch.no_grad()
    def generate(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None = None,
        *,
        head_pose_in_vertices: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Animate one utterance (§8): audio (S,) or (1, S) raw 16 kHz; template a FLAME shape
        beta (S,), a (V, 3) neutral mesh, or None (zero shape). Returns ``params`` (T, 53)
        (expression | jaw), ``head_pose`` (T, 3) and, when a face model is available,
        ``vertices`` (T, V, 3) (head rotation applied only with ``head_pose_in_vertices`` /
        ``vertices_head_pose``). Deterministic (PoseGPT samples with the style's seed)."""
        a = self.as_audio(audio)  # (1, S)
        t = self.frames_for_audio(a.shape[1])
        if t < 1:
            raise ValueError(f"audio too short: {a.shape[1]} samples give no motion frame")
        st = self.resolve_style(style)
        tmpl = self._template(template)
        ds = self.config.pose_downsample
        tp = -(-t // ds) * ds
        with self._eval_mode():
            both = self._audio_inputs(a, None, torch.tensor([tp]))  # (1, 2T', H + M)
            mask = torch.ones(1, t, dtype=torch.bool, device=self.device)
            with adapter_values(self.expression, st.overrides):
                _, post, _, _ = self.expression(
                    self._expression_audio(both[:, : 2 * t]),
                    mask,
                    style=st.style[None],
                    identity=None if st.identity is None else st.identity[None],
                    shape=st.shape.to(self.device)[None],
                )
            params = self._denorm_expr(post[0])  # (T, 53)
            gen = torch.Generator().manual_seed(int(st.seed))
            window = self.config.pose_window // ds  # codes
            codes = self.posegpt.sample(
                self.posegpt.audio_tokens(both),
                torch.tensor([st.pose_identity], device=self.device),
                gen,
                self.config.pose_sampling,
                self.config.pose_temperature,
                self.config.pose_top_k,
                context=window,
            )  # (1, T'/ds)
            head_pose = self._denorm_pose(self.pose_vq.decode_chunks(codes, window)[0, :t])  # (T, 3)
        out = {"params": params, "head_pose": head_pose}
        rot = self.config.vertices_head_pose if head_pose_in_vertices is None else head_pose_in_vertices
        verts = self._vertices(params, head_pose if rot else None, tmpl)
        if verts is not None:
            out["vertices"] = verts
        return out

    def _template(self, template: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        if template is None:
            return None
        t = torch.as_tensor(np.asarray(template) if not isinstance(template, torch.Tensor) else template)
        t = t.to(self.device, torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("template holds non-finite values")
        if t.ndim == 1 and t.numel() == self.config.shape_dim:
            return t
        if t.ndim == 1 and t.numel() % 3 == 0:
            t = t.reshape(-1, 3)
        if t.ndim == 2 and t.shape[1] == 3:
            return t
        raise ValueError(
            f"template must be a FLAME shape ({self.config.shape_dim},), a (V, 3) mesh or None, got {tuple(t.shape)}"
        )

    def _vertices(
        self, params: torch.Tensor, rot: torch.Tensor | None, tmpl: torch.Tensor | None
    ) -> torch.Tensor | None:
        layer = self.face_model()
        if layer is None:
            return None
        expr, jaw = params[:, :N_EXPRESSION], params[:, N_EXPRESSION:EXPR_DIM]
        if tmpl is None or tmpl.ndim == 1:
            if tmpl is not None and tmpl.numel() != layer.n_shape:
                raise ValueError(f"template: the face model takes a ({layer.n_shape},) shape, got {tmpl.numel()}")
            return layer(None if tmpl is None else tmpl[None], expr, jaw, global_rot=rot)  # (T, V, 3)
        if tmpl.shape[0] != layer.num_vertices:
            raise ValueError(f"template must be ({layer.num_vertices}, 3) for this face model, got {tuple(tmpl.shape)}")
        zero = params.new_zeros(1, N_EXPRESSION)
        neutral = layer(None, zero, params.new_zeros(1, 3))  # (1, V, 3)
        return tmpl[None] + layer(None, expr, jaw, global_rot=rot) - neutral
