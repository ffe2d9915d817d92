"""Speech encoders: wav2vec 2.0 and HuBERT from ``transformers`` (README G6, G7, G8).

One wrapper, :class:`AudioEncoder`, serves every method:

* raw 16 kHz audio in, ``(B, N, H)`` features at 50 Hz out, plus per-item frame counts;
* per-utterance zero-mean / unit-variance normalisation *inside* (G8), computed over each
  item's valid samples only, so callers pass raw, zero-padded audio and ``lengths``;
* padding never changes an item's features: checkpoints whose feature extractor uses
  layer norm (``feat_extract_norm="layer"``, e.g. HuBERT-large) get an attention mask,
  exactly as ``Wav2Vec2FeatureExtractor`` would give them; group-norm checkpoints
  (wav2vec2-base) normalise each conv channel over the whole input and take no mask, so a
  padded batch is encoded item by item at its own length (a batch without padding runs
  in one call);
* optional interpolation of the CNN features *before* the feature projection and the
  transformer (``num_frames``), the FaceFormer/Mimic VOCASET path and DEEPTalk's
  resampled wav2vec (faceformer.md §3.1, mimic.md §2.3, deeptalk.md §6.1), or a cap on
  the CNN frames kept (``max_frames``), FaceFormer's BIWI path: the whole waveform is
  normalised and goes through the CNN, only the transformer sees fewer frames;
* ``normalize=False`` for audio the caller already normalised over a longer utterance
  (chunked encoding of long files, :mod:`talkmesh.audio.chunks`);
* freezing: CNN feature encoder (``freeze_feature_encoder``) and ``trainable_layers``
  (-1 all, 0 none, k = the top k transformer layers, plus the final LayerNorm of
  stable-layer-norm models).

Weights are read from a local directory or the local Hugging Face cache only; nothing is
ever downloaded (:class:`EncoderWeightsMissing` says how to provide them). ``tiny=True``
builds a seeded random encoder with the real convolutional geometry (total stride 320,
receptive field 400 samples), so frame counts equal the real encoders'.
``from_config_only=True`` builds a checkpoint's architecture without its weights, for a model
whose every weight comes from a saved or imported state dict (``talkmesh import``).

``transformers`` is imported inside functions only; importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from talkmesh.audio.align import interpolate_features
from talkmesh.audio.frames import (
    DEFAULT_CONV_KERNEL,
    DEFAULT_CONV_STRIDE,
    as_lengths,
    conv_output_frames,
    valid_lengths,
)
from talkmesh.audio.io import SAMPLE_RATE

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "AudioEncoder",
    "AudioEncoderConfig",
    "AudioEncoderError",
    "AudioFeatures",
    "EncoderKind",
    "EncoderWeightsMissing",
    "WAV2VEC2_BASE_960H_CONFIG",
    "build_audio_encoder",
    "normalize_waveform",
    "tiny_hf_config",
]

EncoderKind = Literal["wav2vec2", "hubert"]

DEFAULT_CHECKPOINTS: dict[str, str] = {
    "wav2vec2": "facebook/wav2vec2-base-960h",
    "hubert": "facebook/hubert-large-ls960-ft",
}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class AudioEncoderError(RuntimeError):
    """An audio encoder cannot be built or run as configured."""


class EncoderWeightsMissing(FileNotFoundError):
    """Pre-trained encoder weights are not on this machine; the message says how to provide them."""


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """Which speech encoder to build and which of its parts train.

    ``name_or_path`` empty means the kind's default checkpoint
    (``facebook/wav2vec2-base-960h`` for wav2vec2, ``facebook/hubert-large-ls960-ft`` for
    hubert; see :attr:`checkpoint`). Keeping the empty default, instead of filling it in,
    means ``replace(cfg, kind="hubert")`` picks the HuBERT checkpoint rather than
    carrying the wav2vec2 one over.
    """

    kind: EncoderKind = "wav2vec2"
    # A Hugging Face repo id (resolved in the local cache only) or a local directory
    # holding config.json + model.safetensors / pytorch_model.bin. "" = kind's default.
    name_or_path: str = ""
    # Random tiny encoder for tests (hidden 32, 2 layers, 2 heads, FF 64, 32 conv
    # channels) with the real conv kernels and strides. No file access.
    tiny: bool = False
    # Build the checkpoint's architecture from its config alone, with seeded random weights
    # that the caller then replaces from a state dict (an imported or a saved model): no
    # weights file is read. The default wav2vec2 checkpoint's config is built in
    # (WAV2VEC2_BASE_960H_CONFIG); any other checkpoint needs its config.json locally.
    from_config_only: bool = False
    # Freeze the convolutional feature encoder (the CNN).
    freeze_feature_encoder: bool = True
    # -1: everything trainable (except the CNN when frozen above); 0: fully frozen
    # (and kept in eval mode); k > 0: only the top k transformer layers (+ the final
    # LayerNorm of stable-layer-norm models) train.
    trainable_layers: int = -1
    # Seed of the random init when tiny=True (the global RNG is left untouched).
    seed: int = 0
    # Which hidden state to return, indexed as HF's classic `hidden_states` tuple:
    # 0 = transformer input, k = output of layer k, L (= -1) = last_hidden_state.
    # An inner layer is read through temporary forward hooks and the layers above it are
    # skipped; do not run one such encoder from several threads at once.
    layer: int = -1
    # SpecAugment masking in training mode, with the checkpoint config's values
    # (faceformer.md Q4). False disables it regardless of the checkpoint config.
    spec_augment: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_CHECKPOINTS:
            raise ValueError(f"audio encoder kind must be one of {sorted(DEFAULT_CHECKPOINTS)}, got {self.kind!r}")
        if self.trainable_layers < -1:
            raise ValueError(f"trainable_layers must be -1 (all), 0 (none) or k > 0, got {self.trainable_layers}")

    @property
    def checkpoint(self) -> str:
        """``name_or_path`` with the kind's default filled in."""
        return self.name_or_path or DEFAULT_CHECKPOINTS[self.kind]


