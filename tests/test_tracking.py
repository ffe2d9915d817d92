"""talkmesh.ops.tracking on a real MLflow SQLite store: child runs, the dataset input, the
models-from-code pyfunc (logged, registered, loaded and unwrapped) and load_model_state for
run and registry URIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.methods.base import DataFacts
from talkmesh.methods.registry import build_method
from talkmesh.ops import tracking
from talkmesh.train.checkpoint import MODEL_FILE, save_method

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def store(root: Path) -> str:
    """A SQLite store in ``root`` whose experiment keeps its artifacts there too (not in ./mlruns)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("talkmesh-faceformer", (root / "artifacts").as_uri())
    return uri


@pytest.fixture(scope="module")
def corpus():
    return open_corpus(DataConfig(format="synthetic"))  # generated once into the test cache


@pytest.fixture(scope="module")
def registered(corpus, tmp_path_factory):
    """A debug FaceFormer logged in run ``weights`` (checkpoint artifact + registered model v1 @champion)."""
    root = tmp_path_factory.mktemp("tracking")
    uri = store(root)
    torch.manual_seed(0)
    method = build_method("faceformer", None, DataFacts.from_corpus(corpus), preset="debug")
    ckpt = save_method(root / "epoch-0000", method)
    run_id = tracking.start_run("talkmesh-faceformer", "weights", uri=uri)
    tracking.log_artifacts(run_id, ckpt, "checkpoints/epoch-0000", uri=uri)
    version = tracking.register_model("faceformer", run_id, method, uri=uri)
    tracking.set_alias("faceformer", "champion", version, uri=uri)
    tracking.end_run(run_id, uri=uri)
    return {"uri": uri, "run_id": run_id, "version": version, "method": method, "ckpt": ckpt}


