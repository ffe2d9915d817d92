"""The synthetic corpus (datasets.md section 8): seeded, deterministic, with known structure.

Every clip is generated from one **phoneme timeline**, and both the audio and the motion are
rendered from that same timeline, so audio predicts motion up to the speaker's style, and
every style parameter is recorded in ``meta.json`` (``speaker_styles``).

Generative model
----------------
Face model. A small FLAME-structured head (``face_model.npz``, the FLAME npz layout with
``num_shape_components = 100``) rendered by :class:`talkmesh.face.flame.FlameLayer`; the
corpus has no skinning code of its own.

- Template: a latitude/longitude head (ellipsoid with nose, lips, chin, eye sockets, brow
  ridge, cheeks, ears and a neck), denser at the front. ``small``: 170 vertices,
  ``default``: 1370 vertices.
- Shape basis (100): width/height/depth scalings, then smooth random fields with decaying
  amplitude. Each speaker has a shape beta ~ N(0, 1); its template is FLAME(beta).
- Expression basis (50). The leading components have fixed meanings (``EXPRESSION_COMPONENTS``):
  0 jaw-open (lip parting), 1 lip-round, 2 smile, 3 brow-raise, 4 blink, 5 lip-press,
  6 brow-furrow, 7 lip-spread, 8 mouth-asymmetry. Components 9..49 are small smooth local
  deformations (random Gaussian bumps) that carry a speaker's idiosyncratic offsets.
- Joints root, neck, jaw, eyes (FLAME's tree); the jaw joint sits behind the mouth and the
  lower lip, chin and lower face are skinned to it, so jaw rotation (x axis) opens the mouth.
- Regions (disjoint): lips (upper + lower lip) and the upper face (forehead + eye region),
  written as ``regions/lve.txt``, ``regions/fdd.txt`` and ``FLAME_masks.pkl``.

Speakers. 12 speakers split like VOCASET: 8 train, 2 val, 2 test. Each has recorded style
parameters (``STYLE_RANGES``, drawn by stratified sampling so every parameter spans its
range): articulation gain, lip rounding, coarticulation time constant, asymmetry, brow
activity, head-motion amplitude and rhythm (frequency), blink rate, speaking rate, voice
pitch (f0) and formant scale; plus a per-phoneme-class head-rotation offset table, static
idiosyncratic expression offsets and the shape beta.

Content. A pool of sentences (shared across speakers, like VOCASET's sentences) built from
CV(C) syllables over ``PHONEMES``; one stressed syllable per word, one or two emphasised
words per sentence. Transcripts are the phoneme strings (one character per phoneme, a space
per pause). Phoneme durations are scaled by the speaker's speaking rate and the emotion.

Audio (22050 Hz int16, so loaders must resample). Source-filter synthesis per phoneme
segment, cross-faded at the boundaries: a glottal pulse train at the speaker's f0 contour
(declination, pitch accents on stressed syllables, slow jitter) through a cascade of formant
resonators scaled by the speaker's formant scale (vowels, approximants, nasals, voice bars of
voiced plosives and fricatives); band-passed noise for fricatives and aspiration; decaying
noise bursts at plosive releases; silence (a tiny noise floor) in pauses. The vocal level of a
phoneme rises with its jaw opening (open vowels are loud) and its stress.

Motion at the corpus fps, FLAME-56 = expression 50 | jaw 3 | head rotation 3. Viseme targets
per phoneme (jaw opening, lip rounding, lip spread, lip closure for bilabials and
labiodentals) are smoothed by coarticulation: a first-order low-pass run forwards and
backwards (critically damped, anticipatory and carry-over) with the speaker's time constant.
They are scaled by articulation gain, lip-rounding style and asymmetry. The upper face gets
brow raises at emphasised syllables and following the vocal energy (scaled by brow activity),
and seeded blinks. Head rotation = the speaker's amplitude x (sinusoids at its rhythm +
per-phoneme-class offsets + nods at emphasis).

Emotions (0-based EMOTE labels, datasets.md 5.2): 0 neutral (intensity 0), 1 happy, 2 sad,
6 angry with intensity 0..2. They change the voice (pitch, energy, rate) and the face (smile
for happy, brow raise/furrow for sad and angry, articulation and head-motion scaling), see
``EMOTION_EFFECTS``.

Vertices are stored with **zero head rotation** (and zero neck and eyes): the head pose lives
only in params columns 53:56, never inside LVE/FDD (datasets.md 6.2). ``vertices_npy`` equals
``FlameLayer(face_model.npz).vertices_from_params(params[:, :53], shape=beta)``.

On disk (the processed layout read by :class:`ProcessedCorpus`)::

    vertices_npy/<stem>.npy   (T, V*3) float32       wav/<stem>.wav      22050 Hz int16
    params_npy/<stem>.npy     (T, 56) float32        text/<stem>.txt     phoneme string
    templates.pkl             subject -> (V, 3)      face_model.npz      FLAME npz layout
    regions/lve.txt, regions/fdd.txt, FLAME_masks.pkl                    vertex regions
    meta.json                 generator version, preset, seed, fps, audio rate, speakers
                              (split role, style, shape), emotions, phonemes, sequences

Stems are ``S01_seq03``. Splits: per training speaker the first sequences are ``train``, then
``val``, then ``test-A``; for the val and test speakers the first sequences are the
``reference`` pool (metrics.md 6.3) and the rest ``val`` resp. ``test-B``.
Same seed -> byte-identical arrays (the npz archive's zip timestamps aside); the default
preset generates in well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import CorpusInfo, load_face_model
from talkmesh.data.errors import DataError
from talkmesh.data.processed import ProcessedCorpus
from talkmesh.data.regions import Regions, load_regions, with_overrides

if TYPE_CHECKING:
    from talkmesh.face.flame import FlameLayer

__all__ = [
    "AUDIO_RATE",
    "EMOTIONS",
    "EMOTION_EFFECTS",
    "EXPRESSION_COMPONENTS",
    "GENERATOR_VERSION",
    "PHONEMES",
    "PRESETS",
    "STYLE_RANGES",
    "SyntheticCorpus",
    "build_face_model",
    "generate_corpus",
    "read_meta",
    "speaker_styles",
]

GENERATOR_VERSION = 1
AUDIO_RATE = 22050  # Hz; deliberately not 16 kHz so every loader resamples
NUM_SHAPE = 100
NUM_EXPR = 50
DEFAULT_FPS = 25.0
_CTRL_RATE = 1000.0  # Hz, control timeline on which visemes, f0 and envelopes are built

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
_VOWELS = "aeiouE"
_VOWEL_WEIGHTS = (0.24, 0.2, 0.18, 0.14, 0.1, 0.14)
_ONSETS = "ptkbdgmnfvszShlrwj"
_CODAS = "ptkdmnszlr"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    n_rings: int  # latitude rings of the head mesh (poles excluded)
    n_columns: int  # vertices per ring
    seqs_per_speaker: int
    train_seqs: int  # per training speaker: train, then val, then test-A
    val_seqs: int
    reference_seqs: int  # per val/test speaker: reference, then val / test-B
    num_sentences: int  # sentence pool shared by all speakers
    clip_seconds: tuple[float, float] = (2.0, 4.0)


PRESETS: dict[str, Preset] = {
    "small": Preset("small", n_rings=12, n_columns=14, seqs_per_speaker=12, train_seqs=8, val_seqs=2,
                    reference_seqs=4, num_sentences=40),
    "default": Preset("default", n_rings=36, n_columns=38, seqs_per_speaker=20, train_seqs=14, val_seqs=3,
                      reference_seqs=6, num_sentences=120),
}
SPEAKER_ROLES = ("train",) * 8 + ("val",) * 2 + ("test",) * 2
_STEM = re.compile(r"^(?P<subject>S\d+)_(?P<sentence>seq\d+)$")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent, order-free random stream per (seed, purpose, ...)."""
    return np.random.default_rng([int(seed), *(int(s) for s in stream)])


