"""The corpus interface every on-disk format implements, and the format registry.

A corpus indexes its sequences cheaply (names, subjects, splits, frame counts) and decodes
one sequence at a time, so large corpora are never loaded whole. Dataset facts the models
need (fps, vertex count, parameter width, training identities) are read off the corpus in
``Corpus.info`` and handed to models as numbers.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.errors import DataError

if TYPE_CHECKING:
    from talkmesh.data.regions import Regions
    from talkmesh.face.flame import FlameLayer

__all__ = ["Corpus", "CorpusInfo", "DataError", "available_formats", "open_corpus", "register_format"]

# name -> "module:Class"; imported lazily so `import talkmesh.data` stays light.
_FORMATS: dict[str, str] = {
    "synthetic": "talkmesh.data.synthetic:SyntheticCorpus",
    "vocaset": "talkmesh.data.vocaset:VocasetCorpus",
    "biwi": "talkmesh.data.biwi:BiwiCorpus",
    "mead": "talkmesh.data.mead:MeadCorpus",
    "hdtf": "talkmesh.data.hdtf:HdtfCorpus",
}


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    format: str
    root: str
    fps: float
    motion: Literal["vertices", "params"]  # what the corpus stores as ground truth
    num_vertices: int  # vertices per frame (of the face model for parameter corpora; 0 = none)
    param_dim: int  # 53 for FLAME parameter corpora, else 0
    has_head_pose: bool
    train_subjects: tuple[str, ...]  # one-hot order
    splits: tuple[str, ...]  # every named split, e.g. ("train", "val", "test-A", "test-B", "reference")
    eval_splits: tuple[str, ...]  # the test splits
    unseen_splits: tuple[str, ...]  # splits whose subjects are not training identities
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # rules applied, versions

    @property
    def samples_per_frame(self) -> float:
        """Audio samples (16 kHz) per motion frame: 16000 / fps."""
        return 16000.0 / self.fps

    @property
    def num_train_subjects(self) -> int:
        return len(self.train_subjects)


class Corpus(abc.ABC):
    """Base class of all corpus readers. Subclasses implement the abstract methods."""

    format_name: ClassVar[str] = ""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser() if cfg.root else Path()
        self._clip_cache: OrderedDict[str, Clip] = OrderedDict()
        self._skipped: dict[str, str] = {}  # filled by _index: clip name -> why it was left out

    def check_stored_rate(self, native_fps: float, stored: str) -> None:
        """For corpora kept at one rate: ``data.fps`` must be 0 (the native rate) or ``native_fps``;
        ``stored`` says what is stored (e.g. "MEAD FLAME parameters")."""
        if self.cfg.fps not in (0.0, native_fps):
            raise DataError(
                f"data.fps={self.cfg.fps:g}: {stored} are stored at {native_fps:g} fps (datasets.md 1); "
                f"set data.fps=0 or {native_fps:g}"
            )

    def check_root_dir(self, dataset: str) -> None:
        """``data.root`` must name an existing directory (``dataset`` names the expected root)."""
        if not self.cfg.root or not self.root.is_dir():
            raise DataError(f"data.root: {self.cfg.root or '(empty)'} is not a directory (expected the {dataset} root)")

    # ---- to implement -----------------------------------------------------------------
    @property
    @abc.abstractmethod
    def info(self) -> CorpusInfo: ...

    @abc.abstractmethod
    def _index(self) -> list[SequenceInfo]:
        """Every sequence of the corpus (any split), sorted by name."""

    @abc.abstractmethod
    def _load(self, seq: SequenceInfo) -> Clip:
        """Decode one sequence (audio at 16 kHz, motion at ``info.fps``)."""

    @abc.abstractmethod
    def template(self, subject: str) -> np.ndarray | None:
        """(V, 3) neutral mesh of ``subject`` (None for parameter corpora without a face model)."""

    @abc.abstractmethod
    def regions(self) -> Regions:
        """Lip and upper-face vertex indices (user overrides in cfg applied)."""

    # ---- shared behaviour -------------------------------------------------------------
    @functools.cached_property
    def _sequences(self) -> list[SequenceInfo]:
        seqs = sorted(self._index(), key=lambda s: s.name)
        if not seqs:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(self._skipped.items())[:3])
            extra = f" ({len(self._skipped)} clip(s) skipped: {why})" if self._skipped else ""
            raise DataError(f"{self.root}: no {self.format_name} sequences found{extra}")
        return seqs

    @property
    def skipped(self) -> dict[str, str]:
        """Clips the index left out, name -> reason (e.g. missing or unreadable audio); empty for
        readers that never skip. Indexes the corpus first. Training runs tag the count."""
        _ = self._sequences
        return dict(self._skipped)

    @functools.cached_property
    def _by_name(self) -> dict[str, SequenceInfo]:
        return {s.name: s for s in self._sequences}

    def sequences(self, split: str | None = None) -> list[SequenceInfo]:
        """All sequences, or those of one named split (unknown split names are errors)."""
        if split is None:
            return list(self._sequences)
        if split not in self.info.splits:
            raise DataError(f"split {split!r} does not exist in {self.format_name}; splits: {list(self.info.splits)}")
        return [s for s in self._sequences if s.split == split]

    def get(self, name: str) -> SequenceInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise DataError(f"sequence {name!r} not found in {self.format_name} corpus at {self.root}") from None

    def load(self, seq: SequenceInfo | str) -> Clip:
        """Decode a sequence; the last ``cfg.cache_clips`` clips stay in memory."""
        info = self.get(seq) if isinstance(seq, str) else seq
        hit = self._clip_cache.get(info.name)
        if hit is not None:
            self._clip_cache.move_to_end(info.name)
            return hit
        clip = self._load(info)
        if self.cfg.cache_clips > 0:
            self._clip_cache[info.name] = clip
            while len(self._clip_cache) > self.cfg.cache_clips:
                self._clip_cache.popitem(last=False)
        return clip

    def subject_index(self, subject: str) -> int:
        """Position in the training one-hot, -1 for identities not seen in training."""
        try:
            return self.info.train_subjects.index(subject)
        except ValueError:
            return -1

    def subjects(self, split: str | None = None) -> list[str]:
        return sorted({s.subject for s in self.sequences(split)})

    def face_model(self) -> FlameLayer | None:
        """The FLAME-style layer that turns parameters into vertices, if one is available."""
        if not self.cfg.flame_model:
            return None
        return load_face_model(self.cfg.flame_model)

    def reference_pool(self, subject: str) -> list[SequenceInfo]:
        """Style-reference clips (metrics.md 6.3): the subject's ``reference`` split, or its
        training sequences for seen subjects; sorted by name."""
        pool = [s for s in self._sequences if s.subject == subject and s.split == "reference"]
        if not pool:
            pool = [s for s in self._sequences if s.subject == subject and s.split == "train"]
        return sorted(pool, key=lambda s: s.name)

    def reference_clip(self, subject: str, seconds: float) -> Clip:
        """Pool clips concatenated in sorted order until ``seconds`` of motion is reached."""
        pool = self.reference_pool(subject)
        if not pool:
            raise DataError(f"no style-reference clips for subject {subject!r}")
        return self._concat_frames(pool, int(round(seconds * self.info.fps)), f"{subject}_reference")

    def _concat_frames(self, seqs: list[SequenceInfo], need: int, name: str) -> Clip:
        """``seqs`` loaded and concatenated in order until ``need`` frames are reached, cut to
        at most ``need`` frames."""
        clips: list[Clip] = []
        total = 0
        for seq in seqs:
            clip = self.load(seq)
            clips.append(clip)
            total += clip.num_frames
            if total >= need:
                break
        return concat_clips(clips, name=name).slice_frames(0, min(total, need))

    def style_reference(self, seq: SequenceInfo, seconds: float, fallback_seconds: float = 6.0) -> tuple[Clip, int]:
        """The style reference for evaluating ``seq`` (metrics.md 6.3) and how many of
        ``seq``'s leading frames must then be excluded from scoring.

        The subject's pool (:meth:`reference_clip`) when it has one; else the subject's
        other clips in the same split, concatenated in sorted order (3D-HDTF: "other clips
        of the same id"); else the first ``min(fallback_seconds, seconds)`` of ``seq``
        itself, whose frames are then excluded (returned count > 0)."""
        if self.reference_pool(seq.subject):
            return self.reference_clip(seq.subject, seconds), 0
        others = sorted(
            (s for s in self._sequences if s.subject == seq.subject and s.split == seq.split and s.name != seq.name),
            key=lambda s: s.name,
        )
        need = int(round(seconds * self.info.fps))
        if others:
            return self._concat_frames(others, need, f"{seq.name}_reference"), 0
        clip = self.load(seq)
        n = min(int(round(min(fallback_seconds, seconds) * self.info.fps)), clip.num_frames - 1)
        if n < 1:
            raise DataError(f"{seq.name}: no style reference (no pool, no other clip, {clip.num_frames} frame(s))")
        return clip.slice_frames(0, n), n

    def vertices_of(self, clip: Clip) -> np.ndarray:
        """(T, V, 3) vertices of a clip: stored vertices, or the face model applied to the
        FLAME parameters with zero head rotation (datasets.md 6.2)."""
        if clip.vertices is not None:
            return clip.vertices
        if clip.params is None:
            raise DataError(f"{clip.name}: clip has neither vertices nor params")
        layer = self.face_model()
        if layer is None:
            raise DataError(
                f"{self.format_name}: vertices need a FLAME model; set data.flame_model=/path/to/generic_model.pkl"
            )
        return layer.vertices_from_params(clip.params, clip.shape)

    def summary(self) -> dict[str, Any]:
        """What `talkmesh data inspect` prints: per split subjects, sequences, frames, audio;
        regions; clips the index skipped (name -> reason)."""
        info = self.info
        per_split: dict[str, Any] = {}
        for split in (*info.splits, "unused"):
            seqs = [s for s in self._sequences if s.split == split]
            if not seqs and split == "unused":
                continue
            audio = [s.audio_seconds for s in seqs]
            per_split[split] = {
                "subjects": sorted({s.subject for s in seqs}),
                "sequences": len(seqs),
                "frames": int(sum(s.num_frames for s in seqs)),
                "motion_seconds": round(sum(s.num_frames for s in seqs) / info.fps, 2),
                "audio_seconds": None if any(a is None for a in audio) else round(float(sum(audio)), 2),
            }
        return {
            "format": info.format,
            "root": info.root,
            "fps": info.fps,
            "motion": info.motion,
            "num_vertices": info.num_vertices,
            "param_dim": info.param_dim,
            "has_head_pose": info.has_head_pose,
            "train_subjects": list(info.train_subjects),
            "splits": per_split,
            "regions": self._regions_summary(),
            "skipped": self.skipped,
            "notes": dict(info.notes),
        }

    def _regions_summary(self) -> dict[str, Any]:
        """``summary()["regions"]``: vertex counts and sources of :meth:`regions`."""
        return self.regions().describe()


def concat_clips(clips: list[Clip], name: str) -> Clip:
    """Concatenate clips of one subject along time (audio trimmed/padded to the motion)."""
    if not clips:
        raise ValueError("concat_clips needs at least one clip")
    first = clips[0]
    spf = 16000.0 / first.fps
    audio_parts = []
    for c in clips:
        n = int(round(c.num_frames * spf))
        a = c.audio[:n]
        audio_parts.append(np.pad(a, (0, n - a.shape[0])) if a.shape[0] < n else a)

    def cat(attr: str) -> np.ndarray | None:
        parts = [getattr(c, attr) for c in clips]
        return None if any(p is None for p in parts) else np.concatenate(parts, axis=0)

    return dataclasses.replace(
        first,
        name=name,
        audio=np.concatenate(audio_parts).astype(np.float32),
        vertices=cat("vertices"),
        params=cat("params"),
        head_pose=cat("head_pose"),
        text=" ".join(c.text for c in clips if c.text) or None,
    )


@functools.lru_cache(maxsize=4)
def load_face_model(path: str) -> FlameLayer:
    from talkmesh.face.flame import FlameLayer

    return FlameLayer.from_file(path)


def register_format(name: str, target: str) -> None:
    """Register an extra reader: ``register_format("mine", "pkg.module:MyCorpus")``."""
    _FORMATS[name] = target


def available_formats() -> list[str]:
    return sorted(_FORMATS)


def corpus_class(name: str) -> type[Corpus]:
    if name not in _FORMATS:
        raise DataError(f"data.format: unknown format {name!r}; available: {available_formats()}")
    module, cls = _FORMATS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def open_corpus(cfg: DataConfig) -> Corpus:
    """The reader for ``cfg.format`` over ``cfg.root``."""
    if cfg.format != "synthetic" and not cfg.root:
        raise DataError(f"data.root: a {cfg.format} corpus needs data.root=/path/to/{cfg.format}")
    if cfg.root and not Path(cfg.root).expanduser().is_dir():
        raise DataError(f"data.root: {cfg.root} is not a directory")
    return corpus_class(cfg.format)(cfg)
