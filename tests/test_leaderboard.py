"""`talkmesh leaderboard`: registered models and the reference rows on one pinned protocol,
with bootstrap intervals, written as Markdown/HTML/JSON and logged to MLflow, the same
numbers on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from talkmesh.cli import main
from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.synthetic import generate_corpus


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A synthetic corpus and an MLflow store where debug FaceFormer and Mimic models (random
    weights that move) are registered as @champion; FaceFormer also has a worse version 2."""
    from service_helpers import randomize_weights
    from talkmesh.methods.base import DataFacts
    from talkmesh.methods.registry import build_method
    from talkmesh.ops import tracking

    root = tmp_path_factory.mktemp("board")
    synth = generate_corpus(root / "synth", "small")
    corpus = open_corpus(DataConfig(format="synthetic", root=str(synth)))
    facts = DataFacts.from_corpus(corpus)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for name, std in (("faceformer", 0.02), ("mimic", 0.02), ("faceformer", 0.2)):
        torch.manual_seed(0)
        method = randomize_weights(build_method(name, None, facts, preset="debug"), std)
        run_id = tracking.start_run(f"talkmesh-{name}", f"board-{std}", uri=uri)
        version = tracking.register_model(name, run_id, method, metrics={"val/lve": std}, uri=uri)
        if version == 1:
            tracking.set_alias(name, "champion", version, uri=uri)
        tracking.end_run(run_id, uri=uri)
    return {"root": root, "synth": synth, "corpus": corpus, "uri": uri}


def board(capsys, store, out: Path, *extra: str) -> tuple[int, str, str]:
    args = ["leaderboard", "--format", "synthetic", "--root", str(store["synth"]), "--limit", "4",
            "--resamples", "200", "--out", str(out), "--tracking-uri", store["uri"], *extra]  # fmt: skip
    code = main(args)
    out_, err = capsys.readouterr()
    return code, out_, err


def test_leaderboard_ranks_champions_with_reference_rows_and_is_reproducible(capsys, store, tmp_path):
    from mlflow import MlflowClient

    code, out, err = board(capsys, store, tmp_path / "a")
    assert code == 0, err
    body = json.loads((tmp_path / "a" / "leaderboard.json").read_text())
    rows = {r["name"]: r for r in body["rows"]}
    assert set(rows) == {"faceformer v1", "mimic v1", "static template", "ground truth"}
    pid = body["protocol_id"]
    assert pid.startswith("tm-") and all(r["protocol_id"] == pid for r in body["rows"])
    p = body["protocol"]
    assert p["dataset"] == "synthetic" and p["split"] == "test-A" and p["fps"] == 25 and p["limit"] == 4
    assert p["lips"]["count"] > 0 and len(p["lips"]["sha256"]) == 16 and "CodeTalker" in p["metrics"]["lve"]

    truth, static = rows["ground truth"], rows["static template"]
    assert truth["metrics"]["lve"] == 0 and truth["ci"]["lve"] == [0, 0]  # the pipeline scores gt as perfect
    assert static["metrics"]["lve"] > 0 and static["metrics"]["fdd"] > 0  # no motion at all
    for r in (rows["faceformer v1"], rows["mimic v1"], static):
        for m in ("lve", "fdd"):
            lo, hi = r["ci"][m]
            assert lo <= r["metrics"][m] <= hi and lo < hi, (r["name"], m, r["ci"][m])
        assert r["sequences"] == 4
    assert rows["faceformer v1"]["rtf"] > 0 and rows["faceformer v1"]["model"] == "models:/talkmesh-faceformer/1"

    # The printed Markdown and the HTML carry the same rows; models ranked by LVE, references last.
    md = (tmp_path / "a" / "leaderboard.md").read_text()
    assert md.strip() in out and f"Protocol {pid}" in md
    order = [line.split("|")[2].strip() for line in md.splitlines()[2:6]]
    ranked = sorted(["faceformer v1", "mimic v1"], key=lambda n: rows[n]["metrics"]["lve"])
    assert order == [*ranked, "static template", "ground truth"]
    page = (tmp_path / "a" / "leaderboard.html").read_text()
    assert f'data-protocol="{pid}"' in page and page.count("<tr>") == 5

    # Logged to MLflow: the protocol as params, every row's metrics, the three tables.
    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.get_experiment_by_name("talkmesh-leaderboard")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`talkmesh.protocol_id` = '{pid}'")
    assert run.data.params["lips_sha256"] == p["lips"]["sha256"]
    assert run.data.metrics["faceformer_v1/lve"] == pytest.approx(rows["faceformer v1"]["metrics"]["lve"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"leaderboard.md", "leaderboard.json"}

    # A rerun gives the same numbers (the real-time factor aside) under the same protocol id.
    code, _, err = board(capsys, store, tmp_path / "b", "--no-log")
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "leaderboard.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "rtf"} for r in body["rows"]]
    assert again["protocol_id"] == pid and [{k: v for k, v in r.items() if k != "rtf"} for r in again["rows"]] == strip


def test_chosen_versions_and_another_protocol(capsys, store, tmp_path):
    code, _, err = board(capsys, store, tmp_path, "--versions", "faceformer=2", "--no-log", "--split", "test-B")
    assert code == 0, err
    body = json.loads((tmp_path / "leaderboard.json").read_text())
    assert [r["name"] for r in body["rows"]] == ["faceformer v2", "static template", "ground truth"]
    assert body["protocol"]["split"] == "test-B"
    assert body["rows"][0]["predictions"] > body["rows"][0]["sequences"]  # unseen subjects: one per condition
    code, _, _ = board(capsys, store, tmp_path / "c", "--no-log")
    assert json.loads((tmp_path / "c" / "leaderboard.json").read_text())["protocol_id"] != body["protocol_id"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "adamesh"], "adamesh: no registered model talkmesh-adamesh"),
        (["--versions", "faceformer"], "--versions faceformer: expected <method>=<version"),
        (["--versions", "faceformer=9"], "has no version 9"),
        (["--split", "nope"], "--split nope: not a split"),
        (["--resamples", "5"], "--resamples >= 100"),
    ],
)
def test_leaderboard_errors_name_the_argument(capsys, store, tmp_path, extra, needle):
    code, _, err = board(capsys, store, tmp_path, "--no-log", *extra)
    assert code == 2 and needle in err, err


def test_bootstrap_interval_covers_the_pooled_value_and_narrows_with_more_sequences():
    from talkmesh.eval.evaluate import ScoredPrediction
    from talkmesh.eval.metrics import SequenceScore
    from talkmesh.ops.leaderboard import bootstrap_ci

    def scored(n: int, seed: int) -> list[ScoredPrediction]:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            frames = int(rng.integers(50, 150))
            s = SequenceScore(f"s{i}", frames, frames, frames, {"lve": frames * rng.uniform(1, 3)}, {"fdd": 0.0})
            out.append(ScoredPrediction(f"s{i}", "a", None, True, False, s))
        return out

    few, many = scored(8, 0), scored(200, 0)
    for items in (few, many):
        pooled = sum(s.score.sums["lve"] for s in items) / sum(s.score.frames for s in items)
        lo, hi = bootstrap_ci(items, "lve", 500, 0)
        assert lo < pooled < hi
    assert np.subtract(*bootstrap_ci(many, "lve", 500, 0)[::-1]) < np.subtract(*bootstrap_ci(few, "lve", 500, 0)[::-1])
    assert bootstrap_ci(few, "lve", 500, 0) == bootstrap_ci(few, "lve", 500, 0)  # seeded
