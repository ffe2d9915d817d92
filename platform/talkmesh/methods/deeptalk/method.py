"""DEEPTalk: Dynamic Emotion Embedding for Probabilistic Speech-Driven 3D Face Animation.

Paper: Jisoo Kim, Jungbin Cho, Joonho Park, Soonmin Hwang, Da Eun Kim, Geon Kim, Youngjae Yu,
arXiv:2408.06010 (AAAI 2025).
Reference code: whwjdqls/DEEPTalk@37fd026 (and the December 2024 training code, ee2fb8c).
Specification: specs/deeptalk.md (section, quirk Q and decision D numbers below refer to it).

This package: ``configuration.py`` (:class:`DEEPTalkConfig`, one section per stage),
``emotion.py`` (the expression-emotion MLP, GPO pooling and DEE with its CSD loss),
``prior.py`` (the TH-VQVAE and the generator's face-feature extractor and code predictors)
and this module (:class:`DEEPTalk`: stages, losses, inference, style).

Model. FLAME expression 50 | jaw 3 (``params``, 25 fps). Every loss is on FLAME vertices
V(.) at zero shape with pose [0, 0, 0, jaw] (§2), through the injected face model.

* ``fer``: a per-frame expression-emotion MLP trained on the clips' emotion labels (D1).
* ``dee``: audio (wav2vec2, top layers trainable, D2) and expression (the MLP's eval-mode
  features) encoders, each a diagonal Gaussian (mu on the unit sphere, log sigma^2) pooled
  with GPO, trained with the closed-form sampled distance (CSD) matching loss and its VIB term.
* ``vq``: the TH-VQVAE (top codes at T/4, bottom at T/2, EMA codebooks), and beside it the
  lips-only vertex lip reader (DualTalker's ``LipReader``) of the perceptual loss (D3).
* ``stage1`` / ``stage2``: frozen wav2vec2 content features, the frozen DEE audio mean
  (the emotion condition) and the actor one-hot -> face features -> top and bottom code
  predictors -> straight-through hard Gumbel-softmax lookups (tau 2 -> 0.1 per epoch) -> the
  frozen TH-VQVAE decoder. Losses: vertex MSE, emotion consistency (CSD or mean), and in
  stage 2 the lip-reading perceptual loss and the swap terms.

Inference: argmax codes by default (bitwise repeatable, Q5/D7); ``sample=True`` samples the
emotion from the DEE Gaussian (log-variance scale c) and the codes at temperatures
(``temp_top``, ``temp_bottom``) from a seeded generator. The emotion comes from the driving
audio, another audio (``audio_emotion``), a stored style (audio or expression source) or an
emotion label with an intensity (the project's emotion prototypes, deviation 6).

Deviations (spec DECISIONs and fixes are named in the spec; these are the project's own):
  1. Frozen modules (DEE, MLP, lip reader, content encoder, TH-VQVAE) are held in eval mode
     in every stage (D18), except the DEE under ``reference_dee_train_mode`` (Q18).
  2. The ``fer`` length is set in epochs of training windows (``fer.epochs``), not as the
     reference's 12,000-update budget: the shared loop counts epochs.
  3. The TH-VQVAE warm-up is linear over ``vq.warmup_epochs`` epochs (the reference: 4000
     steps), through the loop's per-epoch learning-rate factor.
  4. Stage 1 keeps its best epoch on ``val/lve`` (argmax decoding) over ``stage1_epochs``;
     the shared loop has no early stop, so the patience of D6 is not applied.
  5. Windows: each batch is cropped, per item at a random start, to W = min(``window_frames``,
     shortest item) rounded down to a multiple of 4 frames; the audio crop is the same span.
     The DEE stage crops ``dee.window_s`` of audio and ``dee.exp_window_frames`` frames from
     one random start (zero-padded when the window is shorter).
  6. Emotion by label (service): the mean DEE audio embedding of each emotion over training
     clips (fitted at the start of ``stage1``, at most ``PROTOTYPE_CLIPS`` clips per emotion).
     Intensity s in [0, 1] interpolates from the neutral prototype: normalise(n + s (p - n)).
  7. The lip reader trains on the feature-regression target only (cosine); its CTC head is
     not trained (no transcript tokenizer in this stage), so L_lip reads its latents only.
  8. The content features are the CNN features linearly interpolated to the window's frame
     count (the reference's ceil(n_cnn / 2) at 25 fps); any fps works the same way.
  9. The frozen content encoder is not part of the state dict (it is rebuilt from
     ``generator.content_encoder``); the DEE audio encoder is (its top layers train).
 10. ``dee.audio_mel_bins`` (a project option, off in the presets): log-mel frames at the
     encoder's 50 Hz rate concatenated to its features before the DEE audio trunk, as
     AdaMesh's deviation 13. The learning checks use it: a randomly initialised tiny
     wav2vec2 gives the DEE too little prosody to generalise to held-out clips (see
     tests/test_deeptalk_learning.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.align import frames_from_audio
from talkmesh.audio.encoders import build_audio_encoder
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
from talkmesh.methods.deeptalk.configuration import EMOTE_EMOTIONS, STAGES, DEEPTalkConfig
from talkmesh.methods.deeptalk.emotion import DEE, ExpressionEmotionMLP, Gaussian, csd_pairs, sample_embedding
from talkmesh.methods.deeptalk.prior import THVQVAE, CodeDecoder, DecodeOutput, FaceFeatureExtractor
from talkmesh.methods.dualtalker import WAV2VEC2_VOCABULARY, LipReader, feature_loss
from talkmesh.methods.face_slot import FaceModelSlot
from talkmesh.methods.streaming import MotionStream, StreamContext

if TYPE_CHECKING:  # pragma: no cover
    from talkmesh.data.clip import Clip
    from talkmesh.data.dataset import ClipDataset
    from talkmesh.face.flame import FlameLayer

__all__ = ["DEEPTalk", "swap_pairs"]

N_EXPRESSION = 50
MOTION_DIM = 53
PROTOTYPE_CLIPS = 32  # per emotion (deviation 6)
READER_SCALE_CLIPS = 200  # clips the lip reader's input scale is measured on
SAMPLE_K = 5  # samples per clip for sample_diversity (metrics.md §8.3)
GENERATOR_MODULES = ("audio_proj", "emotion_map", "condition", "face", "decoder")


class Windows(NamedTuple):
    """Training windows cropped from a batch (deviation 5)."""

    params: torch.Tensor  # (B, W, 53)
    audio: torch.Tensor  # (B, W * spf) samples of the same span
    valid: torch.Tensor  # (B, W) bool
    labels: torch.Tensor  # (B,) class index, -1 = none
    actors: torch.Tensor  # (B,) training-actor index, -1 = none


def swap_pairs(batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The swap partners (§6.2): items 2k and 2k+1 exchange emotion audio. Returns the
    partner index (B,) (an odd batch's last item is its own partner) and the paired mask (B,)."""
    idx = torch.arange(batch, device=device)
    partner = idx + 1 - 2 * (idx % 2)  # (B,) 1, 0, 3, 2, ...
    paired = partner < batch
    return torch.where(paired, partner, idx), paired


