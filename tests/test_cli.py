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


# --------------------------------------------------------------------------------------
# talkmesh evaluate: a registered (or saved) model scored on the user's copy of a corpus
# --------------------------------------------------------------------------------------

EVAL_DATA = ("--format", "synthetic")  # the small synthetic corpus (with max_conditions=2 after the options)


@pytest.fixture(scope="module")
def published(tmp_path_factory, one_intra_op_thread):
    """A debug FaceFormer registered as talkmesh-faceformer version 1 @published in a SQLite
    store of its own (and saved as a method directory), as `talkmesh import` leaves it. The
    synthetic corpus comes from the session's private cache, as in the tests (a module fixture
    runs before the autouse ``_private_cache``)."""
    import torch

    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.ops import tracking
    from talkmesh.train.checkpoint import save_method

    mp = pytest.MonkeyPatch()
    mp.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))
    root = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    corpus = open_corpus(DataConfig(format="synthetic", max_conditions=2))
    torch.manual_seed(0)
    method = build_method("faceformer", None, DataFacts.from_corpus(corpus), preset="debug").eval()
    with torch.no_grad():  # off its initialisation (a zero output layer would ignore the audio and the style)
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run_id = tracking.start_run("talkmesh-faceformer", "import-debug", uri=uri)
    version = tracking.register_model("faceformer", run_id, method, uri=uri)
    tracking.set_alias("faceformer", "published", version, uri=uri)
    tracking.end_run(run_id, uri=uri)
    yield {"uri": uri, "version": version, "method": method, "corpus": corpus, "dir": save_method(root / "m", method)}
    mp.undo()


