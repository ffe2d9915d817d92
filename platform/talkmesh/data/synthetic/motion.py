"""The synthetic corpus's motion: FLAME-56 parameters rendered from a phoneme timeline.

Viseme targets per phoneme, smoothed by coarticulation, scaled by the speaker's style and
the emotion; brow raises at emphasis and with the vocal level; seeded blinks; static and
slowly drifting idiosyncratic components; head rotation from rhythm, phoneme class and
emphasis. The random draws happen in a fixed order (blinks, drift, head phases).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from talkmesh.data.synthetic.content import Segment
from talkmesh.data.synthetic.presets import (
    CTRL_RATE,
    EXPR,
    EXPRESSION_COMPONENTS,
    NUM_EXPR,
    PHONEME_CLASSES,
    EmotionEffect,
    emotion_scale,
)

__all__ = ["synthesize_motion"]


def _coarticulate(x: np.ndarray, tau: float) -> np.ndarray:
    """First-order low-pass with time constant ``tau`` (s) run forwards then backwards on the
    control grid: a critically damped, zero-lag smoother (anticipatory + carry-over)."""
    from scipy.signal import lfilter

    a = float(np.exp(-1.0 / (tau * CTRL_RATE)))
    y = lfilter([1.0 - a], [1.0, -a], x, zi=[a * x[0]])[0]
    return lfilter([1.0 - a], [1.0, -a], y[::-1], zi=[a * y[-1]])[0][::-1]


@dataclasses.dataclass
class _Tracks:
    """Per control step (nc,): the viseme targets before coarticulation, the vocal level,
    the phoneme class index and the emphasis envelope."""

    jaw: np.ndarray
    rnd: np.ndarray
    spr: np.ndarray
    clo: np.ndarray
    level: np.ndarray
    cls: np.ndarray  # int64
    emphasis: np.ndarray


def _control_tracks(segs: list[Segment], nc: int, tc: np.ndarray) -> _Tracks:
    """Step functions of the phoneme targets on the control grid (nc steps at times tc)."""
    jaw, rnd, spr, clo, level = (np.zeros(nc) for _ in range(5))
    cls = np.zeros(nc, dtype=np.int64)
    emphasis = np.zeros(nc)
    for s in segs:
        i0, i1 = int(round(s.start * CTRL_RATE)), min(int(round(s.end * CTRL_RATE)), nc)
        ph = s.ph
        hyper = 1.0 + 0.15 * s.stress
        jaw[i0:i1] = ph.jaw * hyper
        rnd[i0:i1] = ph.round
        spr[i0:i1] = ph.spread
        clo[i0:i1] = ph.closure
        level[i0:i1] = max(ph.voiced, ph.noise[2] if ph.noise else 0.0) * (1.0 + 0.3 * s.stress)
        cls[i0:i1] = PHONEME_CLASSES.index(ph.cls)
        if ph.cls == "vowel" and s.stress:
            c = 0.5 * (s.start + s.end) - 0.03  # the brows lead the voice slightly
            emphasis += (0.35, 1.0)[s.stress - 1] * np.exp(-0.5 * ((tc - c) / 0.1) ** 2)
    cls[int(round(segs[-1].end * CTRL_RATE)) :] = 0
    return _Tracks(jaw, rnd, spr, clo, level, cls, emphasis)


def _named_expressions(
    tr: _Tracks, style: dict[str, Any], eff: EmotionEffect, k: float, g: float
) -> tuple[np.ndarray, np.ndarray]:
    """(nc, 9) the named expression components (blink left at 0) on the control grid, and
    the coarticulated jaw opening (nc,). ``g``: the articulation gain with the emotion."""
    tau = style["coarticulation_tau"]
    jaw_s, rnd_s, spr_s = _coarticulate(tr.jaw, tau), _coarticulate(tr.rnd, tau), _coarticulate(tr.spr, tau)
    clo_s = _coarticulate(tr.clo, 0.5 * tau)  # lips close fully even in fast speech
    level_s = _coarticulate(tr.level, 0.06)

    asym = style["asymmetry"]
    expr = np.zeros((tr.jaw.shape[0], len(EXPRESSION_COMPONENTS)))  # the named components, on the control grid
    expr[:, EXPR["jaw_open"]] = g * jaw_s
    expr[:, EXPR["lip_round"]] = style["lip_rounding"] * g * rnd_s
    expr[:, EXPR["lip_spread"]] = g * spr_s
    expr[:, EXPR["lip_press"]] = 1.1 * clo_s
    expr[:, EXPR["mouth_asymmetry"]] = asym * g * (jaw_s + 0.5 * rnd_s)
    happy = eff.smile * k
    expr[:, EXPR["smile"]] = happy * (1.0 + 0.1 * jaw_s)
    brow = style["brow_activity"]
    expr[:, EXPR["brow_raise"]] = brow * (0.8 * tr.emphasis + 0.5 * level_s) + eff.brow_raise * k
    expr[:, EXPR["brow_furrow"]] = eff.brow_furrow * k * (1.0 + 0.2 * brow * tr.emphasis)
    return expr, jaw_s


def _blinks(tc: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """(nc,) seeded blinks: exponential gaps at ``rate`` per second plus a 0.25 s refractory
    time; fast closing, slower opening."""
    t = -rng.uniform(0.0, 1.0 / rate)
    blink = np.zeros(tc.shape[0])
    while True:
        t += rng.exponential(1.0 / rate) + 0.25
        if t >= tc[-1]:
            break
        dt = tc - t
        blink = np.maximum(blink, np.where(dt < 0, np.exp(-0.5 * (dt / 0.03) ** 2), np.exp(-dt / 0.07)))
    return blink


def _head_rotation(
    spk: dict[str, Any], eff: EmotionEffect, k: float, emotion: int, tc: np.ndarray, tr: _Tracks,
    rng: np.random.Generator,
) -> np.ndarray:
    """(nc, 3) rad: rhythm sinusoids + per-phoneme-class offsets + nods at emphasis."""
    style = spk["style"]
    amp = style["head_amplitude"] * (1.0 + eff.head * k)
    fh = style["head_frequency"]
    hp = rng.uniform(0.0, 2 * np.pi, size=4)
    head = np.zeros((tc.shape[0], 3))
    head[:, 0] = 0.7 * np.sin(2 * np.pi * fh * tc + hp[0]) + 0.3 * np.sin(2 * np.pi * 1.7 * fh * tc + hp[1])
    head[:, 1] = 0.8 * np.sin(2 * np.pi * 0.6 * fh * tc + hp[2])
    head[:, 2] = 0.35 * np.sin(2 * np.pi * 0.8 * fh * tc + hp[3])
    head *= amp
    offsets = spk["head_class_offsets"] * (1.0 + eff.head * k)  # (classes, 3)
    for axis in range(3):
        head[:, axis] += _coarticulate(offsets[tr.cls, axis], 0.1)
    head[:, 0] += 0.5 * amp * tr.emphasis
    if emotion == 2:
        head[:, 0] += 0.03 * k  # sad: head lowered
    return head


def synthesize_motion(
    segs: list[Segment], spk: dict[str, Any], emotion: int, intensity: int, fps: float, n_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(T, 56) float32 FLAME-56 parameters: expression 50 | jaw 3 | head rotation 3."""
    style = spk["style"]
    eff, k = emotion_scale(emotion, intensity)
    nc = int(np.ceil(n_frames / fps * CTRL_RATE)) + 2
    tc = np.arange(nc) / CTRL_RATE
    tracks = _control_tracks(segs, nc, tc)
    g = style["articulation_gain"] * (1.0 + eff.articulation * k)
    expr, jaw_s = _named_expressions(tracks, style, eff, k, g)  # (nc, 9), (nc,)
    expr[:, EXPR["blink"]] = _blinks(tc, style["blink_rate"], rng)

    # Idiosyncratic small components (evaluated at the frame times): static speaker offsets
    # plus slow drift.
    idx = np.minimum(np.round(np.arange(n_frames) / fps * CTRL_RATE).astype(np.int64), nc - 1)  # (T,)
    n_idio = NUM_EXPR - len(EXPRESSION_COMPONENTS)
    f = rng.uniform(0.1, 0.6, size=n_idio)
    p = rng.uniform(0.0, 2 * np.pi, size=n_idio)
    idio = spk["idiosyncrasy"] + 0.04 * np.sin(2 * np.pi * f * tc[idx, None] + p)  # (T, 41)

    jaw_rot = np.zeros((nc, 3))
    jaw_rot[:, 0] = 0.18 * g * jaw_s  # rad, about x: opens the mouth
    jaw_rot[:, 2] = 0.04 * style["asymmetry"] * g * jaw_s  # a little roll with the asymmetry

    head = _head_rotation(spk, eff, k, emotion, tc, tracks, rng)  # (nc, 3)
    return np.concatenate([expr[idx], idio, jaw_rot[idx], head[idx]], axis=1).astype(np.float32)  # (T, 56)
