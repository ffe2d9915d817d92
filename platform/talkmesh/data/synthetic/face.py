"""The corpus's face model: a procedural FLAME-structured head (template, shape and
expression bases, joints, skinning, pose correctives) and its named vertex regions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from talkmesh.data.synthetic.presets import (
    EXPR,
    EXPRESSION_COMPONENTS,
    NUM_EXPR,
    NUM_SHAPE,
    Preset,
    get_preset,
    seeded_rng,
)

__all__ = ["build_face_model"]

_MOUTH_LINE = -0.40  # rad, elevation of the mouth
_LIP_CONTACT = 0.004  # rad, half the gap between the lip rings at rest (face_detail)
_MOUTH_HALF_WIDTH = 0.30  # rad of azimuth, the slit's half width (face_detail)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclasses.dataclass
class _Head:
    """The procedural head mesh and the surface coordinates used to place features."""

    vertices: np.ndarray  # (V, 3) metres; x = subject's left, y up, z forward
    faces: np.ndarray  # (F, 3)
    theta: np.ndarray  # (V,) azimuth, 0 = front, > 0 = subject's left
    phi: np.ndarray  # (V,) elevation
    direction: np.ndarray  # (V, 3) unit direction of the underlying sphere
    mouth_phi: float  # elevation of the mouth line (between two rings)
    rings: np.ndarray  # (n_rings,) ring elevations
    slit: bool = False  # the lips are parted by a slit (Preset.face_detail)

    def bump(self, theta0: float, phi0: float, s_theta: float, s_phi: float) -> np.ndarray:
        """(V,) Gaussian falloff on the surface around (theta0, phi0)."""
        dt = np.angle(np.exp(1j * (self.theta - theta0)))  # wrapped azimuth difference
        return np.exp(-0.5 * ((dt / s_theta) ** 2 + ((self.phi - phi0) / s_phi) ** 2))

    def mirrored(self, amp: float, theta0: float, phi0: float, s_theta: float, s_phi: float) -> np.ndarray:
        """(V,) ``amp`` times the bumps at (theta0, phi0) and at its mirror image (-theta0, phi0)."""
        return amp * (self.bump(theta0, phi0, s_theta, s_phi) + self.bump(-theta0, phi0, s_theta, s_phi))


def _quantiles(
    lo: float, hi: float, density: Any, n: int, open_end: bool = True
) -> np.ndarray:
    """``n`` points in (lo, hi) spaced inversely to ``density`` (inverse CDF on a fine grid).
    ``open_end``: excludes both ends; else includes ``lo`` and steps so the points wrap around."""
    x = np.linspace(lo, hi, 4001)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density(x[1:]) + density(x[:-1])) * np.diff(x))])
    cdf /= cdf[-1]
    q = (np.arange(n) + 1) / (n + 1) if open_end else np.arange(n) / n
    return np.interp(q, cdf, x)


def _mesh_faces(pos: np.ndarray, nr: int, nc: int, cut: np.ndarray | None = None) -> np.ndarray:
    """(F, 3) faces of the ring mesh, wound outwards: quads between consecutive rings
    (wrapping around), fans to the poles. ``cut`` (nr - 1, nc) bool: quads left out (the
    mouth slit; quad (i, j) spans rings i, i + 1 and columns j, j + 1)."""
    idx = np.arange(nr * nc).reshape(nr, nc)
    nxt = np.roll(idx, -1, axis=1)
    keep = np.ones((nr - 1, nc), bool) if cut is None else ~cut
    quads_a, quads_b, quads_c, quads_d = idx[:-1][keep], nxt[:-1][keep], nxt[1:][keep], idx[1:][keep]
    tris = [
        np.stack([quads_a, quads_b, quads_c], -1).reshape(-1, 3),
        np.stack([quads_a, quads_c, quads_d], -1).reshape(-1, 3),
        np.stack([np.full(nc, nr * nc), nxt[0], idx[0]], -1),  # bottom pole
        np.stack([np.full(nc, nr * nc + 1), idx[-1], nxt[-1]], -1),  # top pole
    ]
    faces = np.concatenate(tris).astype(np.int64)
    tri = pos[faces]  # (F, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("fc,fc->f", normal, tri.mean(1)) < 0
    faces[inward] = faces[inward][:, ::-1]  # outward winding
    return faces


def _head_mesh(preset: Preset) -> _Head:
    """Latitude/longitude head, denser at the front and around the equator. Vertex order:
    ring by ring from the bottom, then the bottom and top poles. With ``face_detail`` the
    readable face's relief and the mouth slit replace the coarse relief."""
    nr, nc = preset.n_rings, preset.n_columns
    rings = _quantiles(-0.5 * np.pi, 0.5 * np.pi, lambda x: 1.0 + 3.0 * np.exp(-(((x + 0.2) / 0.45) ** 2)), nr)
    cols = _quantiles(-np.pi, np.pi, lambda x: 1.0 + 4.0 * np.exp(-((x / 0.6) ** 2)), nc, open_end=False)
    cols[1:] = 0.5 * (cols[1:] - cols[1:][::-1])  # exactly mirror-symmetric: column j <-> n - j, -pi at 0
    phi = np.concatenate([np.repeat(rings, nc), [-0.5 * np.pi, 0.5 * np.pi]])
    theta = np.concatenate([np.tile(cols, nr), [0.0, 0.0]])

    # The mouth line lies midway between the two rings around -0.40 rad.
    below = int(np.searchsorted(rings, _MOUTH_LINE)) - 1
    below = min(max(below, 0), nr - 2)
    mouth_phi = float(0.5 * (rings[below] + rings[below + 1]))
    if preset.face_detail:  # across the mouth the two lip rings close in on the line: the lips meet at rest
        pinch = _smoothstep(_MOUTH_HALF_WIDTH + 0.25, _MOUTH_HALF_WIDTH, np.abs(theta))
        for ring, side in ((below, -1.0), (below + 1, 1.0)):
            on = slice(ring * nc, (ring + 1) * nc)
            phi[on] += pinch[on] * (mouth_phi + side * _LIP_CONTACT - phi[on])
    d = np.stack([np.cos(phi) * np.sin(theta), np.sin(phi), np.cos(phi) * np.cos(theta)], axis=1)  # (V, 3)
    head = _Head(np.zeros((0, 3)), np.zeros((0, 3), np.int64), theta, phi, d, mouth_phi, rings, preset.face_detail)

    radii = np.array([0.075, 0.105, 0.092])
    pos = d * radii
    pos[:, 0] *= 1.0 - 0.12 * _smoothstep(-0.2, -0.9, phi) * _smoothstep(0.6, 0.0, np.abs(np.cos(theta)) - 0.4)
    neck = _smoothstep(-0.9, -1.4, phi)  # narrow neck at the bottom
    pos[:, [0, 2]] *= (1.0 - 0.4 * neck)[:, None]
    pos += ((_detailed_relief if head.slit else _coarse_relief)(head))[:, None] * d
    head.vertices = pos
    cut = None
    if head.slit:  # the mouth slit: no quads between the two lip rings across the mouth's width
        cut = np.zeros((nr - 1, nc), bool)
        inside = np.abs(cols) < _MOUTH_HALF_WIDTH
        cut[below] = inside & np.roll(inside, -1)
    head.faces = _mesh_faces(pos, nr, nc, cut)
    return head


