"""Tests for talkmesh.face: the FLAME-style LBS layer, its loaders and the seeded surrogate."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.transform import Rotation

from talkmesh.face import FaceModelError, FlameLayer, convert_pkl_to_npz, make_surrogate_flame
from talkmesh.face.lbs import rodrigues

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return make_surrogate_flame(num_vertices=64, seed=0)


@pytest.fixture(scope="module")
def layer(arrays: dict[str, np.ndarray]) -> FlameLayer:
    return FlameLayer.from_arrays(**arrays)


def _zeros(batch: int, layer: FlameLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, layer.n_expr), torch.zeros(batch, 3)


def _rot(rotvec: np.ndarray) -> np.ndarray:
    return Rotation.from_rotvec(rotvec).as_matrix()


# ---- surrogate -------------------------------------------------------------------------


def test_surrogate_structure(arrays: dict[str, np.ndarray]) -> None:
    v = 64
    assert arrays["v_template"].shape == (v, 3)
    assert arrays["shapedirs"].shape == (v, 3, 150)
    assert int(arrays["num_shape_components"]) == 100
    assert arrays["posedirs"].shape == (v, 3, 36)
    assert arrays["J_regressor"].shape == (5, v)
    np.testing.assert_allclose(arrays["J_regressor"].sum(1), 1.0, atol=1e-12)
    assert arrays["weights"].shape == (v, 5)
    np.testing.assert_allclose(arrays["weights"].sum(1), 1.0, atol=1e-12)
    assert (arrays["weights"] >= 0).all()
    for j in range(5):  # every joint drives some vertex
        assert (arrays["weights"][:, j] > 0.5).any()
    assert arrays["kintree_table"][0].tolist() == [4294967295, 0, 1, 1, 1]
    assert arrays["f"].shape[1] == 3 and arrays["f"].max() < v
    again = make_surrogate_flame(num_vertices=64, seed=0)
    other = make_surrogate_flame(num_vertices=64, seed=1)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], again[k])
    assert not np.allclose(arrays["shapedirs"], other["shapedirs"])


def test_face_import_is_light() -> None:
    code = "import sys, talkmesh.face; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- rotations -------------------------------------------------------------------------


def test_rodrigues_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(40, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([[0.0, 1e-9, 1e-6, 1e-4, 1e-3, 0.01, np.pi - 1e-4, np.pi], rng.uniform(0, 3.1, 32)])
    rotvecs = axes * angles[:, None]
    expected = _rot(rotvecs)
    got64 = rodrigues(torch.from_numpy(rotvecs)).numpy()
    np.testing.assert_allclose(got64, expected, atol=1e-12)
    got32 = rodrigues(torch.from_numpy(rotvecs).float()).numpy()
    np.testing.assert_allclose(got32, expected, atol=2e-6)
    # arbitrary leading dims
    assert rodrigues(torch.zeros(2, 3, 4, 3)).shape == (2, 3, 4, 3, 3)


def test_rodrigues_gradients_finite_at_zero() -> None:
    r = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    rodrigues(r).sum().backward()
    assert torch.isfinite(r.grad).all()
    # first-order gradient check around zero and at a generic rotation
    for start in (torch.zeros(2, 3), torch.tensor([[0.3, -0.2, 0.5], [1e-5, 0.0, -2e-5]])):
        x = start.double().requires_grad_(True)
        assert torch.autograd.gradcheck(rodrigues, (x,), eps=1e-7, atol=1e-6)


# ---- the layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_zero_pose_gives_template_plus_shape(arrays: dict[str, np.ndarray], device: str) -> None:
    layer = FlameLayer.from_arrays(**arrays).to(device)
    expr, jaw = _zeros(2, layer)
    out = layer(None, expr.to(device), jaw.to(device)).cpu().numpy()
    np.testing.assert_allclose(out, np.broadcast_to(arrays["v_template"], out.shape), atol=1e-6)

    beta = np.random.default_rng(1).normal(size=100)
    want = arrays["v_template"] + arrays["shapedirs"][:, :, :100] @ beta
    got = layer(torch.tensor(beta[None], device=device), expr[:1].to(device), jaw[:1].to(device))
    np.testing.assert_allclose(got[0].cpu().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(layer.template(beta), want, atol=1e-5)
    np.testing.assert_allclose(layer.template(), arrays["v_template"], atol=1e-6)


def test_expression_uses_columns_after_num_shape_components(arrays: dict[str, np.ndarray]) -> None:
    layer = FlameLayer.from_arrays(**arrays, n_shape=20, n_expr=10)
    psi = np.random.default_rng(2).normal(size=10)
    want = arrays["v_template"] + arrays["shapedirs"][:, :, 100:110] @ psi
    got = layer(None, torch.tensor(psi[None], dtype=torch.float32), torch.zeros(1, 3))
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6)


def _hand_model() -> dict[str, np.ndarray]:
    """5 vertices; jaw joint regressed to vertex 4 = (0.5, 0, 0); vertex 1 fully on the jaw,
    vertex 2 half on the jaw, the rest on the root."""
    v = np.array([[0, 0, 0], [0, -1, 1], [1, 1, 0], [0, 1, 0], [0.5, 0, 0]], dtype=np.float64)
    weights = np.zeros((5, 5))
    weights[:, 0] = 1.0
    weights[1] = [0, 0, 1, 0, 0]
    weights[2] = [0.5, 0, 0.5, 0, 0]
    jreg = np.zeros((5, 5))
    jreg[0, 0] = jreg[1, 0] = jreg[2, 4] = jreg[3, 3] = jreg[4, 3] = 1.0
    return {
        "v_template": v,
        "shapedirs": np.zeros((5, 3, 150)),
        "num_shape_components": np.asarray(100),
        "posedirs": np.zeros((5, 3, 36)),
        "J_regressor": jreg,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
        "f": np.array([[0, 1, 2], [1, 2, 3]], dtype=np.uint32),
    }


def test_jaw_rotation_hand_computed() -> None:
    layer = FlameLayer.from_arrays(**_hand_model())
    jaw = torch.tensor([[np.pi / 2, 0.0, 0.0]])  # +90 deg about x: (x, y, z) -> (x, -z, y)
    out = layer(None, torch.zeros(1, 50), jaw)[0].numpy()
    # vertex 1: (0,-1,1) - j = (-0.5,-1,1) -> (-0.5,-1,-1) -> + j = (0,-1,-1)
    # vertex 2: (1,1,0) - j = (0.5,1,0) -> (0.5,0,1) -> + j = (1,0,1); half-blended with (1,1,0)
    want = np.array([[0, 0, 0], [0, -1, -1], [1, 0.5, 0.5], [0, 1, 0], [0.5, 0, 0]])
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_jaw_moves_only_jaw_vertices(arrays: dict[str, np.ndarray]) -> None:
    no_correctives = dict(arrays, posedirs=np.zeros_like(arrays["posedirs"]))
    for model in (no_correctives, arrays):
        layer = FlameLayer.from_arrays(**model)
        psi = torch.tensor(np.random.default_rng(3).normal(size=(1, 50)), dtype=torch.float32)
        jaw = np.array([0.35, 0.05, -0.02])
        rest = layer(None, psi, torch.zeros(1, 3))[0].double().numpy()  # v_shaped
        out = layer(None, psi, torch.tensor(jaw[None], dtype=torch.float32))[0].double().numpy()
        j = model["J_regressor"][2] @ rest  # jaw joint of the shaped mesh
        rot = _rot(jaw)
        feat = np.zeros(36)
        feat[9:18] = (rot - np.eye(3)).ravel()  # jaw is the 2nd non-root joint
        posed = rest + model["posedirs"] @ feat
        w = model["weights"][:, 2:3]
        want = posed + w * ((posed - j) @ rot.T + j - posed)
        np.testing.assert_allclose(out, want, atol=2e-6)
        if model is no_correctives:
            still = model["weights"][:, 2] == 0
            assert still.any() and (~still).any()
            np.testing.assert_allclose(out[still], rest[still], atol=1e-7)
            assert np.abs(out[~still] - rest[~still]).max() > 1e-3


def test_global_rotation_is_rigid_about_root(layer: FlameLayer, arrays: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(4)
    beta = torch.tensor(rng.normal(size=(1, 100)), dtype=torch.float32)
    psi = torch.tensor(rng.normal(size=(1, 50)), dtype=torch.float32)
    jaw = torch.tensor([[0.2, 0.0, 0.03]])
    g = np.array([0.1, -0.7, 0.25])
    base = layer(beta, psi, jaw)[0].double().numpy()
    rotated = layer(beta, psi, jaw, global_rot=torch.tensor(g[None], dtype=torch.float32))[0].double().numpy()
    v_shaped = layer(beta, psi, torch.zeros(1, 3))[0].double().numpy()
    root = arrays["J_regressor"][0] @ v_shaped
    np.testing.assert_allclose(rotated, (base - root) @ _rot(g).T + root, atol=2e-6)
    # rigid: pairwise distances preserved
    d0 = np.linalg.norm(base[:, None] - base[None], axis=-1)
    d1 = np.linalg.norm(rotated[:, None] - rotated[None], axis=-1)
    np.testing.assert_allclose(d0, d1, atol=2e-6)


def test_eyes_move_only_eye_vertices(layer: FlameLayer, arrays: dict[str, np.ndarray]) -> None:
    model = dict(arrays, posedirs=np.zeros_like(arrays["posedirs"]))
    layer = FlameLayer.from_arrays(**model)
    expr, jaw = _zeros(1, layer)
    eyes = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.0, 0.0]])  # left eye only
    moved = (layer(None, expr, jaw, eyes=eyes) - layer(None, expr, jaw))[0].norm(dim=-1).numpy()
    on_left = model["weights"][:, 3] > 0
    assert (moved[~on_left] < 1e-7).all() and (moved[on_left] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_per_item(layer: FlameLayer, device: str) -> None:
    layer = layer.to(device)
    rng = np.random.default_rng(5)

    def t(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.tensor(rng.normal(size=shape) * scale, dtype=torch.float32, device=device)

    b = 4
    args = (t(b, 100), t(b, 50), t(b, 3, scale=0.3), t(b, 3, scale=0.3), t(b, 3, scale=0.2), t(b, 6, scale=0.2))
    batched = layer(*args)
    assert batched.shape == (b, 64, 3) and batched.dtype == torch.float32
    for i in range(b):
        single = layer(*(a[i : i + 1] for a in args))
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=1e-5)
    layer.to("cpu")


def test_forward_is_differentiable(layer: FlameLayer) -> None:
    psi = torch.zeros(2, 50, requires_grad=True)
    jaw = torch.zeros(2, 3, requires_grad=True)
    layer(None, psi, jaw).square().sum().backward()
    assert torch.isfinite(psi.grad).all() and torch.isfinite(jaw.grad).all()
    assert psi.grad.abs().sum() > 0


def test_buffers_not_in_state_dict(layer: FlameLayer) -> None:
    assert layer.state_dict() == {}  # the (licensed) model never travels inside a checkpoint


def test_vertices_from_params(layer: FlameLayer) -> None:
    rng = np.random.default_rng(6)
    params = rng.normal(size=(11, 53)).astype(np.float32)
    params[:, 50:] *= 0.2
    beta = rng.normal(size=100).astype(np.float32)
    head = (rng.normal(size=(11, 3)) * 0.2).astype(np.float32)

    out = layer.vertices_from_params(params, beta)
    assert out.shape == (11, 64, 3) and out.dtype == np.float32
    want = layer(torch.from_numpy(beta)[None], torch.from_numpy(params[:, :50]), torch.from_numpy(params[:, 50:]))
    np.testing.assert_allclose(out, want.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(layer.vertices_from_params(params, beta, chunk_frames=3), out, atol=1e-7)

    posed = layer.vertices_from_params(params, beta, head_pose=head, chunk_frames=4)
    want = layer(
        torch.from_numpy(beta)[None],
        torch.from_numpy(params[:, :50]),
        torch.from_numpy(params[:, 50:]),
        global_rot=torch.from_numpy(head),
    )
    np.testing.assert_allclose(posed, want.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(
        layer.vertices_from_params(params, None), layer.vertices_from_params(params, np.zeros(100)), atol=1e-7
    )
    assert layer.vertices_from_params(np.zeros((0, 53)), None).shape == (0, 64, 3)
    with pytest.raises(ValueError, match="53"):
        layer.vertices_from_params(params[:, :50], beta)
    with pytest.raises(ValueError, match="shape"):
        layer.vertices_from_params(params, np.zeros(300))
    with pytest.raises(ValueError, match="head_pose"):
        layer.vertices_from_params(params, beta, head_pose=head[:5])


def test_properties(layer: FlameLayer, arrays: dict[str, np.ndarray]) -> None:
    assert layer.num_vertices == 64
    np.testing.assert_array_equal(layer.faces, arrays["f"])
    assert layer.faces.dtype == np.int64


# ---- files -------------------------------------------------------------------------------


def _sample(layer: FlameLayer) -> torch.Tensor:
    rng = np.random.default_rng(7)
    return layer(
        torch.tensor(rng.normal(size=(3, layer.n_shape)), dtype=torch.float32),
        torch.tensor(rng.normal(size=(3, layer.n_expr)), dtype=torch.float32),
        torch.tensor(rng.normal(size=(3, 3)) * 0.3, dtype=torch.float32),
        global_rot=torch.tensor(rng.normal(size=(3, 3)) * 0.3, dtype=torch.float32),
        eyes=torch.tensor(rng.normal(size=(3, 6)) * 0.2, dtype=torch.float32),
    )


def test_npz_round_trip(layer: FlameLayer, tmp_path: Path) -> None:
    path = layer.save_npz(tmp_path / "flame.npz")
    with np.load(path, allow_pickle=False) as z:
        assert int(z["num_shape_components"]) == 100 and z["shapedirs"].shape == (64, 3, 150)
    again = FlameLayer.from_file(path)
    torch.testing.assert_close(_sample(again), _sample(layer), atol=1e-7, rtol=0)
    np.testing.assert_array_equal(again.faces, layer.faces)


def _generic_model_dict(arrays: dict[str, np.ndarray], ch: type) -> dict[str, object]:
    """A dict laid out like FLAME 2020's generic_model.pkl, with chumpy-like objects."""

    class Expression(ch):  # a chumpy expression node: no stored value 'x'
        def __init__(self) -> None:
            self.a = ch(np.zeros(3))

    Expression.__module__ = "chumpy.ch_ops"
    Expression.__qualname__ = Expression.__name__ = "add"
    sys.modules["chumpy.ch_ops"].add = Expression
    return {
        "f": arrays["f"].astype(np.uint32),
        "J_regressor": sp.csc_matrix(arrays["J_regressor"]),
        "kintree_table": arrays["kintree_table"].astype(np.int64),
        "J": Expression(),
        "weights": ch(arrays["weights"]),
        "posedirs": arrays["posedirs"],
        "v_template": ch(arrays["v_template"]),
        "shapedirs": ch(arrays["shapedirs"]),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "num_shape_components": int(arrays["num_shape_components"]),  # the surrogate has 100, not 300
    }


