"""Aligning 50 Hz speech features to the motion frame rate.

Three pieces, used by the methods as their specs say (the choice is a config value, never
a dataset name):

* :func:`interpolate_features` - linear interpolation along time to an exact frame count,
  ``align_corners=True`` by default: FaceFormer's VOCASET alignment (faceformer.md §3.1,
  also Mimic's VOCASET path and ``interpolation`` option, and DEEPTalk's resampled
  wav2vec). With align_corners the first and last output frames equal the first and last
  input frames.
* :func:`frames_from_audio` - the motion frame count an utterance gives at inference,
  under each spec's rounding rule (examples in its docstring).
* :class:`StridedConvAligner` - learned temporal downsampling (Conv1d with stride
  ``round(in_rate / out_rate)``, e.g. Mimic's kernel-15 stride-2 50 -> 25 Hz conv), with a
  final linear interpolation whenever the conv's length differs from the requested one,
  so any rate ratio lands on the exact target length.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from talkmesh.audio.frames import as_lengths, conv_output_frames, valid_lengths
from talkmesh.audio.io import SAMPLE_RATE

__all__ = ["AlignedFeatures", "StridedConvAligner", "frames_from_audio", "interpolate_features"]

Rounding = Literal["floor", "ceil", "round"]


def interpolate_features(
    feats: torch.Tensor,
    num_frames: int | torch.Tensor,
    lengths: torch.Tensor | None = None,
    align_corners: bool = True,
) -> torch.Tensor:
    """Linearly resample features along time to exactly ``num_frames`` frames.

    feats: (B, N, H). num_frames: int, or (B,) per-item targets T_b. lengths: (B,) valid
    input frames per item (None = all N); frames past an item's length never contribute.
    Returns (B, T, H) with T = max T_b, zero past each item's T_b.

    align_corners=True (FaceFormer): output frame t samples input position
    t * (N_b - 1) / (T_b - 1), so the endpoints map onto each other exactly.
    align_corners=False: PyTorch's half-pixel convention (t + 0.5) * N_b / T_b - 0.5.
    """
    if feats.ndim != 3:
        raise ValueError(f"feats must be (B, N, H), got shape {tuple(feats.shape)}")
    b, n, h = feats.shape
    targets = as_lengths(num_frames, b, feats.device, "num_frames")  # (B,)
    t_max = int(targets.max()) if b else 0
    src = valid_lengths(lengths, b, n, feats.device, "the feature length")  # (B,)
    if bool(((src == 0) & (targets > 0)).any()):
        raise ValueError("cannot interpolate an item with no input frames to a non-zero length")
    ac = align_corners
    if bool((src == n).all()) and bool((targets == t_max).all()):
        if t_max == 0:
            return feats.new_zeros(b, 0, h)
        # (B, N, H) -> (B, H, N) -> (B, H, T) -> (B, T, H)
        return F.interpolate(feats.transpose(1, 2), size=t_max, mode="linear", align_corners=ac).transpose(1, 2)
    out = feats.new_zeros(b, t_max, h)  # (B, T, H)
    for i in range(b):
        ti, ni = int(targets[i]), int(src[i])
        if ti == 0:
            continue
        x = feats[i : i + 1, :ni].transpose(1, 2)  # (1, H, N_b)
        out[i, :ti] = F.interpolate(x, size=ti, mode="linear", align_corners=ac)[0].transpose(0, 1)
    return out


def frames_from_audio(
    num_samples: int,
    fps: float,
    rounding: Rounding = "floor",
    basis: Literal["samples", "encoder"] = "samples",
    exact: bool = False,
    sample_rate: int = SAMPLE_RATE,
    encoder_rate: float = 50.0,
) -> int:
    """Motion frames for an utterance of ``num_samples`` samples at ``fps``.

    seconds = num_samples / sample_rate (``basis="samples"``), or CNN frames / 50 with
    CNN frames = floor((num_samples - 400) / 320) + 1 (``basis="encoder"``). The count is
    seconds * fps rounded down (floor), up (ceil) or half up (round).

    By default the product is evaluated in floating point in the order the reference
    code does (``frames / 50 * fps``), which reproduces its occasional off-by-one below an
    integer (e.g. 58 CNN frames at 25 fps give 28); ``exact=True`` uses rational arithmetic
    instead (29).

    The spec rules, for 32000 samples (2 s, 99 CNN frames):
      FaceFormer/Mimic ``interp`` (faceformer.md §3.1): basis="encoder", floor ->
          49 at 25 fps, 59 at 30 fps;
      FaceFormer ``double`` / AdaMesh (floor(CNN frames / 2)): basis="encoder", fps=25 -> 49;
      Mimic sliding windows (samples / 640): basis="samples", fps=25, floor -> 50;
      DEEPTalk content audio (ceil(seconds * 25)): basis="samples", rounding="ceil" -> 50.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    if basis == "encoder":
        count, rate = int(conv_output_frames(int(num_samples))), encoder_rate
    elif basis == "samples":
        count, rate = int(num_samples), float(sample_rate)
    else:
        raise ValueError(f"basis must be 'samples' or 'encoder', got {basis!r}")
    if exact:
        value: float | Fraction = Fraction(count) / Fraction(rate) * Fraction(fps)
    else:
        value = count / float(rate) * float(fps)
    if rounding == "floor":
        return int(math.floor(value))
    if rounding == "ceil":
        return int(math.ceil(value))
    if rounding == "round":
        return int(math.floor(value + Fraction(1, 2) if exact else value + 0.5))
    raise ValueError(f"rounding must be 'floor', 'ceil' or 'round', got {rounding!r}")