class AudioFeatures(NamedTuple):
    """Output of :meth:`AudioEncoder.forward`."""

    features: torch.Tensor  # (B, N, H), zero beyond each item's length
    lengths: torch.Tensor  # (B,) long, valid frames per item


# --------------------------------------------------------------------------------------
# Normalisation (frame bookkeeping: talkmesh.audio.frames)
# --------------------------------------------------------------------------------------


def normalize_waveform(audio: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-7) -> torch.Tensor:
    """Per-utterance zero mean, unit variance over each item's valid samples; padding -> 0.

    ``audio`` (B, S), ``lengths`` (B,) valid samples (None = all S). For one unpadded
    utterance this is what ``Wav2Vec2FeatureExtractor(do_normalize=True)`` computes
    (population variance, eps 1e-7 inside the square root; README G8).
    """
    x = audio.to(torch.float32)  # (B, S)
    b, s = x.shape
    if lengths is None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)
    mask = torch.arange(s, device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (B, S)
    m = mask.to(x.dtype)
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    mean = (x * m).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(dim=1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * m


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def _classes(kind: str) -> tuple[type, type]:
    if kind == "wav2vec2":
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        return Wav2Vec2Config, Wav2Vec2Model
    from transformers import HubertConfig, HubertModel

    return HubertConfig, HubertModel


def tiny_hf_config(kind: EncoderKind) -> PretrainedConfig:
    """A tiny randomly-initialisable HF config with the real conv geometry (README G6).

    Hidden 32, 2 layers, 2 heads, FF 64, 32 channels in each of the 7 conv layers with the
    default kernels/strides (total stride 320, receptive field 400). The wav2vec2 one
    mirrors wav2vec2-base (group-norm CNN, post-norm transformer); the HuBERT one mirrors
    hubert-large (layer-norm CNN with bias, stable-layer-norm transformer).
    """
    config_cls, _ = _classes(kind)
    common: dict[str, Any] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_kernel=DEFAULT_CONV_KERNEL,
        conv_stride=DEFAULT_CONV_STRIDE,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=32,
        # No LayerDrop in the 2-layer test model: dropping one of two layers at random
        # makes gradient checks depend on the global RNG state.
        layerdrop=0.0,
    )
    if kind == "hubert":
        common.update(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    else:
        common.update(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
    return config_cls(**common)


def _missing_message(cfg: AudioEncoderConfig, reason: str) -> str:
    name = cfg.checkpoint
    model_cls = "Wav2Vec2Model" if cfg.kind == "wav2vec2" else "HubertModel"
    repo = name if not _looks_like_path(name) else DEFAULT_CHECKPOINTS[cfg.kind]
    slug = repo.rsplit("/", 1)[-1]
    return (
        f"{cfg.kind} encoder weights '{name}' are not available on this machine ({reason}). "
        "talkmesh never downloads models at run time. Provide them in one of two ways:\n"
        f"  1. On a machine with internet access run\n"
        f"         huggingface-cli download {repo}\n"
        f"     (or `hf download {repo}`) and copy its Hugging Face cache (~/.cache/huggingface, "
        "or $HF_HOME if set) to the same place on this machine, or point HF_HOME at the copy.\n"
        f"  2. Or save the model to a directory holding config.json plus model.safetensors "
        f"(or pytorch_model.bin), e.g. {model_cls}.from_pretrained('{repo}')"
        f".save_pretrained('/models/{slug}'), and pass name_or_path='/models/{slug}'.\n"
        "For tests and debugging, tiny=True builds a random encoder that needs no files."
    )


def _looks_like_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _load_pretrained(cfg: AudioEncoderConfig) -> PreTrainedModel:
    """Load real weights from a local directory or the local HF cache (never the network)."""
    config_cls, model_cls = _classes(cfg.kind)
    name = cfg.checkpoint
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EncoderWeightsMissing(_missing_message(cfg, f"{local} is a file, not a model directory"))
        if not (local / "config.json").is_file():
            raise EncoderWeightsMissing(_missing_message(cfg, f"{local} has no config.json"))
        if not any((local / f).is_file() for f in _WEIGHT_FILES):
            raise EncoderWeightsMissing(
                _missing_message(cfg, f"{local} has no weights file ({', '.join(_WEIGHT_FILES)})")
            )
        source = str(local)
    elif _looks_like_path(name):
        raise EncoderWeightsMissing(_missing_message(cfg, f"directory {local} does not exist"))
    else:
        source = name
    try:
        config_dict, _ = config_cls.get_config_dict(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EncoderWeightsMissing(_missing_message(cfg, f"no local config: {type(e).__name__}")) from e
    model_type = config_dict.get("model_type")
    if model_type is not None and model_type != cfg.kind:
        raise AudioEncoderError(
            f"'{name}' holds a {model_type!r} model but the encoder kind is {cfg.kind!r}; "
            f"set kind={model_type!r} (or point name_or_path at a {cfg.kind} checkpoint)"
        )
    try:
        model, info = model_cls.from_pretrained(
            source, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise EncoderWeightsMissing(_missing_message(cfg, f"loading failed: {type(e).__name__}: {e}")) from e
    missing = [k for k in (info or {}).get("missing_keys", []) if "masked_spec_embed" not in k]
    if missing:
        raise AudioEncoderError(
            f"'{name}' does not hold complete {cfg.kind} weights; missing {len(missing)} tensors "
            f"(first: {sorted(missing)[:5]}). Refusing to run with randomly initialised layers."
        )
    return model


# facebook/wav2vec2-base-960h's config.json, the fields that shape the model or its training
# (SpecAugment, dropouts); the architecture is also checked by the shapes of any state dict
# loaded into it. Used by from_config_only=True, so no file is needed for this checkpoint.
WAV2VEC2_BASE_960H_CONFIG: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    conv_dim=(512,) * 7,
    conv_kernel=DEFAULT_CONV_KERNEL,
    conv_stride=DEFAULT_CONV_STRIDE,
    conv_bias=False,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    do_stable_layer_norm=False,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    layer_norm_eps=1e-5,
    vocab_size=32,
    apply_spec_augment=True,
    mask_time_prob=0.05,
    mask_time_length=10,
    mask_feature_prob=0.0,
    mask_feature_length=10,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.1,
    feat_proj_dropout=0.1,
    layerdrop=0.1,
)


def _config_only_model(cfg: AudioEncoderConfig) -> PreTrainedModel:
    """The checkpoint's architecture with seeded random weights; reads a config.json at most."""
    config_cls, model_cls = _classes(cfg.kind)
    if cfg.kind == "wav2vec2" and cfg.checkpoint == DEFAULT_CHECKPOINTS["wav2vec2"]:
        hf_cfg = config_cls(**WAV2VEC2_BASE_960H_CONFIG)
    else:
        try:
            hf_cfg = config_cls.from_pretrained(str(Path(cfg.checkpoint).expanduser()), local_files_only=True)
        except (OSError, ValueError) as e:
            raise EncoderWeightsMissing(_missing_message(cfg, f"no local config.json: {type(e).__name__}")) from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return model_cls(hf_cfg)


def build_audio_encoder(cfg: AudioEncoderConfig) -> AudioEncoder:
    """Build the encoder ``cfg`` describes: real local weights, a seeded tiny random one, or
    (``from_config_only``) the checkpoint's architecture whose weights the caller loads.

    Raises :class:`EncoderWeightsMissing` when pre-trained weights are not on this machine.
    """
    if cfg.tiny:
        _, model_cls = _classes(cfg.kind)
        hf_cfg = tiny_hf_config(cfg.kind)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = model_cls(hf_cfg)
    elif cfg.from_config_only:
        model = _config_only_model(cfg)
    else:
        model = _load_pretrained(cfg)
    return AudioEncoder(model, cfg)


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------


class _StopEncoder(Exception):
    """Raised from a layer hook once the requested hidden state is captured."""


class AudioEncoder(nn.Module):
    """wav2vec2/HuBERT wrapper: raw 16 kHz audio (B, S) -> features (B, N, H) at 50 Hz.

    Attributes: ``config`` (AudioEncoderConfig), ``model`` (the HF model), ``hidden_size``
    H, ``num_layers`` L, ``output_rate`` (50.0), ``sample_rate`` (16000),
    ``receptive_field`` (400 samples), ``uses_attention_mask``.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model: PreTrainedModel, config: AudioEncoderConfig) -> None:
        super().__init__()
        hf = model.config
        if getattr(hf, "add_adapter", False):
            raise AudioEncoderError("wav2vec2 checkpoints with an output adapter change the frame rate; not supported")
        self.model = model
        self.config = config
        self.hidden_size: int = int(hf.hidden_size)
        self.num_layers: int = int(hf.num_hidden_layers)
        self._kernels = tuple(int(k) for k in hf.conv_kernel)
        self._strides = tuple(int(s) for s in hf.conv_stride)
        self.output_rate: float = float(self.sample_rate) / float(math.prod(self._strides))
        rf = 1
        for k, s in zip(reversed(self._kernels), reversed(self._strides), strict=True):
            rf = (rf - 1) * s + k
        self.receptive_field: int = rf
        # What Wav2Vec2FeatureExtractor decides: only layer-norm CNNs take an attention mask.
        self.uses_attention_mask: bool = getattr(hf, "feat_extract_norm", "group") == "layer"
        idx = config.layer if config.layer >= 0 else self.num_layers + 1 + config.layer
        if not 0 <= idx <= self.num_layers:
            raise ValueError(f"layer {config.layer} out of range for a {self.num_layers}-layer encoder")
        self._layer_index = idx
        if not config.spec_augment:
            hf.apply_spec_augment = False
        self._fingerprint: tuple[tuple, str] | None = None
        self._apply_freezing()
        if self.frozen:
            self.model.eval()

    # ----------------------------------------------------------------------- freezing
    def _apply_freezing(self) -> None:
        cfg = self.config
        k = cfg.trainable_layers
        if k > self.num_layers:
            raise ValueError(f"trainable_layers={k} but the encoder has {self.num_layers} layers")
        if k == -1:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)
            if k > 0:
                for layer in self.model.encoder.layers[self.num_layers - k :]:
                    for p in layer.parameters():
                        p.requires_grad_(True)
                if getattr(self.model.config, "do_stable_layer_norm", False):
                    # Stable-layer-norm encoders end with a LayerNorm after the last layer.
                    for p in self.model.encoder.layer_norm.parameters():
                        p.requires_grad_(True)
        if cfg.freeze_feature_encoder or k != -1:
            fe = self.model.feature_extractor
            if hasattr(fe, "_freeze_parameters"):
                fe._freeze_parameters()
            else:  # pragma: no cover - older/newer layouts
                for p in fe.parameters():
                    p.requires_grad_(False)

    @property
    def frozen(self) -> bool:
        """True when no parameter requires grad."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> AudioEncoder:
        """As ``nn.Module.train``, but a fully frozen encoder stays in eval mode (no
        dropout, layerdrop or SpecAugment on features nobody trains)."""
        super().train(mode)
        if mode and self.frozen:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ bookkeeping
    def frames_for_samples(self, num_samples: int | torch.Tensor) -> int | torch.Tensor:
        """50 Hz frames for ``num_samples`` samples (int or (B,) tensor), as the model's CNN."""
        return conv_output_frames(num_samples, self._kernels, self._strides)

    def identity(self) -> str:
        """A string naming what determines this encoder's outputs (for feature caches)."""
        cfg = self.config
        parts = [
            f"kind={cfg.kind}",
            f"name={'tiny' if cfg.tiny else cfg.checkpoint}",
            f"layer={self._layer_index}",
            "norm=utterance",
        ]
        if cfg.tiny:
            parts.append(f"seed={cfg.seed}")
        parts.append(f"weights={self.weights_fingerprint()[:24]}")
        return "|".join(parts)

    def weights_fingerprint(self) -> str:
        """sha256 over the HF config and every parameter/buffer (names, dtypes, shapes, bytes).

        Memoised until a tensor is modified in place (``load_state_dict``, an optimiser
        step) or replaced, so a changed encoder never reuses an old fingerprint.
        """
        tensors = list(self.model.state_dict(keep_vars=True).items())
        key = tuple((n, t.data_ptr(), t._version) for n, t in tensors)
        if self._fingerprint is not None and self._fingerprint[0] == key:
            return self._fingerprint[1]
        h = hashlib.sha256()
        conf = self.model.config.to_dict()
        for drop in ("transformers_version", "_name_or_path", "name_or_path"):
            conf.pop(drop, None)
        h.update(json.dumps(conf, sort_keys=True, default=str).encode())
        h.update(f"|tiny={self.config.tiny}|seed={self.config.seed if self.config.tiny else ''}|".encode())
        for name, t in sorted(tensors, key=lambda nt: nt[0]):
            d = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{d.dtype}:{tuple(d.shape)};".encode())
            h.update(d.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
        self._fingerprint = (key, digest)
        return digest

    # ----------------------------------------------------------------------- forward
    def forward(
        self,
        audio: torch.Tensor,
        lengths: torch.Tensor | None = None,
        num_frames: int | torch.Tensor | None = None,
        *,
        max_frames: int | torch.Tensor | None = None,
        normalize: bool = True,
    ) -> AudioFeatures:
        """Encode raw audio.

        audio: (B, S) float, 16 kHz, zero-padded past ``lengths``; not normalised (G8).
        lengths: (B,) valid samples per item, None = all S. Each must be >= the
            receptive field (400 samples).
        num_frames: None -> 50 Hz features, N_b = frames_for_samples(lengths_b).
            int or (B,) -> the CNN features of each item are linearly interpolated
            (align_corners=True) to num_frames_b frames *before* the feature projection
            and the transformer (FaceFormer's VOCASET alignment).
        max_frames: None, or int / (B,) -> only the first min(N_b, max_frames_b) CNN frames
            of each item go on to the feature projection and the transformer; the CNN
            (and the normalisation) still see every valid sample (FaceFormer's BIWI
            trimming). Not combined with num_frames.
        normalize: False skips the per-utterance normalisation (G8): the caller passes
            audio it normalised itself, e.g. one chunk of a longer normalised utterance.
        Returns AudioFeatures(features (B, N, H) zero past each length, lengths (B,)).
        """
        if audio.ndim != 2:
            raise ValueError(f"audio must be (B, S), got shape {tuple(audio.shape)}")
        device = next(self.model.parameters()).device
        x = audio.to(device=device, dtype=torch.float32)  # (B, S)
        lens, targets = self._checked_lengths(x, lengths, num_frames)  # (B,), (B,) or None
        b, s = x.shape
        caps = self._checked_caps(max_frames, targets, b, x.device)  # (B,) or None
        if normalize:
            x = normalize_waveform(x, lens)  # (B, S)
        elif bool((lens != s).any()):
            x = x * (torch.arange(s, device=x.device)[None, :] < lens[:, None]).to(x.dtype)  # padding -> 0
        padded = bool((lens != s).any())
        if self.uses_attention_mask or not (padded or self._ragged(lens, targets, caps)):
            return self._encode(x, lens, targets, padded, caps)
        # Group-norm CNN without attention mask: padding would leak into every frame (and
        # unequal frame counts into the transformer), so each item runs alone.
        outs = [
            self._encode(
                x[i : i + 1, : int(lens[i])],
                lens[i : i + 1],
                None if targets is None else targets[i : i + 1],
                False,
                None if caps is None else caps[i : i + 1],
            )
            for i in range(b)
        ]
        n_max = max(int(o.lengths[0]) for o in outs)
        feats = x.new_zeros(b, n_max, self.hidden_size)  # (B, N, H)
        for i, o in enumerate(outs):
            feats[i, : o.features.shape[1]] = o.features[0]
        return AudioFeatures(feats, torch.cat([o.lengths for o in outs]))

    def _checked_lengths(
        self, x: torch.Tensor, lengths: torch.Tensor | None, num_frames: int | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, S) -> (valid samples (B,), target frames (B,) or None), checked."""
        b, s = x.shape
        lens = valid_lengths(lengths, b, s, x.device, "the padded audio length")  # (B,)
        if b and int(lens.min()) < self.receptive_field:
            raise ValueError(
                f"audio too short: {int(lens.min())} samples; the encoder needs at least "
                f"{self.receptive_field} ({1000 * self.receptive_field / self.sample_rate:.0f} ms)"
            )
        if num_frames is None:
            return lens, None
        targets = as_lengths(num_frames, b, x.device, "num_frames")  # (B,)
        if bool((targets < 1).any()):
            raise ValueError("num_frames must be >= 1")
        return lens, targets

    def _ragged(self, lens: torch.Tensor, targets: torch.Tensor | None, caps: torch.Tensor | None) -> bool:
        """True when the items of an unpadded batch reach the transformer with different
        frame counts (per-item ``num_frames`` or ``max_frames``)."""
        if targets is not None:
            kept = targets  # (B,)
        elif caps is not None:
            n = self.frames_for_samples(lens)  # (B,)
            assert isinstance(n, torch.Tensor)
            kept = torch.minimum(n, caps)
        else:
            return False
        return bool((kept != kept.max()).any())

    def _checked_caps(
        self, max_frames: int | torch.Tensor | None, targets: torch.Tensor | None, b: int, device: torch.device
    ) -> torch.Tensor | None:
        """max_frames -> (B,) long caps on the CNN frames, checked; None stays None."""
        if max_frames is None:
            return None
        if targets is not None:
            raise ValueError("max_frames and num_frames cannot be combined")
        caps = as_lengths(max_frames, b, device, "max_frames")  # (B,)
        if bool((caps < 1).any()):
            raise ValueError("max_frames must be >= 1")
        return caps

    def _encode(
        self,
        x: torch.Tensor,
        lens: torch.Tensor,
        targets: torch.Tensor | None,
        padded: bool,
        caps: torch.Tensor | None = None,
    ) -> AudioFeatures:
        """x (B, S) normalised -> AudioFeatures; the HF model's forward, step by step.
        caps (B,): CNN frames kept per item before the projection (None = all)."""
        model = self.model
        feats = model.feature_extractor(x).transpose(1, 2)  # (B, N, C)
        out_lens = self.frames_for_samples(lens)  # (B,)
        assert isinstance(out_lens, torch.Tensor)
        if caps is not None:
            out_lens = torch.minimum(out_lens, caps.to(out_lens))  # (B,)
            feats = feats[:, : int(out_lens.max())]  # (B, N', C)
        if targets is not None:
            feats = interpolate_features(feats, targets, lengths=out_lens if padded else None)  # (B, T, C)
            out_lens = targets
        n = feats.shape[1]
        valid = torch.arange(n, device=x.device)[None, :] < out_lens[:, None]  # (B, N)
        needs_mask = bool((~valid).any())
        mask = valid if (needs_mask and self.uses_attention_mask) else None

        projected = model.feature_projection(feats)
        hidden = projected[0] if isinstance(projected, tuple) else projected  # (B, N, H)
        hidden = model._mask_hidden_states(hidden, attention_mask=mask)
        hidden = self._run_transformer(hidden, mask)  # (B, N, H)
        if needs_mask:
            hidden = hidden * valid[..., None].to(hidden.dtype)
        return AudioFeatures(hidden, out_lens)

    def _run_transformer(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        encoder = self.model.encoder
        idx = self._layer_index
        if idx == self.num_layers:
            out = encoder(hidden, attention_mask=mask)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # Hidden state idx < L: record the transformer input (the encoder's dropout right
        # before the layers) and the outputs of layers 0..idx-1 (a layer skipped by
        # layerdrop passes its input through), then stop before layer idx runs.
        captured: dict[str, torch.Tensor] = {}
        layers = encoder.layers

        def record(_m: nn.Module, _args: tuple, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, (tuple, list)) else output

        def stop(_m: nn.Module, _args: tuple) -> None:
            raise _StopEncoder

        first = encoder.dropout if isinstance(getattr(encoder, "dropout", None), nn.Module) else None
        handles = []
        if first is not None:
            handles.append(first.register_forward_hook(record))
        else:  # pragma: no cover - layout without an input dropout
            handles.append(layers[0].register_forward_pre_hook(lambda _m, a: captured.__setitem__("h", a[0])))
        handles += [layers[i].register_forward_hook(record) for i in range(idx)]
        handles.append(layers[idx].register_forward_pre_hook(stop))
        try:
            encoder(hidden, attention_mask=mask)
        except _StopEncoder:
            pass
        finally:
            for hd in handles:
                hd.remove()
        return captured["h"]

    # ------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, audio: np.ndarray, num_frames: int | None = None) -> np.ndarray:
        """One raw 16 kHz utterance (S,) -> float32 features (N, H), eval mode, no grad."""
        a = np.asarray(audio, dtype=np.float32)
        if a.ndim != 1:
            raise ValueError(f"encode expects one mono utterance (S,), got shape {a.shape}")
        was_training = self.training
        self.eval()
        try:
            out = self(torch.from_numpy(np.ascontiguousarray(a))[None], num_frames=num_frames)
        finally:
            self.train(was_training)
        n = int(out.lengths[0])
        return out.features[0, :n].detach().to("cpu", torch.float32).numpy()
