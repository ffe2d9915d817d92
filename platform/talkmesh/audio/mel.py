"""Log-mel features at the 50 Hz frame rate of the wav2vec2 / HuBERT encoders (same
window, hop and frame count), for the methods' optional mel inputs (AdaMesh's PoseGPT and
deviation 13; DEEPTalk's DEE audio option)."""

from __future__ import annotations

import numpy as np
import torch

from talkmesh.audio.encoders import normalize_waveform

__all__ = ["log_mel", "mel_filterbank"]


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int = 16000) -> torch.Tensor:
    """Triangular HTK-mel filters (n_mels, n_freqs) from 0 Hz to Nyquist."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).astype(np.float32))


def log_mel(audio: torch.Tensor, lengths: torch.Tensor | None, fbank: torch.Tensor) -> torch.Tensor:
    """Log-mel (B, N, M) of raw 16 kHz audio (B, S): per-utterance normalised (G8), 400-sample
    Hann window, 320-sample hop, no centring, so N = floor((S - 400) / 320) + 1 = the HuBERT
    frame count; frames past an item's length are zero."""
    x = normalize_waveform(audio, lengths)  # (B, S)
    window = torch.hann_window(400, device=x.device, dtype=x.dtype)
    spec = torch.stft(
        x, n_fft=400, hop_length=320, win_length=400, window=window, center=False, return_complex=True
    )  # (B, 201, N)
    mel = torch.log(torch.einsum("mf,bfn->bnm", fbank.to(x), spec.abs() ** 2) + 1e-6)  # (B, N, M)
    if lengths is not None:
        n = (torch.div(lengths.to(x.device) - 400, 320, rounding_mode="floor") + 1).clamp_min(0)  # (B,)
        mel = mel * (torch.arange(mel.shape[1], device=x.device)[None] < n[:, None])[..., None].to(mel.dtype)
    return mel
