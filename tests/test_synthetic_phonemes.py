"""Per-frame phoneme classes of the synthetic corpus, regenerated from meta.json: the hand-made
case, and that the regenerated timeline is the one each stored clip was rendered from (frame
count, transcript, audio energy and lip opening agree with it; a neighbouring stream does not).

Measured figures are printed (pytest -s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.errors import DataError
from talkmesh.data.synthetic import (
    PHONEME_CLASSES,
    SyntheticCorpus,
    clip_timeline,
    frame_phoneme_classes,
    generate_corpus,
    phoneme_classes,
    read_meta,
)
from talkmesh.data.synthetic.content import Segment, clip_rng, phoneme_timeline
from talkmesh.data.synthetic.presets import PHONEME
from talkmesh.data.synthetic.timelines import clip_phoneme_classes, corpus_content

PAUSE, VOWEL = PHONEME_CLASSES.index("pause"), PHONEME_CLASSES.index("vowel")
STEMS = ("S01_seq01", "S04_seq07", "S09_seq02", "S12_seq12")  # train, train, reference, test-B


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("synthetic-phonemes") / "small", preset="small", seed=0)


@pytest.fixture(scope="module")
def corpus(root: Path) -> SyntheticCorpus:
    return open_corpus(DataConfig(format="synthetic", root=str(root), cache_clips=0))


def _centred_rms(audio: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """(T,) RMS of the 16 kHz audio in a one-frame window centred on each frame's time i / fps."""
    spf = 16000.0 / fps
    padded = np.pad(audio, (int(spf), int(spf)))
    starts = (np.arange(num_frames) * spf - spf / 2 + int(spf)).astype(np.int64)  # (T,)
    windows = padded[starts[:, None] + np.arange(int(spf))]  # (T, spf)
    return np.sqrt((windows**2).mean(1))


def _lip_offset(corpus: SyntheticCorpus, stem: str) -> np.ndarray:
    """(T,) mean distance of the lip vertices from the speaker's template."""
    clip = corpus.load(stem)
    lips = corpus.regions().lips
    return np.linalg.norm(clip.vertices[:, lips] - clip.template[lips], axis=-1).mean(1)


def _interior(classes: np.ndarray) -> np.ndarray:
    """(T,) bool: frames whose neighbours carry the same class (away from the boundaries)."""
    same = np.ones(classes.shape[0], dtype=bool)
    same[1:] &= classes[1:] == classes[:-1]
    same[:-1] &= classes[:-1] == classes[1:]
    return same


def test_frame_classes_of_a_hand_made_timeline() -> None:
    segs = [
        Segment(PHONEME[" "], 0.0, 0.1, 0),
        Segment(PHONEME["p"], 0.1, 0.2, 0),
        Segment(PHONEME["a"], 0.2, 0.35, 1),
        Segment(PHONEME["s"], 0.35, 0.4, 0),
        Segment(PHONEME["m"], 0.4, 0.5, 0),
        Segment(PHONEME["l"], 0.5, 0.6, 0),
    ]
    # frames at 0, .05, ..., .75: half-open segments, then pause after the last one
    got = frame_phoneme_classes(segs, 20.0, 16)
    want = [0, 0, 2, 2, 1, 1, 1, 3, 4, 4, 5, 5, 0, 0, 0, 0]
    assert got.dtype == np.int64 and got.tolist() == want
    assert frame_phoneme_classes(segs, 20.0, 0).shape == (0,)
    assert frame_phoneme_classes([], 20.0, 3).tolist() == [0, 0, 0]
    gap = [Segment(PHONEME["a"], 0.0, 0.1, 0), Segment(PHONEME["s"], 0.2, 0.3, 0)]
    assert frame_phoneme_classes(gap, 10.0, 4).tolist() == [1, 0, 3, 0]
    with pytest.raises(ValueError):
        frame_phoneme_classes(segs, 0.0, 4)


