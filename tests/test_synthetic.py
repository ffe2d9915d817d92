"""The synthetic corpus (datasets.md 8): layout, splits, determinism, face model, the
audio-motion link, recorded styles, emotions, regions, the cache path and both flavours.

The small corpus is generated once per module; measured figures are printed (pytest -s).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.stats import pearsonr, spearmanr

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.errors import DataError
from talkmesh.data.regions import read_flame_masks, read_index_file
from talkmesh.data.safepickle import load_pickle
from talkmesh.data.synthetic import (
    AUDIO_RATE,
    EXPR,
    STYLE_RANGES,
    SyntheticCorpus,
    generate_corpus,
    speaker_styles,
)
from talkmesh.face.flame import FlameLayer

TRAIN = [f"S{i:02d}" for i in range(1, 9)]
VAL, TEST = ["S09", "S10"], ["S11", "S12"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import time

    t0 = time.perf_counter()
    out = generate_corpus(tmp_path_factory.mktemp("synthetic") / "small", preset="small", seed=0)
    print(f"\n[synthetic] small preset generated in {time.perf_counter() - t0:.2f} s")
    return out


@pytest.fixture(scope="module")
def corpus(root: Path) -> SyntheticCorpus:
    return open_corpus(DataConfig(format="synthetic", root=str(root), cache_clips=200))


@pytest.fixture(scope="module")
def flame_corpus(root: Path) -> SyntheticCorpus:
    return open_corpus(DataConfig(format="synthetic", root=str(root), synthetic_flavour="flame", cache_clips=0))


@pytest.fixture(scope="module")
def params(root: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted((root / "params_npy").glob("*.npy"))}  # (T, 56) each


@pytest.fixture(scope="module")
def audio16k(corpus: SyntheticCorpus) -> dict[str, np.ndarray]:
    return {s.name: corpus.load(s).audio for s in corpus.sequences()}


def _array_hashes(root: Path) -> dict[str, str]:
    """md5 of every array/text file's content (npz: of each array, its zip timestamps aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if path.suffix == ".npz":
            with np.load(path) as z:
                for key in sorted(z.files):
                    out[f"{rel}:{key}"] = hashlib.md5(np.ascontiguousarray(z[key]).tobytes()).hexdigest()
        else:
            out[rel] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


def _frame_rms(audio: np.ndarray, spf: int = 640) -> np.ndarray:
    n = audio.shape[0] // spf
    return np.sqrt((audio[: n * spf].reshape(n, spf) ** 2).mean(1))  # (T,)


def _median_f0(audio: np.ndarray, sr: int = 16000, frame: int = 640) -> float:
    """Autocorrelation pitch over the loud (voiced) frames."""
    n = audio.shape[0] // frame
    frames = audio[: n * frame].reshape(n, frame)
    energy = np.sqrt((frames**2).mean(1))
    lo, hi = sr // 400, sr // 60
    f0 = []
    for x in frames[energy > 0.5 * energy.max()]:
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[frame - 1 :]
        f0.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(f0))


# ---- layout and splits ----------------------------------------------------------------------


