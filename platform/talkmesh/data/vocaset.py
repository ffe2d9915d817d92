"""VOCASET reader (``data.format=vocaset``): the original release and the processed layout.

Spec: datasets.md §1 (rates, units), §2.1 (original release), §2.2 (FaceFormer processed
layout), §2.3 (official splits), §2.4 (transcripts), §7 (FLAME regions), §9 (decisions);
metrics.md §6.3 (style-reference pools).

Layouts (``data.layout``; ``auto`` picks ``processed`` when ``vertices_npy/`` exists and
``original`` when ``data_verts.npy`` exists, and refuses to guess when both or neither do)::

    original   data_verts.npy        (N, 5023, 3) every frame of every sequence, memory-mapped;
                                     only the rows of the sequence being loaded are read
               subj_seq_to_idx.pkl   subject -> "sentenceXX" -> {frame index -> row}
               raw_audio_fixed.pkl   subject -> "sentenceXX" -> {"audio": int PCM, "sample_rate"}
               templates.pkl         subject -> (5023, 3)
    processed  vertices_npy/<subject>_sentenceXX.npy  (T60, 15069)
               wav/<subject>_sentenceXX.wav           native rate
               templates.pkl

Both layouts give the same clips: motion at 30 fps by stride-2 subsampling of the 60 fps
capture (``data.fps=60`` keeps the native rate; any other rate is an error), audio read at
its stored rate and resampled to 16 kHz, coordinates in metres, never rescaled.

Splits (§2.3, one-hot order = the order of ``TRAIN_SUBJECTS``):

    train      8 train subjects, sentences 01-40
    val        2 val subjects, sentences 21-40
    test       2 test subjects, sentences 21-40  (VOCA-Test, the only evaluated split)
    reference  test subjects' sentences 01-20 (style-reference pool, §2.3 DECISION) and, by
               the same rule, val subjects' sentences 01-20 (so adapting to a val subject
               never touches its evaluated sentences)
    unused     everything else, including subjects outside the official lists

Choices made here (beyond the spec):

* ``raw_audio_fixed.pkl`` (~100 MB) is unpickled once, on first need (indexing reads the
  per-sequence lengths and rates from it), and kept for the life of the corpus object. It
  is dropped when the corpus is pickled (e.g. shipped to a worker) and re-read there.
* Like the reference data handler, a sequence that appears in only one of
  ``subj_seq_to_idx.pkl`` / ``raw_audio_fixed.pkl`` is skipped, and the skipped names are
  recorded in ``info.notes["skipped"]``. (In the processed layout a missing wav is an error.)
* Transcripts (§2.4) are optional: ``text/<subject>_sentenceXX.txt`` if present, else line
  XX of ``text/<subject>.txt`` (Mimic's convention), else None. Text is passed through
  as written (stripped); tokenisation belongs to the methods.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.audio.io import AudioError, resample, to_mono_float
from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import CorpusInfo
from talkmesh.data.errors import DataError
from talkmesh.data.processed import ProcessedCorpus, finite_vertices, open_npy
from talkmesh.data.regions import Regions, load_regions, with_overrides
from talkmesh.data.safepickle import load_pickle

__all__ = [
    "TEST_SUBJECTS",
    "TRAIN_SUBJECTS",
    "VAL_SUBJECTS",
    "VocasetCorpus",
    "vocaset_split",
]

# datasets.md §2.3 (TimoBolkart/voca config_parser.py). Train order = one-hot order.
TRAIN_SUBJECTS: tuple[str, ...] = (
    "FaceTalk_170728_03272_TA",
    "FaceTalk_170904_00128_TA",
    "FaceTalk_170725_00137_TA",
    "FaceTalk_170915_00223_TA",
    "FaceTalk_170811_03274_TA",
    "FaceTalk_170913_03279_TA",
    "FaceTalk_170904_03276_TA",
    "FaceTalk_170912_03278_TA",
)
VAL_SUBJECTS: tuple[str, ...] = ("FaceTalk_170811_03275_TA", "FaceTalk_170908_03277_TA")
TEST_SUBJECTS: tuple[str, ...] = ("FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA")

SPLITS: tuple[str, ...] = ("train", "val", "test", "reference")
NATIVE_FPS = 60.0
ALLOWED_FPS = (30.0, 60.0)

# Original-release files (§2.1) and where the FLAME masks may sit (§7).
VERTS_FILE = "data_verts.npy"
INDEX_FILE = "subj_seq_to_idx.pkl"
AUDIO_FILE = "raw_audio_fixed.pkl"
TEMPLATES_FILE = "templates.pkl"
MASKS_LOCATIONS: tuple[str, ...] = ("FLAME_masks.pkl", "regions/FLAME_masks.pkl")

_STEM = re.compile(r"^(?P<subject>.+)_sentence(?P<num>\d{2})$")
_SENTENCE_KEY = re.compile(r"^sentence(?P<num>\d{2})$")


def vocaset_split(subject: str, sentence: str) -> str:
    """The split of (subject, two-digit sentence id), or "unused" (datasets.md §2.3)."""
    try:
        n = int(sentence)
    except ValueError:
        return "unused"
    if subject in TRAIN_SUBJECTS and 1 <= n <= 40:
        return "train"
    if subject in VAL_SUBJECTS or subject in TEST_SUBJECTS:
        if 21 <= n <= 40:
            return "val" if subject in VAL_SUBJECTS else "test"
        if 1 <= n <= 20:
            return "reference"
    return "unused"


def _num_samples(audio: np.ndarray) -> int:
    """Samples per channel of a PCM array, with ``to_mono_float``'s axis convention."""
    if audio.ndim == 2 and audio.shape[0] <= 8 and audio.shape[1] > audio.shape[0]:
        return int(audio.shape[1])  # (channels, samples)
    return int(audio.shape[0])


