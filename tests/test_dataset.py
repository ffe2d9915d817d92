"""Windows, whole sequences, collate (padding, masks, audio matched to motion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.data.clip import Clip, SequenceInfo
from talkmesh.data.corpus import Corpus, CorpusInfo, concat_clips
from talkmesh.data.dataset import ClipDataset, collate_clips
from talkmesh.data.errors import DataError
from talkmesh.data.regions import Regions

FPS = 25.0
V = 6


class MemoryCorpus(Corpus):
    """A corpus held in memory: two training subjects and one unseen subject."""

    format_name = "memory"

    def __init__(self, lengths: dict[str, int], cfg: DataConfig | None = None) -> None:
        super().__init__(cfg or DataConfig(window_seconds=0.4))
        self.lengths = lengths
        self.loads = 0

    @property
    def info(self) -> CorpusInfo:
        return CorpusInfo(
            format="memory", root="", fps=FPS, motion="vertices", num_vertices=V, param_dim=0,
            has_head_pose=False, train_subjects=("A", "B"), splits=("train", "test", "reference"),
            eval_splits=("test",), unseen_splits=("test",),
        )

    def _index(self) -> list[SequenceInfo]:
        out = []
        for name, n in self.lengths.items():
            subject, split = name.split("_")[0], name.split("_")[1]
            out.append(SequenceInfo(name=name, subject=subject, split=split, num_frames=n, audio_seconds=n / FPS))
        return out

    def _load(self, seq: SequenceInfo) -> Clip:
        self.loads += 1
        n = seq.num_frames
        t = np.arange(n, dtype=np.float32)
        verts = np.zeros((n, V, 3), dtype=np.float32) + t[:, None, None]  # frame index in every coordinate
        audio = np.repeat(t, 640).astype(np.float32)  # sample value = its frame index
        return Clip(name=seq.name, subject=seq.subject, audio=audio[: n * 640 - 100], fps=FPS,
                    vertices=verts, template=np.zeros((V, 3), np.float32), split=seq.split, text=seq.name)

    def template(self, subject: str) -> np.ndarray:
        return np.zeros((V, 3), np.float32)

    def regions(self) -> Regions:
        return Regions(lips=np.arange(2), upper=np.arange(2, 4))


@pytest.fixture
def corpus():
    return MemoryCorpus({"A_train_1": 30, "A_train_2": 5, "B_train_1": 50, "C_test_1": 40, "C_reference_1": 20})


def test_windows_are_random_per_epoch_but_reproducible(corpus):
    ds = ClipDataset(corpus, "train", mode="window", seed=3)
    assert ds.window_frames == 10 and len(ds) == 3
    starts0 = [ds.window_start(i) for i in range(len(ds))]
    clip = ds[2]
    assert clip.num_frames == 10
    assert clip.vertices[0, 0, 0] == starts0[2]  # the window starts where window_start says
    # audio follows the window: sample value = frame index, 640 samples per frame at 25 fps
    assert clip.audio.shape == (6400,) and clip.audio[0] == starts0[2]
    ds2 = ClipDataset(corpus, "train", mode="window", seed=3)
    assert [ds2.window_start(i) for i in range(3)] == starts0
    starts = {tuple(ds.window_start(i) for i in range(3)) for ds.epoch in range(8)}
    assert len(starts) > 1  # windows move between epochs
    assert ds[1].num_frames == 5  # shorter than the window: whole sequence


def test_sequence_mode_and_audio_matched_to_motion(corpus):
    ds = ClipDataset(corpus, ["test"], mode="sequence")
    clip = ds[0]
    assert clip.num_frames == 40 and clip.audio.shape == (40 * 640,)  # short audio zero-padded
    assert clip.audio[-1] == 0.0


def test_collate_pads_and_masks(corpus):
    ds = ClipDataset(corpus, "train", mode="sequence")
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["vertices"].shape == (3, 50, V, 3)
    assert batch["audio"].shape == (3, 50 * 640)
    assert batch["motion_lengths"].tolist() == [30, 5, 50]
    assert batch["audio_lengths"].tolist() == [30 * 640, 5 * 640, 50 * 640]
    assert batch["motion_mask"].dtype == torch.bool and batch["motion_mask"].sum(1).tolist() == [30, 5, 50]
    assert torch.all(batch["vertices"][1, 5:] == 0)
    assert batch["subject"].tolist() == [0, 0, 1]
    assert batch["template"].shape == (3, V, 3)
    assert batch["emotion"].tolist() == [-1, -1, -1]
    assert batch["text"] == ["A_train_1", "A_train_2", "B_train_1"]
    assert "params" not in batch


def test_unseen_subject_gets_minus_one_and_dataloader_works(corpus):
    ds = ClipDataset(corpus, "test", mode="sequence")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate)
    (batch,) = list(loader)
    assert batch["subject"].tolist() == [-1]


def test_collate_rejects_mixed_fps_and_empty():
    a = Clip(name="a", subject="s", audio=np.zeros(640, np.float32), fps=25.0, vertices=np.zeros((1, 2, 3)))
    b = Clip(name="b", subject="s", audio=np.zeros(533, np.float32), fps=30.0, vertices=np.zeros((1, 2, 3)))
    with pytest.raises(DataError, match="fps"):
        collate_clips([a, b])
    with pytest.raises(ValueError):
        collate_clips([])


def test_unknown_split_and_empty_selection(corpus):
    with pytest.raises(DataError, match="split 'nope'"):
        ClipDataset(corpus, "nope")
    with pytest.raises(DataError, match="no sequences"):
        ClipDataset(corpus, "train", subjects=["Z"])


def test_clip_cache_is_bounded(corpus):
    small = MemoryCorpus(corpus.lengths, DataConfig(cache_clips=2))
    for name in ["A_train_1", "A_train_2", "B_train_1", "A_train_1"]:
        small.load(name)
    assert small.loads == 4 and len(small._clip_cache) == 2
    small.load("A_train_1")
    assert small.loads == 4  # cached


def test_reference_clip_concatenates_pool(corpus):
    ref = corpus.reference_clip("C", seconds=0.6)  # pool = C_reference_1 (20 frames) -> 15 frames
    assert ref.num_frames == 15 and ref.audio.shape == (15 * 640,)
    assert corpus.reference_pool("A")[0].split == "train"  # seen subjects use their training clips
    both = concat_clips([corpus.load("A_train_2"), corpus.load("A_train_1")], "x")
    assert both.num_frames == 35 and both.audio.shape == (35 * 640,)


def test_items_per_sequence_draws_several_windows_per_sequence(corpus):
    one = ClipDataset(corpus, "train", mode="window", seed=3)
    many = ClipDataset(corpus, "train", mode="window", seed=3, items_per_sequence=4)
    assert len(many) == 4 * len(one) == 12
    assert [many.sequence_index(i) for i in range(12)] == [i // 4 for i in range(12)]
    long_seq = [many.window_start(i) for i in range(8, 12)]  # B_train_1 (50 frames): four windows
    assert len(set(long_seq)) > 1 and all(many[i].name == "B_train_1" for i in range(8, 12))
    assert many[8].vertices[0, 0, 0] == long_seq[0]
    assert one.window_start(0) == ClipDataset(corpus, "train", seed=3, items_per_sequence=1).window_start(0)
    # From the data config (configs/mimic/hdtf.yaml sets 40); whole sequences are never repeated.
    cfg_corpus = MemoryCorpus(corpus.lengths, DataConfig(window_seconds=0.4, items_per_sequence=2))
    assert len(ClipDataset(cfg_corpus, "train", mode="window")) == 6
    assert len(ClipDataset(cfg_corpus, "train", mode="sequence")) == 3
    with pytest.raises(IndexError):
        many.window_start(12)
    with pytest.raises(ValueError, match="items_per_sequence"):
        ClipDataset(corpus, "train", items_per_sequence=0)


def test_items_per_sequence_is_validated_in_the_config():
    from talkmesh.config import ConfigError

    with pytest.raises(ConfigError, match="data.items_per_sequence"):
        DataConfig(items_per_sequence=0)


def test_mimic_hdtf_preset_matches_the_reference_number_of_updates():
    """mimic.md §5: an epoch has len(train_videos) x 40 items of random 150-frame windows;
    150 epochs, with the GRL weight schedule at epochs 20 and 40 (unscaled)."""
    from pathlib import Path

    from talkmesh.train.config import load_experiment

    exp = load_experiment(Path(__file__).resolve().parents[1] / "configs" / "mimic" / "hdtf.yaml")
    assert exp.data.items_per_sequence == 40 and exp.schedule().epochs == 150
    assert exp.method_config().grl_decay_epochs == (20, 40)
