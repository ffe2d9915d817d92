"""VOCASET reader (datasets.md §2, §7): both layouts on tiny fake data with the real subject
names and sentence ids, official splits, 30/60 fps, 16 kHz audio, memory-mapping, errors."""

from __future__ import annotations

import os
import pickle
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from talkmesh.config import DataConfig
from talkmesh.data.corpus import open_corpus
from talkmesh.data.errors import DataError
from talkmesh.data.vocaset import TEST_SUBJECTS, TRAIN_SUBJECTS, VAL_SUBJECTS, VocasetCorpus, vocaset_split

V = 30
RATE = 22050  # not 16 kHz: the loader must read the rate and resample
EXTRA = "FaceTalk_999999_99999_TA"  # a user's own subject, outside the official lists
LIPS = [20, 21, 21, 22, 23]  # duplicate on purpose (the real file has some)
FOREHEAD = [1, 2, 3]
EYES = [3, 4, 5, 6]


def _sentences() -> dict[str, list[int]]:
    """A few sentences per subject that straddle every split boundary."""
    plan = {s: [1, 40] for s in TRAIN_SUBJECTS}
    plan.update({s: [20, 21] for s in VAL_SUBJECTS})
    plan.update({s: [1, 20, 21, 40] for s in TEST_SUBJECTS})
    plan[EXTRA] = [3]
    return plan


