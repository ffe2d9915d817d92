"""3D-HDTF, Mimic's SPECTRE pseudo-ground-truth meshes (``data.format=hdtf``).

Spec: datasets.md section 1 (25 fps, 5023 FLAME vertices in metres, 16 kHz audio), section 4
(construction, layout, splits), section 7 (region files), section 9; metrics.md section 6.3
(3D-HDTF style-reference pool: other clips of the same id, the base-class default).

Layout under ``data.root``::

    spectre_processed_25fps_16kHz/<video>/verts_new_shape1.npy   pickled dict, 'verts' (T, 15069)
    spectre_processed_25fps_16kHz/<video>/audio_librosa.npy      pickled dict, 'speech_array' (S,),
                                                                 'sampling_rate' (16000)
    audio_16000Hz_from_video/<video>.wav                         fallback audio when the above is absent
    video_list_id_framenum-train_test.txt                        one line per video (see below)
    video_list_id_framenum-val.txt                               same columns, validation videos (optional)
    templates.pkl                                                {int id: (5023, 3) or (15069,)}
    FLAME_Regions/lve.txt                                        Mimic's lip list (LVE)
    FLAME_masks.pkl                                              optional; upper face for FDD

**Pickles are never loaded with the stock unpickler.** The reference layout stores dicts in
``.npy`` files (``np.load(allow_pickle=True)`` in the reference loader); here they are read by
:func:`talkmesh.data.safepickle.load_pickle`, which reconstructs numpy arrays, numpy scalars/dtypes and plain
builtin containers only and refuses every other global (a :class:`DataError` naming the file).

**Video list parse.** Lines are split on runs of whitespace and/or commas. Column 0 is the video
name, column 1 the integer id, column 2 the integer frame count (used as ``num_frames``, so the
index never opens a vertex file); with 4 or more columns the last one is the split tag. Blank
lines and lines starting with ``#`` are skipped; a first line whose id column is not an integer is
taken as a header. Anything else malformed is a :class:`DataError` naming the file and line.

**Splits** (the datasets.md 4.3 DECISION; the rule applied is recorded in ``info.notes``), with
N = ``data.hdtf_train_ids`` (150) and M = ``data.hdtf_val_ids`` (10):

- ``val``: every line of the val list, plus lines of the train/test list with N < id <= N + M
  (the val ids; the whole rule when the val list is absent);
- ``train``: train/test-list lines with 1 <= id <= N whose tag is not ``test``;
- ``test-A``: train/test-list lines with 1 <= id <= N tagged ``test`` (seen ids);
- ``test-B``: lines with id > N + M (unseen ids), whatever their tag;
- ``unused``: ids < 1. Videos on disk that no list names are not indexed (counted in notes).

Subjects are the integer ids as strings ("17"); ``train_subjects`` is sorted by id.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path

import numpy as np

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.errors import DataError
from talkmesh.data.regions import Regions, file_md5, read_flame_masks, read_index_file, with_overrides
from talkmesh.data.safepickle import load_pickle, load_pickle_npy

__all__ = ["HDTF_FPS", "HdtfCorpus", "VideoListEntry", "parse_video_list"]

log = logging.getLogger(__name__)

HDTF_FPS = 25.0
SAMPLE_RATE = 16000
PROCESSED_DIR = "spectre_processed_25fps_16kHz"
VERTS_FILE = "verts_new_shape1.npy"
AUDIO_FILE = "audio_librosa.npy"
WAV_DIR = "audio_16000Hz_from_video"
TRAIN_TEST_LIST = "video_list_id_framenum-train_test.txt"
VAL_LIST = "video_list_id_framenum-val.txt"
TEMPLATES_FILE = "templates.pkl"
LIP_FILE = "FLAME_Regions/lve.txt"


# --------------------------------------------------------------------------------------
# Video lists
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoListEntry:
    """One line of a ``video_list_id_framenum-*.txt`` file."""

    video: str
    id: int
    frames: int
    tag: str  # lower-cased last column ("" with fewer than 4 columns)
    source: Path
    line: int


def _int(token: str) -> int:
    value = float(token)
    if not value.is_integer():
        raise ValueError(token)
    return int(value)


def parse_video_list(path: str | Path) -> list[VideoListEntry]:
    """Parse a 3D-HDTF video list (the parse rule is in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: video list not found (lines: video id frame_count ... split_tag)")
    out: list[VideoListEntry] = []
    seen_content = False
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        first = not seen_content
        seen_content = True
        if len(tokens) < 3:
            raise DataError(f"{p}:{lineno}: expected 'video id frame_count ... split_tag', got {text!r}")
        try:
            vid, frames = _int(tokens[1]), _int(tokens[2])
        except ValueError:
            if first:
                continue  # header line
            raise DataError(f"{p}:{lineno}: id and frame count must be integers, got {tokens[1]!r} {tokens[2]!r}") \
                from None
        if frames < 1:
            raise DataError(f"{p}:{lineno}: frame count must be positive, got {frames}")
        tag = tokens[-1].lower() if len(tokens) >= 4 else ""
        out.append(VideoListEntry(tokens[0], vid, frames, tag, p, lineno))
    return out


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


class HdtfCorpus(Corpus):
    """3D-HDTF vertex sequences (5023 FLAME vertices, metres) at 25 fps (datasets.md 4)."""

    format_name = "hdtf"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.check_stored_rate(HDTF_FPS, "3D-HDTF meshes")
        self.check_root_dir("3D-HDTF")
        for need in (PROCESSED_DIR, TRAIN_TEST_LIST):
            if not (self.root / need).exists():
                raise DataError(f"{self.root / need}: not found; a 3D-HDTF root holds {PROCESSED_DIR}/<video>/"
                                f"{VERTS_FILE}, {TRAIN_TEST_LIST} and {TEMPLATES_FILE}")
        self._notes: dict[str, str] = {}
        self._regions: Regions | None = None

    # ---- paths ------------------------------------------------------------------------
    def verts_path(self, seq: SequenceInfo | str) -> Path:
        name = seq if isinstance(seq, str) else seq.name
        return self.root / PROCESSED_DIR / name / VERTS_FILE

    def _audio_paths(self, name: str) -> tuple[Path, Path]:
        return self.root / PROCESSED_DIR / name / AUDIO_FILE, self.root / WAV_DIR / f"{name}.wav"

    # ---- index ------------------------------------------------------------------------
    def _index(self) -> list[SequenceInfo]:
        n_train, n_val = self.cfg.hdtf_train_ids, self.cfg.hdtf_val_ids
        main = parse_video_list(self.root / TRAIN_TEST_LIST)
        val_path = self.root / VAL_LIST
        val = parse_video_list(val_path) if val_path.is_file() else []

        chosen: dict[str, tuple[VideoListEntry, str]] = {}
        for e in val:
            self._add(chosen, e, "val")
        for e in main:
            if e.id < 1:
                split = "unused"
            elif e.id <= n_train:
                split = "test-A" if e.tag == "test" else "train"
            elif e.id <= n_train + n_val:
                split = "val"
            else:
                split = "test-B"
            if e.video in chosen and chosen[e.video][0].source == val_path:
                if chosen[e.video][0].id != e.id:
                    raise DataError(f"{e.source}:{e.line}: video {e.video} has id {e.id} here but "
                                    f"{chosen[e.video][0].id} in {val_path.name}")
                continue  # listed in the val file: val wins
            self._add(chosen, e, split)

        entries: list[SequenceInfo] = []
        for video, (e, split) in sorted(chosen.items()):
            verts = self.verts_path(video)
            if not verts.is_file():
                raise DataError(f"{verts}: vertex file for {video} (listed in {e.source.name}:{e.line}) not found "
                                "(expected a pickled dict with 'verts' of shape (T, 15069))")
            npy_audio, wav = self._audio_paths(video)
            if not npy_audio.is_file() and not wav.is_file():
                raise DataError(f"{npy_audio}: audio for {video} not found (nor {wav}); expected a pickled dict "
                                "with 'speech_array' and 'sampling_rate'")
            entries.append(SequenceInfo(name=video, subject=str(e.id), split=split, num_frames=e.frames))

        on_disk = {p.name for p in (self.root / PROCESSED_DIR).iterdir() if p.is_dir()}
        self._notes = {
            "split_rule": (
                f"val = {VAL_LIST if val else '(no val list)'} + ids {n_train + 1}..{n_train + n_val}; "
                f"train = tag != test and ids 1..{n_train}; test-A = tag == test and ids 1..{n_train}; "
                f"test-B = ids > {n_train + n_val} (datasets.md 4.3 DECISION)"
            ),
            "val_list": str(val_path) if val else "absent",
            "unlisted_videos": str(len(on_disk - set(chosen))),
            "num_frames": "from the video list frame-count column",
        }
        log.info("hdtf %s: %s", self.root, self._notes["split_rule"])
        return entries

    @staticmethod
    def _add(chosen: dict[str, tuple[VideoListEntry, str]], e: VideoListEntry, split: str) -> None:
        prev = chosen.get(e.video)
        if prev is not None:
            if prev[0].id != e.id:
                raise DataError(f"{e.source}:{e.line}: video {e.video} listed again with id {e.id} "
                                f"(was {prev[0].id} at {prev[0].source.name}:{prev[0].line})")
            return  # identical duplicate: the first listing wins
        chosen[e.video] = (e, split)

    # ---- facts ------------------------------------------------------------------------
    @functools.cached_property
    def _templates(self) -> dict[int, np.ndarray]:
        path = self.root / TEMPLATES_FILE
        if not path.is_file():
            raise DataError(f"{path}: templates not found (expected a pickled dict {{int id: (5023, 3)}})")
        raw = load_pickle(path)
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{path}: expected a non-empty dict keyed by integer id, got {type(raw).__name__}")
        out: dict[int, np.ndarray] = {}
        for key, value in raw.items():
            try:
                vid = int(key)
                arr = np.asarray(value, dtype=np.float32).reshape(-1, 3)  # (V, 3)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: entry {key!r} is not an integer id -> (V, 3) array ({e})") from e
            out[vid] = arr
        sizes = {a.shape[0] for a in out.values()}
        if len(sizes) != 1:
            raise DataError(f"{path}: templates have different vertex counts {sorted(sizes)}")
        return out

    @functools.cached_property
    def info(self) -> CorpusInfo:  # type: ignore[override]
        seqs = self._sequences  # fills self._notes
        train = sorted({int(s.subject) for s in seqs if s.split == "train"})
        num_vertices = next(iter(self._templates.values())).shape[0]
        return CorpusInfo(
            format=self.format_name,
            root=str(self.root),
            fps=HDTF_FPS,
            motion="vertices",
            num_vertices=num_vertices,
            param_dim=0,
            has_head_pose=False,
            train_subjects=tuple(str(i) for i in train),
            splits=("train", "val", "test-A", "test-B"),
            eval_splits=("test-A", "test-B"),
            unseen_splits=("val", "test-B"),
            notes=dict(self._notes),
        )

    # ---- decoding ---------------------------------------------------------------------
    def _read_verts(self, seq: SequenceInfo) -> np.ndarray:
        path = self.verts_path(seq)
        obj = load_pickle_npy(path)
        verts = obj.get("verts") if isinstance(obj, dict) else obj
        expected = f"'verts' of shape (T, {3 * self.info.num_vertices})"
        if not isinstance(verts, np.ndarray) or verts.dtype.kind not in "fiu":
            raise DataError(f"{path}: expected a dict with {expected}, got {type(obj).__name__}")
        v = self.info.num_vertices
        if verts.ndim < 2 or verts.shape[0] < 1 or int(np.prod(verts.shape[1:])) != 3 * v:
            raise DataError(f"{path}: verts of shape {verts.shape}; expected {expected}")
        verts = verts.reshape(verts.shape[0], v, 3).astype(np.float32, copy=False)  # (T, V, 3)
        if verts.shape[0] != seq.num_frames:
            log.warning("%s: %d frames on disk, %d in the video list; using the file", path, verts.shape[0],
                        seq.num_frames)
        if not np.all(np.isfinite(verts)):
            raise DataError(f"{path}: vertices contain NaN or infinite values")
        return verts

    def _read_audio(self, seq: SequenceInfo) -> np.ndarray:
        from talkmesh.audio.io import AudioError, load_audio, resample, to_mono_float

        npy, wav = self._audio_paths(seq.name)
        try:
            if npy.is_file():
                obj = load_pickle_npy(npy)
                if not isinstance(obj, dict) or "speech_array" not in obj or "sampling_rate" not in obj:
                    raise DataError(f"{npy}: expected a dict with 'speech_array' and 'sampling_rate'")
                rate = float(np.asarray(obj["sampling_rate"]).item())
                return resample(to_mono_float(np.asarray(obj["speech_array"]), str(npy)), rate)  # (S,) 16 kHz
            return load_audio(wav)
        except AudioError as e:
            raise DataError(str(e)) from e

    def _load(self, seq: SequenceInfo) -> Clip:
        return Clip(
            name=seq.name,
            subject=seq.subject,
            audio=self._read_audio(seq),
            fps=HDTF_FPS,
            vertices=self._read_verts(seq),  # (T, V, 3)
            template=self.template(seq.subject),  # (V, 3)
            split=seq.split,
        )

    def template(self, subject: str) -> np.ndarray | None:
        """(V, 3) template of id ``subject`` from templates.pkl."""
        try:
            key = int(subject)
        except ValueError:
            raise DataError(f"hdtf: subject {subject!r} is not an integer id") from None
        tpl = self._templates.get(key)
        if tpl is None:
            raise DataError(f"{self.root / TEMPLATES_FILE}: no template for id {key}")
        return tpl

    def regions(self) -> Regions:
        """Lips: the release's FLAME_Regions/lve.txt (Mimic's LVE set), else FLAME_masks.pkl
        ``lips``; upper face: FLAME_masks.pkl ``forehead`` U ``eye_region`` (datasets.md 7).
        ``data.lip_regions`` / ``data.upper_regions`` override either."""
        if self._regions is not None:
            return self._regions
        from talkmesh.data.mead import find_flame_masks

        nv = self.info.num_vertices
        cfg = self.cfg
        masks = find_flame_masks(self.root, cfg.flame_model)
        lve = self.root / LIP_FILE
        sources: dict[str, str] = {}
        lips = upper = None
        if lve.is_file():
            lips = read_index_file(lve, nv)
            sources["lips"] = f"{lve} (md5 {file_md5(lve)})"
        if masks is not None:
            m_lips, upper = read_flame_masks(masks, nv)
            sources["upper"] = f"{masks} (md5 {file_md5(masks)})"
            if lips is None:
                lips, sources["lips"] = m_lips, sources["upper"]
        if upper is None and not cfg.upper_regions:
            raise DataError(
                f"hdtf: FDD needs an upper-face region: provide FLAME_masks.pkl (forehead + eye_region) at "
                f"{self.root / 'FLAME_masks.pkl'} or set data.upper_regions=/path/to/FLAME_masks.pkl (or an index "
                "list)"
            )
        if lips is None and not cfg.lip_regions:
            raise DataError(f"hdtf: no lip region: {lve} not found; provide it or set data.lip_regions=...")
        # A region missing here is supplied by the matching data.*_regions override below.
        empty = np.zeros(0, dtype=np.int64)
        default = Regions(lips=empty if lips is None else lips, upper=empty if upper is None else upper,
                          sources=sources)
        self._regions = with_overrides(default, cfg.lip_regions, cfg.upper_regions, nv)
        return self._regions
