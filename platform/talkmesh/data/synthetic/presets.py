"""The synthetic corpus's fixed tables: sizes, presets, expression components, emotions,
speaker style ranges and the phoneme inventory (sound + viseme), and the seeded streams.

Everything here is data or a pure lookup; the generators live in the sibling modules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from talkmesh.data.errors import DataError

# 2: the default preset's readable 5042-vertex face (version 1's was 1370 coarse vertices);
# the content, timelines and the small preset's arrays are version 1's.
GENERATOR_VERSION = 2
TIMELINE_VERSIONS = (1, 2)  # generator versions whose phoneme timelines this one reproduces
AUDIO_RATE = 22050  # Hz; deliberately not 16 kHz so every loader resamples
NUM_SHAPE = 100
NUM_EXPR = 50
DEFAULT_FPS = 25.0
CTRL_RATE = 1000.0  # Hz, control timeline on which visemes, f0 and envelopes are built

SPLITS = ("train", "val", "test-A", "test-B", "reference")
EVAL_SPLITS = ("test-A", "test-B")
UNSEEN_SPLITS = ("val", "test-B")

# Meaning of the leading expression components (FLAME-56 columns 0..8).
EXPRESSION_COMPONENTS: tuple[str, ...] = (
    "jaw_open",  # 0: lips part (lower lip down, upper lip up), with the jaw rotation
    "lip_round",  # 1: pucker: mouth corners in, lips forward
    "smile",  # 2: mouth corners up and out, cheeks up
    "brow_raise",  # 3: brows and forehead up
    "blink",  # 4: upper eyelids down
    "lip_press",  # 5: lips pressed together (bilabial closure)
    "brow_furrow",  # 6: inner brows down and together
    "lip_spread",  # 7: mouth corners out, lips flattened
    "mouth_asymmetry",  # 8: left corner up / right corner down
)
EXPR = {name: i for i, name in enumerate(EXPRESSION_COMPONENTS)}
JAW_COL = NUM_EXPR  # FLAME-56 column 50: jaw rotation about x (opening)
HEAD_COLS = slice(53, 56)

EMOTIONS: dict[int, str] = {0: "neutral", 1: "happy", 2: "sad", 6: "angry"}  # 0-based EMOTE order


@dataclasses.dataclass(frozen=True)
class EmotionEffect:
    """Relative changes at full intensity (level 2); level i scales them by (i + 1) / 3."""

    pitch: float = 0.0  # f0 factor - 1
    pitch_range: float = 0.0  # pitch-accent size factor - 1
    energy: float = 0.0  # vocal level factor - 1
    articulation: float = 0.0  # viseme amplitude factor - 1
    rate: float = 0.0  # speaking-rate factor - 1
    head: float = 0.0  # head-motion amplitude factor - 1
    smile: float = 0.0  # expression offsets (coefficients)
    brow_raise: float = 0.0
    brow_furrow: float = 0.0


EMOTION_EFFECTS: dict[int, EmotionEffect] = {
    0: EmotionEffect(),
    1: EmotionEffect(
        pitch=0.15, pitch_range=0.4, energy=0.15, articulation=0.08, rate=0.04, head=0.15, smile=1.8, brow_raise=0.2
    ),
    2: EmotionEffect(
        pitch=-0.12, pitch_range=-0.4, energy=-0.25, articulation=-0.18, rate=-0.10, head=-0.3, brow_raise=0.6,
        brow_furrow=0.5,
    ),
    6: EmotionEffect(
        pitch=0.10, pitch_range=0.3, energy=0.35, articulation=0.20, rate=0.06, head=0.3, brow_furrow=1.5
    ),
}

# Recorded per-speaker style parameters and their ranges (stratified over the 12 speakers).
STYLE_RANGES: dict[str, tuple[float, float]] = {
    "articulation_gain": (0.55, 1.45),  # scales jaw, lip opening, rounding, spread
    "lip_rounding": (0.4, 1.6),  # extra scale of the rounding channel
    "coarticulation_tau": (0.015, 0.05),  # s, time constant of the forward-backward low-pass
    "asymmetry": (-0.5, 0.5),  # signed left/right mouth imbalance (expression 8, jaw roll)
    "brow_activity": (0.2, 1.6),  # brow raises at emphasis and with vocal energy
    "head_amplitude": (0.012, 0.08),  # rad
    "head_frequency": (0.25, 0.9),  # Hz, head-motion rhythm
    "blink_rate": (0.15, 0.5),  # blinks per second
    "speaking_rate": (0.8, 1.25),  # phoneme durations are divided by it
    "f0": (90.0, 230.0),  # Hz, voice pitch
    "formant_scale": (0.86, 1.16),  # vocal-tract scaling of all formants
}

PHONEME_CLASSES = ("pause", "vowel", "plosive", "fricative", "nasal", "approximant")


@dataclasses.dataclass(frozen=True)
class Phoneme:
    """One phoneme: its sound (source-filter parameters) and its viseme (motion targets)."""

    char: str
    cls: str
    duration: float  # s, nominal (before speaking rate, emotion, stress and jitter)
    voiced: float = 0.0  # level of the voiced (glottal) part, 0 = unvoiced
    formants: tuple[float, float, float] = (500.0, 1500.0, 2500.0)  # Hz (before formant scale)
    noise: tuple[float, float, float] | None = None  # (low Hz, high Hz, level) band-passed noise
    burst: tuple[float, float, float] | None = None  # (low Hz, high Hz, level) release burst
    jaw: float = 0.0  # viseme targets in [0, 1]
    round: float = 0.0
    spread: float = 0.0
    closure: float = 0.0


PHONEMES: tuple[Phoneme, ...] = (
    Phoneme(" ", "pause", 0.2),
    # vowels: the level grows with the jaw opening (open vowels are louder)
    Phoneme("a", "vowel", 0.13, 1.00, (730, 1090, 2440), jaw=1.0, spread=0.2),
    Phoneme("e", "vowel", 0.115, 0.80, (530, 1840, 2480), jaw=0.65, spread=0.5),
    Phoneme("i", "vowel", 0.105, 0.55, (300, 2250, 3000), jaw=0.25, spread=1.0),
    Phoneme("o", "vowel", 0.125, 0.85, (500, 850, 2600), jaw=0.7, round=0.8),
    Phoneme("u", "vowel", 0.115, 0.55, (320, 870, 2250), jaw=0.3, round=1.0),
    Phoneme("E", "vowel", 0.075, 0.60, (500, 1500, 2500), jaw=0.45),  # schwa
    # approximants
    Phoneme("l", "approximant", 0.07, 0.45, (360, 1300, 2800), jaw=0.35, spread=0.1),
    Phoneme("r", "approximant", 0.07, 0.45, (420, 1300, 1650), jaw=0.3, round=0.5),
    Phoneme("w", "approximant", 0.065, 0.40, (300, 650, 2200), jaw=0.2, round=1.0),
    Phoneme("j", "approximant", 0.06, 0.40, (280, 2200, 3000), jaw=0.2, spread=0.8),
    # nasals
    Phoneme("m", "nasal", 0.08, 0.30, (280, 1000, 2300), jaw=0.05, closure=1.0),
    Phoneme("n", "nasal", 0.07, 0.30, (280, 1500, 2500), jaw=0.25),
    # plosives: closure (silent, or a voice bar), then a burst at the release
    Phoneme("p", "plosive", 0.085, 0.0, burst=(500, 4000, 0.35), jaw=0.05, closure=1.0),
    Phoneme("b", "plosive", 0.075, 0.08, (250, 900, 2300), burst=(500, 3500, 0.25), jaw=0.05, closure=1.0),
    Phoneme("t", "plosive", 0.075, 0.0, burst=(3000, 7000, 0.35), jaw=0.25),
    Phoneme("d", "plosive", 0.07, 0.08, (250, 1700, 2600), burst=(2800, 6500, 0.25), jaw=0.25),
    Phoneme("k", "plosive", 0.08, 0.0, burst=(1500, 3500, 0.35), jaw=0.35),
    Phoneme("g", "plosive", 0.075, 0.08, (250, 1500, 2400), burst=(1400, 3200, 0.25), jaw=0.35),
    # fricatives
    Phoneme("f", "fricative", 0.095, 0.0, noise=(3000, 8000, 0.08), jaw=0.15, closure=0.6),
    Phoneme("v", "fricative", 0.08, 0.20, (300, 1200, 2400), noise=(3000, 8000, 0.06), jaw=0.15, closure=0.6),
    Phoneme("s", "fricative", 0.105, 0.0, noise=(4500, 9500, 0.22), jaw=0.15, spread=0.4),
    Phoneme("z", "fricative", 0.09, 0.20, (300, 1500, 2500), noise=(4500, 9500, 0.14), jaw=0.15, spread=0.4),
    Phoneme("S", "fricative", 0.105, 0.0, noise=(2200, 5500, 0.25), jaw=0.2, round=0.6),  # "sh"
    Phoneme("h", "fricative", 0.06, 0.0, noise=(500, 5000, 0.07), jaw=0.45),
)
PHONEME = {p.char: p for p in PHONEMES}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Size of one corpus flavour: head mesh resolution, sequences per speaker and splits."""

    name: str
    n_rings: int  # latitude rings of the head mesh (poles excluded)
    n_columns: int  # vertices per ring
    seqs_per_speaker: int
    train_seqs: int  # per training speaker: train, then val, then test-A
    val_seqs: int
    reference_seqs: int  # per val/test speaker: reference, then val / test-B
    num_sentences: int  # sentence pool shared by all speakers
    clip_seconds: tuple[float, float] = (2.0, 4.0)
    # A readable face (data/synthetic/face.py): parted lips along a mouth slit, eyeballs in
    # sockets under lids, a shaped nose and chin. Off for "small", whose 14 columns cannot
    # carry it and whose geometry the learning checks are calibrated on.
    face_detail: bool = False


PRESETS: dict[str, Preset] = {
    "small": Preset("small", n_rings=12, n_columns=14, seqs_per_speaker=12, train_seqs=8, val_seqs=2,
                    reference_seqs=4, num_sentences=40),
    # 70 x 72 + 2 poles = 5042 vertices, about FLAME's 5023 (VOCASET's meshes).
    "default": Preset("default", n_rings=70, n_columns=72, seqs_per_speaker=20, train_seqs=14, val_seqs=3,
                      reference_seqs=6, num_sentences=120, face_detail=True),
}
SPEAKER_ROLES = ("train",) * 8 + ("val",) * 2 + ("test",) * 2


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent, order-free random stream per (seed, purpose, ...)."""
    return np.random.default_rng([int(seed), *(int(s) for s in stream)])


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (DataError naming the choices when there is none)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DataError(f"synthetic preset {name!r} does not exist; choose one of {sorted(PRESETS)}") from None


def emotion_scale(emotion: int, intensity: int) -> tuple[EmotionEffect, float]:
    """The emotion's effect at full intensity and the factor that scales it (0 for neutral)."""
    return EMOTION_EFFECTS[emotion], (0.0 if emotion == 0 else (intensity + 1) / 3.0)