def make_data(seed: int = 0, plan: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """name -> {subject, sentence key, verts (T60, V, 3), pcm int16, rate, freq}."""
    rng = np.random.default_rng(seed)
    data = {}
    for i, (subject, sentences) in enumerate(sorted((plan or _sentences()).items())):
        for j, n in enumerate(sentences):
            t60 = 7 + (i + j) % 4  # odd and even lengths
            freq = 200.0 + 50 * j
            t = np.arange(int(round(t60 / 60 * RATE))) / RATE
            pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
            data[f"{subject}_sentence{n:02d}"] = {
                "subject": subject,
                "sentence": f"sentence{n:02d}",
                "verts": rng.normal(size=(t60, V, 3)).astype(np.float32) * 0.01,
                "pcm": pcm,
                "rate": RATE,
                "freq": freq,
            }
    return data


def _templates(data: dict[str, dict]) -> dict[str, np.ndarray]:
    return {d["subject"]: np.full((V, 3), 0.5, dtype=np.float32) + k for k, d in enumerate(data.values())}


def write_masks(path, lips=LIPS, forehead=FOREHEAD, eyes=EYES) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    masks = {"lips": np.array(lips), "forehead": np.array(forehead), "eye_region": np.array(eyes),
             "nose": np.array([7, 8])}
    with open(path, "wb") as f:
        pickle.dump(masks, f, protocol=2)


def write_original(root, data: dict[str, dict], extra_rows: int = 0, masks: bool = True) -> None:
    """The original release: rows of all sequences interleaved in a shuffled order."""
    root.mkdir(parents=True, exist_ok=True)
    slots = [(name, f) for name, d in data.items() for f in range(d["verts"].shape[0])]
    order = np.random.default_rng(1).permutation(len(slots))
    total = len(slots) + extra_rows
    mm = np.lib.format.open_memmap(root / "data_verts.npy", mode="w+", dtype=np.float32, shape=(total, V, 3))
    seq_to_idx: dict[str, dict[str, dict[int, int]]] = {}
    for row, k in enumerate(order):
        name, frame = slots[k]
        d = data[name]
        mm[row] = d["verts"][frame]
        seq_to_idx.setdefault(d["subject"], {}).setdefault(d["sentence"], {})[frame] = row
    mm.flush()
    del mm
    audio = {}
    for d in data.values():
        audio.setdefault(d["subject"], {})[d["sentence"]] = {"audio": d["pcm"], "sample_rate": d["rate"]}
    for fname, obj in (("subj_seq_to_idx.pkl", seq_to_idx), ("raw_audio_fixed.pkl", audio),
                       ("templates.pkl", _templates(data))):
        with open(root / fname, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    if masks:
        write_masks(root / "FLAME_masks.pkl")


def write_processed(root, data: dict[str, dict], masks: bool = True) -> None:
    (root / "vertices_npy").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(exist_ok=True)
    for name, d in data.items():
        np.save(root / "vertices_npy" / f"{name}.npy", d["verts"].reshape(d["verts"].shape[0], -1))  # (T60, V*3)
        sf.write(str(root / "wav" / f"{name}.wav"), d["pcm"], d["rate"], subtype="PCM_16")
    with open(root / "templates.pkl", "wb") as f:
        pickle.dump(_templates(data), f, protocol=2)
    if masks:
        write_masks(root / "regions" / "FLAME_masks.pkl")


def corpus(root, **kw) -> VocasetCorpus:
    c = open_corpus(DataConfig(format="vocaset", root=str(root), **kw))
    assert isinstance(c, VocasetCorpus)
    return c


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


# ---- splits --------------------------------------------------------------------------------


def test_official_split_table():
    subjects = (*TRAIN_SUBJECTS, *VAL_SUBJECTS, *TEST_SUBJECTS)
    assert len(set(subjects)) == 12
    counts: dict[str, int] = {}
    for s in subjects:
        for n in range(1, 41):
            split = vocaset_split(s, f"{n:02d}")
            counts[split] = counts.get(split, 0) + 1
    assert counts == {"train": 320, "val": 40, "test": 40, "reference": 80}
    assert vocaset_split(TEST_SUBJECTS[0], "20") == "reference"
    assert vocaset_split(TEST_SUBJECTS[0], "21") == "test"
    assert vocaset_split(VAL_SUBJECTS[1], "01") == "reference"
    assert vocaset_split(TRAIN_SUBJECTS[0], "41") == "unused"
    assert vocaset_split(EXTRA, "01") == "unused"


@pytest.mark.parametrize("layout", ["original", "processed"])
def test_splits_info_and_reference_pool(tmp_path, layout):
    data = make_data()
    (write_original if layout == "original" else write_processed)(tmp_path, data)
    c = corpus(tmp_path)
    assert c.layout == layout
    info = c.info
    assert (info.format, info.fps, info.motion, info.num_vertices, info.param_dim) == ("vocaset", 30.0, "vertices",
                                                                                       V, 0)
    assert not info.has_head_pose
    assert info.train_subjects == TRAIN_SUBJECTS
    assert info.splits == ("train", "val", "test", "reference")
    assert info.eval_splits == ("test",) and info.unseen_splits == ("val", "test")
    assert info.samples_per_frame == pytest.approx(16000 / 30)
    assert len(c.sequences("train")) == 16
    assert {s.subject for s in c.sequences("train")} == set(TRAIN_SUBJECTS)
    assert sorted(s.name for s in c.sequences("val")) == sorted(f"{s}_sentence21" for s in VAL_SUBJECTS)
    assert {(s.subject, s.sentence) for s in c.sequences("test")} == {(s, n) for s in TEST_SUBJECTS
                                                                      for n in ("21", "40")}
    ref = c.sequences("reference")
    assert {(s.subject, s.sentence) for s in ref} == {*((s, n) for s in TEST_SUBJECTS for n in ("01", "20")),
                                                       *((s, "20") for s in VAL_SUBJECTS)}
    # The extra subject is indexed, unused, and loads.
    extra = [s for s in c.sequences() if s.subject == EXTRA]
    assert [s.split for s in extra] == ["unused"]
    assert c.load(extra[0]).vertices.shape[1:] == (V, 3)
    assert c.subject_index(TRAIN_SUBJECTS[3]) == 3 and c.subject_index(TEST_SUBJECTS[0]) == -1
    pool = c.reference_pool(TEST_SUBJECTS[1])
    assert [s.sentence for s in pool] == ["01", "20"]
    clip = c.reference_clip(TEST_SUBJECTS[1], seconds=0.2)
    assert clip.num_frames == 6 and clip.audio.shape[0] == 3200
    assert "missing_train_subjects" not in info.notes
    summary = c.summary()
    assert summary["regions"]["lips"] == 4 and summary["splits"]["unused"]["sequences"] == 1


# ---- both layouts, same clips --------------------------------------------------------------


def test_layouts_give_the_same_clips(tmp_path):
    data = make_data()
    write_original(tmp_path / "orig", data)
    write_processed(tmp_path / "proc", data)
    a, b = corpus(tmp_path / "orig"), corpus(tmp_path / "proc")
    assert (a.layout, b.layout) == ("original", "processed")
    sa, sb = a.sequences(), b.sequences()
    assert [(s.name, s.subject, s.split, s.sentence, s.num_frames) for s in sa] == \
           [(s.name, s.subject, s.split, s.sentence, s.num_frames) for s in sb]
    for x, y in zip(sa, sb, strict=True):
        assert x.audio_seconds == pytest.approx(y.audio_seconds, abs=1e-6)
    for seq in sa:
        d = data[seq.name]
        ca, cb = a.load(seq.name), b.load(seq.name)
        expect = d["verts"][::2]  # (T, V, 3), 60 -> 30 fps
        assert ca.fps == cb.fps == 30.0
        assert ca.num_frames == (d["verts"].shape[0] + 1) // 2 == seq.num_frames
        np.testing.assert_array_equal(ca.vertices, expect)
        np.testing.assert_array_equal(cb.vertices, expect)
        np.testing.assert_array_equal(ca.template, cb.template)
        assert ca.audio.dtype == np.float32 and ca.audio.ndim == 1
        n16 = int(round(d["pcm"].shape[0] * 16000 / RATE))
        assert ca.audio.shape == cb.audio.shape == (n16,)
        np.testing.assert_allclose(ca.audio, cb.audio, atol=1e-5)
        assert ca.split == cb.split == seq.split and ca.text is None


def test_audio_is_resampled_to_16k(tmp_path):
    data = make_data()
    write_original(tmp_path, data)
    c = corpus(tmp_path)
    name = next(n for n, d in data.items() if d["verts"].shape[0] == 10)
    clip = c.load(name)
    d = data[name]
    assert clip.audio_seconds == pytest.approx(d["pcm"].shape[0] / RATE, abs=1e-4)
    assert c.get(name).audio_seconds == pytest.approx(d["pcm"].shape[0] / RATE)
    spec = np.abs(np.fft.rfft(clip.audio * np.hanning(clip.audio.shape[0]), n=16000 * 4))
    assert np.argmax(spec) / 4 == pytest.approx(d["freq"], abs=2.0)  # pitch preserved
    assert np.abs(clip.audio).max() == pytest.approx(0.3, abs=0.03)  # int16 scaled to [-1, 1]


@pytest.mark.parametrize("layout", ["original", "processed"])
def test_native_60_fps_and_bad_rates(tmp_path, layout):
    data = make_data()
    (write_original if layout == "original" else write_processed)(tmp_path, data)
    c = corpus(tmp_path, fps=60.0)
    assert c.info.fps == 60.0 and c.info.samples_per_frame == pytest.approx(16000 / 60)
    for seq in c.sequences()[:5]:
        clip = c.load(seq)
        np.testing.assert_array_equal(clip.vertices, data[seq.name]["verts"])
        assert seq.num_frames == clip.num_frames == data[seq.name]["verts"].shape[0]
    for bad in (20.0, 25.0, 45.0, 120.0):
        with pytest.raises(DataError, match="data.fps"):
            corpus(tmp_path, fps=bad)


# ---- memory-mapping ------------------------------------------------------------------------


def test_original_layout_memory_maps_data_verts(tmp_path, monkeypatch):
    data = make_data()
    write_original(tmp_path, data)
    calls = []
    real_load = np.load

    def spy(file, *args, **kwargs):
        calls.append((os.path.basename(str(file)), kwargs.get("mmap_mode", args[0] if args else None)))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    c = corpus(tmp_path)
    c.load(c.sequences()[0])
    verts_calls = [mode for f, mode in calls if f == "data_verts.npy"]
    assert verts_calls and all(mode == "r" for mode in verts_calls)


def test_huge_sparse_data_verts_is_not_read_whole(tmp_path):
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1, 2], TEST_SUBJECTS[0]: [1]})
    write_original(tmp_path, data, extra_rows=3_000_000)  # ~1 GB file, sparse on disk
    assert os.path.getsize(tmp_path / "data_verts.npy") > 1e9
    tracemalloc.start()
    try:
        c = corpus(tmp_path)
        seqs = c.sequences()
        clips = [c.load(s) for s in seqs]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB: data_verts.npy was read whole"
    for s, clip in zip(seqs, clips, strict=True):
        np.testing.assert_array_equal(clip.vertices, data[s.name]["verts"][::2])