def test_classes_match_the_stored_clips(root: Path, corpus: SyntheticCorpus) -> None:
    meta = read_meta(root)
    for stem in STEMS:
        clip = corpus.load(stem)
        classes = corpus.phoneme_classes(stem)
        assert classes.dtype == np.int64 and classes.shape == (clip.num_frames,)
        np.testing.assert_array_equal(classes, phoneme_classes(root, stem))
        np.testing.assert_array_equal(classes, corpus.phoneme_classes(corpus.get(stem)))
        segs = clip_timeline(meta, stem)
        assert "".join(s.ph.char for s in segs[1:-1]) == clip.text
        assert "".join(s.ph.char for s in segs if s.ph.cls != "pause") == clip.text.replace(" ", "")
        assert {PAUSE, VOWEL} <= set(classes.tolist())

        keep = _interior(classes)
        rms = _centred_rms(clip.audio, clip.fps, clip.num_frames)  # (T,)
        pause_rms, vowel_rms = rms[keep & (classes == PAUSE)].mean(), rms[keep & (classes == VOWEL)].mean()
        lips = _lip_offset(corpus, stem)  # (T,)
        pause_lip, vowel_lip = lips[classes == PAUSE].mean(), lips[classes == VOWEL].mean()
        print(f"\n[phonemes] {stem}: RMS pause {pause_rms:.4f} vowel {vowel_rms:.4f}; "
              f"lip offset pause {pause_lip:.5f} vowel {vowel_lip:.5f}")
        assert vowel_rms > 20 * pause_rms
        assert vowel_lip > 2 * pause_lip


def _jaw_fit(segs: list[Segment], params: np.ndarray, fps: float) -> float:
    """Pearson r between the per-frame jaw target of the timeline's segments and the stored
    jaw rotation (FLAME-56 column 50) of ``params`` (T, 56)."""
    t = np.arange(params.shape[0]) / fps  # (T,)
    target = np.zeros(params.shape[0])
    for s in segs:
        target[(t >= s.start) & (t < s.end)] = s.ph.jaw
    return float(np.corrcoef(target, params[:, 50])[0, 1])


def test_the_next_stream_fits_worse(root: Path, corpus: SyntheticCorpus) -> None:
    """The timing discriminates: for every clip, the same sentence timed by the next clip's
    stream fits the stored jaw motion worse than the regenerated timeline."""
    meta, content = read_meta(root), corpus_content("small", 0)
    right_r, wrong_r = [], []
    for seq in corpus.sequences():
        n = content.plan_index[seq.name]
        item = content.plan[n]
        style = content.speakers[item["speaker"]]["style"]
        sentence = content.sentences[item["sentence_id"]]
        wrong = phoneme_timeline(sentence, style, item["emotion"], item["intensity"], content.preset,
                                 clip_rng(0, n + 1))
        params = np.load(root / "params_npy" / f"{seq.name}.npy")  # (T, 56)
        right_r.append(_jaw_fit(clip_timeline(meta, seq.name), params, corpus.fps))
        wrong_r.append(_jaw_fit(wrong, params, corpus.fps))
    right, wrong = np.array(right_r), np.array(wrong_r)
    print(f"\n[phonemes] jaw target vs stored jaw over {right.size} clips: r right stream min {right.min():.3f} "
          f"mean {right.mean():.3f}; next stream mean {wrong.mean():.3f}")
    assert right.min() > 0.75 and np.all(right > wrong)
    assert right.mean() > wrong.mean() + 0.2


def test_reduced_fps_matches_the_loaded_clip(root: Path) -> None:
    half = open_corpus(DataConfig(format="synthetic", root=str(root), fps=12.5, cache_clips=0))
    full = phoneme_classes(root, STEMS[0])
    for stem in STEMS:
        classes = half.phoneme_classes(stem)
        assert classes.shape == (half.load(stem).num_frames,)
        np.testing.assert_array_equal(classes, phoneme_classes(root, stem, fps=12.5))
    np.testing.assert_array_equal(half.phoneme_classes(STEMS[0]), full[::2])
    with pytest.raises(DataError, match="divides"):
        phoneme_classes(root, STEMS[0], fps=30.0)


def test_unknown_stem_is_named(root: Path, corpus: SyntheticCorpus) -> None:
    with pytest.raises(DataError, match="S99_seq01"):
        corpus.phoneme_classes("S99_seq01")
    with pytest.raises(DataError, match="S01_seq77"):
        phoneme_classes(root, "S01_seq77")


def test_a_corpus_that_does_not_match_is_refused(root: Path) -> None:
    meta = read_meta(root)
    seq = dict(meta["sequences"]["S01_seq01"], frames=meta["sequences"]["S01_seq01"]["frames"] + 1)
    with pytest.raises(DataError, match="frames"):
        clip_phoneme_classes(dict(meta, sequences={"S01_seq01": seq}), "S01_seq01")
    with pytest.raises(DataError, match="version"):
        clip_phoneme_classes(dict(meta, version=meta["version"] + 1), "S01_seq01")
