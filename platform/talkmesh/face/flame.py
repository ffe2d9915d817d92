"""FLAME-style face layer: parameters (shape, expression, jaw, head pose) -> mesh vertices.

FLAME (Li, Bolkart, Black, Li, Romero, "Learning a model of facial shape and expression
from 4D scans", SIGGRAPH Asia 2017) is a linear-blend-skinned head model:

    v_shaped = v_template + S beta + E psi                      shape + expression blendshapes
    joints   = J_regressor v_shaped                             5 joints: root, neck, jaw, eyes
    v_posed  = v_shaped + P (R(theta)[1:] - I)                  pose-corrective blendshapes
    vertices = sum_j w_vj G_j(theta, joints) v_posed            linear blend skinning

This module is written from that definition; no reference implementation was copied.

Model files (README decision G10). The FLAME 2020 model is licensed, so talkmesh never ships
it: users download ``generic_model.pkl`` from https://flame.is.tue.mpg.de and point
``data.flame_model=/path/to/generic_model.pkl`` at it. That pickle holds chumpy objects and a
scipy sparse matrix; it is read with a restricted unpickler that needs no chumpy and refuses
every class outside a small whitelist. ``convert_pkl_to_npz`` writes the same arrays to a
plain ``.npz`` (loaded with ``allow_pickle=False``). Tests use ``make_surrogate_flame``, a
seeded small mesh with the same structure and parameter sizes.

Deviations from the reference FLAME layers (DEEPTalk/DECA-style ``FLAME`` modules):
- No landmark embedding, translation or eyelid blendshapes: talkmesh only needs vertices.
- Model arrays are registered as non-persistent buffers, so a method's checkpoint never
  embeds the licensed model; the layer is an injected dependency rebuilt from its file.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from talkmesh.data.safepickle import RestrictedUnpickler
from talkmesh.face.lbs import kinematic_transforms, pose_features, rodrigues, skin

__all__ = [
    "FLAME_KEYS",
    "FaceModelError",
    "FlameLayer",
    "convert_pkl_to_npz",
    "make_surrogate_flame",
    "read_flame_arrays",
]

# Arrays a model file must provide (names as in FLAME's generic_model.pkl).
FLAME_KEYS: tuple[str, ...] = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
NUM_JOINTS = 5  # 0 root/global, 1 neck, 2 jaw, 3 left eye, 4 right eye
DEFAULT_NUM_SHAPE_COMPONENTS = 300  # FLAME 2020: shapedirs = 300 shape | 100 expression columns
_ROOT_PARENT_U32 = 4294967295  # how FLAME's kintree_table marks the root's parent

_HOW_TO_GET_FLAME = (
    "The FLAME 2020 model is licensed and not shipped with talkmesh: register and download it from "
    "https://flame.is.tue.mpg.de, then set data.flame_model=/path/to/generic_model.pkl (or an .npz "
    "written by talkmesh.face.flame.convert_pkl_to_npz)."
)


class FaceModelError(ValueError):
    """A face-model file is missing, unreadable, unsafe or does not have the FLAME layout;
    the message names the file, the key and what was expected."""


# --------------------------------------------------------------------------------------
# Restricted unpickling of FLAME's generic_model.pkl (no chumpy needed, nothing executed)
# --------------------------------------------------------------------------------------


class _PickledStub:
    """Inert stand-in for a whitelisted foreign class: records what the pickle hands it."""

    origin: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _PickledStub:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ChumpyStub(_PickledStub):
    """A chumpy object (``chumpy.ch.Ch`` pickles its value under state key ``x``)."""


class _SparseStub(_PickledStub):
    """A scipy.sparse csc/csr matrix, rebuilt from its pickled data/indices/indptr."""

    layout: ClassVar[str] = "csc"


def _stub_class(base: type[_PickledStub], module: str, name: str, **attrs: Any) -> type[_PickledStub]:
    return type(name, (base,), {"origin": f"{module}.{name}", **attrs})


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 pickles), restricted to the stub classes."""
    if isinstance(cls, type) and issubclass(cls, _PickledStub) and base is object:
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as used by protocol < 3 pickles to store bytes; text codecs only."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return codecs.encode(obj, encoding, errors)


_SPARSE_NAMES = {"csc_matrix": "csc", "csr_matrix": "csr", "csc_array": "csc", "csr_array": "csr"}


