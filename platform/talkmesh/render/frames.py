"""Motion -> RGB frames: one camera per sequence and view, panels side by side, the error
heat map. The pixels come from :mod:`talkmesh.render.raster`.

* Orthographic camera fitted once to the bounding box of the whole sequence (all frames,
  and prediction and ground truth together in :func:`side_by_side`), so the head stays put
  and only the motion moves. Coordinates follow FLAME: x to the subject's left, y up, z
  out of the face. ``view="front"`` looks along -z, ``"side"`` shows the right profile
  (face pointing right), ``"three_quarter"`` the head turned 35 degrees the same way;
  ``"both"`` puts front and side next to each other, ``"front_three_quarter"`` front and
  three-quarter (the previews' portrait pair).
* ``faces=None`` (a point cloud without topology): shaded point splats.
* ``vertex_colors`` tints the surface per vertex (or per frame and vertex);
  :func:`error_colors` makes a heat map of the per-vertex error on a region (the lips).

Sizes are per panel: ``size=(W, H)`` gives frames of ``(H, W * panels, 3)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec

import numpy as np

from talkmesh.render.inputs import (
    as_array,
    check_faces,
    check_rgb,
    check_shading,
    check_size,
    check_vertex_colors,
    check_vertices,
    check_views,
)
from talkmesh.render.raster import Camera, MeshShader, draw_points, fit_camera

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_COLOR",
    "DEFAULT_INTERIOR",
    "DEFAULT_SIZE",
    "Shading",
    "View",
    "comparison_frames",
    "error_colors",
    "iter_frames",
    "render_frames",
    "side_by_side",
]

P = ParamSpec("P")
View = Literal["front", "side", "three_quarter", "both", "front_three_quarter"]
Shading = Literal["smooth", "flat"]

DEFAULT_SIZE = (256, 256)
DEFAULT_BACKGROUND = (245, 245, 247)
DEFAULT_COLOR = (196, 196, 206)  # grey clay
DEFAULT_INTERIOR = (112, 40, 46)  # back faces: the inside of the mouth/head
_SEPARATOR = (150, 150, 156)  # 2-px line between panels


@dataclass
class _Panel:
    vertices: np.ndarray  # (T, V, 3) float64
    camera: Camera
    colors: np.ndarray | None  # None, (V, 3) or (T, V, 3) in 0..1
    radius: float = 0.0  # point splats
    depth_range: tuple[float, float] = (0.0, 0.0)


def _splat_setup(panel: _Panel) -> None:
    """Splat radius from the screen-space density, and the sequence's depth range."""
    cam = panel.camera
    v = panel.vertices
    nv = v.shape[1]
    c0 = cam.to_screen(cam.to_camera(v[0]))
    span = np.ptp(c0[:, :2], axis=0)
    area = max(float(span[0] * span[1]), 1.0)
    panel.radius = float(np.clip(0.75 * math.sqrt(2.0 * area / max(nv, 1)), 1.0, 8.0))
    zmin, zmax = np.inf, -np.inf
    for start in range(0, v.shape[0], 256):
        z = cam.to_camera(v[start : start + 256])[..., 2] * cam.scale
        zmin, zmax = min(zmin, float(z.min())), max(zmax, float(z.max()))
    panel.depth_range = (zmax, zmin)


