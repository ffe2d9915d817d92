"""AdaMesh configuration: :class:`AdaMeshConfig` (the paper/decision values of
specs/adamesh.md §12) and its presets.

Paper, reference code and the numbered Deviations ("deviation N" below): the docstring of
``talkmesh.methods.adamesh.method``.

The config is grouped by the part of the model it sets: the top level holds the audio
front end, the schedule of the first stage (``expression``), the reference length and the
inference options; one frozen section per part holds the rest (``expression``, ``molora``,
``adaptation``, ``pose_vq``, ``posegpt``, ``pose_index``). Dotted overrides reach into the
sections: ``model.pose_vq.epochs=16``, ``model.molora.ranks=[1, 2]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from talkmesh.audio.encoders import AudioEncoderConfig
from talkmesh.methods.base import MethodConfig, StageSchedule

__all__ = [
    "STAGES",
    "AdaMeshConfig",
    "AdaMeshLossWeights",
    "LEGACY_KEYS",
    "AdaptationConfig",
    "ExpressionConfig",
    "MoLoRAConfig",
    "PoseGPTConfig",
    "PoseIndexConfig",
    "PoseVQConfig",
    "PoseVQLossWeights",
    "check_ranges",
]

# The training stages in order (README G3); ``pose_index`` is fitted, not trained.
STAGES: tuple[str, ...] = ("expression", "pose_vq", "posegpt", "pose_index")

AudioFeatures = Literal["hubert", "hubert+mel"]


def check_ranges(
    section: Any,
    *,
    positive_ints: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    positive: Iterable[str] = (),
    fractions: Iterable[str] = (),
) -> None:
    """Raise ValueError naming the first field of ``section`` (a config dataclass) that is
    outside its range: ``positive_ints`` >= 1, ``non_negative`` >= 0, ``positive`` > 0,
    ``fractions`` in [0, 1)."""
    for name in positive_ints:
        if getattr(section, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(section, name)}")
    for name in non_negative:
        if getattr(section, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(section, name)}")
    for name in positive:
        if not getattr(section, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(section, name)}")
    for name in fractions:
        if not 0.0 <= getattr(section, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(section, name)}")


# --------------------------------------------------------------------------------------
# Loss weights
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


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpressionConfig:
    """Expression adapter (§3): Conformer audio / style / identity encoders and decoder, postnet,
    and its pre-training loss (§5). Its schedule is the top-level ``lr`` / ``epochs`` / ..."""

    # Input features: HuBERT (paper) or HuBERT ⊕ log-mel (PoseGPT's input; the debug preset's
    # choice, deviation 13).
    audio: AudioFeatures = "hubert"
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

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=(
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
            ),
            positive=("style_seconds", "norm_min_std"),
            fractions=("dropout", "attention_dropout", "postnet_dropout"),
        )
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.heads} heads of even width")
        if self.conv_kernel % 2 == 0 or self.postnet_kernel % 2 == 0:
            raise ValueError("conv_kernel and postnet_kernel must be odd")


@dataclasses.dataclass(frozen=True)
class MoLoRAConfig:
    """MoLoRA (§4): one LoRA expert per rank, on the Conformer convolution modules' convs."""

    ranks: tuple[int, ...] = (1, 2, 4, 8)
    alpha: float | None = None  # None: s_i = 1; else s_i = alpha / r_i
    targets: tuple[str, ...] = ("pw1", "dw", "pw2")

    def __post_init__(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be a non-empty tuple of ranks >= 1, got {self.ranks}")
        bad = sorted(set(self.targets) - {"pw1", "dw", "pw2"})
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of ('pw1', 'dw', 'pw2'), got {bad or '()'}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive or null, got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class AdaptationConfig:
    """Few-shot adaptation of the MoLoRA parameters on a reference (§6, D6): AdamW. By
    default each step sees the whole reference (one crop at least as long as
    ``reference_seconds``) for 150 steps (deviation 16); D6's 4 random 4 s crops for 300
    steps are ``batch=4, crop_s=4.0, steps=300``."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    steps: int = 150  # at most
    batch: int = 1  # random crops per step
    crop_s: float = 10.0  # crop length (the whole reference when it is not longer)
    # lr over the steps: constant, or a cosine decay to zero at ``steps``.
    schedule: Literal["constant", "cosine"] = "constant"
    # Early stopping: the last ``holdout_s`` of the reference is not cropped from; its L1 is
    # measured before the first step and every ``eval_every`` steps, and adaptation stops after
    # ``patience`` measurements without a lower one, keeping the parameters of the lowest.
    # 0 turns it off (all steps, the last parameters). Off when the reference is shorter
    # than twice ``holdout_s``.
    holdout_s: float = 0.0
    eval_every: int = 10
    patience: int = 3
    max_seconds: float = 600.0  # wall-time bound of one adapt() call

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=("batch", "eval_every", "patience"),
            non_negative=("steps", "holdout_s"),
            positive=("lr", "crop_s", "max_seconds"),
        )
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class PoseVQConfig:
    """Pose VQ-VAE (§7.2, D8, D18) and the schedule of stage ``pose_vq``."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.1
    # Pose context in frames (multiple of downsample): pose training windows are cropped to it,
    # and inference runs the VQ-VAE on chunks of it and PoseGPT with a sliding context of
    # window / downsample codes (deviation 12). 128 = the spec's VQ windows.
    window: int = 128
    # Normalisation in the conv stages: CodeTalker's InstanceNorm ("instance"), BatchNorm
    # ("batch") or none (deviation 14).
    norm: Literal["instance", "batch", "none"] = "none"
    codebook_size: int = 256
    code_dim: int = 64
    downsample: int = 4  # a power of two: one stride-2 conv per factor 2
    beta: float = 0.25
    mode: Literal["straight_through", "ema"] = "straight_through"
    loss_weights: PoseVQLossWeights = dataclasses.field(default_factory=PoseVQLossWeights)
    lr: float = 1e-4
    epochs: int = 200
    batch_size: int = 32
    lr_step: int = 20  # StepLR step (epochs); 0 = constant
    lr_gamma: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=(
                "hidden",
                "layers",
                "heads",
                "ff",
                "codebook_size",
                "code_dim",
                "downsample",
                "epochs",
                "batch_size",
            ),
            non_negative=("lr_step",),
            positive=("lr", "lr_gamma"),
            fractions=("dropout",),
        )
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.downsample & (self.downsample - 1) or self.downsample < 2:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.window < self.downsample or self.window % self.downsample:
            raise ValueError(f"window={self.window} must be a positive multiple of downsample={self.downsample}")