# ======================================================================================
# Face model
# ======================================================================================


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclasses.dataclass
class _Head:
    """The procedural head mesh and the surface coordinates used to place features."""

    vertices: np.ndarray  # (V, 3) metres; x = subject's left, y up, z forward
    faces: np.ndarray  # (F, 3)
    theta: np.ndarray  # (V,) azimuth, 0 = front, > 0 = subject's left
    phi: np.ndarray  # (V,) elevation
    direction: np.ndarray  # (V, 3) unit direction of the underlying sphere
    mouth_phi: float  # elevation of the mouth line (between two rings)
    rings: np.ndarray  # (n_rings,) ring elevations

    def bump(self, theta0: float, phi0: float, s_theta: float, s_phi: float) -> np.ndarray:
        """(V,) Gaussian falloff on the surface around (theta0, phi0)."""
        dt = np.angle(np.exp(1j * (self.theta - theta0)))  # wrapped azimuth difference
        return np.exp(-0.5 * ((dt / s_theta) ** 2 + ((self.phi - phi0) / s_phi) ** 2))


def _quantiles(
    lo: float, hi: float, density: Any, n: int, open_end: bool = True
) -> np.ndarray:
    """``n`` points in (lo, hi) spaced inversely to ``density`` (inverse CDF on a fine grid).
    ``open_end``: excludes both ends; else includes ``lo`` and steps so the points wrap around."""
    x = np.linspace(lo, hi, 4001)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density(x[1:]) + density(x[:-1])) * np.diff(x))])
    cdf /= cdf[-1]
    q = (np.arange(n) + 1) / (n + 1) if open_end else np.arange(n) / n
    return np.interp(q, cdf, x)


def _head_mesh(preset: Preset) -> _Head:
    """Latitude/longitude head, denser at the front and around the equator. Vertex order:
    ring by ring from the bottom, then the bottom and top poles."""
    nr, nc = preset.n_rings, preset.n_columns
    rings = _quantiles(-0.5 * np.pi, 0.5 * np.pi, lambda x: 1.0 + 3.0 * np.exp(-(((x + 0.2) / 0.45) ** 2)), nr)
    cols = _quantiles(-np.pi, np.pi, lambda x: 1.0 + 4.0 * np.exp(-((x / 0.6) ** 2)), nc, open_end=False)
    cols[1:] = 0.5 * (cols[1:] - cols[1:][::-1])  # exactly mirror-symmetric: column j <-> n - j, -pi at 0
    phi = np.concatenate([np.repeat(rings, nc), [-0.5 * np.pi, 0.5 * np.pi]])
    theta = np.concatenate([np.tile(cols, nr), [0.0, 0.0]])
    d = np.stack([np.cos(phi) * np.sin(theta), np.sin(phi), np.cos(phi) * np.cos(theta)], axis=1)  # (V, 3)

    # The mouth line lies midway between the two rings around -0.40 rad.
    below = int(np.searchsorted(rings, -0.40)) - 1
    below = min(max(below, 0), nr - 2)
    mouth_phi = float(0.5 * (rings[below] + rings[below + 1]))
    head = _Head(np.zeros((0, 3)), np.zeros((0, 3), np.int64), theta, phi, d, mouth_phi, rings)

    radii = np.array([0.075, 0.105, 0.092])
    pos = d * radii
    pos[:, 0] *= 1.0 - 0.12 * _smoothstep(-0.2, -0.9, phi) * _smoothstep(0.6, 0.0, np.abs(np.cos(theta)) - 0.4)
    neck = _smoothstep(-0.9, -1.4, phi)  # narrow neck at the bottom
    pos[:, [0, 2]] *= (1.0 - 0.4 * neck)[:, None]
    relief = (
        0.020 * head.bump(0.0, -0.08, 0.10, 0.16)  # nose
        + 0.006 * head.bump(0.0, mouth_phi, 0.28, 0.08)  # lips
        + 0.010 * head.bump(0.0, -0.85, 0.25, 0.12)  # chin
        - 0.006 * (head.bump(0.40, 0.12, 0.14, 0.09) + head.bump(-0.40, 0.12, 0.14, 0.09))  # eye sockets
        + 0.004 * (head.bump(0.38, 0.30, 0.25, 0.06) + head.bump(-0.38, 0.30, 0.25, 0.06))  # brow ridge
        + 0.004 * (head.bump(0.55, -0.25, 0.2, 0.2) + head.bump(-0.55, -0.25, 0.2, 0.2))  # cheeks
        + 0.007 * (head.bump(0.5 * np.pi, 0.0, 0.12, 0.2) + head.bump(-0.5 * np.pi, 0.0, 0.12, 0.2))  # ears
    )
    pos += relief[:, None] * d
    head.vertices = pos

    # Faces: quads between consecutive rings (wrapping around), fans to the poles.
    idx = np.arange(nr * nc).reshape(nr, nc)
    nxt = np.roll(idx, -1, axis=1)
    quads_a, quads_b, quads_c, quads_d = idx[:-1], nxt[:-1], nxt[1:], idx[1:]
    tris = [
        np.stack([quads_a, quads_b, quads_c], -1).reshape(-1, 3),
        np.stack([quads_a, quads_c, quads_d], -1).reshape(-1, 3),
        np.stack([np.full(nc, nr * nc), nxt[0], idx[0]], -1),  # bottom pole
        np.stack([np.full(nc, nr * nc + 1), idx[-1], nxt[-1]], -1),  # top pole
    ]
    faces = np.concatenate(tris).astype(np.int64)
    tri = pos[faces]  # (F, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("fc,fc->f", normal, tri.mean(1)) < 0
    faces[inward] = faces[inward][:, ::-1]  # outward winding
    head.faces = faces
    return head