# ---- regions -------------------------------------------------------------------------------


def test_flame_regions_and_overrides(tmp_path):
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1]})
    write_original(tmp_path, data)
    r = corpus(tmp_path).regions()
    np.testing.assert_array_equal(r.lips, [20, 21, 22, 23])  # unique, sorted
    np.testing.assert_array_equal(r.upper, [1, 2, 3, 4, 5, 6])  # forehead U eye_region
    assert "FLAME_masks.pkl" in r.sources["lips"] and "md5" in r.sources["upper"]
    lve = tmp_path / "my_lips.txt"
    lve.write_text("9, 8, 7")
    r2 = corpus(tmp_path, lip_regions=str(lve)).regions()
    np.testing.assert_array_equal(r2.lips, [7, 8, 9])
    np.testing.assert_array_equal(r2.upper, r.upper)
    assert "my_lips.txt" in r2.sources["lips"]
    # Out-of-range indices for this mesh are refused.
    write_masks(tmp_path / "FLAME_masks.pkl", lips=[5, V + 3])
    with pytest.raises(DataError, match=r"FLAME_masks.pkl.*\[0, 30\)"):
        corpus(tmp_path).regions()


def test_missing_masks_say_what_to_provide(tmp_path):
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1]})
    write_processed(tmp_path, data, masks=False)
    c = corpus(tmp_path)
    c.load(c.sequences()[0])  # data loads without regions
    with pytest.raises(DataError, match=r"FLAME_masks\.pkl.*SelfTalk"):
        c.regions()
    # Both overrides given: no masks file needed.
    (tmp_path / "l.txt").write_text("1 2")
    (tmp_path / "u.txt").write_text("3 4")
    r = corpus(tmp_path, lip_regions=str(tmp_path / "l.txt"), upper_regions=str(tmp_path / "u.txt")).regions()
    np.testing.assert_array_equal(r.upper, [3, 4])