@dataclasses.dataclass(frozen=True)
class PoseGPTConfig:
    """PoseGPT (§7.3, D10, D11), its sampling at inference and the schedule of stage ``posegpt``."""

    layers: int = 6
    d: int = 512
    heads: int = 8
    ff: int = 2048
    dropout: float = 0.1
    max_steps: int = 1024
    lr: float = 1e-4
    epochs: int = 100
    batch_size: int = 16
    sampling: Literal["sample", "greedy"] = "sample"
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0  # sampling seed when a StyleState does not carry one

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=("layers", "d", "heads", "ff", "max_steps", "epochs", "batch_size"),
            non_negative=("top_k", "seed"),
            positive=("lr", "temperature"),
            fractions=("dropout",),
        )
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class PoseIndexConfig:
    """Stage ``pose_index`` (§7.4, D12): k-means of the audio frames, pose-style matrices."""

    kmeans_k: int = 512
    kmeans_max_frames: int = 200000
    kmeans_iters: int = 50
    min_shared_clusters: int = 1
    # Features clustered: HuBERT (paper) or HuBERT ⊕ log-mel (debug, deviation 13).
    cluster_audio: AudioFeatures = "hubert"
    cache_features: bool = True  # whole-clip HuBERT features on disk (talkmesh.audio.cache)

    def __post_init__(self) -> None:
        check_ranges(
            self, positive_ints=("kmeans_k", "kmeans_max_frames", "kmeans_iters"), non_negative=("min_shared_clusters",)
        )


# --------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------


def _hubert() -> AudioEncoderConfig:
    return AudioEncoderConfig(kind="hubert", trainable_layers=0, freeze_feature_encoder=True, spec_augment=False)