def test_child_runs_and_the_dataset_input(corpus, tmp_path):
    from mlflow import MlflowClient

    uri = store(tmp_path)
    parent = tracking.start_run("talkmesh-faceformer", "sweep", uri=uri)
    kids = [tracking.start_run("talkmesh-faceformer", f"trial-{i}", parent_run_id=parent, uri=uri) for i in range(3)]
    tracking.end_run(kids[1], "KILLED", uri=uri)
    found = tracking.child_runs(parent, uri=uri)
    assert [c["run_id"] for c in found] == kids and [c["run_name"] for c in found] == ["trial-0", "trial-1", "trial-2"]
    assert [c["status"] for c in found] == ["RUNNING", "KILLED", "RUNNING"]
    assert tracking.child_runs(kids[0], uri=uri) == []

    fingerprint = tracking.log_dataset(kids[0], corpus, uri=uri)
    tracking.log_dataset(kids[0], corpus, uri=uri)  # again (a resumed run): still one input
    run = MlflowClient(tracking_uri=uri).get_run(kids[0])
    assert run.info.status == "RUNNING", "logging the input leaves the run's status alone"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == fingerprint == tracking.dataset_fingerprint(corpus)
    assert inp.dataset.name == corpus.info.format and str(corpus.info.root) in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_a_dataset_input_that_loses_the_insert_race_is_added_to_the_winners_row(corpus, tmp_path, monkeypatch):
    """Two trials log the same corpus at once: both find no dataset row, the first inserts it
    and the second's insert breaks the unique key. The second run still gets its input, on the
    one row; an error of another kind is not retried."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.dbmodels.models import SqlDataset
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = store(tmp_path)
    winner, loser = (tracking.start_run("talkmesh-faceformer", f"trial-{i}", uri=uri) for i in range(2))
    real = SqlAlchemyStore._log_inputs_impl
    calls = []

    def race_once(self, experiment_id, run_id, dataset_inputs=None, models=None):  # noqa: ANN001, ANN202
        calls.append(run_id)
        if len(calls) == 1:  # the winner inserts between the loser's lookup and its insert
            real(self, experiment_id, winner, dataset_inputs, models)
            d = dataset_inputs[0].dataset
            with self.ManagedSessionMaker(read_only=False) as session:
                session.add(SqlDataset(dataset_uuid="0" * 32, experiment_id=int(experiment_id), name=d.name,
                                       digest=d.digest, dataset_source_type=d.source_type, dataset_source=d.source))
        return real(self, experiment_id, run_id, dataset_inputs, models)

    monkeypatch.setattr(SqlAlchemyStore, "_log_inputs_impl", race_once)
    fingerprint = tracking.log_dataset(loser, corpus, uri=uri)
    assert calls == [loser, loser], "the lost race is retried once"
    client = MlflowClient(tracking_uri=uri)
    (won,), (lost,) = (client.get_run(r).inputs.dataset_inputs for r in (winner, loser))
    assert won.dataset.digest == lost.dataset.digest == fingerprint
    experiment = client.get_experiment_by_name("talkmesh-faceformer").experiment_id
    with SqlAlchemyStore(uri, str(tmp_path / "artifacts")).ManagedSessionMaker() as session:
        assert session.query(SqlDataset).filter(SqlDataset.experiment_id == int(experiment)).count() == 1

    def refuse(self, experiment_id, run_id, dataset_inputs=None, models=None):  # noqa: ANN001, ANN202
        calls.append(run_id)
        raise MlflowException("the store is read-only")

    monkeypatch.setattr(SqlAlchemyStore, "_log_inputs_impl", refuse)
    calls.clear()
    with pytest.raises(MlflowException, match="read-only"):
        tracking.log_dataset(winner, corpus, uri=uri)
    assert calls == [winner], "other errors are not retried"


def test_registered_pyfunc_is_logged_from_code_and_unwraps_to_the_method(registered, corpus):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    uri, method = registered["uri"], registered["method"]
    assert MlflowClient(tracking_uri=uri).get_run(registered["run_id"]).info.status == "FINISHED"
    module, facts, config = tracking.load_registered("faceformer", "champion", uri=uri)
    assert facts == method.facts and config == method.config and not module.training
    for k, v in method.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k

    clip = corpus.load(corpus.sequences("val")[0])
    tmpl = corpus.template(clip.subject).astype(np.float32)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/talkmesh-faceformer@champion")
    out = pyfunc.predict({"audio": clip.audio.astype(np.float32), "template": tmpl}, params={"style": 0})
    want = method.eval().generate(clip.audio, tmpl, 0)["vertices"].detach().numpy()
    np.testing.assert_allclose(out["vertices"], want, rtol=0, atol=1e-6)
    assert pyfunc.unwrap_python_model().loaded.info["method"] == "faceformer"


@pytest.mark.parametrize("kind", ["run", "run-file", "alias", "version"])
def test_load_model_state_from_run_and_registry_uris(registered, kind):
    uri, v = registered["uri"], registered["version"]
    source = {
        "run": f"runs:/{registered['run_id']}/checkpoints/epoch-0000",
        "run-file": f"runs:/{registered['run_id']}/checkpoints/epoch-0000/{MODEL_FILE}",
        "alias": "models:/talkmesh-faceformer@champion",
        "version": f"models:/talkmesh-faceformer/{v}",
    }[kind]
    state = tracking.load_model_state(source, uri=uri)
    want = torch.load(Path(registered["ckpt"]) / MODEL_FILE, weights_only=True)
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "source", ["runs:/{run_id}/checkpoints/missing", "models:/talkmesh-faceformer@nobody", "models:/talkmesh-none/1"]
)
def test_load_model_state_names_the_uri_and_what_was_expected(registered, source):
    source = source.format(run_id=registered["run_id"])
    with pytest.raises(FileNotFoundError, match="expected") as err:
        tracking.load_model_state(source, uri=registered["uri"])
    assert source in str(err.value)


def test_fluent_calls_leave_the_callers_tracking_uri_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; tracking's fluent calls must not leave it changed."""
    import os

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = store(tmp_path)
    parent = tracking.start_run("talkmesh-faceformer", "p", uri=uri)
    assert tracking.child_runs(parent, uri=uri) == []
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and "MLFLOW_REGISTRY_URI" not in os.environ
    assert tracking.tracking_uri() == elsewhere


