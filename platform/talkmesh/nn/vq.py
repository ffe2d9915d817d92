"""Vector quantisation (van den Oord et al., "Neural Discrete Representation Learning",
arXiv:1711.00937) with code-usage statistics.

:class:`VectorQuantizer` maps latents (..., D) to their nearest of K codes (squared L2).
Two codebook updates:

* ``"straight_through"`` (gradient): loss = ||sg[z] - e||² + β ||z - sg[e]||² (codebook
  + commitment), the codebook trains with the optimiser (CodeTalker's stage 1 and the
  AdaMesh pose prior, specs/adamesh.md §7.2);
* ``"ema"``: the codebook follows exponential moving averages of the assigned latents
  (decay γ, Laplace-smoothed counts), loss = β ||z - sg[e]||² only; EMA updates happen in
  training mode only. ``reference_ema_quirk=True`` reproduces DEEPTalk's variant
  (specs/deeptalk.md §5, Q11): the Laplace smoothing normalises by b, the number of
  *sequences* in the batch (``forward(..., sequences=b)``), as (N_k + ε) / (b + Kε) · b
  instead of by n = Σ N_k; the smoothed counts are written back into ``ema_counts``; and
  the EMA sums start from their own uniform(±1/K) draw instead of a copy of the codebook.

In both the quantised output carries the straight-through gradient ``z + sg[e - z]``.
Usage: every training-mode call adds its assignments to the ``code_counts`` buffer
(:meth:`usage` = fraction of codes used since :meth:`reset_usage`), and each output reports
the batch ``perplexity`` (exp of the entropy of the code histogram; K when uniform).
``mask`` (...) restricts the loss, the statistics and the EMA update to valid positions.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQOutput", "VectorQuantizer", "code_perplexity"]


class VQOutput(NamedTuple):
    quantized: torch.Tensor  # (..., D) straight-through
    indices: torch.Tensor  # (...) long
    loss: torch.Tensor  # scalar: codebook + beta * commitment (EMA: beta * commitment)
    commitment: torch.Tensor  # scalar ||z - sg[e]||^2 (unweighted)
    perplexity: torch.Tensor  # scalar, of this batch's code histogram
    used: torch.Tensor  # scalar, codes used in this batch


def code_perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the histogram of ``indices`` (any shape) over ``num_codes`` codes."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).to(torch.float32)
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """K codes of width D; see the module docstring."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        mode: Literal["straight_through", "ema"] = "straight_through",
        decay: float = 0.99,
        eps: float = 1e-5,
        reference_ema_quirk: bool = False,
    ) -> None:
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 2 and dim >= 1, got {num_codes}, {dim}")
        if mode not in ("straight_through", "ema"):
            raise ValueError(f"VectorQuantizer mode must be 'straight_through' or 'ema', got {mode!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        if reference_ema_quirk and mode != "ema":
            raise ValueError("reference_ema_quirk needs mode='ema'")
        self.num_codes, self.dim, self.beta, self.mode = int(num_codes), int(dim), float(beta), mode
        self.decay, self.eps = float(decay), float(eps)
        self.reference_ema_quirk = bool(reference_ema_quirk)
        weight = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)  # CodeTalker's init
        if mode == "ema":
            self.register_buffer("codebook", weight)  # (K, D)
            self.register_buffer("ema_counts", torch.zeros(num_codes))
            sums = torch.empty_like(weight).uniform_(-1.0 / num_codes, 1.0 / num_codes) if reference_ema_quirk else None
            self.register_buffer("ema_sums", weight.clone() if sums is None else sums)  # (K, D)
        else:
            self.codebook = nn.Parameter(weight)  # (K, D)
        self.register_buffer("code_counts", torch.zeros(num_codes))

    # ---- lookups -------------------------------------------------------------------------
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (...) of the nearest code to each latent z (..., D)."""
        flat = z.reshape(-1, self.dim)
        e = self.codebook
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return d2.argmin(dim=1).view(z.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., D) of ``indices`` (...)."""
        return F.embedding(indices, self.codebook)

    # ---- statistics --------------------------------------------------------------------
    def usage(self) -> float:
        """Fraction of codes assigned at least once since :meth:`reset_usage` (training calls)."""
        return float((self.code_counts > 0).float().mean())

    def reset_usage(self) -> None:
        self.code_counts.zero_()

    # ---- forward ----------------------------------------------------------------------
    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, sequences: int | None = None) -> VQOutput:
        """z (..., D); mask (...) True where valid (None = all); ``sequences``: the batch's
        sequence count b, read only by ``reference_ema_quirk`` (None = z.shape[0] for z of 3+
        dims, else 1)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: latents must end in {self.dim}, got shape {tuple(z.shape)}")
        idx = self.nearest(z.detach())  # (...)
        e = self.lookup(idx)  # (..., D)
        w = torch.ones(z.shape[:-1], device=z.device, dtype=z.dtype) if mask is None else mask.to(z.dtype)
        denom = (w.sum() * self.dim).clamp_min(1.0)
        commitment = (((z - e.detach()) ** 2).sum(-1) * w).sum() / denom
        if self.mode == "ema":
            loss = self.beta * commitment
            if self.training:
                b = sequences if sequences is not None else (z.shape[0] if z.ndim >= 3 else 1)
                self._ema_update(z.detach(), idx, w, b)
        else:
            codebook = (((z.detach() - e) ** 2).sum(-1) * w).sum() / denom
            loss = codebook + self.beta * commitment
        valid = idx if mask is None else idx[mask.to(torch.bool)]
        if self.training and valid.numel():
            with torch.no_grad():
                self.code_counts += torch.bincount(valid.reshape(-1), minlength=self.num_codes).to(self.code_counts)
        used = torch.tensor(float(valid.unique().numel()), device=z.device)
        quantized = z + (e - z).detach()  # straight-through
        return VQOutput(quantized, idx, loss, commitment.detach(), code_perplexity(valid, self.num_codes), used)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, sequences: int) -> None:
        onehot = F.one_hot(idx.reshape(-1), self.num_codes).to(z.dtype) * w.reshape(-1, 1)  # (N, K)
        counts = onehot.sum(0)  # (K,)
        sums = onehot.t() @ z.reshape(-1, self.dim)  # (K, D)
        self.ema_counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.reference_ema_quirk:  # normalised by the sequence count b, written back (Q11)
            b = float(sequences)
            self.ema_counts.copy_((self.ema_counts + self.eps) / (b + self.num_codes * self.eps) * b)  # (K,)
            smoothed = self.ema_counts  # (K,)
        else:
            n = self.ema_counts.sum()
            smoothed = (self.ema_counts + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sums / smoothed[:, None])

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, mode={self.mode!r}"