class _FlameUnpickler(RestrictedUnpickler):
    """The dataset unpickler (numpy arrays, plain containers) plus what a FLAME model pickle
    holds: scipy csc/csr matrices and chumpy objects, both as inert stubs, and Python 2's
    ``copy_reg._reconstructor``; every other global is refused."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self._stubs: dict[tuple[str, str], type[_PickledStub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            return _safe_reconstructor
        if module == "_codecs" and name == "encode":
            return _safe_codecs_encode
        if module in ("builtins", "__builtin__") and name == "object":
            return object  # the base class named by copy_reg._reconstructor
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stub(_ChumpyStub, module, name)
        if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in _SPARSE_NAMES:
            return self._stub(_SparseStub, module, name, layout=_SPARSE_NAMES[name])
        try:
            return super().find_class(module, name)
        except pickle.UnpicklingError:
            raise FaceModelError(
                f"{self.source}: refusing to unpickle {module}.{name}; a FLAME model pickle may only contain "
                "numpy arrays, scipy sparse csc/csr matrices and chumpy arrays"
            ) from None

    def _stub(self, base: type[_PickledStub], module: str, name: str, **attrs: Any) -> type[_PickledStub]:
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _stub_class(base, module, name, **attrs)
        return self._stubs[key]


def _state_dict(stub: _PickledStub) -> dict[str, Any]:
    state = stub.state
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return state if isinstance(state, dict) else {}


def _unstub(value: Any, key: str, source: str) -> Any:
    """Replace stubs by numpy arrays / scipy sparse matrices (recursively for chumpy ``x``)."""
    if isinstance(value, _ChumpyStub):
        state = _state_dict(value)
        if "x" not in state:
            raise FaceModelError(
                f"{source}: key {key!r} is a {value.origin} object without a stored value (state key 'x'); "
                "only plain chumpy arrays (chumpy.ch.Ch) can be read without chumpy. Convert the model "
                "with chumpy installed: np.asarray(model[key]) for every key, then save it as .npz"
            )
        return np.asarray(_unstub(state["x"], key, source))
    if isinstance(value, _SparseStub):
        import scipy.sparse as sp

        state = _state_dict(value)
        shape = state.get("_shape", state.get("shape"))
        try:
            parts = (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"]))
            cls = sp.csc_matrix if value.layout == "csc" else sp.csr_matrix
            return cls(parts, shape=tuple(int(s) for s in shape))
        except (KeyError, TypeError, ValueError) as exc:
            raise FaceModelError(f"{source}: key {key!r} is a corrupt {value.origin}: {exc}") from exc
    if isinstance(value, _PickledStub):
        raise FaceModelError(f"{source}: key {key!r} holds an unsupported object {value.origin}")
    return value


def _read_pkl(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with open(path, "rb") as fh:
            model = _FlameUnpickler(fh, source).load()
    except FaceModelError:
        raise
    except Exception as exc:  # any corrupt-pickle error: EOFError, UnpicklingError, TypeError, ...
        raise FaceModelError(f"{source}: cannot read FLAME model pickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, dict):
        raise FaceModelError(f"{source}: expected a dict of model arrays, got {type(model).__name__}")
    # Only the keys the layer needs are converted; other entries (e.g. chumpy expressions
    # such as 'J') are ignored.
    wanted = (*FLAME_KEYS, "num_shape_components")
    return {k: _unstub(model[k], k, source) for k in wanted if k in model}


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # zip/format errors, object arrays refused by allow_pickle=False
        raise FaceModelError(f"{path}: cannot read FLAME model npz: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _bad(source: str, key: str, arr: np.ndarray, expected: str) -> FaceModelError:
    return FaceModelError(f"{source}: key {key!r} has shape {tuple(arr.shape)}, expected {expected}")


def _float(arrays: Mapping[str, Any], key: str, source: str) -> np.ndarray:
    value = arrays[key]
    if hasattr(value, "toarray"):  # scipy sparse
        value = value.toarray()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FaceModelError(f"{source}: key {key!r} is not a numeric array ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        raise FaceModelError(f"{source}: key {key!r} contains NaN or inf")
    return arr


def _float_shaped(
    arrays: Mapping[str, Any], key: str, source: str, shape: tuple[int, ...], expected: str
) -> np.ndarray:
    """``_float`` of ``arrays[key]``, required to have exactly ``shape`` (described as ``expected``)."""
    arr = _float(arrays, key, source)
    if arr.shape != shape:
        raise _bad(source, key, arr, expected)
    return arr


def _check_v_template(arrays: Mapping[str, Any], source: str) -> np.ndarray:
    """(V, 3) float64 template with at least one vertex."""
    v_template = _float(arrays, "v_template", source)
    if v_template.ndim != 2 or v_template.shape[1] != 3 or v_template.shape[0] < 1:
        raise _bad(source, "v_template", v_template, "(V, 3)")
    return v_template


def _check_kintree(arrays: Mapping[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    """(parents, joint ids), each (J,) int64, with -1 for the root's parent."""
    kin = np.asarray(arrays["kintree_table"])
    if kin.ndim != 2 or kin.shape != (2, NUM_JOINTS) or not np.issubdtype(kin.dtype, np.integer):
        raise FaceModelError(
            f"{source}: key 'kintree_table' has shape {tuple(kin.shape)} dtype {kin.dtype}, expected an "
            f"integer (2, {NUM_JOINTS}) table (FLAME joints: root, neck, jaw, left eye, right eye)"
        )
    parents = kin[0].astype(np.int64)
    parents[(parents < 0) | (parents >= _ROOT_PARENT_U32)] = -1
    ids = kin[1].astype(np.int64)
    if not np.array_equal(ids, np.arange(NUM_JOINTS)):
        raise FaceModelError(f"{source}: key 'kintree_table' row 1 must be joint ids 0..{NUM_JOINTS - 1}, got {ids}")
    if parents[0] != -1 or any(not 0 <= parents[j] < j for j in range(1, NUM_JOINTS)):
        raise FaceModelError(
            f"{source}: key 'kintree_table' parents {kin[0].tolist()} must have joint 0 as the only root "
            "and every other joint's parent before it"
        )
    return parents, ids


