"""3D-HDTF reader (datasets.md 4, 7) on a tiny fake layout with 20-vertex meshes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from talkmesh.config import DataConfig
from talkmesh.data import DataError, open_corpus
from talkmesh.data.hdtf import parse_video_list
from talkmesh.data.safepickle import load_pickle, load_pickle_npy

V = 20

# video, id, frames, tag. With hdtf_train_ids=2 and hdtf_val_ids=1: ids 1-2 train/test-A,
# id 3 val, ids >= 4 test-B.
MAIN_LIST = [
    ("WRA_A_000", 1, 12, "train"),
    ("WRA_B_000", 1, 10, "test"),
    ("WDA_C_000", 2, 8, "train"),
    ("WDA_D_000", 3, 9, "train"),  # val id in the train/test list -> val
    ("RD_E_000", 4, 7, "train"),  # unseen id -> test-B whatever the tag
    ("RD_F_000", 5, 6, "test"),
]
VAL_LIST = [("WRA_G_000", 3, 11, "val")]


def _verts(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.01, size=(frames, V * 3)).astype(np.float32)


def write_video(root: Path, video: str, frames: int, seed: int = 0, sr: int = 16000, audio: bool = True) -> None:
    d = root / "spectre_processed_25fps_16kHz" / video
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "verts_new_shape1.npy", {"verts": _verts(frames, seed)}, allow_pickle=True)
    if audio:
        samples = np.random.default_rng(seed).normal(scale=0.1, size=int(frames / 25 * sr)).astype(np.float32)
        np.save(d / "audio_librosa.npy", {"speech_array": samples, "sampling_rate": sr}, allow_pickle=True)


def _write_masks(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"lips": np.array([2, 3, 3]), "forehead": np.array([10, 11]), "eye_region": np.array([12])}, f)


@pytest.fixture()
def hdtf_root(tmp_path: Path) -> Path:
    root = tmp_path / "hdtf"
    for i, (video, _, frames, _) in enumerate(MAIN_LIST + VAL_LIST):
        write_video(root, video, frames, seed=i, sr=22050 if video == "WDA_C_000" else 16000)
    write_video(root, "UNLISTED_000", 5, seed=99)
    # Mixed separators, a header and a comment: the parse is tolerant (module docstring).
    lines = ["video id frame_num split", "# a comment", ""]
    for j, (video, vid, frames, tag) in enumerate(MAIN_LIST):
        sep = ", " if j % 2 else " "
        lines.append(sep.join([video, str(vid), str(frames), "x", tag]))
    (root / "video_list_id_framenum-train_test.txt").write_text("\n".join(lines) + "\n")
    (root / "video_list_id_framenum-val.txt").write_text(
        "\n".join(f"{v}\t{i}\t{n}\t{t}" for v, i, n, t in VAL_LIST) + "\n"
    )
    templates = {i: np.full((V, 3), 0.1 * i, dtype=np.float32) for i in range(1, 6)}
    templates[2] = templates[2].reshape(-1)  # flattened (15069,)-style entry
    with open(root / "templates.pkl", "wb") as f:
        pickle.dump(templates, f)
    (root / "FLAME_Regions").mkdir()
    (root / "FLAME_Regions" / "lve.txt").write_text("1,4,5,5")
    return root


def cfg_for(root: Path, **kw: object) -> DataConfig:
    return DataConfig(format="hdtf", root=str(root), hdtf_train_ids=2, hdtf_val_ids=1, **kw)  # type: ignore[arg-type]


def test_parse_video_list_tolerant(hdtf_root: Path) -> None:
    entries = parse_video_list(hdtf_root / "video_list_id_framenum-train_test.txt")
    assert [(e.video, e.id, e.frames, e.tag) for e in entries] == MAIN_LIST
    bad = hdtf_root / "bad.txt"
    bad.write_text("a 1 10 train\nb two 10 test\n")
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        parse_video_list(bad)


def test_index_and_splits(hdtf_root: Path) -> None:
    corpus = open_corpus(cfg_for(hdtf_root))
    split = {s.name: s.split for s in corpus.sequences()}
    assert split == {
        "WRA_A_000": "train",
        "WRA_B_000": "test-A",
        "WDA_C_000": "train",
        "WDA_D_000": "val",
        "WRA_G_000": "val",
        "RD_E_000": "test-B",
        "RD_F_000": "test-B",
    }
    seq = corpus.get("WRA_A_000")
    assert (seq.subject, seq.num_frames, seq.audio_seconds) == ("1", 12, None)
    info = corpus.info
    assert info.train_subjects == ("1", "2")
    assert info.fps == 25 and info.motion == "vertices" and info.num_vertices == V
    assert info.splits == ("train", "val", "test-A", "test-B")
    assert info.eval_splits == ("test-A", "test-B") and info.unseen_splits == ("val", "test-B")
    assert "test-B = ids > 3" in info.notes["split_rule"] and info.notes["unlisted_videos"] == "1"
    assert corpus.subject_index("2") == 1 and corpus.subject_index("4") == -1
    # Seen-subject pool (base default): the id's training clips.
    assert [s.name for s in corpus.reference_pool("1")] == ["WRA_A_000"]


def test_val_rule_without_val_file(hdtf_root: Path) -> None:
    (hdtf_root / "video_list_id_framenum-val.txt").unlink()
    corpus = open_corpus(cfg_for(hdtf_root))
    assert [s.name for s in corpus.sequences("val")] == ["WDA_D_000"]
    assert "no val list" in corpus.info.notes["split_rule"]


def test_load_clip(hdtf_root: Path) -> None:
    corpus = open_corpus(cfg_for(hdtf_root))
    clip = corpus.load("WRA_A_000")
    assert clip.vertices.shape == (12, V, 3) and clip.vertices.dtype == np.float32
    np.testing.assert_array_equal(clip.vertices.reshape(12, -1), _verts(12, 0))
    np.testing.assert_allclose(clip.template, np.full((V, 3), 0.1))
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (12 * 640,)
    assert clip.fps == 25 and clip.subject == "1" and clip.split == "train" and clip.params is None
    # 22.05 kHz audio is resampled to 16 kHz; a flattened template entry is reshaped to (V, 3).
    clip_c = corpus.load("WDA_C_000")
    assert clip_c.audio.shape == (8 * 640,)
    assert corpus.template("2").shape == (V, 3)
    np.testing.assert_array_equal(corpus.vertices_of(clip), clip.vertices)


def test_regions(hdtf_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="FLAME_masks.pkl"):
        open_corpus(cfg_for(hdtf_root)).regions()
    _write_masks(hdtf_root / "FLAME_masks.pkl")
    regions = open_corpus(cfg_for(hdtf_root)).regions()
    np.testing.assert_array_equal(regions.lips, [1, 4, 5])  # the release's lve.txt
    np.testing.assert_array_equal(regions.upper, [10, 11, 12])  # forehead U eye_region
    assert "lve.txt" in regions.sources["lips"] and "FLAME_masks.pkl" in regions.sources["upper"]
    # Without masks, an explicit upper-face list is enough.
    (hdtf_root / "FLAME_masks.pkl").unlink()
    upper = tmp_path / "upper.txt"
    upper.write_text("7 8 9")
    regions = open_corpus(cfg_for(hdtf_root, upper_regions=str(upper))).regions()
    np.testing.assert_array_equal(regions.upper, [7, 8, 9])
    np.testing.assert_array_equal(regions.lips, [1, 4, 5])


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (self.target,))


class _EvilBuiltin:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"import os; os.makedirs({self.target!r})",))


@pytest.mark.parametrize("payload", [_Evil, _EvilBuiltin])
def test_malicious_pickle_refused(hdtf_root: Path, tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    path = hdtf_root / "spectre_processed_25fps_16kHz" / "WRA_A_000" / "verts_new_shape1.npy"
    np.save(path, {"verts": payload(str(marker))}, allow_pickle=True)
    corpus = open_corpus(cfg_for(hdtf_root))
    with pytest.raises(DataError, match=r"verts_new_shape1\.npy.*refusing to unpickle"):
        corpus.load("WRA_A_000")
    assert not marker.exists()
    # The same for a plain pickle (templates.pkl).
    with open(hdtf_root / "templates.pkl", "wb") as f:
        pickle.dump({1: payload(str(marker))}, f)
    with pytest.raises(DataError, match=r"templates\.pkl.*refusing to unpickle"):
        load_pickle(hdtf_root / "templates.pkl")
    assert not marker.exists()


def test_restricted_npy_plain_arrays(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(load_pickle_npy(tmp_path / "a.npy"), arr)
    np.save(tmp_path / "d.npy", {"x": arr, "rate": np.int64(16000)}, allow_pickle=True)
    d = load_pickle_npy(tmp_path / "d.npy")
    assert d["rate"] == 16000
    np.testing.assert_array_equal(d["x"], arr)


def test_errors(hdtf_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        open_corpus(cfg_for(tmp_path / "nope"))
    with pytest.raises(DataError, match="video_list_id_framenum-train_test.txt|spectre_processed"):
        open_corpus(cfg_for(tmp_path))
    with pytest.raises(DataError, match="25"):
        open_corpus(cfg_for(hdtf_root, fps=30.0))
    # Missing audio for a listed clip: named at index time.
    (hdtf_root / "spectre_processed_25fps_16kHz" / "RD_E_000" / "audio_librosa.npy").unlink()
    with pytest.raises(DataError, match=r"RD_E_000/audio_librosa\.npy"):
        open_corpus(cfg_for(hdtf_root)).sequences()


def test_wrong_vertex_count_and_missing_verts(hdtf_root: Path) -> None:
    d = hdtf_root / "spectre_processed_25fps_16kHz"
    np.save(d / "WRA_A_000" / "verts_new_shape1.npy", {"verts": np.zeros((12, 33), np.float32)}, allow_pickle=True)
    corpus = open_corpus(cfg_for(hdtf_root))
    with pytest.raises(DataError, match=r"verts_new_shape1\.npy.*\(12, 33\).*\(T, 60\)"):
        corpus.load("WRA_A_000")
    (d / "RD_F_000" / "verts_new_shape1.npy").unlink()
    with pytest.raises(DataError, match=r"RD_F_000/verts_new_shape1\.npy"):
        open_corpus(cfg_for(hdtf_root)).sequences()


def test_style_reference_fallbacks_and_scoring_exclusion(hdtf_root: Path) -> None:
    """metrics.md 6.3 for 3D-HDTF: other clips of the same id; else the first 6 s of the
    evaluated clip, which the evaluator then leaves out of the scores."""
    from types import SimpleNamespace

    import torch

    from talkmesh.eval.evaluate import predict_split

    corpus = open_corpus(cfg_for(hdtf_root))
    ref, skip = corpus.style_reference(corpus.get("WDA_D_000"), seconds=10.0)  # val id 3 has two clips
    assert skip == 0 and ref.num_frames == 11  # the other clip, WRA_G_000
    ref, skip = corpus.style_reference(corpus.get("RD_F_000"), seconds=10.0)  # id 5: one clip of 6 frames
    assert skip == 5 and ref.num_frames == 5  # its own start, all but one frame
    ref, skip = corpus.style_reference(corpus.get("WRA_B_000"), seconds=10.0)  # seen id: its training clips
    assert skip == 0 and ref.subject == "1"

    class ReferenceMethod:  # a reference-conditioned method: encode_style + generate
        facts = SimpleNamespace(train_subjects=("1", "2"))
        conditioning, template_input, reference_seconds = "reference", "vertices", 10.0
        refs: list[int] = []

        def encode_style(self, reference):
            self.refs.append(reference.num_frames)
            return {"frames": reference.num_frames}

        def generate(self, audio, template, style):
            t = int(round(len(audio) / 640))
            return {"vertices": torch.zeros(t, V, 3) + torch.as_tensor(template)}

    out = {p.sequence: (p, gt) for p, gt, _ in predict_split(ReferenceMethod(), corpus, "test-B")}
    assert out["RD_F_000"][0].vertices.shape[0] == out["RD_F_000"][1].shape[0] == 1  # 6 frames - 5 reference
    assert out["RD_E_000"][1].shape[0] == 7 - 6  # 7 frames, its own first 6 were the reference
    assert sorted(ReferenceMethod.refs) == [5, 6]
