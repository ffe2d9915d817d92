"""The one record type shared by every corpus."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceInfo:
    """Index entry for one sequence; cheap to build (no motion or audio decoded)."""

    name: str  # unique within the corpus, e.g. "FaceTalk_170725_00137_TA_sentence01"
    subject: str
    split: str  # one of Corpus.info.splits, or "unused"
    num_frames: int  # at the corpus fps (after any subsampling)
    audio_seconds: float | None = None  # None where it cannot be known without decoding
    sentence: str = ""
    emotion: int | None = None  # 0-based EMOTE order (datasets.md 5.2)
    intensity: int | None = None  # 0-based


@dataclasses.dataclass
class Clip:
    """One sequence: 16 kHz mono audio and motion at ``fps``.

    Motion is ``vertices`` (T, V, 3) for vertex corpora and/or FLAME-56 split as
    ``params`` (T, 53) = expression 50 | jaw 3 and ``head_pose`` (T, 3) for parameter
    corpora. ``template`` (V, 3) is the subject's neutral mesh; ``shape`` (100,) is a FLAME
    shape where the corpus has one.
    """

    name: str
    subject: str
    audio: np.ndarray  # (S,) float32, 16 kHz
    fps: float
    vertices: np.ndarray | None = None  # (T, V, 3) float32
    params: np.ndarray | None = None  # (T, 53) float32
    head_pose: np.ndarray | None = None  # (T, 3) float32, axis-angle
    template: np.ndarray | None = None  # (V, 3) float32
    shape: np.ndarray | None = None  # (100,) float32
    emotion: int | None = None
    intensity: int | None = None
    text: str | None = None
    split: str = ""

    @property
    def num_frames(self) -> int:
        for m in (self.vertices, self.params, self.head_pose):
            if m is not None:
                return int(m.shape[0])
        return 0

    @property
    def audio_seconds(self) -> float:
        return float(self.audio.shape[0]) / 16000.0

    def slice_frames(self, start: int, stop: int) -> Clip:
        """Frames [start, stop) with the matching audio samples (16000/fps per frame). The
        transcript is kept only when the slice holds every frame (a window of a sentence has
        no transcript of its own, and CTC terms must not see the whole sentence's)."""
        spf = 16000.0 / self.fps
        a0, a1 = int(round(start * spf)), int(round(stop * spf))
        audio = self.audio[a0:a1]
        if audio.shape[0] < a1 - a0:  # audio shorter than motion: zero-pad
            audio = np.pad(audio, (0, a1 - a0 - audio.shape[0]))

        def cut(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else x[start:stop]

        return dataclasses.replace(
            self,
            audio=audio,
            vertices=cut(self.vertices),
            params=cut(self.params),
            head_pose=cut(self.head_pose),
            text=self.text if (start <= 0 and stop >= self.num_frames) else None,
        )
