"""Scoring a directory of saved predictions against a tiny in-memory corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo
from talkmesh.data.regions import Regions
from talkmesh.eval import metrics as M
from talkmesh.eval.scoring import ScoringError, format_report, score_directory

V = 10
LIPS = np.array([0, 1, 2])
UPPER = np.array([5, 6, 7])
SEQS = {  # name -> (subject, split, frames)
    "S1_s01": ("S1", "train", 8),
    "S1_s02": ("S1", "test-A", 12),
    "S2_s02": ("S2", "test-A", 20),
    "U1_s01": ("U1", "test-B", 10),
    "U1_s02": ("U1", "test-B", 30),
}


class FakeCorpus(Corpus):
    format_name = "fake"

    def __init__(self, motion: str = "vertices") -> None:
        super().__init__(DataConfig())
        self.motion = motion
        rng = np.random.default_rng(0)
        self.templates = {s: rng.normal(size=(V, 3)) for s in ("S1", "S2", "U1")}
        self.verts = {
            name: self.templates[subj][None] + rng.normal(size=(t, V, 3)) * 0.01 for name, (subj, _, t) in SEQS.items()
        }
        self.layer = FakeFlame()

    @property
    def info(self) -> CorpusInfo:
        return CorpusInfo(
            format="biwi" if self.motion == "vertices" else "fakeflame",
            root="/mem",
            fps=25.0,
            motion=self.motion,  # type: ignore[arg-type]
            num_vertices=V,
            param_dim=53 if self.motion == "params" else 0,
            has_head_pose=self.motion == "params",
            train_subjects=("S1", "S2"),
            splits=("train", "test-A", "test-B"),
            eval_splits=("test-A", "test-B"),
            unseen_splits=("test-B",),
        )

    def _index(self) -> list[SequenceInfo]:
        return [SequenceInfo(name=n, subject=s, split=sp, num_frames=t) for n, (s, sp, t) in SEQS.items()]

    def _load(self, seq: SequenceInfo) -> Clip:
        audio = np.zeros(int(seq.num_frames * 640), dtype=np.float32)
        if self.motion == "params":
            params = self.params_of(seq.name)
            return Clip(
                name=seq.name,
                subject=seq.subject,
                audio=audio,
                fps=25.0,
                params=params,
                shape=np.zeros(100, dtype=np.float32),
                split=seq.split,
            )
        return Clip(
            name=seq.name,
            subject=seq.subject,
            audio=audio,
            fps=25.0,
            vertices=self.verts[seq.name],
            template=self.templates[seq.subject],
            split=seq.split,
        )

    def params_of(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(name)) % 1000)
        return rng.normal(size=(SEQS[name][2], 53)).astype(np.float32) * 0.1

    def template(self, subject: str) -> np.ndarray | None:
        return None if self.motion == "params" else self.templates[subject]

    def regions(self) -> Regions:
        return Regions(
            lips=LIPS, upper=UPPER, sources={"lips": "mem/lips.txt (md5 aaa)", "upper": "mem/up.txt (md5 bbb)"}
        )

    def face_model(self):  # noqa: ANN201 - a duck-typed FLAME layer
        return self.layer if self.motion == "params" else None


class FakeFlame:
    """Linear surrogate: vertices = template + params @ basis."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.base = rng.normal(size=(V, 3))
        self.basis = rng.normal(size=(53, V * 3)) * 0.01

    def template(self, shape: np.ndarray | None) -> np.ndarray:
        return self.base.copy()

    def vertices_from_params(self, params: np.ndarray, shape: np.ndarray | None) -> np.ndarray:
        assert params.shape[1] == 53
        return self.base[None] + (params.astype(np.float64) @ self.basis).reshape(-1, V, 3)


@pytest.fixture
def corpus() -> FakeCorpus:
    return FakeCorpus()


def _save(d: Path, name: str, arr: np.ndarray) -> Path:
    p = d / f"{name}.npy"
    np.save(p, arr)
    return p


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float32)