def _check_weights(arrays: Mapping[str, Any], source: str, nv: int) -> np.ndarray:
    """(V, J) skinning weights, non-negative with rows summing to 1."""
    weights = _float_shaped(arrays, "weights", source, (nv, NUM_JOINTS), f"(V, J) = ({nv}, {NUM_JOINTS})")
    sums = weights.sum(1)
    if np.any(weights < -1e-6) or np.max(np.abs(sums - 1.0)) > 1e-2:
        raise FaceModelError(
            f"{source}: key 'weights' must be non-negative with rows summing to 1 "
            f"(row sums in [{sums.min():.4f}, {sums.max():.4f}])"
        )
    return weights


def _check_shapedirs(
    arrays: Mapping[str, Any], source: str, nv: int, n_shape: int, n_expr: int
) -> tuple[np.ndarray, int]:
    """((V, 3, K) blendshapes, number of shape columns before the expression columns)."""
    num_shape = int(np.asarray(arrays.get("num_shape_components", DEFAULT_NUM_SHAPE_COMPONENTS)))
    shapedirs = _float(arrays, "shapedirs", source)
    need = num_shape + n_expr
    if n_shape > num_shape:
        raise FaceModelError(
            f"{source}: key 'num_shape_components' is {num_shape}, fewer than the {n_shape} shape "
            "components the layer uses"
        )
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (nv, 3) or shapedirs.shape[2] < need:
        raise _bad(
            source,
            "shapedirs",
            shapedirs,
            f"({nv}, 3, >= {need}): {num_shape} shape columns (num_shape_components"
            f"{'' if 'num_shape_components' in arrays else ', default'}) followed by at least "
            f"{n_expr} expression columns",
        )
    return shapedirs, num_shape


def _check_faces(arrays: Mapping[str, Any], source: str, nv: int) -> np.ndarray:
    """(F, 3) int64 triangles indexing the ``nv`` vertices."""
    faces = np.asarray(arrays["f"])
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise FaceModelError(
            f"{source}: key 'f' has shape {tuple(faces.shape)} dtype {faces.dtype}, expected integer (F, 3)"
        )
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise FaceModelError(f"{source}: key 'f' indexes vertices outside [0, {nv})")
    return faces


