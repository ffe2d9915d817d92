"""The synthetic corpus's head (talkmesh.data.synthetic.face): the default preset's readable
face (a FLAME-sized mesh, lips parted by a slit that open in an arc with the jaw, eyeballs in
sockets, nose, lips and chin on the profile) and the small preset left as the learning checks
were calibrated on it (a closed coarse head)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from talkmesh.data.synthetic import build_face_model
from talkmesh.data.synthetic.presets import EXPR, JAW_COL, get_preset
from talkmesh.face.flame import FlameLayer

FLAME_VERTICES = 5023  # VOCASET's meshes


@pytest.fixture(scope="module")
def default_face():
    arrays, masks = build_face_model("default")
    return arrays, masks, FlameLayer.from_arrays(**arrays)


def _edges(faces: np.ndarray) -> Counter:
    """How many faces use each undirected edge."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return Counter(map(tuple, e.tolist()))


def _midline(v_template: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The upper and lower lip rings' vertices nearest the midline (x = 0) of the front."""
    out = []
    for name in ("upper_lip", "lower_lip"):
        idx = masks[name]
        y = v_template[idx, 1]
        ring = idx[np.abs(y - (y.min() if name == "upper_lip" else y.max())) < 2e-3]  # the rows at the slit
        out.append(ring[np.argmin(np.abs(v_template[ring, 0]))])
    return out[0], out[1]


def test_default_head_is_flame_sized_and_small_is_the_calibrated_coarse_head(default_face):
    arrays, masks, _ = default_face
    nv = arrays["v_template"].shape[0]
    assert abs(nv - FLAME_VERTICES) / FLAME_VERTICES < 0.01, nv
    assert get_preset("default").face_detail and not get_preset("small").face_detail
    # Regions stay what the metrics need: lips split into upper and lower, disjoint from the
    # upper face, inside the mesh.
    assert np.intersect1d(masks["lips"], np.union1d(masks["forehead"], masks["eye_region"])).size == 0
    assert np.array_equal(np.union1d(masks["upper_lip"], masks["lower_lip"]), masks["lips"])
    assert masks["lips"].size > 100 and max(m.max() for m in masks.values()) < nv

    small, small_masks = build_face_model("small")
    assert small["v_template"].shape == (170, 3) and small_masks["lips"].size == 10
    assert all(n == 2 for n in _edges(small["f"]).values())  # closed: no slit at this resolution


def test_the_lips_are_parted_by_a_slit_that_opens_in_an_arc_with_the_jaw(default_face):
    arrays, masks, layer = default_face
    faces, v0 = arrays["f"], arrays["v_template"]
    # The only boundary of the mesh is the mouth: every open edge joins lip vertices.
    border = [e for e, n in _edges(faces).items() if n == 1]
    assert len(border) > 20 and set(np.unique(border)) <= set(masks["lips"].tolist())
    up, lo = _midline(v0, masks)
    assert 0.0 < v0[up, 1] - v0[lo, 1] < 1.5e-3  # the lips meet at rest

    params = np.zeros((3, 53), np.float32)
    params[1, EXPR["jaw_open"]] = 1.0
    params[1, JAW_COL] = 0.1
    params[2, EXPR["jaw_open"]] = 2.0
    params[2, JAW_COL] = 0.25
    verts = layer.vertices_from_params(params)  # (3, V, 3)
    gap = verts[:, up, 1] - verts[:, lo, 1]
    assert gap[0] < 1.5e-3 < 8e-3 < gap[1] < gap[2], gap  # metres: the mouth opens with the jaw
    # In an arc: the corners of the mouth open much less than its middle.
    rim = np.unique(border)
    nc = get_preset("default").n_columns
    lower = rim[rim // nc == lo // nc]  # the slit's lower edge: the lower lip's ring
    assert lo in lower and 10 < lower.size < rim.size
    corner = lower[np.argmax(np.abs(v0[lower, 0]))]
    assert corner + nc in rim  # the upper lip's vertex above it, on the slit's upper edge
    corner_gap = verts[2, corner + nc, 1] - verts[2, corner, 1]
    assert corner_gap < 0.5 * gap[2], (corner_gap, gap[2])  # 0.37 here


def test_eyes_nose_lips_and_chin_are_where_a_face_has_them(default_face):
    arrays, masks, _ = default_face
    v = arrays["v_template"]
    # The nose tip is the front-most point, above the mouth and below the eyes.
    tip = int(np.argmax(v[:, 2]))
    up, lo = _midline(v, masks)
    eye_y = v[masks["left_eye_region"], 1].mean()
    assert v[up, 1] < v[tip, 1] < eye_y and abs(v[tip, 0]) < 1e-3

    # The midline profile (front half, |x| small), top to bottom: nose, upper lip, the slit,
    # lower lip, the fold under it, the chin: z rises and falls in that order.
    mid = np.nonzero((np.abs(v[:, 0]) < 2e-3) & (v[:, 2] > 0))[0]
    mid = mid[np.argsort(-v[mid, 1])]
    y, z = v[mid, 1], v[mid, 2]

    def z_at(y0: float) -> float:
        return float(np.interp(-y0, -y, z))

    upper_lip_y, lower_lip_y = v[up, 1] + 0.005, v[lo, 1] - 0.005
    fold_y = v[lo, 1] - 0.013
    chin_y = y[np.argmax(np.where(y < fold_y, z, -np.inf))]
    assert z_at(upper_lip_y) > z_at(v[up, 1])  # the lips roll in to the slit
    assert z_at(lower_lip_y) > z_at(v[lo, 1])
    assert z_at(fold_y) < min(z_at(lower_lip_y), z_at(chin_y)) - 1e-3  # a chin stands out below the fold
    assert chin_y < fold_y - 0.01

    # Each eye: an eyeball standing out of its socket. Distance from the head's centre: the
    # eye region's middle stands > 1 mm above the socket 12 mm to either side and 10 mm below.
    r = np.linalg.norm(v, axis=1)
    for side, name in ((1.0, "left_eye_region"), (-1.0, "right_eye_region")):
        eye = masks[name]
        centre = v[eye, :2].mean(0)
        assert 0.02 < side * centre[0] < 0.04 and v[tip, 1] < centre[1] < v[tip, 1] + 0.05

        def near(dx: float, dy: float, eye: np.ndarray = eye, centre: np.ndarray = centre) -> int:
            return int(eye[np.argmin(np.linalg.norm(v[eye, :2] - centre - [dx, dy], axis=1))])

        socket = [near(-0.012, 0.0), near(0.012, 0.0), near(0.0, -0.010)]
        assert r[near(0.0, 0.0)] > r[socket].max() + 1e-3, (r[near(0.0, 0.0)], r[socket])
    left = v[masks["left_eye_region"]]
    mirrored = v[masks["right_eye_region"]] * [-1.0, 1.0, 1.0]
    assert np.allclose(np.sort(left, axis=0), np.sort(mirrored, axis=0), atol=1e-6)
