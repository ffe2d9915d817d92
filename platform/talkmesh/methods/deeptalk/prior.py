"""DEEPTalk's motion prior and code decoder (specs/deeptalk.md §5, §6.1 items 3-7, §7).

* :func:`symmetric_bias` / :func:`expand_bias`: the non-causal ALiBi attention bias
  -slope_h * floor(|i - j| / p), computed on the fly for any length (Q16), and its
  (B*H, L, L) layout for the float mask of batch-first ``nn.TransformerEncoderLayer``s.
* :class:`THVQVAE`: the temporally hierarchical VQ-VAE (§5): a bottom code every 2 frames
  and a top code every 4 frames, both from EMA codebooks.
* :class:`FaceFeatureExtractor`, :class:`CodePredictor`, :class:`CodeDecoder`: the generator
  after its audio and style inputs (§6.1): face features, the two non-autoregressive code
  predictors, and the one-hot · codebook lookup decoded by a frozen :class:`THVQVAE`. Codes
  are chosen by straight-through hard Gumbel-softmax (training), argmax (the inference
  default, D7) or temperature sampling (§7).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.methods.deeptalk.configuration import GeneratorConfig, VQConfig
from talkmesh.methods.faceformer import alibi_slopes
from talkmesh.nn.vq import VectorQuantizer, VQOutput

__all__ = [
    "MOTION_DIM",
    "CodeDecoder",
    "BiasedEncoderLayer",
    "CodePredictor",
    "DecodeMode",
    "DecodeOutput",
    "FaceFeatureExtractor",
    "ResampleBlock",
    "SymmetricAlibiEncoder",
    "THVQOutput",
    "THVQVAE",
    "expand_bias",
    "gumbel_onehot",
    "select_codes",
    "stack_frames",
    "symmetric_bias",
]

MOTION_DIM = 53  # FLAME expression (50) + jaw axis-angle (3), §2
DecodeMode = Literal["gumbel", "argmax", "sample"]


# --------------------------------------------------------------------------------------
# Attention bias
# --------------------------------------------------------------------------------------


def symmetric_bias(
    n_heads: int, length: int, period: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Non-causal ALiBi bias (H, L, L): bias[h, i, j] = -slope_h * floor(|i - j| / period).
    Period 1 is plain symmetric ALiBi; period 25 the face extractor's periodic bias (§6.1)."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    pos = torch.arange(length, device=device)  # (L,)
    dist = (pos[:, None] - pos[None, :]).abs()  # (L, L) |i - j|
    steps = torch.div(dist, period, rounding_mode="floor").to(torch.float32)  # (L, L)
    slopes = alibi_slopes(n_heads).to(device)  # (H,)
    return -slopes[:, None, None] * steps[None]  # (H, L, L)


def expand_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """(H, L, L) -> (B*H, L, L) in the order batch-first attention expects (row b*H + h)."""
    return bias.repeat(batch, 1, 1)  # (B*H, L, L)


class BiasedEncoderLayer(nn.TransformerEncoderLayer):
    """A post-norm ``nn.TransformerEncoderLayer`` (same parameters and state-dict keys) whose
    forward always takes the reference path: x = norm1(x + SA(x)), x = norm2(x + FF(x)). The
    built-in inference fast path (eval mode without grad) reads a float ``src_mask`` as a
    boolean block mask on CPU (torch 2.13: every non-zero bias blocks attention), which would
    silently drop the ALiBi bias at inference."""

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """src (B, L, d); src_mask (B*H, L, L) or (L, L) additive -> (B, L, d)."""
        attn = self.self_attn(src, src, src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                              need_weights=False, is_causal=is_causal)[0]  # (B, L, d)
        x = self.norm1(src + self.dropout1(attn))  # (B, L, d)
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))  # (B, L, d)
        return self.norm2(x + self.dropout2(ff))  # (B, L, d)


class SymmetricAlibiEncoder(nn.Module):
    """``layers`` post-norm GELU transformer layers (:class:`BiasedEncoderLayer`, batch first)
    sharing the symmetric ALiBi bias of ``period`` as their float attention mask."""

    def __init__(self, d_model: int, heads: int, ff: int, layers: int, dropout: float, period: int = 1) -> None:
        super().__init__()
        self.heads, self.period = int(heads), int(period)
        self.layers = nn.ModuleList(
            BiasedEncoderLayer(d_model, heads, ff, dropout, activation="gelu", batch_first=True)
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d)."""
        bias = symmetric_bias(self.heads, x.shape[1], self.period, x.device).to(x.dtype)  # (H, L, L)
        mask = expand_bias(bias, x.shape[0])  # (B*H, L, L)
        for layer in self.layers:
            x = layer(x, src_mask=mask)  # (B, L, d)
        return x