def evaluate(capsys, published, model: str, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixture printed (MLflow's registration lines)
    return run(capsys, "evaluate", "--method", "faceformer", "--model", model, *EVAL_DATA,
               "--tracking-uri", published["uri"], *extra, "max_conditions=2")


def runs_in(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_evaluate_alias_prints_and_writes_what_evaluate_method_returns(tmp_path, capsys, published):
    from talkmesh.eval.evaluate import evaluate_method

    out_json, pred = tmp_path / "metrics.json", tmp_path / "pred"
    before = len(runs_in(published["uri"]))
    code, out, err = evaluate(capsys, published, "published", "--split", "test-B", "--limit", "2",
                              "--output", str(out_json), "--save-predictions", str(pred))
    assert code == 0, err
    want = evaluate_method(published["method"], published["corpus"], "test-B", limit=2)
    report = json.loads(out_json.read_text())
    assert report["model"]["version"] == published["version"] and report["model"]["alias"] == "published"
    assert list(report["splits"]) == ["test-B"]
    got = report["splits"]["test-B"]
    assert got["metrics"] == want["metrics"] and got["unseen"]["min"] == want["unseen"]["min"]
    assert got["conditions"] == want["conditions"] and len(want["conditions"]) == 2
    assert want["unseen"]["min"]["lve"] < want["unseen"]["max"]["lve"]  # the style matters: the weights were used
    assert f"{want['metrics']['lve']:.4e}" in out and "test-B min over conditions" in out
    assert len(list((pred / "test-B").glob("*.npy"))) == want["predictions"]
    assert len(runs_in(published["uri"])) == before  # evaluation only: nothing logged without --log


def test_evaluate_version_number_defaults_to_the_test_splits(capsys, published):
    code, out, err = evaluate(capsys, published, str(published["version"]), "--limit", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert tuple(report["splits"]) == published["corpus"].info.eval_splits == ("test-A", "test-B")
    assert report["model"]["uri"] == f"models:/talkmesh-faceformer/{published['version']}"


def test_evaluate_a_method_directory_and_the_methods_own_metrics(capsys, published, monkeypatch):
    from talkmesh.eval.evaluate import evaluate_method
    from talkmesh.methods.faceformer import FaceFormer

    monkeypatch.setattr(FaceFormer, "method_metric_names", ("clips_seen",))
    monkeypatch.setattr(FaceFormer, "method_metrics", lambda self, clips: {"clips_seen": float(len(clips))})
    code, out, err = evaluate(capsys, published, str(published["dir"]), "--split", "test-A", "--limit", "2", "--json")
    assert code == 0, err
    got = json.loads(out)["splits"]["test-A"]
    want = evaluate_method(published["method"], published["corpus"], "test-A", limit=2)
    assert got["metrics"] == want["metrics"] and got["method"] == want["method"] == {"clips_seen": 2.0}
    code, out, err = evaluate(capsys, published, str(published["dir"]), "--split", "test-A", "--limit", "2")
    assert code == 0 and "test-A: clips_seen = 2" in out


def test_evaluate_log_links_the_run_to_the_model_version(capsys, published):
    from mlflow import MlflowClient

    code, out, err = evaluate(capsys, published, "published", "--split", "test-B", "--limit", "1", "--json", "--log")
    assert code == 0, err
    report = json.loads(out)
    client = MlflowClient(tracking_uri=published["uri"], registry_uri=published["uri"])
    run = client.get_run(report["run_id"])
    mv = client.get_model_version("talkmesh-faceformer", str(published["version"]))
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_experiment_by_name(
        "talkmesh-faceformer").experiment_id
    assert run.data.tags["talkmesh.model_uri"] == f"models:/talkmesh-faceformer/{published['version']}"
    assert run.data.tags["talkmesh.model_run_id"] == mv.run_id and run.data.tags["talkmesh.model_alias"] == "published"
    assert run.data.metrics["test/test-B/lve"] == report["splits"]["test-B"]["metrics"]["lve"]
    model_id = report["model"]["model_id"]  # the logged model the version was registered from
    assert model_id and mv.source == f"models:/{model_id}"
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic"]
    model_metrics = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert model_metrics["test/test-B/lve"] == report["splits"]["test-B"]["metrics"]["lve"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--model", "nosuch"), ["--model nosuch", "talkmesh-faceformer", "published"]),
        (("--model", "99"), ["--model 99", "version 99", "published"]),
        (("--model", "published", "--split", "test-C"), ["--split test-C", "test-B"]),
        (("--model", "published", "--root", "/nonexistent/3D-HDTF"), ["--root /nonexistent/3D-HDTF", "directory"]),
        (("--model", "./no-such-dir"), ["--model ./no-such-dir", "method.json"]),
        (("--model", "published", "--output", "/nonexistent/m.json"), ["--output /nonexistent/m.json", "folder"]),
    ],
    ids=["alias", "version", "split", "root", "directory", "output"],
)
def test_evaluate_user_errors_exit_2_naming_the_option(capsys, published, args, needles):
    uri = published["uri"]
    code, _, err = run(capsys, "evaluate", "--method", "faceformer", *EVAL_DATA, "--tracking-uri", uri, *args)
    assert code == 2 and "Traceback" not in err and err.count("talkmesh: error:") == 1, err  # (MLflow's progress bars)
    for needle in needles:
        assert needle in err, (needle, err)


def test_evaluate_refuses_a_model_of_other_data(tmp_path, capsys, published):
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.train.checkpoint import save_method

    facts = DataFacts(fps=30.0, num_vertices=12, train_subjects=published["method"].facts.train_subjects)
    save_method(tmp_path / "m30", build_method("faceformer", None, facts, preset="debug"))
    code, _, err = evaluate(capsys, published, str(tmp_path / "m30"))
    assert code == 2 and "Traceback" not in err
    assert "fps 30.0 vs 25.0" in err and "vertices 12 vs" in err and "--model" in err


def test_evaluate_unknown_format_missing_store_and_weights_file(tmp_path, capsys, monkeypatch, published):
    with pytest.raises(SystemExit) as ex:  # argparse: exit 2, "invalid choice" naming --format
        main(["evaluate", "--method", "faceformer", "--model", "published", "--format", "nope"])
    assert ex.value.code == 2 and "--format" in capsys.readouterr().err
    missing = tmp_path / "none" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    code, _, err = run(capsys, "evaluate", "--method", "faceformer", "--model", "published", *EVAL_DATA)
    assert code == 2 and str(missing) in err and "MLFLOW_TRACKING_URI" in err and not missing.exists()
    weights = tmp_path / "vocaset.pth"
    weights.write_bytes(b"")
    code, _, err = run(capsys, "evaluate", "--method", "faceformer", "--model", str(weights), *EVAL_DATA)
    assert code == 2 and "talkmesh import faceformer" in err