def test_layout_files_and_meta(root: Path) -> None:
    stems = sorted(p.stem for p in (root / "vertices_npy").glob("*.npy"))
    assert len(stems) == 12 * 12 and stems[0] == "S01_seq01" and stems[-1] == "S12_seq12"
    for sub, ext in (("params_npy", ".npy"), ("wav", ".wav"), ("text", ".txt")):
        assert sorted(p.stem for p in (root / sub).glob(f"*{ext}")) == stems
    for name in ("templates.pkl", "FLAME_masks.pkl", "face_model.npz", "meta.json", "regions/lve.txt",
                 "regions/fdd.txt"):
        assert (root / name).is_file(), name
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["preset"], meta["seed"], meta["fps"], meta["audio_rate"]) == ("small", 0, 25.0, 22050)
    assert meta["version"] >= 1 and meta["emotions"] == {"0": "neutral", "1": "happy", "2": "sad", "6": "angry"}
    assert set(meta["phonemes"]) >= set("aeioupbmtdkgnfvszSlrwjh ")
    assert [meta["speakers"][s]["role"] for s in sorted(meta["speakers"])] == ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    for spk in meta["speakers"].values():
        assert set(spk["style"]) == set(STYLE_RANGES) and len(spk["shape"]) == 100
    # transcripts are the phoneme strings; a clip lasts 2-4 s
    text = (root / "text" / "S01_seq01.txt").read_text().strip()
    assert text and set(text) <= set(meta["phonemes"])
    assert all(2.0 <= s["seconds"] <= 4.0 for s in meta["sequences"].values())
    # params: FLAME-56; vertices: (T, V*3) with V in the small range
    p = np.load(root / "params_npy" / "S01_seq01.npy")
    v = np.load(root / "vertices_npy" / "S01_seq01.npy")
    assert p.dtype == np.float32 and p.shape[1] == 56 and v.shape[0] == p.shape[0]
    assert 64 <= v.shape[1] // 3 <= 200
    templates = load_pickle(root / "templates.pkl")
    assert sorted(templates) == TRAIN + VAL + TEST and templates["S01"].shape == (v.shape[1] // 3, 3)


def test_splits_and_membership(corpus: SyntheticCorpus) -> None:
    info = corpus.info
    assert info.format == "synthetic" and info.fps == 25.0 and info.motion == "vertices" and info.param_dim == 0
    assert info.splits == ("train", "val", "test-A", "test-B", "reference")
    assert info.eval_splits == ("test-A", "test-B") and info.unseen_splits == ("val", "test-B")
    assert info.train_subjects == tuple(TRAIN)
    by = {(s.subject, int(s.sentence[3:])): s.split for s in corpus.sequences()}
    for subj in TRAIN:
        assert [by[subj, j] for j in range(1, 13)] == ["train"] * 8 + ["val"] * 2 + ["test-A"] * 2
    for subj in VAL:
        assert [by[subj, j] for j in range(1, 13)] == ["reference"] * 4 + ["val"] * 8
    for subj in TEST:
        assert [by[subj, j] for j in range(1, 13)] == ["reference"] * 4 + ["test-B"] * 8
    assert corpus.subjects("test-B") == TEST and corpus.subjects("test-A") == TRAIN
    assert corpus.subject_index("S03") == 2 and corpus.subject_index("S11") == -1
    assert [s.name for s in corpus.reference_pool("S11")] == [f"S11_seq{j:02d}" for j in range(1, 5)]
    assert corpus.reference_clip("S11", 6.0).num_frames == 150
    assert all(s.split in info.splits for s in corpus.sequences())  # nothing unused


def test_audio_on_disk_is_22050_and_loads_at_16k(root: Path, corpus: SyntheticCorpus) -> None:
    info = sf.info(str(root / "wav" / "S02_seq05.wav"))
    assert info.samplerate == AUDIO_RATE == 22050 and info.subtype == "PCM_16" and info.channels == 1
    clip = corpus.load("S02_seq05")
    assert clip.audio.dtype == np.float32
    assert clip.audio.shape[0] == clip.num_frames * 640  # 16 kHz, exactly T frames at 25 fps
    assert 0.01 < float(np.abs(clip.audio).max()) < 1.0
    assert clip.text == (root / "text" / "S02_seq05.txt").read_text().strip()


def test_vertices_are_the_face_model_with_zero_head_rotation(root: Path, corpus: SyntheticCorpus, params) -> None:
    layer = FlameLayer.from_file(root / "face_model.npz")
    meta = json.loads((root / "meta.json").read_text())
    assert layer.num_vertices == corpus.info.num_vertices and layer.n_shape == 100 and layer.n_expr == 50
    with np.load(root / "face_model.npz") as z:
        assert int(z["num_shape_components"]) == 100 and z["shapedirs"].shape[2] == 150
    for name in ("S01_seq01", "S07_seq10", "S12_seq12"):
        clip = corpus.load(name)
        beta = np.asarray(meta["speakers"][clip.subject]["shape"], dtype=np.float32)
        p = params[name]
        expected = layer.vertices_from_params(p[:, :53], beta)  # zero head rotation
        np.testing.assert_allclose(clip.vertices, expected, atol=1e-6)
        np.testing.assert_allclose(clip.template, layer.template(beta), atol=1e-6)
        assert np.abs(p[:, 53:56]).max() > 1e-3  # the head does move, only in the params
        posed = layer.vertices_from_params(p[:, :53], beta, head_pose=p[:, 53:56])
        assert np.abs(posed - clip.vertices).max() > 1e-4
    # the jaw opens the mouth: lip opening follows the jaw parameter
    masks = load_pickle(root / "FLAME_masks.pkl")
    clip = corpus.load("S01_seq01")
    opening = clip.vertices[:, masks["upper_lip"], 1].mean(1) - clip.vertices[:, masks["lower_lip"], 1].mean(1)
    assert pearsonr(opening, params["S01_seq01"][:, 50])[0] > 0.9


# ---- determinism -----------------------------------------------------------------------------


def test_same_seed_identical_other_seed_differs(root: Path, tmp_path: Path) -> None:
    again = generate_corpus(tmp_path / "again", preset="small", seed=0)
    ref = _array_hashes(root)
    assert _array_hashes(again) == ref
    other = generate_corpus(tmp_path / "other", preset="small", seed=1)
    hashes = _array_hashes(other)
    differ = [k for k in ref if k.startswith(("vertices_npy", "params_npy", "wav")) and hashes.get(k) != ref[k]]
    assert len(differ) == 3 * 144
    assert speaker_styles(other) != speaker_styles(root)


# ---- the audio-motion link and recorded styles -----------------------------------------------


def test_audio_energy_predicts_jaw_opening(corpus: SyntheticCorpus, params, audio16k) -> None:
    energy, jaw = [], []
    for s in corpus.sequences():
        e = _frame_rms(audio16k[s.name])
        t = min(e.shape[0], s.num_frames)
        energy.append(e[:t])
        jaw.append(params[s.name][:t, 50])
    r = pearsonr(np.concatenate(energy), np.concatenate(jaw))[0]
    print(f"\n[synthetic] frame RMS energy vs jaw opening: pooled Pearson r = {r:.3f} over {len(energy)} clips")
    assert r > 0.5


def test_recorded_styles_are_measurable(root: Path, corpus: SyntheticCorpus, params) -> None:
    styles = speaker_styles(root)
    assert sorted(styles) == TRAIN + VAL + TEST
    for style in styles.values():
        for key, (lo, hi) in STYLE_RANGES.items():
            assert lo <= style[key] <= hi
    masks = load_pickle(root / "FLAME_masks.pkl")
    lip_std: dict[str, list[float]] = {}
    head_std: dict[str, list[float]] = {}
    for s in corpus.sequences():
        v = corpus.load(s).vertices
        opening = v[:, masks["upper_lip"], 1].mean(1) - v[:, masks["lower_lip"], 1].mean(1)  # (T,)
        lip_std.setdefault(s.subject, []).append(float(opening.std()))
        head_std.setdefault(s.subject, []).append(float(params[s.name][:, 53:56].std(0).mean()))
    subjects = sorted(styles)
    r_lip = spearmanr([styles[s]["articulation_gain"] for s in subjects], [np.mean(lip_std[s]) for s in subjects])[0]
    r_head = spearmanr([styles[s]["head_amplitude"] for s in subjects], [np.mean(head_std[s]) for s in subjects])[0]
    print(f"\n[synthetic] Spearman: articulation gain vs lip-opening std = {r_lip:.3f}; "
          f"head amplitude vs head-pose std = {r_head:.3f}")
    assert r_lip > 0.8
    assert r_head > 0.8


def test_emotions_change_voice_and_face(root: Path, corpus: SyntheticCorpus, params, audio16k) -> None:
    seqs = corpus.sequences()
    assert {s.emotion for s in seqs} == {0, 1, 2, 6}
    assert all(s.intensity == 0 for s in seqs if s.emotion == 0)
    assert {s.intensity for s in seqs if s.emotion != 0} == {0, 1, 2}
    for subj in corpus.subjects():
        assert {s.emotion for s in seqs if s.subject == subj} == {0, 1, 2, 6}
    clip = corpus.load(seqs[0])
    assert (clip.emotion, clip.intensity) == (seqs[0].emotion, seqs[0].intensity)

    styles = speaker_styles(root)
    ratio: dict[int, list[float]] = {0: [], 1: [], 2: [], 6: []}
    offsets: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: [], 6: []}
    f0_neutral = {}
    for subj in corpus.subjects():
        mine = [s for s in seqs if s.subject == subj]
        f0 = {s.name: _median_f0(audio16k[s.name]) for s in mine}
        base = float(np.median([f0[s.name] for s in mine if s.emotion == 0]))
        f0_neutral[subj] = base
        for s in mine:
            ratio[s.emotion].append(f0[s.name] / base)
            cols = [EXPR["smile"], EXPR["brow_raise"], EXPR["brow_furrow"]]
            offsets[s.emotion].append(params[s.name][:, cols].mean(0))
    mean_ratio = {e: float(np.mean(r)) for e, r in ratio.items()}
    mean_off = {e: np.mean(o, axis=0) for e, o in offsets.items()}  # (smile, brow raise, brow furrow)
    r_f0 = spearmanr([styles[s]["f0"] for s in sorted(styles)], [f0_neutral[s] for s in sorted(styles)])[0]
    print(f"\n[synthetic] f0 / neutral f0: happy {mean_ratio[1]:.3f}, sad {mean_ratio[2]:.3f}, angry "
          f"{mean_ratio[6]:.3f}; Spearman recorded f0 vs measured f0 = {r_f0:.3f}")
    assert r_f0 > 0.9
    assert mean_ratio[1] > 1.04 and mean_ratio[6] > 1.03 and mean_ratio[2] < 0.97
    assert mean_off[1][0] > mean_off[0][0] + 0.5  # happy smiles
    assert mean_off[2][1] > mean_off[0][1] + 0.2  # sad raises the (inner) brows
    assert mean_off[6][2] > mean_off[0][2] + 0.5  # angry furrows
    # ... and the upper face moves accordingly in vertex space (brows lowered when angry)
    masks = load_pickle(root / "FLAME_masks.pkl")
    brow_y: dict[int, list[float]] = {0: [], 6: []}
    for s in seqs:
        if s.emotion in brow_y:
            clip = corpus.load(s)
            brow_y[s.emotion].append(float((clip.vertices - clip.template)[:, masks["forehead"], 1].mean()))
    assert np.mean(brow_y[6]) < np.mean(brow_y[0])


