"""Frames (+ audio) -> a video file, through ``imageio_ffmpeg.write_frames``.

* ``.mp4``: H.264 (libx264; yuv420p, so frame sizes must be even) through the ffmpeg
  binary bundled with the ``imageio-ffmpeg`` wheel (or ``IMAGEIO_FFMPEG_EXE``, or an ffmpeg
  on PATH), with a mono audio track encoded as AAC when ``audio`` is given, in the same
  ffmpeg pass as the frames. Frames are streamed to ffmpeg, so a long sequence never sits
  in memory as video; :func:`render_motion` renders straight into that stream.
* ``.gif``: animated GIF without audio, via Pillow with one global palette (or ffmpeg's
  palettegen when Pillow is missing).
* The file appears atomically: ffmpeg writes a hidden sibling that is renamed on success
  and removed on failure; the audio goes through a temporary directory that is always
  removed.
"""

from __future__ import annotations

import contextlib
import fractions
import itertools
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.render.frames import (
    DEFAULT_BACKGROUND,
    DEFAULT_COLOR,
    DEFAULT_SIZE,
    Shading,
    View,
    comparison_frames,
    iter_frames,
)
from talkmesh.render.inputs import as_array, check_audio, check_fps, check_frames, check_vertices

__all__ = ["FFmpegNotFoundError", "find_ffmpeg", "render_motion", "write_video"]

_HOW_TO_GET_FFMPEG = (
    "no ffmpeg executable found: install the imageio-ffmpeg wheel, which bundles one "
    "(`pip install imageio-ffmpeg`; it is a talkmesh dependency), or set IMAGEIO_FFMPEG_EXE to an "
    "ffmpeg binary, or put ffmpeg on PATH"
)
_X264 = ["-preset", "veryfast", "-tune", "animation", "-movflags", "+faststart"]
_GIF_PALETTE = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none"


class FFmpegNotFoundError(RuntimeError):
    """No ffmpeg executable: the message says how to get one."""


def find_ffmpeg() -> str:
    """Path of the ffmpeg binary imageio-ffmpeg uses: IMAGEIO_FFMPEG_EXE, the one bundled with
    the wheel, or ffmpeg on PATH. Raises FFmpegNotFoundError saying how to install one."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise FFmpegNotFoundError(_HOW_TO_GET_FFMPEG) from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        raise FFmpegNotFoundError(_HOW_TO_GET_FFMPEG) from None


def write_video(
    frames: Any,
    path: str | os.PathLike[str],
    fps: float,
    audio: Any = None,
    sample_rate: int = 16000,
    *,
    crf: int = 18,
) -> Path:
    """Write frames to ``path`` and return it.

    frames: uint8 (T, H, W, 3), or an iterable of (H, W, 3) frames or (n, H, W, 3) chunks
    (streamed to ffmpeg, never all in memory). ``.mp4``: H.264 yuv420p (H and W must be
    even), ``crf`` quality (0 best .. 51), with ``audio`` (mono float in -1..1 at
    ``sample_rate`` Hz) encoded as AAC, padded with silence or cut to the video's length.
    ``.gif``: looping animated GIF, no audio (``audio`` must be None). The file appears only
    when complete; nothing temporary is left behind, also on failure.
    """
    known = None
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        known = frames.shape[0]
    return _write_video(frames, path, fps, audio, sample_rate, crf, known)


def _check_target(
    path: str | os.PathLike[str], fps: float, audio: Any, sample_rate: int, crf: int
) -> tuple[Path, fractions.Fraction, tuple[np.ndarray, int] | None]:
    """The output path (.mp4 or .gif in an existing directory), the frame rate and the audio, checked."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"path: unsupported video type {out.suffix!r} ({out}); use .mp4 or .gif")
    rate = check_fps(fps)
    if audio is not None and suffix == ".gif":
        raise ValueError("audio: a .gif cannot carry audio; write .mp4 to keep the sound")
    aud = check_audio(audio, sample_rate) if audio is not None else None
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise ValueError(f"crf: expected an integer in 0..51, got {crf!r}")
    if not out.parent.is_dir():
        raise ValueError(f"path: directory {out.parent} does not exist")
    return out, rate, aud


