"""The synthetic corpus's audio: source-filter speech rendered from a phoneme timeline.

A glottal pulse train at the speaker's f0 contour through formant resonators (voiced
sounds), band-passed noise (fricatives, aspiration) and decaying bursts (plosive
releases), cross-faded at the segment boundaries. The random draws happen in a fixed
order (jitter, breath, frication, bursts, noise floor), so a seed gives the same samples.
"""

from __future__ import annotations

import functools

import numpy as np

from talkmesh.data.synthetic.content import Segment
from talkmesh.data.synthetic.presets import AUDIO_RATE, CTRL_RATE, EmotionEffect, emotion_scale

__all__ = ["synthesize_audio"]


@functools.lru_cache(maxsize=4096)
def _formant_sos(formants: tuple[float, ...]) -> np.ndarray:
    """Cascade of 2-pole resonators (unity DC gain each), one SOS row per formant."""
    rows = []
    for i, f in enumerate(formants):
        bw = (60.0, 90.0, 120.0, 180.0)[min(i, 3)] * (1.0 + f / 4000.0)
        r = np.exp(-np.pi * bw / AUDIO_RATE)
        c = 2.0 * r * np.cos(2.0 * np.pi * f / AUDIO_RATE)
        rows.append([1.0 - c + r * r, 0.0, 0.0, 1.0, -c, r * r])
    return np.asarray(rows)


@functools.lru_cache(maxsize=64)
def _band_sos(lo: float, hi: float) -> np.ndarray:
    from scipy.signal import butter

    return butter(2, [lo, min(hi, 0.45 * AUDIO_RATE)], btype="bandpass", fs=AUDIO_RATE, output="sos")


def _norm(x: np.ndarray, core: slice) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x[core] ** 2))) if x[core].size else 0.0
    return x / rms if rms > 1e-9 else x


