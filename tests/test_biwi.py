"""BIWI reader (datasets.md §3, §7): CodeTalker processed layout on tiny fake data with the
real subject names and sentence ids; splits, 25 fps, 44.1 -> 16 kHz audio, regions, errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import soundfile as sf

from talkmesh.config import DataConfig
from talkmesh.data.biwi import TEST_B_SUBJECTS, TRAIN_SUBJECTS, BiwiCorpus, biwi_split
from talkmesh.data.corpus import open_corpus
from talkmesh.data.errors import DataError

V = 40
RATE = 44100
EXTRA = "X9"  # a subject outside the official lists
LVE = [30, 31, 32, 33]
FDD = [1, 2, 3, 4, 5]


def _plan() -> dict[str, list[int]]:
    plan = {s: [1, 32, 33, 36, 37, 40] for s in TRAIN_SUBJECTS}
    plan.update({s: [1, 36, 37, 40] for s in TEST_B_SUBJECTS})
    plan[EXTRA] = [5]
    return plan


def make_biwi(root, plan: dict[str, list[int]] | None = None, regions: bool = True) -> dict[str, np.ndarray]:
    """Write the layout; returns name -> stored vertices (T, V*3)."""
    rng = np.random.default_rng(0)
    (root / "vertices_npy").mkdir(parents=True)
    (root / "wav").mkdir()
    stored = {}
    plan = plan or _plan()
    for i, (subject, sentences) in enumerate(sorted(plan.items())):
        for j, n in enumerate(sentences):
            name = f"{subject}_e{n:02d}"
            t = 5 + (i + j) % 3
            verts = (rng.normal(size=(t, V * 3)) * 50).astype(np.float32)  # unitless, large values kept as is
            np.save(root / "vertices_npy" / f"{name}.npy", verts)
            s = np.arange(int(round(t / 25 * RATE))) / RATE
            sf.write(str(root / "wav" / f"{name}.wav"), 0.25 * np.sin(2 * np.pi * 300.0 * s), RATE, subtype="PCM_16")
            stored[name] = verts
    templates = {s: np.full((V, 3), k, dtype=np.float32) for k, s in enumerate(sorted(plan))}
    with open(root / "templates.pkl", "wb") as f:
        pickle.dump(templates, f, protocol=2)
    if regions:
        (root / "regions").mkdir()
        (root / "regions" / "lve.txt").write_text(",".join(map(str, LVE)))
        (root / "regions" / "fdd.txt").write_text(",".join(map(str, FDD)))
    return stored


def corpus(root, **kw) -> BiwiCorpus:
    c = open_corpus(DataConfig(format="biwi", root=str(root), **kw))
    assert isinstance(c, BiwiCorpus)
    return c


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_official_split_table():
    counts: dict[str, int] = {}
    for s in (*TRAIN_SUBJECTS, *TEST_B_SUBJECTS):
        for n in range(1, 41):
            split = biwi_split(s, f"{n:02d}")
            counts[split] = counts.get(split, 0) + 1
    assert counts == {"train": 192, "val": 24, "test-A": 24, "test-B": 32, "reference": 288}
    assert biwi_split("F2", "32") == "train" and biwi_split("F2", "33") == "val"
    assert biwi_split("F2", "37") == "test-A" and biwi_split("F1", "37") == "test-B"
    assert biwi_split("F1", "36") == "reference" and biwi_split(EXTRA, "01") == "unused"
    assert biwi_split("F2", "41") == "unused"


def test_info_splits_and_loading(tmp_path):
    stored = make_biwi(tmp_path)
    c = corpus(tmp_path)
    info = c.info
    assert (info.format, info.fps, info.motion, info.num_vertices, info.param_dim) == ("biwi", 25.0, "vertices", V, 0)
    assert not info.has_head_pose
    assert info.train_subjects == ("F2", "F3", "F4", "M3", "M4", "M5")
    assert info.splits == ("train", "val", "test-A", "test-B", "reference")
    assert info.eval_splits == ("test-A", "test-B") and info.unseen_splits == ("test-B",)
    assert {(s.subject, s.sentence) for s in c.sequences("train")} == {(s, n) for s in TRAIN_SUBJECTS
                                                                       for n in ("01", "32")}
    assert {s.sentence for s in c.sequences("val")} == {"33", "36"} and len(c.sequences("val")) == 12
    assert {s.subject for s in c.sequences("test-A")} == set(TRAIN_SUBJECTS)
    assert {s.subject for s in c.sequences("test-B")} == set(TEST_B_SUBJECTS)
    assert len(c.sequences("test-B")) == 16
    assert {s.sentence for s in c.sequences("reference")} == {"01", "36"}
    assert [s.split for s in c.sequences() if s.subject == EXTRA] == ["unused"]
    assert [s.name for s in c.reference_pool("M6")] == ["M6_e01", "M6_e36"]
    assert c.subject_index("M3") == 3 and c.subject_index("F1") == -1
    assert "missing_train_subjects" not in info.notes
    for name in ("F2_e01", "M6_e40", "X9_e05"):
        seq = c.get(name)
        clip = c.load(name)
        # Units never rescaled: exactly the stored coordinates, every frame (25 fps native).
        np.testing.assert_array_equal(clip.vertices, stored[name].reshape(-1, V, 3))
        assert clip.fps == 25.0 and seq.num_frames == clip.num_frames == stored[name].shape[0]
        assert clip.template.shape == (V, 3) and clip.split == seq.split
        # 44.1 kHz wav -> 16 kHz with the right duration and pitch.
        assert clip.audio.dtype == np.float32
        n44 = int(round(clip.num_frames / 25 * RATE))
        assert clip.audio.shape == (int(round(n44 * 16000 / RATE)),)
        assert seq.audio_seconds == pytest.approx(n44 / RATE)
        spec = np.abs(np.fft.rfft(clip.audio, n=16000 * 4))
        assert np.argmax(spec) / 4 == pytest.approx(300.0, abs=3.0)


def test_regions_and_overrides(tmp_path):
    make_biwi(tmp_path, plan={"F2": [1]})
    r = corpus(tmp_path).regions()
    np.testing.assert_array_equal(r.lips, LVE)
    np.testing.assert_array_equal(r.upper, FDD)
    assert "lve.txt" in r.sources["lips"] and "fdd.txt" in r.sources["upper"]
    mine = tmp_path / "mine.txt"
    mine.write_text("7 8")
    r2 = corpus(tmp_path, upper_regions=str(mine)).regions()
    np.testing.assert_array_equal(r2.lips, LVE)
    np.testing.assert_array_equal(r2.upper, [7, 8])
    (tmp_path / "regions" / "fdd.txt").write_text(f"1, {V}")  # index out of range for V vertices
    with pytest.raises(DataError, match=r"fdd\.txt.*\[0, 40\)"):
        corpus(tmp_path).regions()
    (tmp_path / "regions" / "fdd.txt").unlink()
    with pytest.raises(DataError, match=r"fdd\.txt.*CodeTalker"):
        corpus(tmp_path).regions()
    assert corpus(tmp_path, upper_regions=str(mine)).regions().upper.size == 2


def test_missing_train_subject_is_noted(tmp_path):
    plan = _plan()
    del plan["M4"]
    make_biwi(tmp_path, plan=plan)
    c = corpus(tmp_path)
    assert c.info.train_subjects == TRAIN_SUBJECTS
    assert c.info.notes["missing_train_subjects"] == "M4"
    assert len(c.sequences("train")) == 10


def test_rate_and_layout_options(tmp_path):
    make_biwi(tmp_path, plan={"F2": [1]})
    assert corpus(tmp_path, fps=25.0).info.fps == 25.0
    with pytest.raises(DataError, match="data.fps"):
        corpus(tmp_path, fps=30.0)
    with pytest.raises(DataError, match="processed layout"):
        corpus(tmp_path, layout="original")


def test_errors_name_the_file(tmp_path):
    make_biwi(tmp_path, plan={"F2": [1, 2], "F1": [37]})
    vdir, wdir = tmp_path / "vertices_npy", tmp_path / "wav"
    for bad in ("F2_01", "F2_e1", "F2-e01"):
        np.save(vdir / f"{bad}.npy", np.zeros((2, V * 3), np.float32))
        with pytest.raises(DataError, match=rf"{bad}\.npy.*<subject>_eXX"):
            corpus(tmp_path).sequences()
        (vdir / f"{bad}.npy").unlink()
    wav = (wdir / "F2_e01.wav").read_bytes()
    (wdir / "F2_e01.wav").unlink()
    with pytest.raises(DataError, match=r"F2_e01\.wav"):
        corpus(tmp_path).sequences()
    (wdir / "F2_e01.wav").write_bytes(wav)
    npy = (vdir / "F2_e02.npy").read_bytes()
    (vdir / "F2_e02.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(DataError, match=r"F2_e02\.npy"):
        corpus(tmp_path).sequences()
    np.save(vdir / "F2_e02.npy", np.zeros((3, (V - 1) * 3), np.float32))
    with pytest.raises(DataError, match=rf"F2_e02\.npy.*{V * 3}"):
        corpus(tmp_path).load("F2_e02")
    (vdir / "F2_e02.npy").write_bytes(npy)
    tpl = (tmp_path / "templates.pkl").read_bytes()
    (tmp_path / "templates.pkl").unlink()
    with pytest.raises(DataError, match="templates.pkl"):
        _ = corpus(tmp_path).info
    (tmp_path / "templates.pkl").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="templates.pkl"):
        corpus(tmp_path).load("F2_e01")
    with open(tmp_path / "templates.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="templates.pkl.*refusing"):
        corpus(tmp_path).load("F2_e01")
    assert not os.path.exists("PWNED")
    (tmp_path / "templates.pkl").write_bytes(tpl)
    assert corpus(tmp_path).load("F1_e37").split == "test-B"
