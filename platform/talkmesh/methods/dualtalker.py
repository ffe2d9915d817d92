"""DualTalker: speech-driven 3D facial animation trained jointly with its dual task, lip reading.

Paper: Guinan Su, Yanwu Yang, Zhifeng Li, "DualTalker: A Cross-Modal Dual Learning Approach
for Speech-Driven 3D Facial Animation", arXiv:2311.04766.
Specification: specs/dualtalker.md (section numbers below refer to it).

**This is a RECONSTRUCTION, not the authors' method.** The authors released no code and
the paper's method and experiment sections were not available; only the abstract is. Every
architectural choice below is a project DECISION (spec §4, §5, §10), built from the
abstract and from the closest open design (SelfTalk). Re-check it against the paper body
when that is available; where the paper differs, the paper wins.

The model (§4):
  * Primary task, speech -> motion: a FaceFormer generator, reused by inheritance from
    :class:`talkmesh.methods.faceformer.FaceFormer` (§4.3): the shared ``AudioEncoder``
    (CNN frozen, features interpolated to the motion frames before the transformer), a
    one-hot style, PPE, the ALiBi-biased causal decoder with a diagonal alignment mask
    (D1: every dataset, BIWI included), a zero-initialised output layer plus the template.
  * Dual task, motion -> speech: a :class:`LipReader` over vertex offsets. Its full-face
    stream is the generator's own motion input embedding (shared, U5), its lip stream a
    linear map of the lip vertices; the two are summed, given a temporal sinusoidal PE and
    a bidirectional transformer encoder, giving the motion latents r. Heads: the audio
    encoder's frame features h (no transcripts needed, U1a) and CTC characters after a x2
    temporal upsampling (where transcripts exist, U1b).
  * Consistency (U2): frame-aligned InfoNCE between audio latents g_a(a) and motion
    latents g_m(r), plus cosine agreement, with a learnable temperature.
  * The "dual regulariser" (U6): the feature and CTC terms on the reader's reading of the
    *predicted* motion, with the reader's (and g_m's) parameters excluded from those terms'
    gradient; the gradient still flows through the reader's input into the generator.

Losses (§5): rec, lip_rec, vel (generator); feat_gt, ctc_gt, nce_gt (reader, heads,
shared embedding, audio encoder); feat_pred, ctc_pred, nce_pred, cos_pred (generator only),
the ``_pred`` weights ramped linearly from 0 over ``dual_ramp_epochs``. A run whose seven
auxiliary weights are all 0 (the rec-only ablation) skips the reader entirely.

Inference and style (§7) are FaceFormer's: autoregressive decoding; ``encode_style(subject=k)``
is a one-hot, ``adapt`` selects the training one-hot that best reconstructs the reference
(optionally refining a free style vector); unseen subjects follow the one-hot protocol.
:meth:`DualTalker.lip_read` exposes the reader (full-face, or lips only with
``reader_full_face=False``), which DEEPTalk reuses as its lip-reading perceptual model.

Project decisions the spec leaves open:
  1. The reader divides its input offsets by the RMS of the training motion (full face and
     lips, fitted in :meth:`DualTalker.fit_stage`, stored as a buffer): metre-scale offsets
     are ~1e-3, so an unscaled reader sees almost nothing but its positional encoding and
     needs thousands of steps before InfoNCE or CTC leave chance. The shared embedding thus
     reads unscaled offsets in the generator and scaled ones in the reader.
  2. Transcripts are tokenised with ``vocabulary`` (default: the wav2vec2-base-960h
     character set, blank = ``<pad>`` = 0); a windowed training clip carries no transcript
     (the loader drops it), so the CTC terms need whole sequences.
  3. ``lip_indices`` empty means the corpus's lip region (``DataFacts.lip_indices``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.encoders import AudioEncoderConfig
from talkmesh.methods.base import Batch, DataFacts, LossWeights, masked_mse, weighted_loss
from talkmesh.methods.faceformer import EncodedBatch, FaceFormer, FaceFormerConfig
from talkmesh.nn.motion_encoder import sinusoidal_encoding

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.dataset import ClipDataset

__all__ = [
    "AUX_TERMS",
    "PRED_TERMS",
    "WAV2VEC2_VOCABULARY",
    "DualTalker",
    "DualTalkerConfig",
    "DualTalkerLossWeights",
    "LipReader",
    "LipReading",
    "ctc_greedy_decode",
    "frame_infonce",
    "infonce_exclusion_mask",
]

log = logging.getLogger(__name__)

# The wav2vec2-base-960h character vocabulary (32 tokens, index = token id; blank = <pad> = 0,
# "|" the word delimiter).
WAV2VEC2_VOCABULARY: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>", "|",
    "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K",
    "'", "X", "J", "Q", "Z",
)  # fmt: skip

# The reader's terms (§5): a run whose weights for all of them are 0 never runs the reader.
AUX_TERMS = ("feat_gt", "ctc_gt", "nce_gt", "feat_pred", "ctc_pred", "nce_pred", "cos_pred")
# The terms on predicted motion, ramped in over ``dual_ramp_epochs``.
PRED_TERMS = ("feat_pred", "ctc_pred", "nce_pred", "cos_pred")


# --------------------------------------------------------------------------------------
# Config (§9)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DualTalkerLossWeights(LossWeights):
    """Loss weights (§5). ``rec`` at 1000 puts the auxiliary weights on SelfTalk's scale."""

    rec: float = 1000.0
    lip_rec: float = 0.0
    vel: float = 0.0
    feat_gt: float = 1e-3
    ctc_gt: float = 1e-4
    nce_gt: float = 1e-4
    feat_pred: float = 1e-3
    ctc_pred: float = 1e-4
    nce_pred: float = 1e-4
    cos_pred: float = 1e-4


