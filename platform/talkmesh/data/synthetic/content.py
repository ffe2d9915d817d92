"""What the synthetic speakers say and who they are: the 12 speakers (style parameters,
shape), the sentence pool, the phoneme timeline of one clip and the per-sequence plan
(split, emotion, sentence). Every draw comes from its own seeded stream (``seeded_rng``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from talkmesh.data.synthetic.presets import (
    EMOTIONS,
    EXPRESSION_COMPONENTS,
    NUM_EXPR,
    NUM_SHAPE,
    PHONEME,
    PHONEME_CLASSES,
    SPEAKER_ROLES,
    STYLE_RANGES,
    Phoneme,
    Preset,
    emotion_scale,
    seeded_rng,
)

__all__ = [
    "CLIP_STREAM",
    "Segment",
    "clip_rng",
    "frame_phoneme_classes",
    "make_sentences",
    "make_speakers",
    "phoneme_timeline",
    "sequence_plan",
    "timeline_frames",
]

CLIP_STREAM = 6  # seeded_rng(seed, CLIP_STREAM, n): plan item n's timeline, audio and motion draws

_VOWELS = "aeiouE"
_VOWEL_WEIGHTS = (0.24, 0.2, 0.18, 0.14, 0.1, 0.14)
_ONSETS = "ptkbdgmnfvszShlrwj"
_CODAS = "ptkdmnszlr"


def make_speakers(preset: Preset, seed: int) -> list[dict[str, Any]]:
    """12 speakers with stratified style parameters, head-class offsets, idiosyncrasies and beta."""
    rng = seeded_rng(seed, 2)
    n = len(SPEAKER_ROLES)
    styles: dict[str, np.ndarray] = {}
    for key, (lo, hi) in STYLE_RANGES.items():
        q = (rng.permutation(n) + rng.uniform(0.1, 0.9, size=n)) / n  # one value per stratum
        styles[key] = lo + (hi - lo) * q
    out = []
    for i, role in enumerate(SPEAKER_ROLES):
        srng = seeded_rng(seed, 3, i)
        amp = float(styles["head_amplitude"][i])
        out.append(
            {
                "name": f"S{i + 1:02d}",
                "role": role,
                "style": {k: round(float(v[i]), 6) for k, v in styles.items()},
                "shape": srng.normal(size=NUM_SHAPE).astype(np.float32),
                "head_class_offsets": srng.normal(0.0, 0.4 * amp, size=(len(PHONEME_CLASSES), 3)),  # rad
                "idiosyncrasy": srng.normal(0.0, 0.15, size=NUM_EXPR - len(EXPRESSION_COMPONENTS)),
            }
        )
    return out


def make_sentences(preset: Preset, seed: int) -> list[list[tuple[str, int]]]:
    """Pool of sentences: lists of (phoneme char, stress 0/1/2); ' ' is a pause between words."""
    rng = seeded_rng(seed, 4)
    pool = []
    for _ in range(preset.num_sentences):
        target = rng.uniform(1.6, 2.3)  # s of nominal speech (before rate, stress and pauses)
        words: list[list[tuple[str, int]]] = []
        total = 0.0
        while total < target:
            n_syll = int(rng.choice([1, 2, 2, 3]))
            stressed = int(rng.integers(n_syll))
            word: list[tuple[str, int]] = []
            for s in range(n_syll):
                if rng.random() < 0.8:
                    word.append((str(rng.choice(list(_ONSETS))), 0))
                word.append((str(rng.choice(list(_VOWELS), p=_VOWEL_WEIGHTS)), 1 if s == stressed else 0))
                if rng.random() < 0.3:
                    word.append((str(rng.choice(list(_CODAS))), 0))
            words.append(word)
            total += sum(PHONEME[c].duration for c, _ in word)
        for w in rng.choice(len(words), size=min(len(words), int(rng.integers(1, 3))), replace=False):
            words[int(w)] = [(c, 2 if s == 1 else s) for c, s in words[int(w)]]  # emphasis
        sentence: list[tuple[str, int]] = []
        for k, word in enumerate(words):
            if k and rng.random() < 0.3:
                sentence.append((" ", 0))
            sentence.extend(word)
        pool.append(sentence)
    return pool


@dataclasses.dataclass
class Segment:
    """One phoneme of a clip's timeline."""

    ph: Phoneme
    start: float  # s
    end: float  # s
    stress: int


