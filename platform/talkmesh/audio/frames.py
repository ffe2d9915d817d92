"""Frame bookkeeping shared by the encoders and the alignment to the motion rate.

* :func:`conv_output_frames` - how many 50 Hz frames the wav2vec2/HuBERT CNN gives for a
  number of samples (``DEFAULT_CONV_KERNEL`` / ``DEFAULT_CONV_STRIDE`` are its geometry).
* :func:`as_lengths` / :func:`valid_lengths` - per-item length vectors of a batch, checked.

Both ``talkmesh.audio.encoders`` and ``talkmesh.audio.align`` import from here, and this
module imports neither, so the two never depend on each other in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_CONV_KERNEL", "DEFAULT_CONV_STRIDE", "as_lengths", "conv_output_frames", "valid_lengths"]

# The wav2vec2/HuBERT CNN: 7 conv layers, total stride 320 (50 Hz), receptive field 400.
DEFAULT_CONV_KERNEL: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
DEFAULT_CONV_STRIDE: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)


def conv_output_frames(
    num_samples: int | torch.Tensor,
    kernels: Sequence[int] = DEFAULT_CONV_KERNEL,
    strides: Sequence[int] = DEFAULT_CONV_STRIDE,
) -> int | torch.Tensor:
    """Frames the CNN feature encoder gives for ``num_samples`` samples (0 if too short).

    Applies the per-layer formula ``floor((n - k) / s) + 1`` exactly as the model does;
    with the default geometry it equals ``floor((n - 400) / 320) + 1`` for n >= 400
    (faceformer.md §3.1): 16000 samples -> 49 frames, 32000 -> 99.
    """
    if isinstance(num_samples, torch.Tensor):
        n = num_samples.to(torch.long)
        for k, s in zip(kernels, strides, strict=True):
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp_min(0)
    m = int(num_samples)
    for k, s in zip(kernels, strides, strict=True):
        m = (m - k) // s + 1
    return max(m, 0)


def as_lengths(value: int | torch.Tensor, batch: int, device: torch.device, what: str) -> torch.Tensor:
    """An int (broadcast) or ``batch`` values -> (B,) long tensor on ``device``; ValueError
    naming ``what`` when the count does not match the batch or a value is negative."""
    t = torch.as_tensor(value, device=device).to(torch.long).reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.shape[0] != batch:
        raise ValueError(f"{what} has {t.shape[0]} entries for a batch of {batch}")
    if bool((t < 0).any()):
        raise ValueError(f"{what} must be non-negative")
    return t


def valid_lengths(lengths: torch.Tensor | None, batch: int, size: int, device: torch.device, of: str) -> torch.Tensor:
    """(B,) valid entries per item of a batch padded to ``size``: all of them when ``lengths``
    is None, else ``lengths`` checked by :func:`as_lengths` and against ``size`` (``of``
    names the padded axis in the error, e.g. "the feature length")."""
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    src = as_lengths(lengths, batch, device, "lengths")
    if bool((src > size).any()):
        raise ValueError(f"lengths exceed {of} {size}")
    return src