def _orient_outward(faces: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Flip the winding of a mesh whose triangles face inwards (negative signed volume about
    the centroid), so front faces are the outside; a consistently wound mesh is unchanged."""
    c = vertices - vertices.mean(axis=0)
    tri = c[faces]  # (F, 3, 3)
    volume = np.einsum("fc,fc->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2]))
    return faces[:, ::-1].copy() if volume < 0 else faces


def _frame_iterator(
    panels: list[_Panel],
    faces: np.ndarray | None,
    num_frames: int,
    color: np.ndarray,
    background: np.ndarray,
    interior: np.ndarray,
    shading: str,
) -> Iterator[np.ndarray]:
    if faces is not None:
        faces = _orient_outward(faces, panels[-1].vertices[0])
    shader = MeshShader(faces, panels[0].vertices.shape[1]) if faces is not None else None
    if shader is None:
        for p in panels:
            _splat_setup(p)
    w, h = panels[0].camera.width, panels[0].camera.height
    sep = np.array(_SEPARATOR, np.uint8)
    for t in range(num_frames):
        out = np.empty((h, w * len(panels), 3), np.uint8)
        for k, p in enumerate(panels):
            cam_pts = p.camera.to_camera(p.vertices[t])  # (V, 3)
            screen = p.camera.to_screen(cam_pts)
            if p.colors is None:
                rgb = np.broadcast_to(color, cam_pts.shape)
            else:
                rgb = p.colors if p.colors.ndim == 2 else p.colors[t]
            if shader is not None:
                img = shader.draw(cam_pts, screen, rgb, interior, shading, w, h, background)
            else:
                img = draw_points(screen, rgb, p.radius, p.depth_range, w, h, background)
            out[:, k * w : (k + 1) * w] = np.rint(img * 255.0).astype(np.uint8)
            if k:
                out[:, k * w : k * w + 2] = sep
        yield out


def _prepare(
    sequences: Sequence[np.ndarray],
    colors: Sequence[np.ndarray | None],
    size: Any,
    view: str,
) -> list[_Panel]:
    width, height = check_size(size)
    panels = []
    for seq, col in zip(sequences, colors, strict=True):
        for v in check_views(view):
            panels.append(_Panel(seq, fit_camera(sequences, v, width, height), col))
    return panels


def iter_frames(
    vertices: Any,
    faces: Any = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    view: View = "front",
    background: Sequence[float] = DEFAULT_BACKGROUND,
    color: Sequence[float] = DEFAULT_COLOR,
    *,
    vertex_colors: Any = None,
    shading: Shading = "smooth",
    interior: Sequence[float] = DEFAULT_INTERIOR,
) -> Iterator[np.ndarray]:
    """Render motion to RGB frames, one (H, W * panels, 3) uint8 frame at a time (for
    streaming long motion); :func:`render_frames` takes the same arguments and returns them
    stacked, (T, H, W * panels, 3).

    vertices (T, V, 3) (numpy or torch); faces (F, 3) integer indices or None for point
    splats; size (W, H) per panel, even, 16..4096; view "front" | "side" | "three_quarter" |
    "both" | "front_three_quarter" (the last two: 2 panels); background, color, interior:
    RGB in 0..255; vertex_colors None, (V, 3) or (T, V, 3) in 0..1 (replaces ``color``, e.g.
    from :func:`error_colors`); shading "smooth" (Gouraud) or "flat". Deterministic; inputs
    are validated before the first frame is rendered (ValueError on malformed input).
    """
    v = check_vertices(vertices)
    f = check_faces(faces, v.shape[1])
    cols = check_vertex_colors(vertex_colors, v.shape[0], v.shape[1])
    check_shading(shading)
    panels = _prepare([v], [cols], size, view)
    return _frame_iterator(
        panels, f, v.shape[0], check_rgb(color, "color"), check_rgb(background, "background"),
        check_rgb(interior, "interior"), shading,
    )


def _stacked(frames: Callable[P, Iterator[np.ndarray]], name: str) -> Callable[P, np.ndarray]:
    """``frames`` (same arguments) with all its frames stacked into one (T, H, W, 3) array."""

    @functools.wraps(frames)
    def stacked(*args: P.args, **kwargs: P.kwargs) -> np.ndarray:
        return np.stack(list(frames(*args, **kwargs)))

    stacked.__name__ = stacked.__qualname__ = name
    stacked.__doc__ = f"As :func:`{frames.__name__}`, with the frames stacked: (T, H, W * panels, 3) uint8."
    return stacked


render_frames = _stacked(iter_frames, "render_frames")


def error_colors(
    pred: Any,
    gt: Any,
    region: Any = None,
    vmax: float | None = None,
    color: Sequence[float] = DEFAULT_COLOR,
) -> np.ndarray:
    """Per-vertex error heat map: pred, gt (T, V, 3) -> (T, V, 3) colours in 0..1.

    The L2 error of each vertex in ``region`` (vertex indices, e.g. the lip region; None =
    all vertices) is mapped blue (0) -> cyan -> green -> yellow -> red (>= vmax); other
    vertices keep ``color``. vmax defaults to the 99th percentile of the region's error
    over the sequence (pass a fixed value, e.g. 0.005 m, to compare previews across runs).
    """
    p = check_vertices(pred, "pred")
    g = check_vertices(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt: shapes differ, {tuple(p.shape)} vs {tuple(g.shape)}")
    nv = p.shape[1]
    if region is None:
        idx = np.arange(nv)
    else:
        idx = as_array(region, "region").reshape(-1)
        if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= nv:
            raise ValueError(f"region: expected non-empty integer vertex indices in [0, {nv - 1}]")
    err = np.linalg.norm(p[:, idx] - g[:, idx], axis=2)  # (T, R)
    if vmax is None:
        vmax = float(np.percentile(err, 99))
    if not (math.isfinite(vmax) and vmax >= 0):
        raise ValueError(f"vmax: expected a finite non-negative number, got {vmax!r}")
    out = np.empty(p.shape)
    out[:] = check_rgb(color, "color")
    out[:, idx] = _heat(err / vmax if vmax > 0 else np.zeros_like(err))
    return out


_HEAT_STOPS = np.array(  # blue, cyan, green, yellow, red
    [[0.10, 0.25, 0.95], [0.0, 0.80, 0.90], [0.15, 0.85, 0.25], [1.0, 0.85, 0.0], [0.90, 0.08, 0.05]]
)


def _heat(x: np.ndarray) -> np.ndarray:
    """Values in 0..1 (clipped) -> (..., 3) colours along _HEAT_STOPS."""
    pos = np.clip(x, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_HEAT_STOPS) - 2)
    frac = (pos - i)[..., None]
    return _HEAT_STOPS[i] * (1 - frac) + _HEAT_STOPS[i + 1] * frac


def comparison_frames(
    pred: Any,
    gt: Any,
    faces: Any,
    size: Any,
    view: str,
    background: Sequence[float],
    color: Sequence[float],
    heat_region: Any,
    heat_vmax: float | None,
    shading: str,
) -> tuple[Iterator[np.ndarray], int]:
    """The frames of :func:`side_by_side`, streamed, and their count."""
    p = check_vertices(pred, "pred")
    g = check_vertices(gt, "gt")
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"pred and gt: vertex counts differ, {p.shape[1]} vs {g.shape[1]}")
    t = min(p.shape[0], g.shape[0])  # predictions may be a frame or two longer/shorter
    p, g = p[:t], g[:t]
    f = check_faces(faces, p.shape[1])
    check_shading(shading)
    heat = None
    if heat_region is not None or heat_vmax is not None:
        heat = error_colors(p, g, heat_region, heat_vmax, color)
    panels = _prepare([p, g], [heat, None], size, view)
    frames = _frame_iterator(
        panels, f, t, check_rgb(color, "color"), check_rgb(background, "background"),
        check_rgb(DEFAULT_INTERIOR, "interior"), shading,
    )
    return frames, t


def side_by_side(
    pred: Any,
    gt: Any,
    faces: Any = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    view: View = "front",
    background: Sequence[float] = DEFAULT_BACKGROUND,
    color: Sequence[float] = DEFAULT_COLOR,
    *,
    heat_region: Any = None,
    heat_vmax: float | None = None,
    shading: Shading = "smooth",
) -> np.ndarray:
    """Prediction | ground truth, with one camera fitted to both so they line up.

    pred, gt (T, V, 3) (cut to the shorter length); with ``heat_region`` (vertex indices,
    e.g. the lips) or ``heat_vmax`` the prediction panel is coloured by per-vertex error
    (:func:`error_colors`). Returns (T, H, W * 2 * views, 3) uint8: all prediction views,
    then all ground-truth views.
    """
    frames, _ = comparison_frames(pred, gt, faces, size, view, background, color, heat_region, heat_vmax, shading)
    return np.stack(list(frames))

