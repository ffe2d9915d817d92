"""MEAD with EMICA FLAME pseudo-ground-truth (``data.format=mead``).

Spec: datasets.md section 1 (25 fps, 16 kHz float audio), section 5 (files, emotion codes,
actor split, smoothing and value ranges), section 6.2 (canonical FLAME-56 layout), section 7
(FLAME region masks), section 9; metrics.md section 6.3 (MEAD style-reference pool).

Layout under ``data.root``::

    flame_param/<actor>/<uid>.npy    (T, 156) float: expr 0:50 | head rot 50:53 | jaw 53:56 | shape 56:156
                                     or (T, 153):    expr 0:50 | jaw 50:53 | shape 53:153 (no head rotation)
    audio_sample/<actor>/<uid>.npy   (S,) float, raw 16 kHz mono
    FLAME_masks.pkl                  ships with FLAME, not MEAD; also looked up next to ``data.flame_model``.
                                     Needed only for regions (lip/upper-face metrics and losses):
                                     ``summary()`` / `talkmesh data inspect` report it missing, not refuse

Conversion to the project's FLAME-56 (datasets.md 6.2): ``Clip.params`` (T, 53) =
expression 50 | jaw 3, ``Clip.head_pose`` (T, 3) = global rotation (None for 153-column files),
``Clip.shape`` (100,) = **mean over frames** of the shape columns (EMICA regresses beta per frame;
the mean is robust to per-frame jitter and equals the first frame when beta is constant).

Decisions made here:

- uid ``<actor>_<emotionIdx>_<intensity>_<rest>``; the emotion code is remapped to the
  0-based EMOTE order (5.2) and the intensity level 1..3 to 0..2. Codes outside the table
  (e.g. 2 "calm") are a :class:`DataError` naming the file.
- Splits: the 32/7/8 actor table of 5.3 (one-hot order = train table order, restricted to the
  actors present on disk); actors outside the table are ``unused``. ``reference`` = for each
  (test actor, emotion, intensity) the clips in sorted uid order, taken while less than 10 s of
  motion has been accumulated (the clip that reaches 10 s is included); they leave ``test``.
- Savitzky-Golay(5, 2) along time on expression, jaw and head rotation when
  ``data.smoothing`` (only for T >= 5); shape is never smoothed.
- The index reads only ``.npy`` headers (``np.load(mmap_mode="r")``), never the data.
  A clip whose audio is missing or unreadable (or not (S,)) is skipped with a warning naming
  the file, and listed in ``Corpus.skipped`` (inspect output; ``talkmesh.skipped_clips`` run
  tag); a bad flame_param file still rejects the corpus.
- Warnings (once per corpus, at indexing): ``val`` or ``test`` without clips (why: no actor
  of the split on disk, or every test clip taken as a style reference; ``notes["empty_splits"]``);
  153- and 156-column files mixed (``notes["columns_mixed"]``). Both layouts are read to the
  same FLAME-56 ``params``; only 156-column clips have ``head_pose``, so a batch holding a
  153-column clip carries none, and ``info.has_head_pose`` means "some clip has it".
- ``column_stats()`` computes per-column min/max/mean/std over the train split lazily (as
  loaded, i.e. after smoothing) and logs them (5.4); ``info.notes`` records the
  reconstruction version (``data.flame_reconstruction``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.errors import DataError
from talkmesh.data.regions import Regions, load_regions, with_overrides

__all__ = [
    "EMOTE_EMOTIONS",
    "MEAD_EMOTION_TO_EMOTE",
    "MEAD_FPS",
    "MEAD_SPLITS",
    "REFERENCE_SECONDS",
    "ColumnStats",
    "MeadCorpus",
    "parse_uid",
]

log = logging.getLogger(__name__)

MEAD_FPS = 25.0
SAMPLE_RATE = 16000
REFERENCE_SECONDS = 10.0  # metrics.md 6.3

# datasets.md 5.3 (DEEPTalk / EMOTE actor split). Train order = actor one-hot order.
MEAD_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "M003", "M005", "M007", "M009", "M011", "M012", "M013", "M019", "M022", "M023", "M024",
        "M025", "M026", "M027", "M028", "M029", "M030", "M031", "W009", "W011", "W014", "W015",
        "W016", "W018", "W019", "W021", "W023", "W024", "W025", "W026", "W028", "W029",
    ),
    "val": ("M032", "M033", "M034", "M035", "W033", "W035", "W036"),
    "test": ("M037", "M039", "M040", "M041", "M042", "W037", "W038", "W040"),
}

# datasets.md 5.2: project emotion label = 0-based EMOTE order.
EMOTE_EMOTIONS = ("neutral", "happy", "sad", "surprised", "fear", "disgusted", "angry", "contempt")
# MEAD uid code -> 0-based EMOTE index ("calm" = 2 does not occur in MEAD).
MEAD_EMOTION_TO_EMOTE: dict[int, int] = {1: 0, 3: 1, 4: 2, 5: 6, 6: 4, 7: 5, 8: 3, 9: 7}
MEAD_INTENSITY_LEVELS = (1, 2, 3)

# Column layouts of the EMICA files (datasets.md 5.1), as (start, stop) slices.
_LAYOUTS: dict[int, dict[str, tuple[int, int] | None]] = {
    156: {"expr": (0, 50), "head": (50, 53), "jaw": (53, 56), "shape": (56, 156)},
    153: {"expr": (0, 50), "head": None, "jaw": (50, 53), "shape": (53, 153)},
}
_EXPECTED = "(T, 156) = expression 50 | head rotation 3 | jaw 3 | shape 100, or (T, 153) without head rotation"

# FLAME-56 column names (datasets.md 6.2), used by column_stats.
FLAME56_COLUMNS: tuple[str, ...] = (
    *(f"expr{i}" for i in range(50)),
    "jaw_x", "jaw_y", "jaw_z",
    "head_x", "head_y", "head_z",
)


def parse_uid(uid: str, source: str | Path = "") -> tuple[str, int, int, str]:
    """``"M003_03_2_001"`` -> (actor, emotion 0-based EMOTE, intensity 0-based, sentence).

    Raises :class:`DataError` naming ``source`` (the file) for malformed uids or codes
    outside datasets.md 5.2.
    """
    where = source or uid
    parts = uid.split("_")
    if len(parts) < 3:
        raise DataError(f"{where}: MEAD uid {uid!r} is not <actor>_<emotionIdx>_<intensity>_...")
    actor, code_s, level_s = parts[0], parts[1], parts[2]
    try:
        code, level = int(code_s), int(level_s)
    except ValueError:
        raise DataError(
            f"{where}: MEAD uid {uid!r}: emotion and intensity must be integers "
            f"(<actor>_<emotionIdx>_<intensity>_...), got {code_s!r} and {level_s!r}"
        ) from None
    if code not in MEAD_EMOTION_TO_EMOTE:
        raise DataError(
            f"{where}: unknown MEAD emotion code {code} in uid {uid!r}; expected one of "
            f"{sorted(MEAD_EMOTION_TO_EMOTE)} (1 neutral, 3 happy, 4 sad, 5 angry, 6 fear, "
            "7 disgusted, 8 surprised, 9 contempt; 2 'calm' does not occur in MEAD)"
        )
    if level not in MEAD_INTENSITY_LEVELS:
        raise DataError(f"{where}: MEAD intensity {level} in uid {uid!r} is not one of {MEAD_INTENSITY_LEVELS}")
    return actor, MEAD_EMOTION_TO_EMOTE[code], level - 1, "_".join(parts[3:])


def _npy_shape(path: Path, expected: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header (memory-mapped; no data read)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a .npy array of shape {expected})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e}); expected shape {expected}") from e
    shape, dtype = tuple(int(s) for s in arr.shape), arr.dtype
    del arr  # release the mapping
    return shape, dtype


def _check_param_shape(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Validate a flame_param header; returns the column count (156 or 153)."""
    if dtype.kind not in "fiu" or len(shape) != 2 or shape[1] not in _LAYOUTS or shape[0] < 1:
        raise DataError(f"{path}: FLAME parameters of shape {shape} dtype {dtype}; expected {_EXPECTED}")
    return shape[1]


