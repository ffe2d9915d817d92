"""Clips -> training windows / whole evaluation sequences -> padded batches.

``ClipDataset`` serves one item per sequence of the chosen split(s): a random window of
``window_frames`` for training (re-drawn each epoch, deterministic from seed, epoch and
index so every worker and every resume sees the same windows), or the whole sequence for
evaluation. ``collate_clips`` pads a list of clips into the batch schema of
specs/README.md ("Batch schema"): motion defines T, and the audio is cut or zero-padded
to ``T * 16000 / fps`` samples.

Style references (opt-in, ``style_reference_frames > 0``; the training loop asks the method
through ``MotionMethod.style_reference_frames()``, so only methods that need them pay for the
extra load). Each training window then also carries up to that many frames of motion that
are never part of the window itself, chosen by :meth:`ClipDataset.style_reference_span`,
deterministically from (seed, epoch, index), in this order:

1. ``"same_labels"``: a random crop of another clip of the same speaker in the dataset's
   splits, with the same emotion and intensity where the item's clip is labelled;
2. ``"same_clip"``: else the longer run of frames of the item's own clip before or after its
   window (a random crop of it), so no frame overlaps the window;
3. ``"other_labels"``: else (the clip fits in one window) a crop of another clip of the
   speaker with another emotion or intensity;
4. ``"none"``: else (the speaker's only clip fits in one window) an empty reference.

Such items are :class:`StyledClip` and ``collate_clips`` adds, beyond the shared schema
(methods that do not ask for references never see these keys): ``style_<key>`` (B, R, ...)
zero-padded for each of ``vertices`` / ``params`` / ``head_pose`` that every reference
carries as the corpus loads it (face-model vertices are not attached to references),
``style_mask`` (B, R) bool and ``style_lengths`` (B,) long (0 for ``"none"``), and
``style_names`` / ``style_source`` (lists of B strings; the reference clip's name, "" for
``"none"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus
from talkmesh.data.errors import DataError

Batch = dict[str, Any]

StyleSource = Literal["same_labels", "same_clip", "other_labels", "none"]


@dataclasses.dataclass
class StyledClip(Clip):
    """A training window with its style reference (never frames of the window itself)."""

    style_reference: Clip | None = None  # motion of the reference (T_ref, ...); 0 frames for "none"
    style_source: str = ""  # a StyleSource


@dataclasses.dataclass(frozen=True)
class StyleSpan:
    """Where an item's style reference comes from: frames [start, stop) of ``sequence``."""

    source: StyleSource
    sequence: int  # index into ClipDataset.sequences (the item's own for "same_clip" / "none")
    start: int
    stop: int


def _labels_match(item: SequenceInfo, other: SequenceInfo) -> bool:
    """Same emotion and intensity wherever the item is labelled."""
    return (item.emotion is None or other.emotion == item.emotion) and (
        item.intensity is None or other.intensity == item.intensity
    )


def match_audio_to_motion(clip: Clip) -> Clip:
    """Cut or zero-pad the audio to exactly ``round(T * 16000 / fps)`` samples."""
    n = int(round(clip.num_frames * 16000.0 / clip.fps))
    a = clip.audio
    if a.shape[0] == n:
        return clip
    a = a[:n] if a.shape[0] > n else np.pad(a, (0, n - a.shape[0]))
    return dataclasses.replace(clip, audio=a.astype(np.float32, copy=False))


