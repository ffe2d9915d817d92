"""DualTalker's ablation (specs/dualtalker.md §11.7) on the synthetic corpus: each arm trained
on 25 % of the training sequences with 3 seeds. Its own file so that the learning suite's
workers take it and the reader checks of ``test_dualtalker.py`` side by side."""

from __future__ import annotations

import numpy as np
import pytest

from talkmesh.methods.dualtalker import AUX_TERMS, DualTalker
from test_dualtalker import LEARN, PHONEME_VOCABULARY, _synthetic_corpus, train_synthetic

pytestmark = [pytest.mark.learning, pytest.mark.usefixtures("one_intra_op_thread")]

ZERO = {f"loss_weights.{k}": 0.0 for k in AUX_TERMS}
ABLATION_ARMS = {
    "full": {},
    "rec-only": ZERO,
    "no-consistency": {f"loss_weights.{k}": 0.0 for k in ("nce_gt", "nce_pred", "cos_pred")},
}
# U6's arm, logged by `make test-ablations` (the spec states no direction for it).
DUAL_REGULARISER_ARM = {f"loss_weights.{k}": 0.0 for k in ("feat_pred", "ctc_pred")}
ABLATION_SEEDS = (0, 1, 2)
ABLATION_STEPS = 400


def lip_dynamics_ratio(pred: np.ndarray, gt: np.ndarray, template: np.ndarray, lips: np.ndarray) -> float:
    """std over time of the predicted lip offsets over that of the ground truth (coordinates
    averaged): 1 = as lively as the ground truth, < 1 = over-smoothed."""
    return float(np.std(pred[:, lips] - template[lips], axis=0).mean() / np.std(gt[:, lips] - template[lips],
                                                                                 axis=0).mean())


def score_arm(m: DualTalker, clips: list) -> tuple[float, float]:
    """(mean lip-dynamics ratio, LVE) of autoregressive generation on ``clips``, each with its
    own speaker's one-hot."""
    from talkmesh.eval import metrics

    lips = np.asarray(m.reader.lip_index)
    preds, gts, ratios = [], [], []
    for clip in clips:
        v = m.generate(clip.audio, clip.template, style=clip.subject)["vertices"].numpy()
        t = min(len(v), clip.num_frames)
        preds.append(v[:t])
        gts.append(clip.vertices[:t])
        ratios.append(lip_dynamics_ratio(v[:t], clip.vertices[:t], clip.template, lips))
    return float(np.mean(ratios)), metrics.lve(preds, gts, lips)


@pytest.fixture(scope="module")
def corpus_and_test_a() -> tuple:
    corpus = _synthetic_corpus()
    return corpus, [corpus.load(s) for s in corpus.sequences("test-A")]


def train_arm(arm: str, overrides: dict, corpus, clips: list) -> tuple[float, float]:
    """One arm: the mean over the seeds of (lip-dynamics ratio, LVE) on the test-A ``clips`` (printed)."""
    # 16 sequences in batches of 8: 2 steps an epoch, so ABLATION_STEPS is 200 epochs; the
    # _pred ramp covers the first 10 % of them, the paper's 10 of 100 epochs.
    epochs = ABLATION_STEPS // 2
    base = {**LEARN, "vocabulary": PHONEME_VOCABULARY, "uppercase_text": False, "dual_ramp_epochs": epochs // 10}
    runs = [score_arm(train_synthetic(corpus, {**base, **overrides}, ABLATION_STEPS, seed=s, fraction=0.25), clips)
            for s in ABLATION_SEEDS]
    mean = tuple(float(x) for x in np.mean(runs, axis=0))
    print(f"{arm:>20}: lip-dynamics ratio {mean[0]:.3f}, lve {mean[1]:.4g} "
          f"(seeds: {[tuple(round(float(x), 8) for x in r) for r in runs]})")
    return mean  # type: ignore[return-value]


@pytest.fixture(scope="module")
def ablation(corpus_and_test_a) -> dict[str, tuple[float, float]]:
    """§11.7: arm -> (mean lip-dynamics ratio, mean LVE) of autoregressive generation on test-A."""
    table = {arm: train_arm(arm, overrides, *corpus_and_test_a) for arm, overrides in ABLATION_ARMS.items()}
    if table["full"][1] >= table["rec-only"][1]:
        print("expected direction not reached: full lve >= rec-only lve (data-efficiency claim, not blocking)")
    return table


def test_ablation_dropping_the_consistency_terms_moves_towards_rec_only(ablation):
    """§11.7: turning off only the consistency terms (nce, cos) moves the lip-dynamics ratio
    back towards the rec-only model's."""
    full, rec, no_cons = ablation["full"], ablation["rec-only"], ablation["no-consistency"]
    assert abs(no_cons[0] - rec[0]) < abs(full[0] - rec[0]), ablation


@pytest.mark.xfail(
    strict=True,
    reason="measured on this corpus (issue 10 closing note): the rec-only model is not over-smoothed "
    "(lip-dynamics ratio 1.005), the full model over-animates the lips (1.25) and its LVE is ~26 % higher",
)
def test_ablation_full_model_is_livelier_and_as_accurate_as_rec_only(ablation):
    """§11.7: the full model's lip-dynamics ratio is closer to 1 than the rec-only model's,
    and its LVE is at most 5 % higher."""
    full, rec = ablation["full"], ablation["rec-only"]
    assert abs(full[0] - 1) < abs(rec[0] - 1), ablation
    assert full[1] <= 1.05 * rec[1], ablation


@pytest.mark.ablation(reason="the spec logs U6's arm without a stated direction; this checks the complement of §11.7's "
                      "consistency claim: the lip dynamics follow the consistency terms, not the regulariser")
def test_ablation_dropping_only_the_dual_regulariser_keeps_the_full_models_lip_dynamics(ablation, corpus_and_test_a):
    """§11.7's U6 arm (feat_pred and ctc_pred off, the reader still trained on ground truth),
    logged beside the others: its lip-dynamics ratio stays nearer the full model's than the
    rec-only model's."""
    no_dual = train_arm("no-dual-regulariser", DUAL_REGULARISER_ARM, *corpus_and_test_a)
    full, rec = ablation["full"], ablation["rec-only"]
    assert abs(no_dual[0] - full[0]) < abs(no_dual[0] - rec[0]), (no_dual, ablation)
