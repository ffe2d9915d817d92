"""AdaMesh: Personalized Facial Expressions and Head Poses for Adaptive Speech-Driven 3D
Facial Animation.

Paper: Liyang Chen, Weihong Bao, Shun Lei, Boshi Tang, Zhiyong Wu, Shiyin Kang, Haozhi Huang,
Helen Meng, arXiv:2310.07236 (IEEE TMM 27:3598-3609, 2025).
Reference code: thuhcsi/AdaMesh@07f65ac (the speech-to-expression backbone only); the pose
VQ-VAE follows Doubiiu/CodeTalker@1b7cb95 stage 1.
Specification: specs/adamesh.md (section and decision numbers below refer to it).

This package: ``configuration.py`` (:class:`AdaMeshConfig`, its sections and presets),
``modeling.py`` (the networks: expression adapter, pose VQ-VAE, PoseGPT, log-mel, the
pose-style distance) and this module (:class:`AdaMesh`: stages, losses, fitting, style,
adaptation, generation). The Deviations below are numbered for all three.

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
  2. Style-encoder input in pre-training (§5) is never the item's own training window. The
     expression stage asks the loader for ``expression.style_seconds`` of reference per
     window (:meth:`AdaMesh.style_reference_frames`; talkmesh.data.dataset draws it,
     seeded by (seed, epoch, index)): a random crop of another training clip of the speaker
     with the same emotion and intensity; else the longer part of the item's own clip
     before or after its window; else (the clip fits in one window) another clip of the
     speaker with other labels; else (the speaker's only clip fits in one window) nothing,
     and the item trains with a zero style vector (logged as ``style_missing``). Batches
     without these keys (direct ``forward`` calls) use another clip of the speaker in the
     batch, else nothing.
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
  6. Learning-rate schedules: StepLR per stage (lr x gamma^(epoch // step)) is
     :meth:`AdaMeshConfig.lr_factor`, which the shared loop applies at every epoch (a
     stateless schedule, no scheduler state to resume). Weight decay is
     ``train.weight_decay`` (0.01 in the presets, Q1).
  7. Windows: every stage trains on ``data.window_seconds`` windows (the spec's 128- and
     256-frame pose windows exceed most MEAD clips); each pose batch is cropped to its
     shortest item (at most ``pose_vq.window`` frames), rounded down to a multiple of
     ``pose_vq.downsample`` frames.
  8. Vertices (§8.4) are produced when a face model is available (injected with
     :meth:`AdaMesh.set_face_model`, or the file in ``face_model``), **without** the head
     rotation by default, so LVE/FDD follow datasets.md §6.2 (``vertices_head_pose=True``
     applies it). A (V, 3) template instead of a shape beta gets the expression/jaw
     displacements of the zero-shape face model added to it. The face model is never stored
     in checkpoints (licence; talkmesh.face.flame).
  9. The frozen HuBERT is not part of the state dict (checkpoints would carry 1.2 GB of
     frozen weights); it is rebuilt from ``audio_encoder`` (local weights / tiny seed).
     Features of whole training clips are cached on disk in the pose-index stage (D17);
     training windows are encoded on the fly. Q6 is kept: in every path (training
     windows, cached clips, references, generate) audio longer than
     ``hubert_chunk_after_s`` (20 s) goes through HuBERT in pieces of
     ``hubert_chunk_frames`` (1000) frames as the reference's extraction does
     (talkmesh.audio.chunks); shorter audio in one pass.
 10. StyleState (§9) is flat (README G5 allows no nesting): MoLoRA tensors are stored as
     ``molora/<parameter name>``; distances of identities that share fewer than
     ``pose_index.min_shared_clusters`` clusters with the reference are stored as -1 (not inf).
 11. Without a reference, ``generate(style=k)`` uses training identity k's mean style
     vector and mean shape (fitted in the pose-index stage) and its pose embedding;
     ``style=None`` the mean over identities and ``default_pose_identity``.
 12. Pose context: pose batches are cropped to ``pose_vq.window`` frames; at inference
     the VQ-VAE encodes/decodes consecutive chunks of ``pose_vq.window`` frames and PoseGPT
     samples with a sliding context of ``pose_vq.window / pose_vq.downsample`` codes (positions 0..C-1, BOS
     first), so no position beyond the trained windows is ever used.
 13. ``expression.audio`` / ``pose_index.cluster_audio = "hubert+mel"`` (project options, used by
     the debug preset): the expression adapter and the pose-style clusters also get the
     log-mel frames PoseGPT uses. A frozen, randomly
     initialised tiny HuBERT carries almost no information about lip motion (ridge-probe
     R² 0.07 for the jaw opening on the synthetic corpus vs 0.55 for a 16-bin log-mel), so
     tests could not otherwise learn on CPU. The paper presets keep HuBERT alone.
 14. D8: the VQ-VAE conv stages have no normalisation by default (``pose_vq.norm="none"``;
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
 16. D6's adaptation (4 random 4 s crops a step, 300 steps) is replaced by the whole 10 s
     reference each step for 150 steps (``adaptation.batch=1, crop_s=10``), and the frozen
     parts run once per reference: HuBERT (shared with the pose retrieval) and the
     subsampling before the first adapted layer (so a crop's first frame sees its real left
     neighbour instead of zero padding, as in ``generate``). At paper sizes a step costs
     about 0.4 s with 2 CPU threads and the whole adaptation about a minute (62.7 s;
     D6 with HuBERT run twice: about 335 s; benchmarks/adamesh.py --paper). On the synthetic unseen speakers (debug
     preset, test_adamesh_learning) the adapted/unadapted LVE ratio is 0.721 (D6 crops for
     150 steps: 0.737; for 300 steps: 0.702; whole reference for 300 steps: 0.689). An
     optional held-out tail of the reference stops adaptation early
     (``adaptation.holdout_s``; off by default: with 2 s held out it stopped between 150 and
     300 steps at a ratio of 0.700).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.align import frames_from_audio, interpolate_features
from talkmesh.audio.cache import FeatureCache
from talkmesh.audio.chunks import ChunkedEncoding
from talkmesh.audio.encoders import build_audio_encoder
from talkmesh.methods.adamesh.configuration import STAGES, AdaMeshConfig
from talkmesh.methods.adamesh.modeling import (
    EXPR_DIM,
    N_EXPRESSION,
    POSE_DIM,
    ExpressionAdapter,
    PoseGPT,
    PoseVQVAE,
    log_mel,
    masked_l1,
    mel_filterbank,
    molora_selector,
    pose_style_distances,
)
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
from talkmesh.methods.face_slot import FaceModelSlot
from talkmesh.methods.streaming import MotionStream, StreamContext
from talkmesh.nn.kmeans import KMeansResult, assign, kmeans
from talkmesh.nn.lora import MoLoRA, adapter_parameters, adapter_values, apply_adapters

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.face.flame import FlameLayer

__all__ = ["AdaMesh"]


@dataclasses.dataclass
class _AdaptRun:
    """What :meth:`AdaMesh._optimise_molora` found: the MoLoRA tensors it keeps, each step's
    training loss, the step count they were taken at and their held-out L1 (None: no tail)."""

    lora: dict[str, torch.Tensor]
    losses: list[float]
    best_step: int
    holdout_l1: float | None


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
    config_class: ClassVar[type[AdaMeshConfig]] = AdaMeshConfig
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = STAGES
    # generate takes a FLAME shape beta (or None), evaluation passes it
    template_input: ClassVar[Literal["vertices", "shape"]] = "shape"
    trains_on_vertices: ClassVar[bool] = False  # the loop need not build face-model vertices for training batches

    def __init__(self, config: AdaMeshConfig, facts: DataFacts) -> None:
        super().__init__(config, facts)
        self.check_inputs(config, facts)
        self.config: AdaMeshConfig = config
        self.num_identities = facts.num_train_subjects
        cfg = config

        encoder = build_audio_encoder(cfg.audio_encoder)  # frozen; kept out of the state dict (deviation 9)
        encoder.eval()
        object.__setattr__(self, "_hubert", encoder)
        self.chunking = ChunkedEncoding(cfg.hubert_chunk_frames, cfg.hubert_chunk_after_s)  # Q6
        object.__setattr__(self, "_face", FaceModelSlot("adamesh", N_EXPRESSION, facts.num_vertices))
        self.alignment: str = self._alignment_mode(encoder.output_rate)
        h = encoder.hidden_size

        expression_in = h + (cfg.mel_bins if cfg.expression.audio == "hubert+mel" else 0)
        self.expression = ExpressionAdapter(cfg.expression, expression_in)
        self.molora_layers = apply_adapters(
            self.expression,
            molora_selector(cfg.molora.targets),
            lambda shape: MoLoRA(shape, cfg.molora.ranks, cfg.molora.alpha),
        )
        self.pose_vq = PoseVQVAE(cfg.pose_vq)
        self.posegpt = PoseGPT(
            cfg.posegpt, h + cfg.mel_bins, self.num_identities, cfg.pose_vq.codebook_size, cfg.pose_vq.downsample
        )
        self.register_buffer("mel_fbank", mel_filterbank(201, cfg.mel_bins), persistent=False)
        self._register_fitted_buffers(h)
        self.set_stage(self.stage)

    @staticmethod
    def check_inputs(config: AdaMeshConfig, facts: DataFacts) -> None:
        """Raise unless ``config`` is an :class:`AdaMeshConfig` that fits the data ``facts``."""
        if not isinstance(config, AdaMeshConfig):
            raise TypeError(f"config must be AdaMeshConfig, got {type(config).__name__}")
        if facts.num_train_subjects < 1:
            raise ValueError("AdaMesh needs at least one training identity (PoseGPT style embeddings)")
        if config.default_pose_identity >= facts.num_train_subjects:
            raise ValueError(
                f"default_pose_identity={config.default_pose_identity} but there are "
                f"{facts.num_train_subjects} training identities"
            )

    def _alignment_mode(self, rate: float) -> str:
        """``audio_alignment`` resolved for the encoder ``rate`` (Hz) and the motion fps (deviation 5)."""
        mode = self.config.audio_alignment
        fps = self.facts.fps
        if mode == "auto":
            return "trim" if abs(rate - 2.0 * fps) < 1e-6 else "interp"
        if mode == "trim" and abs(rate - 2.0 * fps) > 1e-6:
            raise ValueError(f'audio_alignment="trim" needs {rate / 2:g} fps motion, got {fps:g} fps')
        return mode

    def _register_fitted_buffers(self, hubert_dim: int) -> None:
        """z-normalisation statistics (fitted by fit_stage) and the pose-style index."""
        cfg = self.config
        self.register_buffer("expr_mean", torch.zeros(EXPR_DIM))
        self.register_buffer("expr_std", torch.ones(EXPR_DIM))
        self.register_buffer("pose_mean", torch.zeros(POSE_DIM))
        self.register_buffer("pose_std", torch.ones(POSE_DIM))
        self.register_buffer("fitted", torch.zeros(3, dtype=torch.bool))  # expr stats, pose stats, pose index
        n, k = self.num_identities, cfg.pose_index.kmeans_k
        cluster_dim = hubert_dim + (cfg.mel_bins if cfg.pose_index.cluster_audio != "hubert" else 0)
        self.register_buffer("cluster_centroids", torch.zeros(k, cluster_dim))
        self.register_buffer("pose_style_matrix", torch.zeros(n, k, cfg.pose_vq.code_dim))
        self.register_buffer("pose_style_counts", torch.zeros(n, k))
        self.register_buffer("identity_style", torch.zeros(n, cfg.expression.d_model))  # mean style vector per identity
        self.register_buffer("identity_shape", torch.zeros(n, cfg.expression.shape_dim))  # mean shape per identity

    # ================================================================== plumbing
    def _apply(self, fn: Any, recurse: bool = True) -> AdaMesh:
        """``.to()`` / ``.cuda()`` also move the frozen encoder and the injected face model."""
        super()._apply(fn, recurse)
        self._hubert._apply(fn)
        self._face.apply(fn)
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

    @property
    def reference_seconds(self) -> float:
        """Seconds of a reference clip that encode_style / adapt use (``config.reference_seconds``)."""
        return float(self.config.reference_seconds)

    # ---- face model (injected dependency, README G10) ---------------------------------
    def set_face_model(self, layer: FlameLayer | None) -> None:
        """Use ``layer`` (50 expression components) for vertices; the model keeps its own copy."""
        self._face.set(layer, self.device)

    def face_model(self) -> FlameLayer | None:
        """The injected face model, else ``config.face_model`` (loaded once), else None."""
        return self._face.get(self.config.face_model, self.device)

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
        """Frozen HuBERT: audio (B, S) -> features (B, N, H) at 50 Hz and lengths (B,); items
        longer than ``hubert_chunk_after_s`` in pieces (Q6), the batch in one call otherwise."""
        audio = audio.to(self.device)
        lens = lengths.to(self.device) if lengths is not None else None
        sizes = [audio.shape[1]] * audio.shape[0] if lens is None else lens.tolist()
        if not any(self.chunking.applies(int(n)) for n in sizes):
            out = self._hubert(audio, lens)
            return out.features, out.lengths
        parts = [self.chunking.encode(self._hubert, audio[i, : int(n)]) for i, n in enumerate(sizes)]  # (N_b, H)
        flen = torch.tensor([p.shape[0] for p in parts], device=self.device)  # (B,)
        feats = parts[0].new_zeros(len(parts), int(flen.max()), parts[0].shape[1])  # (B, N, H)
        for i, p in enumerate(parts):
            feats[i, : p.shape[0]] = p
        return feats, flen

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
        stages), ``motion_mask`` (B, T), optional ``shape`` (B, 100), ``subject`` (B,); the
        expression stage also reads ``style_params`` (B, R, 53) / ``style_mask`` (B, R) where
        the loader adds them (deviation 2)."""
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

    def style_reference_frames(self) -> int:
        """Frames of style reference each expression-stage training window gets from other
        frames of the corpus (``expression.style_seconds``, deviation 2); 0 in the other stages."""
        return self._style_frames() if self.stage == "expression" else 0

    def _style_frames(self) -> int:
        return max(1, int(round(self.config.expression.style_seconds * self.facts.fps)))

    def _style_partners(self, batch: Batch) -> list[int]:
        """For batches without ``style_*`` keys (deviation 2): per item, another item of the same
        training speaker from a different clip (same emotion and intensity first), else -1."""
        n = len(batch["params"])
        subject = torch.as_tensor(batch.get("subject", [-1] * n)).tolist()
        names = batch.get("names") or [str(i) for i in range(n)]
        emotion, intensity = (torch.as_tensor(batch.get(k, [-1] * n)).tolist() for k in ("emotion", "intensity"))
        labels = list(zip(emotion, intensity, strict=True))
        out = []
        for i, s in enumerate(subject):
            cands = [j for j, t in enumerate(subject) if t == s and s >= 0 and names[j] != names[i]]
            same = [j for j in cands if labels[j] == labels[i]]
            out.append((same or cands or [-1])[0])
        return out

    def _style_inputs(self, batch: Batch, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised style reference (B, R, 53) and mask (B, R), never frames of the item's own
        window: the batch's ``style_params`` / ``style_mask`` (talkmesh.data.dataset), else
        another clip's window from :meth:`_style_partners` (no frames where there is none).
        ``y`` (B, T, 53) is the normalised target, ``mask`` (B, T) its valid frames."""
        r = self._style_frames()
        if "style_params" in batch:
            ref = batch["style_params"].to(self.device, torch.float32)[:, :r]  # (B, R, 53)
            ref_mask = batch["style_mask"].to(self.device, torch.bool)[:, :r]  # (B, R)
            if ref.shape[-1] != EXPR_DIM:
                raise ValueError(f"batch['style_params'] must be (B, R, {EXPR_DIM}), got {tuple(ref.shape)}")
            return self._norm_expr(ref), ref_mask
        partners = torch.tensor(self._style_partners(batch), device=self.device)  # (B,)
        has = partners >= 0
        idx = partners.clamp_min(0)
        return y[idx, :r], mask[idx, :r] & has[:, None]

    def _style_and_identity(
        self, ref: torch.Tensor, ref_mask: torch.Tensor, mask: torch.Tensor, shape: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Style and identity vectors (B, d) for training: items without reference frames get a
        zero style vector (the style encoder never sees them) and their identity over their own
        frame count (the identity input is only the shape, repeated, deviation 3)."""
        has = ref_mask.any(1)  # (B,)
        style = torch.zeros(ref.shape[0], self.config.expression.d_model, device=self.device)
        if bool(has.any()):
            style[has] = self.expression.encode_style(ref[has], ref_mask[has])
        frames = torch.where(has, ref_mask.sum(1), mask.sum(1))  # (B,)
        id_mask = torch.arange(int(frames.max()), device=self.device)[None] < frames[:, None]  # (B, F)
        return style, self.expression.encode_identity(shape, id_mask)

    def _shape(self, batch: Batch, b: int) -> torch.Tensor:
        shape = batch.get("shape")
        if shape is None:
            return torch.zeros(b, self.config.expression.shape_dim, device=self.device)
        shape = torch.as_tensor(shape).to(self.device, torch.float32)
        sd = self.config.expression.shape_dim
        if shape.shape != (b, sd):
            raise ValueError(f"batch['shape'] must be (B, {sd}), got {tuple(shape.shape)}")
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
        ref, ref_mask = self._style_inputs(batch, y, mask)  # (B, R, 53), (B, R)
        style, identity = self._style_and_identity(ref, ref_mask, mask, self._shape(batch, b))
        mid, post, _, _ = self.expression(audio, mask, style=style, identity=identity)
        terms = {"l1_mid": masked_l1(mid, y, mask), "l1_post": masked_l1(post, y, mask)}
        loss, logs = weighted_loss(terms, dataclasses.asdict(self.config.expression.loss_weights))
        logs["frames"] = float(lengths.sum())
        logs["style_missing"] = float((~ref_mask.any(1)).float().mean())  # items trained with a zero style
        return loss, logs

    def _pose_crop(self, lengths: torch.Tensor) -> int:
        ds = self.config.pose_vq.downsample
        t = min(int(lengths.min()), self.config.pose_vq.window) // ds * ds
        if t < ds:
            raise ValueError(f"AdaMesh pose stages need windows of at least {ds} frames, got {int(lengths.min())}")
        return t

    def _pose_vq_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        pose, _, lengths = self._batch_basics(batch, "head_pose")
        t = self._pose_crop(lengths)
        x = self._norm_pose(pose[:, :t])  # (B, t, 3)
        rec, vq = self.pose_vq(x)
        terms = {"rec": (rec - x).abs().mean(), "vq": vq.loss}
        loss, logs = weighted_loss(terms, dataclasses.asdict(self.config.pose_vq.loss_weights))
        logs.update(
            perplexity=float(vq.perplexity),
            codes_used=float(vq.used),
            code_usage=self.pose_vq.quantizer.usage(),
            commitment=float(vq.commitment),
        )
        return loss, logs

    def _expression_audio(self, both: torch.Tensor) -> torch.Tensor:
        """The expression adapter's part of aligned HuBERT ⊕ log-mel (B, 2T, H + M)."""
        return both if self.config.expression.audio == "hubert+mel" else both[..., : self._hubert.hidden_size]

    def _audio_inputs(
        self,
        audio: torch.Tensor,
        lengths: torch.Tensor | None,
        frames: torch.Tensor,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """HuBERT ⊕ log-mel (B, 2 max(frames), H + M), each item aligned to 2 frames_b;
        ``features``: the batch's HuBERT output (:meth:`_features`) when already computed."""
        feats, flen = self._features(audio, lengths) if features is None else features
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
        logs["ce_ratio_log_k"] = float(ce.detach()) / math.log(self.config.pose_vq.codebook_size)
        return loss, logs

    # ================================================================== fitted stages
    @torch.no_grad()
    def fit_stage(self, dataset: ClipDataset) -> dict[str, float]:
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

    def _fit_stats(self, dataset: ClipDataset, key: str) -> dict[str, float]:
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
        std = (s2 / total - mean**2).clamp_min(0.0).sqrt().clamp_min(self.config.expression.norm_min_std)
        if key == "params":
            self.expr_mean.copy_(mean.float())
            self.expr_std.copy_(std.float())
            self.fitted[0] = True
        else:
            self.pose_mean.copy_(mean.float())
            self.pose_std.copy_(std.float())
            self.fitted[1] = True
        return {f"{key}_frames": float(total)}

    def _clip_features(
        self, audio: np.ndarray | torch.Tensor, cache: FeatureCache | None = None, hubert: torch.Tensor | None = None
    ) -> torch.Tensor:
        """50 Hz features (N, C) of one whole clip that the pose-style clusters are built on:
        HuBERT (``hubert`` (N, H) when already computed, else from the disk cache when
        enabled) [⊕ log-mel with ``pose_index.cluster_audio``]."""
        a = torch.as_tensor(np.asarray(audio, np.float32) if not isinstance(audio, torch.Tensor) else audio)
        a = a.to(torch.float32)
        if hubert is not None:
            feats = hubert
        elif cache is not None:
            feats = torch.from_numpy(cache.get_or_compute(a.cpu().numpy(), self._hubert, self.chunking))
            feats = feats.to(self.device)
        else:
            feats = self._features(a[None])[0][0]
        if self.config.pose_index.cluster_audio == "hubert+mel":
            mel = self._mel(a[None], None)[0, : feats.shape[0]]
            feats = torch.cat([feats, F.pad(mel, (0, 0, 0, feats.shape[0] - mel.shape[0]))], dim=-1)
        return feats

    def _clip_pose_stats(self, feats: torch.Tensor, head_pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cluster sums (k, D) and frame counts (k,) of one clip's pre-quantisation pose
        latents (§7.4 steps 2-3): HuBERT frame f -> code step floor(f / (2 ds))."""
        ds = self.config.pose_vq.downsample
        t = head_pose.shape[0]
        tp = -(-t // ds) * ds  # T padded to a multiple of ds
        pose = torch.cat([head_pose, head_pose[-1:].expand(tp - t, POSE_DIM)]) if tp > t else head_pose
        z = self.pose_vq.encode_chunks(self._norm_pose(pose)[None], self.config.pose_vq.window)[0]  # (tp / ds, D)
        a = self._align(feats[None], torch.tensor([feats.shape[0]]), torch.tensor([2 * t]))[0]  # (2t, H)
        labels = assign(a, self.cluster_centroids)  # (2t,)
        steps = torch.arange(2 * t, device=a.device) // (2 * ds)
        k = self.cluster_centroids.shape[0]
        sums = torch.zeros(k, z.shape[1], device=a.device).index_add_(0, labels, z[steps])
        counts = torch.bincount(labels, minlength=k).to(sums.dtype)
        return sums, counts

    def _fit_pose_index(self, dataset: ClipDataset) -> dict[str, float]:
        """Stage ``pose_index`` (§7.4): k-means of the training audio frames, then the
        per-identity pose-style matrices and style / shape tables."""
        cache = FeatureCache() if self.config.pose_index.cache_features else None
        with self.eval_mode():
            frames, result = self._fit_clusters(dataset, cache)
            counts = self._fit_identity_tables(dataset, cache)
            self.fitted[2] = True
        return {
            "kmeans_frames": float(frames.shape[0]),
            "kmeans_inertia_per_frame": result.inertia / max(frames.shape[0], 1),
            "kmeans_iterations": float(result.iterations),
            "clusters_used_per_identity": float((counts > 0).sum(1).float().mean()),
        }

    def _fit_clusters(self, dataset: ClipDataset, cache: FeatureCache | None) -> tuple[torch.Tensor, KMeansResult]:
        """Step 1: k-means on (a seeded subsample of) the training audio frames -> the frames
        clustered (N, C) and the k-means result (centroids copied to ``cluster_centroids``)."""
        cfg = self.config.pose_index
        seqs = getattr(dataset, "sequences", None)
        est = sum(2 * s.num_frames for s in seqs) if seqs else 0
        keep_p = min(1.0, cfg.kmeans_max_frames / est) if est else 1.0
        gen = torch.Generator().manual_seed(0)
        pool: list[torch.Tensor] = []
        for i in range(len(dataset)):
            feats = self._clip_features(dataset[i].audio, cache)  # (N_i, C)
            keep = torch.rand(feats.shape[0], generator=gen) < keep_p
            pool.append(feats[keep.to(feats.device)])
        frames = torch.cat(pool)[: cfg.kmeans_max_frames]  # (N, C)
        result = kmeans(frames.float(), cfg.kmeans_k, iters=cfg.kmeans_iters, seed=0)
        self.cluster_centroids.copy_(result.centroids)  # (k, C)
        return frames, result

    def _fit_identity_tables(self, dataset: ClipDataset, cache: FeatureCache | None) -> torch.Tensor:
        """Steps 2-3: per-identity pose-style matrices (N, k, D) and counts (N, k), mean style
        vectors (N, d) and mean shapes (N, S) over each identity's clips. Returns the counts."""
        cfg = self.config
        n, k = self.num_identities, cfg.pose_index.kmeans_k
        sums = torch.zeros(n, k, cfg.pose_vq.code_dim, device=self.device)
        counts = torch.zeros(n, k, device=self.device)
        style_sum = torch.zeros(n, cfg.expression.d_model, device=self.device)
        shape_sum = torch.zeros(n, cfg.expression.shape_dim, device=self.device)
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
        return counts

    # ================================================================== style
    def _reference_expression(self, params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 53) reference params -> normalised (1, R, 53) (at most ``expression.style_seconds``) and mask (1, R)."""
        p = torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params)
        p = p.to(self.device, torch.float32)
        if p.ndim != 2 or p.shape[1] != EXPR_DIM or p.shape[0] < 1:
            raise ValueError(f"reference 'params' must be (T, {EXPR_DIM}) = expression | jaw, got {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("reference 'params' hold non-finite values")
        r = min(p.shape[0], max(1, int(round(self.config.expression.style_seconds * self.facts.fps))))
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
            sd = self.config.expression.shape_dim
            if shape.shape != (sd,):
                raise ValueError(f"reference 'shape' must be ({sd},), got {tuple(shape.shape)}")
            shape = shape.to(self.device, torch.float32)
        else:
            shape = torch.zeros(self.config.expression.shape_dim, device=self.device)
        return {"audio": a, "params": p[:t].to(self.device, torch.float32), "head_pose": pose, "shape": shape, "t": t}

    @torch.no_grad()
    def _retrieve_pose(self, ref: dict[str, Any], hubert: torch.Tensor | None = None) -> dict[str, Any]:
        """§7.4: nearest training identity by the masked mean L2 between pose-style matrices
        (``hubert``: the reference's HuBERT features (N, H) when already computed)."""
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
        with self.eval_mode():
            s, c = self._clip_pose_stats(self._clip_features(ref["audio"], hubert=hubert), ref["head_pose"])
        s_ref = s / c.clamp_min(1)[:, None]
        dist, shared = pose_style_distances(
            s_ref, c, self.pose_style_matrix, self.pose_style_counts, self.config.pose_index.min_shared_clusters
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
            seed=self.config.posegpt.seed,
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
        with self.eval_mode():
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
        with self.eval_mode():
            r, r_mask = self._reference_expression(ref["params"])
            style = self.expression.encode_style(r, r_mask)[0]
            identity = self.expression.encode_identity(ref["shape"][None], r_mask)[0]
            pose = self._retrieve_pose(ref)
        return self._state("encoded", ref, style, identity, pose, self.config.posegpt.seed if seed is None else seed)

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
        reference (AdamW, ``adaptation.batch`` random crops of ``adaptation.crop_s`` per step,
        eval mode, everything else frozen) for at most ``steps`` steps or ``max_seconds`` of
        wall time, whichever ends first, stopping early on a held-out tail of the reference
        (``adaptation.holdout_s``); then retrieve the pose identity. HuBERT runs once on the
        reference for both. Deterministic for a seed unless the time bound ends it. The
        model itself is never modified."""
        cfg = self.config.adaptation
        steps = cfg.steps if steps is None else int(steps)
        max_seconds = cfg.max_seconds if max_seconds is None else float(max_seconds)
        if steps < 0 or not max_seconds > 0:
            raise ValueError(f"adapt: steps must be >= 0 and max_seconds positive, got {steps}, {max_seconds}")
        ref = self._reference(reference)
        t0 = time.perf_counter()
        with self.eval_mode():
            with torch.no_grad():
                hubert = self._features(ref["audio"][None])  # (1, N, H), (1,)
            r, r_mask = self._reference_expression(ref["params"])  # (1, R, 53), (1, R)
            run = self._optimise_molora(
                ref, hubert, (r, r_mask), steps, t0 + max_seconds, seed, cfg.lr if lr is None else float(lr)
            )
            with torch.no_grad():
                with adapter_values(self.expression, run.lora):
                    style = self.expression.encode_style(r, r_mask)[0]  # (d,)
                    identity = self.expression.encode_identity(ref["shape"][None], r_mask)[0]  # (d,)
                pose = self._retrieve_pose(ref, hubert[0][0])
        return self._state(
            "adapted",
            ref,
            style,
            identity,
            pose,
            seed,
            molora=run.lora,
            adapt_steps=len(run.losses),
            adapt_best_step=run.best_step,  # the steps the kept parameters were taken after
            **({} if run.holdout_l1 is None else {"adapt_holdout_l1": run.holdout_l1}),
            adapt_seconds=float(time.perf_counter() - t0),
            adapt_loss_first=run.losses[0] if run.losses else 0.0,
            adapt_loss_last=run.losses[-1] if run.losses else 0.0,
        )

    def _optimise_molora(
        self,
        ref: dict[str, Any],
        hubert: tuple[torch.Tensor, torch.Tensor],
        ref_expression: tuple[torch.Tensor, torch.Tensor],
        steps: int,
        deadline: float,
        seed: int,
        lr: float,
    ) -> _AdaptRun:
        """The optimisation of :meth:`adapt` (call it in eval mode): AdamW on copies of the
        MoLoRA parameters, at most ``steps`` steps and none after ``deadline``
        (``time.perf_counter()``), with ``hubert`` the reference's HuBERT output (1, N, H), (1,).
        With a held-out tail (``adaptation.holdout_s``) crops come from the rest, and the
        parameters of the lowest held-out L1 are returned once ``patience`` measurements
        have not lowered it (the last ones without a tail)."""
        cfg = self.config.adaptation
        gen = torch.Generator().manual_seed(int(seed))
        lora = {k: p.detach().clone().requires_grad_(True) for k, p in self.adaptation_parameters().items()}
        opt = torch.optim.AdamW(list(lora.values()), lr=lr, weight_decay=cfg.weight_decay)
        t = ref["t"]
        audio = self._expression_audio(
            self._audio_inputs(ref["audio"][None], None, torch.tensor([t]), features=hubert)
        )  # (1, 2T, A)
        with torch.no_grad():  # the subsampling is not adapted: once for the whole reference
            sub = self.expression.subsample(audio)[:, :t]  # (1, T, d)
        y = self._norm_expr(ref["params"])[None]  # (1, T, 53)
        hold = int(round(cfg.holdout_s * self.facts.fps))
        hold = hold if 0 < hold <= t - hold else 0
        fit = t - hold  # frames crops are drawn from
        crop = max(1, min(fit, int(round(cfg.crop_s * self.facts.fps))))

        def holdout_l1() -> float:
            with torch.no_grad():
                shape = ref["shape"][None]
                return float(self._adaptation_loss(lora, sub[:, fit:], y[:, fit:], ref_expression, shape))

        def snapshot() -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in lora.items()}

        # With a tail, the unadapted parameters are the best until a step lowers its L1.
        run = _AdaptRun(snapshot() if hold else {}, [], 0, holdout_l1() if hold else None)
        stale = 0
        with torch.enable_grad():
            for step in range(steps):
                if time.perf_counter() >= deadline:
                    break
                if cfg.schedule == "cosine":
                    for g in opt.param_groups:
                        g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
                starts = torch.randint(0, fit - crop + 1, (cfg.batch,), generator=gen).tolist()
                yb = torch.cat([y[:, s : s + crop] for s in starts])  # (B, crop, 53)
                ab = torch.cat([sub[:, s : s + crop] for s in starts])  # (B, crop, d)
                loss = self._adaptation_loss(lora, ab, yb, ref_expression, ref["shape"][None])
                grads = torch.autograd.grad(loss, list(lora.values()))
                for p, g in zip(lora.values(), grads, strict=True):
                    p.grad = g
                opt.step()
                run.losses.append(float(loss.detach()))
                if not hold:
                    continue
                if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                    l1 = holdout_l1()
                    if run.holdout_l1 is not None and l1 < run.holdout_l1:
                        run.lora = snapshot()
                        run.best_step, run.holdout_l1, stale = step + 1, l1, 0
                    else:
                        stale += 1
                        if stale >= cfg.patience:
                            break
        if not hold:
            run.lora, run.best_step = {k: v.detach() for k, v in lora.items()}, len(run.losses)
        return run

    def _adaptation_loss(
        self,
        lora: Mapping[str, torch.Tensor],
        audio: torch.Tensor,
        target: torch.Tensor,
        ref_expression: tuple[torch.Tensor, torch.Tensor],
        shape: torch.Tensor,
    ) -> torch.Tensor:
        """Expression loss (§5) of crops of the subsampled audio (B, C, d) / target (B, C, 53)
        with the MoLoRA tensors ``lora``; the style encoder sees the whole reference (1, R, 53)
        once (shared by the crops), the identity encoder the shape (1, S)."""
        b, crop = target.shape[:2]
        mask = torch.ones(b, crop, dtype=torch.bool, device=self.device)  # (B, C)
        r, r_mask = ref_expression
        with adapter_values(self.expression, lora):
            style = self.expression.encode_style(r, r_mask).expand(b, -1)  # (B, d)
            identity = self.expression.encode_identity(shape, r_mask).expand(b, -1)  # (B, d)
            mid, post = self.expression.decode(audio, mask, style, identity)  # (B, C, 53) x 2
        terms = {"l1_mid": masked_l1(mid, target, mask), "l1_post": masked_l1(post, target, mask)}
        loss, _ = weighted_loss(terms, dataclasses.asdict(self.config.expression.loss_weights))
        return loss

    def resolve_style(self, style: StyleState | int | str | None) -> _Style:
        """What ``generate`` conditions on: None (mean tables, ``default_pose_identity``), a
        training identity (index or name) or an AdaMesh StyleState."""
        d, sd = self.config.expression.d_model, self.config.expression.shape_dim
        if style is None:
            s, ident = self._table_vectors(None)
            return _Style({}, s, ident, torch.zeros(sd), self.config.default_pose_identity, self.config.posegpt.seed)
        if isinstance(style, (int, np.integer, str)) and not isinstance(style, bool):
            k = self.facts.subject_index(style)
            s, ident = self._table_vectors(k)
            return _Style({}, s, ident, torch.zeros(sd), k, self.config.posegpt.seed)
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
        seed = state.get("seed", self.config.posegpt.seed)
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
        ds = self.config.pose_vq.downsample
        tp = -(-t // ds) * ds
        with self.eval_mode():
            both = self._audio_inputs(a, None, torch.tensor([tp]))  # (1, 2T', H + M)
            params = self._generate_expression(both[:, : 2 * t], st)  # (T, 53)
            head_pose = self._generate_head_pose(both, st)[:t]  # (T, 3)
        out = {"params": params, "head_pose": head_pose}
        rot = self.config.vertices_head_pose if head_pose_in_vertices is None else head_pose_in_vertices
        verts = self._vertices(params, head_pose if rot else None, tmpl)
        if verts is not None:
            out["vertices"] = verts
        return out

    def make_stream(
        self,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None,
        context: StreamContext,
        head_pose_in_vertices: bool | None = None,
    ) -> MotionStream:
        """One PoseGPT sampling process for the whole utterance
        (:class:`~talkmesh.methods.adamesh.streaming.AdaMeshStream`): the features run on a
        sliding window; codes are sampled as their frames become final."""
        from talkmesh.methods.adamesh.streaming import AdaMeshStream

        return AdaMeshStream(self, template, style, context, head_pose_in_vertices)

    def _generate_expression(self, audio: torch.Tensor, st: _Style) -> torch.Tensor:
        """Aligned HuBERT ⊕ log-mel (1, 2T, H + M) -> denormalised expression | jaw (T, 53)."""
        t = audio.shape[1] // 2
        mask = torch.ones(1, t, dtype=torch.bool, device=self.device)  # (1, T)
        with adapter_values(self.expression, st.overrides):
            _, post, _, _ = self.expression(
                self._expression_audio(audio),
                mask,
                style=st.style[None],
                identity=None if st.identity is None else st.identity[None],
                shape=st.shape.to(self.device)[None],
            )  # (1, T, 53)
        return self._denorm_expr(post[0])

    def _generate_head_pose(self, audio: torch.Tensor, st: _Style) -> torch.Tensor:
        """PoseGPT codes sampled with the style's seed and pose identity (sliding context,
        deviation 12) for audio (1, 2T', H + M), T' a multiple of ``pose_vq.downsample`` ->
        denormalised head rotation (T', 3)."""
        cfg = self.config
        window = cfg.pose_vq.window // cfg.pose_vq.downsample  # codes
        codes = self.posegpt.sample(
            self.posegpt.audio_tokens(audio),  # (1, T'/ds, d)
            torch.tensor([st.pose_identity], device=self.device),
            torch.Generator().manual_seed(int(st.seed)),
            cfg.posegpt.sampling,
            cfg.posegpt.temperature,
            cfg.posegpt.top_k,
            context=window,
        )  # (1, T'/ds)
        return self._denorm_pose(self.pose_vq.decode_chunks(codes, window)[0])  # (T', 3)

    def _template(self, template: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        if template is None:
            return None
        t = torch.as_tensor(np.asarray(template) if not isinstance(template, torch.Tensor) else template)
        t = t.to(self.device, torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("template holds non-finite values")
        sd = self.config.expression.shape_dim
        if t.ndim == 1 and t.numel() == sd:
            return t
        if t.ndim == 1 and t.numel() % 3 == 0:
            t = t.reshape(-1, 3)
        if t.ndim == 2 and t.shape[1] == 3:
            return t
        raise ValueError(f"template must be a FLAME shape ({sd},), a (V, 3) mesh or None, got {tuple(t.shape)}")

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