def _f0_contour(
    segs: list[Segment], style: dict[str, float], eff: EmotionEffect, k: float, n_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(S,) f0 in Hz per sample: declination, accents on stressed vowels, slow jitter, built
    on the control grid and interpolated."""
    sr = AUDIO_RATE
    t_end = n_samples / sr
    tc = np.arange(int(np.ceil(t_end * CTRL_RATE)) + 2) / CTRL_RATE
    accent = np.zeros_like(tc)
    for s in segs:
        if s.ph.cls == "vowel" and s.stress:
            c = 0.5 * (s.start + s.end)
            size = (0.04, 0.10)[s.stress - 1] * (1.0 + eff.pitch_range * k)
            accent += size * np.exp(-0.5 * ((tc - c) / 0.08) ** 2)
    jf = rng.uniform(1.0, 4.0, size=3)
    jp = rng.uniform(0.0, 2 * np.pi, size=3)
    jitter = 0.012 * np.sin(2 * np.pi * jf[:, None] * tc[None] + jp[:, None]).sum(0)
    f0c = style["f0"] * (1.0 + eff.pitch * k) * (1.0 + 0.07 * (0.5 - tc / t_end)) * (1.0 + accent + jitter)
    ts = np.arange(n_samples) / sr
    return np.interp(ts, tc, f0c)  # (S,)


def _glottal_excitation(f0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S,) glottal pulse train (fractional placement), spectral tilt, radiation, a little breath."""
    from scipy.signal import lfilter

    sr = AUDIO_RATE
    n_samples = f0.shape[0]
    phase = np.cumsum(f0 / sr)
    cyc = np.floor(phase)
    wraps = np.nonzero(np.diff(cyc) > 0)[0] + 1
    frac = np.clip((phase[wraps] - cyc[wraps]) / (f0[wraps] / sr), 0.0, 1.0)
    exc = np.zeros(n_samples + 1)
    exc[wraps] += 1.0 - frac
    exc[wraps - 1] += frac
    a = np.exp(-2.0 * np.pi * 150.0 / sr)
    exc = lfilter([1.0], [1.0, -2.0 * a, a * a], exc[:n_samples])
    exc = np.diff(exc, prepend=0.0)
    noise = rng.standard_normal(n_samples, dtype=np.float32)
    return exc / max(float(np.std(exc)), 1e-9) + 0.05 * noise


def _crossfade_halves(bounds: list[int]) -> list[int]:
    """Cross-fade half-widths (samples) at each segment boundary; 0 at both ends."""
    margin = int(0.02 * AUDIO_RATE)
    half = [0]
    for i in range(1, len(bounds) - 1):  # the inner boundaries
        d_left, d_right = bounds[i] - bounds[i - 1], bounds[i + 1] - bounds[i]
        half.append(max(0, min(margin, d_left // 2, d_right // 2)))
    half.append(0)
    return half


def _fade_window(n: int, fade_in: int, fade_out: int) -> np.ndarray:
    """(n,) ones with linear ramps of 2 * fade_in samples at the start and 2 * fade_out at the end."""
    w = np.ones(n)
    if fade_in:
        w[: 2 * fade_in] = (np.arange(2 * fade_in) + 0.5) / (2 * fade_in)
    if fade_out:
        w[n - 2 * fade_out :] = 1.0 - (np.arange(2 * fade_out) + 0.5) / (2 * fade_out)
    return w


def _add_burst(out: np.ndarray, s1: int, burst: tuple[float, float, float], energy: float, noise: np.ndarray) -> None:
    """A decaying band-passed noise burst at a plosive's release (sample ``s1``), added into ``out``."""
    from scipy.signal import sosfilt

    sr = AUDIO_RATE
    n_samples = out.shape[0]
    lo, hi, level = burst
    c0 = max(s1 - int(0.008 * sr), 0)
    length = min(int(0.03 * sr), n_samples - c0)
    if length > 8:
        tt = np.arange(length) / sr
        env = (1.0 - np.exp(-tt / 0.001)) * np.exp(-tt / 0.008)
        y = sosfilt(_band_sos(lo, hi), noise[c0 : c0 + length])
        y = y / max(float(np.max(np.abs(y))), 1e-9)
        out[c0 : c0 + length] += 2.5 * level * energy * env * y


def _mix_segments(
    segs: list[Segment], formant_scale: float, energy: float, exc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(S,) the phonemes' voiced, noise and burst parts, cross-faded at the boundaries."""
    from scipy.signal import sosfilt

    sr = AUDIO_RATE
    n_samples = exc.shape[0]
    fric = rng.standard_normal(n_samples, dtype=np.float32)
    burst_noise = rng.standard_normal(n_samples, dtype=np.float32)
    out = np.zeros(n_samples)
    bounds = [int(round(s.start * sr)) for s in segs] + [min(int(round(segs[-1].end * sr)), n_samples)]
    half = _crossfade_halves(bounds)
    for i, s in enumerate(segs):
        ph = s.ph
        if ph.cls == "pause":
            continue
        s0, s1 = bounds[i], bounds[i + 1]
        a0, b0 = max(s0 - half[i], 0), min(s1 + half[i + 1], n_samples)
        if b0 - a0 <= 0:
            continue
        w = _fade_window(b0 - a0, half[i], half[i + 1])
        core = slice(s0 - a0, max(s1 - a0, s0 - a0 + 1))
        gain = energy * (1.0 + 0.3 * s.stress)
        if ph.voiced:
            formants = tuple(round(f * formant_scale, 1) for f in (*ph.formants, 3500.0))
            y = _norm(sosfilt(_formant_sos(formants), exc[a0:b0]), core)
            out[a0:b0] += ph.voiced * gain * w * y
        if ph.noise is not None:
            lo, hi, level = ph.noise
            y = _norm(sosfilt(_band_sos(lo, hi), fric[a0:b0]), core)
            out[a0:b0] += level * gain * w * y
        if ph.burst is not None:
            _add_burst(out, s1, ph.burst, energy, burst_noise)
    return out


def synthesize_audio(
    segs: list[Segment], style: dict[str, float], emotion: int, intensity: int, n_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_samples,) float32 waveform at AUDIO_RATE from the phoneme segments."""
    eff, k = emotion_scale(emotion, intensity)
    f0 = _f0_contour(segs, style, eff, k, n_samples, rng)  # (S,)
    exc = _glottal_excitation(f0, rng)  # (S,)
    out = _mix_segments(segs, style["formant_scale"], 1.0 + eff.energy * k, exc, rng)  # (S,)
    out += 0.002 * rng.standard_normal(n_samples, dtype=np.float32)  # noise floor
    out *= 0.1
    return (0.95 * np.tanh(out / 0.95)).astype(np.float32)
