"""Audio in: any sample rate, int or float PCM, mono or stereo -> float32 mono 16 kHz.

Resampling is polyphase (scipy), exact for rational rate ratios such as 22050 -> 16000.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """Audio that cannot be decoded or is not usable; the message names the source."""


def to_mono_float(x: np.ndarray, source: str = "audio") -> np.ndarray:
    """PCM array -> float32 mono in [-1, 1].

    Integer PCM is scaled by its type's range; unsigned 8-bit is centred. A 2-D array is
    taken as (samples, channels) unless its first axis is the short one (channels, samples).
    """
    a = np.asarray(x)
    if a.size == 0:
        raise AudioError(f"{source}: no samples")
    if a.dtype.kind == "u":
        info = np.iinfo(a.dtype)
        a = (a.astype(np.float64) - (info.max + 1) / 2.0) / ((info.max + 1) / 2.0)
    elif a.dtype.kind == "i":
        a = a.astype(np.float64) / float(-np.iinfo(a.dtype).min)
    elif a.dtype.kind == "f":
        a = a.astype(np.float64)
    else:
        raise AudioError(f"{source}: expected numeric PCM samples, got dtype {a.dtype}")
    if a.ndim == 2:
        if a.shape[0] <= 8 and a.shape[1] > a.shape[0]:
            a = a.T  # (channels, samples) -> (samples, channels)
        a = a.mean(axis=1)
    elif a.ndim != 1:
        raise AudioError(f"{source}: expected 1-D (mono) or 2-D (multi-channel) samples, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise AudioError(f"{source}: audio contains NaN or infinite samples")
    return a.astype(np.float32)


def resample(x: np.ndarray, sr_in: int | float, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of a mono float signal (S,) -> (round(S * sr_out / sr_in),)."""
    from scipy.signal import resample_poly

    if sr_in <= 0:
        raise AudioError(f"sample rate must be positive, got {sr_in}")
    if float(sr_in) == float(sr_out):
        return np.asarray(x, dtype=np.float32)
    ratio = Fraction(sr_out) / Fraction(sr_in).limit_denominator(10_000)
    ratio = ratio.limit_denominator(10_000)
    y = resample_poly(np.asarray(x, dtype=np.float64), ratio.numerator, ratio.denominator)
    n = int(round(x.shape[0] * float(sr_out) / float(sr_in)))
    if y.shape[0] > n:
        y = y[:n]
    elif y.shape[0] < n:
        y = np.pad(y, (0, n - y.shape[0]))
    return y.astype(np.float32)


def load_audio(
    source: str | Path | bytes,
    sample_rate: int | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode ``source`` (a path or the bytes of a file) to float32 mono 16 kHz (S,).

    Formats: anything libsndfile reads (WAV int/float PCM, FLAC, OGG, ...), and ``.npy``
    arrays, which carry no rate: ``sample_rate`` must then be given (16 kHz is assumed
    only when it is). ``max_seconds`` bounds the decoded duration (an error beyond it).
    """
    import soundfile as sf

    name = "<upload>" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise AudioError(f"{p}: audio file not found")
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise AudioError(f"{p}: not a readable .npy array ({e})") from e
            rate = sample_rate or SAMPLE_RATE
            return _finish(to_mono_float(arr, name), rate, name, max_seconds)
        data_src: object = str(p)
    else:
        if len(source) == 0:
            raise AudioError(f"{name}: empty audio upload")
        if bytes(source[:6]) == b"\x93NUMPY":
            try:
                arr = np.load(io.BytesIO(bytes(source)), allow_pickle=False)
            except (ValueError, OSError) as e:
                raise AudioError(f"{name}: not a readable .npy array ({e})") from e
            return _finish(to_mono_float(arr, name), sample_rate or SAMPLE_RATE, name, max_seconds)
        data_src = io.BytesIO(bytes(source))
    try:
        with sf.SoundFile(data_src) as f:
            rate = f.samplerate
            if max_seconds is not None and f.frames > (max_seconds + 1.0) * rate:
                raise AudioError(f"{name}: audio is {f.frames / rate:.1f} s long; at most {max_seconds:.0f} s accepted")
            arr = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as e:
        raise AudioError(f"{name}: not a readable audio file (WAV/FLAC/OGG expected): {e}") from e
    return _finish(to_mono_float(arr, name), rate, name, max_seconds)


def _finish(mono: np.ndarray, rate: int, name: str, max_seconds: float | None) -> np.ndarray:
    if max_seconds is not None and mono.shape[0] > max_seconds * rate + rate:
        raise AudioError(f"{name}: audio is {mono.shape[0] / rate:.1f} s long; at most {max_seconds:.0f} s accepted")
    return resample(mono, rate, SAMPLE_RATE)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> None:
    """Write mono float audio to a WAV file (16-bit PCM by default)."""
    import soundfile as sf

    sf.write(str(path), np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sample_rate, subtype=subtype)


def normalize(audio: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per-utterance zero mean, unit variance (what Wav2Vec2Processor does for one utterance)."""
    a = np.asarray(audio, dtype=np.float32)
    return (a - a.mean()) / np.sqrt(a.var() + eps)