def _coarse_relief(head: _Head) -> np.ndarray:
    """(V,) radial relief in metres of the coarse head (the ``small`` preset's)."""
    pair = head.mirrored
    return (
        0.020 * head.bump(0.0, -0.08, 0.10, 0.16)  # nose
        + 0.006 * head.bump(0.0, head.mouth_phi, 0.28, 0.08)  # lips
        + 0.010 * head.bump(0.0, -0.85, 0.25, 0.12)  # chin
        - pair(0.006, 0.40, 0.12, 0.14, 0.09)  # eye sockets
        + pair(0.004, 0.38, 0.30, 0.25, 0.06)  # brow ridge
        + pair(0.004, 0.55, -0.25, 0.2, 0.2)  # cheeks
        + pair(0.007, 0.5 * np.pi, 0.0, 0.12, 0.2)  # ears
    )


def _detailed_relief(head: _Head) -> np.ndarray:
    """(V,) radial relief in metres of the readable face (``Preset.face_detail``): eyeballs in
    sockets under lids and brows, a nose with bridge, tip and wings, full lips rolling in to
    the mouth slit, a chin with the fold above it, cheekbones and ears."""
    m = head.mouth_phi
    pair = head.mirrored

    eyes = (
        pair(-0.014, 0.42, 0.11, 0.20, 0.11)  # sockets
        + pair(0.012, 0.42, 0.10, 0.11, 0.055)  # eyeballs
        + pair(0.003, 0.42, 0.15, 0.12, 0.018)  # upper lids
        + pair(0.0015, 0.42, 0.055, 0.11, 0.015)  # lower lids
        + pair(0.007, 0.40, 0.27, 0.22, 0.05)  # brow ridges
    )
    nose = (
        0.010 * head.bump(0.0, 0.0, 0.06, 0.14)  # bridge
        + 0.012 * head.bump(0.0, -0.09, 0.09, 0.11)  # body
        + 0.020 * head.bump(0.0, -0.18, 0.075, 0.055)  # tip
        + pair(0.008, 0.12, -0.22, 0.05, 0.04)  # wings
    )
    mouth = (
        0.006 * head.bump(0.0, m + 0.05, 0.22, 0.045)  # upper lip
        + 0.007 * head.bump(0.0, m - 0.055, 0.20, 0.05)  # lower lip
        - 0.003 * head.bump(0.0, m, 0.26, 0.012)  # the lips roll in to the slit
        - pair(0.003, _MOUTH_HALF_WIDTH, m, 0.05, 0.04)  # corners
    )
    lower = (
        0.013 * head.bump(0.0, -0.70, 0.20, 0.09)  # chin
        - 0.004 * head.bump(0.0, m - 0.14, 0.22, 0.03)  # the fold between lower lip and chin
        + pair(0.006, 0.62, 0.0, 0.18, 0.12)  # cheekbones
        + pair(0.012, 0.5 * np.pi, 0.02, 0.08, 0.16)  # ears
    )
    return eyes + nose + mouth + lower