def _audio_samples(path: Path) -> int:
    shape, dtype = _npy_shape(path, "(S,) float 16 kHz mono")
    if dtype.kind not in "fiu" or not (len(shape) == 1 or (len(shape) == 2 and min(shape) == 1)):
        raise DataError(f"{path}: audio of shape {shape} dtype {dtype}; expected (S,) float 16 kHz mono")
    return max(shape) if shape else 0


def _savgol(x: np.ndarray) -> np.ndarray:
    """Savitzky-Golay(5, 2) along time of (T, D); unchanged when T < 5 (datasets.md 5.4)."""
    if x.shape[0] < 5:
        return x
    from scipy.signal import savgol_filter

    return savgol_filter(x, window_length=5, polyorder=2, axis=0).astype(np.float32)


def face_model_vertices(layer: object) -> int:
    """Vertex count of a face-model layer (``num_vertices`` attribute, else its template)."""
    n = getattr(layer, "num_vertices", None)
    if isinstance(n, (int, np.integer)):
        return int(n)
    return int(np.asarray(layer.template(None)).shape[0])  # type: ignore[attr-defined]


def _mask_candidates(root: Path, flame_model: str) -> list[Path]:
    """Where ``FLAME_masks.pkl`` is looked up: the dataset root, then next to ``data.flame_model``."""
    candidates = [root / "FLAME_masks.pkl"]
    if flame_model:
        candidates.append(Path(flame_model).expanduser().parent / "FLAME_masks.pkl")
    return candidates


