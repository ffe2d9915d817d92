"""Motion -> glTF 2.0 binary (``.glb``) with morph-target animation, written with pygltflib.

The mesh is the rest face (the template the motion was made on, or the motion's mean), its
triangles and smooth normals; the motion's displacements from it are compressed to at most
``max_targets`` morph targets by an SVD (exact when the motion's rank fits), and one
animation drives the targets' weights with a keyframe per motion frame at ``frame / fps``
seconds, LINEAR between frames, so the clip lasts as long as the audio it was made from.
Every target is scaled so that its weights stay in [-1, 1], which engines that clamp morph
weights accept. Without triangles the vertices are written as a POINTS primitive.

``read_glb`` decodes such a file back to (T, V, 3) vertices, for tests and for users who
want to check what an engine will play.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talkmesh.render.inputs import check_faces, check_fps, check_vertices

__all__ = ["DEFAULT_MAX_TARGETS", "GlbSummary", "read_glb", "write_glb"]

DEFAULT_MAX_TARGETS = 32  # morph targets per mesh; enough for speech motion (see GlbSummary.relative_error)
_FLOAT, _UINT = 5126, 5125  # glTF componentType: FLOAT, UNSIGNED_INT
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_TRIANGLES, _POINTS = 4, 0


@dataclass(frozen=True)
class GlbSummary:
    """What :func:`write_glb` wrote: ``targets`` morph targets for ``frames`` frames at
    ``fps``; ``relative_error`` = max per-frame vertex error of the compressed motion over
    the max displacement (0 when the motion's rank fits the targets)."""

    path: Path
    frames: int
    vertices: int
    targets: int
    fps: float
    seconds: float
    relative_error: float


def _vertex_normals(rest: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals; +z for a vertex no triangle touches."""
    tri = rest[faces]  # (F, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3)
    out = np.zeros_like(rest)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    length = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(length > 0, out / np.maximum(length, 1e-30), np.array([0.0, 0.0, 1.0]))
    return out


def _targets(offsets: np.ndarray, max_targets: int) -> tuple[np.ndarray, np.ndarray, float]:
    """offsets (T, V, 3) -> (basis (K, V, 3), weights (T, K) in [-1, 1], relative error)."""
    t, v, _ = offsets.shape
    flat = offsets.reshape(t, v * 3)
    scale = float(np.abs(flat).max())
    if scale == 0.0:
        return np.zeros((1, v, 3)), np.zeros((t, 1)), 0.0
    u, s, vt = np.linalg.svd(flat, full_matrices=False)  # (T, r), (r,), (r, 3V)
    rank = int((s > s[0] * 1e-7).sum())
    k = max(1, min(max_targets, rank))
    weights = u[:, :k] * s[:k]  # (T, K)
    peak = np.abs(weights).max(axis=0)  # (K,)
    peak[peak == 0] = 1.0
    weights, basis = weights / peak, vt[:k] * peak[:, None]  # weights in [-1, 1]
    error = np.linalg.norm((weights @ basis - flat).reshape(t, v, 3), axis=2).max()
    return basis.reshape(k, v, 3), weights, float(error / np.linalg.norm(offsets, axis=2).max())


class _Buffer:
    """The .glb's one binary buffer and its views/accessors, 4-byte aligned."""

    def __init__(self, gltf: Any) -> None:
        self.gltf, self.data = gltf, bytearray()

    def add(self, arr: np.ndarray, kind: str, component: int, target: int | None, bounds: bool) -> int:
        import pygltflib as g

        raw = arr.tobytes()
        offset = len(self.data)
        self.data += raw + b"\0" * (-len(raw) % 4)
        self.gltf.bufferViews.append(g.BufferView(buffer=0, byteOffset=offset, byteLength=len(raw), target=target))
        count = arr.shape[0]
        acc = g.Accessor(bufferView=len(self.gltf.bufferViews) - 1, componentType=component, count=count, type=kind)
        if bounds:
            two = arr.reshape(count, -1)
            acc.min, acc.max = two.min(axis=0).tolist(), two.max(axis=0).tolist()
        self.gltf.accessors.append(acc)
        return len(self.gltf.accessors) - 1


def write_glb(
    path: str | Path,
    vertices: Any,
    fps: float,
    faces: Any = None,
    rest: Any = None,
    *,
    max_targets: int = DEFAULT_MAX_TARGETS,
    name: str = "talkmesh",
    extras: dict[str, Any] | None = None,
) -> GlbSummary:
    """Write ``vertices`` (T, V, 3) at ``fps`` as an animated ``.glb`` at ``path``.

    ``faces`` (F, 3) vertex indices or None (a POINTS mesh); ``rest`` (V, 3) the face the
    morph targets displace (the template; default: the motion's mean); ``extras`` go into
    the asset's ``extras`` next to fps, frame count and seconds. ValueError naming the
    argument on bad input."""
    import pygltflib as g

    out = Path(path)
    if out.suffix.lower() != ".glb":
        raise ValueError(f"path: a glTF binary must end in .glb, got {out.name!r}")
    if not out.parent.is_dir():
        raise ValueError(f"path: directory {out.parent} does not exist")
    motion = check_vertices(vertices)  # (T, V, 3) float64
    t, v, _ = motion.shape
    rate = float(check_fps(fps))
    tri = check_faces(faces, v)
    base = motion.mean(axis=0) if rest is None else check_vertices(np.asarray(rest)[None], "rest")[0]
    if base.shape != (v, 3):
        raise ValueError(f"rest: expected shape ({v}, 3) to match the motion's vertices, got {base.shape}")
    if not isinstance(max_targets, int) or max_targets < 1:
        raise ValueError(f"max_targets: expected an integer >= 1, got {max_targets!r}")
    basis, weights, rel = _targets(motion - base, max_targets)  # (K, V, 3), (T, K)
    k = basis.shape[0]

    gltf = g.GLTF2(asset=g.Asset(version="2.0", generator="talkmesh"))
    buf = _Buffer(gltf)
    attrs = g.Attributes(POSITION=buf.add(base.astype(np.float32), "VEC3", _FLOAT, _ARRAY_BUFFER, True))
    prim = g.Primitive(attributes=attrs, mode=_POINTS if tri is None else _TRIANGLES)
    if tri is not None:
        attrs.NORMAL = buf.add(_vertex_normals(base, tri).astype(np.float32), "VEC3", _FLOAT, _ARRAY_BUFFER, False)
        prim.indices = buf.add(tri.astype(np.uint32).reshape(-1), "SCALAR", _UINT, _ELEMENT_ARRAY_BUFFER, True)
    prim.targets = [
        g.Attributes(POSITION=buf.add(b.astype(np.float32), "VEC3", _FLOAT, _ARRAY_BUFFER, True)) for b in basis
    ]
    gltf.meshes.append(g.Mesh(name=name, primitives=[prim], weights=[0.0] * k))
    gltf.nodes.append(g.Node(name=name, mesh=0))
    gltf.scenes.append(g.Scene(nodes=[0]))
    gltf.scene = 0
    times = buf.add((np.arange(t) / rate).astype(np.float32), "SCALAR", _FLOAT, None, True)
    values = buf.add(weights.astype(np.float32).reshape(-1), "SCALAR", _FLOAT, None, False)
    gltf.animations.append(
        g.Animation(
            name=f"{name}-speech",
            samplers=[g.AnimationSampler(input=times, output=values, interpolation="LINEAR")],
            channels=[g.AnimationChannel(sampler=0, target=g.AnimationChannelTarget(node=0, path="weights"))],
        )
    )
    gltf.asset.extras = {"fps": rate, "frames": t, "seconds": t / rate, **(extras or {})}
    gltf.buffers.append(g.Buffer(byteLength=len(buf.data)))
    gltf.set_binary_blob(bytes(buf.data))
    gltf.save_binary(str(out))
    return GlbSummary(out, t, v, k, rate, t / rate, rel)


def _accessor(gltf: Any, blob: bytes, index: int) -> np.ndarray:
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype = {_FLOAT: np.float32, _UINT: np.uint32}[acc.componentType]
    width = {"SCALAR": 1, "VEC3": 3}[acc.type]
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    arr = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=start)
    return arr.reshape(acc.count, width) if width > 1 else arr


def read_glb(path: str | Path) -> dict[str, Any]:
    """A .glb written by :func:`write_glb` -> ``{"vertices": (T, V, 3), "faces": (F, 3) or
    None, "times": (T,), "fps", "extras"}``: the rest face plus each keyframe's weighted
    morph targets, as a glTF player evaluates them at the keyframe times."""
    import pygltflib as g

    gltf = g.GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]
    rest = _accessor(gltf, blob, prim.attributes.POSITION).astype(np.float64)  # (V, 3)
    targets = [a["POSITION"] if isinstance(a, dict) else a.POSITION for a in prim.targets]  # dicts once loaded
    basis = np.stack([_accessor(gltf, blob, a) for a in targets]).astype(np.float64)  # (K, V, 3)
    sampler = gltf.animations[0].samplers[0]
    times = _accessor(gltf, blob, sampler.input).astype(np.float64)  # (T,)
    weights = _accessor(gltf, blob, sampler.output).astype(np.float64).reshape(times.shape[0], -1)  # (T, K)
    faces = None if prim.indices is None else _accessor(gltf, blob, prim.indices).reshape(-1, 3).astype(np.int64)
    vertices = rest[None] + np.einsum("tk,kvc->tvc", weights, basis)
    extras = dict(gltf.asset.extras or {})
    return {"vertices": vertices, "faces": faces, "times": times, "fps": extras.get("fps"), "extras": extras}
