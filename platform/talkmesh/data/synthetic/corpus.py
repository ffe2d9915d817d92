"""The reader: the synthetic corpus through the processed-layout reader, as vertices
(VOCASET/BIWI-like) or as FLAME-56 parameters (MEAD-like)."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import CorpusInfo, load_face_model
from talkmesh.data.errors import DataError
from talkmesh.data.processed import ProcessedCorpus
from talkmesh.data.regions import Regions, load_regions, with_overrides
from talkmesh.data.synthetic.presets import DEFAULT_FPS
from talkmesh.data.synthetic.store import ensure_cached, read_meta
from talkmesh.data.synthetic.timelines import clip_phoneme_classes

if TYPE_CHECKING:
    from talkmesh.face.flame import FlameLayer

__all__ = ["SyntheticCorpus"]

_STEM = re.compile(r"^(?P<subject>S\d+)_(?P<sentence>seq\d+)$")


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

    def phoneme_classes(self, seq: SequenceInfo | str) -> np.ndarray:
        """(T,) int64 ``PHONEME_CLASSES`` index (0 = pause) of every frame of a clip at this
        corpus's fps (T = the loaded clip's ``num_frames``), regenerated from ``meta.json``;
        DataError naming the stem when there is no such sequence."""
        info = self.get(seq) if isinstance(seq, str) else seq
        classes = clip_phoneme_classes(self.meta, info.name, self.fps)  # (T,)
        if classes.shape[0] != info.num_frames:
            raise DataError(
                f"{self.root}: regenerated timeline of {info.name!r} has {classes.shape[0]} frames, "
                f"the stored clip {info.num_frames}"
            )
        return classes

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
