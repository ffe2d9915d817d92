"""MEAD EMICA FLAME reader (datasets.md 5, 6.2, 7; metrics.md 6.3) on tiny fake layouts."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from talkmesh.cli import main
from talkmesh.config import DataConfig
from talkmesh.data import DataError, open_corpus
from talkmesh.data.mead import MEAD_EMOTION_TO_EMOTE, parse_uid


def write_clip(
    root: Path,
    uid: str,
    frames: int,
    cols: int = 156,
    seed: int = 0,
    raw: np.ndarray | None = None,
    audio: bool = True,
) -> np.ndarray:
    actor = uid.split("_")[0]
    rng = np.random.default_rng(seed)
    if raw is None:
        raw = rng.normal(size=(frames, cols)).astype(np.float32)
    (root / "flame_param" / actor).mkdir(parents=True, exist_ok=True)
    np.save(root / "flame_param" / actor / f"{uid}.npy", raw)
    if audio:
        (root / "audio_sample" / actor).mkdir(parents=True, exist_ok=True)
        np.save(root / "audio_sample" / actor / f"{uid}.npy", rng.normal(size=frames * 640).astype(np.float32) * 0.1)
    return raw


@pytest.fixture()
def mead_root(tmp_path: Path) -> Path:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 30, seed=1)
    write_clip(root, "M003_05_2_002", 40, seed=2)  # angry level 2 -> emotion 6, intensity 1
    write_clip(root, "W009_08_3_001", 20, cols=153, seed=3)  # 153-column variant
    write_clip(root, "M032_03_1_001", 25, seed=4)  # val
    # Test actor, (neutral, level 1): 4 s + 4 s + 4 s reaches 10 s -> 3 reference clips, 1 test.
    for i in range(4):
        write_clip(root, f"M037_01_1_{i + 1:03d}", 100, seed=10 + i)
    # Test actor, (happy, level 2): one 12 s clip already reaches 10 s -> 1 reference, 1 test.
    write_clip(root, "M037_03_2_001", 300, seed=20)
    write_clip(root, "M037_03_2_002", 50, seed=21)
    write_clip(root, "X999_01_1_001", 10, seed=30)  # actor outside the table -> unused
    return root


def cfg_for(root: Path, **kw: object) -> DataConfig:
    return DataConfig(format="mead", root=str(root), **kw)  # type: ignore[arg-type]


def test_parse_uid_and_emotion_remap() -> None:
    assert parse_uid("M003_05_2_001") == ("M003", 6, 1, "001")
    expected = {1: 0, 3: 1, 4: 2, 5: 6, 6: 4, 7: 5, 8: 3, 9: 7}  # datasets.md 5.2, 0-based EMOTE
    assert MEAD_EMOTION_TO_EMOTE == expected
    for code, label in expected.items():
        assert parse_uid(f"W011_{code:02d}_1_x")[1] == label
    with pytest.raises(DataError, match="calm"):
        parse_uid("W011_02_1_x", "some/file.npy")


def test_index_splits_and_info(mead_root: Path) -> None:
    corpus = open_corpus(cfg_for(mead_root, flame_reconstruction="EMICA-MEAD_flame2020"))
    seqs = {s.name: s for s in corpus.sequences()}
    assert len(seqs) == 11
    s = seqs["M003_05_2_002"]
    assert (s.subject, s.split, s.num_frames, s.emotion, s.intensity) == ("M003", "train", 40, 6, 1)
    assert s.audio_seconds == pytest.approx(40 * 640 / 16000)
    assert seqs["W009_08_3_001"].emotion == 3 and seqs["W009_08_3_001"].intensity == 2
    assert seqs["M032_03_1_001"].split == "val"
    assert seqs["X999_01_1_001"].split == "unused"

    info = corpus.info
    assert info.fps == 25 and info.motion == "params" and info.param_dim == 53
    assert info.has_head_pose and info.num_vertices == 0
    assert info.train_subjects == ("M003", "W009")  # train table order, present actors
    assert info.splits == ("train", "val", "test", "reference")
    assert info.eval_splits == ("test",) and info.unseen_splits == ("val", "test")
    assert info.notes["flame_reconstruction"] == "EMICA-MEAD_flame2020"
    assert "X999" in info.notes["unused_actors"]
    assert corpus.subject_index("W009") == 1 and corpus.subject_index("M037") == -1
    assert corpus.template("M003") is None  # no face model configured


def test_reference_split_accumulates_10_seconds(mead_root: Path) -> None:
    corpus = open_corpus(cfg_for(mead_root))
    ref = [s.name for s in corpus.sequences("reference")]
    test = [s.name for s in corpus.sequences("test")]
    assert ref == ["M037_01_1_001", "M037_01_1_002", "M037_01_1_003", "M037_03_2_001"]
    assert test == ["M037_01_1_004", "M037_03_2_002"]
    assert not set(ref) & set(test)
    # The base-class pool for the unseen actor is its reference split; 10 s = 250 frames.
    assert [s.name for s in corpus.reference_pool("M037")] == ref
    clip = corpus.reference_clip("M037", 10.0)
    assert clip.num_frames == 250 and clip.params is not None and clip.params.shape == (250, 53)


def test_flame56_permutation_and_shape(tmp_path: Path) -> None:
    root = tmp_path / "mead"
    frames = 12
    rng = np.random.default_rng(0)
    raw156 = (np.arange(156, dtype=np.float32)[None, :] * 10 + rng.normal(size=(frames, 156))).astype(np.float32)
    raw153 = (np.arange(153, dtype=np.float32)[None, :] * 10 + rng.normal(size=(frames, 153))).astype(np.float32)
    write_clip(root, "M003_01_1_001", frames, raw=raw156)
    write_clip(root, "M005_01_1_001", frames, raw=raw153)
    corpus = open_corpus(cfg_for(root, smoothing=False))

    clip = corpus.load("M003_01_1_001")
    assert clip.params.shape == (frames, 53) and clip.params.dtype == np.float32
    np.testing.assert_array_equal(clip.params[:, :50], raw156[:, 0:50])  # expression
    np.testing.assert_array_equal(clip.params[:, 50:53], raw156[:, 53:56])  # jaw
    np.testing.assert_array_equal(clip.head_pose, raw156[:, 50:53])  # global rotation
    np.testing.assert_allclose(clip.shape, raw156[:, 56:156].mean(axis=0), rtol=1e-6)
    assert clip.shape.shape == (100,) and clip.fps == 25
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (frames * 640,)
    assert (clip.emotion, clip.intensity, clip.split) == (0, 0, "train")

    clip153 = corpus.load("M005_01_1_001")
    np.testing.assert_array_equal(clip153.params[:, :50], raw153[:, :50])
    np.testing.assert_array_equal(clip153.params[:, 50:53], raw153[:, 50:53])
    assert clip153.head_pose is None
    np.testing.assert_allclose(clip153.shape, raw153[:, 53:153].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(corpus.subject_shape("M005"), raw153[:, 53:153].mean(axis=0), rtol=1e-6)


def _jitter(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x, n=2, axis=0)).mean())


def test_smoothing_on_and_off(tmp_path: Path) -> None:
    root = tmp_path / "mead"
    frames = 60
    t = np.linspace(0, 2 * np.pi, frames)[:, None]
    rng = np.random.default_rng(1)
    raw = (np.sin(t) + 0.3 * rng.normal(size=(frames, 156))).astype(np.float32)
    write_clip(root, "M003_01_1_001", frames, raw=raw)
    write_clip(root, "M003_01_1_002", 4, seed=2)  # T < 5: left unchanged even when smoothing

    on = open_corpus(cfg_for(root))
    off = open_corpus(cfg_for(root, smoothing=False))
    c_on, c_off = on.load("M003_01_1_001"), off.load("M003_01_1_001")
    for a, b in ((c_on.params[:, :50], c_off.params[:, :50]), (c_on.params[:, 50:], c_off.params[:, 50:]),
                 (c_on.head_pose, c_off.head_pose)):
        assert _jitter(a) < 0.5 * _jitter(b)
    np.testing.assert_array_equal(c_off.params[:, 50:53], raw[:, 53:56])
    np.testing.assert_allclose(c_on.shape, c_off.shape)  # shape never smoothed
    short_raw = np.load(root / "flame_param" / "M003" / "M003_01_1_002.npy")
    np.testing.assert_array_equal(on.load("M003_01_1_002").params[:, :50], short_raw[:, :50])
    assert on.info.notes["smoothing"].startswith("savgol") and off.info.notes["smoothing"] == "off"


def test_column_stats_over_train(mead_root: Path) -> None:
    corpus = open_corpus(cfg_for(mead_root, smoothing=False))
    stats = corpus.column_stats()
    train = corpus.sequences("train")
    clips = [corpus.load(s) for s in train]
    params = np.concatenate([c.params for c in clips]).astype(np.float64)
    head = np.concatenate([c.head_pose for c in clips if c.head_pose is not None]).astype(np.float64)
    assert stats.frames == params.shape[0] == 90 and stats.head_frames == head.shape[0] == 70
    np.testing.assert_allclose(stats.mean[:53], params.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats.std[:53], params.std(0), atol=1e-9)
    np.testing.assert_allclose(stats.min[:53], params.min(0))
    np.testing.assert_allclose(stats.max[53:], head.max(0))
    np.testing.assert_allclose(stats.std[53:], head.std(0), atol=1e-9)
    assert stats.columns[50] == "jaw_x" and stats.columns[53] == "head_x"
    assert corpus.column_stats() is stats  # computed once
    assert set(stats.as_dict()["expr0"]) == {"min", "max", "mean", "std"}


def test_fps_must_be_25(mead_root: Path) -> None:
    assert open_corpus(cfg_for(mead_root, fps=25.0)).info.fps == 25
    with pytest.raises(DataError, match="25"):
        open_corpus(cfg_for(mead_root, fps=30.0))


def test_missing_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        open_corpus(cfg_for(tmp_path / "nope"))
    with pytest.raises(DataError, match="flame_param"):
        open_corpus(cfg_for(tmp_path))


def test_missing_or_unreadable_audio_skips_the_clip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10)
    write_clip(root, "M003_01_1_002", 10, audio=False)  # audio missing
    write_clip(root, "M003_01_1_003", 10)
    (root / "audio_sample" / "M003" / "M003_01_1_003.npy").write_bytes(b"not an npy file")  # unreadable
    corpus = open_corpus(cfg_for(root))
    with caplog.at_level(logging.WARNING, logger="talkmesh.data.mead"):
        names = [s.name for s in corpus.sequences()]
    assert names == ["M003_01_1_001"]
    assert sorted(corpus.skipped) == ["M003_01_1_002", "M003_01_1_003"]
    assert "audio_sample/M003/M003_01_1_002.npy" in corpus.skipped["M003_01_1_002"]
    assert "not found" in corpus.skipped["M003_01_1_002"]
    assert "not a readable" in corpus.skipped["M003_01_1_003"]
    warned = caplog.text
    assert "M003_01_1_002" in warned and "M003_01_1_003" in warned and "skipping" in warned
    summary = corpus.summary()  # what `talkmesh data inspect` prints (no FLAME_masks.pkl needed)
    assert summary["skipped"] == corpus.skipped and summary["splits"]["train"]["sequences"] == 1


def test_inspect_counts_skipped_clips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10)
    write_clip(root, "M003_01_1_002", 10, audio=False)
    assert main(["data", "inspect", "--format", "mead", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "skipped      1 clip(s)" in out and "M003_01_1_002" in out
    assert main(["data", "inspect", "--format", "mead", "--root", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["skipped"]) == ["M003_01_1_002"]


def test_every_audio_missing_says_so(tmp_path: Path) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10, audio=False)
    with pytest.raises(DataError, match=r"no mead sequences.*1 clip\(s\) skipped.*M003_01_1_001"):
        open_corpus(cfg_for(root)).sequences()


def test_skipped_clips_become_a_run_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from talkmesh.ops import tracking
    from talkmesh.train.config import load_experiment
    from talkmesh.train.runner import _start_run

    started: dict[str, object] = {}
    monkeypatch.setattr(tracking, "start_run", lambda *a, **kw: started.update(kw) or "run-1")
    monkeypatch.setattr(tracking, "log_dataset", lambda *a, **kw: "")  # no MLflow store needed
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10)
    write_clip(root, "M003_01_1_002", 10, audio=False)
    exp = load_experiment(None, ["preset=debug", f"train.storage_path={tmp_path / 'ray'}"])
    assert _start_run(exp, open_corpus(cfg_for(root)), "skips", tmp_path / "run", "", None, None) == "run-1"
    assert started["tags"]["talkmesh.skipped_clips"] == 1  # type: ignore[index]


def test_unknown_emotion_code_names_file(tmp_path: Path) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_02_1_001", 10)
    with pytest.raises(DataError, match=r"M003_02_1_001\.npy.*emotion code 2"):
        open_corpus(cfg_for(root)).sequences()


def test_corrupt_file_names_file(tmp_path: Path) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10)
    (root / "flame_param" / "M003" / "M003_01_1_001.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match=r"M003_01_1_001\.npy.*156"):
        open_corpus(cfg_for(root)).sequences()


def _write_masks(path: Path, lips: list[int], forehead: list[int], eyes: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({"lips": np.array(lips), "forehead": np.array(forehead), "eye_region": np.array(eyes)}, f)


def test_regions(tmp_path: Path, mead_root: Path) -> None:
    corpus = open_corpus(cfg_for(mead_root))
    with pytest.raises(DataError, match="FLAME_masks.pkl"):
        corpus.regions()
    _write_masks(mead_root / "FLAME_masks.pkl", [5, 3, 3, 4], [10, 11], [11, 12])
    regions = open_corpus(cfg_for(mead_root)).regions()
    np.testing.assert_array_equal(regions.lips, [3, 4, 5])  # sorted unique
    np.testing.assert_array_equal(regions.upper, [10, 11, 12])  # forehead U eye_region
    lips_txt = tmp_path / "lips.txt"
    lips_txt.write_text("1, 2,2 7")
    over = open_corpus(cfg_for(mead_root, lip_regions=str(lips_txt))).regions()
    np.testing.assert_array_equal(over.lips, [1, 2, 7])
    np.testing.assert_array_equal(over.upper, [10, 11, 12])
    assert "md5" in over.sources["lips"]


def test_vertices_through_surrogate_flame(tmp_path: Path, mead_root: Path) -> None:
    from talkmesh.face.flame import FlameLayer, make_surrogate_flame

    model = tmp_path / "flame_surrogate.npz"
    FlameLayer.from_arrays(**make_surrogate_flame(num_vertices=30, seed=0)).save_npz(model)
    _write_masks(tmp_path / "FLAME_masks.pkl", [1, 2], [20], [21, 22])  # found next to the model
    corpus = open_corpus(cfg_for(mead_root, flame_model=str(model)))
    assert corpus.info.num_vertices == 30
    clip = corpus.load("M003_01_1_001")
    verts = corpus.vertices_of(clip)
    assert verts.shape == (30, 30, 3) and np.all(np.isfinite(verts))
    layer = corpus.face_model()
    np.testing.assert_allclose(verts, layer.vertices_from_params(clip.params, clip.shape), atol=1e-6)
    np.testing.assert_allclose(clip.template, layer.template(clip.shape), atol=1e-6)
    template = corpus.template("M003")
    assert template is not None and template.shape == (30, 3)
    np.testing.assert_allclose(template, layer.template(corpus.subject_shape("M003")), atol=1e-6)
    np.testing.assert_array_equal(corpus.regions().lips, [1, 2])


def test_inspect_without_flame_masks_reports_what_is_missing(
    mead_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (mead_root / "FLAME_masks.pkl").exists()  # FLAME_masks.pkl comes with FLAME, not with MEAD
    assert main(["data", "inspect", "--format", "mead", "--root", str(mead_root)]) == 0
    out = capsys.readouterr().out
    assert "FLAME_masks.pkl" in out and "lip/upper-face metrics" in out
    assert main(["data", "inspect", "--format", "mead", "--root", str(mead_root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["sequences"] == 3
    regions = summary["regions"]
    assert regions["lips"] is None and regions["upper"] is None and "FLAME_masks.pkl" in regions["missing"]
    # Where the regions are needed, the masks are required, and the error names the file.
    with pytest.raises(DataError, match=r"FLAME_masks\.pkl"):
        open_corpus(cfg_for(mead_root)).regions()


def test_empty_val_or_test_split_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "mead"
    write_clip(root, "M003_01_1_001", 10)
    write_clip(root, "M037_01_1_001", 100)  # a test actor with < 10 s: all of it becomes reference
    corpus = open_corpus(cfg_for(root))
    with caplog.at_level(logging.WARNING, logger="talkmesh.data.mead"):
        corpus.sequences()
    assert not corpus.sequences("val") and not corpus.sequences("test")
    val = [r.getMessage() for r in caplog.records if "'val'" in r.getMessage()]
    test = [r.getMessage() for r in caplog.records if "'test'" in r.getMessage()]
    assert len(val) == 1 and "M032" in val[0]  # names the split's actors, none on disk
    assert len(test) == 1 and "reference" in test[0] and "M037" in test[0]
    assert corpus.info.notes["empty_splits"] == "val test"


def test_no_warning_when_val_and_test_have_clips(mead_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="talkmesh.data.mead"):
        open_corpus(cfg_for(mead_root, smoothing=False)).sequences()
    assert not [r for r in caplog.records if "split" in r.getMessage() and "empty" in r.getMessage()]


def test_mixed_153_and_156_columns_warn_and_read_to_flame56(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mead"
    raw156 = write_clip(root, "M003_01_1_001", 12, cols=156, seed=1)
    raw153 = write_clip(root, "M003_01_1_002", 12, cols=153, seed=2)
    corpus = open_corpus(cfg_for(root, smoothing=False))
    with caplog.at_level(logging.WARNING, logger="talkmesh.data.mead"):
        corpus.sequences()
    mixed = [r.getMessage() for r in caplog.records if "153" in r.getMessage()]
    assert len(mixed) == 1 and "1 of 2" in mixed[0] and "M003_01_1_002" in mixed[0] and "head" in mixed[0]
    assert corpus.info.notes["columns_mixed"].startswith("1 of 2")
    a, b = corpus.load("M003_01_1_001"), corpus.load("M003_01_1_002")
    assert a.params.shape == b.params.shape == (12, 53)  # both in the FLAME-56 layout
    np.testing.assert_array_equal(a.params[:, 50:53], raw156[:, 53:56])  # jaw from its own columns
    np.testing.assert_array_equal(b.params[:, 50:53], raw153[:, 50:53])
    assert a.head_pose is not None and b.head_pose is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="talkmesh.data.mead"):
        open_corpus(cfg_for(tmp_path / "mead", smoothing=False)).info  # noqa: B018
    assert len([r for r in caplog.records if "153" in r.getMessage()]) == 1  # once per corpus
