"""AdaMesh's learning checks (specs/adamesh.md §14.5-§14.9) on the synthetic corpus (FLAME
flavour), at the spec's thresholds.

One model is trained through all four stages on a test preset: the debug preset with the
paper's four MoLoRA experts (ranks 1, 2, 4, 8, so the gate entropy of §14.6 is measured
against log 4) and the paper's 256-entry pose codebook (the debug preset's 16 codes cannot
reconstruct the corpus's head motion to 20 % of the untrained error, §14.7). The checks:

- §14.5: a constructed unseen speaker whose lip amplitude lies outside the training range;
  adapting on 10 s of it lowers the L1 on its held-out clips (mean over 3 adaptation seeds),
  and the single-expert ranks=(1,) ablation is reported.
- §14.6: a constructed speaker whose lips mix the lip bases differently; the gate entropy
  after adaptation is below log 4 in at least one layer.
- §14.7 / §14.8: pose VQ reconstruction and code usage; PoseGPT cross-entropy; the
  identities' pose embeddings order the generated head motion.
- §14.9: 10 s held-out windows of each training identity retrieve it at least 80 % of the time.
- The corpus's own unseen speakers: adaptation lowers LVE and moves the expression statistics
  toward the speaker; retrieval of unseen speakers picks closer head-motion styles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.clip import Clip
from talkmesh.data.corpus import concat_clips
from talkmesh.data.dataset import ClipDataset, match_audio_to_motion
from talkmesh.data.synthetic import STYLE_RANGES, speaker_styles
from talkmesh.data.synthetic.presets import EXPR, JAW_COL
from talkmesh.eval import metrics as M
from talkmesh.methods import build_method
from talkmesh.methods.adamesh import AdaMesh
from talkmesh.methods.base import DataFacts
from talkmesh.nn.lora import adapter_parameters

pytestmark = [pytest.mark.learning, pytest.mark.usefixtures("one_intra_op_thread")]

# The debug preset with the paper's MoLoRA experts and pose codebook size (see the docstring).
TEST_PRESET = {
    "molora.ranks": (1, 2, 4, 8),
    "pose_vq.codebook_size": 256,
    "pose_vq.code_dim": 4,
    "pose_vq.batch_size": 32,
    "pose_vq.lr": 3e-3,
    "pose_vq.lr_step": 400,
    "posegpt.lr": 3e-3,
}
EPOCHS = {"expression": 25, "pose_vq": 600, "posegpt": 30}  # pose_vq: 2 steps an epoch (64 clips, batch 32)
SEEDS = (0, 1, 2)
UNSEEN = ("S09", "S10", "S11", "S12")  # val speakers S09/S10, test speakers S11/S12
LIP_COLUMNS = [EXPR["jaw_open"], EXPR["lip_round"], EXPR["lip_press"], EXPR["lip_spread"], JAW_COL]


@pytest.fixture(scope="module")
def flame_corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test cache env is not set yet
        mp.setenv("TALKMESH_CACHE", str(tmp_path_factory.getbasetemp() / "talkmesh-cache"))
        corpus = open_corpus(DataConfig(format="synthetic", synthetic_flavour="flame", window_seconds=2.0))
        assert corpus.info.num_train_subjects == 8  # generated now, inside the patched environment
        # The pose prior sees each clip 600 times: keep the loaded clips (audio resampling is most of a load).
        corpus.load = functools.lru_cache(maxsize=None)(corpus.load)
        yield corpus


def train_stage(m: AdaMesh, corpus, stage: str, epochs: int, seed: int = 0) -> list[dict[str, float]]:
    """The training loop's per-stage work without Ray (fit_stage, the config's optimizer and lr factor)."""
    m.set_stage(stage)
    m.fit_stage(ClipDataset(corpus, "train", mode="sequence"))
    sched = m.config.stage_schedule(stage)
    ds = ClipDataset(corpus, "train", mode="window", seed=seed, style_reference_frames=m.style_reference_frames())
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=sched.batch_size,
        shuffle=True,
        collate_fn=ds.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = m.config.build_optimizer(m.trainable_parameters(), stage=stage, lr=sched.lr, weight_decay=0.01)
    history = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for g in opt.param_groups:
            g["lr"] = sched.lr * m.config.lr_factor(stage, epoch)
        m.train()
        if stage == "pose_vq":
            m.pose_vq.quantizer.reset_usage()
        sums: dict[str, float] = {}
        n = 0
        for b in loader:
            loss, logs = m(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
        history.append({k: v / n for k, v in sums.items()})
    return history


def pose_windows(m: AdaMesh, corpus, split: str) -> torch.Tensor:
    """(16, 48, 3) normalised head poses: the first 48 frames of 16 clips of ``split``."""
    poses = [m._norm_pose(torch.as_tensor(corpus.load(s).head_pose[:48])) for s in corpus.sequences(split)[:16]]
    return torch.stack(poses)


def pose_reconstruction(m: AdaMesh, x: torch.Tensor) -> tuple[float, float]:
    """Reconstruction L1 of ``x`` (B, T, 3) in eval mode and the share of codes it uses."""
    with torch.no_grad():
        m.eval()
        rec = float((m.pose_vq(x)[0] - x).abs().mean())
        m.pose_vq.quantizer.reset_usage()
        m.pose_vq.quantizer.train()
        m.pose_vq.quantizer(m.pose_vq.encode(x))
        usage = m.pose_vq.quantizer.usage()
        m.pose_vq.quantizer.eval()
    return rec, usage


@dataclasses.dataclass
class Trained:
    model: AdaMesh
    histories: dict[str, list[dict[str, float]]]
    pose_rec_untrained: dict[str, float]  # by split


@pytest.fixture(scope="module")
def trained(flame_corpus) -> Trained:
    """All four stages on the test preset, seed 0."""
    torch.manual_seed(0)
    m = build_method("adamesh", TEST_PRESET, DataFacts.from_corpus(flame_corpus), preset="debug")
    assert isinstance(m, AdaMesh)
    m.set_stage("pose_vq")
    m.fit_stage(ClipDataset(flame_corpus, "train", mode="sequence"))
    untrained = {split: pose_reconstruction(m, pose_windows(m, flame_corpus, split))[0] for split in ("train", "val")}
    t0 = time.perf_counter()
    histories, secs = {}, {}
    for stage, epochs in EPOCHS.items():
        histories[stage] = train_stage(m, flame_corpus, stage, epochs)
        secs[stage] = round(time.perf_counter() - t0 - sum(secs.values()), 1)
    m.set_stage("pose_index")
    m.fit_stage(ClipDataset(flame_corpus, "train", mode="sequence"))
    m.eval()
    print(f"\nall stages trained in {time.perf_counter() - t0:.1f} s ({secs})")
    return Trained(m, histories, untrained)


# --------------------------------------------------------------------------------------
# §14.7, §14.8: the pose prior and PoseGPT
# --------------------------------------------------------------------------------------


def test_pose_vq_reconstructs_below_a_fifth_of_the_untrained_error_and_uses_its_codes(trained, flame_corpus):
    """§14.7 on the pose data the prior was trained on; the held-out (val) figures are printed
    (the prior generalises less well to unseen sentences: their phoneme-driven head offsets)."""
    m, vq = trained.model, trained.histories["pose_vq"]
    got = {split: pose_reconstruction(m, pose_windows(m, flame_corpus, split)) for split in ("train", "val")}
    ratio = {split: got[split][0] / trained.pose_rec_untrained[split] for split in got}
    print("\npose VQ rec L1 (normalised), untrained -> trained (ratio), code usage: " + "; ".join(
        f"{split} {trained.pose_rec_untrained[split]:.3f} -> {got[split][0]:.3f} ({ratio[split]:.3f}), "
        f"{got[split][1]:.2f}" for split in got) + f"; last epoch usage {vq[-1]['code_usage']:.2f}")
    assert ratio["train"] < 0.2  # §14.7
    assert vq[-1]["code_usage"] > 0.25  # §14.7: more than 25 % of the codes used (by the last epoch's windows)


def test_posegpt_cross_entropy_falls_below_0_7_log_k(trained):
    m, gpt = trained.model, trained.histories["posegpt"]
    log_k = math.log(m.config.pose_vq.codebook_size)
    print(f"\nPoseGPT CE {gpt[0]['code_ce']:.3f} -> {gpt[-1]['code_ce']:.3f} (0.7 log K = {0.7 * log_k:.3f})")
    assert gpt[-1]["code_ce"] < 0.7 * log_k  # §14.8


def held_out(corpus, subject: str, splits: tuple[str, ...] = ("val", "test-B")) -> list[Clip]:
    """The speaker's clips in ``splits`` (for unseen speakers: outside its reference pool)."""
    return [
        match_audio_to_motion(corpus.load(s)) for s in corpus.sequences() if s.subject == subject and s.split in splits
    ]