# --------------------------------------------------------------------------------------
# TH-VQVAE (§5)
# --------------------------------------------------------------------------------------


class ResampleBlock(nn.Module):
    """``conv`` (stride 2, down or up) -> LeakyReLU(0.2) -> BatchNorm1d -> Linear -> one
    symmetric-ALiBi transformer layer: the TH-VQVAE's encoder and decoder stages (§5)."""

    def __init__(self, conv: nn.Module, width: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.conv = conv
        self.act = nn.LeakyReLU(0.2)
        self.norm = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, width)
        self.transformer = SymmetricAlibiEncoder(width, heads, ff, 1, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L', width) with L' = L / 2 (down) or 2 L (up)."""
        h = self.norm(self.act(self.conv(x.transpose(1, 2))))  # (B, width, L')
        return self.transformer(self.linear(h.transpose(1, 2)))  # (B, L', width)


def _down(c_in: int, c_out: int, kernel: int) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, kernel, stride=2, padding=kernel // 2, padding_mode="replicate")


def _up(c_in: int, c_out: int, kernel: int) -> nn.ConvTranspose1d:
    return nn.ConvTranspose1d(c_in, c_out, kernel, stride=2, padding=kernel // 2, output_padding=1)


def _check_length(frames: int, what: str) -> None:
    if frames % 4:
        raise ValueError(f"{what}: the frame count must be divisible by 4 (T/4 top tokens), got {frames}")


def _ema_quantizer(cfg: VQConfig, codes: int, dim: int) -> VectorQuantizer:
    return VectorQuantizer(codes, dim, beta=cfg.beta, mode="ema", decay=cfg.decay, eps=cfg.eps,
                           reference_ema_quirk=cfg.reference_ema_quirk)


class THVQOutput(NamedTuple):
    recon: torch.Tensor  # (B, T, 53)
    top: VQOutput  # on e_t (B, T/4, top_dim); loss = beta * commitment
    bottom: VQOutput  # on concat[d_t, e_b] (B, T/2, bottom_dim)


class THVQVAE(nn.Module):
    """The temporally hierarchical VQ-VAE of §5. Widths from :class:`VQConfig`: encoders
    ``top_dim``, bottom quantiser ``bottom_dim`` = 2 x ``top_dim``, bottom decoder
    ``top_dim + bottom_dim``. Inputs (B, T, 53) with T divisible by 4."""

    def __init__(self, cfg: VQConfig, motion_dim: int = MOTION_DIM) -> None:
        super().__init__()
        top, both, k = cfg.top_dim, cfg.top_dim + cfg.bottom_dim, cfg.kernel
        self.motion_dim = int(motion_dim)
        self.enc_bottom = ResampleBlock(_down(motion_dim, top, k), top, cfg.heads, cfg.ff, cfg.dropout)
        self.enc_top = ResampleBlock(_down(top, top, k), top, cfg.heads, cfg.ff, cfg.dropout)
        self.dec_top = ResampleBlock(_up(top, top, k), top, cfg.heads, cfg.ff, cfg.dropout)
        self.upsample = nn.ConvTranspose1d(top, top, 4, stride=2, padding=1)
        self.dec_bottom = ResampleBlock(_up(both, both, k), both, cfg.heads, cfg.decoder_ff, cfg.dropout)
        self.out = nn.Conv1d(both, motion_dim, k, padding=k // 2)
        self.top_quantizer = _ema_quantizer(cfg, cfg.top_codes, top)
        self.bottom_quantizer = _ema_quantizer(cfg, cfg.bottom_codes, cfg.bottom_dim)

    @property
    def top_codebook(self) -> torch.Tensor:
        """(K_t, top_dim)."""
        return self.top_quantizer.codebook

    @property
    def bottom_codebook(self) -> torch.Tensor:
        """(K_b, bottom_dim)."""
        return self.bottom_quantizer.codebook

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, 53) -> e_b (B, T/2, top_dim), e_t (B, T/4, top_dim)."""
        if x.ndim != 3 or x.shape[-1] != self.motion_dim:
            raise ValueError(f"THVQVAE: expected (B, T, {self.motion_dim}), got {tuple(x.shape)}")
        _check_length(x.shape[1], "THVQVAE")
        e_b = self.enc_bottom(x)  # (B, T/2, top_dim)
        return e_b, self.enc_top(e_b)  # (B, T/2, top_dim), (B, T/4, top_dim)

    def decode_top(self, q_t: torch.Tensor) -> torch.Tensor:
        """q_t (B, T/4, top_dim) -> d_t (B, T/2, top_dim)."""
        return self.dec_top(q_t)  # (B, T/2, top_dim)

    def decode(self, q_t: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        """q_t (B, T/4, top_dim), q_b (B, T/2, bottom_dim) -> (B, T, 53)."""
        up = self.upsample(q_t.transpose(1, 2)).transpose(1, 2)  # (B, T/2, top_dim)
        h = self.dec_bottom(torch.cat([up, q_b], dim=-1))  # (B, T, top_dim + bottom_dim)
        return self.out(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 53)

    def decode_indices(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """Code indices top (B, T/4), bottom (B, T/2) -> (B, T, 53)."""
        q_t = self.top_quantizer.lookup(top)  # (B, T/4, top_dim)
        return self.decode(q_t, self.bottom_quantizer.lookup(bottom))  # (B, T, 53)

    def forward(self, x: torch.Tensor) -> THVQOutput:
        """x (B, T, 53): encode, quantise the top, decode it, quantise concat[d_t, e_b], decode."""
        e_b, e_t = self.encode(x)  # (B, T/2, top_dim), (B, T/4, top_dim)
        top = self.top_quantizer(e_t)  # quantized (B, T/4, top_dim)
        d_t = self.decode_top(top.quantized)  # (B, T/2, top_dim)
        bottom = self.bottom_quantizer(torch.cat([d_t, e_b], dim=-1))  # quantized (B, T/2, bottom_dim)
        return THVQOutput(self.decode(top.quantized, bottom.quantized), top, bottom)


# --------------------------------------------------------------------------------------
# Generator parts (§6.1)
# --------------------------------------------------------------------------------------


class FaceFeatureExtractor(nn.Module):
    """concat[A, S] (2d) -> one transformer layer with the symmetric periodic bias
    (period ``face_period``) -> Linear 2d -> d, giving F (§6.1 item 3)."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.encoder = SymmetricAlibiEncoder(2 * cfg.d, cfg.face_heads, cfg.face_ff, 1, cfg.dropout, cfg.face_period)
        self.proj = nn.Linear(2 * cfg.d, cfg.d)

    def forward(self, audio: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """audio (B, T, d), style (B, T, d) -> F (B, T, d)."""
        h = self.encoder(torch.cat([audio, style], dim=-1))  # (B, T, 2d)
        return self.proj(h)  # (B, T, d)


class CodePredictor(nn.Module):
    """Linear in_dim -> predictor_d -> ``predictor_layers`` symmetric-ALiBi transformer
    layers (dropout 0) -> Linear -> K logits (§6.1 items 4 and 6)."""

    def __init__(self, in_dim: int, cfg: GeneratorConfig, num_codes: int) -> None:
        super().__init__()
        d = cfg.predictor_d
        self.proj_in = nn.Linear(in_dim, d)
        self.encoder = SymmetricAlibiEncoder(d, cfg.predictor_heads, cfg.predictor_ff, cfg.predictor_layers, 0.0)
        self.proj_out = nn.Linear(d, num_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim) -> logits (B, N, K)."""
        return self.proj_out(self.encoder(self.proj_in(x)))  # (B, N, K)


def stack_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, d) -> (B, T/n, n*d): each token holds n consecutive frames, in time order."""
    b, t, d = x.shape
    if t % n:
        raise ValueError(f"stack_frames: T={t} is not divisible by {n}")
    return x.reshape(b, t // n, n * d)  # (B, T/n, n*d)


def gumbel_onehot(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through hard Gumbel-softmax (..., K): the forward value is exactly the
    one-hot of argmax(logits + g), g = -log(-log U); the gradient is that of
    softmax((logits + g) / tau). The noise comes from ``generator`` when given."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)  # (..., K)
    u = u.clamp_min(torch.finfo(logits.dtype).tiny)  # (..., K) avoids log(0)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)  # (..., K)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)  # (..., K)
    return hard + (soft - soft.detach())  # (..., K) value == hard exactly


def select_codes(
    logits: torch.Tensor,
    mode: DecodeMode,
    *,
    tau: float = 1.0,
    temp: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One-hot codes (..., K) from logits (..., K): ``"gumbel"`` straight-through hard
    Gumbel-softmax at ``tau``; ``"argmax"``; ``"sample"`` from softmax(logits / temp)."""
    k = logits.shape[-1]
    if mode == "gumbel":
        return gumbel_onehot(logits, tau, generator)  # (..., K)
    if mode == "argmax":
        return F.one_hot(logits.argmax(-1), k).to(logits.dtype)  # (..., K)
    if mode == "sample":
        if temp <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {temp}")
        probs = torch.softmax(logits.detach().float() / temp, dim=-1).reshape(-1, k)  # (N, K)
        idx = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])  # (...)
        return F.one_hot(idx, k).to(logits.dtype)  # (..., K)
    raise ValueError(f'mode must be "gumbel", "argmax" or "sample", got {mode!r}')


