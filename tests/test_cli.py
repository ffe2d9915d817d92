"""`talkmesh data inspect` and `talkmesh metrics` on every format, through the real CLI.

The on-disk layouts come from the reader tests' builders (tiny, real file formats).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from talkmesh.cli import main
from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from test_biwi import make_biwi
from test_hdtf import hdtf_root  # noqa: F401 - fixture
from test_mead import mead_root  # noqa: F401 - fixture
from test_vocaset import make_data, write_original, write_processed


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys, fmt: str, root: Path, *extra: str) -> dict:
    code, out, err = run(capsys, "data", "inspect", "--format", fmt, "--root", str(root), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def write_perfect(corpus, split: str, out: Path, offset: float = 0.0) -> int:
    """Ground truth (+ a constant offset on every vertex) as <seq>.npy [T, V*3]."""
    out.mkdir(parents=True, exist_ok=True)
    seqs = corpus.sequences(split)
    for seq in seqs:
        verts = corpus.vertices_of(corpus.load(seq)) + offset
        np.save(out / f"{seq.name}.npy", verts.reshape(verts.shape[0], -1))
    return len(seqs)


def metrics_json(capsys, fmt: str, root: Path, pred: Path, split: str, *extra: str) -> dict:
    code, out, err = run(
        capsys, "metrics", "--pred", str(pred), "--format", fmt, "--root", str(root), "--split", split, "--json", *extra
    )
    assert code == 0, err
    return json.loads(out)


def split_metrics(report: dict, split: str) -> dict:
    return report["splits"][split]["metrics"]


@pytest.mark.parametrize("layout", ["original", "processed"])
def test_vocaset(tmp_path, capsys, layout):
    root = tmp_path / "voca"
    (write_original if layout == "original" else write_processed)(root, make_data())
    summary = inspect_json(capsys, "vocaset", root)
    assert summary["fps"] == 30 and summary["num_vertices"] == 30
    assert set(summary["splits"]) >= {"train", "val", "test", "reference"}
    assert summary["splits"]["test"]["audio_seconds"] > 0 and summary["regions"]["lips"] == 4
    assert inspect_json(capsys, "vocaset", root, "data.fps=60")["fps"] == 60
    corpus = open_corpus(DataConfig(format="vocaset", root=str(root)))
    n = write_perfect(corpus, "test", tmp_path / "pred")
    report = metrics_json(capsys, "vocaset", root, tmp_path / "pred", "test")
    assert report["splits"]["test"]["sequences_scored"] == n
    assert split_metrics(report, "test")["lve"] == 0.0 and split_metrics(report, "test")["fdd"] == 0.0


def test_biwi_offset_gives_hand_value(tmp_path, capsys):
    root = tmp_path / "biwi"
    make_biwi(root)
    summary = inspect_json(capsys, "biwi", root)
    assert summary["fps"] == 25 and "test-B" in summary["splits"]
    corpus = open_corpus(DataConfig(format="biwi", root=str(root)))
    write_perfect(corpus, "test-A", tmp_path / "pred", offset=0.01)  # every vertex moved by (.01,.01,.01)
    report = metrics_json(capsys, "biwi", root, tmp_path / "pred", "test-A")
    assert split_metrics(report, "test-A")["lve"] == pytest.approx(3e-4, rel=1e-3)
    assert split_metrics(report, "test-A")["mve_max_sq"] == pytest.approx(3e-4, rel=1e-3)
    # human-readable table too
    code, out, _ = run(capsys, "metrics", "--pred", str(tmp_path / "pred"), "--format", "biwi", "--root", str(root),
                       "--split", "test-A")
    assert code == 0 and "lve" in out


def test_mead_with_surrogate_flame(tmp_path, capsys, mead_root):  # noqa: F811
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame

    model = tmp_path / "flame.npz"
    FlameLayer.from_arrays(**make_surrogate_flame(num_vertices=30, seed=0)).save_npz(model)
    with open(mead_root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({"lips": np.array([1, 2]), "forehead": np.array([20]), "eye_region": np.array([21])}, f)
    summary = inspect_json(capsys, "mead", mead_root, f"flame_model={model}")
    assert summary["motion"] == "params" and summary["param_dim"] == 53 and summary["num_vertices"] == 30
    corpus = open_corpus(DataConfig(format="mead", root=str(mead_root), flame_model=str(model)))
    n = write_perfect(corpus, "test", tmp_path / "pred")
    report = metrics_json(capsys, "mead", mead_root, tmp_path / "pred", "test", f"flame_model={model}")
    assert report["splits"]["test"]["sequences_scored"] == n
    assert split_metrics(report, "test")["lve"] == pytest.approx(0, abs=1e-12)


def test_hdtf(tmp_path, capsys, hdtf_root):  # noqa: F811
    with open(hdtf_root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({"lips": np.array([2, 3]), "forehead": np.array([10, 11]), "eye_region": np.array([12])}, f)
    extra = ("hdtf_train_ids=2", "hdtf_val_ids=1")
    summary = inspect_json(capsys, "hdtf", hdtf_root, *extra)
    assert summary["fps"] == 25 and "test-B" in summary["splits"] and summary["notes"]
    corpus = open_corpus(DataConfig(format="hdtf", root=str(hdtf_root), hdtf_train_ids=2, hdtf_val_ids=1))
    split = next(s for s in ("test-A", "test-B") if corpus.sequences(s))
    write_perfect(corpus, split, tmp_path / "pred")
    report = metrics_json(capsys, "hdtf", hdtf_root, tmp_path / "pred", split, *extra)
    assert split_metrics(report, split)["lve"] == 0.0


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "data", "inspect", "--format", "biwi", "--root", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err and "Traceback" not in err
    root = tmp_path / "biwi"
    make_biwi(root)
    (root / "templates.pkl").write_bytes(b"not a pickle")
    code, _, err = run(capsys, "data", "inspect", "--format", "biwi", "--root", str(root))
    assert code == 2 and "templates.pkl" in err
    code, _, err = run(capsys, "data", "inspect", "--format", "biwi", "--root", str(root), "fsp=25")
    assert code == 2 and "fsp" in err
    code, _, err = run(capsys, "metrics", "--pred", str(tmp_path / "none"), "--format", "biwi", "--root", str(root))
    assert code == 2


def test_synthetic_inspect_and_condition_protocol(tmp_path, capsys):
    """metrics.md 12.9 on the synthetic corpus: 8 condition files per Test-B sequence; the
    pooled LVE equals the frame-weighted mean of the per-condition LVEs."""
    root = tmp_path / "synth"
    code, out, err = run(capsys, "data", "synth", "--out", str(root), "--preset", "small", "--seed", "1")
    assert code == 0, err
    assert "test-B" in out
    summary = inspect_json(capsys, "synthetic", root)
    assert summary["fps"] == 25 and len(summary["train_subjects"]) == 8
    corpus = open_corpus(DataConfig(format="synthetic", root=str(root)))
    pred = tmp_path / "pred"
    pred.mkdir()
    seqs = corpus.sequences("test-B")
    for k, cond in enumerate(corpus.info.train_subjects):  # condition k: every vertex off by 1e-3 * (k + 1)
        for seq in seqs:
            verts = corpus.vertices_of(corpus.load(seq)) + np.float32(1e-3 * (k + 1))
            np.save(pred / f"{seq.name}_condition_{cond}.npy", verts.reshape(verts.shape[0], -1))
    assert len(list(pred.glob("*.npy"))) == 8 * len(seqs)
    report = metrics_json(capsys, "synthetic", root, pred, "test-B")
    conditions = report["splits"]["test-B"]["conditions"]
    assert len(conditions["conditions"]) == 8
    per_cond = [conditions["per_condition"][c]["lve"] for c in corpus.info.train_subjects]
    np.testing.assert_allclose(per_cond, [3 * (1e-3 * (k + 1)) ** 2 for k in range(8)], rtol=1e-3)
    # every condition covers the same frames, so the frame-weighted mean is the plain mean
    assert split_metrics(report, "test-B")["lve"] == pytest.approx(np.mean(per_cond), rel=1e-6)
