"""Gradient reversal (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
Backpropagation", arXiv:1409.7495).

The forward pass is the identity; the backward pass multiplies the incoming gradient by
``-alpha``. A classifier placed after it learns to predict its target while the layers
before it are pushed to remove the information the classifier uses (Mimic's inverse
classifier on content codes, specs/mimic.md §2.5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradientReversal", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = float(alpha)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad, None


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Identity on ``x`` (any shape); gradients flowing back are multiplied by ``-alpha``."""
    return _GradReverse.apply(x, alpha)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; ``alpha`` (>= 0) may be changed between steps."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if not alpha >= 0.0:
            raise ValueError(f"GradientReversal alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