@dataclasses.dataclass(frozen=True)
class DualTalkerConfig(FaceFormerConfig):
    """DualTalker hyper-parameters (§9). The class defaults are the VOCASET setting; presets
    :meth:`vocaset`, :meth:`biwi`, :meth:`flame25` (MEAD / 3D-HDTF vertices), :meth:`debug`.
    The generator fields are FaceFormer's (:class:`FaceFormerConfig`), with d = 128 (U4)
    and the diagonal ("interp") alignment only (D1)."""

    d_model: int = 128
    loss_weights: DualTalkerLossWeights = dataclasses.field(default_factory=DualTalkerLossWeights)  # type: ignore[assignment]
    # ---- lip reader (§4.1) ----
    reader_layers: int = 4
    reader_heads: int = 4
    reader_ff_mult: int = 2
    reader_dropout: float = 0.1
    reader_full_face: bool = True  # False: lips-only reader (DEEPTalk's perceptual model)
    share_motion_embedding: bool = True  # the reader's full-face stream is the generator's embedding
    lip_indices: tuple[int, ...] = ()  # () = the corpus's lip region (DataFacts.lip_indices)
    feat_loss: Literal["cos", "mse"] = "cos"
    # ---- CTC (U12): token i = vocabulary[i], blank = token 0 ----
    vocabulary: tuple[str, ...] = WAV2VEC2_VOCABULARY
    word_delimiter: str = "|"  # spaces in a transcript become this token
    unknown_token: str = "<unk>"  # characters outside the vocabulary (dropped if not in it)
    uppercase_text: bool = True
    ctc_upsample: int = 2
    # ---- consistency (§5) ----
    proj_dim: int = 128
    nce_exclude_radius: int = 2  # in-sequence pairs with 0 < |dt| <= radius are not negatives
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0  # exp(logit_scale) is clamped at this
    dual_ramp_epochs: int = 10  # the _pred weights ramp 0 -> 1 over these epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alignment != "interp":
            raise ValueError(f'DualTalker aligns audio and motion frame by frame: alignment must be "interp" (D1), '
                             f"got {self.alignment!r}")
        for name in ("reader_layers", "reader_heads", "reader_ff_mult", "ctc_upsample", "proj_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.reader_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by reader_heads={self.reader_heads}")
        if not 0.0 <= self.reader_dropout < 1.0:
            raise ValueError(f"reader_dropout must lie in [0, 1), got {self.reader_dropout}")
        if self.nce_exclude_radius < 0 or self.dual_ramp_epochs < 0:
            raise ValueError("nce_exclude_radius and dual_ramp_epochs must be >= 0")
        if not self.logit_scale_max > 0 or not math.isfinite(self.logit_scale_init):
            raise ValueError("logit_scale_max must be positive and logit_scale_init finite")
        if self.feat_loss not in ("cos", "mse"):
            raise ValueError(f'feat_loss must be "cos" or "mse", got {self.feat_loss!r}')
        if len(self.vocabulary) < 2 or len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("vocabulary needs a blank (token 0) and at least one unique token")
        if any(i < 0 for i in self.lip_indices) or len(set(self.lip_indices)) != len(self.lip_indices):
            raise ValueError("lip_indices must be unique non-negative vertex indices")

    @property
    def n_tokens(self) -> int:
        """CTC classes, the blank included."""
        return len(self.vocabulary)

    # ---- presets (FaceFormerConfig.PRESETS: vocaset, biwi, flame25, debug) ----
    @classmethod
    def vocaset(cls) -> DualTalkerConfig:
        """VOCASET (30 fps, FLAME lips): d 128, PPE period 30, reader 4 x 4 heads, FF 2d."""
        return cls()

    @classmethod
    def biwi(cls) -> DualTalkerConfig:
        """BIWI (25 fps, lve.txt lips): d 128, PPE period 25, diagonal alignment (D1)."""
        return cls(period=25)

    @classmethod
    def flame25(cls) -> DualTalkerConfig:
        """25 fps FLAME-vertex corpora (MEAD, 3D-HDTF): as :meth:`biwi`."""
        return cls(period=25)

    @classmethod
    def debug(cls) -> DualTalkerConfig:
        """Tiny CPU model for tests (§9 debug column): d 16, 1 reader layer of 2 heads,
        8 CTC tokens, proj 16, radius 1, a 1-epoch ramp, teacher forcing, tiny wav2vec2."""
        return cls(
            d_model=16,
            period=25,
            n_heads=2,
            ff_mult=2,
            n_layers=1,
            dropout=0.0,
            audio_encoder=AudioEncoderConfig(kind="wav2vec2", tiny=True, spec_augment=False),
            teacher_forcing=True,
            lr=1e-3,
            epochs=2,
            batch_size=2,
            adapt_steps=20,
            reader_layers=1,
            reader_heads=2,
            reader_dropout=0.0,
            vocabulary=("<pad>", "<unk>", "|", "A", "E", "I", "O", "U"),
            proj_dim=16,
            nce_exclude_radius=1,
            dual_ramp_epochs=1,
        )


