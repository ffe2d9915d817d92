"""DEEPTalk configuration: :class:`DEEPTalkConfig` (the defaults and decisions of
specs/deeptalk.md §11-§12) and its presets.

Paper, reference code and the numbered Deviations: the docstring of
``talkmesh.methods.deeptalk.method``.

The config is grouped by part, one frozen section per training stage: ``fer`` (the
expression-emotion MLP, §3.2), ``dee`` (the probabilistic emotion embedding, §4), ``vq``
(the TH-VQVAE motion prior, §5, and the lips-only reader of §6.3 trained beside it),
``generator`` (stages ``stage1`` and ``stage2``, §6) and ``sampling`` (inference, §7). The top
level holds what every part shares. Dotted overrides reach into the sections:
``model.vq.top_codes=512``, ``model.generator.loss_weights.emo=1e-3``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from talkmesh.audio.encoders import AudioEncoderConfig
from talkmesh.methods.adamesh.configuration import check_ranges
from talkmesh.methods.base import MethodConfig, StageSchedule

__all__ = [
    "EMOTE_EMOTIONS",
    "STAGES",
    "DEEConfig",
    "DEEPTalkConfig",
    "FERConfig",
    "GeneratorConfig",
    "GeneratorLossWeights",
    "ReaderConfig",
    "SamplingConfig",
    "VQConfig",
]

# The training stages in order (§1: four phases, the generator's in two stages).
STAGES: tuple[str, ...] = ("fer", "dee", "vq", "stage1", "stage2")

# The 0-based EMOTE emotion order (datasets.md §5.2): the codes a clip's ``emotion`` holds.
EMOTE_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprised", "fear", "disgusted", "angry", "contempt")


def _wav2vec2(trainable_layers: int) -> AudioEncoderConfig:
    return AudioEncoderConfig(kind="wav2vec2", trainable_layers=trainable_layers, spec_augment=False)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FERConfig:
    """Stage ``fer``: the per-frame expression-emotion MLP (§3.2, D1). 53 -> hidden... ->
    n_emotions; each hidden block is Linear -> BatchNorm1d -> LeakyReLU -> Dropout. The
    feature is the eval-mode output of block ``feature_block`` after its BatchNorm, before the
    LeakyReLU (-2: the 128-unit block of the paper sizes)."""

    hidden: tuple[int, ...] = (256, 512, 1024, 512, 256, 128, 64)
    feature_block: int = -2
    dropout: float = 0.3
    lr: float = 1e-3
    lr_min: float = 1e-6  # cosine annealing floor
    # The reference's length is a step budget (12,000 updates of 4096 frames); the shared
    # loop counts epochs of windows, so it is set in epochs (deviation 2).
    epochs: int = 40
    batch_size: int = 64  # windows (x 50 frames: about the reference's 4096 frames)
    aug_prob: float = 0.5  # per sample: add noise ...
    aug_fraction: float = 0.7  # ... to this fraction of the 53 parameters ...
    aug_std: float = 0.02  # ... with this std

    def __post_init__(self) -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"fer.hidden must be non-empty positive widths, got {self.hidden}")
        if not -len(self.hidden) <= self.feature_block < len(self.hidden):
            raise ValueError(f"fer.feature_block={self.feature_block} is not a block of {self.hidden}")
        check_ranges(
            self,
            positive_ints=("epochs", "batch_size"),
            positive=("lr", "lr_min", "aug_std"),
            fractions=("dropout",),
        )
        if not (0.0 <= self.aug_prob <= 1.0 and 0.0 <= self.aug_fraction <= 1.0):
            raise ValueError("fer.aug_prob and fer.aug_fraction must lie in [0, 1]")

    @property
    def feature_dim(self) -> int:
        return self.hidden[self.feature_block]


@dataclasses.dataclass(frozen=True)
class DEEConfig:
    """Stage ``dee``: the probabilistic joint audio/expression emotion embedding (§4)."""

    # The audio backbone (§4.2, D2): wav2vec2-base-960h, top 2 layers trainable, no SpecAugment.
    audio_encoder: AudioEncoderConfig = dataclasses.field(default_factory=lambda: _wav2vec2(2))
    audio_d: int = 768  # trunk width (a Linear maps the encoder's hidden size to it when they differ)
    # Project option (deviation 10): log-mel bins concatenated to the encoder's frames (0 = off,
    # the paper). A frozen random tiny encoder carries little prosody; the tests' setting uses it.
    audio_mel_bins: int = 0
    audio_trunk_layers: int = 2
    exp_layers: int = 6
    exp_d: int = 512
    heads: int = 8
    ff: int = 2048
    dropout: float = 0.1
    embed_dim: int = 128
    gpo_d: int = 32
    gpo_temperature: float = 0.1
    loss: Literal["csd"] = "csd"  # the released DEE's loss (the MC soft-contrastive one is unused, §4.4)
    match: Literal["label", "identity"] = "label"  # D8 / Q15
    vib_weight: float = 1e-6
    vib_skip: float = 1e4  # the VIB term is skipped when it exceeds this (§4.4)
    alpha_init: float = 5.0  # "negative_scale"
    beta_init: float = 5.0  # "shift"
    window_s: float = 2.0  # audio crop (s)
    exp_window_frames: int = 50  # D9 / Q10 (60 reproduces the reference)
    max_seconds: float = 10.0  # Q7: the emotion vector reads at most the first 10 s
    lr: float = 1e-4
    lr_min: float = 1e-6
    epochs: int = 300
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=(
                "audio_d", "audio_trunk_layers", "exp_layers", "exp_d", "heads", "ff", "embed_dim", "gpo_d",
                "exp_window_frames", "epochs", "batch_size",
            ),
            non_negative=("vib_weight", "audio_mel_bins"),
            positive=("gpo_temperature", "vib_skip", "alpha_init", "window_s", "max_seconds", "lr", "lr_min"),
            fractions=("dropout",),
        )
        if self.audio_d % self.heads or self.exp_d % self.heads:
            raise ValueError(f"dee.audio_d={self.audio_d} and dee.exp_d={self.exp_d} must be divisible by heads")
        if self.loss != "csd":
            raise ValueError(f'dee.loss must be "csd", got {self.loss!r}')
        if self.match not in ("label", "identity"):
            raise ValueError(f'dee.match must be "label" or "identity", got {self.match!r}')
        if self.audio_encoder.trainable_layers == -1 or self.audio_encoder.spec_augment:
            raise ValueError("dee.audio_encoder: set trainable_layers >= 0 (the top k train) and spec_augment=False")


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """The lips-only lip reader (dualtalker.md §4.1, ``reader_full_face=False``) of the
    lip-reading perceptual loss (§6.3, D3). Trained in stage ``vq`` on the ground-truth
    motion with the feature-regression target (the frozen content encoder's features at the
    motion rate), frozen after it."""

    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1
    feat_loss: Literal["cos", "mse"] = "cos"
    weight: float = 1.0  # of the reader's loss next to the TH-VQVAE loss in stage ``vq``

    def __post_init__(self) -> None:
        check_ranges(self, positive_ints=("d_model", "layers", "heads", "ff_mult"), non_negative=("weight",),
                     fractions=("dropout",))
        if self.d_model % self.heads:
            raise ValueError(f"reader.d_model={self.d_model} must be divisible by reader.heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Stage ``vq``: the TH-VQVAE (§5). The encoder width is ``top_dim``; the bottom
    quantiser reads concat[d_t, e_b], so ``bottom_dim`` = 2 x ``top_dim``."""

    top_codes: int = 256
    top_dim: int = 128
    bottom_codes: int = 256
    bottom_dim: int = 256
    heads: int = 8
    ff: int = 256  # encoder / top-decoder transformer FF
    decoder_ff: int = 512  # bottom-decoder transformer FF
    kernel: int = 5
    dropout: float = 0.1
    beta: float = 0.25  # commitment
    decay: float = 0.95
    eps: float = 1e-5
    reference_ema_quirk: bool = False  # Q11
    rec_weight: float = 1e6  # on the vertex MSE
    commit_weight: float = 1.0
    lr: float = 5e-4  # AdamW
    # Linear warm-up; the reference warms up over 4000 steps (deviation 3: in epochs).
    warmup_epochs: int = 46
    epochs: int = 1500
    batch_size: int = 256
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=("top_codes", "top_dim", "bottom_codes", "bottom_dim", "heads", "ff", "decoder_ff",
                           "kernel", "epochs", "batch_size"),
            non_negative=("warmup_epochs", "commit_weight", "beta"),
            positive=("eps", "rec_weight", "lr"),
            fractions=("dropout",),
        )
        if min(self.top_codes, self.bottom_codes) < 2:
            raise ValueError("vq.top_codes and vq.bottom_codes must be >= 2")
        if self.bottom_dim != 2 * self.top_dim:
            raise ValueError(f"vq.bottom_dim must be 2 x vq.top_dim (concat[d_t, e_b]), got {self.bottom_dim}")
        if self.top_dim % self.heads or (self.top_dim + self.bottom_dim) % self.heads:
            raise ValueError("vq.top_dim and vq.top_dim + vq.bottom_dim must be divisible by vq.heads")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"vq.decay must lie in (0, 1), got {self.decay}")
        if self.kernel % 2 == 0:
            raise ValueError(f"vq.kernel must be odd, got {self.kernel}")


