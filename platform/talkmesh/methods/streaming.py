"""Streaming animation: motion frames while the audio is still arriving (issue 15).

A :class:`MotionStream` is opened on a method with a template, a style and generate options
(:meth:`talkmesh.methods.base.MotionMethod.open_stream`). ``push(chunk)`` adds 16 kHz audio
and returns the frames that became final; ``finish()`` returns the rest. Together they return
exactly ``frames_for_audio(total samples)`` frames, every output ``generate`` gives
(``vertices`` (T, V, 3), ``params``, ``head_pose`` ...), frame by frame.

Every audio encoder of the five methods is bidirectional (wav2vec 2.0, HuBERT, conformers),
so a frame's features depend on audio after it. A stream therefore encodes a sliding window
of :class:`StreamContext`: ``left_s`` seconds of audio before the first frame it still needs
and ``right_s`` seconds after the last frame it emits. The look-ahead a client waits for is
``right_s`` plus its chunk length. Two strategies:

* :class:`WindowedStream` (the default, every method): ``generate`` on the window, keeping
  the frames that now have ``right_s`` of audio after them. Whatever the method decodes
  autoregressively inside ``generate`` (Mimic's windows, PoseGPT, DEEPTalk's code prior)
  starts again at each window and is warmed up by its ``left_s``.
* FaceFormer and DualTalker override it with a stream that keeps one
  :class:`~talkmesh.methods.faceformer.IncrementalDecoder` for the whole utterance: only
  the audio encoder runs on the window; the decoder steps with its key/value cache as each
  frame's audio tokens arrive, exactly as offline.

With ``left_s`` and ``right_s`` at least the utterance's length, streaming equals ``generate``
(the window is the whole audio); shorter contexts trade agreement for latency and cost. The
agreement at the default contexts is tested in ``tests/test_streaming.py``; latency is
measured by ``benchmarks/streaming.py``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["MotionStream", "StreamContext", "StreamableMethod", "WindowedStream", "per_frame_outputs"]

SAMPLE_RATE = 16000


class StreamableMethod(Protocol):
    """What a stream uses of a :class:`~talkmesh.methods.base.MotionMethod` (this module does
    not import base, which imports it)."""

    facts: Any  # DataFacts: fps, samples_per_frame

    @property
    def device(self) -> torch.device: ...

    def as_audio(self, audio: Any) -> torch.Tensor: ...

    def frames_for_audio(self, num_samples: int) -> int: ...

    def eval_mode(self) -> contextlib.AbstractContextManager[None]: ...

    def generate(self, audio: Any, template: Any, style: Any = None, **options: Any) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class StreamContext:
    """The encoder window of a stream: ``left_s`` seconds of audio kept before the first frame
    not yet final, ``right_s`` seconds waited for after a frame before it is final."""

    left_s: float = 2.0
    right_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("left_s", "right_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 3600):
                raise ValueError(f"stream context {name}: seconds in [0, 3600], got {value!r}")


def per_frame_outputs(out: Mapping[str, Any], frames: int) -> dict[str, torch.Tensor]:
    """The outputs of ``generate`` that hold one row per frame ((T, ...) tensors)."""
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == frames}


def _concat(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = [k for k in pieces[0] if all(k in p for p in pieces)] if pieces else []
    return {k: torch.cat([p[k] for p in pieces], dim=0) for k in keys}


class MotionStream(abc.ABC):
    """Audio in, final motion frames out. Not thread-safe: one caller pushes at a time.

    The audio received is kept from the sample the next window starts at, so memory stays
    bounded by the context (plus the frames not yet final) however long the stream runs.
    """

    def __init__(self, method: StreamableMethod, context: StreamContext) -> None:
        self.method = method
        self.context = context
        self.samples = 0  # samples received
        self.emitted = 0  # frames returned
        self.finished = False
        self._spf = float(method.facts.samples_per_frame)  # samples per frame
        self._left = int(math.ceil(context.left_s * method.facts.fps))  # frames of left context
        self._right = int(round(context.right_s * SAMPLE_RATE))  # samples of right context
        self._buf = torch.zeros(0, device=method.device)  # (S_kept,) samples from _start on
        self._start = 0  # index of _buf[0] among the samples received

    @property
    def fps(self) -> float:
        return float(self.method.facts.fps)

    @property
    def lookahead_s(self) -> float:
        """At most this much audio after a frame's end arrives before the frame is returned:
        the right context plus :meth:`encoder_lag_s`."""
        return self._right / SAMPLE_RATE + self.encoder_lag_s()

    def encoder_lag_s(self) -> float:
        """How far ``frames_for_audio`` lags the audio (an encoder's receptive field and frame
        rounding): the most audio past a frame's end that its first count needs (2 s probed)."""
        lag, fps = 0.0, self.fps
        for f in range(int(2 * fps)):
            lo, hi = 0, int((f + 2) / fps * SAMPLE_RATE) + SAMPLE_RATE  # fewest samples giving f + 1 frames
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if self.method.frames_for_audio(mid) < f + 1 else (lo, mid)
            lag = max(lag, lo / SAMPLE_RATE - (f + 1) / fps)
        return lag

    def push(self, audio: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Add a chunk (S,) of 16 kHz mono audio; returns the frames that became final
        ({output: (n, ...)}, n >= 0; empty dict when none)."""
        if self.finished:
            raise RuntimeError("the stream is finished")
        chunk = self.method.as_audio(audio)[0]  # (S,) float32, checked finite and mono
        self._buf = torch.cat([self._buf, chunk])
        self.samples += int(chunk.shape[0])
        return self._emit(final=False)

    def finish(self) -> dict[str, torch.Tensor]:
        """No more audio: the remaining frames (up to ``frames_for_audio(samples)`` in all)."""
        if self.finished:
            raise RuntimeError("the stream is finished")
        self.finished = True
        total = self.method.frames_for_audio(self.samples)
        if total < 1:
            raise ValueError(f"audio too short: {self.samples} samples give no motion frame")
        out = self._emit(final=True)
        self._buf = self._buf[:0]
        return out

    def _emit(self, final: bool) -> dict[str, torch.Tensor]:
        total = self.method.frames_for_audio(self.samples)
        ready = total if final else min(total, self.method.frames_for_audio(max(0, self.samples - self._right)))
        with torch.no_grad(), self.method.eval_mode():
            out = self._frames(ready, final)
        n = next(iter(out.values())).shape[0] if out else 0
        self.emitted += n
        self._trim()
        return out

    def _window_start(self, frame: int) -> tuple[int, int]:
        """(first frame, first sample) of the window whose first needed frame is ``frame``."""
        first = max(0, frame - self._left)
        return first, int(round(first * self._spf))

    def _window(self, sample: int) -> torch.Tensor:
        """The audio received from sample index ``sample`` on (S_w,)."""
        return self._buf[sample - self._start :]

    def _trim(self) -> None:
        keep = self._window_start(self._next_needed())[1]
        if keep > self._start:
            self._buf = self._buf[keep - self._start :]
            self._start = keep

    def _next_needed(self) -> int:
        """The first frame whose audio window is still needed."""
        return self.emitted

    @abc.abstractmethod
    def _frames(self, ready: int, final: bool) -> dict[str, torch.Tensor]:
        """Frames ``emitted`` .. ``ready`` - 1 (in the model's eval mode, no grad); fewer only
        when the audio window cannot give them yet (never when ``final``)."""


class WindowedStream(MotionStream):
    """Any method: ``generate`` on the window [first needed frame - left context, received
    audio], keeping the frames that are final (see the module docstring)."""

    def __init__(
        self,
        method: StreamableMethod,
        template: Any,
        style: Any,
        context: StreamContext,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(method, context)
        self.template, self.style, self.options = template, style, dict(options or {})

    def _frames(self, ready: int, final: bool) -> dict[str, torch.Tensor]:
        if ready <= self.emitted:
            return {}
        first, sample = self._window_start(self.emitted)
        audio = self._window(sample)  # (S_w,)
        count = self.method.frames_for_audio(int(audio.shape[0]))
        if count < 1:
            return {}
        out = per_frame_outputs(self.method.generate(audio, self.template, self.style, **self.options), count)
        lo, hi = self.emitted - first, ready - first
        have = max(0, min(hi, count) - lo)  # the window's frame count may round one short
        got = {k: v[lo : lo + have] for k, v in out.items()}
        if final and have < hi - lo:  # the last frames: repeat the window's last one
            pad = hi - lo - have
            got = {k: torch.cat([got[k], v[-1:].expand(pad, *v.shape[1:])]) for k, v in out.items()}
        return got