# --------------------------------------------------------------------------------------
# Loss helpers (§5)
# --------------------------------------------------------------------------------------


def infonce_exclusion_mask(batch_index: torch.Tensor, time_index: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, N) True where a pair of pooled frames must not serve as a negative: the same
    sequence (``batch_index`` (N,)) and 0 < |t_i - t_j| <= ``radius`` (``time_index`` (N,))."""
    same = batch_index[:, None] == batch_index[None, :]  # (N, N)
    dt = (time_index[:, None] - time_index[None, :]).abs()  # (N, N)
    return same & (dt > 0) & (dt <= radius)


def frame_infonce(
    u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor | float, radius: int
) -> torch.Tensor:
    """Symmetric frame-aligned InfoNCE (§5). u, v: (B, T, k) unit vectors; valid (B, T).
    The valid frames of the batch are pooled into N pairs (u_i, v_i); logits = scale u_i.v_j,
    with the in-sequence neighbours within ``radius`` masked out; the loss is the mean of
    the cross-entropies of rows and columns against the diagonal."""
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # (N,), (N,)
    uu, vv = u[b_idx, t_idx], v[b_idx, t_idx]  # (N, k)
    logits = scale * uu @ vv.T  # (N, N)
    logits = logits.masked_fill(infonce_exclusion_mask(b_idx, t_idx, radius), float("-inf"))
    target = torch.arange(uu.shape[0], device=uu.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def masked_frame_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of per-frame values (B, T) over the valid frames (B, T) -> scalar."""
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """``cos``: <1 - cos(pred_t, target_t)>_t; ``mse``: the mean squared error per frame,
    averaged over the valid frames. pred, target (B, T, H); valid (B, T)."""
    if kind == "cos":
        per_frame = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)  # (B, T)
    else:
        per_frame = ((pred - target) ** 2).mean(dim=-1)  # (B, T)
    return masked_frame_mean(per_frame, valid)


