"""Style-adaptive layer normalisation (SALN; Min et al., "Meta-StyleSpeech",
arXiv:2106.03153; used by Mimic's decoder, specs/mimic.md §2.4).

    SALN(x, s) = gamma(s) * LN(x) + beta(s),   [gamma, beta] = Linear(style_dim -> 2 d)(s)

LN has no affine parameters. The gamma half of the projection bias starts at 1 and the
beta half at 0, so with small projection weights SALN starts out as a plain LayerNorm
(exactly LayerNorm without affine parameters when the weights are zero, for any s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StyleAdaptiveLayerNorm"]


class StyleAdaptiveLayerNorm(nn.Module):
    """x (B, T, d) or (B, d), s (B, style_dim) -> same shape as x."""

    def __init__(self, d_model: int, style_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        if d_model < 1 or style_dim < 1:
            raise ValueError(f"d_model and style_dim must be >= 1, got {d_model}, {style_dim}")
        self.d_model = d_model
        self.eps = eps
        self.affine = nn.Linear(style_dim, 2 * d_model)
        with torch.no_grad():
            self.affine.bias[:d_model].fill_(1.0)  # gamma
            self.affine.bias[d_model:].zero_()  # beta

    def modulation(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """style (B, style_dim) -> (gamma, beta), each (B, d); compute once, apply many times."""
        if style.ndim != 2:
            raise ValueError(f"style must be (B, style_dim), got {tuple(style.shape)}")
        gamma, beta = self.affine(style).chunk(2, dim=-1)
        return gamma, beta

    def modulate(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """gamma * LN(x) + beta for x (B, d) or (B, T, d) and a :meth:`modulation`."""
        if gamma.shape[0] != x.shape[0]:
            raise ValueError(f"style batch {gamma.shape[0]} does not match x batch {x.shape[0]}")
        if x.ndim == 3:
            gamma, beta = gamma[:, None], beta[:, None]  # (B, 1, d)
        return gamma * F.layer_norm(x, (self.d_model,), eps=self.eps) + beta

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, *self.modulation(style))
