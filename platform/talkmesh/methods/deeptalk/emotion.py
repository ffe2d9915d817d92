"""DEEPTalk's emotion networks (specs/deeptalk.md §3-§4): the per-frame expression-emotion
MLP, the generalised pooling operator (GPO), and the probabilistic joint audio/expression
emotion embedding (DEE) with its closed-form sampled distance (CSD) matching loss.

* :class:`ExpressionEmotionMLP` (§3.2, D1): 53-d FLAME expression + jaw per frame -> emotion
  logits; :meth:`ExpressionEmotionMLP.features` is the eval-mode pre-activation of one hidden
  block, DEE's expression input.
* :class:`GPO` (§4.3): attention pooling over channel-wise sorted features, with weights
  from a GRU over sinusoidal position codes; only valid (unpadded) frames take part.
* :class:`DEE` (§4.2-§4.4): E_audio (a ``transformers`` speech encoder + transformer heads)
  and E_exp (a transformer over MLP features), each giving a diagonal Gaussian
  (:class:`Gaussian`) with a unit-norm mean; trained with L_match + w * L_VIB.
* Functions: :func:`csd_matrix`, :func:`csd_pairs`, :func:`match_matrix`, :func:`match_loss`,
  :func:`vib_loss`, :func:`sample_embedding` (§4.6).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.encoders import build_audio_encoder
from talkmesh.audio.mel import log_mel, mel_filterbank
from talkmesh.methods.deeptalk.configuration import DEEConfig, FERConfig
from talkmesh.nn.motion_encoder import sinusoidal_encoding

__all__ = [
    "DEE",
    "GPO",
    "ExpressionEmotionMLP",
    "Gaussian",
    "GaussianHead",
    "csd_matrix",
    "csd_pairs",
    "match_loss",
    "match_matrix",
    "sample_embedding",
    "vib_loss",
]


# --------------------------------------------------------------------------------------
# Expression-emotion MLP (§3)
# --------------------------------------------------------------------------------------


class ExpressionEmotionMLP(nn.Module):
    """Per-frame expression-emotion classifier (§3.1 layer sizes, §3.2 replacement).

    in_dim -> hidden... -> n_emotions; every hidden block is Linear -> BatchNorm1d ->
    LeakyReLU(0.01) -> Dropout(cfg.dropout). ``class_weights`` (buffer, (n_emotions,))
    weights the cross entropy; :meth:`set_class_weights` fills it from class counts.
    """

    def __init__(self, cfg: FERConfig, n_emotions: int, in_dim: int = 53) -> None:
        super().__init__()
        if n_emotions < 2 or in_dim < 1:
            raise ValueError(f"need n_emotions >= 2 and in_dim >= 1, got {n_emotions}, {in_dim}")
        self.cfg = cfg
        self.in_dim = in_dim
        self.n_emotions = n_emotions
        self.feature_dim: int = cfg.feature_dim
        self.feature_index: int = cfg.feature_block % len(cfg.hidden)  # python index -> 0-based block
        widths = (in_dim, *cfg.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.LeakyReLU(0.01), nn.Dropout(cfg.dropout))
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(cfg.hidden[-1], n_emotions)
        self.register_buffer("class_weights", torch.ones(n_emotions))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected (..., {self.in_dim}) expression parameters, got {tuple(x.shape)}")
        return x.reshape(-1, self.in_dim)  # (N, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> logits (..., n_emotions), in the module's current mode."""
        h = self._flat(x)  # (N, in_dim)
        for block in self.blocks:
            h = block(h)  # (N, hidden_i)
        return self.head(h).reshape(*x.shape[:-1], self.n_emotions)  # (..., K)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> (..., feature_dim): the output of block ``cfg.feature_block``
        after its BatchNorm and before its LeakyReLU (§3.2).

        Always eval-mode semantics, whatever ``self.training`` says: BatchNorm uses the
        running statistics and dropout is off in every block up to that one. Differentiable
        with respect to ``x``.
        """
        h = self._flat(x)  # (N, in_dim)
        for i, block in enumerate(self.blocks):
            linear, bn, act = block[0], block[1], block[2]
            h = F.batch_norm(
                linear(h), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
            )  # (N, hidden_i)
            if i == self.feature_index:
                break
            h = act(h)  # (N, hidden_i)
        return h.reshape(*x.shape[:-1], self.feature_dim)  # (..., F)

    def clip_logits(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, in_dim), valid (B, T) bool -> (B, n_emotions): the mean of the frame
        logits over each clip's valid frames (the clip logit of ``emo_acc``, metrics.md §10).
        Runs in the module's current mode; call it in eval mode for scoring."""
        logits = self(x)  # (B, T, K)
        if valid is None:
            return logits.mean(dim=1)  # (B, K)
        w = valid.to(logits.dtype)[..., None]  # (B, T, 1)
        return (logits * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, K)

    @torch.no_grad()
    def set_class_weights(self, counts: torch.Tensor) -> None:
        """Inverse-frequency weights w_c = N / (K n_c) from per-class counts (n_emotions,)
        (§3.1): N = sum of counts, K = number of classes with n_c > 0; w_c = 0 where n_c = 0."""
        n = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)  # (K,)
        if n.numel() != self.n_emotions or bool((n < 0).any()):
            raise ValueError(f"counts must be {self.n_emotions} non-negative numbers, got {n.tolist()}")
        present = n > 0  # (K,)
        k = int(present.sum())
        if k == 0:
            raise ValueError("counts are all zero")
        w = torch.where(present, n.sum() / (k * n.clamp_min(1e-12)), torch.zeros_like(n))  # (K,)
        self.class_weights.copy_(w.to(self.class_weights))

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, in_dim) -> (N, in_dim) (§3.1): each sample, with probability ``cfg.aug_prob``,
        gets N(0, cfg.aug_std^2) noise on a random subset of round(cfg.aug_fraction * in_dim)
        of its parameters (a fresh subset per sample). Random numbers come from ``generator``
        (drawn on its device) or the global RNG."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"augment expects (N, {self.in_dim}), got {tuple(x.shape)}")
        n, d = x.shape
        dev = generator.device if generator is not None else x.device
        apply = torch.rand(n, 1, generator=generator, device=dev) < self.cfg.aug_prob  # (N, 1)
        ranks = torch.rand(n, d, generator=generator, device=dev).argsort(dim=1).argsort(dim=1)  # (N, D)
        chosen = ranks < round(self.cfg.aug_fraction * d)  # (N, D) exactly k True per row
        noise = torch.randn(n, d, generator=generator, device=dev) * self.cfg.aug_std  # (N, D)
        mask = (apply & chosen).to(x.device, x.dtype)  # (N, D)
        return x + noise.to(x.device, x.dtype) * mask  # (N, D)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross entropy of frames x (N, in_dim) with labels (N,) in [0, K)."""
        logits = self(x)  # (N, K)
        return F.cross_entropy(logits, labels.long(), weight=self.class_weights.to(logits.dtype))


