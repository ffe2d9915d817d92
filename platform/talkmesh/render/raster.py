"""Motion -> images: the orthographic camera, a z-buffered triangle rasteriser, shading
(Lambert + Blinn specular, smooth or flat, dark two-sided back faces) and point splats.

Pure numpy (scipy for the vertex-face incidence), headless, one CPU. Triangles are
rasterised all at once per frame: every triangle's pixel bounding box is enumerated as one
flat candidate list, tested with barycentric edge functions and resolved with a per-pixel
z-buffer (``np.maximum.at``), in chunks of at most :data:`CANDIDATE_BUDGET` candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["CANDIDATE_BUDGET", "Camera", "MeshShader", "draw_points", "fit_camera", "rasterize"]

_MARGIN = 0.06  # fraction of the panel left free on each side
# Pixel candidates per rasteriser chunk (~40 MB of temporaries); read at call time, so a test
# may lower it to exercise the chunking.
CANDIDATE_BUDGET = 1 << 20
_LIGHT = np.array([-0.35, 0.45, 1.0]) / np.linalg.norm([-0.35, 0.45, 1.0])  # camera space, y up
_HALF = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + np.array([0.0, 0.0, 1.0]))
_AMBIENT, _DIFFUSE, _SPECULAR, _SHININESS = 0.28, 0.72, 0.12, 24.0

# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------

_ROTATIONS = {
    "front": np.eye(3),
    # Rotate +90 degrees about y: the face (+z) points to image right; we see the subject's right side.
    "side": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
    # The same turn by 35 degrees: the face points to the image's right, its right cheek in view.
    "three_quarter": np.array(
        [
            [math.cos(math.radians(35)), 0.0, math.sin(math.radians(35))],
            [0.0, 1.0, 0.0],
            [-math.sin(math.radians(35)), 0.0, math.cos(math.radians(35))],
        ]
    ),
}


@dataclass(frozen=True)
class Camera:
    """Orthographic: camera space c = R (p - centre) (y up, z towards the viewer);
    pixel x = s c_x + W/2 - 1/2, pixel y = H/2 - 1/2 - s c_y, depth = s c_z (larger = nearer)."""

    rotation: np.ndarray  # (3, 3)
    centre: np.ndarray  # (3,) world-space point at the panel centre
    scale: float  # pixels per world unit
    width: int
    height: int

    def to_camera(self, p: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> camera space (..., 3)."""
        return (p - self.centre) @ self.rotation.T  # (..., 3)

    def to_screen(self, c: np.ndarray) -> np.ndarray:
        """Camera space (..., 3) -> pixel x, pixel y, depth (..., 3)."""
        s = self.scale
        out = np.empty_like(c)
        out[..., 0] = s * c[..., 0] + 0.5 * self.width - 0.5
        out[..., 1] = 0.5 * self.height - 0.5 - s * c[..., 1]
        out[..., 2] = s * c[..., 2]
        return out


def fit_camera(sequences: Sequence[np.ndarray], view: str, width: int, height: int) -> Camera:
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
    return Camera(r, centre_cam @ r, float(scale), width, height)  # r orthonormal: world = c @ r


# --------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------


class _Setup(NamedTuple):
    """Per-frame triangle constants for the triangles that can cover a pixel (F' of them)."""

    ids: np.ndarray  # (F',) index into faces
    coef_w: np.ndarray  # (F', 6) float32: w0 at the box corner and its x, y slopes; the same for w1
    coef_z: np.ndarray  # (F', 3) float32: depth at the box corner and its x, y slopes
    base: np.ndarray  # (F',) int64 pixel index of each bounding box's corner
    box_w: np.ndarray  # (F',) int32 bounding-box width
    count: np.ndarray  # (F',) pixels in each bounding box
    ends: np.ndarray  # (F',) cumulative count


def _setup(screen: np.ndarray, faces: np.ndarray, width: int, height: int) -> _Setup | None:
    """Edge-function and depth coefficients of every triangle with a non-empty pixel box
    (None when there is none). screen (V, 3) pixel x, pixel y, depth; faces (F, 3)."""
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
        return None
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
    coef_z = coef_z.astype(np.float32)  # (F', 3)
    base = (ymin * width + xmin).astype(np.int64)
    count = bw * bh
    return _Setup(ids, coef_w, coef_z, base, bw.astype(np.int32), count, np.cumsum(count))


def _candidates(s: _Setup, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """The pixels inside triangles lo..hi-1 of the setup: per candidate (N,) the triangle
    (index into the setup), its box offsets dx, dy and the barycentric weights w0, w1."""
    done = int(s.ends[lo - 1]) if lo else 0
    cnt = s.count[lo:hi]
    total = int(s.ends[hi - 1]) - done
    t = np.repeat(np.arange(lo, hi, dtype=np.int32), cnt)  # (N,) triangle of each candidate
    off = np.arange(total, dtype=np.int32) - np.repeat((s.ends[lo:hi] - cnt - done).astype(np.int32), cnt)
    wt = s.box_w[t]
    dy = off // wt
    dx = off - dy * wt
    dxf, dyf = dx.astype(np.float32), dy.astype(np.float32)
    c = s.coef_w[t]  # (N, 6)
    w0 = c[:, 0] + c[:, 1] * dxf + c[:, 2] * dyf
    w1 = c[:, 3] + c[:, 4] * dxf + c[:, 5] * dyf
    eps = np.float32(-1e-5)  # shared edges belong to both neighbours; the z-buffer decides
    inside = np.nonzero((w0 >= eps) & (w1 >= eps) & (w0 + w1 <= 1 - eps))[0]
    return t[inside], dx[inside], dy[inside], w0[inside], w1[inside]


def rasterize(screen: np.ndarray, faces: np.ndarray, width: int, height: int) -> tuple[np.ndarray, ...]:
    """Z-buffered triangle coverage. screen (V, 3) pixel x, pixel y, depth; faces (F, 3).
    Returns per pixel (H*W,): triangle id (-1 = empty) and the barycentric weights w0, w1
    of the winning triangle (w2 = 1 - w0 - w1)."""
    npix = width * height
    tri_id = np.full(npix, -1, np.int64)
    bary0 = np.zeros(npix, np.float32)
    bary1 = np.zeros(npix, np.float32)
    s = _setup(screen, faces, width, height)
    if s is None:
        return tri_id, bary0, bary1
    zbuf = np.full(npix, -np.inf, np.float32)
    lo = 0
    while lo < s.ids.size:
        done = int(s.ends[lo - 1]) if lo else 0
        hi = max(int(np.searchsorted(s.ends, done + CANDIDATE_BUDGET, side="right")), lo + 1)
        t, dx, dy, w0, w1 = _candidates(s, lo, hi)
        cz = s.coef_z[t]
        depth = cz[:, 0] + cz[:, 1] * dx.astype(np.float32) + cz[:, 2] * dy.astype(np.float32)
        pix = s.base[t] + dy * width + dx
        np.maximum.at(zbuf, pix, depth)
        win = depth >= zbuf[pix]
        p = pix[win]
        tri_id[p] = s.ids[t[win]]
        bary0[p] = w0[win]
        bary1[p] = w1[win]
        lo = hi
    return tri_id, bary0, bary1


class MeshShader:
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

        tri_id, w0, w1 = rasterize(screen, f, width, height)
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


def draw_points(
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