def test_perfect_predictions_score_zero(corpus, tmp_path):
    for name in ("S1_s02", "S2_s02", "U1_s01", "U1_s02"):
        _save(tmp_path, name, corpus.verts[name].reshape(SEQS[name][2], -1))  # (T, V*3) float64
    report = score_directory(corpus, tmp_path)
    assert set(report["splits"]) == {"test-A", "test-B"}
    for sp in ("test-A", "test-B"):
        r = report["splits"][sp]
        assert r["sequences_scored"] == r["sequences_expected"] == 2 and r["missing"] == []
        assert r["metrics"]["lve"] == 0.0 and r["metrics"]["fdd"] == 0.0
        assert set(r["metrics"]) == set(M.DEFAULT_METRICS)
        assert "conditions" not in r
    assert report["unmatched_files"] == []
    assert report["regions"]["sources"]["lips"].endswith("(md5 aaa)")
    assert report["regions"]["lips"] == 3
    json.dumps(report)  # serialisable for --json


def test_offset_predictions_give_hand_values(corpus, tmp_path):
    d = 0.02
    for name in ("S1_s02", "S2_s02"):
        pred = corpus.verts[name].copy()
        pred[:, 1, 2] += d  # one lip vertex offset by d in every frame
        _save(tmp_path, name, pred)  # (T, V, 3) accepted too
    report = score_directory(corpus, tmp_path, split="test-A")
    assert list(report["splits"]) == ["test-A"]
    m = report["splits"]["test-A"]["metrics"]
    assert m["lve"] == pytest.approx(d**2, rel=1e-9)
    assert m["lve_l2"] == pytest.approx(d, rel=1e-9)
    assert m["mve_max_sq"] == pytest.approx(d**2, rel=1e-9)
    assert m["mve_mean_l2"] == pytest.approx(d / V, rel=1e-9)
    assert m["fve_mean_sq"] == pytest.approx(d**2 / V, rel=1e-9)
    assert m["fdd"] == 0.0  # the upper face is untouched
    rows = report["splits"]["test-A"]["per_sequence"]
    assert [(r["sequence"], r["subject"], r["frames"]) for r in rows] == [("S1_s02", "S1", 12), ("S2_s02", "S2", 20)]
    text = format_report(report)
    assert "lve (x1e-4)" in text and "fdd (x1e-5)" in text and "S2_s02" in text
    assert "2 of 2 sequences scored" in text


def test_condition_files_are_aggregated(corpus, tmp_path):
    offsets = {"S1": 0.01, "S2": 0.03}
    for name in ("U1_s01", "U1_s02"):
        for cond, off in offsets.items():
            pred = corpus.verts[name].copy()
            pred[:, 0, 0] += off
            _save(tmp_path, f"{name}_condition_{cond}", _flat(pred))
    report = score_directory(corpus, tmp_path, split="test-B")
    r = report["splits"]["test-B"]
    assert r["sequences_scored"] == 2 and r["predictions_scored"] == 4 and r["frames"] == 2 * 40
    cond = r["conditions"]
    assert cond["conditions"] == ["S1", "S2"] and cond["pairs"] == 4
    assert cond["per_condition"]["S1"]["lve"] == pytest.approx(0.01**2, rel=1e-4)
    assert cond["per_condition"]["S2"]["lve"] == pytest.approx(0.03**2, rel=1e-4)
    assert cond["min"]["lve"] == cond["per_condition"]["S1"]["lve"]
    assert cond["max"]["lve"] == cond["per_condition"]["S2"]["lve"]
    # LVE pools the frames of all (sequence, condition) pairs
    assert r["metrics"]["lve"] == pytest.approx((0.01**2 + 0.03**2) / 2, rel=1e-4)
    assert r["metrics"] == cond["metrics"]
    assert {e["condition"] for e in r["per_sequence"]} == {"S1", "S2"}
    text = format_report(report)
    assert "condition S1" in text and "min over conditions" in text


def test_missing_and_extra_files_are_reported(corpus, tmp_path):
    _save(tmp_path, "S1_s02", _flat(corpus.verts["S1_s02"]))
    _save(tmp_path, "S1_s01", _flat(corpus.verts["S1_s01"]))  # a training sequence
    _save(tmp_path, "nonsense", np.zeros((3, V * 3)))
    (tmp_path / "notes.txt").write_text("hello")
    report = score_directory(corpus, tmp_path)
    a, b = report["splits"]["test-A"], report["splits"]["test-B"]
    assert a["missing"] == ["S2_s02"] and a["sequences_scored"] == 1
    assert b["missing"] == ["U1_s01", "U1_s02"] and b["sequences_scored"] == 0 and b["metrics"] == {}
    assert report["unmatched_files"] == ["S1_s01.npy", "nonsense.npy", "notes.txt"]
    assert report["other_split_files"] == {"S1_s01.npy": "train"}
    text = format_report(report)
    assert "missing predictions (1): S2_s02" in text
    assert "S1_s01.npy (split train, not scored)" in text and "nonsense.npy" in text