# ---- transcripts, notes, pickling ---------------------------------------------------------


def test_transcripts_are_optional(tmp_path):
    data = make_data()
    write_processed(tmp_path, data)
    s = TEST_SUBJECTS[0]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / f"{s}.txt").write_text("\n".join(f"line {i}" for i in range(1, 41)) + "\n")
    (tmp_path / "text" / f"{s}_sentence40.txt").write_text("per sequence\n")
    c = corpus(tmp_path)
    assert c.load(f"{s}_sentence21").text == "line 21"
    assert c.load(f"{s}_sentence40").text == "per sequence"
    assert c.load(f"{TEST_SUBJECTS[1]}_sentence21").text is None


def test_missing_train_subject_and_skipped_sequences_are_noted(tmp_path):
    plan = _sentences()
    del plan[TRAIN_SUBJECTS[2]]
    data = make_data(plan=plan)
    write_original(tmp_path, data)
    audio = pickle.load(open(tmp_path / "raw_audio_fixed.pkl", "rb"))
    del audio[TEST_SUBJECTS[0]]["sentence21"]  # motion without audio: skipped, like the reference
    with open(tmp_path / "raw_audio_fixed.pkl", "wb") as f:
        pickle.dump(audio, f)
    c = corpus(tmp_path)
    assert c.info.train_subjects == TRAIN_SUBJECTS  # one-hot stays stable
    assert TRAIN_SUBJECTS[2] in c.info.notes["missing_train_subjects"]
    assert f"{TEST_SUBJECTS[0]}_sentence21" in c.info.notes["skipped"]
    assert f"{TEST_SUBJECTS[0]}_sentence21" not in {s.name for s in c.sequences()}
    assert len(c.sequences("train")) == 14


def test_corpus_pickles_without_the_audio_cache(tmp_path):
    data = make_data()
    write_original(tmp_path, data)
    c = corpus(tmp_path)
    first = c.load(c.sequences()[0])
    assert "_raw_audio" in c.__dict__
    blob = pickle.dumps(c)
    assert len(blob) < sum(d["pcm"].nbytes for d in data.values())
    c2 = pickle.loads(blob)
    assert "_raw_audio" not in c2.__dict__
    np.testing.assert_array_equal(c2.load(first.name).audio, first.audio)


# ---- errors --------------------------------------------------------------------------------


def test_layout_detection_errors(tmp_path):
    with pytest.raises(DataError, match=r"vertices_npy/.*data_verts\.npy.*neither"):
        corpus(tmp_path)
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1]})
    write_original(tmp_path, data)
    write_processed(tmp_path, data)
    with pytest.raises(DataError, match="both.*data.layout"):
        corpus(tmp_path)
    assert corpus(tmp_path, layout="processed").layout == "processed"
    assert corpus(tmp_path, layout="original").load(f"{TRAIN_SUBJECTS[0]}_sentence01").num_frames > 0


