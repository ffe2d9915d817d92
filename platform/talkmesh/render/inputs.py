"""Input checks shared by the renderer and the video writer: every public entry point
validates what it is given here, so a bad input is a ValueError that names the argument."""

from __future__ import annotations

import fractions
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "MAX_SIDE",
    "as_array",
    "check_audio",
    "check_faces",
    "check_fps",
    "check_frames",
    "check_rgb",
    "check_shading",
    "check_size",
    "check_vertex_colors",
    "check_vertices",
    "check_views",
]

MAX_SIDE = 4096


def as_array(x: Any, name: str) -> np.ndarray:
    """A numpy view of ``x`` (torch tensors on any device included); ValueError naming ``name``."""
    if hasattr(x, "detach"):  # torch tensor, any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # anything unconvertible is a bad input
        raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc


def check_vertices(vertices: Any, name: str = "vertices") -> np.ndarray:
    """(T, V, 3) finite floats -> float64 array (a view where possible)."""
    v = as_array(vertices, name)
    if v.ndim != 3 or v.shape[2] != 3:
        hint = " (reshape (T, V*3) motion with .reshape(T, -1, 3))" if v.ndim == 2 else ""
        raise ValueError(f"{name}: expected shape (T, V, 3), got {tuple(v.shape)}{hint}")
    if v.shape[0] < 1 or v.shape[1] < 1:
        raise ValueError(f"{name}: needs at least one frame and one vertex, got {tuple(v.shape)}")
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric dtype, got {v.dtype}")
    v = v.astype(np.float64, copy=False)
    if not np.isfinite(v).all():
        bad = np.argwhere(~np.isfinite(v).all(axis=2))[0]
        raise ValueError(f"{name}: non-finite value (NaN or inf), first at frame {bad[0]} vertex {bad[1]}")
    return v