class ClipDataset(torch.utils.data.Dataset):
    """One item per sequence of ``splits``: a random window (training) or the whole clip. In
    window mode ``items_per_sequence`` (default ``data.items_per_sequence``) items per
    sequence, each with its own window (3D-HDTF's reference draws 40 per video and epoch)."""

    def __init__(
        self,
        corpus: Corpus,
        splits: str | Sequence[str],
        mode: Literal["window", "sequence"] = "window",
        window_frames: int | None = None,
        seed: int = 0,
        with_vertices: bool = False,
        subjects: Sequence[str] | None = None,
        style_reference_frames: int = 0,
        items_per_sequence: int | None = None,
    ) -> None:
        if mode not in ("window", "sequence"):
            raise ValueError(f"mode must be 'window' or 'sequence', got {mode!r}")
        self.corpus = corpus
        self.splits = (splits,) if isinstance(splits, str) else tuple(splits)
        self.mode = mode
        fps = corpus.info.fps
        self.window_frames = int(window_frames or round(corpus.cfg.window_seconds * fps))
        if self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")
        self.seed = seed
        self.epoch = 0
        # Parameter corpora can attach vertices from the face model (for vertex losses/metrics).
        self.with_vertices = with_vertices
        seqs: list[SequenceInfo] = []
        for split in self.splits:
            seqs.extend(corpus.sequences(split))
        if subjects is not None:
            keep = set(subjects)
            seqs = [s for s in seqs if s.subject in keep]
        if not seqs:
            raise DataError(f"{corpus.format_name}: no sequences in split(s) {list(self.splits)} at {corpus.root}")
        self.sequences = seqs
        # Training items per sequence and epoch, each its own random window (data.items_per_sequence).
        repeats = corpus.cfg.items_per_sequence if items_per_sequence is None else int(items_per_sequence)
        if repeats < 1:
            raise ValueError(f"items_per_sequence must be >= 1, got {repeats}")
        self.repeats = repeats if mode == "window" else 1
        if style_reference_frames < 0:
            raise ValueError(f"style_reference_frames must be >= 0, got {style_reference_frames}")
        self.style_reference_frames = int(style_reference_frames) if mode == "window" else 0
        self._style_pools = self._build_style_pools() if self.style_reference_frames else []

    def _build_style_pools(self) -> list[tuple[list[int], list[int]]]:
        """Per item: (other clips of the speaker with matching labels, the speaker's other clips)."""
        by_subject: dict[str, list[int]] = {}
        for i, s in enumerate(self.sequences):
            by_subject.setdefault(s.subject, []).append(i)
        pools = []
        for s in self.sequences:
            others = [j for j in by_subject[s.subject] if self.sequences[j].name != s.name]
            pools.append(([j for j in others if _labels_match(s, self.sequences[j])], others))
        return pools

    def set_epoch(self, epoch: int) -> None:
        """Re-draw training windows for a new epoch (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sequences) * self.repeats

    def sequence_index(self, index: int) -> int:
        """The position in ``sequences`` of item ``index`` (``repeats`` items per sequence)."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        return index // self.repeats

    def window_start(self, index: int) -> int:
        """Start frame of item ``index``'s window this epoch (0 for whole sequences)."""
        seq = self.sequences[self.sequence_index(index)]
        if self.mode == "sequence" or seq.num_frames <= self.window_frames:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, seq.num_frames - self.window_frames + 1))

    def style_reference_span(self, index: int) -> StyleSpan | None:
        """Item ``index``'s style reference this epoch (None without style references); see
        the module docstring for the order. Deterministic from (seed, epoch, index)."""
        if not self.style_reference_frames:
            return None
        i = self.sequence_index(index)
        seq = self.sequences[i]
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])  # a stream apart from window_start's
        same, others = self._style_pools[i]
        if same:
            j = same[int(rng.integers(len(same)))]
            return self._crop_span("same_labels", j, 0, self.sequences[j].num_frames, rng)
        w = self.window_frames
        if seq.num_frames > w:
            w0 = self.window_start(index)
            before, after = (0, w0), (w0 + w, seq.num_frames)
            lo, hi = after if after[1] - after[0] >= before[1] - before[0] else before
            return self._crop_span("same_clip", i, lo, hi, rng)
        if others:
            j = others[int(rng.integers(len(others)))]
            return self._crop_span("other_labels", j, 0, self.sequences[j].num_frames, rng)
        return StyleSpan("none", i, 0, 0)

    def _crop_span(self, source: StyleSource, j: int, lo: int, hi: int, rng: np.random.Generator) -> StyleSpan:
        """A random crop of at most ``style_reference_frames`` frames of [lo, hi) of sequence j."""
        n = min(self.style_reference_frames, hi - lo)
        start = lo + int(rng.integers(0, hi - lo - n + 1))
        return StyleSpan(source, j, start, start + n)

    def _style_reference(self, index: int, own: Clip) -> tuple[Clip, str]:
        """(reference clip, source) of item ``index``; ``own`` is its whole loaded clip."""
        span = self.style_reference_span(index)
        assert span is not None
        src = own if span.sequence == self.sequence_index(index) else self.corpus.load(self.sequences[span.sequence])
        return src.slice_frames(span.start, span.stop), span.source

    def __getitem__(self, index: int) -> Clip:
        seq = self.sequences[self.sequence_index(index)]
        clip = self.corpus.load(seq)
        style = self._style_reference(index, clip) if self.style_reference_frames else None
        if self.with_vertices and clip.vertices is None:
            clip = dataclasses.replace(clip, vertices=self.corpus.vertices_of(clip))
        if clip.template is None and clip.vertices is not None:
            tmpl = self.corpus.template(clip.subject)
            if tmpl is not None:
                clip = dataclasses.replace(clip, template=tmpl)
        if self.mode == "window" and clip.num_frames > self.window_frames:
            start = self.window_start(index)
            clip = clip.slice_frames(start, start + self.window_frames)
        clip = dataclasses.replace(match_audio_to_motion(clip), split=seq.split)
        if style is None:
            return clip
        fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(Clip)}
        return StyledClip(**fields, style_reference=style[0], style_source=style[1])

    def subject_index(self, subject: str) -> int:
        return self.corpus.subject_index(subject)

    def collate(self, clips: Sequence[Clip]) -> Batch:
        """Pad clips into a batch; subject indices from the corpus's training one-hot order."""
        return collate_clips(clips, [self.corpus.subject_index(c.subject) for c in clips])