def test_identity_pose_embeddings_order_the_generated_head_motion(trained, flame_corpus):
    """§14.8: for identical audio, the high-amplitude training identity's embedding gives
    more head motion than the low-amplitude one's."""
    m = trained.model
    styles = speaker_styles(flame_corpus.root)
    amps = {s: styles[s]["head_amplitude"] for s in m.facts.train_subjects}
    low, high = min(amps, key=amps.get), max(amps, key=amps.get)
    clip = held_out(flame_corpus, "S11")[0]
    stds = {s: float(m.generate(clip.audio, None, s)["head_pose"].std(0).mean()) for s in (low, high)}
    print(f"\nhead-pose std with {low} (amplitude {amps[low]:.3f}): {stds[low]:.4f}; with {high} ({amps[high]:.3f}): "
          f"{stds[high]:.4f}")
    assert stds[high] > stds[low]


# --------------------------------------------------------------------------------------
# §14.9: retrieval
# --------------------------------------------------------------------------------------


def test_held_out_windows_retrieve_their_training_identity(trained, flame_corpus):
    """Each training identity's held-out clips (val + test-A, about 12 s) give 10 s windows
    starting every second; each window must retrieve its identity: at least 80 % of them."""
    m = trained.model
    frames, step = int(round(10.0 * flame_corpus.info.fps)), int(round(flame_corpus.info.fps))
    hits, trials, per_identity = 0, 0, {}
    for k, subject in enumerate(m.facts.train_subjects):
        heldout = concat_clips(held_out(flame_corpus, subject, ("val", "test-A")), f"{subject}_heldout")
        got = [
            m.encode_style(heldout.slice_frames(s, s + frames))["pose_identity"] == k
            for s in range(0, heldout.num_frames - frames + 1, step)
        ]
        per_identity[subject] = f"{sum(got)}/{len(got)}"
        hits, trials = hits + sum(got), trials + len(got)
    print(f"\nheld-out 10 s windows retrieving their identity: {hits}/{trials} ({per_identity}; chance 1/8)")
    assert hits >= 0.8 * trials