# ---- regions ---------------------------------------------------------------------------------


def test_regions_disjoint_and_valid(root: Path, corpus: SyntheticCorpus) -> None:
    nv = corpus.info.num_vertices
    regions = corpus.regions()
    assert regions.lips.size >= 6 and regions.upper.size >= 12
    assert regions.lips.min() >= 0 and max(regions.lips.max(), regions.upper.max()) < nv
    assert np.intersect1d(regions.lips, regions.upper).size == 0
    lips, upper = read_flame_masks(root / "FLAME_masks.pkl", nv)
    np.testing.assert_array_equal(read_index_file(root / "regions" / "lve.txt", nv), lips)
    np.testing.assert_array_equal(read_index_file(root / "regions" / "fdd.txt", nv), upper)
    np.testing.assert_array_equal(regions.lips, lips)
    masks = load_pickle(root / "FLAME_masks.pkl")
    np.testing.assert_array_equal(np.union1d(masks["upper_lip"], masks["lower_lip"]), lips)
    assert "md5" in regions.sources["lips"]
    # user overrides still apply
    custom = root.parent / "my_lips.txt"
    custom.write_text("0,1,2")
    over = open_corpus(DataConfig(format="synthetic", root=str(root), lip_regions=str(custom))).regions()
    assert over.lips.tolist() == [0, 1, 2]


