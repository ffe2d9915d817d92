"""A temporal encoder over per-frame motion vectors (vertex offsets): the stack of Mimic's
content and style encoders (specs/mimic.md §2.1-§2.2), also the speaker-identity network
behind the SCS metric (specs/metrics.md §7.4, :mod:`talkmesh.eval.speaker_id`).

    (B, T, D_in) -> Linear(D_in -> d)
                 -> n_convs x [Conv1d(d -> d, kernel k, stride 1, padding k // 2, no bias) -> norm -> ReLU]
                 -> norm -> Linear(d -> d) -> dropout(proj_dropout)
                 -> sinusoidal positional encoding -> dropout(dropout)
                 -> TransformerEncoder(n_layers, d, n_heads, ff, dropout, ReLU, post-norm, batch-first)
                 -> Linear(d -> d)                                  frame codes (B, T, d)
                 -> optional temporal pooling ("mean" / "max")      clip code (B, d)

``norm`` is ``"instance"`` (per item and channel over time, no affine parameters: the
content encoder) or ``"layer"`` (over channels, with affine parameters: the style
encoder). Padding never changes an item's codes: features at padded frames are zeroed
before every convolution (so the convolution sees exactly its own zero padding), the
instance statistics use valid frames only, the transformer gets a key-padding mask, and
pooling covers valid frames only.

Positional encoding. ``pe="temporal"`` adds the sinusoid of the frame index (computed for
any length). ``pe="batch_quirk"`` reproduces the reference code's bug (mimic.md Q1): a
(max_len, 1, d) table whose first B rows are added to batch-first inputs, so item b gets
the constant PE(b) at every frame and no temporal position at all. ``pe="none"`` adds
nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MotionSequenceEncoder", "masked_instance_norm", "masked_mean", "sinusoidal_encoding"]

NormKind = Literal["instance", "layer"]
PEKind = Literal["temporal", "batch_quirk", "none"]
PoolKind = Literal["mean", "max", "none"]


def sinusoidal_encoding(length: int, d_model: int) -> torch.Tensor:
    """(L, d) transformer sinusoids: pe[t, 2i] = sin(t w_i), pe[t, 2i + 1] = cos(t w_i),
    w_i = 10000^(-2i/d)."""
    if d_model < 2 or d_model % 2:
        raise ValueError(f"d_model must be even and >= 2, got {d_model}")
    pos = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))  # (d/2,)
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of (B, T, C) on valid frames (mask (B, T) True = valid) -> (B, C)."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def masked_instance_norm(x: torch.Tensor, mask: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm of (B, T, C) per item and channel over valid time steps (population
    variance, no affine; ``InstanceNorm1d`` on each unpadded item). Padded frames -> 0."""
    if mask is None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)
    w = mask.to(x.dtype)[..., None]  # (B, T, 1)
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, 1)
    mean = (x * w).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(dim=1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * w


class _Norm(nn.Module):
    def __init__(self, kind: NormKind, d: int) -> None:
        super().__init__()
        if kind not in ("instance", "layer"):
            raise ValueError(f"norm must be 'instance' or 'layer', got {kind!r}")
        self.kind = kind
        self.ln = nn.LayerNorm(d) if kind == "layer" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.ln is not None:
            return self.ln(x)
        return masked_instance_norm(x, mask)


class MotionSequenceEncoder(nn.Module):
    """See the module docstring. ``forward(x (B, T, D_in), mask (B, T) | None)`` returns the
    frame codes (B, T, d) when ``pool="none"``, else the pooled clip code (B, d);
    :meth:`frames` always returns the frame codes."""

    def __init__(
        self,
        in_dim: int,
        d_model: int = 128,
        n_convs: int = 5,
        kernel_size: int = 3,
        norm: NormKind = "instance",
        proj_norm: NormKind | None = None,
        n_layers: int = 4,
        n_heads: int = 4,
        ff_dim: int = 256,
        dropout: float = 0.1,
        proj_dropout: float = 0.0,
        pe: PEKind = "temporal",
        max_len: int = 600,
        pool: PoolKind = "none",
    ) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if d_model < 2 or d_model % 2 or d_model % max(n_heads, 1):
            raise ValueError(f"d_model={d_model} must be even and divisible by n_heads={n_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if pe not in ("temporal", "batch_quirk", "none"):
            raise ValueError(f"pe must be 'temporal', 'batch_quirk' or 'none', got {pe!r}")
        if pool not in ("mean", "max", "none"):
            raise ValueError(f"pool must be 'mean', 'max' or 'none', got {pool!r}")
        self.d_model = d_model
        self.pe_kind = pe
        self.pool = pool
        self.max_len = max_len
        self.input = nn.Linear(in_dim, d_model)
        self.convs = nn.ModuleList(
            nn.Conv1d(d_model, d_model, kernel_size, stride=1, padding=kernel_size // 2, bias=False)
            for _ in range(n_convs)
        )
        self.conv_norms = nn.ModuleList(_Norm(norm, d_model) for _ in range(n_convs))
        self.proj_norm = _Norm(proj_norm or norm, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_dropout = nn.Dropout(proj_dropout)
        self.pe_dropout = nn.Dropout(dropout)
        if n_layers > 0:
            layer = nn.TransformerEncoderLayer(
                d_model, n_heads, ff_dim, dropout, activation="relu", batch_first=True, norm_first=False
            )
            self.transformer: nn.Module | None = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        else:
            self.transformer = None
        self.output = nn.Linear(d_model, d_model)

    def positional(self, x: torch.Tensor) -> torch.Tensor:
        """The PE term added to (B, T, d) features (broadcastable)."""
        b, t, d = x.shape
        if self.pe_kind == "none":
            return x.new_zeros(1, 1, d)
        if self.pe_kind == "temporal":
            return sinusoidal_encoding(t, d).to(x)[None]  # (1, T, d)
        if b > self.max_len:
            raise ValueError(f"reference PE quirk: batch of {b} exceeds the table's max_len={self.max_len}")
        return sinusoidal_encoding(b, d).to(x)[:, None]  # (B, 1, d): constant over time (Q1)

    def frames(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D_in), mask (B, T) True = valid (None = all) -> frame codes (B, T, d)."""
        if x.ndim != 3:
            raise ValueError(f"motion must be (B, T, D), got shape {tuple(x.shape)}")
        keep = None if mask is None else mask.to(x.dtype)[..., None]  # (B, T, 1)
        h = self.input(x)  # (B, T, d)
        for conv, norm in zip(self.convs, self.conv_norms, strict=True):
            if keep is not None:
                h = h * keep  # padding looks like the conv's own zero padding
            h = conv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, d)
            h = F.relu(norm(h, mask))
        h = self.proj_dropout(self.proj(self.proj_norm(h, mask)))  # (B, T, d)
        h = self.pe_dropout(h + self.positional(h))
        if self.transformer is not None:
            pad = None if mask is None else ~mask.to(torch.bool)  # (B, T) True = padding
            h = self.transformer(h, src_key_padding_mask=pad)
        h = self.output(h)  # (B, T, d)
        if keep is not None:
            h = h * keep
        return h

    def pooled(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Temporal pooling of frame codes (B, T, d) over valid frames -> (B, d)."""
        if self.pool == "max":
            if mask is None:
                return frames.max(dim=1).values
            neg = torch.finfo(frames.dtype).min
            return frames.masked_fill(~mask.to(torch.bool)[..., None], neg).max(dim=1).values
        return masked_mean(frames, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.frames(x, mask)
        return h if self.pool == "none" else self.pooled(h, mask)