def test_models_registered_by_stop_7_load_through_their_method_directory(registered, tmp_path, monkeypatch):
    """Stop 7 logged its pyfunc with code importing ``talkmesh.tracking`` (since moved to
    ``talkmesh.ops``): such a registered model still loads, from the method directory in it."""
    import importlib
    import sys
    import types

    import mlflow.pyfunc

    code = tmp_path / "talkmesh_pyfunc.py"
    lines = ["import mlflow.models", "from talkmesh.tracking import TalkmeshPyfunc"]
    lines.append("mlflow.models.set_model(TalkmeshPyfunc())")
    code.write_text("\n".join(lines) + "\n")
    old = types.ModuleType("talkmesh.tracking")  # present while logging, as it was then
    old.TalkmeshPyfunc = importlib.import_module("talkmesh.ops.pyfunc_model").TalkmeshPyfunc
    uri = registered["uri"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "talkmesh.tracking", old)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("talkmesh-faceformer").experiment_id):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={tracking.MODEL_ARTIFACT: str(registered["ckpt"])},
                registered_model_name="talkmesh-faceformer",
            )
    assert "talkmesh.tracking" not in sys.modules
    versions = mlflow.MlflowClient(tracking_uri=uri).search_model_versions("name='talkmesh-faceformer'")
    newest = max(int(v.version) for v in versions)
    with pytest.raises(Exception, match="talkmesh.tracking"):
        mlflow.pyfunc.load_model(f"models:/talkmesh-faceformer/{newest}")
    module, facts, config = tracking.load_registered("faceformer", str(newest), uri=uri)
    assert facts == registered["method"].facts and config == registered["method"].config
    for k, v in registered["method"].state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k


def test_artifacts_of_a_sqlite_store_live_beside_it_whatever_the_working_directory(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a Ray worker's directory differs from the driver's
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    run_id = tracking.start_run("talkmesh-faceformer", "beside", uri=uri)
    (tmp_path / "note.txt").write_text("x")
    tracking.log_artifacts(run_id, tmp_path / "note.txt", "notes", uri=uri)
    assert (tmp_path / "store" / "mlruns").is_dir() and not (tmp_path / "mlruns").exists()
    assert any((tmp_path / "store" / "mlruns").rglob("note.txt"))
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri.startswith((tmp_path / "store").as_uri())


def test_the_run_logger_queues_an_epochs_metrics_and_writes_them_by_the_next_call_or_close(tmp_path):
    from mlflow import MlflowClient

    uri = store(tmp_path)
    run_id = tracking.start_run("talkmesh-faceformer", "queued", uri=uri)
    client = MlflowClient(tracking_uri=uri)
    log = tracking.RunLogger(run_id, uri=uri)
    log.log_metrics({"train/loss": 0.5, "epoch": 0}, step=0)
    log.log_metrics({"train/loss": 0.4, "epoch": 1}, step=1)
    # The second call waited for the first: epoch 0 is written whatever the queue did since.
    assert 0 in {m.step for m in client.get_metric_history(run_id, "train/loss")}
    log.log_metrics({"train/loss": 0.3, "epoch": 2, "val/lve": float("nan")}, step=2)
    log.close()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.4), (2, 0.3)]
    assert log.logged_steps("epoch") == {0, 1, 2}
    assert client.get_metric_history(run_id, "val/lve") == []  # non-finite values are skipped
    tracking.end_run(run_id, uri=uri)

    # What the queued logging raised reaches the caller at the next flush.
    client.delete_run(run_id)
    failing = tracking.RunLogger(run_id, uri=uri)
    failing.log_metrics({"train/loss": 0.2}, step=3)
    with pytest.raises(Exception, match=run_id):
        failing.close()