def validate_flame_arrays(
    arrays: Mapping[str, Any], source: str = "<arrays>", n_shape: int = 100, n_expr: int = 50
) -> dict[str, np.ndarray]:
    """Check and normalise FLAME model arrays; returns plain numpy arrays.

    Output keys: ``v_template`` (V, 3), ``shapedirs`` (V, 3, K), ``posedirs`` (V, 3, 36),
    ``J_regressor`` (5, V) dense, ``weights`` (V, 5), ``kintree_table`` (2, 5) int64 with -1
    for the root's parent, ``f`` (F, 3) int64, ``num_shape_components`` () int64.
    Raises FaceModelError naming ``source``, the key and what was expected.
    """
    missing = [k for k in FLAME_KEYS if k not in arrays]
    if missing:
        raise FaceModelError(f"{source}: missing key(s) {missing}; a FLAME model needs {list(FLAME_KEYS)}")
    v_template = _check_v_template(arrays, source)  # (V, 3)
    nv = v_template.shape[0]
    parents, ids = _check_kintree(arrays, source)  # (J,), (J,)
    weights = _check_weights(arrays, source, nv)  # (V, J)
    shapedirs, num_shape = _check_shapedirs(arrays, source, nv, n_shape, n_expr)  # (V, 3, K)
    num_pose = 9 * (NUM_JOINTS - 1)
    posedirs = _float_shaped(
        arrays, "posedirs", source, (nv, 3, num_pose), f"(V, 3, 9 * (J - 1)) = ({nv}, 3, {num_pose})"
    )  # (V, 3, 36)
    j_regressor = _float_shaped(
        arrays, "J_regressor", source, (NUM_JOINTS, nv), f"(J, V) = ({NUM_JOINTS}, {nv})"
    )  # (J, V)
    return {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": j_regressor,
        "weights": weights,
        "kintree_table": np.stack([parents, ids]),
        "f": _check_faces(arrays, source, nv),  # (F, 3)
        "num_shape_components": np.asarray(num_shape, dtype=np.int64),
    }