def check_faces(faces: Any, num_vertices: int) -> np.ndarray | None:
    """None, or (F, 3) integer vertex indices in range -> int64."""
    if faces is None:
        return None
    f = as_array(faces, "faces")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
        raise ValueError(f"faces: expected shape (F, 3) with F >= 1, got {tuple(f.shape)}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces: expected an integer dtype (vertex indices), got {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= num_vertices:
        raise ValueError(f"faces: vertex indices must lie in [0, {num_vertices - 1}], found range [{lo}, {hi}]")
    return f.astype(np.int64, copy=False)


def check_size(size: Any) -> tuple[int, int]:
    """(width, height) even integers in 16..MAX_SIDE."""
    try:
        w, h = (int(s) for s in size)
        ok = all(float(s) == int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (width, height) integers, got {size!r}") from None
    if not ok or not (16 <= w <= MAX_SIDE and 16 <= h <= MAX_SIDE):
        raise ValueError(f"size: width and height must be integers in [16, {MAX_SIDE}], got {size!r}")
    if w % 2 or h % 2:
        raise ValueError(f"size: width and height must be even (H.264 yuv420p needs even dimensions), got {(w, h)}")
    return w, h


def check_rgb(color: Any, name: str) -> np.ndarray:
    """An RGB triple in 0..255 -> float64 (3,) in 0..1."""
    c = as_array(color, name)
    if c.shape != (3,) or not np.issubdtype(c.dtype, np.number) or not np.isfinite(c).all():
        raise ValueError(f"{name}: expected three numbers in 0..255 (R, G, B), got {color!r}")
    if c.min() < 0 or c.max() > 255:
        raise ValueError(f"{name}: components must lie in 0..255, got {color!r}")
    return c.astype(np.float64) / 255.0


def check_views(view: str) -> tuple[str, ...]:
    """A view name -> the panel views in order: "front", "side" (right profile),
    "three_quarter" (turned 35 degrees to the right), "both" (front | side) or
    "front_three_quarter" (front | three-quarter)."""
    views = {
        "front": ("front",),
        "side": ("side",),
        "three_quarter": ("three_quarter",),
        "both": ("front", "side"),
        "front_three_quarter": ("front", "three_quarter"),
    }
    if view not in views:
        raise ValueError(f"view: expected one of {', '.join(repr(v) for v in views)}, got {view!r}")
    return views[view]


def check_vertex_colors(colors: Any, num_frames: int, num_vertices: int) -> np.ndarray | None:
    """None, (V, 3) or (T, V, 3) floats in 0..1."""
    if colors is None:
        return None
    c = as_array(colors, "vertex_colors")
    if c.shape not in ((num_vertices, 3), (num_frames, num_vertices, 3)):
        raise ValueError(
            f"vertex_colors: expected (V, 3) or (T, V, 3) = ({num_vertices}, 3) or ({num_frames}, {num_vertices}, 3) "
            f"floats in 0..1, got {tuple(c.shape)}"
        )
    c = c.astype(np.float64, copy=False)
    if not np.isfinite(c).all() or c.min() < 0 or c.max() > 1:
        raise ValueError("vertex_colors: values must be finite and lie in 0..1")
    return c



def check_fps(fps: Any) -> fractions.Fraction:
    """A positive frame rate up to 1000 -> a Fraction (29.97 -> 30000/1001)."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps: expected a positive number, got {fps!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise ValueError(f"fps: expected a positive number up to 1000, got {fps!r}")
    return fractions.Fraction(value).limit_denominator(1001)


def check_audio(audio: Any, sample_rate: Any) -> tuple[np.ndarray, int]:
    """Mono samples (S,) and an integer rate in Hz -> (float32 samples clipped to -1..1, rate)."""
    a = as_array(audio, "audio")
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"audio: expected mono samples (S,), got shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"audio: expected float samples in -1..1, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("audio: non-finite samples (NaN or inf)")
    is_int = isinstance(sample_rate, (int, np.integer)) and not isinstance(sample_rate, bool)
    if not is_int or not 1000 <= sample_rate <= 384000:
        raise ValueError(f"sample_rate: expected an integer number of Hz in 1000..384000, got {sample_rate!r}")
    return np.clip(a, -1.0, 1.0), int(sample_rate)


def check_frames(frames: Any) -> Iterator[np.ndarray]:
    """ndarray (T, H, W, 3) or an iterable of (H, W, 3) frames / (n, H, W, 3) chunks ->
    validated (H, W, 3) uint8 frames of one size."""
    if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
        arr = as_array(frames, "frames")
        if arr.ndim != 4:
            raise ValueError(f"frames: expected (T, H, W, 3) uint8, got shape {tuple(arr.shape)}")
        frames = [arr]
    elif not isinstance(frames, Iterable):
        kind = type(frames).__name__
        raise ValueError(f"frames: expected an array (T, H, W, 3) or an iterable of frames, got {kind}")
    shape = None
    for item in frames:
        arr = as_array(item, "frames")
        chunk = arr[None] if arr.ndim == 3 else arr
        if chunk.ndim != 4 or chunk.shape[3] != 3:
            raise ValueError(f"frames: expected (H, W, 3) frames or (n, H, W, 3) chunks, got {tuple(arr.shape)}")
        if chunk.dtype != np.uint8:
            raise ValueError(f"frames: expected dtype uint8 (use render_frames), got {chunk.dtype}")
        if shape is None:
            shape = chunk.shape[1:]
            if shape[0] < 2 or shape[1] < 2:
                raise ValueError(f"frames: frame size {shape[1]}x{shape[0]} is too small")
        elif chunk.shape[1:] != shape:
            raise ValueError(f"frames: all frames must have one size, got {tuple(shape)} then {tuple(chunk.shape[1:])}")
        yield from chunk



def check_shading(shading: str) -> str:
    """"smooth" (Gouraud) or "flat"."""
    if shading not in ("smooth", "flat"):
        raise ValueError(f"shading: expected 'smooth' or 'flat', got {shading!r}")
    return shading