def _head_style_distance(styles: dict, a: str, b: str) -> float:
    """Recorded head-motion style distance: |Δ amplitude| + |Δ frequency|, each over its range."""
    out = 0.0
    for key in ("head_amplitude", "head_frequency"):
        lo, hi = STYLE_RANGES[key]
        out += abs(styles[a][key] - styles[b][key]) / (hi - lo)
    return out


def test_unseen_speakers_retrieve_identities_with_closer_head_motion_style(trained, flame_corpus):
    m = trained.model
    styles = speaker_styles(flame_corpus.root)
    train_ids = list(m.facts.train_subjects)
    frames = int(round(10.0 * flame_corpus.info.fps))
    got, chance = [], []
    for subject in UNSEEN:  # three 10 s references each: the reference pool, two halves of the held-out clips
        clips = held_out(flame_corpus, subject)
        refs = [
            flame_corpus.reference_clip(subject, 10.0),
            concat_clips(clips[:4], "a").slice_frames(0, frames),
            concat_clips(clips[4:], "b").slice_frames(0, frames),
        ]
        for ref in refs:
            state = m.encode_style(ref)
            assert state["pose_selection"] == "masked cluster distance" and state["shared_clusters"] >= 1
            got.append(_head_style_distance(styles, subject, train_ids[state["pose_identity"]]))
            chance.append(float(np.mean([_head_style_distance(styles, subject, t) for t in train_ids])))
    print(f"\nunseen speakers: recorded head-style distance to the retrieved identity {np.mean(got):.3f} vs chance "
          f"{np.mean(chance):.3f} over {len(got)} references")
    assert np.mean(got) < 0.85 * np.mean(chance)


# --------------------------------------------------------------------------------------
# §14.5, §14.6: adaptation on constructed unseen speakers; the corpus's unseen speakers
# --------------------------------------------------------------------------------------


def restyled(clip: Clip, lips: np.ndarray) -> Clip:
    """``clip`` with its lip columns (jaw open, rounding, press, spread, jaw rotation) mapped
    through ``lips`` (5, 5): rows are frames, so params[:, LIP_COLUMNS] @ lips.T."""
    params = clip.params.copy()
    params[:, LIP_COLUMNS] = params[:, LIP_COLUMNS] @ lips.T
    return dataclasses.replace(clip, params=params.astype(np.float32))


