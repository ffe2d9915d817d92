"""The training loop in Ray Train local mode (num_workers=0), tracked in a real MLflow
sqlite store: metrics, checkpoints, resume, the registry round trip, and that training
learns (the trained debug FaceFormer beats a static template on unseen speakers)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.config import ConfigError, flatten
from talkmesh.data import open_corpus
from talkmesh.eval import metrics as M
from talkmesh.eval.evaluate import (
    condition_subjects,
    eval_sequences,
    evaluate_method,
    save_predictions,
)
from talkmesh.eval.scoring import score_directory
from talkmesh.ops import tracking
from talkmesh.train.checkpoint import (
    METHOD_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TRAINER_FILE,
    list_checkpoints,
    load_method,
    load_trainer_state,
    read_progress,
)
from talkmesh.train.config import ExperimentConfig, load_experiment
from talkmesh.train.runner import run_training

# Debug FaceFormer on the small synthetic corpus, bounded for a 2-CPU machine.
BASE = [
    "preset=debug",
    "data.window_seconds=2.0",
    "train.batch_size=2",
    "train.torch_threads=1",
    "train.system_metrics=false",
    "train.limit_eval_sequences=6",
]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def experiment(tmp, *overrides: str) -> ExperimentConfig:
    return load_experiment(None, [*BASE, f"train.storage_path={tmp / 'ray'}", *overrides])


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch local-mode run shared by the logging and registry tests."""
    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exp = experiment(tmp, "train.epochs=2", "train.run_name=two-epochs", "train.limit_train_batches=8")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the conftest's per-test cache is not set yet
        mp.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))
        t0 = time.perf_counter()
        result = run_training(exp, tracking_uri=uri)
    print(f"2-epoch local-mode run: {time.perf_counter() - t0:.1f} s")
    return exp, result, uri


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_experiment_config_is_strict_and_resolves_the_schedule():
    exp = load_experiment(None, ["preset=debug", "model.d_model=32", "train.lr=0.002"])
    assert exp.method_config().d_model == 32 and exp.method_config().n_heads == 2  # preset kept
    sched = exp.schedule()
    assert (sched.lr, sched.batch_size, sched.epochs) == (0.002, 2, 2)  # lr from train, the rest from the preset
    with pytest.raises(ConfigError, match=r"model.*d_modle"):
        load_experiment(None, ["preset=debug", "model.d_modle=32"])
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        load_experiment(None, ["model.d_model=wide"])
    with pytest.raises(ConfigError, match="preset"):
        load_experiment(None, ["preset=huge"])
    with pytest.raises(ConfigError, match="method"):
        load_experiment(None, ["method=nomethod"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_experiment(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_experiment(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"train\.storage_path.*s3://bucket/ray.*mounts"):
        load_experiment(None, ["train.storage_path=s3://bucket/ray"])
    # The flattened resolved config (the MLflow params) rebuilds the same run.
    again = load_experiment(None, flatten(exp.resolved()))
    assert again.method_config() == exp.method_config() and again.schedule() == sched
    assert again.data == exp.data


def test_bounded_evaluation_subsets():
    subjects = [f"T{i:02d}" for i in range(20)]
    picked = condition_subjects(subjects, 8, seed=3)
    assert len(picked) == 8 and picked == condition_subjects(subjects, 8, seed=3)
    assert picked == [s for s in subjects if s in picked]  # one-hot order
    assert condition_subjects(subjects[:6], 8) == subjects[:6]
    corpus = open_corpus(load_experiment(None, BASE).data)
    few = eval_sequences(corpus, "val", 4)
    assert len(few) == 4
    kinds = {corpus.subject_index(s.subject) >= 0 for s in few}
    assert kinds == {True, False}, "a bounded subset must hold seen and unseen subjects"
    assert eval_sequences(corpus, "val", 0) == corpus.sequences("val")


# --------------------------------------------------------------------------------------
# Training, tracking, checkpoints
# --------------------------------------------------------------------------------------


def test_local_training_logs_metrics_and_checkpoints(trained):
    exp, result, uri = trained
    assert result.epochs == 2 and result.run_name == "two-epochs"
    cks = list_checkpoints(result.run_dir)
    assert [c.epoch for c in cks] == [0, 1] and cks[-1].path.name == "epoch-0001"
    for c in cks:
        for f in (METHOD_FILE, MODEL_FILE, TRAINER_FILE, METRICS_FILE):
            assert (c.path / f).is_file(), f"{c.path} lacks {f}"
    state = load_trainer_state(cks[-1].path)
    assert state["epoch"] == 1 and state["global_step"] == 16
    assert state["optimizer"]["state"], "optimizer moments are saved"
    assert result.best_checkpoint in {str(c.path) for c in cks}
    assert np.isfinite(result.best_metrics["val/lve"])

    client = mlflow_client(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "16" and run.data.params["train.epochs"] == "2"
    assert run.data.params["data.fingerprint"] == tracking.dataset_fingerprint(open_corpus(exp.data))
    assert run.data.tags["talkmesh.dataset_fingerprint"] == run.data.params["data.fingerprint"]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [run.data.params["data.fingerprint"]]
    commit, _ = tracking.git_commit()
    if commit:
        assert run.data.tags["mlflow.source.git.commit"] == commit
    for key in ("train/loss", "train/rec", "val/lve", "val/fdd", "val/mve_max_sq", "val/unseen/lve", "val/seen/lve"):
        history = client.get_metric_history(result.mlflow_run_id, key)
        assert [m.step for m in history] == [0, 1], key
    losses = [m.value for m in client.get_metric_history(result.mlflow_run_id, "train/loss")]
    assert losses[1] < losses[0]
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "checkpoints/epoch-0001")}
    assert "checkpoints/epoch-0001/model.pt" in artifacts


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["train.run_name=resume-me", "train.limit_train_batches=4", "train.limit_eval_sequences=2"]
    first = run_training(experiment(tmp_path, "train.epochs=1", *common), tracking_uri=uri)
    ck0 = list_checkpoints(first.run_dir)
    assert [c.epoch for c in ck0] == [0]
    digest = hashlib.sha256((ck0[0].path / MODEL_FILE).read_bytes()).hexdigest()

    with pytest.warns(UserWarning, match=r"train\.epochs"):  # params are logged once per run
        second = run_training(experiment(tmp_path, "train.epochs=2", *common), tracking_uri=uri)
    assert second.mlflow_run_id == first.mlflow_run_id, "the same run name continues the same MLflow run"
    cks = list_checkpoints(second.run_dir)
    assert [c.epoch for c in cks] == [0, 1]
    # Epoch 0 was not trained again: its checkpoint is untouched and MLflow saw it once.
    assert hashlib.sha256((cks[0].path / MODEL_FILE).read_bytes()).hexdigest() == digest
    history = mlflow_client(uri).get_metric_history(second.mlflow_run_id, "epoch")
    assert sorted(m.step for m in history) == [0, 1]
    assert load_trainer_state(cks[1].path)["global_step"] == 8  # 4 steps before the resume + 4 after
    # Weights continued from epoch 0: training again from scratch for one epoch gives other weights.
    fresh = run_training(experiment(tmp_path, "train.epochs=1", "train.run_name=fresh", *common[1:]), tracking_uri=uri)
    a = torch.load(cks[1].path / MODEL_FILE, weights_only=True)
    b = torch.load(list_checkpoints(fresh.run_dir)[0].path / MODEL_FILE, weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # progress.jsonl: two worker starts (fresh, resumed at epoch 1), each epoch started and ended once.
    events = [(e["event"], e.get("epoch", e.get("start_epoch"))) for e in read_progress(second.run_dir)]
    assert events == [
        ("start", 0), ("epoch_start", 0), ("epoch_end", 0), ("start", 1), ("epoch_start", 1), ("epoch_end", 1)
    ]
    tags = mlflow_client(uri).get_run(second.mlflow_run_id).data.tags
    assert tags["talkmesh.worker_starts"] == "2" and tags["talkmesh.worker_nodes"]


def test_registry_round_trip(trained):
    exp, result, uri = trained
    ckpt = result.selected_checkpoint
    version = tracking.register_model(
        "faceformer", result.mlflow_run_id, method_dir=ckpt, metrics={"val/lve": 1.0}, uri=uri
    )
    assert tracking.get_alias_version("faceformer", "champion", uri=uri) is None
    assert tracking.promote_if_better("faceformer", version, "val/lve", uri=uri)  # no champion yet
    assert tracking.get_alias_version("faceformer", "champion", uri=uri) == version
    worse = tracking.register_model(
        "faceformer", result.mlflow_run_id, method_dir=ckpt, metrics={"val/lve": 2.0}, uri=uri
    )
    assert worse == version + 1
    assert not tracking.promote_if_better("faceformer", worse, "val/lve", uri=uri)
    assert tracking.get_alias_version("faceformer", "champion", uri=uri) == version
    tracking.set_alias("faceformer", "candidate", worse, uri=uri)
    assert tracking.get_alias_version("faceformer", "candidate", uri=uri) == worse

    module, facts, cfg = tracking.load_registered("faceformer", "champion", uri=uri)
    reference = load_method(ckpt).method
    assert cfg == reference.config and facts == reference.facts
    corpus = open_corpus(exp.data)
    clip = corpus.load(corpus.sequences("test-B")[0])
    tmpl = corpus.template(clip.subject)
    want = reference.generate(clip.audio, tmpl, 3)["vertices"]
    got = module.generate(clip.audio, tmpl, 3)["vertices"]
    assert torch.equal(want, got)
    assert not torch.allclose(want, torch.as_tensor(tmpl).expand_as(want)), "the registered model is trained"

    import mlflow.pyfunc

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/talkmesh-faceformer@champion")
    out = pyfunc.predict({"audio": clip.audio.astype(np.float32), "template": tmpl.astype(np.float32)},
                         params={"style": 3})
    np.testing.assert_allclose(out["vertices"], want.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["directory", "mlflow"])
def test_stage_input_weights_come_from_a_checkpoint_or_an_artifact(trained, tmp_path, source):
    """train.init_from: a checkpoint directory or an MLflow URI (never a path in a model)."""
    exp, result, uri = trained
    ckpt = result.selected_checkpoint
    init = ckpt if source == "directory" else f"runs:/{result.mlflow_run_id}/checkpoints/{Path(ckpt).name}"
    run = run_training(
        experiment(tmp_path, "train.epochs=1", "train.lr=1e-12", "train.limit_train_batches=1",
                   "train.limit_eval_sequences=1", "train.run_name=stage", f"train.init_from={init}"),
        tracking_uri=uri if source == "mlflow" else f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    start = torch.load(Path(ckpt) / MODEL_FILE, weights_only=True)
    after = torch.load(Path(run.last_checkpoint) / MODEL_FILE, weights_only=True)
    for k in start:  # one step at lr 1e-12: the weights are the ones loaded
        torch.testing.assert_close(after[k], start[k], rtol=0, atol=1e-9)
    assert torch.count_nonzero(after["motion_decoder.weight"]) > 0  # not the zero-initialised output layer


def test_parameter_corpus_trains_and_validates_on_face_model_vertices(tmp_path):
    """A FLAME-parameter corpus: vertices for the vertex loss and the metrics come from its face model."""
    exp = experiment(tmp_path, "data.synthetic_flavour=flame", "train.epochs=1", "train.limit_train_batches=2",
                     "train.limit_eval_sequences=2", "train.run_name=flame")
    result = run_training(exp, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    m = result.last_metrics
    assert np.isfinite(m["train/loss"]) and np.isfinite(m["val/seen/lve"]) and np.isfinite(m["val/unseen/lve"])


# --------------------------------------------------------------------------------------
# It learns; its saved predictions score the same through `talkmesh metrics`
# --------------------------------------------------------------------------------------


def test_trained_faceformer_beats_a_static_template_on_unseen_speakers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = experiment(tmp_path, "train.epochs=5", "train.eval_every=5", "train.limit_eval_sequences=2",
                     "train.run_name=learn")
    t0 = time.perf_counter()
    result = run_training(exp, tracking_uri=uri)
    train_s = time.perf_counter() - t0
    method = load_method(result.selected_checkpoint).method
    corpus = open_corpus(exp.data)
    t1 = time.perf_counter()
    summary = evaluate_method(method, corpus, "test-B", save_dir=tmp_path / "pred")
    eval_s = time.perf_counter() - t1

    regions = corpus.regions()
    gts, tmpls = [], []
    for seq in corpus.sequences("test-B"):
        clip = corpus.load(seq)
        gts.append(corpus.vertices_of(clip))
        tmpls.append(corpus.template(seq.subject))
    static = M.evaluate_sequences([np.repeat(m[None], g.shape[0], 0) for g, m in zip(gts, tmpls, strict=True)],
                                  gts, tmpls, regions.lips, regions.upper)
    lve = summary["metrics"]["lve"]
    print(f"\ntest-B LVE: trained {lve:.4e} vs static template {static['lve']:.4e} "
          f"(ratio {lve / static['lve']:.2f}); per condition min {summary['unseen']['min']['lve']:.4e} "
          f"max {summary['unseen']['max']['lve']:.4e}; train {train_s:.1f} s, eval {eval_s:.1f} s")
    assert summary["sequences"] == 16 and summary["predictions"] == 16 * 8
    assert summary["conditions"] == list(corpus.info.train_subjects)
    assert lve < 0.6 * static["lve"]
    assert summary["unseen"]["max"]["lve"] < static["lve"]  # every condition beats the static face

    report = score_directory(corpus, tmp_path / "pred", split="test-B")
    scored = report["splits"]["test-B"]
    assert scored["predictions_scored"] == 16 * 8 and not scored["missing"]
    for m in ("lve", "fdd", "mve_max_sq"):
        assert scored["metrics"][m] == pytest.approx(summary["metrics"][m], rel=1e-9, abs=1e-15)
    assert scored["conditions"]["min"]["lve"] == pytest.approx(summary["unseen"]["min"]["lve"], rel=1e-9)


def test_save_predictions_file_names(tmp_path):
    from talkmesh.eval.evaluate import Prediction

    v = np.zeros((5, 4, 3), np.float32)
    paths = save_predictions(
        [Prediction("S11_seq05", "S11", "S01", v, False), Prediction("S01_seq09", "S01", None, v, True)], tmp_path
    )
    assert sorted(p.name for p in paths) == ["S01_seq09.npy", "S11_seq05_condition_S01.npy"]
    assert np.load(paths[0]).shape == (5, 12)


# --------------------------------------------------------------------------------------
# The job, without Ray (num_workers=0)
# --------------------------------------------------------------------------------------


def test_job_trains_evaluates_and_registers(tmp_path, monkeypatch, capsys):
    from talkmesh.ops.jobs import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = main(
        "faceformer",
        [
            "--num-workers", "0",
            "train.epochs=1",
            "train.torch_threads=1",
            "train.system_metrics=false",
            "train.limit_train_batches=4",
            "train.limit_eval_sequences=2",
            f"train.storage_path={tmp_path / 'ray'}",
            "train.run_name=job",
        ],
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "MLflow run id" in out and "test-B" in out and "@champion" in out
    assert tracking.get_alias_version("faceformer", "champion", uri=uri) == 1
    run_id = tracking.find_run("talkmesh-faceformer", "job", uri=uri)
    metrics = tracking.get_run_metrics(run_id, uri=uri)
    assert "test/test-A/lve" in metrics and "test/test-B/unseen/lve" in metrics and "test/test-B/adapted/lve" in metrics
    assert (tmp_path / "ray" / "job" / "predictions" / "test-B").is_dir()
    previews = {a.path for a in mlflow_client(uri).list_artifacts(run_id, "preview")}  # small.yaml: preview on
    assert any(p.endswith(".mp4") for p in previews) and any(p.endswith(".npy") for p in previews)
    assert main("faceformer", ["--preset", "nope"]) == 2
    assert "no such preset" in capsys.readouterr().err
    info = json.loads((tmp_path / "ray" / "job" / "epoch-0000" / METHOD_FILE).read_text())
    assert info["method"] == "faceformer" and info["epoch"] == 0


@pytest.mark.slow
def test_dualtalker_job_reads_whole_sequences_with_transcripts(tmp_path, monkeypatch):
    """jobs/dualtalker.py's small preset: its windows hold whole synthetic sequences, so the
    CTC terms see the phoneme transcripts (a windowed clip carries none); the reader's input
    scale is fitted; the job evaluates and registers."""
    from talkmesh.ops.jobs import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = ["train.epochs=1", "train.torch_threads=1", "train.system_metrics=false", "train.preview=false",
                 "train.limit_train_batches=4", "train.limit_eval_sequences=2",
                 f"train.storage_path={tmp_path / 'ray'}", "train.run_name=job"]  # fmt: skip
    assert main("dualtalker", ["--num-workers", "0", *overrides]) == 0
    metrics = tracking.get_run_metrics(tracking.find_run("talkmesh-dualtalker", "job", uri=uri), uri=uri)
    assert metrics["train/ctc_gt"] > 0 and "train/ctc_pred" in metrics
    assert metrics["train/fit/reader_scale_lips"] > 0 and "test/test-B/adapted/lve" in metrics
    assert tracking.get_alias_version("dualtalker", "champion", uri=uri) == 1


def test_an_epochs_checkpoint_is_written_whole_into_the_run_directory_and_reported_in_place(tmp_path, monkeypatch):
    import types

    import ray.train
    from ray.train import CheckpointUploadMode

    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.train import loop

    exp = experiment(tmp_path, "train.epochs=5")
    method = build_method("faceformer", None, DataFacts.from_corpus(open_corpus(exp.data)), preset="debug")
    opt = torch.optim.Adam(method.trainable_parameters())
    run_dir = tmp_path / "ray" / "run"
    state = types.SimpleNamespace(
        exp=exp, rank=0, world=1, run_dir=run_dir, local_mode=False, model=method, method=method, optimizer=opt,
        global_step=7, logger=None, logged_epochs=set(), num_epochs=5,
    )  # fmt: skip
    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append((metrics, kw)))
    stale = run_dir / "epoch-0003"
    stale.mkdir(parents=True)
    (stale / "left-over").write_text("from an earlier try of epoch 3")

    loop.report_epoch(state, 3, {"val/lve": 1.0, "epoch": 3})
    (metrics, kw), = reports
    assert metrics == {"val/lve": 1.0, "epoch": 3} and kw["checkpoint_dir_name"] == "epoch-0003"
    # Ray takes it asynchronously, from where it already is: nothing copied, nothing deleted.
    assert kw["checkpoint_upload_mode"] == CheckpointUploadMode.ASYNC
    assert kw["delete_local_checkpoint_after_upload"] is False
    ckpt = kw["checkpoint"]
    assert Path(ckpt.path) == stale and kw["checkpoint_upload_fn"](ckpt, "epoch-0003") is ckpt
    # The repeated epoch replaced the earlier directory whole; nothing half-written is left.
    assert sorted(p.name for p in stale.iterdir()) == sorted([METHOD_FILE, MODEL_FILE, TRAINER_FILE, METRICS_FILE])
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    assert load_trainer_state(stale)["global_step"] == 7
    assert [(e["event"], e["epoch"]) for e in read_progress(run_dir)] == [("epoch_end", 3)]

    # A worker lost while writing leaves no directory under a checkpoint's name.
    def dies_midway(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / MODEL_FILE).write_bytes(b"half")
        raise KeyboardInterrupt  # as good as a SIGKILL for the files on disk

    monkeypatch.setattr(loop, "save_checkpoint", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        loop.report_epoch(state, 4, {"val/lve": 0.5, "epoch": 4})
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch-0003", "progress.jsonl"]
    assert [c.epoch for c in list_checkpoints(run_dir)] == [3] and len(reports) == 1
