"""Encoding long utterances in chunks of encoder frames (AdaMesh, adamesh.md §2 and Q6).

The AdaMesh reference extracts HuBERT from long files in pieces of C = 1000 frames:

* the whole file is normalised once (zero mean, unit variance, as the processor does);
* piece i holds the samples of frames [i C, (i + 1) C): it starts at i C stride and spans
  (C - 1) stride + receptive field samples, so pieces overlap by receptive field - stride
  samples and their frames follow each other without gap or overlap;
* the samples after the last whole piece form one more piece, unless they are fewer than
  the receptive field (the previous piece already gave their frames);
* each piece goes through the encoder alone and the frames are concatenated. The count
  equals the one-pass count floor((N - 400) / 320) + 1 = floor((N - 80) / 320); only the
  transformer's context differs (it stops at the piece's edges).

The project keeps this for files longer than a threshold (20 s) and encodes shorter ones
in one pass, exactly as before (:class:`ChunkedEncoding`).
"""

from __future__ import annotations

import dataclasses

import torch

from talkmesh.audio.encoders import AudioEncoder, normalize_waveform

__all__ = ["ChunkedEncoding", "chunk_spans"]


def chunk_spans(
    num_samples: int, chunk_frames: int, stride: int = 320, receptive_field: int = 400
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the pieces a ``num_samples``-sample utterance is
    encoded in, ``chunk_frames`` encoder frames each (the rest in a last, shorter piece)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    step = chunk_frames * stride
    span = (chunk_frames - 1) * stride + receptive_field
    whole = num_samples // step
    spans = [(i * step, min(i * step + span, num_samples)) for i in range(whole)]
    if num_samples - whole * step >= receptive_field or not spans:
        spans.append((whole * step, num_samples))
    return spans


@dataclasses.dataclass(frozen=True)
class ChunkedEncoding:
    """Encode utterances longer than ``after_seconds`` in pieces of ``chunk_frames``
    encoder frames (module docstring); shorter ones in one pass."""

    chunk_frames: int = 1000
    after_seconds: float = 20.0

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if not self.after_seconds > 0:
            raise ValueError(f"after_seconds must be positive, got {self.after_seconds}")

    def applies(self, num_samples: int, sample_rate: int = 16000) -> bool:
        """True when an utterance of ``num_samples`` samples is encoded in pieces."""
        return int(num_samples) > self.after_seconds * sample_rate

    def tag(self, num_samples: int, sample_rate: int = 16000) -> str:
        """What sets the features beyond the encoder and the audio: "" for one pass, else
        the piece size (feature-cache keys)."""
        return f"chunk_frames={self.chunk_frames}" if self.applies(num_samples, sample_rate) else ""

    @torch.no_grad()
    def encode(self, encoder: AudioEncoder, audio: torch.Tensor) -> torch.Tensor:
        """One raw 16 kHz utterance (S,) -> features (N, H) on the encoder's device, in eval
        mode and without gradients; N = ``encoder.frames_for_samples(S)``."""
        if audio.ndim != 1:
            raise ValueError(f"expected one utterance (S,), got shape {tuple(audio.shape)}")
        was_training = encoder.training
        encoder.eval()
        try:
            if not self.applies(audio.shape[0], encoder.sample_rate):
                return encoder(audio[None]).features[0]  # (N, H)
            x = normalize_waveform(audio[None].to(torch.float32))  # (1, S) normalised once, as a whole
            stride = round(encoder.sample_rate / encoder.output_rate)
            spans = chunk_spans(x.shape[1], self.chunk_frames, stride, encoder.receptive_field)
            parts = [encoder(x[:, a:b], normalize=False).features[0] for a, b in spans]  # (n_i, H) each
        finally:
            encoder.train(was_training)
        feats = torch.cat(parts)  # (N, H)
        expected = int(encoder.frames_for_samples(audio.shape[0]))
        if feats.shape[0] != expected:  # pragma: no cover - the spans guarantee the count
            raise RuntimeError(f"chunked encoding gave {feats.shape[0]} frames, expected {expected}")
        return feats