# ---- flavours ----------------------------------------------------------------------------------


def test_flame_flavour(root: Path, corpus: SyntheticCorpus, flame_corpus: SyntheticCorpus, params) -> None:
    info = flame_corpus.info
    assert (info.motion, info.param_dim, info.has_head_pose) == ("params", 53, True)
    assert info.num_vertices == corpus.info.num_vertices and info.splits == corpus.info.splits
    meta = json.loads((root / "meta.json").read_text())
    clip = flame_corpus.load("S05_seq03")
    assert clip.vertices is None and clip.params.shape == (clip.num_frames, 53) and clip.head_pose.shape[1] == 3
    np.testing.assert_array_equal(clip.params, params["S05_seq03"][:, :53])
    np.testing.assert_array_equal(clip.head_pose, params["S05_seq03"][:, 53:56])
    np.testing.assert_array_equal(clip.shape, np.asarray(meta["speakers"]["S05"]["shape"], np.float32))
    layer = flame_corpus.face_model()
    assert isinstance(layer, FlameLayer) and layer.num_vertices == info.num_vertices
    verts = flame_corpus.vertices_of(clip)
    np.testing.assert_allclose(verts, corpus.load("S05_seq03").vertices, atol=1e-6)
    vclip = corpus.load("S05_seq03")  # vertex flavour: vertices only, like VOCASET/BIWI
    assert vclip.params is None and vclip.head_pose is None and vclip.vertices is not None


