"""Motion -> preview video: a small numpy software rasteriser and an ffmpeg writer.

Used for the MLflow preview artifact of every run and by the Serve API's optional preview,
so it runs headless on one CPU with no OpenGL, display or GPU.

Rendering (:func:`render_frames`, :func:`iter_frames`, :func:`side_by_side`)
    * Orthographic camera fitted once to the bounding box of the whole sequence (all frames,
      and prediction and ground truth together in :func:`side_by_side`), so the head stays
      put and only the motion moves. Coordinates follow FLAME: x to the subject's left,
      y up, z out of the face. ``view="front"`` looks along -z, ``"side"`` shows the right
      profile (face pointing right), ``"both"`` puts the two panels next to each other.
    * Triangles are rasterised all at once per frame: every triangle's pixel bounding box is
      enumerated as one flat candidate list (no Python loop over triangles), tested with
      barycentric edge functions and resolved with a per-pixel z-buffer
      (``np.maximum.at``). Candidates are processed in bounded chunks, so a few huge
      triangles cannot exhaust memory.
    * Lambert + a little Blinn specular from a head light, Gouraud-interpolated from
      area-weighted vertex normals (``shading="smooth"``) or per triangle (``"flat"``).
      Back faces are drawn two-sided in a dark interior colour, so an opening mouth reads
      as a dark hole (FLAME's mouth is an open boundary; what shows through it is the
      inside of the head).
    * ``faces=None`` (a point cloud without topology): shaded point splats, each vertex a
      small z-buffered disc shaded as a sphere impostor with a depth cue.
    * ``vertex_colors`` tints the surface per vertex (or per frame and vertex);
      :func:`error_colors` makes a heat map of the per-vertex error on a region (the lips).

Writing (:func:`write_video`, :func:`render_motion`)
    * ``.mp4``: H.264 (libx264; yuv420p, so frame sizes must be even) through the ffmpeg
      binary bundled with the ``imageio-ffmpeg`` wheel (or ``IMAGEIO_FFMPEG_EXE``, or an
      ffmpeg on PATH), with a 16 kHz mono audio track muxed as AAC when ``audio`` is
      given. Frames are streamed to ffmpeg's stdin, so a long sequence never sits in
      memory as video; :func:`render_motion` renders in chunks straight into that pipe.
    * ``.gif``: animated GIF without audio, via Pillow with one global palette (or ffmpeg's
      palettegen when Pillow is missing).
    * The file appears atomically: ffmpeg writes a hidden sibling that is renamed on
      success and removed on failure; the audio is passed through a temporary directory that
      is always removed.

Sizes are per panel: ``size=(W, H)`` gives frames of ``(H, W * panels, 3)``.
"""

from __future__ import annotations

import contextlib
import fractions
import functools
import math
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "FFmpegNotFoundError",
    "error_colors",
    "find_ffmpeg",
    "iter_frames",
    "render_frames",
    "render_motion",
    "side_by_side",
    "write_video",
]

View = Literal["front", "side", "both"]
Shading = Literal["smooth", "flat"]

DEFAULT_SIZE = (256, 256)
DEFAULT_BACKGROUND = (245, 245, 247)
DEFAULT_COLOR = (196, 196, 206)  # grey clay
DEFAULT_INTERIOR = (112, 40, 46)  # back faces: the inside of the mouth/head
MAX_SIDE = 4096
_MARGIN = 0.06  # fraction of the panel left free on each side
_CANDIDATE_BUDGET = 1 << 20  # pixel candidates per rasteriser chunk (~40 MB of temporaries)
_LIGHT = np.array([-0.35, 0.45, 1.0]) / np.linalg.norm([-0.35, 0.45, 1.0])  # camera space, y up
_HALF = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + np.array([0.0, 0.0, 1.0]))
_AMBIENT, _DIFFUSE, _SPECULAR, _SHININESS = 0.28, 0.72, 0.12, 24.0
_SEPARATOR = (150, 150, 156)  # 2-px line between panels


class FFmpegNotFoundError(RuntimeError):
    """No ffmpeg executable: the message says how to get one."""


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # anything unconvertible is a bad input
        raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc


def _check_vertices(vertices: Any, name: str = "vertices") -> np.ndarray:
    """(T, V, 3) finite floats -> float64 array (a view where possible)."""
    v = _as_array(vertices, name)
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


def _check_faces(faces: Any, num_vertices: int) -> np.ndarray | None:
    if faces is None:
        return None
    f = _as_array(faces, "faces")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 1:
        raise ValueError(f"faces: expected shape (F, 3) with F >= 1, got {tuple(f.shape)}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces: expected an integer dtype (vertex indices), got {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= num_vertices:
        raise ValueError(f"faces: vertex indices must lie in [0, {num_vertices - 1}], found range [{lo}, {hi}]")
    return f.astype(np.int64, copy=False)


def _check_size(size: Any) -> tuple[int, int]:
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


def _check_rgb(color: Any, name: str) -> np.ndarray:
    """An RGB triple in 0..255 -> float64 (3,) in 0..1."""
    c = _as_array(color, name)
    if c.shape != (3,) or not np.issubdtype(c.dtype, np.number) or not np.isfinite(c).all():
        raise ValueError(f"{name}: expected three numbers in 0..255 (R, G, B), got {color!r}")
    if c.min() < 0 or c.max() > 255:
        raise ValueError(f"{name}: components must lie in 0..255, got {color!r}")
    return c.astype(np.float64) / 255.0


def _check_views(view: str) -> tuple[str, ...]:
    views = {"front": ("front",), "side": ("side",), "both": ("front", "side")}
    if view not in views:
        raise ValueError(f"view: expected 'front', 'side' or 'both', got {view!r}")
    return views[view]


def _check_vertex_colors(colors: Any, num_frames: int, num_vertices: int) -> np.ndarray | None:
    """None, (V, 3) or (T, V, 3) floats in 0..1."""
    if colors is None:
        return None
    c = _as_array(colors, "vertex_colors")
    if c.shape not in ((num_vertices, 3), (num_frames, num_vertices, 3)):
        raise ValueError(
            f"vertex_colors: expected (V, 3) or (T, V, 3) = ({num_vertices}, 3) or ({num_frames}, {num_vertices}, 3) "
            f"floats in 0..1, got {tuple(c.shape)}"
        )
    c = c.astype(np.float64, copy=False)
    if not np.isfinite(c).all() or c.min() < 0 or c.max() > 1:
        raise ValueError("vertex_colors: values must be finite and lie in 0..1")
    return c


# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------

_ROTATIONS = {
    "front": np.eye(3),
    # Rotate +90 degrees about y: the face (+z) points to image right; we see the subject's right side.
    "side": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
}


@dataclass(frozen=True)
class _Camera:
    """Orthographic: camera space c = R (p - centre) (y up, z towards the viewer);
    pixel x = s c_x + W/2 - 1/2, pixel y = H/2 - 1/2 - s c_y, depth = s c_z (larger = nearer)."""

    rotation: np.ndarray  # (3, 3)
    centre: np.ndarray  # (3,) world-space point at the panel centre
    scale: float  # pixels per world unit
    width: int
    height: int

    def to_camera(self, p: np.ndarray) -> np.ndarray:
        return (p - self.centre) @ self.rotation.T  # (..., 3)

    def to_screen(self, c: np.ndarray) -> np.ndarray:
        s = self.scale
        out = np.empty_like(c)
        out[..., 0] = s * c[..., 0] + 0.5 * self.width - 0.5
        out[..., 1] = 0.5 * self.height - 0.5 - s * c[..., 1]
        out[..., 2] = s * c[..., 2]
        return out


def _fit_camera(sequences: Sequence[np.ndarray], view: str, width: int, height: int) -> _Camera:
    """One camera for the whole motion: the union bounding box (in the view's axes) of every
    frame of every sequence fills the panel minus a margin."""
    r = _ROTATIONS[view]
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for seq in sequences:
        for start in range(0, seq.shape[0], 256):  # bounded temporaries for long motion
            c = seq[start : start + 256].reshape(-1, 3) @ r.T
            lo = np.minimum(lo, c.min(axis=0))
            hi = np.maximum(hi, c.max(axis=0))
    centre_cam = 0.5 * (lo + hi)
    ext = hi - lo
    avail_w, avail_h = width * (1 - 2 * _MARGIN), height * (1 - 2 * _MARGIN)
    candidates = [a / e for a, e in ((avail_w, ext[0]), (avail_h, ext[1])) if e > 1e-12]
    scale = min(candidates) if candidates else 1.0  # a single point: any scale will do
    return _Camera(r, centre_cam @ r, float(scale), width, height)  # r orthonormal: world = c @ r


# --------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------


def _rasterize(screen: np.ndarray, faces: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Z-buffered triangle coverage. screen (V, 3) pixel x, pixel y, depth; faces (F, 3).
    Returns per pixel (H*W,): triangle id (-1 = empty) and the barycentric weights w0, w1
    of the winning triangle (w2 = 1 - w0 - w1)."""
    npix = width * height
    tri_id = np.full(npix, -1, np.int64)
    bary0 = np.zeros(npix, np.float32)
    bary1 = np.zeros(npix, np.float32)

    x = screen[faces, 0]  # (F, 3)
    y = screen[faces, 1]
    z = screen[faces, 2]
    x0, x1, x2 = x[:, 0], x[:, 1], x[:, 2]
    y0, y1, y2 = y[:, 0], y[:, 1], y[:, 2]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # twice the signed screen area
    xmin = np.maximum(np.ceil(x.min(axis=1)), 0)
    xmax = np.minimum(np.floor(x.max(axis=1)), width - 1)
    ymin = np.maximum(np.ceil(y.min(axis=1)), 0)
    ymax = np.minimum(np.floor(y.max(axis=1)), height - 1)
    keep = (np.abs(area) > 1e-9) & (xmax >= xmin) & (ymax >= ymin)
    if not keep.any():
        return tri_id, bary0, bary1
    ids = np.nonzero(keep)[0]
    x0, x1, x2, y0, y1, y2, area = (a[ids] for a in (x0, x1, x2, y0, y1, y2, area))
    z0, z1, z2 = z[ids, 0], z[ids, 1], z[ids, 2]
    xmin, ymin = xmin[ids], ymin[ids]
    bw = (xmax[ids] - xmin + 1).astype(np.int64)
    bh = (ymax[ids] - ymin + 1).astype(np.int64)

    # Edge functions: w0 = a0 x + b0 y + c0 (normalised by the area), evaluated relative to the
    # bounding box's corner so float32 keeps sub-pixel precision; depth is affine in screen space.
    inv = 1.0 / area
    a0, b0 = (y1 - y2) * inv, (x2 - x1) * inv
    a1, b1 = (y2 - y0) * inv, (x0 - x2) * inv
    w0o = ((x1 - xmin) * (y2 - ymin) - (x2 - xmin) * (y1 - ymin)) * inv
    w1o = ((x2 - xmin) * (y0 - ymin) - (x0 - xmin) * (y2 - ymin)) * inv
    dz0, dz1 = z0 - z2, z1 - z2
    coef_w = np.stack([w0o, a0, b0, w1o, a1, b1], axis=1).astype(np.float32)  # (F', 6)
    coef_z = np.stack([z2 + w0o * dz0 + w1o * dz1, a0 * dz0 + a1 * dz1, b0 * dz0 + b1 * dz1], axis=1)
    coef_z = coef_z.astype(np.float32)  # (F', 3) depth at the corner and its x, y slopes
    base = (ymin * width + xmin).astype(np.int64)  # pixel index of each box's corner
    bw32 = bw.astype(np.int32)
    count = bw * bh
    ends = np.cumsum(count)

    zbuf = np.full(npix, -np.inf, np.float32)
    eps = np.float32(-1e-5)  # shared edges belong to both neighbours; the z-buffer decides
    lo = 0
    while lo < ids.size:
        done = int(ends[lo - 1]) if lo else 0
        hi = max(int(np.searchsorted(ends, done + _CANDIDATE_BUDGET, side="right")), lo + 1)
        cnt = count[lo:hi]
        total = int(ends[hi - 1]) - done
        t = np.repeat(np.arange(lo, hi, dtype=np.int32), cnt)  # (N,) triangle of each candidate
        off = np.arange(total, dtype=np.int32) - np.repeat((ends[lo:hi] - cnt - done).astype(np.int32), cnt)
        wt = bw32[t]
        dy = off // wt
        dx = off - dy * wt
        dxf, dyf = dx.astype(np.float32), dy.astype(np.float32)
        c = coef_w[t]  # (N, 6)
        w0 = c[:, 0] + c[:, 1] * dxf + c[:, 2] * dyf
        w1 = c[:, 3] + c[:, 4] * dxf + c[:, 5] * dyf
        inside = np.nonzero((w0 >= eps) & (w1 >= eps) & (w0 + w1 <= 1 - eps))[0]
        t, dx, dy, w0, w1 = t[inside], dx[inside], dy[inside], w0[inside], w1[inside]
        cz = coef_z[t]
        depth = cz[:, 0] + cz[:, 1] * dx.astype(np.float32) + cz[:, 2] * dy.astype(np.float32)
        pix = base[t] + dy * width + dx
        np.maximum.at(zbuf, pix, depth)
        win = depth >= zbuf[pix]
        p = pix[win]
        tri_id[p] = ids[t[win]]
        bary0[p] = w0[win]
        bary1[p] = w1[win]
        lo = hi
    return tri_id, bary0, bary1


class _MeshShader:
    """Per-sequence constants for one mesh topology: the vertex-face incidence used to build
    area-weighted vertex normals."""

    def __init__(self, faces: np.ndarray, num_vertices: int) -> None:
        from scipy import sparse

        self.faces = faces
        nf = faces.shape[0]
        rows = faces.reshape(-1)
        cols = np.repeat(np.arange(nf), 3)
        self.incidence = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(num_vertices, nf))

    def draw(
        self,
        cam: np.ndarray,
        screen: np.ndarray,
        base_rgb: np.ndarray,
        interior: np.ndarray,
        shading: str,
        width: int,
        height: int,
        background: np.ndarray,
    ) -> np.ndarray:
        """cam, screen (V, 3); base_rgb (V, 3) in 0..1 -> (H, W, 3) float image in 0..1."""
        f = self.faces
        tri = cam[f]  # (F, 3, 3)
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted, camera space
        front = n[:, 2] > 0
        nf = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-30)

        tri_id, w0, w1 = _rasterize(screen, f, width, height)
        img = np.empty((height * width, 3))
        img[:] = background
        covered = np.nonzero(tri_id >= 0)[0]
        if covered.size == 0:
            return img.reshape(height, width, 3)
        tid = tri_id[covered]

        # Back faces (seen from inside): flat, dark, lit by |n . l| so the cavity keeps some form.
        back_rgb = interior[None, :] * (0.45 + 0.55 * np.abs(nf @ _LIGHT))[:, None]  # (F, 3)
        if shading == "flat":
            face_rgb = _lit(base_rgb[f].mean(axis=1), nf)  # (F, 3)
            img[covered] = np.where(front[tid, None], face_rgb[tid], back_rgb[tid])
        else:
            vn = self.incidence @ n  # (V, 3) sum of adjacent area-weighted face normals
            vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-30)
            vert_rgb = _lit(base_rgb, vn)  # (V, 3)
            b0 = w0[covered, None].astype(np.float64)
            b1 = w1[covered, None].astype(np.float64)
            ft = f[tid]  # (P, 3)
            smooth = b0 * vert_rgb[ft[:, 0]] + b1 * vert_rgb[ft[:, 1]] + (1.0 - b0 - b1) * vert_rgb[ft[:, 2]]
            img[covered] = np.where(front[tid, None], smooth, back_rgb[tid])
        return img.reshape(height, width, 3)


def _lit(rgb: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Lambert + Blinn specular under the head light. rgb, normals (N, 3) -> (N, 3) in 0..1."""
    diffuse = np.clip(normals @ _LIGHT, 0.0, None)
    spec = np.clip(normals @ _HALF, 0.0, None) ** _SHININESS
    out = rgb * (_AMBIENT + _DIFFUSE * diffuse)[:, None] + (_SPECULAR * spec)[:, None]
    return np.clip(out, 0.0, 1.0)


def _splat_offsets(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = (dx * dx + dy * dy).astype(np.float64)
    inside = d2 <= radius * radius + 1e-9
    return dx[inside].ravel(), dy[inside].ravel(), d2[inside].ravel()


def _draw_points(
    screen: np.ndarray,
    base_rgb: np.ndarray,
    radius: float,
    depth_range: tuple[float, float],
    width: int,
    height: int,
    background: np.ndarray,
) -> np.ndarray:
    """Shaded point splats: each vertex a z-buffered disc shaded as a sphere impostor,
    darker with distance (depth_range: the sequence's nearest/farthest depth)."""
    dx, dy, d2 = _splat_offsets(radius)
    cx = np.rint(screen[:, 0]).astype(np.int64)
    cy = np.rint(screen[:, 1]).astype(np.int64)
    px = (cx[:, None] + dx[None, :]).ravel()
    py = (cy[:, None] + dy[None, :]).ravel()
    vid = np.repeat(np.arange(screen.shape[0]), dx.size)
    nz = np.sqrt(np.clip(1.0 - d2 / (radius * radius), 0.0, 1.0))  # impostor normal z per offset
    depth = (screen[:, 2:3] + radius * nz[None, :]).ravel()
    ok = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    px, py, vid, depth = px[ok], py[ok], vid[ok], depth[ok]
    off = np.nonzero(ok)[0] % dx.size
    img = np.empty((height * width, 3))
    img[:] = background
    if px.size == 0:
        return img.reshape(height, width, 3)
    pix = py * width + px
    zbuf = np.full(width * height, -np.inf)
    np.maximum.at(zbuf, pix, depth)
    win = depth >= zbuf[pix]
    pix, vid, off = pix[win], vid[win], off[win]
    normals = np.stack([dx[off] / radius, -dy[off] / radius, nz[off]], axis=1)
    znear, zfar = depth_range
    cue = 0.6 + 0.4 * np.clip((screen[vid, 2] - zfar) / max(znear - zfar, 1e-12), 0.0, 1.0)
    img[pix] = _lit(base_rgb[vid], normals) * cue[:, None]
    return img.reshape(height, width, 3)


# --------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------


@dataclass
class _Panel:
    vertices: np.ndarray  # (T, V, 3) float64
    camera: _Camera
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
    shader = _MeshShader(faces, panels[0].vertices.shape[1]) if faces is not None else None
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
                img = _draw_points(screen, rgb, p.radius, p.depth_range, w, h, background)
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
    width, height = _check_size(size)
    panels = []
    for seq, col in zip(sequences, colors, strict=True):
        for v in _check_views(view):
            panels.append(_Panel(seq, _fit_camera(sequences, v, width, height), col))
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
    """Like :func:`render_frames`, one (H, W * panels, 3) uint8 frame at a time (for streaming
    long motion). Inputs are validated before the first frame is rendered."""
    v = _check_vertices(vertices)
    f = _check_faces(faces, v.shape[1])
    cols = _check_vertex_colors(vertex_colors, v.shape[0], v.shape[1])
    if shading not in ("smooth", "flat"):
        raise ValueError(f"shading: expected 'smooth' or 'flat', got {shading!r}")
    panels = _prepare([v], [cols], size, view)
    return _frame_iterator(
        panels, f, v.shape[0], _check_rgb(color, "color"), _check_rgb(background, "background"),
        _check_rgb(interior, "interior"), shading,
    )


def render_frames(
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
) -> np.ndarray:
    """Render motion to RGB frames.

    vertices (T, V, 3) (numpy or torch); faces (F, 3) integer indices or None for point
    splats; size (W, H) per panel, even, 16..4096; view "front" | "side" | "both";
    background, color, interior: RGB in 0..255; vertex_colors None, (V, 3) or (T, V, 3) in
    0..1 (replaces ``color``, e.g. from :func:`error_colors`); shading "smooth" (Gouraud)
    or "flat". Returns (T, H, W * panels, 3) uint8 (panels = 2 for "both").
    Deterministic; raises ValueError on malformed input.
    """
    frames = iter_frames(
        vertices, faces, size, view, background, color,
        vertex_colors=vertex_colors, shading=shading, interior=interior,
    )
    return np.stack(list(frames))


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
    p = _check_vertices(pred, "pred")
    g = _check_vertices(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt: shapes differ, {tuple(p.shape)} vs {tuple(g.shape)}")
    nv = p.shape[1]
    if region is None:
        idx = np.arange(nv)
    else:
        idx = _as_array(region, "region").reshape(-1)
        if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= nv:
            raise ValueError(f"region: expected non-empty integer vertex indices in [0, {nv - 1}]")
    err = np.linalg.norm(p[:, idx] - g[:, idx], axis=2)  # (T, R)
    if vmax is None:
        vmax = float(np.percentile(err, 99))
    if not (math.isfinite(vmax) and vmax >= 0):
        raise ValueError(f"vmax: expected a finite non-negative number, got {vmax!r}")
    out = np.empty(p.shape)
    out[:] = _check_rgb(color, "color")
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


def _comparison_frames(
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
    p = _check_vertices(pred, "pred")
    g = _check_vertices(gt, "gt")
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"pred and gt: vertex counts differ, {p.shape[1]} vs {g.shape[1]}")
    t = min(p.shape[0], g.shape[0])  # predictions may be a frame or two longer/shorter
    p, g = p[:t], g[:t]
    f = _check_faces(faces, p.shape[1])
    if shading not in ("smooth", "flat"):
        raise ValueError(f"shading: expected 'smooth' or 'flat', got {shading!r}")
    heat = None
    if heat_region is not None or heat_vmax is not None:
        heat = error_colors(p, g, heat_region, heat_vmax, color)
    panels = _prepare([p, g], [heat, None], size, view)
    frames = _frame_iterator(
        panels, f, t, _check_rgb(color, "color"), _check_rgb(background, "background"),
        _check_rgb(DEFAULT_INTERIOR, "interior"), shading,
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
    frames, _ = _comparison_frames(pred, gt, faces, size, view, background, color, heat_region, heat_vmax, shading)
    return np.stack(list(frames))


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------

_HOW_TO_GET_FFMPEG = (
    "no ffmpeg executable found: install the imageio-ffmpeg wheel, which bundles one "
    "(`pip install imageio-ffmpeg`; it is a talkmesh dependency), or set IMAGEIO_FFMPEG_EXE to an "
    "ffmpeg binary, or put ffmpeg on PATH"
)


def find_ffmpeg() -> str:
    """Path of the ffmpeg binary: IMAGEIO_FFMPEG_EXE, the one bundled with imageio-ffmpeg,
    or ffmpeg on PATH. Raises FFmpegNotFoundError saying how to install one."""
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        try:
            exe = imageio_ffmpeg.get_ffmpeg_exe()
            if exe and (os.path.isfile(exe) or shutil.which(exe)):
                return exe
        except RuntimeError:
            pass
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    raise FFmpegNotFoundError(_HOW_TO_GET_FFMPEG)


@functools.lru_cache(maxsize=8)
def _h264_encoder(exe: str) -> str:
    """The best H.264 encoder this ffmpeg build has (libx264 in the bundled binary)."""
    try:
        out = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise FFmpegNotFoundError(f"{exe} does not run ({exc}); {_HOW_TO_GET_FFMPEG}") from exc
    names = {line.split()[1] for line in out.splitlines() if len(line.split()) > 1 and line.startswith(" V")}
    for name in ("libx264", "libopenh264", "h264"):
        if name in names:
            return name
    raise FFmpegNotFoundError(f"{exe} has no H.264 encoder (libx264/libopenh264); {_HOW_TO_GET_FFMPEG}")


def _check_fps(fps: Any) -> fractions.Fraction:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps: expected a positive number, got {fps!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise ValueError(f"fps: expected a positive number up to 1000, got {fps!r}")
    return fractions.Fraction(value).limit_denominator(1001)


def _check_audio(audio: Any, sample_rate: Any) -> tuple[np.ndarray, int]:
    a = _as_array(audio, "audio")
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


def _frames_of(frames: Any) -> Iterator[np.ndarray]:
    """ndarray (T, H, W, 3) or an iterable of (H, W, 3) frames / (n, H, W, 3) chunks ->
    validated (H, W, 3) uint8 frames of one size."""
    if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
        arr = _as_array(frames, "frames")
        if arr.ndim != 4:
            raise ValueError(f"frames: expected (T, H, W, 3) uint8, got shape {tuple(arr.shape)}")
        frames = [arr]
    elif not isinstance(frames, Iterable):
        kind = type(frames).__name__
        raise ValueError(f"frames: expected an array (T, H, W, 3) or an iterable of frames, got {kind}")
    shape = None
    for item in frames:
        arr = _as_array(item, "frames")
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


def _hidden_sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to ``path`` (created by the writer, so the umask applies)."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.part{suffix}"


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
    ``sample_rate`` Hz) muxed as AAC, padded with silence or cut to the video's length.
    ``.gif``: looping animated GIF, no audio (``audio`` must be None). The file appears only
    when complete; nothing temporary is left behind, also on failure.
    """
    known = None
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        known = frames.shape[0]
    return _write_video(frames, path, fps, audio, sample_rate, crf, known)


def _write_video(
    frames: Any,
    path: str | os.PathLike[str],
    fps: float,
    audio: Any,
    sample_rate: int,
    crf: int,
    num_frames: int | None,
) -> Path:
    """write_video with an optional frame count known in advance (one ffmpeg pass with audio;
    otherwise the video is encoded first and the audio muxed in a second, stream-copy pass)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"path: unsupported video type {out.suffix!r} ({out}); use .mp4 or .gif")
    rate = _check_fps(fps)
    if audio is not None and suffix == ".gif":
        raise ValueError("audio: a .gif cannot carry audio; write .mp4 to keep the sound")
    aud = _check_audio(audio, sample_rate) if audio is not None else None
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 51:
        raise ValueError(f"crf: expected an integer in 0..51, got {crf!r}")
    if not out.parent.is_dir():
        raise ValueError(f"path: directory {out.parent} does not exist")
    stream = _frames_of(frames)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("frames: no frames to write") from None
    h, w = first.shape[:2]
    if suffix == ".mp4" and (h % 2 or w % 2):
        raise ValueError(f"frames: H.264 yuv420p needs even width and height, got {w}x{h}")

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from stream

    parts = [_hidden_sibling(out, suffix)]
    try:
        if suffix == ".gif":
            _write_gif(all_frames(), parts[0], rate, w, h)
        elif aud is None or num_frames is not None:
            _write_mp4(all_frames(), parts[0], rate, w, h, aud, int(crf), num_frames)
        else:  # unknown length: video first, then mux the audio cut to the frames written
            parts.append(_hidden_sibling(out, suffix))
            count = _write_mp4(all_frames(), parts[1], rate, w, h, None, int(crf), None)
            _mux_audio(parts[1], parts[0], rate, aud, count)
        os.replace(parts[0], out)
    finally:
        for part in parts:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
    return out


def _run_ffmpeg(cmd: list[str], frames: Iterator[np.ndarray] | None, what: str) -> int:
    """Run ffmpeg, streaming raw RGB frames into its stdin (if any); returns the frame count.
    stderr goes to an anonymous temporary file (no pipe to fill, nothing left on disk)."""
    count = 0
    with tempfile.TemporaryFile() as log:
        stdin = subprocess.PIPE if frames is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log)
        broken = False
        try:
            if frames is not None:
                assert proc.stdin is not None
                for frame in frames:
                    try:
                        proc.stdin.write(np.ascontiguousarray(frame).tobytes())
                    except BrokenPipeError:
                        broken = True
                        break
                    count += 1
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    proc.stdin.close()
        rc = proc.wait()
        if rc != 0 or broken:
            log.seek(0)
            msg = log.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"ffmpeg failed writing {what} (exit {rc}): {msg or 'no message'}")
    return count


def _fit_audio(audio: tuple[np.ndarray, int], rate: fractions.Fraction, num_frames: int) -> np.ndarray:
    """Pad with silence or cut so the audio lasts exactly num_frames / fps."""
    samples, sr = audio
    n = int(round(num_frames * sr / rate))
    if samples.size >= n:
        return samples[:n]
    return np.concatenate([samples, np.zeros(n - samples.size, np.float32)])


def _audio_input(tmp: str, samples: np.ndarray, sr: int) -> list[str]:
    raw = Path(tmp) / "audio.f32"
    samples.astype("<f4").tofile(raw)
    return ["-f", "f32le", "-ar", str(sr), "-ac", "1", "-i", str(raw)]


_AAC = ["-c:a", "aac", "-b:a", "128k"]


def _write_mp4(
    frames: Iterator[np.ndarray],
    part: Path,
    rate: fractions.Fraction,
    w: int,
    h: int,
    audio: tuple[np.ndarray, int] | None,
    crf: int,
    num_frames: int | None,
) -> int:
    exe = find_ffmpeg()
    encoder = _h264_encoder(exe)
    cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "pipe:0"]
    with tempfile.TemporaryDirectory(prefix="talkmesh-render-") as tmp:
        if audio is not None:
            assert num_frames is not None
            cmd += _audio_input(tmp, _fit_audio(audio, rate, num_frames), audio[1])
            cmd += ["-map", "0:v:0", "-map", "1:a:0", *_AAC]
        else:
            cmd += ["-map", "0:v:0"]
        cmd += ["-c:v", encoder, "-pix_fmt", "yuv420p"]
        if encoder == "libx264":
            cmd += ["-preset", "veryfast", "-crf", str(crf), "-tune", "animation"]
        cmd += ["-movflags", "+faststart", "-f", "mp4", str(part)]
        count = _run_ffmpeg(cmd, frames, part.name)
    if num_frames is not None and count != num_frames:
        raise ValueError(f"frames: expected {num_frames} frames, got {count}")
    return count


def _mux_audio(video: Path, part: Path, rate: fractions.Fraction, audio: tuple[np.ndarray, int], count: int) -> None:
    exe = find_ffmpeg()
    with tempfile.TemporaryDirectory(prefix="talkmesh-render-") as tmp:
        cmd = [exe, "-hide_banner", "-loglevel", "error", "-y", "-i", str(video),
               *_audio_input(tmp, _fit_audio(audio, rate, count), audio[1]),
               "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *_AAC,
               "-movflags", "+faststart", "-f", "mp4", str(part)]
        _run_ffmpeg(cmd, None, part.name)


def _write_gif(frames: Iterator[np.ndarray], part: Path, rate: fractions.Fraction, w: int, h: int) -> None:
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None:
        exe = find_ffmpeg()
        cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "pipe:0",
               "-vf", "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none",
               "-loop", "0", "-f", "gif", str(part)]
        _run_ffmpeg(cmd, frames, str(part.name))
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
    faces (F, 3) or None (point splats). ``gt`` (T', V, 3)
    renders a prediction | ground-truth preview (:func:`side_by_side`; gt is always absolute),
    with the lip error heat map on the prediction when ``heat_region`` (vertex indices) is
    given. ``audio``
    (16 kHz mono float) is muxed for ``.mp4``. Returns ``path``.
    """
    v = _check_vertices(vertices)
    if template is not None:
        tm = _as_array(template, "template")
        if tm.shape != (v.shape[1], 3):
            raise ValueError(f"template: expected shape ({v.shape[1]}, 3), got {tuple(tm.shape)}")
        tm = tm.astype(np.float64)
        if not np.isfinite(tm).all():
            raise ValueError("template: non-finite value (NaN or inf)")
        v = v + tm[None]
    if gt is None:
        if heat_region is not None:
            raise ValueError("heat_region: needs gt (the heat map colours the error against ground truth)")
        frames = iter_frames(v, faces, size, view, background, color, shading=shading)
        num_frames = v.shape[0]
    else:
        frames, num_frames = _comparison_frames(
            v, gt, faces, size, view, background, color, heat_region, heat_vmax, shading
        )
    return _write_video(frames, path, fps, audio, sample_rate, 18, num_frames)