def read_flame_arrays(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Raw model arrays from ``.pkl`` (FLAME generic_model, restricted unpickling) or ``.npz``.

    Not validated; ``FlameLayer.from_file`` and ``convert_pkl_to_npz`` validate.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FaceModelError(f"FLAME model file not found: {p}. {_HOW_TO_GET_FLAME}")
    suffix = p.suffix.lower()
    if suffix == ".pkl":
        return _read_pkl(p)
    if suffix == ".npz":
        return _read_npz(p)
    raise FaceModelError(f"{p}: unknown FLAME model format {suffix!r}; expected .pkl (generic_model.pkl) or .npz")


def convert_pkl_to_npz(pkl: str | os.PathLike[str], npz: str | os.PathLike[str]) -> Path:
    """Convert FLAME's ``generic_model.pkl`` to a pickle-free ``.npz`` with the same keys
    (all shape and expression columns kept, dense J_regressor). Returns the npz path."""
    source = str(Path(pkl).expanduser())
    arrays = validate_flame_arrays(read_flame_arrays(pkl), source=source, n_shape=0, n_expr=0)
    out = Path(npz).expanduser()
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    np.savez(out, **arrays)
    return out


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


class FlameLayer(nn.Module):
    """FLAME linear-blend-skinning layer with ``n_shape`` shape and ``n_expr`` expression
    components (defaults 100 / 50, the talkmesh convention, datasets.md 6.2).

    Construct with ``FlameLayer.from_file(path)`` (.pkl or .npz), ``FlameLayer.from_arrays(**arrays)``
    or ``FlameLayer(arrays)``. Buffers are float32 and non-persistent; move with ``.to(device)``.
    """

    def __init__(
        self, arrays: Mapping[str, Any], *, n_shape: int = 100, n_expr: int = 50, source: str = "<arrays>"
    ) -> None:
        super().__init__()
        if n_shape < 0 or n_expr < 0:
            raise ValueError(f"n_shape and n_expr must be >= 0, got {n_shape}, {n_expr}")
        a = validate_flame_arrays(arrays, source=source, n_shape=n_shape, n_expr=n_expr)
        self.source = source
        self.n_shape = n_shape
        self.n_expr = n_expr
        self.parents: tuple[int, ...] = tuple(int(p) for p in a["kintree_table"][0])
        s0 = int(a["num_shape_components"])
        shapedirs = a["shapedirs"][:, :, :n_shape]  # (V, 3, n_shape)
        exprdirs = a["shapedirs"][:, :, s0 : s0 + n_expr]  # (V, 3, n_expr)
        jreg = a["J_regressor"]  # (J, V)

        def buf(name: str, value: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value), dtype=dtype), persistent=False)

        buf("v_template", a["v_template"])  # (V, 3)
        buf("shapedirs", shapedirs)  # (V, 3, n_shape)
        buf("exprdirs", exprdirs)  # (V, 3, n_expr)
        buf("posedirs", a["posedirs"])  # (V, 3, 36)
        buf("J_regressor", jreg)  # (J, V)
        buf("lbs_weights", a["weights"])  # (V, J)
        buf("faces_idx", a["f"], torch.long)  # (F, 3)
        # Joints are linear in the blendshape coefficients: regress the bases once (float64).
        buf("j_template", jreg @ a["v_template"])  # (J, 3)
        buf("j_shapedirs", np.einsum("jv,vck->jck", jreg, shapedirs))  # (J, 3, n_shape)
        buf("j_exprdirs", np.einsum("jv,vck->jck", jreg, exprdirs))  # (J, 3, n_expr)

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls, *, n_shape: int = 100, n_expr: int = 50, source: str = "<arrays>", **arrays: Any
    ) -> FlameLayer:
        """Layer from model arrays named as in FLAME's generic_model.pkl (see FLAME_KEYS)."""
        return cls(arrays, n_shape=n_shape, n_expr=n_expr, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, n_shape: int = 100, n_expr: int = 50) -> FlameLayer:
        """Layer from FLAME's ``generic_model.pkl`` (read without chumpy, restricted
        unpickling) or from an ``.npz`` conversion."""
        p = Path(path).expanduser()
        return cls(read_flame_arrays(p), n_shape=n_shape, n_expr=n_expr, source=str(p))

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write this layer's model (the ``n_shape`` + ``n_expr`` columns it uses, so
        ``num_shape_components = n_shape``) as a pickle-free npz readable by ``from_file``."""
        out = Path(path).expanduser()
        if out.suffix != ".npz":
            out = out.with_name(out.name + ".npz")
        cpu = {name: t.detach().cpu() for name, t in self.named_buffers()}
        np.savez(
            out,
            v_template=cpu["v_template"].numpy(),
            shapedirs=torch.cat([cpu["shapedirs"], cpu["exprdirs"]], dim=2).numpy(),
            posedirs=cpu["posedirs"].numpy(),
            J_regressor=cpu["J_regressor"].numpy(),
            weights=cpu["lbs_weights"].numpy(),
            kintree_table=np.stack([np.asarray(self.parents, dtype=np.int64), np.arange(NUM_JOINTS)]),
            f=cpu["faces_idx"].numpy(),
            num_shape_components=np.asarray(self.n_shape, dtype=np.int64),
        )
        return out

    # ---- properties --------------------------------------------------------------------

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def faces(self) -> np.ndarray:
        """(F, 3) int64 triangle vertex indices."""
        return self.faces_idx.detach().cpu().numpy()

    def extra_repr(self) -> str:
        return f"source={self.source!r}, vertices={self.num_vertices}, n_shape={self.n_shape}, n_expr={self.n_expr}"

    # ---- forward -----------------------------------------------------------------------

    def _coeffs(
        self, name: str, value: torch.Tensor | None, batch: int, width: int, expand: bool = True
    ) -> torch.Tensor:
        ref = self.v_template
        if value is None:
            return ref.new_zeros(batch, width)
        value = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[1] != width or value.shape[0] not in (1, batch):
            raise ValueError(f"FlameLayer: {name} must be (B, {width}) with B = {batch}, got {tuple(value.shape)}")
        return value.expand(batch, width) if expand else value

    def forward(
        self,
        shape: torch.Tensor | None,
        expression: torch.Tensor,
        jaw: torch.Tensor,
        global_rot: torch.Tensor | None = None,
        neck: torch.Tensor | None = None,
        eyes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Posed vertices (B, V, 3).

        shape (B, n_shape) or (n_shape,) or None (zero identity); expression (B, n_expr);
        jaw (B, 3), global_rot (B, 3), neck (B, 3) axis-angle; eyes (B, 6) = left | right
        axis-angle. None rotations are zero. Full pose = [global, neck, jaw, eye_l, eye_r].
        """
        if expression.ndim != 2:
            raise ValueError(f"FlameLayer: expression must be (B, {self.n_expr}), got {tuple(expression.shape)}")
        batch = expression.shape[0]
        beta = None if shape is None else self._coeffs("shape", shape, batch, self.n_shape, expand=False)  # (B|1, S)
        psi = self._coeffs("expression", expression, batch, self.n_expr)  # (B, n_expr)
        pose = torch.cat(
            [
                self._coeffs("global_rot", global_rot, batch, 3),
                self._coeffs("neck", neck, batch, 3),
                self._coeffs("jaw", jaw, batch, 3),
                self._coeffs("eyes", eyes, batch, 6),
            ],
            dim=1,
        ).view(batch, NUM_JOINTS, 3)  # (B, J, 3)

        v_shaped = self.v_template + torch.einsum("bk,vck->bvc", psi, self.exprdirs)  # (B, V, 3)
        joints = self.j_template + torch.einsum("bk,jck->bjc", psi, self.j_exprdirs)  # (B, J, 3)
        if beta is not None:  # one identity for the whole batch is blended once and broadcast
            v_shaped = v_shaped + torch.einsum("bk,vck->bvc", beta, self.shapedirs)  # (B, V, 3)
            joints = joints + torch.einsum("bk,jck->bjc", beta, self.j_shapedirs)  # (B, J, 3)
        # joints == J_regressor @ v_shaped (regressed bases precomputed)
        rot = rodrigues(pose)  # (B, J, 3, 3)
        v_posed = v_shaped + torch.einsum("bp,vcp->bvc", pose_features(rot), self.posedirs)  # (B, V, 3)
        _, transforms = kinematic_transforms(rot, joints, self.parents)  # (B, J, 3, 4)
        return skin(v_posed, self.lbs_weights, transforms)  # (B, V, 3)

    # ---- numpy conveniences ------------------------------------------------------------

    def vertices_from_params(
        self,
        params: np.ndarray,
        shape: np.ndarray | None = None,
        head_pose: np.ndarray | None = None,
        *,
        chunk_frames: int | None = None,
    ) -> np.ndarray:
        """(T, V, 3) float32 vertices of a FLAME parameter sequence.

        ``params`` (T, n_expr + 3) = expression | jaw axis-angle (FLAME-56 columns 0:53);
        ``shape`` (n_shape,) or (T, n_shape) or None (zero); ``head_pose`` (T, 3) global
        rotation or None. Neck and eyes are zero. With no head pose this is the metric
        convention of datasets.md 6.2. Runs without gradients on the layer's device, in
        chunks of ``chunk_frames`` frames (default: about 1M vertices per chunk).
        """
        params = np.asarray(params, dtype=np.float32)
        width = self.n_expr + 3
        if params.ndim != 2 or params.shape[1] != width:
            raise ValueError(
                f"vertices_from_params: params must be (T, {width}) = expression | jaw, got {params.shape}"
            )
        num_frames = params.shape[0]
        beta = None if shape is None else self._shape_rows(shape, num_frames)  # (1|T, n_shape)
        pose = None
        if head_pose is not None:
            pose = np.asarray(head_pose, dtype=np.float32)  # (T, 3)
            if pose.shape != (num_frames, 3):
                raise ValueError(f"vertices_from_params: head_pose must be ({num_frames}, 3), got {pose.shape}")
        chunk = chunk_frames or max(1, (1 << 20) // max(self.num_vertices, 1))
        return self._vertices_in_chunks(params, beta, pose, chunk)

    def _shape_rows(self, shape: np.ndarray, num_frames: int) -> np.ndarray:
        """``shape`` (n_shape,) or (1|T, n_shape) as float32 (1|T, n_shape); raises on any other shape."""
        beta = np.asarray(shape, dtype=np.float32)
        if beta.ndim == 1:
            beta = beta[None]
        if beta.ndim != 2 or beta.shape[1] != self.n_shape or beta.shape[0] not in (1, num_frames):
            raise ValueError(
                f"vertices_from_params: shape must be ({self.n_shape},) or (T, {self.n_shape}), "
                f"got {np.shape(shape)}"
            )
        return beta

    def _vertices_in_chunks(
        self, params: np.ndarray, beta: np.ndarray | None, pose: np.ndarray | None, chunk: int
    ) -> np.ndarray:
        """(T, V, 3) float32 from validated params (T, n_expr + 3), beta (1|T, n_shape) or None
        and head pose (T, 3) or None, ``chunk`` frames at a time without gradients."""
        num_frames = params.shape[0]
        out = np.empty((num_frames, self.num_vertices, 3), dtype=np.float32)
        device = self.v_template.device
        with torch.no_grad():
            for start in range(0, num_frames, chunk):
                stop = min(start + chunk, num_frames)
                p = torch.from_numpy(params[start:stop]).to(device)  # (b, n_expr + 3)
                b = None
                if beta is not None:
                    b = torch.from_numpy(beta if beta.shape[0] == 1 else beta[start:stop]).to(device)
                g = None if pose is None else torch.from_numpy(pose[start:stop]).to(device)
                verts = self(b, p[:, : self.n_expr], p[:, self.n_expr :], global_rot=g)  # (b, V, 3)
                out[start:stop] = verts.cpu().numpy()
        return out

    def template(self, shape: np.ndarray | None = None) -> np.ndarray:
        """(V, 3) float32 neutral mesh FLAME(beta, zero expression, zero pose)."""
        params = np.zeros((1, self.n_expr + 3), dtype=np.float32)
        return self.vertices_from_params(params, shape)[0]


# --------------------------------------------------------------------------------------
# Seeded surrogate model for tests (README decision G10)
# --------------------------------------------------------------------------------------

_HEAD_RADII = np.array([0.075, 0.10, 0.09])  # metres; x right(subject's left), y up, z forward
_JOINTS = np.array(
    [
        [0.0, -0.09, -0.015],  # root (base of the neck)
        [0.0, -0.06, -0.015],  # neck
        [0.0, -0.015, -0.01],  # jaw
        [0.032, 0.025, 0.065],  # left eye
        [-0.032, 0.025, 0.065],  # right eye
    ]
)
_MOUTH = np.array([0.0, -0.045, 0.08])
_BROW = np.array([0.0, 0.04, 0.08])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _smooth_fields(rng: np.random.Generator, unit: np.ndarray, count: int, terms: int = 4) -> np.ndarray:
    """``count`` random smooth displacement fields on the unit sphere points (V, 3) ->
    (V, 3, count), each a sum of ``terms`` random sinusoids with unit RMS."""
    nv = unit.shape[0]
    out = np.zeros((nv, 3, count))
    for k in range(count):
        freq = rng.normal(0.0, 1.5, size=(terms, 3))  # (terms, 3)
        phase = rng.uniform(0.0, 2 * np.pi, size=terms)
        amp = rng.normal(size=(terms, 3))  # (terms, 3)
        field = np.sin(unit @ freq.T + phase) @ amp  # (V, 3)
        out[:, :, k] = field / max(np.sqrt(np.mean(field**2)), 1e-12)
    return out


def _fibonacci_sphere(num_points: int) -> np.ndarray:
    """(N, 3) evenly spread unit vectors (a Fibonacci sphere): deterministic, all on the convex hull."""
    i = np.arange(num_points) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / num_points)
    azimuth = np.pi * (1.0 + np.sqrt(5.0)) * i
    return np.stack([np.sin(polar) * np.sin(azimuth), np.cos(polar), np.sin(polar) * np.cos(azimuth)], axis=1)