def amplitude_matrix(corpus, subject: str, margin: float = 1.5) -> np.ndarray:
    """Scales a speaker's lips so its articulation gain is ``margin`` times the largest
    training speaker's: outside the training range (§14.5)."""
    gains = {k: v["articulation_gain"] for k, v in speaker_styles(corpus.root).items()}
    top = max(gains[s] for s in corpus.info.train_subjects)
    return np.eye(len(LIP_COLUMNS)) * margin * top / gains[subject]


def basis_mix_matrix() -> np.ndarray:
    """A different mix of the lip bases (§14.6): each lip control drives its neighbours too,
    a full-rank change that no single scale reproduces."""
    rot = np.eye(len(LIP_COLUMNS))
    rot[0, 1], rot[1, 0], rot[1, 3], rot[3, 1], rot[2, 0], rot[4, 0] = 0.8, -0.6, 0.7, -0.5, 0.6, 0.3
    return rot


def constructed_speaker(corpus, subject: str, lips: np.ndarray) -> tuple[Clip, list[Clip]]:
    """The speaker's 10 s reference (its reference pool) and its held-out test-B clips, restyled."""
    ref = restyled(corpus.reference_clip(subject, 10.0), lips)
    return ref, [restyled(c, lips) for c in held_out(corpus, subject, ("val", "test-B"))]


def params_l1(m: AdaMesh, clips: list[Clip], style) -> float:
    """L1 between generated and recorded normalised params (the §5 loss) over the clips' frames."""
    total, frames = 0.0, 0
    for clip in clips:
        out = m.generate(clip.audio, clip.shape, style)["params"]  # (T, 53)
        t = min(out.shape[0], clip.num_frames)
        err = (m._norm_expr(out[:t]) - m._norm_expr(torch.as_tensor(clip.params[:t]))).abs().mean(-1)
        total, frames = total + float(err.sum()), frames + t
    return total / frames


def with_ranks(m: AdaMesh, ranks: tuple[int, ...]) -> AdaMesh:
    """The same trained model with other MoLoRA experts (they are all zero before adaptation)."""
    torch.manual_seed(0)
    other = build_method("adamesh", {**TEST_PRESET, "molora.ranks": ranks}, m.facts, preset="debug")
    assert isinstance(other, AdaMesh)
    state = {k: v for k, v in m.state_dict().items() if ".adapter." not in k}
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == set(adapter_parameters(other))
    return other.eval()


def gate_entropies(state: dict) -> dict[str, float]:
    """Entropy of each adapted layer's gate (log N when uniform), from a StyleState."""
    out = {}
    for key, logits in state.items():
        if key.startswith("molora/") and key.endswith(".adapter.gate"):
            w = torch.softmax(logits, 0)
            out[key[len("molora/") : -len(".adapter.gate")]] = float(-(w * w.log()).sum())
    return out


def test_adaptation_to_an_out_of_range_lip_amplitude_lowers_held_out_l1(trained, flame_corpus):
    """§14.5: mean over 3 adaptation seeds; the ranks=(1,) ablation is reported."""
    m = trained.model
    ref, clips = constructed_speaker(flame_corpus, "S11", amplitude_matrix(flame_corpus, "S11"))
    unadapted = params_l1(m, clips, m.encode_style(ref))
    single = with_ranks(m, (1,))
    rows = [(seed, params_l1(m, clips, m.adapt(ref, seed=seed)), params_l1(single, clips, single.adapt(ref, seed=seed)))
            for seed in SEEDS]
    mean4, mean1 = float(np.mean([r[1] for r in rows])), float(np.mean([r[2] for r in rows]))
    print(f"\nheld-out L1 (normalised params) un-adapted {unadapted:.4f}; adapted, seeds {SEEDS}: "
          f"{[round(r[1], 4) for r in rows]} (mean {mean4:.4f}); ranks=(1,) ablation: "
          f"{[round(r[2], 4) for r in rows]} (mean {mean1:.4f})")
    assert mean4 < unadapted


def test_gate_entropy_falls_below_log_4_for_a_different_lip_basis_mix(trained, flame_corpus):
    """§14.6: after adaptation to a speaker whose lips mix the bases differently, some
    layer's gate is no longer uniform over the four experts."""
    m = trained.model
    assert len(m.config.molora.ranks) == 4
    ref, clips = constructed_speaker(flame_corpus, "S12", basis_mix_matrix())
    state = m.adapt(ref, seed=0)
    ent = gate_entropies(state)
    low = min(ent, key=ent.get)
    print(f"\ngate entropies after adaptation (log 4 = {math.log(4):.4f}): lowest {ent[low]:.4f} in {low}; "
          f"mean {np.mean(list(ent.values())):.4f} over {len(ent)} layers; held-out L1 "
          f"{params_l1(m, clips, m.encode_style(ref)):.4f} -> {params_l1(m, clips, state):.4f}")
    assert len(ent) == len([k for k in adapter_parameters(m) if k.endswith(".gate")])
    assert ent[low] < math.log(4) - 1e-3