# Flat keys of the config before it was grouped into sections (talkmesh up to stop 7) ->
# their dotted keys now; keys not listed kept their name. AdaMeshConfig.upgrade applies it
# to saved configs, so checkpoints and registered models from before keep loading.
LEGACY_KEYS: dict[str, str] = {
    "d_model": "expression.d_model",
    "heads": "expression.heads",
    "ffn": "expression.ffn",
    "conv_kernel": "expression.conv_kernel",
    "audio_blocks": "expression.audio_blocks",
    "decoder_blocks": "expression.decoder_blocks",
    "style_blocks": "expression.style_blocks",
    "identity_blocks": "expression.identity_blocks",
    "dropout": "expression.dropout",
    "attention_dropout": "expression.attention_dropout",
    "postnet_channels": "expression.postnet_channels",
    "postnet_kernel": "expression.postnet_kernel",
    "postnet_dropout": "expression.postnet_dropout",
    "shape_dim": "expression.shape_dim",
    "style_seconds": "expression.style_seconds",
    "norm_min_std": "expression.norm_min_std",
    "loss_weights": "expression.loss_weights",
    "pose_vq_hidden": "pose_vq.hidden",
    "pose_vq_layers": "pose_vq.layers",
    "pose_vq_heads": "pose_vq.heads",
    "pose_vq_ff": "pose_vq.ff",
    "pose_vq_dropout": "pose_vq.dropout",
    "pose_vq_norm": "pose_vq.norm",
    "pose_vq_beta": "pose_vq.beta",
    "pose_vq_mode": "pose_vq.mode",
    "pose_vq_loss_weights": "pose_vq.loss_weights",
    "pose_vq_lr": "pose_vq.lr",
    "pose_vq_epochs": "pose_vq.epochs",
    "pose_vq_batch_size": "pose_vq.batch_size",
    "pose_vq_lr_step": "pose_vq.lr_step",
    "pose_vq_lr_gamma": "pose_vq.lr_gamma",
    "posegpt_layers": "posegpt.layers",
    "posegpt_d": "posegpt.d",
    "posegpt_heads": "posegpt.heads",
    "posegpt_ff": "posegpt.ff",
    "posegpt_dropout": "posegpt.dropout",
    "posegpt_max_steps": "posegpt.max_steps",
    "posegpt_lr": "posegpt.lr",
    "posegpt_epochs": "posegpt.epochs",
    "posegpt_batch_size": "posegpt.batch_size",
    "molora_ranks": "molora.ranks",
    "molora_alpha": "molora.alpha",
    "molora_targets": "molora.targets",
    "adapt_lr": "adaptation.lr",
    "adapt_weight_decay": "adaptation.weight_decay",
    "adapt_steps": "adaptation.steps",
    "adapt_batch": "adaptation.batch",
    "adapt_crop_s": "adaptation.crop_s",
    "adapt_max_seconds": "adaptation.max_seconds",
    "pose_sampling": "posegpt.sampling",
    "pose_temperature": "posegpt.temperature",
    "pose_top_k": "posegpt.top_k",
    "pose_seed": "posegpt.seed",
    "pose_window": "pose_vq.window",
    "pose_codebook_size": "pose_vq.codebook_size",
    "pose_code_dim": "pose_vq.code_dim",
    "pose_downsample": "pose_vq.downsample",
    "expression_audio": "expression.audio",
    "pose_kmeans_k": "pose_index.kmeans_k",
    "pose_cluster_audio": "pose_index.cluster_audio",
    "kmeans_max_frames": "pose_index.kmeans_max_frames",
    "kmeans_iters": "pose_index.kmeans_iters",
    "min_shared_clusters": "pose_index.min_shared_clusters",
    "cache_features": "pose_index.cache_features",
}