def phoneme_timeline(
    sentence: list[tuple[str, int]], style: dict[str, float], emotion: int, intensity: int, preset: Preset,
    rng: np.random.Generator,
) -> list[Segment]:
    """Phoneme segments of one clip: leading pause, the sentence, trailing pause; total
    duration within ``preset.clip_seconds``."""
    eff, k = emotion_scale(emotion, intensity)
    rate = style["speaking_rate"] * (1.0 + eff.rate * k)
    items: list[tuple[Phoneme, float, int]] = []
    for c, stress in sentence:
        ph = PHONEME[c]
        if c == " ":
            dur = rng.uniform(0.10, 0.25)
        else:
            dur = ph.duration * float(np.exp(rng.normal(0.0, 0.1)))
            if ph.cls == "vowel":
                dur *= (1.0, 1.2, 1.35)[stress]
        items.append((ph, dur / rate, stress))
    lo, hi = preset.clip_seconds
    lead, trail = rng.uniform(0.12, 0.3), rng.uniform(0.15, 0.35)
    speech = sum(d for _, d, _ in items)
    room = hi - 0.05 - lead - trail
    if speech > room:
        items = [(p, d * room / speech, s) for p, d, s in items]
        speech = room
    trail = max(trail, lo + 0.05 - lead - speech)
    segs = [Segment(PHONEME[" "], 0.0, lead, 0)]
    t = lead
    for ph, dur, stress in items:
        segs.append(Segment(ph, t, t + dur, stress))
        t += dur
    segs.append(Segment(PHONEME[" "], t, t + trail, 0))
    return segs


def clip_rng(seed: int, n: int) -> np.random.Generator:
    """The random stream of plan item number ``n`` (its index in ``sequence_plan``): the
    timeline is drawn first, then the audio, then the motion."""
    return seeded_rng(seed, CLIP_STREAM, n)


def timeline_frames(segments: Sequence[Segment], fps: float) -> int:
    """Number of motion frames of a clip at ``fps``: up to the end of its last segment."""
    return int(np.ceil(segments[-1].end * fps))


def frame_phoneme_classes(segments: Sequence[Segment], fps: float, num_frames: int) -> np.ndarray:
    """(T,) int64 index into ``PHONEME_CLASSES`` of the segment holding each frame's time
    ``i / fps`` (segments are half-open ``[start, end)``, sorted and non-overlapping); frames
    outside every segment (after the last one, or in a gap) are pause (0)."""
    if not fps > 0 or num_frames < 0:
        raise ValueError(f"frame_phoneme_classes: need fps > 0 and num_frames >= 0, got {fps}, {num_frames}")
    t = np.arange(num_frames) / fps  # (T,) s
    if not segments:
        return np.zeros(num_frames, dtype=np.int64)
    starts = np.array([s.start for s in segments])  # (N,)
    ends = np.array([s.end for s in segments])  # (N,)
    cls = np.array([PHONEME_CLASSES.index(s.ph.cls) for s in segments], dtype=np.int64)  # (N,)
    k = np.searchsorted(ends, t, side="right")  # (T,) first segment ending after t
    inside = k < len(segments)
    k = np.minimum(k, len(segments) - 1)
    inside &= t >= starts[k]
    return np.where(inside, cls[k], 0).astype(np.int64)


def sequence_plan(preset: Preset, speakers: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Per sequence: stem, subject, split, emotion, intensity, sentence id."""
    plan = []
    n = preset.seqs_per_speaker
    n_tv = preset.train_seqs + preset.val_seqs
    for i, spk in enumerate(speakers):
        rng = seeded_rng(seed, 5, i)
        emos = np.resize(np.array(sorted(EMOTIONS)), n)[rng.permutation(n)]
        sentence_ids = rng.choice(preset.num_sentences, size=n, replace=n > preset.num_sentences)
        for j in range(n):
            if spk["role"] == "train":
                split = "train" if j < preset.train_seqs else "val" if j < n_tv else "test-A"
            else:
                split = "reference" if j < preset.reference_seqs else ("val" if spk["role"] == "val" else "test-B")
            emotion = int(emos[j])
            plan.append(
                {
                    "stem": f"{spk['name']}_seq{j + 1:02d}",
                    "speaker": i,
                    "subject": spk["name"],
                    "sentence": f"seq{j + 1:02d}",
                    "split": split,
                    "emotion": emotion,
                    "intensity": 0 if emotion == 0 else int(rng.integers(0, 3)),
                    "sentence_id": int(sentence_ids[j]),
                }
            )
    return plan

