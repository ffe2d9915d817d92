"""Conformer blocks (Gulati et al., "Conformer: Convolution-augmented Transformer for Speech
Recognition", arXiv:2005.08100), in the pre-norm, macaron layout of WeNet's encoder that
AdaMesh's released backbone uses (specs/adamesh.md §3.2):

    x = x + 1/2 * FFN(LN(x))            macaron half feed-forward
    x = x + MHSA_rel(LN(x))             self-attention with relative positions
    x = x + Conv(LN(x))                 convolution module
    x = x + 1/2 * FFN(LN(x))
    x = LN(x)

Convolution module: pointwise Conv1d d -> 2d, GLU, depthwise Conv1d (kernel k, groups d),
BatchNorm, Swish, pointwise Conv1d d -> d. Its three convolutions are plain ``nn.Conv1d``
attributes ``pw1``, ``dw``, ``pw2``, so adapters (``talkmesh.nn.lora``) can wrap them.

Relative positions follow Transformer-XL (Dai et al., arXiv:1901.02860): the score of
query i and key j is ``(q_i + u) k_j + (q_i + v) W_p p_{i-j}`` with sinusoidal embeddings
``p`` of the signed distance i - j and learned biases u, v per head. (WeNet's encoder
drops the relative shift and so scores absolute positions; here the shift is kept, so a
block is translation-equivariant apart from the sequence edges.)

Masks: ``mask`` (B, T) is True on valid frames. Padded keys are never attended to, and
padded frames are zeroed before the depthwise convolution so they do not leak into the
valid ones. Outputs at padded frames are unspecified; callers mask them.

Also here: :class:`Conv2dSubsampling2`, the 2x temporal subsampling input layer
(Conv2d 3x3 stride 2 over the (time, feature) plane + ReLU + Linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConformerBlock",
    "ConformerEncoder",
    "Conv2dSubsampling2",
    "ConvolutionModule",
    "FeedForward",
    "RelPositionMultiHeadAttention",
    "relative_sinusoids",
]


def relative_sinusoids(length: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Sinusoidal embeddings (2L - 1, dim) of the signed distances L-1, L-2, ..., -(L-1)
    (row r holds distance L - 1 - r): [sin(d w_0), cos(d w_0), sin(d w_1), ...],
    w_i = 10000^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"relative_sinusoids: dim must be even, got {dim}")
    dist = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)[:, None]  # (2L-1, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(2 * length - 1, dim, device=device)
    pe[:, 0::2] = torch.sin(dist * freq)
    pe[:, 1::2] = torch.cos(dist * freq)
    return pe


class FeedForward(nn.Module):
    """Linear d -> ff, Swish, dropout, Linear ff -> d."""

    def __init__(self, d_model: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, ff)
        self.w2 = nn.Linear(ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(F.silu(self.w1(x))))  # (B, T, d)


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (module docstring)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        if (d_model // heads) % 2:
            raise ValueError(f"the head width d_model/heads={d_model // heads} must be even")
        self.heads = heads
        self.d_k = d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d); mask (B, T) True on valid frames -> (B, T, d)."""
        b, t, d = x.shape
        h, dk = self.heads, self.d_k
        q = self.q(x).view(b, t, h, dk)  # (B, T, H, dk)
        k = self.k(x).view(b, t, h, dk).transpose(1, 2)  # (B, H, T, dk)
        v = self.v(x).view(b, t, h, dk).transpose(1, 2)  # (B, H, T, dk)
        p = self.pos(relative_sinusoids(t, d, x.device).to(x.dtype)).view(2 * t - 1, h, dk)  # (2T-1, H, dk)
        ac = torch.einsum("bihc,bhjc->bhij", q + self.pos_bias_u, k)  # (B, H, T, T)
        bd = torch.einsum("bihc,rhc->bhir", q + self.pos_bias_v, p)  # (B, H, T, 2T-1)
        # Relative shift: entry (i, j) takes row r = T - 1 - (i - j) (distance i - j).
        i = torch.arange(t, device=x.device)
        index = (t - 1 - i[:, None] + i[None, :]).expand(b, h, t, t)  # (B, H, T, T)
        bd = torch.gather(bd, 3, index)  # (B, H, T, T)
        scores = (ac + bd) / math.sqrt(dk)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        if mask is not None:  # rows of padded queries may be all -inf -> NaN; zero them
            attn = attn.masked_fill(~mask[:, None, :, None], 0.0)
        out = torch.matmul(self.dropout(attn), v)  # (B, H, T, dk)
        return self.out(out.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class ConvolutionModule(nn.Module):
    """Pointwise (d -> 2d) + GLU, depthwise (kernel k) + BatchNorm + Swish, pointwise (d -> d)."""

    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same-length output), got {kernel}")
        self.pw1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.norm = nn.BatchNorm1d(d_model)
        self.pw2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d), mask (B, T) -> (B, T, d)."""
        y = x.transpose(1, 2)  # (B, d, T)
        if mask is not None:
            y = y * mask[:, None, :].to(y.dtype)
        y = F.glu(self.pw1(y), dim=1)  # (B, d, T)
        if mask is not None:
            y = y * mask[:, None, :].to(y.dtype)
        y = F.silu(self.norm(self.dw(y)))
        return self.pw2(y).transpose(1, 2)  # (B, T, d)


class ConformerBlock(nn.Module):
    """One macaron, pre-norm Conformer block (module docstring)."""

    def __init__(
        self, d_model: int, heads: int, ff: int, kernel: int, dropout: float = 0.1, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model, ff, dropout)
        self.ff2 = FeedForward(d_model, ff, dropout)
        self.attn = RelPositionMultiHeadAttention(d_model, heads, attention_dropout)
        self.conv = ConvolutionModule(d_model, kernel)
        self.norm_ff1 = nn.LayerNorm(d_model)
        self.norm_attn = nn.LayerNorm(d_model)
        self.norm_conv = nn.LayerNorm(d_model)
        self.norm_ff2 = nn.LayerNorm(d_model)
        self.norm_out = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d), mask (B, T) True on valid frames -> (B, T, d)."""
        x = x + 0.5 * self.dropout(self.ff1(self.norm_ff1(x)))
        x = x + self.dropout(self.attn(self.norm_attn(x), mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), mask))
        x = x + 0.5 * self.dropout(self.ff2(self.norm_ff2(x)))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """``blocks`` Conformer blocks; ``forward(x (B, T, d), mask (B, T)) -> (B, T, d)``.
    Blocks are ``self.blocks[i]``; their convolution modules ``self.blocks[i].conv``."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        ff: int,
        kernel: int,
        blocks: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a ConformerEncoder needs >= 1 block, got {blocks}")
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, heads, ff, kernel, dropout, attention_dropout) for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x  # (B, T, d)


class Conv2dSubsampling2(nn.Module):
    """2x temporal subsampling: Conv2d(1 -> C, 3x3, stride 2, padding 1) + ReLU over the
    (time, feature) plane of (B, 2T, F) features, then Linear(C * ceil(F/2) -> d):
    (B, 2T, F) -> (B, T, d). An odd input length N gives ceil(N/2) frames."""

    def __init__(self, in_features: int, d_model: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.out = nn.Linear(channels * ((in_features + 1) // 2), d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x[:, None]))  # (B, C, ceil(N/2), ceil(F/2))
        b, c, t, f = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, c * f))  # (B, T, d)