def find_flame_masks(root: Path, flame_model: str) -> Path | None:
    """``FLAME_masks.pkl`` at the dataset root, else next to ``data.flame_model``."""
    return next((c for c in _mask_candidates(root, flame_model) if c.is_file()), None)


@dataclasses.dataclass(frozen=True)
class ColumnStats:
    """Per-column statistics of the FLAME-56 motion over a split (datasets.md 5.4)."""

    columns: tuple[str, ...]  # FLAME56_COLUMNS
    mean: np.ndarray  # (56,) float64; NaN for head columns when no clip has a head pose
    std: np.ndarray  # (56,) population std
    min: np.ndarray  # (56,)
    max: np.ndarray  # (56,)
    frames: int  # frames in the expression/jaw statistics
    head_frames: int  # frames in the head-rotation statistics (153-column files have none)
    split: str = "train"

    def as_dict(self) -> dict[str, object]:
        """JSON/MLflow-friendly: ``{"expr0": {"min":..,"max":..,"mean":..,"std":..}, ...}``."""
        out: dict[str, object] = {"split": self.split, "frames": self.frames, "head_frames": self.head_frames}
        for i, name in enumerate(self.columns):
            out[name] = {
                "min": float(self.min[i]),
                "max": float(self.max[i]),
                "mean": float(self.mean[i]),
                "std": float(self.std[i]),
            }
        return out

    def format(self) -> str:
        lines = [f"FLAME-56 column statistics over {self.split} ({self.frames} frames, head {self.head_frames}):"]
        lines.append(f"{'column':>8} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}")
        for i, name in enumerate(self.columns):
            lines.append(
                f"{name:>8} {self.min[i]:10.4f} {self.max[i]:10.4f} {self.mean[i]:10.4f} {self.std[i]:10.4f}"
            )
        return "\n".join(lines)


