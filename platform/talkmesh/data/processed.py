"""The processed on-disk layout shared by VOCASET (FaceFormer convention), BIWI (CodeTalker
pipeline) and the synthetic corpus (datasets.md 2.2, 3.2, 8)::

    vertices_npy/<stem>.npy   (T_native, V*3) float, at the layout's native fps
    wav/<stem>.wav            audio at any rate (resampled to 16 kHz on load)
    templates.pkl             subject -> (V, 3) neutral mesh
    params_npy/<stem>.npy     optional (T_native, 56) FLAME-56 (synthetic corpus)
    text/<stem>.txt           optional transcript

Subclasses say how a file stem splits into subject and sentence and which split a
(subject, sentence) belongs to. Motion is memory-mapped and read one sequence at a time,
subsampled by ``native_fps / fps`` (VOCASET: 60 -> 30 by stride 2).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from talkmesh.audio.io import AudioError, load_audio
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.errors import DataError
from talkmesh.data.safepickle import load_pickle


def open_npy(path: Path) -> np.ndarray:
    """An .npy array memory-mapped read-only (only the header is read now; no pickles);
    DataError naming ``path`` when it is not a readable array."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e


def npy_shape(path: Path) -> tuple[int, ...]:
    """Shape of an .npy file from its header (no data read)."""
    return tuple(open_npy(path).shape)


def finite_vertices(frames: np.ndarray, num_vertices: int, what: str) -> np.ndarray:
    """(T, V, 3) float32 from stored frames (T, V, 3) or (T, V*3) (a memory-mapped selection is
    read here); DataError ``"<what> contain NaN or infinite values"`` when any value is not finite."""
    verts = np.asarray(frames, dtype=np.float32).reshape(-1, num_vertices, 3)  # (T, V, 3)
    if not np.all(np.isfinite(verts)):
        raise DataError(f"{what} contain NaN or infinite values")
    return verts


def wav_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: not a readable audio file ({e})") from e
    return float(info.frames) / float(info.samplerate)


def read_templates(path: Path, num_values: int | None = None) -> dict[str, np.ndarray]:
    """``templates.pkl`` -> {subject: (V, 3) float32}; keys are turned into strings."""
    obj = load_pickle(path)
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a non-empty dict subject -> (V, 3) array, got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim == 1 and arr.size % 3 == 0:
            arr = arr.reshape(-1, 3)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise DataError(f"{path}: template {key!r} has shape {arr.shape}, expected (V, 3)")
        if num_values is not None and arr.size != num_values:
            raise DataError(f"{path}: template {key!r} has {arr.shape[0]} vertices, expected {num_values // 3}")
        out[str(key)] = arr
    return out