def _region_masks(head: _Head) -> dict[str, np.ndarray]:
    """Named vertex index sets (FLAME_masks.pkl keys). lips and forehead U eye_region are disjoint."""
    th, ph, m = head.theta, head.phi, head.mouth_phi
    spacing = float(np.max(np.diff(head.rings[np.abs(head.rings - m) < 0.5]))) if head.rings.size > 1 else 0.2
    lip_h = max(0.12, 0.6 * spacing)
    lips = (np.abs(th) <= 0.36) & (np.abs(ph - m) <= lip_h)
    eye_l = (np.abs(th - 0.40) <= 0.26) & (np.abs(ph - 0.14) <= 0.17)
    eye_r = (np.abs(th + 0.40) <= 0.26) & (np.abs(ph - 0.14) <= 0.17)
    eyes = eye_l | eye_r
    forehead = (np.abs(th) <= 0.8) & (ph > 0.31) & (ph <= 0.95) & ~eyes
    nose = (np.abs(th) <= 0.2) & (ph > m + lip_h) & (ph < 0.0) & ~lips
    chin = (np.abs(th) <= 0.5) & (ph < m - lip_h) & (ph >= m - 0.6)
    face = (np.abs(th) <= 1.0) & (ph >= -1.0) & (ph <= 0.95)
    scalp = (ph > 0.95) | ((np.abs(th) > 1.6) & (ph > -0.9))
    neck = ph < -1.0
    where = {
        "lips": lips,
        "upper_lip": lips & (ph > m),
        "lower_lip": lips & (ph < m),
        "forehead": forehead,
        "eye_region": eyes,
        "left_eye_region": eye_l,
        "right_eye_region": eye_r,
        "nose": nose,
        "chin": chin,
        "face": face,
        "scalp": scalp,
        "neck": neck,
    }
    return {k: np.nonzero(v)[0].astype(np.int64) for k, v in where.items()}


def _expression_basis(head: _Head, rng: np.random.Generator) -> np.ndarray:
    """(V, 3, 50) expression displacements in metres per unit coefficient."""
    th, ph, m = head.theta, head.phi, head.mouth_phi
    pos = head.vertices
    nv = pos.shape[0]
    upper = (ph > m).astype(float)
    lower = 1.0 - upper
    side = np.tanh(th / 0.15)  # +1 on the subject's left, -1 on the right
    mouth = head.bump(0.0, m, 0.35, 0.15)
    basis = np.zeros((nv, 3, NUM_EXPR))

    def put(k: int, dx: Any = 0.0, dy: Any = 0.0, dz: Any = 0.0) -> None:
        basis[:, 0, k] += dx
        basis[:, 1, k] += dy
        basis[:, 2, k] += dz

    lip_lo = head.bump(0.0, m - 0.06, 0.30, 0.12) * lower
    lip_up = head.bump(0.0, m + 0.06, 0.30, 0.10) * upper
    put(EXPR["jaw_open"], dy=-0.003 * lip_lo + 0.001 * lip_up - 0.001 * head.bump(0.0, -0.8, 0.3, 0.2),
        dz=-0.0005 * lip_lo)
    put(EXPR["lip_round"], dx=-0.15 * pos[:, 0] * mouth, dz=0.004 * mouth)
    corners = head.bump(0.30, m + 0.02, 0.15, 0.12) + head.bump(-0.30, m + 0.02, 0.15, 0.12)
    cheeks = head.bump(0.5, -0.2, 0.2, 0.15) + head.bump(-0.5, -0.2, 0.2, 0.15)
    put(EXPR["smile"], dx=0.003 * side * corners, dy=0.004 * corners + 0.002 * cheeks,
        dz=-0.001 * corners + 0.0015 * cheeks)
    brows = head.bump(0.38, 0.30, 0.3, 0.12) + head.bump(-0.38, 0.30, 0.3, 0.12) + 0.5 * head.bump(0.0, 0.5, 0.6, 0.3)
    put(EXPR["brow_raise"], dy=0.004 * brows)
    lid_up = head.bump(0.40, 0.18, 0.16, 0.07) + head.bump(-0.40, 0.18, 0.16, 0.07)
    lid_lo = head.bump(0.40, 0.08, 0.16, 0.05) + head.bump(-0.40, 0.08, 0.16, 0.05)
    put(EXPR["blink"], dy=-0.004 * lid_up + 0.001 * lid_lo, dz=0.001 * lid_up)
    press_up = head.bump(0.0, m + 0.05, 0.3, 0.08) * upper
    press_lo = head.bump(0.0, m - 0.05, 0.3, 0.08) * lower
    put(EXPR["lip_press"], dy=-0.002 * press_up + 0.003 * press_lo, dz=-0.0005 * (press_up + press_lo))
    inner = head.bump(0.18, 0.28, 0.15, 0.10) + head.bump(-0.18, 0.28, 0.15, 0.10)
    put(EXPR["brow_furrow"], dx=-0.002 * side * inner, dy=-0.003 * inner)
    spread = head.bump(0.0, m, 0.4, 0.12)
    put(EXPR["lip_spread"], dx=0.12 * pos[:, 0] * spread, dz=-0.001 * spread)
    put(EXPR["mouth_asymmetry"], dy=0.003 * side * head.bump(0.0, m, 0.45, 0.15))

    # 9..49: small smooth local deformations around the face.
    for k in range(len(EXPRESSION_COMPONENTS), NUM_EXPR):
        centre_t, centre_p = rng.uniform(-1.0, 1.0), rng.uniform(-0.9, 0.9)
        s_t, s_p = rng.uniform(0.15, 0.35, size=2)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        basis[:, :, k] = 0.0015 * head.bump(centre_t, centre_p, s_t, s_p)[:, None] * direction
    return basis