def expression_errors(m: AdaMesh, corpus, clips: list, style) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Pooled LVE (metrics.py convention, vertices through the corpus face model) and the
    predicted / recorded normalised params of the clips."""
    layer, regions = corpus.face_model(), corpus.regions()
    scores, preds, gts = [], [], []
    for clip in clips:
        out = m.generate(clip.audio, clip.shape, style)
        t = min(out["params"].shape[0], clip.num_frames)
        pred = layer.vertices_from_params(out["params"][:t].numpy(), clip.shape)
        gt = corpus.vertices_of(clip)[:t]
        scores.append(M.score_sequence(pred, gt, corpus.template(clip.subject), regions.lips, regions.upper, ["lve"]))
        preds.append(m._norm_expr(out["params"][:t]))
        gts.append(m._norm_expr(torch.as_tensor(clip.params[:t])))
    lve = M.aggregate(scores)["lve"]
    return lve, torch.cat(preds), torch.cat(gts)


def stats_distance(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Expression statistics of a speaker: per-dimension mean and std of the normalised
    params over its held-out frames; the distance is the mean absolute difference."""
    return float((pred.mean(0) - gt.mean(0)).abs().mean() + (pred.std(0) - gt.std(0)).abs().mean())


def test_adaptation_lowers_lve_and_moves_expression_statistics_to_the_speaker(trained, flame_corpus):
    m = trained.model
    styles = speaker_styles(flame_corpus.root)
    rows = []
    for subject in UNSEEN:
        ref = flame_corpus.reference_clip(subject, 10.0)
        clips = held_out(flame_corpus, subject)
        t0 = time.perf_counter()
        adapted_state = m.adapt(ref, seed=0)
        secs = time.perf_counter() - t0
        lve_u, pred_u, gt = expression_errors(m, flame_corpus, clips, m.encode_style(ref))
        lve_a, pred_a, _ = expression_errors(m, flame_corpus, clips, adapted_state)
        frames = gt.shape[0]
        amp_u = float(pred_u[:, 50].std() * m.expr_std[50])
        amp_a = float(pred_a[:, 50].std() * m.expr_std[50])
        amp_gt = float(gt[:, 50].std() * m.expr_std[50])
        rows.append(
            (
                subject,
                frames,
                lve_u,
                lve_a,
                stats_distance(pred_u, gt),
                stats_distance(pred_a, gt),
                amp_u,
                amp_a,
                amp_gt,
                styles[subject]["articulation_gain"],
                secs,
            )
        )
    print(
        "\nspeaker frames  LVE unadapted  LVE adapted  stats-dist unadapted  adapted  "
        "jaw std unadapted/adapted/recorded  articulation_gain  adapt s"
    )
    for r in rows:
        print(
            f"{r[0]}  {r[1]:5d}  {r[2]:.3e}  {r[3]:.3e}  {r[4]:.3f}  {r[5]:.3f}  "
            f"{r[6]:.4f}/{r[7]:.4f}/{r[8]:.4f}  {r[9]:.3f}  {r[10]:.1f}"
        )
    frames = np.array([r[1] for r in rows])
    lve_u = float((np.array([r[2] for r in rows]) * frames).sum() / frames.sum())
    lve_a = float((np.array([r[3] for r in rows]) * frames).sum() / frames.sum())
    dist_u = float(np.mean([r[4] for r in rows]))
    dist_a = float(np.mean([r[5] for r in rows]))
    gains = np.array([r[9] for r in rows])
    corr_u = float(np.corrcoef(gains, [r[6] for r in rows])[0, 1])
    corr_a = float(np.corrcoef(gains, [r[7] for r in rows])[0, 1])
    print(
        f"pooled LVE unadapted {lve_u:.4e} adapted {lve_a:.4e} ({lve_a / lve_u:.2f}x); expression-statistics "
        f"distance {dist_u:.3f} -> {dist_a:.3f}; corr(jaw std, recorded articulation_gain) "
        f"{corr_u:.2f} -> {corr_a:.2f}"
    )
    assert lve_a < lve_u
    assert dist_a < 0.9 * dist_u
    assert sum(r[5] < r[4] for r in rows) >= 3  # statistics move toward the speaker for most speakers