@dataclasses.dataclass(frozen=True)
class GeneratorLossWeights:
    """Stages ``stage1`` / ``stage2`` (§6.2). ``lip``, ``swap_emo`` and ``swap_lip`` apply in
    stage 2 only (stage 1 is L_rec + λ_emo L_emo)."""

    rec: float = 1.0
    emo: float = 1e-4  # λ_emo
    lip: float = 1e-3  # λ_lip (D3)
    swap_emo: float = 2.5e-5  # λ_swap on L_emo(partner's audio, swapped output) (D4)
    swap_lip: float = 1e-3  # λ_lip on the swapped output's lip term (Q17)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """The generator (§6.1) and its two training stages (§6.4)."""

    # Content audio: wav2vec2-base-960h, fully frozen (§6.1, README G6).
    content_encoder: AudioEncoderConfig = dataclasses.field(default_factory=lambda: _wav2vec2(0))
    d: int = 128  # audio / style / face-feature width
    face_heads: int = 8
    face_ff: int = 256
    face_period: int = 25
    predictor_d: int = 256  # the reference ties it to the codebook size (§6.1 item 4)
    predictor_layers: int = 6
    predictor_heads: int = 8
    predictor_ff: int = 256
    dropout: float = 0.1
    emo_loss: Literal["csd", "mean"] = "csd"  # D5
    use_swap: bool = True  # D4
    reference_swap_lip_pairing: bool = False  # Q17
    reference_dee_train_mode: bool = False  # Q18
    tau_start: float = 2.0
    tau_end: float = 0.1
    loss_weights: GeneratorLossWeights = dataclasses.field(default_factory=GeneratorLossWeights)
    lr: float = 1e-4
    batch_size: int = 16
    stage1_epochs: int = 100  # D6 (the best epoch on val/lve is kept; no early stop, deviation 4)
    stage2_epochs: int = 3
    lr_step: int = 50  # StepLR(50, 0.5) in stage 1
    lr_gamma: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive_ints=("d", "face_heads", "face_ff", "face_period", "predictor_d", "predictor_layers",
                           "predictor_heads", "predictor_ff", "batch_size", "stage1_epochs", "stage2_epochs"),
            non_negative=("lr_step",),
            positive=("tau_start", "tau_end", "lr", "lr_gamma"),
            fractions=("dropout",),
        )
        if (2 * self.d) % self.face_heads or self.predictor_d % self.predictor_heads:
            raise ValueError("2 x generator.d and generator.predictor_d must be divisible by their head counts")
        if self.emo_loss not in ("csd", "mean"):
            raise ValueError(f'generator.emo_loss must be "csd" or "mean", got {self.emo_loss!r}')
        if self.content_encoder.trainable_layers != 0:
            raise ValueError("generator.content_encoder.trainable_layers must be 0 (frozen wav2vec 2.0, §6.1)")
        for name, w in dataclasses.asdict(self.loss_weights).items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"generator.loss_weights.{name} must be finite and >= 0, got {w}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Inference defaults (§7, D7): argmax unless ``sample``; in sampling mode the code
    temperatures and the log-variance scale c (c < 1 widens the emotion spread)."""

    temp_top: float = 0.1
    temp_bottom: float = 0.1
    logvar_scale: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("temp_top", "temp_bottom"), non_negative=("logvar_scale",))


# --------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DEEPTalkConfig(MethodConfig):
    """DEEPTalk hyper-parameters (§11): class defaults are the paper / decision values on
    MEAD-FLAME. Presets :meth:`mead` (the defaults) and :meth:`debug` (§11 debug column).
    Every stage's schedule lives in its section; the top-level schedule fields mirror the
    first stage (``fer``) and are not read."""

    PRESETS: ClassVar[tuple[str, ...]] = ("mead", "debug")
    reads_face_model_file: ClassVar[bool] = True  # every loss is on FLAME vertices (§2)

    # The EMOTE codes the emotion classifier predicts, in output order: all 8 on MEAD, the
    # synthetic corpus's 4 (neutral, happy, sad, angry) in the debug preset. A clip whose
    # code is not listed is an error (Q20), never silently dropped.
    emotion_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    window_frames: int = 32  # TH-VQVAE and generator windows (1.28 s at 25 fps)
    default_actor: int = 0  # D11
    reference_seconds: float = 10.0  # of a style reference (and the DEE's 10 s cap)
    face_model: str = ""  # FLAME file for V(.) when none is injected (D15)
    lip_indices: tuple[int, ...] = ()  # the reader's lip vertices; () = the corpus's lip region
    fer: FERConfig = dataclasses.field(default_factory=FERConfig)
    dee: DEEConfig = dataclasses.field(default_factory=DEEConfig)
    vq: VQConfig = dataclasses.field(default_factory=VQConfig)
    generator: GeneratorConfig = dataclasses.field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    lr: float = 1e-3
    epochs: int = 40
    batch_size: int = 64
    grad_accum: int = 1

    def __post_init__(self) -> None:
        codes = self.emotion_classes
        if len(codes) < 2 or len(set(codes)) != len(codes) or min(codes) < 0 or max(codes) >= len(EMOTE_EMOTIONS):
            raise ValueError(f"emotion_classes must be >= 2 distinct EMOTE codes in [0, 8), got {codes}")
        check_ranges(self, positive_ints=("window_frames", "grad_accum"), non_negative=("default_actor",),
                     positive=("reference_seconds",))
        if self.window_frames % 4:
            raise ValueError(f"window_frames must be a multiple of 4 (T/4 top tokens), got {self.window_frames}")
        if any(i < 0 for i in self.lip_indices):
            raise ValueError("lip_indices must be >= 0")

    @property
    def n_emotions(self) -> int:
        return len(self.emotion_classes)

    # ---- per-stage schedules (MethodConfig hooks) ----
    def stage_schedule(self, stage: str) -> StageSchedule:
        """Each stage's epochs / batch size / lr from its section (§3.2, §4.5, §5, §6.4)."""
        g = self.generator
        table = {
            "": (self.fer.epochs, self.fer.batch_size, self.fer.lr),
            "fer": (self.fer.epochs, self.fer.batch_size, self.fer.lr),
            "dee": (self.dee.epochs, self.dee.batch_size, self.dee.lr),
            "vq": (self.vq.epochs, self.vq.batch_size, self.vq.lr),
            "stage1": (g.stage1_epochs, g.batch_size, g.lr),
            "stage2": (g.stage2_epochs, g.batch_size, g.lr),
        }
        if stage not in table:
            raise ValueError(f"deeptalk: unknown stage {stage!r}; stages: {list(STAGES)}")
        epochs, batch, lr = table[stage]
        return StageSchedule(epochs=epochs, batch_size=batch, lr=lr, grad_accum=self.grad_accum)

    def lr_factor(self, stage: str, epoch: int) -> float:
        """fer / dee: cosine annealing to ``lr_min`` over the stage's epochs; vq: linear
        warm-up over ``warmup_epochs`` then constant; stage1: StepLR(lr_step, lr_gamma);
        stage2: constant."""
        e = max(0, int(epoch))
        if stage in ("", "fer", "dee"):
            s = self.fer if stage in ("", "fer") else self.dee
            ratio = s.lr_min / s.lr
            return float(ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * min(e, s.epochs) / s.epochs)))
        if stage == "vq":
            w = self.vq.warmup_epochs
            return 1.0 if w == 0 else float(min(1.0, (e + 1) / w))
        if stage == "stage1" and self.generator.lr_step > 0:
            return float(self.generator.lr_gamma ** (e // self.generator.lr_step))
        return 1.0

    def build_optimizer(
        self, params: Sequence[torch.nn.Parameter], *, stage: str, lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """Adam (fer, dee, stage1, stage2) and AdamW (vq), as the reference (§3.2, §4.5, §5,
        §6.4); ``train.weight_decay`` is passed to both (0 = none)."""
        if stage == "vq":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def face_model_overrides(self, path: str) -> dict[str, str]:
        """``{"face_model": path}`` when no face-model file is configured, else none."""
        return {} if self.face_model else {"face_model": path}

    # ---- presets ----
    @classmethod
    def mead(cls) -> DEEPTalkConfig:
        """MEAD-FLAME at the paper sizes (the class defaults)."""
        return cls()

    @classmethod
    def debug(cls) -> DEEPTalkConfig:
        """Tiny CPU model (§11 debug column): the synthetic corpus's 4 emotions, 16-frame
        windows, tiny random wav2vec2 encoders, 16-code codebooks."""
        tiny = dataclasses.replace(_wav2vec2(1), tiny=True)
        return cls(
            emotion_classes=(0, 1, 2, 6),
            window_frames=16,
            fer=FERConfig(hidden=(32, 32, 16), feature_block=-1, dropout=0.1, epochs=3, batch_size=16),
            dee=DEEConfig(
                audio_encoder=tiny, audio_d=32, audio_trunk_layers=1, exp_layers=1, exp_d=32, heads=2, ff=64,
                embed_dim=16, gpo_d=8, window_s=0.64, exp_window_frames=16, lr=1e-3, epochs=3, batch_size=16,
            ),
            vq=VQConfig(
                top_codes=16, top_dim=16, bottom_codes=16, bottom_dim=32, heads=2, ff=32, decoder_ff=64,
                lr=1e-3, warmup_epochs=1, epochs=3, batch_size=16,
                reader=ReaderConfig(d_model=32, layers=1, heads=2, dropout=0.0),
            ),
            generator=GeneratorConfig(
                content_encoder=dataclasses.replace(_wav2vec2(0), tiny=True, seed=1),
                d=16, face_heads=2, face_ff=32, predictor_d=32, predictor_layers=1, predictor_heads=2,
                predictor_ff=32, lr=1e-3, batch_size=4, stage1_epochs=2, stage2_epochs=1, lr_step=0,
            ),
            lr=1e-3, epochs=3, batch_size=16,
        )