class MeadCorpus(Corpus):
    """MEAD EMICA FLAME parameters at 25 fps with 16 kHz audio (datasets.md 5)."""

    format_name = "mead"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.check_stored_rate(MEAD_FPS, "MEAD FLAME parameters")
        self.check_root_dir("MEAD")
        if not (self.root / "flame_param").is_dir():
            raise DataError(
                f"{self.root / 'flame_param'}: not found; a MEAD root holds flame_param/<actor>/<uid>.npy "
                "and audio_sample/<actor>/<uid>.npy"
            )
        self._columns: dict[str, int] = {}  # uid -> 156 | 153 (filled by _index)
        self._empty_splits: list[str] = []  # "val" / "test" when they end up without clips (filled by _index)
        self._subject_shapes: dict[str, np.ndarray] = {}
        self._regions: Regions | None = None
        self._stats: ColumnStats | None = None

    # ---- paths ------------------------------------------------------------------------
    def param_path(self, seq: SequenceInfo) -> Path:
        return self.root / "flame_param" / seq.subject / f"{seq.name}.npy"

    def audio_path(self, seq: SequenceInfo) -> Path:
        return self.root / "audio_sample" / seq.subject / f"{seq.name}.npy"

    # ---- index ------------------------------------------------------------------------
    def _index(self) -> list[SequenceInfo]:
        split_of = {actor: split for split, actors in MEAD_SPLITS.items() for actor in actors}
        entries: list[SequenceInfo] = []
        for path in sorted((self.root / "flame_param").glob("*/*.npy")):
            actor_dir, uid = path.parent.name, path.stem
            actor, emotion, intensity, sentence = parse_uid(uid, path)
            if actor != actor_dir:
                raise DataError(f"{path}: uid {uid!r} names actor {actor!r} but lies under {actor_dir}/")
            shape, dtype = _npy_shape(path, _EXPECTED)
            columns = _check_param_shape(path, shape, dtype)
            try:  # one missing or unreadable audio file drops its clip, not the corpus
                samples = _audio_samples(self.root / "audio_sample" / actor / f"{uid}.npy")
            except DataError as e:
                self._skipped[uid] = str(e)
                log.warning("mead: skipping clip %s (%s): %s", uid, path, e)
                continue
            self._columns[uid] = columns
            entries.append(
                SequenceInfo(
                    name=uid,
                    subject=actor,
                    split=split_of.get(actor, "unused"),
                    num_frames=shape[0],
                    audio_seconds=samples / SAMPLE_RATE,
                    sentence=sentence,
                    emotion=emotion,
                    intensity=intensity,
                )
            )
        entries = _assign_reference(entries)
        if entries:
            self._empty_splits = _warn_empty_splits(entries)
            _warn_mixed_columns(self._columns)
        return entries

    # ---- facts ------------------------------------------------------------------------
    @functools.cached_property
    def info(self) -> CorpusInfo:  # type: ignore[override]
        seqs = self._sequences
        present = {s.subject for s in seqs}
        train = tuple(a for a in MEAD_SPLITS["train"] if a in present)
        missing = [a for a in MEAD_SPLITS["train"] if a not in present]
        unused = sorted({s.subject for s in seqs if s.split == "unused"})
        layer = self.face_model()
        notes = {
            "flame_reconstruction": self.cfg.flame_reconstruction,
            "motion_layout": "FLAME-56: params = expression 0:50 | jaw 50:53; head_pose = global rotation",
            "shape": "per clip: mean over frames of the shape columns; per subject: shape of its first clip",
            "smoothing": "savgol(5,2) on expression, jaw, head rotation" if self.cfg.smoothing else "off",
            "emotion": "0-based EMOTE order: " + ", ".join(EMOTE_EMOTIONS),
            "splits": "DEEPTalk actor split 32/7/8 (datasets.md 5.3); actors outside the table -> unused",
            "reference_rule": (
                f"per (test actor, emotion, intensity): clips in sorted uid order until {REFERENCE_SECONDS:g} s "
                "of motion, excluded from test (metrics.md 6.3)"
            ),
            "columns_153": str(sum(1 for c in self._columns.values() if c == 153)),
        }
        mixed = _mixed_columns(self._columns)
        if mixed:
            notes["columns_mixed"] = mixed
        if self._empty_splits:
            notes["empty_splits"] = " ".join(self._empty_splits)
        if missing:
            notes["missing_train_actors"] = " ".join(missing)
        if unused:
            notes["unused_actors"] = " ".join(unused)
        return CorpusInfo(
            format=self.format_name,
            root=str(self.root),
            fps=MEAD_FPS,
            motion="params",
            num_vertices=face_model_vertices(layer) if layer is not None else 0,
            param_dim=53,
            has_head_pose=any(c == 156 for c in self._columns.values()),
            train_subjects=train,
            splits=("train", "val", "test", "reference"),
            eval_splits=("test",),
            unseen_splits=("val", "test"),
            notes=notes,
        )

    # ---- decoding ---------------------------------------------------------------------
    def _read_params(self, path: Path) -> np.ndarray:
        """(T, 156|153) float32 from a flame_param file, validated."""
        if not path.is_file():
            raise DataError(f"{path}: FLAME parameter file not found (expected {_EXPECTED})")
        try:
            raw = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e}); expected {_EXPECTED}") from e
        _check_param_shape(path, tuple(raw.shape), raw.dtype)
        raw = raw.astype(np.float32, copy=False)
        if not np.all(np.isfinite(raw)):
            raise DataError(f"{path}: FLAME parameters contain NaN or infinite values")
        return raw

    def _read_audio(self, path: Path) -> np.ndarray:
        from talkmesh.audio.io import AudioError, load_audio

        try:
            return load_audio(path, sample_rate=SAMPLE_RATE)  # (S,) float32, already 16 kHz
        except AudioError as e:
            raise DataError(f"{e} (expected (S,) float 16 kHz mono)") from e

    def _motion(self, seq: SequenceInfo) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """FLAME-56 pieces of one clip, smoothed per ``cfg.smoothing``:
        params (T, 53), head_pose (T, 3) or None, shape (T, 100) (never smoothed)."""
        params, head_pose, shape = split_flame_columns(self._read_params(self.param_path(seq)))
        if self.cfg.smoothing:
            params = _savgol(params)
            head_pose = None if head_pose is None else _savgol(head_pose)
        return params, head_pose, shape

    def _load(self, seq: SequenceInfo) -> Clip:
        params, head_pose, shape = self._motion(seq)
        beta = shape.astype(np.float64).mean(axis=0).astype(np.float32)  # (100,)
        layer = self.face_model()
        # With a face model the clip's template is FLAME(clip beta), consistent with vertices_of(clip).
        template = None if layer is None else np.asarray(layer.template(beta), dtype=np.float32)  # (V, 3)
        return Clip(
            name=seq.name,
            subject=seq.subject,
            audio=self._read_audio(self.audio_path(seq)),
            fps=MEAD_FPS,
            params=np.ascontiguousarray(params, dtype=np.float32),  # (T, 53)
            head_pose=None if head_pose is None else np.ascontiguousarray(head_pose, dtype=np.float32),  # (T, 3)
            template=template,
            shape=beta,
            emotion=seq.emotion,
            intensity=seq.intensity,
            split=seq.split,
        )

    # ---- subject geometry -------------------------------------------------------------
    def subject_shape(self, subject: str) -> np.ndarray:
        """(100,) beta of ``subject``: the frame-mean shape of its first clip in uid order
        (read through a memory map; only the shape columns are touched)."""
        hit = self._subject_shapes.get(subject)
        if hit is not None:
            return hit
        seqs = [s for s in self._sequences if s.subject == subject]
        if not seqs:
            raise DataError(f"mead: no clips for subject {subject!r} under {self.root / 'flame_param'}")
        path = self.param_path(seqs[0])
        shape, dtype = _npy_shape(path, _EXPECTED)
        cols = _check_param_shape(path, shape, dtype)
        start, stop = _LAYOUTS[cols]["shape"]  # type: ignore[misc]
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        beta = np.asarray(arr[:, start:stop], dtype=np.float64).mean(axis=0).astype(np.float32)
        del arr
        self._subject_shapes[subject] = beta
        return beta

    def template(self, subject: str) -> np.ndarray | None:
        """(V, 3) FLAME(beta_subject, zero expression, zero pose), or None without a face model.

        beta_subject is :meth:`subject_shape` (first clip). A clip's own ``Clip.template`` uses
        the clip's beta instead, so offsets against it match ``vertices_of(clip)`` exactly."""
        layer = self.face_model()
        if layer is None:
            return None
        return np.asarray(layer.template(self.subject_shape(subject)), dtype=np.float32)

    def regions(self) -> Regions:
        """FLAME lips / upper face from FLAME_masks.pkl (datasets.md 7), overrides applied."""
        if self._regions is None:
            nv = self.info.num_vertices or None
            self._regions = flame_regions(self.root, self.cfg, nv, self.format_name)
        return self._regions

    def _regions_summary(self) -> dict[str, Any]:
        """For ``summary()`` (`talkmesh data inspect`): without FLAME_masks.pkl (it comes with
        FLAME, not with MEAD) the regions are reported missing instead of refused; counting
        clips needs no regions, the lip/upper-face metrics do (:meth:`regions` raises there)."""
        if self.cfg.lip_regions or find_flame_masks(self.root, self.cfg.flame_model) is not None:
            return super()._regions_summary()
        where = " or ".join(str(c) for c in _mask_candidates(self.root, self.cfg.flame_model))
        return {
            "lips": None,
            "upper": None,
            "sources": {},
            "missing": (
                f"FLAME_masks.pkl (ships with FLAME, not with MEAD) not found at {where}; the lip/upper-face "
                "metrics (LVE, FDD) and region losses need it: put it there or set data.lip_regions=... and "
                "data.upper_regions=..."
            ),
        }

    # ---- statistics -------------------------------------------------------------------
    def column_stats(self, split: str = "train") -> ColumnStats:
        """Per-column min/max/mean/std of FLAME-56 over ``split`` (computed once, logged)."""
        if split == "train" and self._stats is not None:
            return self._stats
        seqs = self.sequences(split)
        if not seqs:
            raise DataError(f"mead: split {split!r} has no clips under {self.root}; cannot compute column stats")
        n = np.zeros(56, dtype=np.int64)
        s1 = np.zeros(56, dtype=np.float64)
        s2 = np.zeros(56, dtype=np.float64)
        lo = np.full(56, np.inf)
        hi = np.full(56, -np.inf)
        for seq in seqs:
            params, head, _ = self._motion(seq)
            blocks = [(slice(0, 53), params)] + ([(slice(53, 56), head)] if head is not None else [])
            for cols, x in blocks:
                x64 = x.astype(np.float64)
                mean_b = x64.mean(axis=0)
                # Shift by the block mean before squaring to keep the variance accurate.
                n_b = x64.shape[0]
                n_old = n[cols].astype(np.float64)
                s1_old = s1[cols]
                m_old = np.where(n_old > 0, s1_old / np.maximum(n_old, 1), 0.0)
                m2_b = ((x64 - mean_b) ** 2).sum(axis=0)
                delta = mean_b - m_old
                tot = n_old + n_b
                s2[cols] = s2[cols] + m2_b + delta**2 * n_old * n_b / tot
                s1[cols] = s1_old + x64.sum(axis=0)
                n[cols] += n_b
                lo[cols] = np.minimum(lo[cols], x64.min(axis=0))
                hi[cols] = np.maximum(hi[cols], x64.max(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, s1 / n, np.nan)
            std = np.where(n > 0, np.sqrt(s2 / n), np.nan)
        lo[n == 0] = np.nan
        hi[n == 0] = np.nan
        stats = ColumnStats(
            columns=FLAME56_COLUMNS,
            mean=mean,
            std=std,
            min=lo,
            max=hi,
            frames=int(n[0]),
            head_frames=int(n[53]),
            split=split,
        )
        log.info("mead (%s, reconstruction %s): %s", self.root, self.cfg.flame_reconstruction, stats.format())
        if split == "train":
            self._stats = stats
        return stats


def split_flame_columns(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """EMICA (T, 156|153) -> FLAME-56 pieces (datasets.md 6.2):
    params (T, 53) = expression | jaw, head_pose (T, 3) or None, shape (T, 100)."""
    layout = _LAYOUTS.get(raw.shape[1]) if raw.ndim == 2 else None
    if layout is None:
        raise DataError(f"FLAME parameters of shape {raw.shape}; expected {_EXPECTED}")
    e0, e1 = layout["expr"]  # type: ignore[misc]
    j0, j1 = layout["jaw"]  # type: ignore[misc]
    b0, b1 = layout["shape"]  # type: ignore[misc]
    params = np.concatenate([raw[:, e0:e1], raw[:, j0:j1]], axis=1)  # (T, 53)
    head = layout["head"]
    head_pose = None if head is None else raw[:, head[0] : head[1]]  # (T, 3)
    return params, head_pose, raw[:, b0:b1]


def _assign_reference(entries: list[SequenceInfo]) -> list[SequenceInfo]:
    """Move the style-reference clips of test actors to the ``reference`` split
    (metrics.md 6.3): per (actor, emotion, intensity), sorted by uid, clips are taken while
    the accumulated motion is below REFERENCE_SECONDS."""
    need = REFERENCE_SECONDS * MEAD_FPS  # frames
    groups: dict[tuple[str, int | None, int | None], list[int]] = {}
    for i, s in enumerate(entries):
        if s.split == "test":
            groups.setdefault((s.subject, s.emotion, s.intensity), []).append(i)
    out = list(entries)
    for idx in groups.values():
        total = 0
        for i in sorted(idx, key=lambda k: entries[k].name):
            if total >= need:
                break
            out[i] = dataclasses.replace(entries[i], split="reference")
            total += entries[i].num_frames
    return out


def _warn_empty_splits(entries: list[SequenceInfo]) -> list[str]:
    """Log a warning for ``val`` / ``test`` left without clips, saying why; the empty split names."""
    empty = []
    for split in ("val", "test"):
        if any(s.split == split for s in entries):
            continue
        empty.append(split)
        present = sorted({s.subject for s in entries if s.subject in MEAD_SPLITS[split]})
        if present:  # only test actors can lose every clip to the reference split
            why = (
                f"every clip of its actors on disk ({' '.join(present)}) went to the style-reference split "
                f"(the first {REFERENCE_SECONDS:g} s per actor, emotion and intensity; metrics.md 6.3)"
            )
        else:
            why = f"none of its actors ({' '.join(MEAD_SPLITS[split])}) has clips under flame_param/ (datasets.md 5.3)"
        log.warning("mead: split %r is empty: %s; nothing will be scored on it", split, why)
    return empty


def _mixed_columns(columns: dict[str, int]) -> str:
    """A note when 153- and 156-column files are mixed ("" otherwise)."""
    n153 = sorted(uid for uid, c in columns.items() if c == 153)
    if not n153 or len(n153) == len(columns):
        return ""
    return (
        f"{len(n153)} of {len(columns)} clips have 153 columns (no head rotation; e.g. {', '.join(n153[:3])}), "
        "the others 156: both are read to FLAME-56 params (expression | jaw); head_pose exists only for the "
        "156-column clips, so a batch holding a 153-column clip carries no head_pose"
    )


def _warn_mixed_columns(columns: dict[str, int]) -> None:
    mixed = _mixed_columns(columns)
    if mixed:
        log.warning("mead: %s; stages that need head pose (AdaMesh pose stages) cannot train on those clips", mixed)


def flame_regions(root: Path, cfg: DataConfig, num_vertices: int | None, fmt: str) -> Regions:
    """FLAME regions for a parameter corpus: FLAME_masks.pkl at ``root`` or next to
    ``cfg.flame_model`` (lips = unique ``lips``, upper = ``forehead`` U ``eye_region``),
    with ``cfg.lip_regions`` / ``cfg.upper_regions`` applied over it or used instead."""
    masks = find_flame_masks(root, cfg.flame_model)
    if masks is not None:
        return with_overrides(load_regions(masks, num_vertices=num_vertices), cfg.lip_regions,
                              cfg.upper_regions, num_vertices)
    if cfg.lip_regions:
        # A FLAME_masks.pkl given as lip_regions also supplies the upper face; an index list
        # needs data.upper_regions as well (load_regions says so).
        return load_regions(cfg.lip_regions, cfg.upper_regions or None, num_vertices)
    where = [str(c) for c in _mask_candidates(root, cfg.flame_model)]
    raise DataError(
        f"{fmt}: FLAME lip/upper-face regions need FLAME_masks.pkl (keys lips, forehead, eye_region; "
        f"datasets.md 7): put it at {' or '.join(where)}, or set data.lip_regions=... and data.upper_regions=..."
    )