def _outward_hull_faces(unit: np.ndarray) -> np.ndarray:
    """(F, 3) int64 convex-hull triangles of the unit-sphere points (V, 3), wound to face outwards."""
    from scipy.spatial import ConvexHull

    faces = ConvexHull(unit).simplices.astype(np.int64)  # (F, 3)
    tri = unit[faces]  # (F, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("fc,fc->f", normals, tri.mean(1)) < 0
    faces[inward] = faces[inward][:, ::-1]  # outward-facing winding
    return faces


def _surrogate_weights(v_template: np.ndarray) -> np.ndarray:
    """(V, J) skinning weights: lower front face on the jaw, bottom on the neck, the vertex
    nearest each eye on that eye, the rest on the root; rows sum to 1."""
    nv = v_template.shape[0]
    _, y, z = v_template.T
    weights = np.zeros((nv, 5))
    weights[:, 2] = _sigmoid((-0.03 - y) / 0.008) * _sigmoid(z / 0.01)  # jaw: lower front
    weights[:, 1] = _sigmoid((-0.075 - y) / 0.008) * (1.0 - weights[:, 2])  # neck: bottom
    taken: set[int] = set()
    for j in (3, 4):  # the vertex nearest each eye follows that eye
        order = np.argsort(np.linalg.norm(v_template - _JOINTS[j], axis=1))
        idx = int(next(o for o in order if int(o) not in taken))
        taken.add(idx)
        weights[idx] = 0.0
        weights[idx, j] = 1.0
    weights[weights < 1e-3] = 0.0  # sparse like FLAME's: most vertices ignore the jaw entirely
    weights[:, 0] = np.clip(1.0 - weights[:, 1:].sum(1), 0.0, None)
    weights /= weights.sum(1, keepdims=True)
    return weights