# --------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------


class DEEPTalk(MotionMethod):
    """DEEPTalk on FLAME expression | jaw parameters (see the module docstring)."""

    name: ClassVar[str] = "deeptalk"
    config_class: ClassVar[type[DEEPTalkConfig]] = DEEPTalkConfig
    style_version: ClassVar[int] = 1
    stages: ClassVar[tuple[str, ...]] = STAGES
    conditioning: ClassVar[Literal["reference", "onehot"]] = "onehot"  # the actor one-hot (metrics.md §6.1)
    template_input: ClassVar[Literal["vertices", "shape"]] = "shape"
    trains_on_vertices: ClassVar[bool] = False  # V(.) at zero shape is built here, from params
    generate_options: ClassVar[tuple[str, ...]] = (
        "sample", "temp_top", "temp_bottom", "logvar_scale", "seed", "audio_emotion", "emotion", "intensity",
    )
    style_options: ClassVar[tuple[str, ...]] = ("source",)
    method_metric_names: ClassVar[tuple[str, ...]] = (
        "emo_retrieval_expr_to_audio", "emo_retrieval_audio_to_expr", "emo_retrieval", "emo_retrieval_chance",
        "emo_acc", "emo_fd_dee", "sample_diversity_params",
    )
    config: DEEPTalkConfig

    def __init__(self, config: DEEPTalkConfig, facts: DataFacts) -> None:
        if not isinstance(config, DEEPTalkConfig):
            raise TypeError(f"config must be DEEPTalkConfig, got {type(config).__name__}")
        super().__init__(config, facts)
        if facts.num_train_subjects < 1:
            raise ValueError("DEEPTalk needs at least one training actor (the actor one-hot)")
        if config.default_actor >= facts.num_train_subjects:
            raise ValueError(f"default_actor={config.default_actor} but there are {facts.num_train_subjects} actors")
        lips = config.lip_indices or facts.lip_indices
        if not lips:
            raise ValueError("DEEPTalk's lip reader needs lip vertices: the corpus has no lip region and "
                             "lip_indices is empty")
        cfg, g = config, config.generator
        self.n_actors = facts.num_train_subjects
        self._class_of = {code: k for k, code in enumerate(cfg.emotion_classes)}
        content = build_audio_encoder(g.content_encoder)  # frozen, kept out of the state dict (deviation 9)
        content.eval()
        object.__setattr__(self, "_content", content)
        object.__setattr__(self, "_face", FaceModelSlot("deeptalk", N_EXPRESSION, facts.num_vertices))

        self.fer = ExpressionEmotionMLP(cfg.fer, cfg.n_emotions, MOTION_DIM)
        self.dee = DEE(cfg.dee, cfg.fer.feature_dim)
        self.vq = THVQVAE(cfg.vq)
        self.reader = LipReader(
            num_vertices=max(facts.num_vertices, max(lips) + 1), lip_indices=lips, d_model=cfg.vq.reader.d_model,
            layers=cfg.vq.reader.layers, heads=cfg.vq.reader.heads, ff_mult=cfg.vq.reader.ff_mult,
            dropout=cfg.vq.reader.dropout, feature_dim=content.hidden_size, n_tokens=len(WAV2VEC2_VOCABULARY),
            ctc_upsample=2, full_face=False,
        )
        e = cfg.dee.embed_dim
        self.audio_proj = nn.Linear(content.hidden_size, g.d)  # 768 -> 128
        self.emotion_map = nn.Linear(e, e)
        self.condition = nn.Linear(e + self.n_actors, g.d)  # [emotion | actor one-hot] -> d
        self.face = FaceFeatureExtractor(g)
        self.decoder = CodeDecoder(g, cfg.vq.top_codes, cfg.vq.bottom_codes, cfg.vq.top_dim)
        self._dee_trainable = {id(p) for p in self.dee.parameters() if p.requires_grad}
        self.tau = g.tau_start
        self.register_buffer("emotion_prototypes", torch.zeros(cfg.n_emotions, e))
        self.register_buffer("emotion_prototype_logvar", torch.zeros(cfg.n_emotions, e))
        self.register_buffer("emotion_prototype_counts", torch.zeros(cfg.n_emotions))
        self.register_buffer("stages_fitted", torch.zeros(len(STAGES), dtype=torch.bool))  # fit_stage ran
        self.set_stage(self.stage)

    # ================================================================== plumbing
    def _apply(self, fn: Any, recurse: bool = True) -> DEEPTalk:
        """``.to()`` / ``.cuda()`` also move the frozen content encoder and the face model."""
        super()._apply(fn, recurse)
        self._content._apply(fn)
        self._face.apply(fn)
        return self

    @property
    def default_style(self) -> str:
        """The ``default_actor``'s name (what ``generate(style=None)`` uses, D11)."""
        return self.facts.train_subjects[self.config.default_actor]

    @property
    def content_encoder(self) -> nn.Module:
        """The frozen wav2vec 2.0 of the content path (not a submodule, deviation 9)."""
        return self._content

    def _stage_modules(self, stage: str) -> list[nn.Module]:
        return {
            "fer": [self.fer],
            "dee": [self.dee],
            "vq": [self.vq, self.reader],
            "stage1": self.generator_modules(),
            "stage2": self.generator_modules(),
        }[stage]

    def generator_modules(self) -> list[nn.Module]:
        """The generator's trainable parts (§6.1): audio projection, emotion map, condition,
        face-feature extractor, code predictors."""
        return [getattr(self, n) for n in GENERATOR_MODULES]

    def set_stage(self, stage: str) -> None:
        """Select the stage; only its modules require grad (the DEE audio encoder keeps its own
        frozen lower layers)."""
        super().set_stage(stage)
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self._stage_modules(stage):
            for p in module.parameters():
                p.requires_grad_(module is not self.dee or id(p) in self._dee_trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> DEEPTalk:
        """As ``nn.Module.train``, but every module the stage does not train stays in eval mode
        (D18); ``reference_dee_train_mode`` lets the frozen DEE follow ``mode`` (Q18)."""
        super().train(mode)
        if mode:
            trained = {id(m) for m in self._stage_modules(self.stage)}
            keep_dee = self.config.generator.reference_dee_train_mode and self.stage in ("stage1", "stage2")
            for m in (self.fer, self.dee, self.vq, self.reader, *self.generator_modules()):
                if id(m) not in trained and not (keep_dee and m is self.dee):
                    m.eval()
        return self

    @property
    def reference_seconds(self) -> float:
        return float(self.config.reference_seconds)

    # ---- face model (README G10, D15) ----------------------------------------------------
    def set_face_model(self, layer: FlameLayer | None) -> None:
        """Use ``layer`` (50 expression components) for vertices; the model keeps its own copy."""
        self._face.set(layer, self.device)

    def face_model(self) -> FlameLayer | None:
        """The injected face model, else ``config.face_model`` (loaded once), else None."""
        return self._face.get(self.config.face_model, self.device)

    def _require_face(self) -> FlameLayer:
        face = self.face_model()
        if face is None:
            raise RuntimeError(
                f"deeptalk stage {self.stage!r} computes its losses on FLAME vertices: set model.face_model to the "
                "FLAME file (the jobs do it from the corpus) or inject one with set_face_model"
            )
        return face

    def flame_offsets(self, params: torch.Tensor) -> torch.Tensor:
        """V(X) - V(0) (B, T, V, 3) of params (B, T, 53) at zero shape, pose [0, 0, 0, jaw] (§2)."""
        face = self._require_face()
        b, t = params.shape[:2]
        flat = params.reshape(b * t, MOTION_DIM)  # (B*T, 53)
        verts = face(None, flat[:, :N_EXPRESSION], flat[:, N_EXPRESSION:])  # (B*T, V, 3)
        zero = params.new_zeros(1, N_EXPRESSION)
        neutral = face(None, zero, params.new_zeros(1, 3))  # (1, V, 3)
        return (verts - neutral).reshape(b, t, -1, 3)

    # ================================================================== labels and windows
    def emotion_class(self, codes: torch.Tensor) -> torch.Tensor:
        """EMOTE codes (B,) -> class indices (B,) (-1 stays -1); a code not in
        ``emotion_classes`` is an error (Q20)."""
        out = []
        for c in codes.tolist():
            if c < 0:
                out.append(-1)
            elif c in self._class_of:
                out.append(self._class_of[c])
            else:
                name = EMOTE_EMOTIONS[c] if c < len(EMOTE_EMOTIONS) else "?"
                raise ValueError(f"batch['emotion']: code {c} ({name}) is not one of model.emotion_classes "
                                 f"{list(self.config.emotion_classes)}")
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _labels(self, batch: Batch) -> torch.Tensor:
        labels = self.emotion_class(torch.as_tensor(batch["emotion"]))
        if bool((labels < 0).any()):
            raise ValueError(f"deeptalk stage {self.stage!r} needs batch['emotion'] labels on every clip")
        return labels

    def _motion(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "params" not in batch:
            raise KeyError("DEEPTalk needs batch['params'] (FLAME expression | jaw; use a FLAME-parameter corpus, "
                           "e.g. data.format=mead or data.synthetic_flavour=flame)")
        params = batch["params"].to(self.device, torch.float32)[..., :MOTION_DIM]  # (B, T, 53)
        mask = batch.get("motion_mask")
        b, t = params.shape[:2]
        valid = torch.ones(b, t, dtype=torch.bool, device=self.device) if mask is None else mask.to(self.device, bool)
        return params, valid

    def crop_windows(self, batch: Batch, frames: int, multiple: int = 4) -> Windows:
        """Per item a random span of W = min(frames, shortest item) frames, rounded down to
        ``multiple`` (deviation 5), with its audio."""
        params, valid = self._motion(batch)
        lengths = valid.sum(1)  # (B,)
        w = min(frames, int(lengths.min())) // multiple * multiple
        if w < multiple:
            shortest = int(lengths.min())
            raise ValueError(f"deeptalk: training clips need at least {multiple} motion frames, got {shortest}")
        spf = self.facts.samples_per_frame
        n = round(w * spf)
        audio = batch["audio"].to(self.device, torch.float32)  # (B, S)
        audio = F.pad(audio, (0, max(0, round(params.shape[1] * spf) + n - audio.shape[1])))
        starts = [int(torch.randint(0, int(x) - w + 1, ())) for x in lengths.tolist()]
        p = torch.stack([params[i, s : s + w] for i, s in enumerate(starts)])  # (B, W, 53)
        a = torch.stack([audio[i, round(s * spf) : round(s * spf) + n] for i, s in enumerate(starts)])  # (B, n)
        actors = torch.as_tensor(batch.get("subject", [-1] * len(starts)), device=self.device).long()
        labels = self.emotion_class(torch.as_tensor(batch.get("emotion", [-1] * len(starts))))
        return Windows(p, a, torch.ones(p.shape[:2], dtype=torch.bool, device=self.device), labels, actors)

    # ================================================================== fitting and schedules
    def fit_stage(self, dataset: ClipDataset) -> dict[str, float]:
        """fer: the class weights (inverse frequency over training frames, §3.2); vq: the lip
        reader's input scale (RMS of the lip offsets); stage1: the emotion prototypes. Marks the
        stage in ``stages_fitted``; the generator stages first check their inputs
        (:meth:`check_inputs_trained`)."""
        self.check_inputs_trained()
        self.stages_fitted[STAGES.index(self.stage)] = True
        if self.stage == "fer":
            counts = torch.zeros(self.config.n_emotions)
            for i, seq in enumerate(dataset.sequences):  # the index holds labels and lengths (no decoding)
                code = seq.emotion if seq.emotion is not None else dataset[i].emotion
                k = int(self.emotion_class(torch.tensor([-1 if code is None else code]))[0])
                if k < 0:
                    raise ValueError(f"clip {seq.name!r} has no emotion label; the fer stage needs one on every clip")
                counts[k] += seq.num_frames
            self.fer.set_class_weights(counts)
            return {f"frames_{EMOTE_EMOTIONS[c]}": float(counts[k]) for k, c in enumerate(self.config.emotion_classes)}
        if self.stage == "vq":
            return self._fit_reader_scale(dataset)
        if self.stage == "stage1":
            return self._fit_prototypes(dataset)
        return {}

    def check_inputs_trained(self) -> None:
        """The generator stages start from the priors (§6.4): stage1 needs the fer, dee and vq
        stages behind it, stage2 also stage1 (their ``fit_stage`` marks, carried in the
        checkpoint that ``train.init_from`` loads); a ValueError names what is missing."""
        need = {"stage1": ("fer", "dee", "vq"), "stage2": ("fer", "dee", "vq", "stage1")}.get(self.stage, ())
        missing = [s for s in need if not bool(self.stages_fitted[STAGES.index(s)])]
        if missing:
            raise ValueError(
                f"deeptalk stage {self.stage!r} starts from the earlier stages' weights, but this model has not been "
                f"through {missing}: set train.init_from to the previous stage's checkpoint (the job chains them)"
            )

    @torch.no_grad()
    def _fit_reader_scale(self, dataset: ClipDataset) -> dict[str, float]:
        total, count = 0.0, 0
        lips = self.reader.lip_index
        for i in range(min(len(dataset), READER_SCALE_CLIPS)):
            params = torch.as_tensor(np.asarray(dataset[i].params), dtype=torch.float32, device=self.device)
            off = self.flame_offsets(params[None, :, :MOTION_DIM])[0][:, lips]  # (T, L, 3)
            total += float(off.square().sum())
            count += off.numel()
        rms = math.sqrt(total / max(count, 1))
        if not rms > 0:
            raise ValueError("the training motion has no lip movement: cannot scale the lip reader")
        self.reader.set_input_scale(rms, rms)
        return {"reader_scale_lips": rms}

    @torch.no_grad()
    def _fit_prototypes(self, dataset: ClipDataset) -> dict[str, float]:
        n, e = self.config.n_emotions, self.config.dee.embed_dim
        mu, logvar, counts = torch.zeros(n, e), torch.zeros(n, e), torch.zeros(n)
        with self.eval_mode():
            for i, seq in enumerate(dataset.sequences):
                if bool((counts >= PROTOTYPE_CLIPS).all()):
                    break
                clip = dataset[i] if seq.emotion is None else None  # the index usually holds the label
                code = seq.emotion if clip is None else clip.emotion
                k = int(self.emotion_class(torch.tensor([-1 if code is None else code]))[0])
                if k < 0 or counts[k] >= PROTOTYPE_CLIPS:
                    continue
                g = self.audio_emotion(torch.as_tensor((clip if clip is not None else dataset[i]).audio))
                mu[k] += g.mu[0].cpu()
                logvar[k] += g.logvar[0].cpu()
                counts[k] += 1
        seen = counts > 0
        mu[seen] = F.normalize(mu[seen] / counts[seen, None], dim=-1)
        logvar[seen] = logvar[seen] / counts[seen, None]
        self.emotion_prototypes.copy_(mu)
        self.emotion_prototype_logvar.copy_(logvar)
        self.emotion_prototype_counts.copy_(counts)
        return {"prototype_clips": float(counts.sum())}

    def on_epoch_start(self, epoch: int) -> None:
        """The Gumbel temperature: linear from ``tau_start`` at epoch 0 to ``tau_end`` at the
        stage's last epoch (§6.4)."""
        g = self.config.generator
        epochs = {"stage1": g.stage1_epochs, "stage2": g.stage2_epochs}.get(self.stage, 1)
        frac = 1.0 if epochs <= 1 else min(1.0, max(0, int(epoch)) / (epochs - 1))
        self.tau = g.tau_start + (g.tau_end - g.tau_start) * frac

    # ================================================================== training
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The current stage's loss on a batch: ``params`` (B, T, 53), ``motion_mask`` (B, T),
        ``audio`` (B, S), ``emotion`` (B,) EMOTE codes, ``subject`` (B,) actor indices."""
        if self.stage == "fer":
            return self._fer_loss(batch)
        if self.stage == "dee":
            return self._dee_loss(batch)
        if self.stage == "vq":
            return self._vq_loss(batch)
        return self._generator_loss(batch)

    def _fer_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        params, valid = self._motion(batch)
        labels = self._labels(batch)  # (B,)
        frames = params[valid]  # (N, 53)
        frame_labels = labels[:, None].expand_as(valid)[valid]  # (N,)
        x = self.fer.augment(frames) if self.training else frames
        ce = self.fer.loss(x, frame_labels)
        loss, logs = weighted_loss({"fer_ce": ce}, {"fer_ce": 1.0})
        with torch.no_grad():
            logs["fer_acc"] = float((self.fer(frames).argmax(-1) == frame_labels).float().mean())
        return loss, logs

    def dee_windows(self, batch: Batch, start: Literal["random", "fixed"] = "random") -> tuple[torch.Tensor, ...]:
        """One DEE window per item (deviation 5; metrics.md §9 ``fixed``: 0.2 s in): audio
        (B, S_w), audio lengths (B,), expression params (B, F, 53), valid frames (B, F)."""
        d = self.config.dee
        params, valid = self._motion(batch)
        lengths = valid.sum(1)
        spf = self.facts.samples_per_frame
        n_f, n_s = d.exp_window_frames, round(d.window_s * 16000)
        audio = batch["audio"].to(self.device, torch.float32)
        a_len = torch.as_tensor(batch.get("audio_lengths", [audio.shape[1]] * len(lengths))).to(self.device)
        out_a, out_al, out_p, out_v = [], [], [], []
        for i, n in enumerate(lengths.tolist()):
            fixed = round(0.2 * self.facts.fps)
            s = min(fixed, max(0, n - n_f)) if start == "fixed" else int(torch.randint(0, max(1, n - n_f + 1), ()))
            f = min(n_f, n - s)
            p = params.new_zeros(n_f, MOTION_DIM)
            p[:f] = params[i, s : s + f]
            a0 = round(s * spf)
            a = audio[i, a0 : min(a0 + n_s, int(a_len[i]))]
            out_a.append(F.pad(a, (0, n_s - a.shape[0])))
            out_al.append(max(a.shape[0], 400))
            out_p.append(p)
            out_v.append(torch.arange(n_f, device=self.device) < f)
        return (torch.stack(out_a), torch.tensor(out_al, device=self.device), torch.stack(out_p), torch.stack(out_v))

    def expression_emotion(self, params: torch.Tensor, valid: torch.Tensor | None = None) -> Gaussian:
        """DEE expression embedding of params (B, T, 53) through the MLP's eval-mode features."""
        return self.dee.encode_expression(self.fer.features(params), valid)  # (B, T, F) -> Gaussian

    def _dee_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        audio, a_len, params, valid = self.dee_windows(batch)
        labels = self._labels(batch)
        a = self.dee.encode_audio(audio, a_len)
        e = self.expression_emotion(params, valid)
        total, parts = self.dee.loss(e, a, labels)
        loss, logs = weighted_loss({"dee": total}, {"dee": 1.0})
        logs.update({f"dee_{k}": float(v.detach()) for k, v in parts.items()})
        logs.update({"dee_alpha": float(self.dee.alpha.detach()), "dee_beta": float(self.dee.beta.detach())})
        return loss, logs

    def content_features(self, audio: torch.Tensor, frames: int | torch.Tensor) -> torch.Tensor:
        """Frozen wav2vec 2.0 (B, S) -> (B, T, H): CNN features interpolated to ``frames``
        before the transformer (deviation 8); per-utterance normalisation inside (Q19)."""
        with torch.no_grad():
            return self._content(audio.to(self.device), None, num_frames=frames).features

    def _vq_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config.vq
        win = self.crop_windows(batch, self.config.window_frames)
        target = self.flame_offsets(win.params)  # (B, W, V, 3)
        out = self.vq(win.params)
        rec = F.mse_loss(self.flame_offsets(out.recon), target)
        commit = out.top.loss + out.bottom.loss
        feats = self.content_features(win.audio, win.params.shape[1])  # (B, W, H)
        reading = self.reader(target, win.valid)
        terms = {"vq_rec": rec, "vq_commit": commit, "reader_feat": feature_loss(
            reading.features, feats, win.valid, cfg.reader.feat_loss)}
        loss, logs = weighted_loss(terms, {"vq_rec": cfg.rec_weight, "vq_commit": cfg.commit_weight,
                                           "reader_feat": cfg.reader.weight})
        logs.update({"vq_used_top": float(out.top.used), "vq_used_bottom": float(out.bottom.used),
                     "vq_perplexity_top": float(out.top.perplexity),
                     "vq_perplexity_bottom": float(out.bottom.perplexity)})
        return loss, logs

    # ---- the generator ----------------------------------------------------------------
    def audio_emotion(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> Gaussian:
        """DEE audio Gaussian of raw audio (B, S) (the first ``dee.max_seconds``)."""
        a = audio.to(self.device, torch.float32)
        return self.dee.encode_audio(a if a.ndim == 2 else a[None], lengths)

    def style_vector(self, emotion: torch.Tensor, actors: torch.Tensor, frames: int) -> torch.Tensor:
        """S (B, T, d): [emotion_map(z) | actor one-hot] -> Linear, repeated over T (§6.1 item 2).
        An actor index of -1 gives a zero one-hot."""
        onehot = F.one_hot(actors.clamp_min(0), self.n_actors).to(emotion) * (actors >= 0)[:, None]  # (B, A)
        s = self.condition(torch.cat([self.emotion_map(emotion), onehot], dim=-1))  # (B, d)
        return s[:, None].expand(-1, frames, -1)

    def decode_motion(
        self, audio: torch.Tensor, emotion: torch.Tensor, actors: torch.Tensor, frames: int, **mode: Any
    ) -> DecodeOutput:
        """Audio (B, S), emotion vectors (B, E), actors (B,) -> codes and motion (B, T, 53),
        T = ``frames`` (a multiple of 4); ``mode`` as :meth:`CodeDecoder.forward`."""
        a = self.audio_proj(self.content_features(audio, frames))  # (B, T, d)
        face = self.face(a, self.style_vector(emotion, actors, frames))  # (B, T, d)
        return self.decoder(face, self.vq, **mode)

    def emotion_loss(self, target: Gaussian, motion: torch.Tensor) -> torch.Tensor:
        """L_emo (§6.2) between the audio Gaussian (B, E) and the DEE expression Gaussian of
        ``motion`` (B, T, 53): "csd" = BCE(-alpha CSD + beta, 1) with the DEE's alpha / beta,
        "mean" = ||mu_a - mu_e||^2; mean over the batch."""
        e = self.expression_emotion(motion)
        if self.config.generator.emo_loss == "mean":
            return (target.mu - e.mu).square().sum(-1).mean()
        logit = -self.dee.alpha.detach() * csd_pairs(e.mu, e.logvar, target.mu, target.logvar) + self.dee.beta.detach()
        return F.softplus(-logit).mean()  # = BCE-with-logits(logit, 1)

    def lip_loss(self, pred_offsets: torch.Tensor, gt_offsets: torch.Tensor) -> torch.Tensor:
        """L_lip = 1 - mean_t cos(r_hat_t, r_t) of the frozen lips-only reader's latents (§6.3)."""
        r_hat = self.reader.encode(pred_offsets)  # (B, T, d)
        with torch.no_grad():
            r = self.reader.encode(gt_offsets)
        return (1.0 - F.cosine_similarity(r_hat, r, dim=-1)).mean()

    def _generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.config.generator
        win = self.crop_windows(batch, self.config.window_frames)
        b, w = win.params.shape[:2]
        with torch.no_grad():  # the frozen DEE (eval mode unless reference_dee_train_mode, Q18)
            cond = self.audio_emotion(win.audio)  # (B, E) audio Gaussian
        out = self.decode_motion(win.audio, cond.mu, win.actors, w, mode="gumbel", tau=self.tau)
        gt = self.flame_offsets(win.params)  # (B, W, V, 3)
        pred = self.flame_offsets(out.motion)
        terms = {"rec": F.mse_loss(pred, gt), "emo": self.emotion_loss(cond, out.motion)}
        if self.stage == "stage2":
            terms["lip"] = self.lip_loss(pred, gt)
            if g.use_swap and b >= 2:
                terms.update(self.swap_terms(win, cond, gt))
        weights = dataclasses.asdict(g.loss_weights)
        loss, logs = weighted_loss(terms, {k: weights[k] for k in terms})
        logs["tau"] = float(self.tau)
        logs["emo_to_rec"] = logs["emo_weighted"] / max(logs["rec_weighted"], 1e-30)  # §6.4 monitoring point
        return loss, logs

    def swap_terms(self, win: Windows, cond: Gaussian, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The swap branch (§6.2, D4, Q17): items 2k / 2k+1 exchange their emotion audio and
        keep content and actor. swap_emo = L_emo(partner's audio, swapped output); swap_lip
        compares each swapped output with the ground truth of its own content audio (or, with
        ``reference_swap_lip_pairing``, the ground truth of its partner, at tau 0.1)."""
        g = self.config.generator
        partner, paired = swap_pairs(win.params.shape[0], self.device)
        idx = torch.nonzero(paired).squeeze(1)  # paired items
        ref = g.reference_swap_lip_pairing
        swapped_cond = Gaussian(cond.mu[partner], cond.logvar[partner])
        tau = 0.1 if ref else self.tau
        out = self.decode_motion(win.audio, swapped_cond.mu, win.actors, win.params.shape[1], mode="gumbel", tau=tau)
        pred = self.flame_offsets(out.motion)  # (B, W, V, 3)
        lip_pred = pred[partner] if ref else pred  # reference: GT i against the output driven by i's partner
        return {
            "swap_emo": self.emotion_loss(Gaussian(swapped_cond.mu[idx], swapped_cond.logvar[idx]), out.motion[idx]),
            "swap_lip": self.lip_loss(lip_pred[idx], gt[idx]),
        }

    # ================================================================== inference
    def frames_for_audio(self, num_samples: int) -> int:
        """Frames for ``num_samples`` samples: CNN frames / 50 x fps (FaceFormer's "interp" rule)."""
        return frames_from_audio(int(num_samples), self.facts.fps, basis="encoder",
                                 encoder_rate=self._content.output_rate)

    def emotion_condition(
        self,
        audio: torch.Tensor,
        style: StyleState | None,
        *,
        audio_emotion: torch.Tensor | np.ndarray | None = None,
        emotion: str | int | None = None,
        intensity: float = 1.0,
    ) -> Gaussian:
        """The emotion Gaussian (1, E), the first that applies: a label's prototype, the DEE of
        ``audio_emotion`` (both explicit requests, so they override a style's emotion and keep
        its actor), a style's stored embedding, or (default) the DEE of the driving ``audio`` (1, S)."""
        if emotion is not None and audio_emotion is not None:
            raise ValueError("emotion and audio_emotion both set: give one emotion source")
        if emotion is not None:
            return self.prototype(emotion, intensity)
        if audio_emotion is not None:
            return self.audio_emotion(self.as_audio(audio_emotion))
        if style is not None and style["emotion_source"] != "driving":
            return Gaussian(style["emotion_mu"].to(self.device)[None], style["emotion_logvar"].to(self.device)[None])
        return self.audio_emotion(audio)

    def prototype(self, emotion: str | int, intensity: float = 1.0) -> Gaussian:
        """The emotion prototype (deviation 6) of a label (name or EMOTE code) at
        ``intensity`` in [0, 1]: normalise(n + s (p - n)) with n the neutral prototype."""
        code = EMOTE_EMOTIONS.index(emotion) if isinstance(emotion, str) and emotion in EMOTE_EMOTIONS else emotion
        if not isinstance(code, int) or code not in self._class_of:
            names = [EMOTE_EMOTIONS[c] for c in self.config.emotion_classes]
            raise ValueError(f"emotion: unknown label {emotion!r}; this model knows {names}")
        if not (0.0 <= float(intensity) <= 1.0):
            raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
        k = self._class_of[code]
        if float(self.emotion_prototype_counts[k]) == 0:
            raise ValueError(f"emotion: no prototype for {EMOTE_EMOTIONS[code]!r} (fitted at the start of stage1 "
                             "from training clips of that emotion)")
        p, lv = self.emotion_prototypes[k], self.emotion_prototype_logvar[k]
        n = self._class_of.get(0)
        if n is not None and float(self.emotion_prototype_counts[n]) > 0:
            p = self.emotion_prototypes[n] + float(intensity) * (p - self.emotion_prototypes[n])
            lv = self.emotion_prototype_logvar[n] + float(intensity) * (lv - self.emotion_prototype_logvar[n])
        return Gaussian(F.normalize(p, dim=-1)[None], lv[None])

    @torch.no_grad()
    def infer(
        self,
        audio: torch.Tensor,
        frames: int,
        actors: torch.Tensor,
        emotion: Gaussian,
        *,
        sample: bool = False,
        temp_top: float | None = None,
        temp_bottom: float | None = None,
        logvar_scale: float | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Batched inference (§7, D19): audio (B, S) of equal length, ``frames`` T, actors (B,),
        emotion Gaussians (B, E) -> params (B, T, 53). The audio is zero-padded so that the
        frame count is a multiple of 4 only when needed, and the output trimmed to T. Argmax
        codes unless ``sample``; then the emotion is sampled with scale c and the codes at the
        temperatures, all from a generator seeded with ``seed``."""
        s = self.config.sampling
        t4 = -(-frames // 4) * 4
        spf = self.facts.samples_per_frame
        a = audio.to(self.device, torch.float32)
        if t4 != frames:
            a = F.pad(a, (0, max(0, round(t4 * spf) - a.shape[1])))
        if not sample:
            out = self.decode_motion(a, emotion.mu, actors, t4, mode="argmax")
            return out.motion[:, :frames]
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        c = s.logvar_scale if logvar_scale is None else float(logvar_scale)
        z = sample_embedding(emotion, c, gen)  # (B, E)
        out = self.decode_motion(
            a, z, actors, t4, mode="sample", temp_top=s.temp_top if temp_top is None else float(temp_top),
            temp_bottom=s.temp_bottom if temp_bottom is None else float(temp_bottom), generator=gen,
        )
        return out.motion[:, :frames]

    def generate(
        self,
        audio: torch.Tensor | np.ndarray,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None = None,
        *,
        sample: bool = False,
        temp_top: float | None = None,
        temp_bottom: float | None = None,
        logvar_scale: float | None = None,
        seed: int = 0,
        audio_emotion: torch.Tensor | np.ndarray | None = None,
        emotion: str | int | None = None,
        intensity: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Animate one utterance (§7, §9): audio (S,) or (1, S) raw 16 kHz; template a FLAME
        shape (100,), a (V, 3) neutral mesh or None. ``style``: a StyleState (its actor and,
        unless it defers to the driving audio, its emotion), a training actor (index or name)
        or None (``default_actor``). Returns ``params`` (T, 53) and, with a face model,
        ``vertices`` (T, V, 3). Deterministic unless ``sample``."""
        a = self.as_audio(audio)  # (1, S)
        t = self.frames_for_audio(a.shape[1])
        if t < 1:
            raise ValueError(f"audio too short: {a.shape[1]} samples give no motion frame")
        state, actor = self._resolve_style(style)
        with self.eval_mode():
            cond = self.emotion_condition(a, state, audio_emotion=audio_emotion, emotion=emotion, intensity=intensity)
            params = self.infer(a, t, torch.tensor([actor], device=self.device), cond, sample=sample,
                                temp_top=temp_top, temp_bottom=temp_bottom, logvar_scale=logvar_scale, seed=seed)[0]
        out = {"params": params}
        verts = self._vertices(params, template)
        if verts is not None:
            out["vertices"] = verts
        return out

    def make_stream(
        self,
        template: torch.Tensor | np.ndarray | None,
        style: StyleState | int | str | None,
        context: StreamContext,
        **options: Any,
    ) -> MotionStream:
        """The default windowed stream (``generate`` on a sliding window). Its emotion, when it
        comes from the driving audio, is each window's (a stream cannot know the utterance's);
        a style's emotion, an ``emotion`` label or ``audio_emotion`` fix it. ``sample=True`` is
        refused: every window would draw its codes afresh, and the motion would jump between
        chunks."""
        if options.get("sample"):
            raise ValueError("sample=True cannot stream (each window would draw new codes); stream the argmax decoding")
        return super().make_stream(template, style, context, **options)

    def _resolve_style(self, style: StyleState | int | str | None) -> tuple[StyleState | None, int]:
        if style is None:
            return None, self.config.default_actor
        if isinstance(style, dict):
            state = self.check_style(style)
            for key in ("emotion_mu", "emotion_logvar", "emotion_source", "actor_index"):
                if key not in state:
                    raise StyleStateError(f"deeptalk style state lacks {key!r}")
            actor = int(state["actor_index"])
            if not 0 <= actor < self.n_actors:
                raise StyleStateError(f"style actor_index {actor} is not one of the {self.n_actors} training actors")
            return state, actor
        return None, self.facts.subject_index(style)

    def _vertices(self, params: torch.Tensor, template: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        """(T, V, 3) vertices of params (T, 53) with a FLAME shape (or zero shape), or the
        expression | jaw displacement added to a (V, 3) template; None without a face model."""
        face = self.face_model()
        if face is None:
            return None
        expr, jaw = params[:, :N_EXPRESSION], params[:, N_EXPRESSION:]
        if template is None:
            return face(None, expr, jaw)
        tmpl = torch.as_tensor(np.asarray(template) if not isinstance(template, torch.Tensor) else template)
        tmpl = tmpl.to(self.device, torch.float32)
        if not bool(torch.isfinite(tmpl).all()):
            raise ValueError("template holds non-finite values")
        if tmpl.ndim == 1 and tmpl.numel() == face.n_shape:
            return face(tmpl[None], expr, jaw)
        tmpl = tmpl.reshape(-1, 3) if tmpl.ndim == 1 and tmpl.numel() % 3 == 0 else tmpl
        if tmpl.shape != (face.num_vertices, 3):
            raise ValueError(f"template must be a FLAME shape ({face.n_shape},), a ({face.num_vertices}, 3) mesh or "
                             f"None, got {tuple(tmpl.shape)}")
        return tmpl[None] + self.flame_offsets(params[None])[0]

    # ================================================================== style (§9)
    def encode_style(
        self,
        reference: Reference | None = None,
        *,
        subject: int | str | None = None,
        source: Literal["audio", "expression"] = "audio",
        **kwargs: Any,
    ) -> StyleState:
        """``{emotion_mu, emotion_logvar, emotion_source, actor_index}``: the emotion from the
        reference's audio (``source="audio"``) or motion (``"expression"``), the actor
        ``default_actor``; with ``subject`` (a training actor), that actor with the emotion of
        the driving audio (``emotion_source="driving"``)."""
        if kwargs:
            raise TypeError(f"deeptalk encode_style: unknown options {sorted(kwargs)}")
        e = self.config.dee.embed_dim
        if subject is not None:
            return make_style_state(self.name, self.style_version, emotion_mu=torch.zeros(e),
                                    emotion_logvar=torch.zeros(e), emotion_source="driving",
                                    actor_index=self.facts.subject_index(subject))
        if reference is None:
            raise ValueError("encode_style needs a reference clip or a subject")
        g = self.reference_emotion(reference, source)
        return make_style_state(self.name, self.style_version, emotion_mu=g.mu[0], emotion_logvar=g.logvar[0],
                                emotion_source=source, actor_index=self.config.default_actor)

    @torch.no_grad()
    def reference_emotion(self, reference: Reference, source: Literal["audio", "expression"]) -> Gaussian:
        """The DEE Gaussian (1, E) of a reference clip's audio or motion (its first
        ``reference_seconds``)."""
        with self.eval_mode():
            if source == "audio":
                audio = reference_field(reference, "audio")
                if audio is None:
                    raise ValueError("reference: source='audio' needs the reference's audio")
                a = self.as_audio(audio)[:, : round(self.reference_seconds * 16000)]
                return self.audio_emotion(a)
            if source != "expression":
                raise ValueError(f"source must be 'audio' or 'expression', got {source!r}")
            params = reference_field(reference, "params")
            if params is None:
                raise ValueError("reference: source='expression' needs the reference's FLAME params (T, 53)")
            p = torch.as_tensor(np.asarray(params), dtype=torch.float32, device=self.device)[:, :MOTION_DIM]
            if p.ndim != 2 or p.shape[1] != MOTION_DIM:
                raise ValueError(f"reference params must be (T, 53), got {tuple(p.shape)}")
            return self.expression_emotion(p[None, : round(self.reference_seconds * self.facts.fps)])

    def adapt(
        self, reference: Reference, *, source: Literal["audio", "expression"] = "audio", **kwargs: Any
    ) -> StyleState:
        """The emotion as :meth:`encode_style`, and the actor whose one-hot gives the lowest
        vertex MSE on the reference (argmax decoding over every actor, §9); all scores are
        stored (``actor_scores`` (A,))."""
        if kwargs:
            raise TypeError(f"deeptalk adapt: unknown options {sorted(kwargs)}")
        state = self.encode_style(reference, source=source)
        audio, params = reference_field(reference, "audio"), reference_field(reference, "params")
        if audio is None or params is None:
            raise ValueError("adapt needs the reference's audio and FLAME params")
        scores = self.actor_scores(self.as_audio(audio), torch.as_tensor(np.asarray(params), dtype=torch.float32))
        fields = {k: v for k, v in state.items() if k not in ("method", "version")}
        fields.update(actor_index=int(scores.argmin()), actor_scores=scores)
        return make_style_state(self.name, self.style_version, **fields)

    @torch.no_grad()
    def actor_scores(self, audio: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Vertex MSE (A,) of argmax decoding of ``audio`` (1, S) under every actor against
        ``params`` (T, 53) (the first ``reference_seconds``)."""
        a = audio[:, : round(self.reference_seconds * 16000)]
        t = min(self.frames_for_audio(a.shape[1]), params.shape[0])
        if t < 1:
            raise ValueError("reference too short: no motion frame")
        target = self.flame_offsets(params[None, :t, :MOTION_DIM].to(self.device))  # (1, T, V, 3)
        with self.eval_mode():
            cond = self.audio_emotion(a)
            actors = torch.arange(self.n_actors, device=self.device)
            emo = Gaussian(cond.mu.expand(self.n_actors, -1), cond.logvar.expand(self.n_actors, -1))
            pred = self.infer(a.expand(self.n_actors, -1), t, actors, emo)  # (A, T, 53)
            off = self.flame_offsets(pred)  # (A, T, V, 3)
        return (off - target).square().mean(dim=(1, 2, 3)).cpu()

    # ================================================================== method metrics
    @torch.no_grad()
    def method_metrics(self, clips: Sequence[Clip]) -> dict[str, float]:
        """DEEPTalk's metrics on whole clips with emotion labels (metrics.md §8.3, §9, §10):
        DEE cross-modal retrieval on one fixed 2 s window per clip, ``emo_acc`` of the
        argmax-generated motion (the MLP's clip logits against the driving audio's label),
        ``emo_fd_dee`` (generated vs ground-truth DEE expression means) and
        ``sample_diversity_params`` (K = 5 seeds, c = 1, the configured temperatures)."""
        from talkmesh.data.dataset import collate_clips
        from talkmesh.eval import metrics as M

        labelled = [c for c in clips if c.emotion is not None and c.emotion in self._class_of and c.params is not None]
        if len(labelled) < 2:
            return {}
        with self.eval_mode():
            labels = self.emotion_class(torch.tensor([c.emotion for c in labelled])).cpu().numpy()
            batch = collate_clips(labelled, [-1] * len(labelled))
            audio, a_len, params, valid = self.dee_windows(batch, "fixed")
            a = self.dee.encode_audio(audio, a_len)
            e = self.expression_emotion(params, valid)
            out = M.retrieval_accuracy(e.mu.cpu().numpy(), e.logvar.exp().cpu().numpy(),
                                               a.mu.cpu().numpy(), a.logvar.exp().cpu().numpy(), labels)
            logits, gen_mu, gt_mu, diversity = [], [], [], []
            for i, clip in enumerate(labelled):
                gen = self.generate(clip.audio, None)["params"]  # (T, 53)
                logits.append(self.fer(gen).mean(0).cpu().numpy())
                gen_mu.append(self.expression_emotion(gen[None]).mu[0].cpu().numpy())
                gt = torch.as_tensor(np.asarray(clip.params), dtype=torch.float32, device=self.device)[:, :MOTION_DIM]
                gt_mu.append(self.expression_emotion(gt[None]).mu[0].cpu().numpy())
                if i < 4:
                    samples = [self.generate(clip.audio, None, sample=True, seed=k)["params"] for k in range(SAMPLE_K)]
                    diversity.append(M.sample_diversity([torch.stack(samples).cpu().numpy()], "params"))
        result = {f"emo_retrieval_{k}": float(v) for k, v in out.items() if k != "mean"}
        result["emo_retrieval"] = float(out["mean"])
        result["emo_acc"] = M.emotion_accuracy(np.stack(logits), labels)
        result["emo_fd_dee"] = M.frechet_distance(np.stack(gen_mu), np.stack(gt_mu))
        result["sample_diversity_params"] = float(np.mean(diversity))
        return result