@dataclasses.dataclass(frozen=True)
class AdaMeshConfig(MethodConfig):
    """AdaMesh hyper-parameters; class defaults are the paper/decision values (§12).
    Presets: :meth:`mead` (the defaults), :meth:`codetalker_vq` and :meth:`debug`.
    Weight decay is ``train.weight_decay`` (0.01 in the presets)."""

    PRESETS: ClassVar[tuple[str, ...]] = ("mead", "codetalker_vq", "debug")
    reads_face_model_file: ClassVar[bool] = True  # ``face_model``: vertices when served

    # ---- audio front end (§2, D17) ----
    audio_encoder: AudioEncoderConfig = dataclasses.field(default_factory=_hubert)  # frozen
    audio_alignment: Literal["auto", "trim", "interp"] = "auto"  # deviation 5
    mel_bins: int = 80  # log-mel bins of PoseGPT's input (and of the "hubert+mel" options)
    # Q6: files longer than hubert_chunk_after_s go through HuBERT in pieces of
    # hubert_chunk_frames frames (talkmesh.audio.chunks); shorter ones in one pass.
    hubert_chunk_frames: int = 1000
    hubert_chunk_after_s: float = 20.0
    # ---- stage "expression": pre-training schedule (§5, D14) ----
    lr: float = 1e-4
    epochs: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    lr_step: int = 5  # StepLR step (epochs); 0 = constant
    lr_gamma: float = 0.5
    # ---- the parts ----
    expression: ExpressionConfig = dataclasses.field(default_factory=ExpressionConfig)
    molora: MoLoRAConfig = dataclasses.field(default_factory=MoLoRAConfig)
    adaptation: AdaptationConfig = dataclasses.field(default_factory=AdaptationConfig)
    pose_vq: PoseVQConfig = dataclasses.field(default_factory=PoseVQConfig)
    posegpt: PoseGPTConfig = dataclasses.field(default_factory=PoseGPTConfig)
    pose_index: PoseIndexConfig = dataclasses.field(default_factory=PoseIndexConfig)
    # ---- style references and inference ----
    reference_seconds: float = 10.0  # reference length used by encode_style / adapt / evaluation
    default_pose_identity: int = 0
    vertices_head_pose: bool = False  # deviation 8
    face_model: str = ""  # FLAME file (.pkl/.npz) used for vertices when none is injected

    @classmethod
    def upgrade(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A saved config with the old flat keys (:data:`LEGACY_KEYS`) in the sectioned form;
        a config in today's form is returned unchanged."""
        out: dict[str, Any] = {}
        for key, value in saved.items():
            section, _, name = LEGACY_KEYS.get(key, key).partition(".")
            if name:
                out.setdefault(section, {})[name] = value
            else:
                out[section] = value
        return out

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=("mel_bins", "hubert_chunk_frames", "epochs", "batch_size", "grad_accum"),
            non_negative=("lr_step", "default_pose_identity"),
            positive=("lr", "lr_gamma", "reference_seconds", "hubert_chunk_after_s"),
        )
        if self.audio_encoder.trainable_layers != 0:
            raise ValueError("audio_encoder.trainable_layers must be 0: AdaMesh uses a frozen HuBERT (§2, D17)")
        if self.pose_vq.window // self.pose_vq.downsample > self.posegpt.max_steps:
            raise ValueError("pose_vq.window / pose_vq.downsample must not exceed posegpt.max_steps")

    # ---- per-stage schedules (MethodConfig hooks, deviation 6) ----
    def stage_schedule(self, stage: str) -> StageSchedule:
        """Epochs / batch size / lr of ``stage`` ("" = the first stage); gradient accumulation
        is ``grad_accum`` in every stage. ``pose_index`` is fitted once (one epoch, no optimiser)."""
        if stage in ("", "expression", "pose_index"):
            epochs = 1 if stage == "pose_index" else self.epochs
            return StageSchedule(epochs=epochs, batch_size=self.batch_size, lr=self.lr, grad_accum=self.grad_accum)
        if stage in ("pose_vq", "posegpt"):
            s = self.pose_vq if stage == "pose_vq" else self.posegpt
            return StageSchedule(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, grad_accum=self.grad_accum)
        raise ValueError(f"adamesh: unknown stage {stage!r}; stages: {list(STAGES)}")

    def lr_factor(self, stage: str, epoch: int) -> float:
        """StepLR: gamma ** (epoch // step) in stages ``expression`` and ``pose_vq`` (constant
        when the step is 0), constant in ``posegpt`` (deviation 6)."""
        steps = {
            "": (self.lr_step, self.lr_gamma),
            "expression": (self.lr_step, self.lr_gamma),
            "pose_vq": (self.pose_vq.lr_step, self.pose_vq.lr_gamma),
        }
        step, gamma = steps.get(stage, (0, 1.0))
        return float(gamma ** (epoch // step)) if step > 0 else 1.0

    def face_model_overrides(self, path: str) -> dict[str, Any]:
        """``{"face_model": path}`` when no face-model file is configured (the registered model
        then builds vertices when served), else none."""
        return {} if self.face_model else {"face_model": path}

    # ---- presets ----
    @classmethod
    def mead(cls) -> AdaMeshConfig:
        """MEAD-FLAME at paper sizes (the class defaults)."""
        return cls()

    @classmethod
    def codetalker_vq(cls) -> AdaMeshConfig:
        """As :meth:`mead` with CodeTalker's stage-1 VQ sizes (H 1024, 6 layers, 8 heads, FF 1536)."""
        return cls(pose_vq=PoseVQConfig(hidden=1024, layers=6, heads=8, ff=1536))

    @classmethod
    def debug(cls) -> AdaMeshConfig:
        """Tiny CPU model for tests (§12 debug column): d 32, one block per module, ranks
        (1, 2), a tiny random HuBERT (+ log-mel into the expression adapter and the pose
        clusters, deviation 13), a 16-code pose prior, a 2-layer PoseGPT, k = 8. Adaptation
        as the paper sizes (deviations 15, 16), bounded to 60 s."""
        return cls(
            audio_encoder=dataclasses.replace(_hubert(), tiny=True),
            mel_bins=16,
            lr=1e-3,
            epochs=2,
            batch_size=4,
            lr_step=0,
            expression=ExpressionConfig(
                audio="hubert+mel",
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
            ),
            molora=MoLoRAConfig(ranks=(1, 2)),
            adaptation=AdaptationConfig(max_seconds=60.0),
            pose_vq=PoseVQConfig(
                hidden=32,
                layers=1,
                heads=2,
                ff=64,
                dropout=0.0,
                window=48,
                codebook_size=16,
                code_dim=8,
                lr=1e-3,
                epochs=2,
                batch_size=4,
                lr_step=0,
            ),
            posegpt=PoseGPTConfig(layers=2, d=32, heads=2, ff=64, dropout=0.0, lr=1e-3, epochs=2, batch_size=4),
            pose_index=PoseIndexConfig(kmeans_k=8, kmeans_max_frames=5000, cluster_audio="hubert+mel"),
        )