def _surrogate_regressor(v_template: np.ndarray) -> np.ndarray:
    """(J, V) J_regressor: normalised Gaussian kernels around the designed joint locations."""
    d2 = ((_JOINTS[:, None, :] - v_template[None]) ** 2).sum(-1)  # (J, V)
    j_regressor = np.exp(-d2 / (2 * 0.04**2))
    j_regressor /= j_regressor.sum(1, keepdims=True)
    return j_regressor


def _surrogate_blendshapes(
    rng: np.random.Generator, unit: np.ndarray, v_template: np.ndarray, num_shape: int, n_expr: int
) -> np.ndarray:
    """(V, 3, num_shape + n_expr) blendshapes: shape fields decay with the component index;
    expression fields are masked to the mouth (first 60%) or the brows/eyes (rest)."""
    decay_s = 0.004 / (1.0 + np.arange(num_shape) / 10.0)
    shape_dirs = _smooth_fields(rng, unit, num_shape) * decay_s  # (V, 3, num_shape)
    mouth = np.exp(-((v_template - _MOUTH) ** 2).sum(1) / (2 * 0.035**2))  # (V,)
    brow = np.exp(-((v_template - _BROW) ** 2).sum(1) / (2 * 0.035**2))  # (V,)
    n_mouth = int(round(0.6 * n_expr))
    mask = np.concatenate([np.repeat(mouth[:, None], n_mouth, 1), np.repeat(brow[:, None], n_expr - n_mouth, 1)], 1)
    decay_e = 0.003 / (1.0 + np.arange(n_expr) / 10.0)
    expr_dirs = _smooth_fields(rng, unit, n_expr) * mask[:, None, :] * decay_e  # (V, 3, n_expr)
    return np.concatenate([shape_dirs, expr_dirs], axis=2)