class ProcessedCorpus(Corpus):
    """Base class for corpora in the processed layout. Subclasses implement the hooks."""

    native_fps: float = 30.0
    default_fps: float = 30.0
    vertices_dir = "vertices_npy"
    wav_dir = "wav"
    params_dir = "params_npy"
    text_dir = "text"

    # ---- hooks --------------------------------------------------------------------------
    @abc.abstractmethod
    def parse_stem(self, stem: str) -> tuple[str, str]:
        """File stem -> (subject, sentence id); raise DataError for a name that does not fit."""

    @abc.abstractmethod
    def split_of(self, subject: str, sentence: str) -> str:
        """The split of a sequence, or "unused"."""

    def emotion_of(self, subject: str, sentence: str) -> tuple[int | None, int | None]:
        """(emotion, intensity) of a sequence; none by default."""
        return None, None

    # ---- shared implementation --------------------------------------------------------
    @property
    def fps(self) -> float:
        fps = self.cfg.fps or self.default_fps
        ratio = self.native_fps / fps
        if fps <= 0 or abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
            raise DataError(
                f"data.fps={self.cfg.fps}: {self.format_name} stores {self.native_fps:g} fps; "
                f"choose a rate that divides it (e.g. {self.default_fps:g})"
            )
        return fps

    @property
    def stride(self) -> int:
        return int(round(self.native_fps / self.fps))

    def vertex_corpus_info(
        self,
        notes: dict[str, str],
        *,
        train_subjects: tuple[str, ...],
        splits: tuple[str, ...],
        eval_splits: tuple[str, ...],
        unseen_splits: tuple[str, ...],
        extra_notes: Mapping[str, str] | None = None,
    ) -> CorpusInfo:
        """``info`` of a corpus that stores vertices (no parameters, no head pose) with an
        official list of training subjects (one-hot order). The notes are ``notes``, then
        ``missing_train_subjects`` when some of ``train_subjects`` have no sequence under the
        root, then ``extra_notes``."""
        present = {s.subject for s in self._sequences}
        notes = dict(notes)
        missing = [s for s in train_subjects if s not in present]
        if missing:
            notes["missing_train_subjects"] = ", ".join(missing)
        notes.update(extra_notes or {})
        return CorpusInfo(
            format=self.format_name,
            root=str(self.root),
            fps=self.fps,
            motion="vertices",
            num_vertices=self.num_vertices,
            param_dim=0,
            has_head_pose=False,
            train_subjects=train_subjects,
            splits=splits,
            eval_splits=eval_splits,
            unseen_splits=unseen_splits,
            notes=notes,
        )

    def _require_dir(self, name: str) -> Path:
        d = self.root / name
        if not d.is_dir():
            raise DataError(f"{d}: directory not found (the {self.format_name} processed layout has {name}/)")
        return d

    @functools.cached_property
    def _templates(self) -> dict[str, np.ndarray]:
        return read_templates(self.root / "templates.pkl")

    @functools.cached_property
    def num_vertices(self) -> int:
        first = next(iter(self._templates.values()))
        return int(first.shape[0])

    def template(self, subject: str) -> np.ndarray | None:
        try:
            return self._templates[subject]
        except KeyError:
            raise DataError(f"{self.root / 'templates.pkl'}: no template for subject {subject!r}") from None

    def _frames(self, native_frames: int) -> int:
        return (native_frames + self.stride - 1) // self.stride  # len(x[::stride])

    def _index(self) -> list[SequenceInfo]:
        vdir = self._require_dir(self.vertices_dir)
        wdir = self._require_dir(self.wav_dir)
        out = []
        for path in sorted(vdir.glob("*.npy")):
            subject, sentence = self.parse_stem(path.stem)
            shape = npy_shape(path)
            if len(shape) not in (2, 3) or shape[0] == 0:
                raise DataError(f"{path}: expected (T, V*3) vertices, got shape {shape}")
            wav = wdir / f"{path.stem}.wav"
            if not wav.is_file():
                raise DataError(f"{wav}: audio file missing for {path.name}")
            emotion, intensity = self.emotion_of(subject, sentence)
            out.append(
                SequenceInfo(
                    name=path.stem,
                    subject=subject,
                    split=self.split_of(subject, sentence),
                    num_frames=self._frames(shape[0]),
                    audio_seconds=wav_seconds(wav),
                    sentence=sentence,
                    emotion=emotion,
                    intensity=intensity,
                )
            )
        return out

    def _load(self, seq: SequenceInfo) -> Clip:
        vpath = self.root / self.vertices_dir / f"{seq.name}.npy"
        raw = open_npy(vpath)  # memory-mapped; only the strided frames are read
        template = self.template(seq.subject)  # (V, 3)
        nv = template.shape[0]
        if raw.ndim == 3 and raw.shape[1:] != (nv, 3) or raw.ndim == 2 and raw.shape[1] != nv * 3:
            raise DataError(f"{vpath}: shape {raw.shape}, expected (T, {nv * 3}) to match the subject's template")
        verts = finite_vertices(raw[:: self.stride], nv, f"{vpath}: vertices")  # (T, V, 3)
        wav = self.root / self.wav_dir / f"{seq.name}.wav"
        try:
            audio = load_audio(wav)  # (S,) float32, 16 kHz
        except AudioError as e:
            raise DataError(str(e)) from e
        params, head_pose = self._read_params(seq, verts.shape[0])
        tpath = self.root / self.text_dir / f"{seq.name}.txt"
        text = tpath.read_text().strip() if tpath.is_file() else None
        return self.make_clip(seq, audio, verts, template, text, params=params, head_pose=head_pose)

    def _read_params(self, seq: SequenceInfo, num_frames: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(params (T, 53), head pose (T, 3)) from the optional ``params_npy/<stem>.npy``
        FLAME-56 file at the motion rate, or (None, None) when there is none."""
        ppath = self.root / self.params_dir / f"{seq.name}.npy"
        if not ppath.is_file():
            return None, None
        p = np.load(ppath, allow_pickle=False)[:: self.stride].astype(np.float32)  # (T, 56)
        if p.ndim != 2 or p.shape[1] != 56 or p.shape[0] != num_frames:
            raise DataError(f"{ppath}: shape {p.shape}, expected ({num_frames}, 56) FLAME-56 parameters")
        return p[:, :53], p[:, 53:56]

    def make_clip(
        self,
        seq: SequenceInfo,
        audio: np.ndarray,
        vertices: np.ndarray,
        template: np.ndarray,
        text: str | None,
        *,
        params: np.ndarray | None = None,
        head_pose: np.ndarray | None = None,
    ) -> Clip:
        """The decoded clip of ``seq`` at this corpus's fps: audio (S,) 16 kHz, vertices (T, V, 3),
        template (V, 3), optional params (T, 53) / head pose (T, 3); name, subject, split,
        emotion and intensity come from ``seq``."""
        return Clip(
            name=seq.name,
            subject=seq.subject,
            audio=audio,
            fps=self.fps,
            vertices=vertices,
            params=params,
            head_pose=head_pose,
            template=template,
            emotion=seq.emotion,
            intensity=seq.intensity,
            text=text,
            split=seq.split,
        )