def ctc_greedy_decode(log_probs: torch.Tensor, blank: int = 0) -> list[int]:
    """Best-path decoding of (T, C) log-probabilities: argmax, merge repeats, drop blanks."""
    best = log_probs.argmax(dim=-1).tolist()
    out, prev = [], None
    for k in best:
        if k != prev and k != blank:
            out.append(int(k))
        prev = k
    return out


# --------------------------------------------------------------------------------------
# The lip reader (dual task; §4.1)
# --------------------------------------------------------------------------------------


class LipReading(NamedTuple):
    """What the reader gives for a motion sequence."""

    latents: torch.Tensor  # (B, T, d) motion latents r
    features: torch.Tensor  # (B, T, H) predicted audio-encoder features
    log_probs: torch.Tensor  # (B, up * T, n_tokens) CTC log-probabilities


class LipReader(nn.Module):
    """Motion -> speech: vertex offsets to motion latents r, predicted audio features and CTC
    log-probabilities. ``full_face``: the full-face stream (``motion_embedding``, shared with
    the generator when given, else its own Linear(3V -> d)) is added to the lip stream;
    without it the reader reads lips only and also accepts offsets of the lip vertices alone."""

    def __init__(
        self,
        *,
        num_vertices: int,
        lip_indices: Sequence[int],
        d_model: int,
        layers: int,
        heads: int,
        ff_mult: int,
        dropout: float,
        feature_dim: int,
        n_tokens: int,
        ctc_upsample: int,
        full_face: bool,
        motion_embedding: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        lips = sorted({int(i) for i in lip_indices})
        if not lips or lips[0] < 0 or lips[-1] >= num_vertices:
            raise ValueError(f"the lip reader needs lip vertex indices within [0, {num_vertices}), got {len(lips)}")
        self.num_vertices = num_vertices
        self.num_lips = len(lips)
        self.d_model = d_model
        self.full_face = full_face
        self.ctc_upsample = ctc_upsample
        self.register_buffer("lip_index", torch.tensor(lips, dtype=torch.long), persistent=False)
        # RMS of training offsets (full face, lips); the streams read offsets / scale.
        self.register_buffer("input_scale", torch.ones(2))
        self.full_embedding = (motion_embedding or nn.Linear(3 * num_vertices, d_model)) if full_face else None
        self.lip_embedding = nn.Linear(3 * self.num_lips, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ff_mult * d_model, dropout, activation="relu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.feature_head = nn.Linear(d_model, feature_dim)  # W_f
        self.ctc_head = nn.Linear(d_model, n_tokens)  # W_c

    def _streams(self, offsets: torch.Tensor) -> torch.Tensor:
        """Offsets (B, T, N, 3) or (B, T, 3N), N = V (or the lip count for a lips-only
        reader) -> the summed input streams (B, T, d)."""
        b, t = offsets.shape[:2]
        x = offsets.reshape(b, t, -1, 3) if offsets.ndim == 3 else offsets  # (B, T, N, 3)
        n = x.shape[2]
        if n == self.num_vertices:
            lips = x[:, :, self.lip_index]  # (B, T, L, 3)
        elif n == self.num_lips and not self.full_face:
            lips = x
        else:
            expect = f"{self.num_vertices}" + ("" if self.full_face else f" or {self.num_lips} (lips only)")
            raise ValueError(f"lip reader input has {n} vertices per frame, expected {expect}")
        h = self.lip_embedding(lips.reshape(b, t, -1) / self.input_scale[1])  # (B, T, d)
        if self.full_embedding is not None:
            h = h + self.full_embedding(x.reshape(b, t, -1) / self.input_scale[0])  # (B, T, d)
        return h

    def set_input_scale(self, full: float, lips: float) -> None:
        """Offsets are divided by these before the streams (the RMS of the training motion,
        :meth:`DualTalker.fit_stage`), so the reader sees unit-scale input on any dataset."""
        if not (full > 0 and lips > 0 and math.isfinite(full) and math.isfinite(lips)):
            raise ValueError(f"input scales must be positive and finite, got {full}, {lips}")
        self.input_scale.copy_(torch.tensor([full, lips], dtype=self.input_scale.dtype))

    def encode(self, offsets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Motion latents r (B, T, d) of offsets (B, T, N, 3) / (B, T, 3N); valid (B, T)."""
        h = self._streams(offsets)
        h = h + sinusoidal_encoding(h.shape[1], self.d_model).to(h)[None]  # (B, T, d)
        pad = None if valid is None else ~valid.to(torch.bool)
        return self.encoder(h, src_key_padding_mask=pad)  # (B, T, d)

    def ctc_log_probs(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, up * T, n_tokens): x``ctc_upsample`` linear interpolation in time,
        the CTC head, log-softmax."""
        up = F.interpolate(latents.transpose(1, 2), scale_factor=self.ctc_upsample, mode="linear")  # (B, d, up*T)
        return F.log_softmax(self.ctc_head(up.transpose(1, 2)), dim=-1)

    def forward(self, offsets: torch.Tensor, valid: torch.Tensor | None = None) -> LipReading:
        r = self.encode(offsets, valid)  # (B, T, d)
        return LipReading(r, self.feature_head(r), self.ctc_log_probs(r))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class DualTalker(FaceFormer):
    """DualTalker (reconstruction, §4): the FaceFormer generator plus the lip reader and the
    consistency heads, trained jointly. ``facts`` gives fps, V, the training subjects (the
    one-hot order) and, unless ``lip_indices`` is set, the lip vertices."""

    name: ClassVar[str] = "dualtalker"
    config_class: ClassVar[type[DualTalkerConfig]] = DualTalkerConfig
    style_version: ClassVar[int] = 1
    config: DualTalkerConfig

    def __init__(self, config: DualTalkerConfig, facts: DataFacts) -> None:
        if not isinstance(config, DualTalkerConfig):
            raise TypeError(f"config must be DualTalkerConfig, got {type(config).__name__}")
        super().__init__(config, facts)
        lips = config.lip_indices or facts.lip_indices
        if not lips:
            raise ValueError("DualTalker's lip reader needs lip vertices: the corpus has no lip region and "
                             "lip_indices is empty")
        shared = self.motion_encoder if (config.share_motion_embedding and config.reader_full_face) else None
        self.reader = LipReader(
            num_vertices=facts.num_vertices,
            lip_indices=lips,
            d_model=config.d_model,
            layers=config.reader_layers,
            heads=config.reader_heads,
            ff_mult=config.reader_ff_mult,
            dropout=config.reader_dropout,
            feature_dim=self.audio_encoder.hidden_size,
            n_tokens=config.n_tokens,
            ctc_upsample=config.ctc_upsample,
            full_face=config.reader_full_face,
            motion_embedding=shared,
        )
        self.audio_head = nn.Linear(config.d_model, config.proj_dim)  # g_a
        self.motion_head = nn.Linear(config.d_model, config.proj_dim)  # g_m
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.dual_ramp = 1.0 if config.dual_ramp_epochs == 0 else 0.0
        self._token_ids = {tok: i for i, tok in enumerate(config.vocabulary)}

    # ------------------------------------------------------------------ schedule
    def fit_stage(self, dataset: ClipDataset) -> dict[str, float]:
        """The reader's input scales: the RMS of the training offsets from the template over
        every vertex and over the lip vertices (decision: metre-scale offsets would leave an
        untrained reader blind to motion for thousands of steps)."""
        lips = self.reader.lip_index.cpu().numpy()
        total = np.zeros(2)
        count = np.zeros(2)
        for i in range(len(dataset)):
            clip = dataset[i]
            if clip.vertices is None or clip.template is None:
                raise ValueError(f"DualTalker trains on vertices: clip {clip.name!r} has none")
            off = np.asarray(clip.vertices, dtype=np.float64) - clip.template  # (T, V, 3)
            total += [np.square(off).sum(), np.square(off[:, lips]).sum()]
            count += [off.size, off[:, lips].size]
        rms = np.sqrt(total / np.maximum(count, 1))
        if not (rms > 0).all():
            raise ValueError("the training motion has no movement (zero offsets): cannot scale the lip reader")
        self.reader.set_input_scale(float(rms[0]), float(rms[1]))
        return {"reader_scale_full": float(rms[0]), "reader_scale_lips": float(rms[1])}

    def on_epoch_start(self, epoch: int) -> None:
        """The ``_pred`` weights' ramp: epoch / ``dual_ramp_epochs``, at most 1 (§5)."""
        ramp = self.config.dual_ramp_epochs
        self.dual_ramp = 1.0 if ramp == 0 else min(1.0, max(0, int(epoch)) / ramp)

    # ------------------------------------------------------------------ transcripts
    def tokenize(self, text: str) -> list[int]:
        """Transcript -> token ids (never the blank): whitespace runs become one
        ``word_delimiter``; characters outside the vocabulary become ``unknown_token``
        (dropped when the vocabulary has none)."""
        cfg = self.config
        s = " ".join(text.split())
        if cfg.uppercase_text:
            s = s.upper()
        unk = self._token_ids.get(cfg.unknown_token)
        ids = []
        for ch in s:
            k = self._token_ids.get(cfg.word_delimiter if ch == " " else ch, unk)
            if k is not None and k != 0:
                ids.append(k)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids -> text (the word delimiter back to a space)."""
        toks = [self.config.vocabulary[int(i)] for i in ids]
        return "".join(" " if t == self.config.word_delimiter else t for t in toks)

    # ------------------------------------------------------------------ dual task
    def lip_read(self, motion_offsets: torch.Tensor | np.ndarray, valid: torch.Tensor | None = None) -> LipReading:
        """Read motion: offsets from the template (T, N, 3), (B, T, N, 3) or (B, T, 3N), with
        N = V, or the lip vertices only when ``reader_full_face`` is False. Returns the
        latents r (B, T, d), the predicted audio features (B, T, H) and the CTC
        log-probabilities (B, up * T, n_tokens). Runs in the caller's mode and keeps the
        graph (DEEPTalk's perceptual loss back-propagates through it); wrap in
        ``torch.no_grad()`` and :meth:`eval_mode` for analysis."""
        x = torch.as_tensor(np.asarray(motion_offsets) if not isinstance(motion_offsets, torch.Tensor)
                            else motion_offsets).to(self.device, torch.float32)
        if x.ndim == 3 and x.shape[-1] == 3:
            x = x[None]  # (1, T, N, 3)
        if x.ndim not in (3, 4):
            raise ValueError(f"motion offsets must be (T, N, 3), (B, T, N, 3) or (B, T, 3N), got {tuple(x.shape)}")
        return self.reader(x, None if valid is None else valid.to(self.device))

    def _ctc_targets(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """Items with a transcript (their batch indices (n,)) and their token ids."""
        keep, tokens = [], []
        for i, text in enumerate(texts):
            ids = self.tokenize(text) if text else []
            if ids:
                keep.append(i)
                tokens.append(ids)
        return torch.tensor(keep, dtype=torch.long, device=self.device), tokens

    def _ctc(
        self, log_probs: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, tokens: list[list[int]]
    ) -> torch.Tensor:
        """CTC of (B, up*T, C) log-probabilities for the items ``keep`` against their tokens
        (blank 0, zero_infinity: an item whose tokens cannot fit gives 0, with a warning)."""
        up = self.config.ctc_upsample
        lp = log_probs[keep].transpose(0, 1)  # (up*T, n, C)
        in_len = valid[keep].sum(dim=1) * up  # (n,)
        tgt_len = torch.tensor([len(t) for t in tokens], dtype=torch.long, device=lp.device)
        flat = torch.tensor([k for t in tokens for k in t], dtype=torch.long, device=lp.device)
        need = [len(t) + sum(1 for a, b in zip(t[:-1], t[1:], strict=True) if a == b) for t in tokens]
        short = [i for i, n in enumerate(need) if n > int(in_len[i])]
        if short:
            log.warning("DualTalker CTC: %d of %d transcripts need more than the %s upsampled frames; their CTC "
                        "loss is 0 (zero_infinity)", len(short), len(tokens), [int(in_len[i]) for i in short])
        return F.ctc_loss(lp, flat, in_len, tgt_len, blank=0, reduction="mean", zero_infinity=True)

    # ------------------------------------------------------------------ training
    def effective_weights(self) -> dict[str, float]:
        """The loss weights of this step: the config's, the ``_pred`` ones times the ramp."""
        w = dataclasses.asdict(self.config.loss_weights)
        return {k: v * self.dual_ramp if k in PRED_TERMS else v for k, v in w.items()}

    def loss_terms(self, batch: Batch) -> tuple[dict[str, torch.Tensor], EncodedBatch]:
        """Every unweighted loss term of a batch (§5) as a tensor, and the encoded batch.
        The CTC terms are present only when some item has a transcript (``text``); the
        reader's terms only when an auxiliary weight is non-zero."""
        enc = self.encode_batch(batch)
        pred = self.predict_offsets(enc)  # (B, T, 3V)
        terms = self._generator_terms(pred, enc)
        weights = dataclasses.asdict(self.config.loss_weights)
        if any(weights[k] > 0 for k in AUX_TERMS):
            terms.update(self.dual_terms(pred, enc, batch.get("text")))
        return terms, enc

    def _generator_terms(self, pred: torch.Tensor, enc: EncodedBatch) -> dict[str, torch.Tensor]:
        """rec, lip_rec (lip vertices only) and vel (frame differences) of pred (B, T, 3V)."""
        b, t = pred.shape[:2]
        lips = self.reader.lip_index
        p4, g4 = pred.reshape(b, t, -1, 3), enc.offsets.reshape(b, t, -1, 3)  # (B, T, V, 3)
        lip_rec = masked_mse(p4[:, :, lips].reshape(b, t, -1), g4[:, :, lips].reshape(b, t, -1), enc.valid)
        pairs = enc.valid[:, 1:] & enc.valid[:, :-1]  # (B, T-1)
        vel = masked_mse(pred[:, 1:] - pred[:, :-1], enc.offsets[:, 1:] - enc.offsets[:, :-1], pairs)
        return {"rec": masked_mse(pred, enc.offsets, enc.valid), "lip_rec": lip_rec, "vel": vel}

    def dual_terms(
        self, pred: torch.Tensor, enc: EncodedBatch, texts: Sequence[str] | None
    ) -> dict[str, torch.Tensor]:
        """The reader's terms (§4.2): on the ground truth ``enc.offsets`` (feat_gt, ctc_gt,
        nce_gt; they train the reader, its heads, the shared embedding and the audio encoder)
        and on ``pred`` (B, T, 3V) offsets (feat_pred, ctc_pred, nce_pred, cos_pred; the
        reader's and g_m's parameters are excluded from their gradient). The CTC terms only
        for items with a transcript in ``texts``."""
        cfg, valid = self.config, enc.valid
        h = enc.features.detach()  # (B, T, H) sg(h), the feature target
        gt = self.reader(enc.offsets, valid)
        frozen = {k: p.detach() for k, p in self.reader.named_parameters()}
        hat = torch.func.functional_call(self.reader, frozen, (pred, valid))  # R-bar on the prediction
        scale = self.logit_scale.clamp(max=math.log(cfg.logit_scale_max)).exp()
        z_a = F.normalize(self.audio_head(enc.memory), dim=-1)  # (B, T, k)
        z_r = F.normalize(self.motion_head(gt.latents), dim=-1)
        w_m, b_m = self.motion_head.weight.detach(), self.motion_head.bias.detach()
        z_hat = F.normalize(F.linear(hat.latents, w_m, b_m), dim=-1)  # g_m-bar on the prediction
        z_a_sg = z_a.detach()
        terms = {
            "feat_gt": feature_loss(gt.features, h, valid, cfg.feat_loss),
            "nce_gt": frame_infonce(z_r, z_a, valid, scale, cfg.nce_exclude_radius),
            "feat_pred": feature_loss(hat.features, h, valid, cfg.feat_loss),
            "nce_pred": frame_infonce(z_hat, z_a_sg, valid, scale.detach(), cfg.nce_exclude_radius),
            "cos_pred": masked_frame_mean(1.0 - (z_hat * z_a_sg).sum(dim=-1), valid),
        }
        keep, tokens = self._ctc_targets(texts or [])
        if tokens:
            terms["ctc_gt"] = self._ctc(gt.log_probs, valid, keep, tokens)
            terms["ctc_pred"] = self._ctc(hat.log_probs, valid, keep, tokens)
        return terms

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a batch (FaceFormer's batch keys plus optional ``text``). Logs every term
        (unweighted and ``_weighted``), ``loss``, ``dual_ramp``, ``logit_scale`` and ``frames``."""
        terms, enc = self.loss_terms(batch)
        loss, logs = weighted_loss(terms, self.effective_weights())
        logs["dual_ramp"] = float(self.dual_ramp)
        logs["logit_scale"] = float(self.logit_scale.detach())
        logs["frames"] = float(enc.valid.sum())
        return loss, logs
