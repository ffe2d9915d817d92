"""Clips -> training windows / whole evaluation sequences -> padded batches.

``ClipDataset`` serves one item per sequence of the chosen split(s): a random window of
``window_frames`` for training (re-drawn each epoch, deterministic from seed, epoch and
index so every worker and every resume sees the same windows), or the whole sequence for
evaluation. ``collate_clips`` pads a list of clips into the batch schema of
specs/README.md ("Batch schema"): motion defines T, and the audio is cut or zero-padded
to ``T * 16000 / fps`` samples.
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


def match_audio_to_motion(clip: Clip) -> Clip:
    """Cut or zero-pad the audio to exactly ``round(T * 16000 / fps)`` samples."""
    n = int(round(clip.num_frames * 16000.0 / clip.fps))
    a = clip.audio
    if a.shape[0] == n:
        return clip
    a = a[:n] if a.shape[0] > n else np.pad(a, (0, n - a.shape[0]))
    return dataclasses.replace(clip, audio=a.astype(np.float32, copy=False))


class ClipDataset(torch.utils.data.Dataset):
    """One item per sequence of ``splits``: a random window (training) or the whole clip."""

    def __init__(
        self,
        corpus: Corpus,
        splits: str | Sequence[str],
        mode: Literal["window", "sequence"] = "window",
        window_frames: int | None = None,
        seed: int = 0,
        with_vertices: bool = False,
        subjects: Sequence[str] | None = None,
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

    def set_epoch(self, epoch: int) -> None:
        """Re-draw training windows for a new epoch (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sequences)

    def window_start(self, index: int) -> int:
        """Start frame of item ``index``'s window this epoch (0 for whole sequences)."""
        seq = self.sequences[index]
        if self.mode == "sequence" or seq.num_frames <= self.window_frames:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, seq.num_frames - self.window_frames + 1))

    def __getitem__(self, index: int) -> Clip:
        seq = self.sequences[index]
        clip = self.corpus.load(seq)
        if self.with_vertices and clip.vertices is None:
            clip = dataclasses.replace(clip, vertices=self.corpus.vertices_of(clip))
        if clip.template is None and clip.vertices is not None:
            tmpl = self.corpus.template(clip.subject)
            if tmpl is not None:
                clip = dataclasses.replace(clip, template=tmpl)
        if self.mode == "window" and clip.num_frames > self.window_frames:
            start = self.window_start(index)
            clip = clip.slice_frames(start, start + self.window_frames)
        clip = match_audio_to_motion(clip)
        return dataclasses.replace(clip, split=seq.split)

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
    ``names``/``subjects`` (lists of B strings), ``fps`` (float).
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
    return batch