# --------------------------------------------------------------------------------------
# GPO (§4.3)
# --------------------------------------------------------------------------------------


def _lengths_of(valid: torch.Tensor | None, b: int, length: int, device: torch.device) -> torch.Tensor:
    """(B,) valid-frame counts of a prefix mask valid (B, L) (None = all valid); checked."""
    if valid is None:
        return torch.full((b,), length, dtype=torch.long, device=device)
    if valid.shape != (b, length):
        raise ValueError(f"valid must be ({b}, {length}), got {tuple(valid.shape)}")
    valid = valid.to(device=device, dtype=torch.bool)  # (B, L)
    lengths = valid.to(torch.long).sum(dim=1)  # (B,)
    prefix = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, L)
    if not torch.equal(prefix, valid):
        raise ValueError("valid must mark a prefix of each row (padding at the end)")
    if b and int(lengths.min()) < 1:
        raise ValueError("every item needs at least one valid frame")
    return lengths


class GPO(nn.Module):
    """Generalised pooling operator (§4.3): (B, L, C) -> (B, C).

    Position weights: ``d_pe``-d sinusoidal codes of positions 0..n-1 -> bidirectional GRU
    (hidden ``d_pe``, the two directions averaged) -> Linear(d_pe -> 1, no bias) ->
    softmax(score / temperature) over the n valid positions. Every channel is sorted in
    descending order over the valid frames, and the output is the weighted sum of the
    sorted values. The weights depend on the valid length n only, so the GRU runs once per
    distinct length on exactly n positions: padding never changes an item's result.
    """

    def __init__(self, d_pe: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if d_pe < 2 or d_pe % 2 or temperature <= 0:
            raise ValueError(f"GPO needs an even d_pe >= 2 and temperature > 0, got {d_pe}, {temperature}")
        self.d_pe = d_pe
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_pe, num_layers=1, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_pe, 1, bias=False)

    def position_weights(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(length,) pooling weights for an item with ``length`` valid frames (they sum to 1)."""
        pe = sinusoidal_encoding(length, self.d_pe).to(device)[None]  # (1, n, d)
        out, _ = self.gru(pe)  # (1, n, 2d)
        out = 0.5 * (out[..., : self.d_pe] + out[..., self.d_pe :])  # (1, n, d)
        scores = self.score(out)[0, :, 0]  # (n,)
        return torch.softmax(scores / self.temperature, dim=0)  # (n,)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C), valid (B, L) bool prefix mask (None = all valid) -> (B, C)."""
        b, length, c = x.shape
        lengths = _lengths_of(valid, b, length, x.device)  # (B,)
        if b == 0:
            return x.new_zeros(0, c)  # (0, C)
        uniq, inverse = torch.unique(lengths, return_inverse=True)  # (U,), (B,)
        rows = [F.pad(self.position_weights(int(n), x.device).to(x.dtype), (0, length - int(n))) for n in uniq]
        weights = torch.stack(rows)[inverse]  # (B, L), zero past each length
        in_range = torch.arange(length, device=x.device)[None, :] < lengths[:, None]  # (B, L)
        ordered = x.masked_fill(~in_range[..., None], float("-inf")).sort(dim=1, descending=True).values  # (B, L, C)
        ordered = torch.where(in_range[..., None], ordered, torch.zeros_like(ordered))  # (B, L, C) valid first
        return (ordered * weights[..., None]).sum(dim=1)  # (B, C)


# --------------------------------------------------------------------------------------
# CSD algebra and losses (§4.4, §4.6)
# --------------------------------------------------------------------------------------


class Gaussian(NamedTuple):
    """A diagonal Gaussian embedding per item: ``mu`` (B, E), ``logvar`` (B, E) = log sigma^2."""

    mu: torch.Tensor
    logvar: torch.Tensor


def csd_matrix(
    mu_e: torch.Tensor, logvar_e: torch.Tensor, mu_a: torch.Tensor, logvar_a: torch.Tensor
) -> torch.Tensor:
    """(B_e, B_a) closed-form sampled distance (§4.4):
    CSD_ij = ||mu_e,i - mu_a,j||^2 + sum_k (sigma^2_e,i,k + sigma^2_a,j,k).

    mu_e, logvar_e: (B_e, E); mu_a, logvar_a: (B_a, E).
    """
    sq = (mu_e[:, None, :] - mu_a[None, :, :]).pow(2).sum(dim=-1)  # (B_e, B_a)
    return sq + logvar_e.exp().sum(dim=-1)[:, None] + logvar_a.exp().sum(dim=-1)[None, :]  # (B_e, B_a)


def csd_pairs(
    mu_e: torch.Tensor, logvar_e: torch.Tensor, mu_a: torch.Tensor, logvar_a: torch.Tensor
) -> torch.Tensor:
    """(B,) CSD of aligned pairs (item i with item i); all inputs (B, E)."""
    sq = (mu_e - mu_a).pow(2).sum(dim=-1)  # (B,)
    return sq + logvar_e.exp().sum(dim=-1) + logvar_a.exp().sum(dim=-1)  # (B,)


def match_matrix(labels: torch.Tensor, mode: Literal["label", "identity"] = "label") -> torch.Tensor:
    """(B, B) float match matrix M (§4.4): ``"label"`` M_ij = [y_i == y_j] (D8),
    ``"identity"`` M = I (the released trainer, Q15). labels: (B,)."""
    y = labels.reshape(-1)  # (B,)
    if mode == "label":
        return (y[:, None] == y[None, :]).to(torch.float32)  # (B, B)
    if mode == "identity":
        return torch.eye(y.numel(), device=y.device)  # (B, B)
    raise ValueError(f'match mode must be "label" or "identity", got {mode!r}')


def match_loss(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """L_match = 2 * mean over all B^2 pairs of BCE-with-logits(logit_ij, M_ij) (§4.4);
    the 2 stands for the two (identical under CSD) retrieval directions."""
    return 2.0 * F.binary_cross_entropy_with_logits(logits, match.to(logits.dtype), reduction="mean")


def vib_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_VIB = -1/2 mean(1 + log sigma^2 - mu^2 - sigma^2) over all entries of (B, E) (§4.4)."""
    return -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())


def sample_embedding(g: Gaussian, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, E) sampled emotion vector (§4.6): normalise(mu + eps * exp(scale * logvar / 2)),
    eps ~ N(0, I); ``scale`` is the log-variance scale c (c < 1 widens the spread when
    sigma < 1). Noise is drawn on ``generator``'s device (or the global RNG)."""
    dev = generator.device if generator is not None else g.mu.device
    eps = torch.randn(g.mu.shape, generator=generator, device=dev).to(g.mu.device, g.mu.dtype)  # (B, E)
    return F.normalize(g.mu + eps * torch.exp(0.5 * scale * g.logvar), dim=-1)  # (B, E)


# --------------------------------------------------------------------------------------
# DEE (§4.2-§4.4)
# --------------------------------------------------------------------------------------


def _encoder_layer(d: int, cfg: DEEConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        d, cfg.heads, cfg.ff, cfg.dropout, activation="relu", batch_first=True, norm_first=False
    )


def _encoder(d: int, cfg: DEEConfig, layers: int) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(_encoder_layer(d, cfg), layers, enable_nested_tensor=False)


def _add_positions(h: torch.Tensor) -> torch.Tensor:
    """h (B, L, d) + sinusoidal codes of positions 0..L-1."""
    return h + sinusoidal_encoding(h.shape[1], h.shape[2]).to(h.device, h.dtype)[None]  # (B, L, d)


class GaussianHead(nn.Module):
    """Mean and log-variance heads over a (B, L, d) sequence (§4.3): per branch one post-norm
    encoder layer -> Linear(d -> embed_dim) -> GPO; the mean is L2-normalised, the
    log-variance is unconstrained."""

    def __init__(self, d: int, cfg: DEEConfig) -> None:
        super().__init__()
        self.mean_layer = _encoder_layer(d, cfg)
        self.mean_proj = nn.Linear(d, cfg.embed_dim)
        self.mean_pool = GPO(cfg.gpo_d, cfg.gpo_temperature)
        self.var_layer = _encoder_layer(d, cfg)
        self.var_proj = nn.Linear(d, cfg.embed_dim)
        self.var_pool = GPO(cfg.gpo_d, cfg.gpo_temperature)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> Gaussian:
        """h (B, L, d), valid (B, L) bool -> Gaussian(mu (B, E) unit norm, logvar (B, E))."""
        pad = ~valid  # (B, L) True = padding
        m = self.mean_proj(self.mean_layer(h, src_key_padding_mask=pad))  # (B, L, E)
        v = self.var_proj(self.var_layer(h, src_key_padding_mask=pad))  # (B, L, E)
        mu = F.normalize(self.mean_pool(m, valid), dim=-1)  # (B, E)
        return Gaussian(mu, self.var_pool(v, valid))  # (B, E), (B, E)


class DEE(nn.Module):
    """The probabilistic joint emotion embedding (§4.2-§4.4).

    E_audio: raw 16 kHz audio -> ``build_audio_encoder(cfg.audio_encoder)`` (normalises each
    utterance; its top ``trainable_layers`` train) -> Linear to ``audio_d`` (Identity when the
    widths agree) -> sinusoidal PE -> ``audio_trunk_layers`` post-norm encoder layers ->
    :class:`GaussianHead`. E_exp: (B, T, exp_in) expression features -> Linear(exp_in ->
    exp_d) -> PE -> ``exp_layers`` encoder layers -> :class:`GaussianHead`. Padded frames are
    masked as keys everywhere and excluded from GPO. ``alpha`` and ``beta`` are the learned
    logit scale and shift: logit_ij = -alpha CSD_ij + beta.
    """

    def __init__(self, cfg: DEEConfig, exp_in: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.exp_in = exp_in
        self.embed_dim: int = cfg.embed_dim
        self.audio_encoder = build_audio_encoder(cfg.audio_encoder)
        hidden = self.audio_encoder.hidden_size + cfg.audio_mel_bins  # encoder features [| log-mel]
        self.audio_proj: nn.Module = nn.Linear(hidden, cfg.audio_d) if hidden != cfg.audio_d else nn.Identity()
        self.register_buffer("mel_fbank", mel_filterbank(201, max(cfg.audio_mel_bins, 1)), persistent=False)
        self.audio_trunk = _encoder(cfg.audio_d, cfg, cfg.audio_trunk_layers)
        self.audio_head = GaussianHead(cfg.audio_d, cfg)
        self.exp_proj = nn.Linear(exp_in, cfg.exp_d)
        self.exp_trunk = _encoder(cfg.exp_d, cfg, cfg.exp_layers)
        self.exp_head = GaussianHead(cfg.exp_d, cfg)
        self.alpha = nn.Parameter(torch.tensor(float(cfg.alpha_init)))
        self.beta = nn.Parameter(torch.tensor(float(cfg.beta_init)))

    @property
    def max_samples(self) -> int:
        """Audio samples E_audio reads at most (the first ``cfg.max_seconds``, Q7 / D14)."""
        return int(round(self.cfg.max_seconds * self.audio_encoder.sample_rate))

    def encode_audio(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> Gaussian:
        """audio (B, S) raw 16 kHz, zero-padded past lengths (B,) (None = all S) -> Gaussian (B, E)."""
        cut = self.max_samples
        audio = audio[:, :cut]  # (B, S')
        if lengths is not None:
            lengths = lengths.clamp(max=audio.shape[1])  # (B,)
        out = self.audio_encoder(audio, lengths)  # features (B, N, H), lengths (B,)
        feats = out.features
        n = feats.shape[1]
        valid = torch.arange(n, device=feats.device)[None, :] < out.lengths[:, None]  # (B, N)
        if self.cfg.audio_mel_bins:  # the project's mel option: log-mel frames at the same 50 Hz rate
            mel = log_mel(audio, lengths, self.mel_fbank)[:, :n]  # (B, N, M)
            feats = torch.cat([feats, mel * valid[..., None].to(mel.dtype)], dim=-1)  # (B, N, H + M)
        h = _add_positions(self.audio_proj(feats))  # (B, N, audio_d)
        h = self.audio_trunk(h, src_key_padding_mask=~valid)  # (B, N, audio_d)
        return self.audio_head(h, valid)

    def encode_expression(self, features: torch.Tensor, valid: torch.Tensor | None = None) -> Gaussian:
        """features (B, T, exp_in), valid (B, T) bool prefix mask (None = all) -> Gaussian (B, E)."""
        if features.ndim != 3 or features.shape[2] != self.exp_in:
            raise ValueError(f"expected (B, T, {self.exp_in}) expression features, got {tuple(features.shape)}")
        b, t, _ = features.shape
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=features.device)  # (B, T)
        valid = valid.to(device=features.device, dtype=torch.bool)  # (B, T)
        h = _add_positions(self.exp_proj(features))  # (B, T, exp_d)
        h = self.exp_trunk(h, src_key_padding_mask=~valid)  # (B, T, exp_d)
        return self.exp_head(h, valid)

    def pair_logits(self, e: Gaussian, a: Gaussian) -> torch.Tensor:
        """(B_e, B_a) logits -alpha * CSD(e_i, a_j) + beta (§4.4)."""
        return -self.alpha * csd_matrix(e.mu, e.logvar, a.mu, a.logvar) + self.beta  # (B_e, B_a)

    def loss(self, e: Gaussian, a: Gaussian, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_DEE = L_match + vib_weight * L_VIB (§4.4) for aligned expression/audio batches
        (item i of ``e`` and of ``a`` come from clip i, emotion ``labels[i]``).

        M follows ``cfg.match``. L_VIB is summed over both modalities and contributes 0 when
        it exceeds ``cfg.vib_skip``. Returns (total, {"match", "vib"}) with the two terms
        detached (unweighted) for logging.
        """
        b = e.mu.shape[0]
        if a.mu.shape[0] != b or labels.numel() != b:
            raise ValueError(f"expression ({b}), audio ({a.mu.shape[0]}) and labels ({labels.numel()}) must align")
        logits = self.pair_logits(e, a)  # (B, B)
        l_match = match_loss(logits, match_matrix(labels.to(logits.device), self.cfg.match))
        l_vib = vib_loss(e.mu, e.logvar) + vib_loss(a.mu, a.logvar)
        vib_term = torch.where(l_vib > self.cfg.vib_skip, torch.zeros_like(l_vib), l_vib)
        total = l_match + self.cfg.vib_weight * vib_term
        return total, {"match": l_match.detach(), "vib": l_vib.detach()}