def _pad_stack(arrays: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Stack (T_i, ...) arrays into (B, length, ...) with zero padding."""
    first = arrays[0]
    out = np.zeros((len(arrays), length, *first.shape[1:]), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return torch.from_numpy(out)


def collate_clips(clips: Sequence[Clip], subject_indices: Sequence[int] | None = None) -> Batch:
    """Pad a list of clips into the batch schema.

    Keys: ``audio`` (B, S), ``audio_lengths`` (B,), ``motion_mask`` (B, T) bool,
    ``motion_lengths`` (B,), and where every clip has them ``vertices`` (B, T, V, 3),
    ``params`` (B, T, 53), ``head_pose`` (B, T, 3), ``template`` (B, V, 3),
    ``shape`` (B, 100); ``subject`` (B,) (-1 = not a training identity), ``emotion`` and
    ``intensity`` (B,) (-1 = unknown), ``text`` (list of B strings, "" = none),
    ``names``/``subjects`` (lists of B strings), ``fps`` (float); where every clip is a
    :class:`StyledClip`, the ``style_*`` keys of the module docstring.
    """
    if not clips:
        raise ValueError("cannot collate an empty list of clips")
    fps = clips[0].fps
    if any(abs(c.fps - fps) > 1e-6 for c in clips):
        raise DataError(f"cannot batch clips of different fps: {sorted({c.fps for c in clips})}")
    lengths = [c.num_frames for c in clips]
    if min(lengths) < 1:
        bad = [c.name for c in clips if c.num_frames < 1]
        raise DataError(f"clips without motion frames: {bad}")
    t_max = max(lengths)
    a_lengths = [c.audio.shape[0] for c in clips]
    s_max = max(a_lengths)
    audio = np.zeros((len(clips), s_max), dtype=np.float32)
    for i, c in enumerate(clips):
        audio[i, : c.audio.shape[0]] = c.audio
    mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    batch: Batch = {
        "audio": torch.from_numpy(audio),  # (B, S)
        "audio_lengths": torch.tensor(a_lengths, dtype=torch.long),  # (B,)
        "motion_mask": mask,  # (B, T)
        "motion_lengths": torch.tensor(lengths, dtype=torch.long),  # (B,)
        "subject": torch.tensor(
            list(subject_indices) if subject_indices is not None else [-1] * len(clips), dtype=torch.long
        ),  # (B,)
        "emotion": torch.tensor([-1 if c.emotion is None else c.emotion for c in clips], dtype=torch.long),
        "intensity": torch.tensor([-1 if c.intensity is None else c.intensity for c in clips], dtype=torch.long),
        "text": [c.text or "" for c in clips],
        "names": [c.name for c in clips],
        "subjects": [c.subject for c in clips],
        "fps": float(fps),
    }
    for key in ("vertices", "params", "head_pose"):
        values = [getattr(c, key) for c in clips]
        if all(v is not None for v in values):
            batch[key] = _pad_stack(values, t_max)  # (B, T, ...)
    for key in ("template", "shape"):
        values = [getattr(c, key) for c in clips]
        if all(v is not None for v in values):
            batch[key] = torch.from_numpy(np.stack(values).astype(np.float32))  # (B, V, 3) / (B, 100)
    if all(isinstance(c, StyledClip) and c.style_reference is not None for c in clips):
        batch.update(_collate_style([c for c in clips if isinstance(c, StyledClip)]))
    return batch


def _collate_style(clips: Sequence[StyledClip]) -> Batch:
    """The ``style_*`` keys (module docstring) of clips that all carry a style reference."""
    refs = [c.style_reference for c in clips if c.style_reference is not None]
    lengths = [r.num_frames for r in refs]
    r_max = max(lengths)
    out: Batch = {
        "style_mask": torch.arange(r_max)[None, :] < torch.tensor(lengths)[:, None],  # (B, R)
        "style_lengths": torch.tensor(lengths, dtype=torch.long),  # (B,)
        "style_names": [r.name if c.style_source != "none" else "" for c, r in zip(clips, refs, strict=True)],
        "style_source": [c.style_source for c in clips],
    }
    for key in ("vertices", "params", "head_pose"):
        values = [getattr(r, key) for r in refs]
        if all(v is not None for v in values):
            out[f"style_{key}"] = _pad_stack(values, r_max)  # (B, R, ...)
    return out