def _region_masks(head: _Head) -> dict[str, np.ndarray]:
    """Named vertex index sets (FLAME_masks.pkl keys). lips and forehead U eye_region are disjoint."""
    th, ph, m = head.theta, head.phi, head.mouth_phi
    spacing = float(np.max(np.diff(head.rings[np.abs(head.rings - m) < 0.5]))) if head.rings.size > 1 else 0.2
    lip_h = max(0.12, 0.6 * spacing)
    lips = (np.abs(th) <= 0.36) & (np.abs(ph - m) <= lip_h)
    eye_l = (np.abs(th - 0.40) <= 0.26) & (np.abs(ph - 0.14) <= 0.17)
    eye_r = (np.abs(th + 0.40) <= 0.26) & (np.abs(ph - 0.14) <= 0.17)
    eyes = eye_l | eye_r
    forehead = (np.abs(th) <= 0.8) & (ph > 0.31) & (ph <= 0.95) & ~eyes
    nose = (np.abs(th) <= 0.2) & (ph > m + lip_h) & (ph < 0.0) & ~lips
    chin = (np.abs(th) <= 0.5) & (ph < m - lip_h) & (ph >= m - 0.6)
    face = (np.abs(th) <= 1.0) & (ph >= -1.0) & (ph <= 0.95)
    scalp = (ph > 0.95) | ((np.abs(th) > 1.6) & (ph > -0.9))
    neck = ph < -1.0
    where = {
        "lips": lips,
        "upper_lip": lips & (ph > m),
        "lower_lip": lips & (ph < m),
        "forehead": forehead,
        "eye_region": eyes,
        "left_eye_region": eye_l,
        "right_eye_region": eye_r,
        "nose": nose,
        "chin": chin,
        "face": face,
        "scalp": scalp,
        "neck": neck,
    }
    return {k: np.nonzero(v)[0].astype(np.int64) for k, v in where.items()}