def _shape_basis(head: _Head, rng: np.random.Generator) -> np.ndarray:
    """(V, 3, 100) smooth identity deformations with decaying amplitude (metres per unit beta)."""
    pos, d = head.vertices, head.direction
    nv = pos.shape[0]
    basis = np.zeros((nv, 3, NUM_SHAPE))
    for axis in range(3):  # width, height, depth
        basis[:, axis, axis] = 0.06 * pos[:, axis]
    for k in range(3, NUM_SHAPE):
        freq = rng.normal(0.0, 2.0, size=(3, 3))  # (terms, 3)
        phase = rng.uniform(0.0, 2 * np.pi, size=3)
        amp = rng.normal(size=(3, 3))  # (terms, xyz)
        field = np.cos(d @ freq.T + phase) @ amp  # (V, 3)
        field /= max(float(np.abs(field).max()), 1e-12)
        basis[:, :, k] = 0.004 * (k - 1) ** -0.6 * field
    return basis


def build_face_model(preset: str = "small", seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The corpus's FLAME-structured face model.

    Returns ``(arrays, masks)``: ``arrays`` in the FLAME layout for
    ``FlameLayer.from_arrays(**arrays)`` (v_template (V, 3), shapedirs (V, 3, 150) = 100 shape
    | 50 expression, posedirs (V, 3, 36), J_regressor (5, V), weights (V, 5), kintree_table
    (2, 5), f (F, 3), num_shape_components = 100), float32; ``masks`` the named vertex sets.
    """
    p = _preset(preset)
    head = _head_mesh(p)
    rng = _rng(seed, 1)
    nv = head.vertices.shape[0]
    th, ph, m = head.theta, head.phi, head.mouth_phi
    masks = _region_masks(head)

    # Skinning: lower lip, chin and lower face follow the jaw; the neck base the root; the rest the neck.
    front = _smoothstep(1.45, 0.9, np.abs(th))
    w_jaw = _smoothstep(0.0, 0.03, m - ph) * front * _smoothstep(-1.25, -1.0, ph)
    w_root = _smoothstep(-1.0, -1.3, ph) * (1.0 - w_jaw)
    weights = np.zeros((nv, 5))
    weights[:, 0] = w_root
    weights[:, 2] = w_jaw
    weights[:, 1] = 1.0 - w_jaw - w_root

    # Joints as averages of vertices: root = bottom ring, neck = ring near -1.0 rad,
    # jaw = the sides of the head at the hinge (midpoint lies on the midline, behind the mouth),
    # eyes = the vertices nearest each eye centre.
    nr, nc = p.n_rings, p.n_columns
    ring_of = np.concatenate([np.repeat(np.arange(nr), nc), [-1, -1]])  # poles: -1
    j_reg = np.zeros((5, nv))
    j_reg[0, ring_of == 0] = 1.0
    j_reg[1, ring_of == max(1, int(np.argmin(np.abs(head.rings + 1.0))))] = 1.0

    def nearest(theta0: float, phi0: float, k: int) -> np.ndarray:
        dist = np.abs(np.angle(np.exp(1j * (th - theta0)))) + np.abs(ph - phi0)
        dist[nr * nc :] = np.inf  # never the poles
        return np.argsort(dist, kind="stable")[:k]

    for sign in (1.0, -1.0):
        j_reg[2, nearest(sign * 0.5 * np.pi, -0.25, 2)] = 1.0
    j_reg[3, nearest(0.40, 0.14, 4)] = 1.0
    j_reg[4, nearest(-0.40, 0.14, 4)] = 1.0
    j_reg /= j_reg.sum(1, keepdims=True)

    # Pose correctives: only the jaw's sin(angle) entry, (R_jaw - I)[2, 1] (pose feature 9 + 7):
    # the cheeks bulge a little as the mouth opens.
    posedirs = np.zeros((nv, 3, 36))
    cheek = head.bump(0.45, m - 0.1, 0.25, 0.2) + head.bump(-0.45, m - 0.1, 0.25, 0.2)
    posedirs[:, :, 16] = 0.01 * cheek[:, None] * head.direction

    shapedirs = np.concatenate([_shape_basis(head, rng), _expression_basis(head, rng)], axis=2)
    arrays = {
        "v_template": head.vertices.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "J_regressor": j_reg.astype(np.float32),
        "weights": weights.astype(np.float32),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": head.faces,
        "num_shape_components": np.asarray(NUM_SHAPE, dtype=np.int64),
    }
    return arrays, masks


# ======================================================================================
# Speakers and content
# ======================================================================================


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DataError(f"synthetic preset {name!r} does not exist; choose one of {sorted(PRESETS)}") from None


def _speakers(preset: Preset, seed: int) -> list[dict[str, Any]]:
    """12 speakers with stratified style parameters, head-class offsets, idiosyncrasies and beta."""
    rng = _rng(seed, 2)
    n = len(SPEAKER_ROLES)
    styles: dict[str, np.ndarray] = {}
    for key, (lo, hi) in STYLE_RANGES.items():
        q = (rng.permutation(n) + rng.uniform(0.1, 0.9, size=n)) / n  # one value per stratum
        styles[key] = lo + (hi - lo) * q
    out = []
    for i, role in enumerate(SPEAKER_ROLES):
        srng = _rng(seed, 3, i)
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


def _sentences(preset: Preset, seed: int) -> list[list[tuple[str, int]]]:
    """Pool of sentences: lists of (phoneme char, stress 0/1/2); ' ' is a pause between words."""
    rng = _rng(seed, 4)
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


def _emotion_scale(emotion: int, intensity: int) -> tuple[EmotionEffect, float]:
    return EMOTION_EFFECTS[emotion], (0.0 if emotion == 0 else (intensity + 1) / 3.0)


@dataclasses.dataclass
class _Segment:
    ph: Phoneme
    start: float  # s
    end: float  # s
    stress: int


def _timeline(
    sentence: list[tuple[str, int]], style: dict[str, float], emotion: int, intensity: int, preset: Preset,
    rng: np.random.Generator,
) -> list[_Segment]:
    """Phoneme segments of one clip: leading pause, the sentence, trailing pause; total
    duration within ``preset.clip_seconds``."""
    eff, k = _emotion_scale(emotion, intensity)
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
    segs = [_Segment(PHONEME[" "], 0.0, lead, 0)]
    t = lead
    for ph, dur, stress in items:
        segs.append(_Segment(ph, t, t + dur, stress))
        t += dur
    segs.append(_Segment(PHONEME[" "], t, t + trail, 0))
    return segs


# ======================================================================================
# Audio
# ======================================================================================


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


def _synthesize_audio(
    segs: list[_Segment], style: dict[str, float], emotion: int, intensity: int, n_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_samples,) float32 waveform at AUDIO_RATE from the phoneme segments."""
    from scipy.signal import lfilter, sosfilt

    sr = AUDIO_RATE
    eff, k = _emotion_scale(emotion, intensity)
    t_end = n_samples / sr
    # f0 contour on the control grid: declination, accents on stressed vowels, slow jitter.
    tc = np.arange(int(np.ceil(t_end * _CTRL_RATE)) + 2) / _CTRL_RATE
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
    f0 = np.interp(ts, tc, f0c)  # (S,)

    # Glottal pulse train (fractional placement), spectral tilt, radiation, a little breath.
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
    exc = exc / max(float(np.std(exc)), 1e-9) + 0.05 * noise

    fric = rng.standard_normal(n_samples, dtype=np.float32)
    burst_noise = rng.standard_normal(n_samples, dtype=np.float32)
    out = np.zeros(n_samples)
    energy = 1.0 + eff.energy * k
    bounds = [int(round(s.start * sr)) for s in segs] + [min(int(round(segs[-1].end * sr)), n_samples)]
    margin = int(0.02 * sr)
    half = [0]
    for i in range(1, len(segs)):  # cross-fade half-widths at the inner boundaries
        d_left, d_right = bounds[i] - bounds[i - 1], bounds[i + 1] - bounds[i]
        half.append(max(0, min(margin, d_left // 2, d_right // 2)))
    half.append(0)
    scale = style["formant_scale"]
    for i, s in enumerate(segs):
        ph = s.ph
        if ph.cls == "pause":
            continue
        s0, s1 = bounds[i], bounds[i + 1]
        a0, b0 = max(s0 - half[i], 0), min(s1 + half[i + 1], n_samples)
        n = b0 - a0
        if n <= 0:
            continue
        w = np.ones(n)
        if half[i]:
            w[: 2 * half[i]] = (np.arange(2 * half[i]) + 0.5) / (2 * half[i])
        if half[i + 1]:
            w[n - 2 * half[i + 1] :] = 1.0 - (np.arange(2 * half[i + 1]) + 0.5) / (2 * half[i + 1])
        core = slice(s0 - a0, max(s1 - a0, s0 - a0 + 1))
        gain = energy * (1.0 + 0.3 * s.stress)
        if ph.voiced:
            formants = tuple(round(f * scale, 1) for f in (*ph.formants, 3500.0))
            y = _norm(sosfilt(_formant_sos(formants), exc[a0:b0]), core)
            out[a0:b0] += ph.voiced * gain * w * y
        if ph.noise is not None:
            lo, hi, level = ph.noise
            y = _norm(sosfilt(_band_sos(lo, hi), fric[a0:b0]), core)
            out[a0:b0] += level * gain * w * y
        if ph.burst is not None:
            lo, hi, level = ph.burst
            c0 = max(s1 - int(0.008 * sr), 0)
            length = min(int(0.03 * sr), n_samples - c0)
            if length > 8:
                tt = np.arange(length) / sr
                env = (1.0 - np.exp(-tt / 0.001)) * np.exp(-tt / 0.008)
                y = sosfilt(_band_sos(lo, hi), burst_noise[c0 : c0 + length])
                y = y / max(float(np.max(np.abs(y))), 1e-9)
                out[c0 : c0 + length] += 2.5 * level * energy * env * y
    out += 0.002 * rng.standard_normal(n_samples, dtype=np.float32)  # noise floor
    out *= 0.1
    return (0.95 * np.tanh(out / 0.95)).astype(np.float32)


# ======================================================================================
# Motion
# ======================================================================================


def _coarticulate(x: np.ndarray, tau: float) -> np.ndarray:
    """First-order low-pass with time constant ``tau`` (s) run forwards then backwards on the
    control grid: a critically damped, zero-lag smoother (anticipatory + carry-over)."""
    from scipy.signal import lfilter

    a = float(np.exp(-1.0 / (tau * _CTRL_RATE)))
    y = lfilter([1.0 - a], [1.0, -a], x, zi=[a * x[0]])[0]
    return lfilter([1.0 - a], [1.0, -a], y[::-1], zi=[a * y[-1]])[0][::-1]


def _synthesize_motion(
    segs: list[_Segment], spk: dict[str, Any], emotion: int, intensity: int, fps: float, n_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(T, 56) float32 FLAME-56 parameters: expression 50 | jaw 3 | head rotation 3."""
    style = spk["style"]
    eff, k = _emotion_scale(emotion, intensity)
    nc = int(np.ceil(n_frames / fps * _CTRL_RATE)) + 2
    tc = np.arange(nc) / _CTRL_RATE
    jaw, rnd, spr, clo, level = (np.zeros(nc) for _ in range(5))
    cls = np.zeros(nc, dtype=np.int64)
    emphasis = np.zeros(nc)
    for s in segs:
        i0, i1 = int(round(s.start * _CTRL_RATE)), min(int(round(s.end * _CTRL_RATE)), nc)
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
    cls[int(round(segs[-1].end * _CTRL_RATE)) :] = 0

    tau = style["coarticulation_tau"]
    jaw_s, rnd_s, spr_s = _coarticulate(jaw, tau), _coarticulate(rnd, tau), _coarticulate(spr, tau)
    clo_s = _coarticulate(clo, 0.5 * tau)  # lips close fully even in fast speech
    level_s = _coarticulate(level, 0.06)

    g = style["articulation_gain"] * (1.0 + eff.articulation * k)
    asym = style["asymmetry"]
    expr = np.zeros((nc, len(EXPRESSION_COMPONENTS)))  # the named components, on the control grid
    expr[:, EXPR["jaw_open"]] = g * jaw_s
    expr[:, EXPR["lip_round"]] = style["lip_rounding"] * g * rnd_s
    expr[:, EXPR["lip_spread"]] = g * spr_s
    expr[:, EXPR["lip_press"]] = 1.1 * clo_s
    expr[:, EXPR["mouth_asymmetry"]] = asym * g * (jaw_s + 0.5 * rnd_s)
    happy = eff.smile * k
    expr[:, EXPR["smile"]] = happy * (1.0 + 0.1 * jaw_s)
    brow = style["brow_activity"]
    expr[:, EXPR["brow_raise"]] = brow * (0.8 * emphasis + 0.5 * level_s) + eff.brow_raise * k
    expr[:, EXPR["brow_furrow"]] = eff.brow_furrow * k * (1.0 + 0.2 * brow * emphasis)

    # Blinks: seeded, exponential gaps at the speaker's rate plus a 0.25 s refractory time;
    # fast closing, slower opening.
    t = -rng.uniform(0.0, 1.0 / style["blink_rate"])
    blink = np.zeros(nc)
    while True:
        t += rng.exponential(1.0 / style["blink_rate"]) + 0.25
        if t >= tc[-1]:
            break
        dt = tc - t
        blink = np.maximum(blink, np.where(dt < 0, np.exp(-0.5 * (dt / 0.03) ** 2), np.exp(-dt / 0.07)))
    expr[:, EXPR["blink"]] = blink

    # Idiosyncratic small components (evaluated at the frame times): static speaker offsets
    # plus slow drift.
    idx = np.minimum(np.round(np.arange(n_frames) / fps * _CTRL_RATE).astype(np.int64), nc - 1)  # (T,)
    n_idio = NUM_EXPR - len(EXPRESSION_COMPONENTS)
    f = rng.uniform(0.1, 0.6, size=n_idio)
    p = rng.uniform(0.0, 2 * np.pi, size=n_idio)
    idio = spk["idiosyncrasy"] + 0.04 * np.sin(2 * np.pi * f * tc[idx, None] + p)  # (T, 41)

    jaw_rot = np.zeros((nc, 3))
    jaw_rot[:, 0] = 0.18 * g * jaw_s  # rad, about x: opens the mouth
    jaw_rot[:, 2] = 0.04 * asym * g * jaw_s  # a little roll with the asymmetry

    # Head rotation: rhythm sinusoids + per-phoneme-class offsets + nods at emphasis.
    amp = style["head_amplitude"] * (1.0 + eff.head * k)
    fh = style["head_frequency"]
    hp = rng.uniform(0.0, 2 * np.pi, size=4)
    head = np.zeros((nc, 3))
    head[:, 0] = 0.7 * np.sin(2 * np.pi * fh * tc + hp[0]) + 0.3 * np.sin(2 * np.pi * 1.7 * fh * tc + hp[1])
    head[:, 1] = 0.8 * np.sin(2 * np.pi * 0.6 * fh * tc + hp[2])
    head[:, 2] = 0.35 * np.sin(2 * np.pi * 0.8 * fh * tc + hp[3])
    head *= amp
    offsets = spk["head_class_offsets"] * (1.0 + eff.head * k)  # (classes, 3)
    for axis in range(3):
        head[:, axis] += _coarticulate(offsets[cls, axis], 0.1)
    head[:, 0] += 0.5 * amp * emphasis
    if emotion == 2:
        head[:, 0] += 0.03 * k  # sad: head lowered

    return np.concatenate([expr[idx], idio, jaw_rot[idx], head[idx]], axis=1).astype(np.float32)  # (T, 56)


# ======================================================================================
# Writing
# ======================================================================================


def _sequence_plan(preset: Preset, speakers: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Per sequence: stem, subject, split, emotion, intensity, sentence id."""
    plan = []
    n = preset.seqs_per_speaker
    n_tv = preset.train_seqs + preset.val_seqs
    for i, spk in enumerate(speakers):
        rng = _rng(seed, 5, i)
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


def _write_corpus(out: Path, preset_name: str, seed: int, fps: float) -> None:
    """Generate everything into the (empty, existing) directory ``out``; meta.json last."""
    from talkmesh.audio.io import write_wav
    from talkmesh.face.flame import FlameLayer

    preset = _preset(preset_name)
    arrays, masks = build_face_model(preset_name, seed)
    FlameLayer.from_arrays(**arrays).save_npz(out / "face_model.npz")
    layer = FlameLayer.from_file(out / "face_model.npz")  # exactly what readers will load
    speakers = _speakers(preset, seed)
    sentences = _sentences(preset, seed)
    plan = _sequence_plan(preset, speakers, seed)

    for sub in ("vertices_npy", "params_npy", "wav", "text", "regions"):
        (out / sub).mkdir()
    templates = {s["name"]: layer.template(s["shape"]) for s in speakers}  # (V, 3) float32
    with open(out / "templates.pkl", "wb") as fh:
        pickle.dump(templates, fh, protocol=4)
    with open(out / "FLAME_masks.pkl", "wb") as fh:
        pickle.dump(masks, fh, protocol=4)
    (out / "regions" / "lve.txt").write_text(",".join(str(int(i)) for i in masks["lips"]) + "\n")
    upper = np.union1d(masks["forehead"], masks["eye_region"])
    (out / "regions" / "fdd.txt").write_text(",".join(str(int(i)) for i in upper) + "\n")

    sequences: dict[str, Any] = {}
    for i, spk in enumerate(speakers):
        items = [(n, item) for n, item in enumerate(plan) if item["speaker"] == i]
        clips = []
        for n, item in items:
            rng = _rng(seed, 6, n)
            sentence = sentences[item["sentence_id"]]
            segs = _timeline(sentence, spk["style"], item["emotion"], item["intensity"], preset, rng)
            n_frames = int(np.ceil(segs[-1].end * fps))
            n_samples = int(round(n_frames * AUDIO_RATE / fps))
            audio = _synthesize_audio(segs, spk["style"], item["emotion"], item["intensity"], n_samples, rng)
            params = _synthesize_motion(segs, spk, item["emotion"], item["intensity"], fps, n_frames, rng)  # (T, 56)
            clips.append((item, "".join(c for c, _ in sentence), audio, params))
        # One face-model pass per speaker (all its clips' frames), zero head rotation.
        all_params = np.concatenate([c[3][:, :53] for c in clips])  # (sum T, 53)
        all_verts = layer.vertices_from_params(all_params, spk["shape"])  # (sum T, V, 3)
        start = 0
        for item, text, audio, params in clips:
            stem, n_frames = item["stem"], params.shape[0]
            verts = all_verts[start : start + n_frames]
            start += n_frames
            np.save(out / "vertices_npy" / f"{stem}.npy", verts.reshape(n_frames, -1))  # (T, V*3)
            np.save(out / "params_npy" / f"{stem}.npy", params)  # (T, 56)
            write_wav(out / "wav" / f"{stem}.wav", audio, AUDIO_RATE)
            (out / "text" / f"{stem}.txt").write_text(text + "\n")
            sequences[stem] = {
                "subject": item["subject"],
                "sentence": item["sentence"],
                "split": item["split"],
                "emotion": item["emotion"],
                "intensity": item["intensity"],
                "sentence_id": item["sentence_id"],
                "frames": n_frames,
                "seconds": round(n_frames / fps, 6),
                "text": text,
            }
    sequences = dict(sorted(sequences.items()))

    meta = {
        "generator": "talkmesh.data.synthetic",
        "version": GENERATOR_VERSION,
        "preset": preset_name,
        "seed": seed,
        "fps": fps,
        "audio_rate": AUDIO_RATE,
        "num_vertices": int(arrays["v_template"].shape[0]),
        "num_shape_components": NUM_SHAPE,
        "num_expression_components": NUM_EXPR,
        "motion_layout": "FLAME-56: expression 0:50 | jaw 50:53 | head rotation 53:56 (axis-angle, rad)",
        "vertices": "FLAME(beta, expression, jaw) with zero head rotation, neck and eyes (datasets.md 6.2)",
        "expression_components": list(EXPRESSION_COMPONENTS),
        "emotions": {str(k): v for k, v in EMOTIONS.items()},
        "emotion_effects": {str(k): dataclasses.asdict(v) for k, v in EMOTION_EFFECTS.items()},
        "intensities": [0, 1, 2],
        "phonemes": {
            p.char: {
                "class": p.cls, "duration": p.duration, "voiced": p.voiced, "formants": list(p.formants),
                "noise": list(p.noise) if p.noise else None, "burst": list(p.burst) if p.burst else None,
                "jaw": p.jaw, "round": p.round, "spread": p.spread, "closure": p.closure,
            }
            for p in PHONEMES
        },
        "phoneme_classes": list(PHONEME_CLASSES),
        "style_ranges": {k: list(v) for k, v in STYLE_RANGES.items()},
        "speakers": {
            s["name"]: {
                "role": s["role"],
                "style": s["style"],
                "shape": [float(x) for x in s["shape"]],
                "head_class_offsets": {c: [round(float(x), 6) for x in row]
                                       for c, row in zip(PHONEME_CLASSES, s["head_class_offsets"], strict=True)},
            }
            for s in speakers
        },
        "train_subjects": [s["name"] for s in speakers if s["role"] == "train"],
        "splits": list(SPLITS),
        "eval_splits": list(EVAL_SPLITS),
        "unseen_splits": list(UNSEEN_SPLITS),
        "sentences": ["".join(c for c, _ in s) for s in sentences],
        "sequences": sequences,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _matches(root: Path, preset: str, seed: int, fps: float) -> bool:
    try:
        meta = read_meta(root)
    except DataError:
        return False
    return (meta.get("version"), meta.get("preset"), meta.get("seed"), float(meta.get("fps", 0))) == (
        GENERATOR_VERSION, preset, seed, float(fps)
    )


def generate_corpus(out: Path, preset: Literal["small", "default"] = "small", seed: int = 0, fps: float = 25.0) -> Path:
    """Generate the synthetic corpus into ``out`` (processed layout; see the module docstring).

    The corpus is written into a temporary sibling directory and renamed into place, so
    ``out`` only ever appears complete. ``out`` must not exist or be empty; if it already
    holds this very corpus (same generator version, preset, seed, fps) it is returned as is.
    Returns ``out``.
    """
    out = Path(out).expanduser()
    _preset(preset)
    if not fps > 0:
        raise DataError(f"synthetic corpus: fps must be positive, got {fps}")
    if out.exists():
        if _matches(out, preset, seed, fps):
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"{out}: exists and is not empty; choose another --out or remove it first")
    _generate_atomically(out, preset, seed, fps)
    if not _matches(out, preset, seed, fps):
        raise DataError(f"{out}: another process wrote a different corpus there")
    return out


def _generate_atomically(target: Path, preset: str, seed: int, fps: float) -> None:
    """Generate into a temporary sibling and ``os.rename`` it into place. If another process
    got there first (the rename fails because ``target`` is not empty), ours is discarded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_corpus(tmp, preset, seed, fps)
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(root: str | Path) -> dict[str, Any]:
    """``meta.json`` of a generated corpus (DataError if there is none)."""
    path = Path(root).expanduser() / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{Path(root)}: not a synthetic corpus (meta.json missing); generate one with "
            f"`talkmesh data synth --out {Path(root)}` or leave data.root empty to use the cache"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable synthetic corpus metadata ({e})") from e
    if not isinstance(meta, dict) or "speakers" not in meta or "sequences" not in meta:
        raise DataError(f"{path}: not synthetic corpus metadata (speakers/sequences missing)")
    return meta


def speaker_styles(root: str | Path) -> dict[str, dict[str, float]]:
    """Recorded style parameters per speaker: ``{"S01": {"articulation_gain": ..., ...}}``."""
    meta = read_meta(root)
    return {name: {k: float(v) for k, v in spk["style"].items()} for name, spk in meta["speakers"].items()}


def cache_path(preset: str, seed: int, fps: float) -> Path:
    """Where the corpus for (preset, seed, fps) lives when ``data.root`` is empty."""
    from talkmesh.paths import cache_dir

    return cache_dir() / f"synthetic-{preset}-s{seed}-{fps:g}fps"


def ensure_cached(preset: str, seed: int, fps: float) -> Path:
    """The cached corpus for (preset, seed, fps), generated on first use. Safe when several
    processes start at once: each generates into its own temporary directory and the first
    rename wins. A cache written by another generator version is replaced."""
    target = cache_path(preset, seed, fps)
    if _matches(target, preset, seed, fps):
        return target
    if (target / "meta.json").is_file():  # stale version: move it aside, then regenerate
        warnings.warn(f"{target}: synthetic corpus from another generator version; regenerating", stacklevel=2)
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        try:
            os.rename(target, stale / "old")
        except OSError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    _generate_atomically(target, preset, seed, fps)
    if not _matches(target, preset, seed, fps):
        raise DataError(f"{target}: exists but does not hold the synthetic corpus {preset}/seed {seed}/{fps:g} fps")
    return target


# ======================================================================================
# Reader
# ======================================================================================


class SyntheticCorpus(ProcessedCorpus):
    """The synthetic corpus through the processed-layout reader.

    ``data.root`` empty: the cache ``cache_dir()/synthetic-<preset>-s<seed>-<fps>fps``,
    generated on first access (not at construction). ``data.synthetic_flavour``: ``vertex``
    presents vertices only (VOCASET/BIWI-like); ``flame`` presents FLAME-56 params (T, 53),
    head pose (T, 3) and the speaker's shape beta, with vertices through ``face_model()``
    (MEAD-like). The params are smooth by construction and are not Savitzky-Golay filtered,
    so ``vertices_of`` reproduces the stored vertices.
    """

    format_name = "synthetic"

    def __init__(self, cfg: DataConfig) -> None:
        self._root: Path | None = None
        super().__init__(cfg)

    # ---- where the corpus is (resolved lazily, generating the cache if needed) ---------
    @property  # type: ignore[override]
    def root(self) -> Path:
        if self._root is None:
            cfg = self.cfg
            if cfg.root:
                root = Path(cfg.root).expanduser()
                read_meta(root)  # a clear error when it holds no generated corpus
            else:
                root = ensure_cached(cfg.synthetic_preset, cfg.synthetic_seed, cfg.fps or DEFAULT_FPS)
            self._root = root
        return self._root

    @root.setter
    def root(self, value: Path) -> None:  # Corpus.__init__ assigns it; resolution is lazy
        self._root = None

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        return read_meta(self.root)

    @property  # type: ignore[override]
    def native_fps(self) -> float:
        return float(self.meta["fps"])

    @property  # type: ignore[override]
    def default_fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def flavour(self) -> str:
        return self.cfg.synthetic_flavour

    @functools.cached_property
    def info(self) -> CorpusInfo:  # type: ignore[override]
        meta = self.meta
        flame = self.flavour == "flame"
        return CorpusInfo(
            format=self.format_name,
            root=str(self.root),
            fps=self.fps,
            motion="params" if flame else "vertices",
            num_vertices=int(meta["num_vertices"]),
            param_dim=53 if flame else 0,
            has_head_pose=flame,
            train_subjects=tuple(meta["train_subjects"]),
            splits=tuple(meta["splits"]),
            eval_splits=tuple(meta["eval_splits"]),
            unseen_splits=tuple(meta["unseen_splits"]),
            notes={
                "generator": f"{meta['generator']} v{meta['version']}",
                "preset": str(meta["preset"]),
                "seed": str(meta["seed"]),
                "flavour": self.flavour,
                "audio_rate": f"{meta['audio_rate']} Hz on disk",
                "vertices": "zero head rotation; head pose only in params 53:56",
                "smoothing": "none (params are smooth by construction)",
            },
        )

    # ---- processed-layout hooks ---------------------------------------------------------
    def parse_stem(self, stem: str) -> tuple[str, str]:
        m = _STEM.match(stem)
        if m is None:
            raise DataError(f"{self.root}: file stem {stem!r} is not a synthetic sequence name (S01_seq03)")
        return m["subject"], m["sentence"]

    def _seq_meta(self, subject: str, sentence: str) -> dict[str, Any] | None:
        return self.meta["sequences"].get(f"{subject}_{sentence}")

    def split_of(self, subject: str, sentence: str) -> str:
        entry = self._seq_meta(subject, sentence)
        return "unused" if entry is None else str(entry["split"])

    def emotion_of(self, subject: str, sentence: str) -> tuple[int | None, int | None]:
        entry = self._seq_meta(subject, sentence)
        if entry is None:
            return None, None
        return int(entry["emotion"]), int(entry["intensity"])

    def subject_shape(self, subject: str) -> np.ndarray:
        """(100,) float32 shape beta of a speaker."""
        try:
            return np.asarray(self.meta["speakers"][subject]["shape"], dtype=np.float32)
        except KeyError:
            raise DataError(f"{self.root}: no speaker {subject!r} in meta.json") from None

    def _load(self, seq: SequenceInfo) -> Clip:
        clip = super()._load(seq)
        if self.flavour == "flame":
            return dataclasses.replace(clip, vertices=None, shape=self.subject_shape(seq.subject))
        return dataclasses.replace(clip, params=None, head_pose=None)

    def face_model(self) -> FlameLayer | None:
        """``data.flame_model`` if set, else the corpus's own ``face_model.npz``."""
        if self.cfg.flame_model:
            return super().face_model()
        return load_face_model(str(self.root / "face_model.npz"))

    def regions(self) -> Regions:
        """Lips from ``regions/lve.txt``, upper face from ``regions/fdd.txt`` (cfg overrides applied)."""
        return self._regions

    @functools.cached_property
    def _regions(self) -> Regions:
        nv = int(self.meta["num_vertices"])
        default = load_regions(self.root / "regions" / "lve.txt", self.root / "regions" / "fdd.txt", nv)
        return with_overrides(default, self.cfg.lip_regions, self.cfg.upper_regions, nv)