def _write_video(
    frames: Any,
    path: str | os.PathLike[str],
    fps: float,
    audio: Any,
    sample_rate: int,
    crf: int,
    num_frames: int | None,
) -> Path:
    """write_video with an optional frame count known in advance (the audio is then fitted
    to it exactly; otherwise ffmpeg pads it with silence and cuts it at the last frame)."""
    out, rate, aud = _check_target(path, fps, audio, sample_rate, crf)
    suffix = out.suffix.lower()
    stream = check_frames(frames)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("frames: no frames to write") from None
    h, w = first.shape[:2]
    if suffix == ".mp4" and (h % 2 or w % 2):
        raise ValueError(f"frames: H.264 yuv420p needs even width and height, got {w}x{h}")

    all_frames = itertools.chain([first], stream)
    part = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.part{suffix}"  # created by the writer: umask applies
    try:
        if suffix == ".gif":
            _write_gif(all_frames, part, rate, w, h)
        else:
            _write_mp4(all_frames, part, rate, w, h, aud, int(crf), num_frames)
        os.replace(part, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return out


def _encode(frames: Iterable[np.ndarray], part: Path, rate: fractions.Fraction, w: int, h: int, **options: Any) -> int:
    """Stream (H, W, 3) uint8 frames into ``imageio_ffmpeg.write_frames`` (``options`` go to
    it); returns the number of frames written."""
    find_ffmpeg()  # a clear error before imageio-ffmpeg's own
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(
        str(part), (w, h), fps=rate, quality=None, macro_block_size=1, ffmpeg_log_level="error", **options
    )
    writer.send(None)  # start ffmpeg
    count = 0
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
            count += 1
    finally:
        writer.close()  # ffmpeg finishes the file (a partial one when the frames raised)
    # write_frames does not check ffmpeg's exit status: a missing or empty file is how a
    # failed encode shows (ffmpeg's message went to stderr).
    if not part.is_file() or part.stat().st_size == 0:
        raise RuntimeError(f"ffmpeg failed writing {part.name}; its message is on stderr")
    return count


def _fit_audio(samples: np.ndarray, sr: int, rate: fractions.Fraction, num_frames: int) -> np.ndarray:
    """Pad with silence or cut so the audio lasts exactly num_frames / fps."""
    n = int(round(num_frames * sr / rate))
    if samples.size >= n:
        return samples[:n]
    return np.concatenate([samples, np.zeros(n - samples.size, np.float32)])


def _write_mp4(
    frames: Iterator[np.ndarray],
    part: Path,
    rate: fractions.Fraction,
    w: int,
    h: int,
    audio: tuple[np.ndarray, int] | None,
    crf: int,
    num_frames: int | None,
) -> None:
    """H.264 + AAC; ValueError when ``num_frames`` is given and not met. With a known frame
    count (or no audio) one ffmpeg pass; a stream of unknown length is encoded first and the
    audio, cut or padded to the frames written, muxed in after (ffmpeg's ``-shortest`` on a
    piped stream keeps however much audio it read ahead, which depends on the machine's load)."""
    from talkmesh.audio.io import write_wav

    output = [*_X264, "-crf", str(crf)]
    with tempfile.TemporaryDirectory(prefix="talkmesh-render-") as tmp:
        audio_path = str(Path(tmp) / "audio.wav")
        if audio is None or num_frames is None:
            video = part if audio is None else Path(tmp) / "video.mp4"
            count = _encode(frames, video, rate, w, h, codec="libx264", output_params=output)
            if audio is not None:
                write_wav(audio_path, _fit_audio(audio[0], audio[1], rate, count), audio[1], subtype="FLOAT")
                _mux_audio(video, audio_path, part)
        else:
            write_wav(audio_path, _fit_audio(audio[0], audio[1], rate, num_frames), audio[1], subtype="FLOAT")
            count = _encode(
                frames, part, rate, w, h, codec="libx264", output_params=[*output, "-b:a", "128k"],
                audio_path=audio_path, audio_codec="aac",
            )
    if num_frames is not None and count != num_frames:
        raise ValueError(f"frames: expected {num_frames} frames, got {count}")


def _mux_audio(video: Path, audio_path: str, out: Path) -> None:
    """Copy the H.264 stream of ``video`` and encode ``audio_path`` (already as long as the
    video) as AAC into ``out``."""
    import subprocess

    cmd = [
        find_ffmpeg(), "-v", "error", "-y", "-i", str(video), "-i", audio_path, "-map", "0:v:0", "-map", "1:a:0",
        "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"ffmpeg failed adding the audio to {out.name}: {done.stderr.strip()[-500:]}")


def _write_gif(frames: Iterator[np.ndarray], part: Path, rate: fractions.Fraction, w: int, h: int) -> None:
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None:
        output = ["-vf", _GIF_PALETTE, "-loop", "0"]
        _encode(frames, part, rate, w, h, codec="gif", pix_fmt_out="pal8", output_params=output)
        return

    # One palette for the whole clip (from the first frames), so colours do not flicker.
    head: list[np.ndarray] = []
    for frame in frames:
        head.append(frame)
        if len(head) == 32:
            break
    sample = np.concatenate(head[:: max(1, len(head) // 8)], axis=0)
    palette = Image.fromarray(sample).quantize(colors=255, method=Image.Quantize.MEDIANCUT)

    def indexed(fr: np.ndarray) -> Any:
        return Image.fromarray(fr).quantize(palette=palette, dither=Image.Dither.NONE)

    images = [indexed(f) for f in head] + [indexed(f) for f in frames]
    # GIF delays are centiseconds: spread the rounding so the clip keeps its length.
    ticks = [round(k * 100 / rate) for k in range(len(images) + 1)]
    durations = [max(10 * (b - a), 10) for a, b in zip(ticks[:-1], ticks[1:], strict=True)]
    images[0].save(
        part, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False,
        disposal=1,
    )


def _with_template(vertices: np.ndarray, template: Any) -> np.ndarray:
    """(T, V, 3) displacements + template (V, 3) -> absolute positions (T, V, 3)."""
    tm = as_array(template, "template")
    if tm.shape != (vertices.shape[1], 3):
        raise ValueError(f"template: expected shape ({vertices.shape[1]}, 3), got {tuple(tm.shape)}")
    tm = tm.astype(np.float64)
    if not np.isfinite(tm).all():
        raise ValueError("template: non-finite value (NaN or inf)")
    return vertices + tm[None]


def render_motion(
    vertices: Any,
    faces: Any,
    path: str | os.PathLike[str],
    fps: float,
    audio: Any = None,
    template: Any = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    view: View = "front",
    *,
    gt: Any = None,
    heat_region: Any = None,
    heat_vmax: float | None = None,
    sample_rate: int = 16000,
    background: Sequence[float] = DEFAULT_BACKGROUND,
    color: Sequence[float] = DEFAULT_COLOR,
    shading: Shading = "smooth",
) -> Path:
    """Render motion straight to a video file (frames streamed, never all in memory).

    vertices (T, V, 3) absolute positions, or displacements from ``template`` (V, 3) when a
    template is given (it is added to every frame, e.g. for offset-predicting models);
    faces (F, 3) or None (point splats). ``gt`` (T', V, 3) renders a prediction |
    ground-truth preview (:func:`side_by_side`; gt is always absolute), with the lip error
    heat map on the prediction when ``heat_region`` (vertex indices) is given. ``audio``
    (16 kHz mono float) goes into the ``.mp4``. Returns ``path``.
    """
    v = check_vertices(vertices)
    if template is not None:
        v = _with_template(v, template)
    if gt is None:
        if heat_region is not None:
            raise ValueError("heat_region: needs gt (the heat map colours the error against ground truth)")
        frames = iter_frames(v, faces, size, view, background, color, shading=shading)
        num_frames = v.shape[0]
    else:
        frames, num_frames = comparison_frames(
            v, gt, faces, size, view, background, color, heat_region, heat_vmax, shading
        )
    return _write_video(frames, path, fps, audio, sample_rate, 18, num_frames)