def _expression_basis(head: _Head, rng: np.random.Generator) -> np.ndarray:
    """(V, 3, 50) expression displacements in metres per unit coefficient."""
    th, ph, m = head.theta, head.phi, head.mouth_phi
    pos = head.vertices
    nv = pos.shape[0]
    upper = (ph > m).astype(float)
    lower = 1.0 - upper
    side = np.tanh(th / 0.15)  # +1 on the subject's left, -1 on the right
    mouth = head.bump(0.0, m, 0.35, 0.15)
    basis = np.zeros((nv, 3, NUM_EXPR))

    def put(k: int, dx: Any = 0.0, dy: Any = 0.0, dz: Any = 0.0) -> None:
        basis[:, 0, k] += dx
        basis[:, 1, k] += dy
        basis[:, 2, k] += dz

    lip_lo = head.bump(0.0, m - 0.06, 0.30, 0.12) * lower
    lip_up = head.bump(0.0, m + 0.06, 0.30, 0.10) * upper
    put(EXPR["jaw_open"], dy=-0.003 * lip_lo + 0.001 * lip_up - 0.001 * head.bump(0.0, -0.8, 0.3, 0.2),
        dz=-0.0005 * lip_lo)
    put(EXPR["lip_round"], dx=-0.15 * pos[:, 0] * mouth, dz=0.004 * mouth)
    corners = head.mirrored(1.0, 0.30, m + 0.02, 0.15, 0.12)
    cheeks = head.mirrored(1.0, 0.5, -0.2, 0.2, 0.15)
    put(EXPR["smile"], dx=0.003 * side * corners, dy=0.004 * corners + 0.002 * cheeks,
        dz=-0.001 * corners + 0.0015 * cheeks)
    brows = head.mirrored(1.0, 0.38, 0.30, 0.3, 0.12) + 0.5 * head.bump(0.0, 0.5, 0.6, 0.3)
    put(EXPR["brow_raise"], dy=0.004 * brows)
    lid_up = head.mirrored(1.0, 0.40, 0.18, 0.16, 0.07)
    lid_lo = head.mirrored(1.0, 0.40, 0.08, 0.16, 0.05)
    put(EXPR["blink"], dy=-0.004 * lid_up + 0.001 * lid_lo, dz=0.001 * lid_up)
    press_up = head.bump(0.0, m + 0.05, 0.3, 0.08) * upper
    press_lo = head.bump(0.0, m - 0.05, 0.3, 0.08) * lower
    put(EXPR["lip_press"], dy=-0.002 * press_up + 0.003 * press_lo, dz=-0.0005 * (press_up + press_lo))
    inner = head.mirrored(1.0, 0.18, 0.28, 0.15, 0.10)
    put(EXPR["brow_furrow"], dx=-0.002 * side * inner, dy=-0.003 * inner)
    spread = head.bump(0.0, m, 0.4, 0.12)
    put(EXPR["lip_spread"], dx=0.12 * pos[:, 0] * spread, dz=-0.001 * spread)
    put(EXPR["mouth_asymmetry"], dy=0.003 * side * head.bump(0.0, m, 0.45, 0.15))

    # 9..49: small smooth local deformations around the face.
    for k in range(len(EXPRESSION_COMPONENTS), NUM_EXPR):
        centre_t, centre_p = rng.uniform(-1.0, 1.0), rng.uniform(-0.9, 0.9)
        s_t, s_p = rng.uniform(0.15, 0.35, size=2)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        basis[:, :, k] = 0.0015 * head.bump(centre_t, centre_p, s_t, s_p)[:, None] * direction
    return basis


def _shape_basis(head: _Head, rng: np.random.Generator) -> np.ndarray:
    """(V, 3, 100) smooth identity deformations with decaying amplitude (metres per unit beta)."""
    pos, d = head.vertices, head.direction
    nv = pos.shape[0]
    basis = np.zeros((nv, 3, NUM_SHAPE))
    for axis in range(3):  # width, height, depth
        basis[:, axis, axis] = 0.06 * pos[:, axis]
    for k in range(3, NUM_SHAPE):
        freq = rng.normal(0.0, 2.0, size=(3, 3))  # (terms, 3)
        phase = rng.uniform(0.0, 2 * np.pi, size=3)
        amp = rng.normal(size=(3, 3))  # (terms, xyz)
        field = np.cos(d @ freq.T + phase) @ amp  # (V, 3)
        field /= max(float(np.abs(field).max()), 1e-12)
        basis[:, :, k] = 0.004 * (k - 1) ** -0.6 * field
    return basis