def make_surrogate_flame(
    num_vertices: int = 64, seed: int = 0, num_shape_components: int = 100, n_expr: int = 50
) -> dict[str, np.ndarray]:
    """A seeded FLAME-structured head model for tests (README G10).

    ``num_vertices`` points on a noisy head-sized ellipsoid (convex-hull triangulation), the
    FLAME joints (root, neck, jaw, left eye, right eye) with FLAME's kinematic tree,
    skinning weights summing to 1 (lower front face on the jaw, bottom on the neck, one
    vertex per eye on that eye, the rest on the root), a J_regressor whose rows sum to 1,
    smooth shape and expression blendshapes (expressions concentrated around the mouth and
    brows) and small pose correctives. Keys and layouts match ``generic_model.pkl`` plus
    ``num_shape_components``; feed them to ``FlameLayer.from_arrays(**arrays)``.
    """
    if num_vertices < 16:
        raise ValueError(f"make_surrogate_flame needs num_vertices >= 16, got {num_vertices}")
    # Draw order (template noise, shape fields, expression fields, pose correctives) fixes the arrays per seed.
    rng = np.random.default_rng(seed)
    unit = _fibonacci_sphere(num_vertices)  # (V, 3)
    v_template = unit * _HEAD_RADII + rng.normal(0.0, 0.002, size=(num_vertices, 3))  # (V, 3)
    shapedirs = _surrogate_blendshapes(rng, unit, v_template, num_shape_components, n_expr)  # (V, 3, S + E)
    posedirs = rng.normal(0.0, 2e-4, size=(num_vertices, 3, 9 * (NUM_JOINTS - 1)))  # (V, 3, 36)
    return {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": _surrogate_regressor(v_template),  # (J, V)
        "weights": _surrogate_weights(v_template),  # (V, J)
        "kintree_table": np.array([[_ROOT_PARENT_U32, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": _outward_hull_faces(unit),  # (F, 3)
        "num_shape_components": np.asarray(num_shape_components, dtype=np.int64),
    }