class DecodeOutput(NamedTuple):
    motion: torch.Tensor  # (B, T, 53)
    logits_top: torch.Tensor  # (B, T/4, K_t)
    logits_bottom: torch.Tensor  # (B, T/2, K_b)
    onehot_top: torch.Tensor  # (B, T/4, K_t)
    onehot_bottom: torch.Tensor  # (B, T/2, K_b)


class CodeDecoder(nn.Module):
    """The two code predictors and the lookup through a frozen TH-VQVAE (§6.1 items 4-7):
    top logits from 4 stacked frames of F; bottom logits from 2 stacked frames of F
    concatenated with d_t = DEC_top(one-hot_t · Z^t); motion = decode(q_t, one-hot_b · Z^b)."""

    def __init__(self, cfg: GeneratorConfig, top_codes: int, bottom_codes: int, top_dim: int) -> None:
        super().__init__()
        self.top = CodePredictor(4 * cfg.d, cfg, top_codes)
        self.bottom = CodePredictor(2 * cfg.d + top_dim, cfg, bottom_codes)

    def forward(
        self,
        face: torch.Tensor,
        vq: THVQVAE,
        *,
        mode: DecodeMode,
        tau: float = 1.0,
        temp_top: float = 1.0,
        temp_bottom: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        """face F (B, T, d), T divisible by 4; ``vq`` is frozen and not a submodule. ``tau``
        is read by "gumbel", ``temp_top`` / ``temp_bottom`` by "sample"; ``generator`` feeds
        both (the bottom codes are drawn given the drawn top codes)."""
        _check_length(face.shape[1], "CodeDecoder")
        logits_t = self.top(stack_frames(face, 4))  # (B, T/4, K_t)
        onehot_t = select_codes(logits_t, mode, tau=tau, temp=temp_top, generator=generator)  # (B, T/4, K_t)
        q_t = onehot_t @ vq.top_codebook.to(onehot_t.dtype)  # (B, T/4, top_dim)
        d_t = vq.decode_top(q_t)  # (B, T/2, top_dim)
        logits_b = self.bottom(torch.cat([stack_frames(face, 2), d_t], dim=-1))  # (B, T/2, K_b)
        onehot_b = select_codes(logits_b, mode, tau=tau, temp=temp_bottom, generator=generator)  # (B, T/2, K_b)
        q_b = onehot_b @ vq.bottom_codebook.to(onehot_b.dtype)  # (B, T/2, bottom_dim)
        return DecodeOutput(vq.decode(q_t, q_b), logits_t, logits_b, onehot_t, onehot_b)