def _pickled_dict(path: Path, layout: str) -> dict[Any, Any]:
    """A pickle of the original release (restricted unpickling) that must hold a dict ``layout``."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict {layout}, got {type(obj).__name__}")
    return obj


def _frame_rows(frames: Any, where: str, total_rows: int) -> np.ndarray:
    """(T60,) int64 rows of data_verts.npy in frame order from an index entry {frame index -> row}."""
    if not isinstance(frames, dict) or not frames:
        raise DataError(f"{where} must be a non-empty dict frame index -> row")
    try:
        order = sorted(frames)
        rows = np.array([int(frames[k]) for k in order], dtype=np.int64)  # (T60,)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: frame indices and rows must be integers ({e})") from e
    if rows.min() < 0 or rows.max() >= total_rows:
        raise DataError(f"{where}: rows {rows.min()}..{rows.max()} outside {VERTS_FILE}'s {total_rows} frames")
    return rows


class _OriginalIndex:
    """What indexing the original release yields (kept for loading)."""

    def __init__(self) -> None:
        self.sequences: list[SequenceInfo] = []
        self.rows: dict[str, np.ndarray] = {}  # name -> (T60,) rows of data_verts.npy, frame order
        self.keys: dict[str, tuple[str, str]] = {}  # name -> (subject key, sentence key) of the pickles
        self.skipped: list[str] = []


class VocasetCorpus(ProcessedCorpus):
    """VOCASET in either layout; see the module docstring."""

    format_name = "vocaset"
    native_fps = NATIVE_FPS
    default_fps = 30.0

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.layout: str = self._resolve_layout()
        _ = self.fps  # validate data.fps at construction, not at first use

    # ---- layout and rate -----------------------------------------------------------------
    def _resolve_layout(self) -> str:
        if self.cfg.layout != "auto":
            return self.cfg.layout
        processed = (self.root / self.vertices_dir).is_dir()
        original = (self.root / VERTS_FILE).is_file()
        if processed != original:
            return "processed" if processed else "original"
        found = "both" if processed else "neither"
        raise DataError(
            f"{self.root}: cannot tell the VOCASET layout; looked for {self.vertices_dir}/ (processed layout) "
            f"and {VERTS_FILE} (original release) and found {found}. "
            "Set data.layout=original or data.layout=processed."
        )

    @property
    def fps(self) -> float:
        if self.cfg.fps and float(self.cfg.fps) not in ALLOWED_FPS:
            raise DataError(
                f"data.fps={self.cfg.fps}: VOCASET is captured at 60 fps; use 30 (stride-2 subsampling, "
                "the methods' convention; data.fps=0 means this) or 60 (native)"
            )
        return super().fps

    # ---- names and splits (processed hooks, also used by the original layout) ----------
    def parse_stem(self, stem: str) -> tuple[str, str]:
        m = _STEM.match(stem)
        if m is None:
            path = self.root / self.vertices_dir / f"{stem}.npy"
            raise DataError(
                f"{path}: file name is not of the VOCASET form <subject>_sentenceXX "
                "(e.g. FaceTalk_170725_00137_TA_sentence01.npy)"
            )
        return m.group("subject"), m.group("num")

    def split_of(self, subject: str, sentence: str) -> str:
        return vocaset_split(subject, sentence)

    # ---- corpus interface ------------------------------------------------------------------
    @functools.cached_property
    def info(self) -> CorpusInfo:
        notes = {
            "layout": self.layout,
            "fps": (
                "30 fps by stride-2 subsampling of the 60 fps capture (datasets.md 2.2)"
                if self.stride == 2
                else "60 fps, native capture rate"
            ),
            "audio": "stored rate read per sequence, resampled to 16 kHz (datasets.md 2.1 DECISION)",
            "reference": "test and val subjects' sentences 01-20 (datasets.md 2.3 DECISION; metrics.md 6.3)",
            "units": "metres, never rescaled",
        }
        skipped: dict[str, str] = {}
        if self.layout == "original" and self._original.skipped:
            names = self._original.skipped
            skipped["skipped"] = (
                f"{len(names)} sequence(s) present in only one of {INDEX_FILE}/{AUDIO_FILE}: "
                + ", ".join(names[:20])
                + (" ..." if len(names) > 20 else "")
            )
        return self.vertex_corpus_info(
            notes,
            train_subjects=TRAIN_SUBJECTS,
            splits=SPLITS,
            eval_splits=("test",),
            unseen_splits=("val", "test"),
            extra_notes=skipped,
        )

    def regions(self) -> Regions:
        """FLAME lips (unique ``lips``, 250) and upper face (``forehead`` U ``eye_region``, 827)
        from ``FLAME_masks.pkl`` (datasets.md §7); ``data.lip_regions``/``upper_regions`` override."""
        return self._regions

    @functools.cached_property
    def _regions(self) -> Regions:
        nv = self.num_vertices
        if self.cfg.lip_regions and self.cfg.upper_regions:  # both overridden: no default needed
            return load_regions(self.cfg.lip_regions, self.cfg.upper_regions, nv)
        for rel in MASKS_LOCATIONS:
            path = self.root / rel
            if path.is_file():
                return with_overrides(load_regions(path, None, nv), self.cfg.lip_regions, self.cfg.upper_regions, nv)
        if self.cfg.lip_regions:
            return load_regions(self.cfg.lip_regions, self.cfg.upper_regions or None, nv)
        looked = " or ".join(str(self.root / rel) for rel in MASKS_LOCATIONS)
        raise DataError(
            f"VOCASET regions: FLAME_masks.pkl not found (looked for {looked}). Provide the FLAME region "
            "masks file FLAME_masks.pkl (it ships with SelfTalk as vocaset/FLAME_masks.pkl and with the "
            "FLAME 'mesh masks' download from flame.is.tue.mpg.de) at one of those paths, or set "
            "data.lip_regions and data.upper_regions."
        )

    def _index(self) -> list[SequenceInfo]:
        if self.layout == "processed":
            return super()._index()
        return list(self._original.sequences)

    def _load(self, seq: SequenceInfo) -> Clip:
        if self.layout == "processed":
            clip = super()._load(seq)  # per-sequence text/<stem>.txt already applied
            if clip.text is None:
                clip.text = self._subject_transcript(seq.subject, seq.sentence)
            return clip
        return self._load_original(seq)

    # ---- transcripts -------------------------------------------------------------------
    def _transcript(self, name: str, subject: str, sentence: str) -> str | None:
        per_seq = self.root / self.text_dir / f"{name}.txt"
        if per_seq.is_file():
            return per_seq.read_text().strip() or None
        return self._subject_transcript(subject, sentence)

    def _subject_transcript(self, subject: str, sentence: str) -> str | None:
        path = self.root / self.text_dir / f"{subject}.txt"
        if not path.is_file() or not sentence.isdigit():
            return None
        lines = path.read_text().splitlines()
        n = int(sentence)
        if not 1 <= n <= len(lines):
            return None
        return lines[n - 1].strip() or None

    # ---- original release (§2.1) ------------------------------------------------------------
    def _require_file(self, name: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise DataError(
                f"{path}: file not found (the VOCASET original release has {VERTS_FILE}, {INDEX_FILE}, "
                f"{AUDIO_FILE} and {TEMPLATES_FILE})"
            )
        return path

    def _open_verts(self) -> np.ndarray:
        """``data_verts.npy`` memory-mapped (never read whole): (N, V, 3) or (N, V*3)."""
        path = self._require_file(VERTS_FILE)
        mm = open_npy(path)
        nv = self.num_vertices
        if not (mm.ndim == 3 and mm.shape[1:] == (nv, 3) or mm.ndim == 2 and mm.shape[1] == nv * 3):
            raise DataError(
                f"{path}: shape {mm.shape}, expected (frames, {nv}, 3) to match the templates in {TEMPLATES_FILE}"
            )
        return mm

    @functools.cached_property
    def _raw_audio(self) -> dict[Any, Any]:
        """``raw_audio_fixed.pkl``, unpickled once and kept (see the module docstring)."""
        return _pickled_dict(self._require_file(AUDIO_FILE), "subject -> sentence -> {audio, sample_rate}")

    def _audio_entry(self, subject: str, sentence: str) -> tuple[np.ndarray, int]:
        """(PCM array, sample rate) of one sequence from the audio pickle, validated."""
        path = self.root / AUDIO_FILE
        entry = self._raw_audio[subject][sentence]
        where = f"{path}: entry [{subject!r}][{sentence!r}]"
        if not isinstance(entry, dict) or "audio" not in entry or "sample_rate" not in entry:
            raise DataError(f"{where} must be a dict with 'audio' and 'sample_rate'")
        audio = np.asarray(entry["audio"])
        try:
            rate = int(entry["sample_rate"])
        except (TypeError, ValueError):
            rate = 0
        if rate <= 0:
            raise DataError(f"{where}: sample_rate {entry['sample_rate']!r} is not a positive integer")
        if audio.ndim not in (1, 2) or audio.size == 0:
            raise DataError(f"{where}: audio has shape {audio.shape}, expected (samples,) PCM")
        return audio, rate

    @functools.cached_property
    def _original(self) -> _OriginalIndex:
        index_path = self._require_file(INDEX_FILE)
        total_rows = self._open_verts().shape[0]  # header only
        seq_map = _pickled_dict(index_path, "subject -> sentence -> {frame: row}")
        raw = self._raw_audio
        for subject_key, sentences in raw.items():
            if not isinstance(sentences, dict):
                raise DataError(f"{self.root / AUDIO_FILE}: entry [{subject_key!r}] is not a dict of sentences")
        out = _OriginalIndex()
        for subject_key in sorted(seq_map, key=str):
            sentences = seq_map[subject_key]
            if not isinstance(sentences, dict):
                raise DataError(f"{index_path}: entry [{subject_key!r}] is not a dict of sentences")
            for sentence_key in sorted(sentences, key=str):
                where = f"{index_path}: entry [{subject_key!r}][{sentence_key!r}]"
                rows = _frame_rows(sentences[sentence_key], where, total_rows)  # (T60,)
                self._add_original(out, subject_key, sentence_key, rows)
        for subject_key, sentences in raw.items():  # audio without motion: skipped too
            for sentence_key in sentences:
                if sentence_key not in seq_map.get(subject_key, {}):
                    out.skipped.append(f"{subject_key}_{sentence_key}")
        out.skipped.sort()
        return out

    def _add_original(self, out: _OriginalIndex, subject_key: Any, sentence_key: Any, rows: np.ndarray) -> None:
        """Record one sequence of the index pickle (rows (T60,) of data_verts.npy) in ``out``,
        or note it as skipped when the audio pickle lacks it."""
        subject = str(subject_key)
        name = f"{subject}_{sentence_key}"
        if sentence_key not in self._raw_audio.get(subject_key, {}):
            out.skipped.append(name)
            return
        audio, rate = self._audio_entry(subject_key, sentence_key)
        m = _SENTENCE_KEY.match(str(sentence_key))
        sentence = m.group("num") if m else str(sentence_key)
        out.rows[name] = rows
        out.keys[name] = (subject_key, sentence_key)
        out.sequences.append(
            SequenceInfo(
                name=name,
                subject=subject,
                split=vocaset_split(subject, sentence),
                num_frames=self._frames(rows.shape[0]),
                audio_seconds=_num_samples(audio) / float(rate),
                sentence=sentence,
            )
        )

    def _load_original(self, seq: SequenceInfo) -> Clip:
        try:
            rows = self._original.rows[seq.name]
            subject_key, sentence_key = self._original.keys[seq.name]
        except KeyError:
            raise DataError(f"sequence {seq.name!r} not found in {self.root / INDEX_FILE}") from None
        template = self.template(seq.subject)  # (V, 3)
        mm = self._open_verts()  # memory-mapped; only the selected rows are read below
        what = f"{self.root / VERTS_FILE}: vertices of {seq.name}"
        verts = finite_vertices(mm[rows[:: self.stride]], template.shape[0], what)  # (T, V, 3)
        pcm, rate = self._audio_entry(subject_key, sentence_key)
        source = f"{self.root / AUDIO_FILE}[{subject_key!r}][{sentence_key!r}]"
        try:
            audio = resample(to_mono_float(pcm, source), rate)  # (S,) float32, 16 kHz
        except AudioError as e:
            raise DataError(str(e)) from e
        return self.make_clip(seq, audio, verts, template, self._transcript(seq.name, seq.subject, seq.sentence))

    # ---- pickling (e.g. to data-loader or Ray workers) ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_raw_audio", None)  # large; re-read lazily on the other side
        return state