def test_original_layout_errors(tmp_path):
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1], TEST_SUBJECTS[0]: [21]})
    write_original(tmp_path, data)
    for fname in ("subj_seq_to_idx.pkl", "raw_audio_fixed.pkl", "templates.pkl"):
        good = (tmp_path / fname).read_bytes()
        (tmp_path / fname).write_bytes(b"not a pickle at all")
        with pytest.raises(DataError, match=fname):
            corpus(tmp_path).sequences()
        with open(tmp_path / fname, "wb") as f:
            pickle.dump(_Evil(), f)
        with pytest.raises(DataError, match=f"{fname}.*refusing"):
            corpus(tmp_path).sequences()
        assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
        (tmp_path / fname).unlink()
        with pytest.raises(DataError, match=f"{fname}.*not found"):
            corpus(tmp_path).sequences()
        (tmp_path / fname).write_bytes(good)
    good = (tmp_path / "data_verts.npy").read_bytes()
    (tmp_path / "data_verts.npy").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="data_verts.npy"):
        corpus(tmp_path).sequences()
    np.save(tmp_path / "data_verts.npy", np.zeros((40, V + 1, 3), np.float32))  # vertex count mismatch
    with pytest.raises(DataError, match=r"data_verts\.npy.*\(frames, 30, 3\)"):
        corpus(tmp_path).sequences()
    np.save(tmp_path / "data_verts.npy", np.zeros((3, V, 3), np.float32))  # rows out of range
    with pytest.raises(DataError, match="subj_seq_to_idx.pkl.*outside"):
        corpus(tmp_path).sequences()
    (tmp_path / "data_verts.npy").write_bytes(good)
    audio = pickle.load(open(tmp_path / "raw_audio_fixed.pkl", "rb"))
    audio[TEST_SUBJECTS[0]]["sentence21"] = {"audio": np.zeros(10, np.int16)}
    with open(tmp_path / "raw_audio_fixed.pkl", "wb") as f:
        pickle.dump(audio, f)
    with pytest.raises(DataError, match="raw_audio_fixed.pkl.*sample_rate"):
        corpus(tmp_path).sequences()


def test_processed_layout_errors(tmp_path):
    data = make_data(plan={TRAIN_SUBJECTS[0]: [1, 2]})
    write_processed(tmp_path, data)
    name = f"{TRAIN_SUBJECTS[0]}_sentence01"
    vdir, wdir = tmp_path / "vertices_npy", tmp_path / "wav"
    # Names that do not parse.
    np.save(vdir / "stray.npy", np.zeros((2, V * 3), np.float32))
    with pytest.raises(DataError, match=r"stray\.npy.*sentenceXX"):
        corpus(tmp_path).sequences()
    (vdir / "stray.npy").unlink()
    # Missing wav.
    wav = (wdir / f"{name}.wav").read_bytes()
    (wdir / f"{name}.wav").unlink()
    with pytest.raises(DataError, match=f"{name}.wav"):
        corpus(tmp_path).sequences()
    (wdir / f"{name}.wav").write_bytes(wav)
    # Corrupt npy.
    npy = (vdir / f"{name}.npy").read_bytes()
    (vdir / f"{name}.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{name}.npy"):
        corpus(tmp_path).sequences()
    # Vertex count that does not match the template.
    np.save(vdir / f"{name}.npy", np.zeros((4, (V + 2) * 3), np.float32))
    with pytest.raises(DataError, match=f"{name}.npy.*{V * 3}"):
        corpus(tmp_path).load(name)
    (vdir / f"{name}.npy").write_bytes(npy)
    # templates.pkl missing / malicious.
    tpl = (tmp_path / "templates.pkl").read_bytes()
    (tmp_path / "templates.pkl").unlink()
    with pytest.raises(DataError, match="templates.pkl"):
        _ = corpus(tmp_path).info
    with open(tmp_path / "templates.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="templates.pkl.*refusing"):
        corpus(tmp_path).load(name)
    (tmp_path / "templates.pkl").write_bytes(tpl)
    # Malicious FLAME masks are refused too.
    with open(tmp_path / "regions" / "FLAME_masks.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="refusing"):
        corpus(tmp_path).regions()
    assert not os.path.exists("PWNED") and corpus(tmp_path).load(name).num_frames > 0