class _Py2Pickler(pickle._Pickler):
    """Writes bytes with Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as in FLAME's
    original pickle; loading them with encoding="latin1" hands numpy a latin-1 ``str``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_fake_chumpy_pickle(
    path: Path, arrays: dict[str, np.ndarray], protocol: int, old_names: bool, py2_strings: bool = False
) -> None:
    """Pickle a generic_model-like dict whose arrays are ``chumpy.ch.Ch`` objects, with fake
    chumpy modules that are removed again, so loading cannot import the real thing."""
    fake = {name: types.ModuleType(name) for name in ("chumpy", "chumpy.ch", "chumpy.ch_ops")}

    class Ch:
        def __init__(self, x: np.ndarray) -> None:
            self.x = np.asarray(x, dtype=np.float64)
            self._dirty_vars = {"x"}  # chumpy's state also holds sets and flags
            self._make_dense = False

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    fake["chumpy.ch"].Ch = Ch
    fake["chumpy"].ch = fake["chumpy.ch"]
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        buf = io.BytesIO()
        pickler = _Py2Pickler(buf, protocol=protocol) if py2_strings else pickle.Pickler(buf, protocol=protocol)
        pickler.dump(_generic_model_dict(arrays, Ch))
        data = buf.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert b"chumpy.ch" in data
    if old_names:  # module paths as written by Python 2 / old numpy and scipy
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        data = data.replace(b"scipy.sparse._csc", b"scipy.sparse.csc")
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("protocol", "old_names", "py2_strings"), [(2, False, False), (2, True, False), (2, True, True), (0, True, False)]
)
def test_fake_chumpy_pickle_round_trip(
    arrays: dict[str, np.ndarray],
    layer: FlameLayer,
    tmp_path: Path,
    protocol: int,
    old_names: bool,
    py2_strings: bool,
) -> None:
    pkl = tmp_path / "generic_model.pkl"
    _write_fake_chumpy_pickle(pkl, arrays, protocol, old_names, py2_strings)
    assert (b"_codecs" in pkl.read_bytes()) != py2_strings
    assert "chumpy" not in sys.modules
    loaded = FlameLayer.from_file(pkl)
    assert "chumpy" not in sys.modules
    assert loaded.num_vertices == 64
    torch.testing.assert_close(_sample(loaded), _sample(layer), atol=1e-7, rtol=0)

    npz = convert_pkl_to_npz(pkl, tmp_path / "generic_model.npz")
    with np.load(npz, allow_pickle=False) as z:
        assert z["shapedirs"].shape == arrays["shapedirs"].shape  # all columns kept
        assert z["J_regressor"].shape == (5, 64)
    torch.testing.assert_close(_sample(FlameLayer.from_file(npz)), _sample(layer), atol=1e-7, rtol=0)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_pickle_with_disallowed_class_is_refused(arrays: dict[str, np.ndarray], tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "system" else _EvalEvil()
    model = {k: v for k, v in arrays.items() if k != "num_shape_components"}
    model["J_regressor"] = sp.csc_matrix(model["J_regressor"])
    model["bs_style"] = evil
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(model, protocol=2))
    with pytest.raises(FaceModelError, match="refusing to unpickle") as err:
        FlameLayer.from_file(pkl)
    assert str(pkl) in str(err.value)
    assert not marker.exists()


def test_corrupt_pickle_and_unknown_suffix(tmp_path: Path) -> None:
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(FaceModelError, match="cannot read"):
        FlameLayer.from_file(bad)
    other = tmp_path / "model.obj"
    other.write_text("v 0 0 0\n")
    with pytest.raises(FaceModelError, match=r"\.pkl"):
        FlameLayer.from_file(other)


def test_missing_file_says_how_to_get_flame(tmp_path: Path) -> None:
    with pytest.raises(FaceModelError, match="data.flame_model") as err:
        FlameLayer.from_file(tmp_path / "nope" / "generic_model.pkl")
    assert "not found" in str(err.value) and "flame.is.tue.mpg.de" in str(err.value)


# ---- validation --------------------------------------------------------------------------


def test_missing_key_named(arrays: dict[str, np.ndarray], tmp_path: Path) -> None:
    partial = {k: v for k, v in arrays.items() if k != "posedirs"}
    with pytest.raises(FaceModelError, match="posedirs"):
        FlameLayer.from_arrays(**partial)
    path = tmp_path / "partial.npz"
    np.savez(path, **partial)
    with pytest.raises(FaceModelError, match="posedirs") as err:
        FlameLayer.from_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("key", "bad", "expected"),
    [
        ("shapedirs", lambda a: a["shapedirs"][:, :, :120], ">= 150"),
        ("weights", lambda a: a["weights"].T, r"\(V, J\)"),
        ("weights", lambda a: a["weights"] * 2.0, "sum"),
        ("posedirs", lambda a: a["posedirs"][:, :, :27], "36"),
        ("J_regressor", lambda a: a["J_regressor"][:, :10], r"\(J, V\)"),
        ("v_template", lambda a: a["v_template"][:, :2], r"\(V, 3\)"),
        ("kintree_table", lambda a: a["kintree_table"][:, :4], "kintree"),
        ("f", lambda a: a["f"] + 1000, "outside"),
        ("num_shape_components", lambda a: np.asarray(50), "num_shape_components"),
    ],
)
def test_wrong_shape_named(arrays: dict[str, np.ndarray], key: str, bad: object, expected: str) -> None:
    broken = dict(arrays, **{key: bad(arrays)})  # type: ignore[operator]
    with pytest.raises(FaceModelError, match=expected) as err:
        FlameLayer.from_arrays(**broken, source="my_model.npz")
    assert key in str(err.value) and "my_model.npz" in str(err.value)


def test_default_num_shape_components_is_300(arrays: dict[str, np.ndarray]) -> None:
    no_key = {k: v for k, v in arrays.items() if k != "num_shape_components"}
    with pytest.raises(FaceModelError, match="default") as err:  # 150 columns < 300 + 50
        FlameLayer.from_arrays(**no_key)
    assert "shapedirs" in str(err.value)
    flame_like = make_surrogate_flame(num_vertices=32, num_shape_components=300, n_expr=100)
    flame_like.pop("num_shape_components")
    layer = FlameLayer.from_arrays(**flame_like)
    psi = np.random.default_rng(8).normal(size=50)
    want = flame_like["v_template"] + flame_like["shapedirs"][:, :, 300:350] @ psi
    got = layer(None, torch.tensor(psi[None], dtype=torch.float32), torch.zeros(1, 3))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_forward_argument_errors(layer: FlameLayer) -> None:
    with pytest.raises(ValueError, match="expression"):
        layer(None, torch.zeros(2, 40), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="jaw"):
        layer(None, torch.zeros(2, 50), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="eyes"):
        layer(None, torch.zeros(2, 50), torch.zeros(2, 3), eyes=torch.zeros(2, 3))
