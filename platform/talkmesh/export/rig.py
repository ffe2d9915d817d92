"""Motion -> blendshape weights for the user's own rig, written as CSV and JSON.

A rig is its neutral mesh and its blendshape meshes (``.npz`` with ``neutral`` (Vr, 3),
``shapes`` (K, Vr, 3), ``names`` (K,) and optionally ``correspondence`` (Vr,): for each rig
vertex, the index of the talkmesh vertex it follows; without it the rig must have the motion's
topology). Per frame, the weights w in [lower, upper] minimise

    || scale * (motion_t - rest)[corr] - sum_k w_k (shape_k - neutral) ||^2

(bounded linear least squares, :func:`scipy.optimize.lsq_linear`, on the rig's K x K QR
factor so each frame costs K-sized work), so the rig's own neutral face carries the motion's
displacements from the face it was made on. With ``smooth`` > 0 all frames are solved at once
with ``smooth * s * sum_t || w_t - w_{t-1} ||^2`` added (s the mean squared norm of the rig's
blendshapes, so ``smooth`` does not depend on units; two-sided, so the weights do not lag).

The CSV follows the layout of face-capture recordings that engines import (Live Link Face):
``Timecode,BlendShapeCount`` then one column per blendshape. When the rig's names are ARKit
blendshape names (any capitalisation) the 52 ARKit columns and 9 head/eye rotation columns
are written in that layout's order, zero where the rig has no such shape; otherwise the
rig's own names, in its order.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.render.inputs import check_fps, check_vertices

__all__ = ["ARKIT_COLUMNS", "Rig", "RigWeights", "load_rig", "make_rig", "solve_weights", "write_csv", "write_json"]

# The capture CSV's columns after Timecode and BlendShapeCount: 52 ARKit blendshapes, then
# head and eye rotations.
ARKIT_COLUMNS = (
    "EyeBlinkLeft EyeLookDownLeft EyeLookInLeft EyeLookOutLeft EyeLookUpLeft EyeSquintLeft EyeWideLeft "
    "EyeBlinkRight EyeLookDownRight EyeLookInRight EyeLookOutRight EyeLookUpRight EyeSquintRight EyeWideRight "
    "JawForward JawRight JawLeft JawOpen MouthClose MouthFunnel MouthPucker MouthRight MouthLeft "
    "MouthSmileLeft MouthSmileRight MouthFrownLeft MouthFrownRight MouthDimpleLeft MouthDimpleRight "
    "MouthStretchLeft MouthStretchRight MouthRollLower MouthRollUpper MouthShrugLower MouthShrugUpper "
    "MouthPressLeft MouthPressRight MouthLowerDownLeft MouthLowerDownRight MouthUpperUpLeft MouthUpperUpRight "
    "BrowDownLeft BrowDownRight BrowInnerUp BrowOuterUpLeft BrowOuterUpRight CheekPuff CheekSquintLeft "
    "CheekSquintRight NoseSneerLeft NoseSneerRight TongueOut "
    "HeadYaw HeadPitch HeadRoll LeftEyeYaw LeftEyePitch LeftEyeRoll RightEyeYaw RightEyePitch RightEyeRoll"
).split()


@dataclass(frozen=True)
class Rig:
    """neutral (Vr, 3); deltas (K, Vr, 3) = shapes - neutral; names (K,); correspondence
    (Vr,) talkmesh vertex per rig vertex, or None (same topology)."""

    neutral: np.ndarray
    deltas: np.ndarray
    names: tuple[str, ...]
    correspondence: np.ndarray | None = None


@dataclass(frozen=True)
class RigWeights:
    """weights (T, K) per frame for ``names`` at ``fps``; ``residual`` (T,) RMS vertex
    distance between the rig posed with the weights and the motion it was solved for."""

    weights: np.ndarray
    names: tuple[str, ...]
    fps: float
    residual: np.ndarray


def _field(data: Any, key: str, source: str) -> np.ndarray:
    if key not in data:
        raise ValueError(f"{source}: missing array {key!r} (expected neutral, shapes, names[, correspondence])")
    return np.asarray(data[key])


def make_rig(neutral: Any, shapes: Any, names: Any, correspondence: Any = None, source: str = "rig") -> Rig:
    """Checked :class:`Rig` from arrays; ValueError naming ``source`` and the field."""
    n = check_vertices(np.asarray(neutral)[None], f"{source}: neutral")[0]  # (Vr, 3)
    s = check_vertices(shapes, f"{source}: shapes")  # (K, Vr, 3)
    if s.shape[1] != n.shape[0]:
        raise ValueError(f"{source}: shapes have {s.shape[1]} vertices, the neutral mesh {n.shape[0]}")
    labels = tuple(str(x) for x in np.asarray(names).reshape(-1))
    if len(labels) != s.shape[0] or len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"{source}: names must be {s.shape[0]} distinct non-empty strings, one per shape")
    corr = None
    if correspondence is not None:
        corr = np.asarray(correspondence)
        if corr.shape != (n.shape[0],) or corr.dtype.kind not in "iu" or (corr.size and corr.min() < 0):
            raise ValueError(f"{source}: correspondence must be ({n.shape[0]},) non-negative vertex indices")
        corr = corr.astype(np.int64)
    return Rig(n, s - n[None], labels, corr)


def load_rig(path: str | Path) -> Rig:
    """A rig ``.npz`` (neutral, shapes, names[, correspondence]) -> :class:`Rig`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"rig: {p} is not a file")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:  # a corrupt or non-npz file is the user's input error
        raise ValueError(f"rig: {p} is not a readable .npz ({e})") from None
    with data:
        corr = data["correspondence"] if "correspondence" in data else None
        return make_rig(_field(data, "neutral", str(p)), _field(data, "shapes", str(p)), _field(data, "names", str(p)),
                        corr, str(p))  # fmt: skip