def test_no_matching_file_is_an_error(corpus, tmp_path):
    _save(tmp_path, "something_else", np.zeros((3, V * 3)))
    with pytest.raises(ScoringError, match=r"no prediction file matches.*S1_s02\.npy"):
        score_directory(corpus, tmp_path)
    with pytest.raises(ScoringError, match="not found"):
        score_directory(corpus, tmp_path / "absent")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nan", "NaN"),
        ("vertices", "wrong vertex count"),
        ("width", r"expected \(T, 30\) or \(T, 10, 3\)"),
        ("text", "not a readable .npy"),
        ("empty", "shape"),
    ],
)
def test_bad_file_raises_with_its_name(corpus, tmp_path, content, message):
    _save(tmp_path, "S1_s02", _flat(corpus.verts["S1_s02"]))
    bad = tmp_path / "S2_s02.npy"
    if content == "nan":
        arr = _flat(corpus.verts["S2_s02"])
        arr[3, 4] = np.nan
        np.save(bad, arr)
    elif content == "vertices":
        np.save(bad, np.zeros((20, V + 1, 3)))
    elif content == "width":
        np.save(bad, np.zeros((20, 53)))  # params are only accepted for parameter corpora
    elif content == "empty":
        np.save(bad, np.zeros((0, V * 3)))
    else:
        bad.write_text("not an array")
    with pytest.raises(ScoringError, match=message) as info:
        score_directory(corpus, tmp_path, split="test-A")
    assert "S2_s02.npy" in str(info.value)


def test_ambiguous_plain_and_condition_files(corpus, tmp_path):
    _save(tmp_path, "U1_s01", _flat(corpus.verts["U1_s01"]))
    _save(tmp_path, "U1_s01_condition_S1", _flat(corpus.verts["U1_s01"]))
    with pytest.raises(ScoringError, match="ambiguous"):
        score_directory(corpus, tmp_path, split="test-B")


def test_length_mismatch_is_truncated_and_reported(corpus, tmp_path):
    _save(tmp_path, "S1_s02", _flat(corpus.verts["S1_s02"][:9]))  # 9 of 12 frames
    _save(tmp_path, "S2_s02", _flat(corpus.verts["S2_s02"][:19]))  # within tolerance
    report = score_directory(corpus, tmp_path, split="test-A")
    r = report["splits"]["test-A"]
    assert r["frames"] == 9 + 19 and r["metrics"]["lve"] == pytest.approx(0.0, abs=1e-12)  # float32 files
    assert len(report["warnings"]) == 1 and "S1_s02.npy" in report["warnings"][0]
    assert "warnings (1)" in format_report(report)


def test_parameter_corpus_accepts_flame_params(tmp_path):
    corpus = FakeCorpus(motion="params")
    for name in ("S1_s02", "S2_s02"):
        params = corpus.params_of(name)
        head = np.full((params.shape[0], 3), 0.3, dtype=np.float32)  # ignored: zero head rotation
        _save(tmp_path, name, np.concatenate([params, head], axis=1) if name == "S1_s02" else params)
    for name in ("U1_s01",):
        verts = corpus.layer.vertices_from_params(corpus.params_of(name), None)
        _save(tmp_path, f"{name}_condition_S1", _flat(verts + 0.0))
    report = score_directory(corpus, tmp_path)
    a = report["splits"]["test-A"]
    assert a["sequences_scored"] == 2 and a["metrics"]["lve"] == pytest.approx(0.0, abs=1e-20)
    assert a["metrics"]["fdd"] == pytest.approx(0.0, abs=1e-12)
    b = report["splits"]["test-B"]
    assert b["sequences_scored"] == 1 and b["missing"] == ["U1_s02"]
    assert b["metrics"]["lve"] == pytest.approx(0.0, abs=1e-12)
    assert report["scales"] == {}
    assert "lve (x" not in format_report(report)  # no published scale for this format
