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
from pathlib import Path

import numpy as np

from talkmesh.audio.io import AudioError, load_audio
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus
from talkmesh.data.errors import DataError
from talkmesh.data.safepickle import load_pickle


def npy_shape(path: Path) -> tuple[int, ...]:
    """Shape of an .npy file from its header (no data read)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e


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
        try:
            raw = np.load(vpath, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{vpath}: not a readable .npy array ({e})") from e
        template = self.template(seq.subject)
        nv = template.shape[0]
        if raw.ndim == 3 and raw.shape[1:] != (nv, 3) or raw.ndim == 2 and raw.shape[1] != nv * 3:
            raise DataError(f"{vpath}: shape {raw.shape}, expected (T, {nv * 3}) to match the subject's template")
        verts = np.asarray(raw[:: self.stride], dtype=np.float32).reshape(-1, nv, 3)  # (T, V, 3)
        if not np.all(np.isfinite(verts)):
            raise DataError(f"{vpath}: vertices contain NaN or infinite values")
        wav = self.root / self.wav_dir / f"{seq.name}.wav"
        try:
            audio = load_audio(wav)
        except AudioError as e:
            raise DataError(str(e)) from e
        params = head_pose = None
        ppath = self.root / self.params_dir / f"{seq.name}.npy"
        if ppath.is_file():
            p = np.load(ppath, allow_pickle=False)[:: self.stride].astype(np.float32)
            if p.ndim != 2 or p.shape[1] != 56 or p.shape[0] != verts.shape[0]:
                raise DataError(f"{ppath}: shape {p.shape}, expected ({verts.shape[0]}, 56) FLAME-56 parameters")
            params, head_pose = p[:, :53], p[:, 53:56]
        tpath = self.root / self.text_dir / f"{seq.name}.txt"
        text = tpath.read_text().strip() if tpath.is_file() else None
        return Clip(
            name=seq.name,
            subject=seq.subject,
            audio=audio,
            fps=self.fps,
            vertices=verts,
            params=params,
            head_pose=head_pose,
            template=template,
            emotion=seq.emotion,
            intensity=seq.intensity,
            text=text,
            split=seq.split,
        )