def solve_weights(
    vertices: Any,
    rest: Any,
    rig: Rig,
    fps: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    smooth: float = 0.0,
    scale: float = 1.0,
) -> RigWeights:
    """Per-frame bounded weights of ``rig`` for ``vertices`` (T, V, 3) displaced from ``rest``
    (V, 3) (module docstring); ``smooth`` >= 0 pulls each frame towards the previous one, in
    units of the rig's mean squared blendshape norm (so it does not depend on the rig's units)."""
    from scipy.optimize import lsq_linear

    motion = check_vertices(vertices)
    v = motion.shape[1]
    base = check_vertices(np.asarray(rest)[None], "rest")[0]
    if base.shape != (v, 3):
        raise ValueError(f"rest: expected shape ({v}, 3) to match the motion's vertices, got {base.shape}")
    rate = float(check_fps(fps))
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds: expected lower < upper, got {bounds}")
    if not (np.isfinite(smooth) and smooth >= 0) or not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"smooth must be >= 0 and scale > 0, got smooth={smooth}, scale={scale}")
    corr = rig.correspondence
    if corr is None:
        if rig.neutral.shape[0] != v:
            raise ValueError(
                f"rig: {rig.neutral.shape[0]} vertices but the motion has {v}; give a correspondence "
                "(rig vertex -> motion vertex) for a rig of another topology"
            )
        corr = np.arange(v)
    elif corr.max() >= v:
        raise ValueError(f"rig: correspondence indexes vertex {int(corr.max())}, the motion has {v}")
    k = rig.deltas.shape[0]
    a = rig.deltas.reshape(k, -1).T  # (3 Vr, K)
    q, r = np.linalg.qr(a)  # (3 Vr, K), (K, K)
    target = (scale * (motion - base[None])[:, corr]).reshape(motion.shape[0], -1)  # (T, 3 Vr)
    projected = target @ q  # (T, K): the part of each frame the rig can reach
    if smooth > 0:
        weights = _smoothed(r, projected, smooth * float(np.mean(np.sum(a**2, axis=0))), lo, hi)
    else:
        weights = np.stack([lsq_linear(r, b, bounds=(lo, hi), method="bvls").x for b in projected])  # (T, K)
    residual = np.sqrt(((weights @ a.T - target) ** 2).reshape(len(weights), -1, 3).sum(axis=2).mean(axis=1))
    return RigWeights(weights, rig.names, rate, residual)


def _smoothed(r: np.ndarray, projected: np.ndarray, lam: float, lo: float, hi: float) -> np.ndarray:
    """All frames at once: min sum_t ||R w_t - b_t||^2 + lam sum_t ||w_t - w_{t-1}||^2 within
    the bounds, a sparse bounded least-squares problem in T*K unknowns (two-sided, no lag)."""
    import scipy.sparse as sp
    from scipy.optimize import lsq_linear

    t, k = projected.shape
    data = sp.kron(sp.identity(t, format="csr"), sp.csr_matrix(r))  # (T K, T K)
    diff = sp.diags([-np.ones(t - 1), np.ones(t - 1)], [0, 1], shape=(t - 1, t))  # (T-1, T)
    lhs = sp.vstack([data, np.sqrt(lam) * sp.kron(diff, sp.identity(k))]).tocsr()
    rhs = np.concatenate([projected.reshape(-1), np.zeros((t - 1) * k)])
    fit = lsq_linear(lhs, rhs, bounds=(lo, hi), method="trf", lsmr_tol="auto", tol=1e-10)
    return fit.x.reshape(t, k)


def _timecode(frame: int, fps: float) -> str:
    """HH:MM:SS:FF.mmm of ``frame`` at ``fps`` (FF the frame in its second, mmm its fraction)."""
    t = frame / fps
    whole = int(t)
    sub = (t - whole) * round(fps)
    ff = int(sub + 1e-9)
    milli = int(round((sub - ff) * 1000)) % 1000
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}:{ff:02d}.{milli:03d}"


def _columns(result: RigWeights) -> tuple[list[str], np.ndarray]:
    """(column names, (T, C) values) in the ARKit layout when the rig's names are ARKit's."""
    lower = {c.lower(): i for i, c in enumerate(ARKIT_COLUMNS)}
    if all(n.lower() in lower for n in result.names):
        values = np.zeros((result.weights.shape[0], len(ARKIT_COLUMNS)))
        for j, n in enumerate(result.names):
            values[:, lower[n.lower()]] = result.weights[:, j]
        return list(ARKIT_COLUMNS), values
    return list(result.names), result.weights


def write_csv(path: str | Path, result: RigWeights) -> Path:
    """``Timecode,BlendShapeCount,<names...>`` with one row per frame (module docstring)."""
    out = Path(path)
    names, values = _columns(result)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Timecode", "BlendShapeCount", *names])
        for t, row in enumerate(values):
            w.writerow([_timecode(t, result.fps), len(names), *(f"{x:.6f}" for x in row)])
    return out


def write_json(path: str | Path, result: RigWeights) -> Path:
    """``{"fps", "names", "weights": [[...] per frame], "residual_rms": [...]}``."""
    out = Path(path)
    body = {
        "fps": result.fps,
        "names": list(result.names),
        "weights": np.round(result.weights, 6).tolist(),
        "residual_rms": np.round(result.residual, 8).tolist(),
    }
    out.write_text(json.dumps(body))
    return out