def test_fps_must_divide_the_stored_rate(root: Path) -> None:
    half = open_corpus(DataConfig(format="synthetic", root=str(root), fps=12.5))
    seq = half.get("S01_seq01")
    assert half.info.fps == 12.5 and half.load(seq).vertices.shape[0] == seq.num_frames
    with pytest.raises(DataError, match="divides"):
        _ = open_corpus(DataConfig(format="synthetic", root=str(root), fps=30)).info


# ---- locating and generating ---------------------------------------------------------------


def test_root_without_a_corpus_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("talkmesh data synth --out")):
        _ = open_corpus(DataConfig(format="synthetic", root=str(tmp_path))).info


def test_generate_corpus_into_existing_dirs(root: Path, tmp_path: Path) -> None:
    assert generate_corpus(root, preset="small", seed=0) == root  # already there: returned as is
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_corpus(busy, preset="small", seed=0)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="preset"):
        generate_corpus(tmp_path / "x", preset="huge", seed=0)  # type: ignore[arg-type]


def _fake_writer(source: Path, calls: list[str]):
    """Stands in for the generator: copies an already generated corpus (fast)."""

    def write(out: Path, preset: str, seed: int, fps: float) -> None:
        calls.append(out.name)
        for item in source.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)

    return write


def test_empty_root_generates_into_cache_once(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import talkmesh.data.synthetic as synthetic

    monkeypatch.setenv("TALKMESH_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(synthetic.store, "write_corpus", _fake_writer(root, calls))
    cfg = DataConfig(format="synthetic", synthetic_preset="small", synthetic_seed=0)
    first = open_corpus(cfg)
    assert calls == [] and not (tmp_path / "cache").exists()  # nothing happens at construction
    target = tmp_path / "cache" / "synthetic-small-s0-25fps"
    assert first.info.root == str(target) and (target / "meta.json").is_file()
    assert len(first.sequences()) == 144 and len(calls) == 1
    second = open_corpus(cfg)
    assert second.load("S03_seq02").num_frames > 0 and len(calls) == 1  # reused, not regenerated
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]  # no temporary leftovers


def test_cache_generation_is_safe_under_concurrency(root: Path, tmp_path: Path, monkeypatch) -> None:
    import talkmesh.data.synthetic as synthetic

    monkeypatch.setenv("TALKMESH_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "synthetic-small-s0-25fps"
    calls: list[str] = []
    copy = _fake_writer(root, calls)

    # Another process finishes while we are still generating: ours is discarded, theirs kept.
    def slow_loser(out: Path, preset: str, seed: int, fps: float) -> None:
        copy(out, preset, seed, fps)
        shutil.copytree(root, target)
        (target / "winner.txt").write_text("the other process")

    monkeypatch.setattr(synthetic.store, "write_corpus", slow_loser)
    assert synthetic.ensure_cached("small", 0, 25.0) == target
    assert (target / "winner.txt").is_file()
    assert sorted(os.listdir(tmp_path / "cache")) == [target.name]

    # Several workers at once: all get the same complete corpus, no temporary dirs remain.
    shutil.rmtree(target)
    calls.clear()
    monkeypatch.setattr(synthetic.store, "write_corpus", copy)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(open_corpus(DataConfig(format="synthetic")).root)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target] * 4 and 1 <= len(calls) <= 4
    assert sorted(os.listdir(tmp_path / "cache")) == [target.name]
    assert _array_hashes(target) == _array_hashes(root)