class AlignedFeatures(NamedTuple):
    """Output of :class:`StridedConvAligner`."""

    features: torch.Tensor  # (B, T, C_out), zero past each item's length
    lengths: torch.Tensor  # (B,) long


class StridedConvAligner(nn.Module):
    """Learned temporal downsampling from the encoder rate to the motion rate.

    (B, N, C_in) at ``in_rate`` -> Conv1d(C_in -> C_out, kernel_size, stride, padding
    kernel_size // 2) -> (B, M, C_out), M = floor((N - 1) / stride) + 1 = ceil(N / stride)
    for odd kernels. stride defaults to max(1, round(in_rate / out_rate)): 2 for 50 -> 25
    Hz, so Mimic's 299 CNN frames become 150 (mimic.md §2.3). When the requested length
    differs from M (a non-integer rate ratio such as 50 -> 30, or a motion length that
    is off by a frame), the conv output is linearly interpolated (align_corners=True) to
    exactly that length; when it matches, the conv output is returned untouched.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        in_rate: float = 50.0,
        out_rate: float = 25.0,
        kernel_size: int = 15,
        stride: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("rates must be positive")
        self.in_rate = float(in_rate)
        self.out_rate = float(out_rate)
        self.stride = int(stride) if stride is not None else max(1, round(in_rate / out_rate))
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        self.kernel_size = kernel_size
        self.out_dim = out_dim if out_dim is not None else in_dim
        self.conv = nn.Conv1d(
            in_dim, self.out_dim, kernel_size, stride=self.stride, padding=kernel_size // 2, bias=bias
        )

    def conv_length(self, n: int | torch.Tensor) -> int | torch.Tensor:
        """Frames the strided conv gives for n input frames."""
        p, k, s = self.kernel_size // 2, self.kernel_size, self.stride
        if isinstance(n, torch.Tensor):
            return (torch.div(n.to(torch.long) + 2 * p - k, s, rounding_mode="floor") + 1).clamp_min(0)
        return max((int(n) + 2 * p - k) // s + 1, 0)

    def target_length(self, n: int) -> int:
        """Default output length for n input frames: ceil(n * out_rate / in_rate)."""
        ratio = Fraction(self.out_rate).limit_denominator(10_000) / Fraction(self.in_rate).limit_denominator(10_000)
        return int(math.ceil(Fraction(int(n)) * ratio))

    def forward(
        self,
        x: torch.Tensor,
        num_frames: int | torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> AlignedFeatures:
        """x: (B, N, C_in); lengths (B,) valid input frames (None = all N);
        num_frames: int or (B,) target frames (None = ceil(N_b * out_rate / in_rate)).
        Returns AlignedFeatures(features (B, T, C_out), lengths (B,))."""
        if x.ndim != 3:
            raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        src = valid_lengths(lengths, b, n, x.device, "the feature length")  # (B,)
        if lengths is not None:
            # Padding must look like the conv's own zero padding.
            x = x * (torch.arange(n, device=x.device)[None, :] < src[:, None])[..., None].to(x.dtype)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, M, C_out)
        conv_lens = self.conv_length(src)  # (B,)
        assert isinstance(conv_lens, torch.Tensor)
        if num_frames is None:
            targets = torch.tensor(
                [self.target_length(int(v)) for v in src.tolist()], dtype=torch.long, device=x.device
            )
        else:
            targets = as_lengths(num_frames, b, x.device, "num_frames")
        if bool((targets == conv_lens).all()):
            t_max = int(targets.max()) if b else 0
            y = y[:, :t_max]
            if bool((targets != t_max).any()):
                y = y * (torch.arange(t_max, device=x.device)[None, :] < targets[:, None])[..., None].to(y.dtype)
            return AlignedFeatures(y, targets)
        return AlignedFeatures(interpolate_features(y, targets, lengths=conv_lens, align_corners=True), targets)