def _skinning_weights(head: _Head) -> np.ndarray:
    """(V, 5) weights: lower lip, chin and lower face follow the jaw; the neck base the root;
    the rest the neck."""
    th, ph, m = head.theta, head.phi, head.mouth_phi
    front = _smoothstep(1.45, 0.9, np.abs(th))
    below = _smoothstep(0.0, 0.03, m - ph)
    if head.slit:  # the lower lip follows the jaw fully mid-mouth, not at the corners: the lips part in an arc
        arc = np.clip(1.0 - (th / _MOUTH_HALF_WIDTH) ** 2, 0.0, 1.0) * (ph < m)
        below = np.maximum(arc, _smoothstep(0.0, 0.1, m - ph))
    w_jaw = below * front * _smoothstep(-1.25, -1.0, ph)
    w_root = _smoothstep(-1.0, -1.3, ph) * (1.0 - w_jaw)
    weights = np.zeros((head.vertices.shape[0], 5))
    weights[:, 0] = w_root
    weights[:, 2] = w_jaw
    weights[:, 1] = 1.0 - w_jaw - w_root
    return weights


def _joint_regressor(head: _Head, p: Preset) -> np.ndarray:
    """(5, V) joints as averages of vertices: root = bottom ring, neck = ring near -1.0 rad,
    jaw = the sides of the head at the hinge (midpoint lies on the midline, behind the mouth),
    eyes = the vertices nearest each eye centre."""
    th, ph = head.theta, head.phi
    nr, nc = p.n_rings, p.n_columns
    ring_of = np.concatenate([np.repeat(np.arange(nr), nc), [-1, -1]])  # poles: -1
    j_reg = np.zeros((5, head.vertices.shape[0]))
    j_reg[0, ring_of == 0] = 1.0
    j_reg[1, ring_of == max(1, int(np.argmin(np.abs(head.rings + 1.0))))] = 1.0

    def nearest(theta0: float, phi0: float, k: int) -> np.ndarray:
        dist = np.abs(np.angle(np.exp(1j * (th - theta0)))) + np.abs(ph - phi0)
        dist[nr * nc :] = np.inf  # never the poles
        return np.argsort(dist, kind="stable")[:k]

    for sign in (1.0, -1.0):
        j_reg[2, nearest(sign * 0.5 * np.pi, -0.25, 2)] = 1.0
    j_reg[3, nearest(0.40, 0.14, 4)] = 1.0
    j_reg[4, nearest(-0.40, 0.14, 4)] = 1.0
    j_reg /= j_reg.sum(1, keepdims=True)
    return j_reg


def _pose_correctives(head: _Head) -> np.ndarray:
    """(V, 3, 36): only the jaw's sin(angle) entry, (R_jaw - I)[2, 1] (pose feature 9 + 7):
    the cheeks bulge a little as the mouth opens."""
    m = head.mouth_phi
    posedirs = np.zeros((head.vertices.shape[0], 3, 36))
    cheek = head.mirrored(1.0, 0.45, m - 0.1, 0.25, 0.2)
    posedirs[:, :, 16] = 0.01 * cheek[:, None] * head.direction
    return posedirs


def build_face_model(preset: str = "small", seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The corpus's FLAME-structured face model.

    Returns ``(arrays, masks)``: ``arrays`` in the FLAME layout for
    ``FlameLayer.from_arrays(**arrays)`` (v_template (V, 3), shapedirs (V, 3, 150) = 100 shape
    | 50 expression, posedirs (V, 3, 36), J_regressor (5, V), weights (V, 5), kintree_table
    (2, 5), f (F, 3), num_shape_components = 100), float32; ``masks`` the named vertex sets.
    """
    p = get_preset(preset)
    head = _head_mesh(p)
    rng = seeded_rng(seed, 1)
    masks = _region_masks(head)
    shapedirs = np.concatenate([_shape_basis(head, rng), _expression_basis(head, rng)], axis=2)
    arrays = {
        "v_template": head.vertices.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": _pose_correctives(head).astype(np.float32),
        "J_regressor": _joint_regressor(head, p).astype(np.float32),
        "weights": _skinning_weights(head).astype(np.float32),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": head.faces,
        "num_shape_components": np.asarray(NUM_SHAPE, dtype=np.int64),
    }
    return arrays, masks
