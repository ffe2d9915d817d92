"""Mimic's learning checks on the synthetic corpus (specs/mimic.md §12.9 style transfer and
§12.10 disentanglement ablation), each over 3 independently trained models (seeds 0, 1, 2).

Nine short trainings of the debug model, shared through module-scoped fixtures: the full
model (3 seeds) serves §12.9 and both §12.10 comparisons; "GRL and CLIP off" and "C_s off"
(3 seeds each) are the ablation arms. Each fixture prints its training time and each test
its figures per seed and their mean (run with ``-s``)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from talkmesh.config import DataConfig
from talkmesh.data import open_corpus
from talkmesh.data.corpus import Corpus
from talkmesh.data.dataset import ClipDataset
from talkmesh.data.synthetic import speaker_styles
from talkmesh.eval import metrics as M
from talkmesh.methods import build_method
from talkmesh.methods.base import DataFacts
from talkmesh.methods.mimic import Mimic

pytestmark = [pytest.mark.learning, pytest.mark.usefixtures("one_intra_op_thread")]

SEEDS = (0, 1, 2)
STEPS, BATCH = 200, 8  # Adam steps per training, clips per batch (50-frame crops)
# The paper's auxiliary weights are balanced for ~1e5 steps; a few hundred steps need stronger
# classifier and contrastive terms (configs/mimic/small.yaml uses the same values).
SHORT_SCHEDULE = {"loss_weights.style_cls": 2.5e-4, "loss_weights.grl": 5e-5, "loss_weights.clip": 5e-5}
ARMS = {
    "full": {},
    "grl_clip_off": {"loss_weights.grl": 0.0, "loss_weights.clip": 0.0},
    "style_cls_off": {"loss_weights.style_cls": 0.0},
}


# --------------------------------------------------------------------------------------
# Trainings (module-scoped: each arm trains once per file run)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(one_intra_op_thread) -> Corpus:
    return open_corpus(DataConfig(format="synthetic", synthetic_preset="small", window_seconds=10.0))


def _train(corpus: Corpus, arm: str, seed: int) -> Mimic:
    """The debug model trained for STEPS steps on random batches of whole training clips
    (the model crops its own 50-frame windows), with a plain torch loop."""
    torch.manual_seed(seed)
    m = build_method("mimic", {**SHORT_SCHEDULE, **ARMS[arm]}, DataFacts.from_corpus(corpus), preset="debug")
    assert isinstance(m, Mimic)
    m.train()
    ds = ClipDataset(corpus, "train", mode="sequence")
    clips = [ds[i] for i in range(len(ds))]
    opt = torch.optim.Adam(m.trainable_parameters(), lr=m.config.lr)
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        loss, _ = m(ds.collate([clips[i] for i in rng.choice(len(clips), BATCH, replace=False)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _train_arm(corpus: Corpus, arm: str) -> list[Mimic]:
    t0 = time.perf_counter()
    models = [_train(corpus, arm, seed) for seed in SEEDS]
    print(f"\n[mimic {arm}] {len(SEEDS)} seeds x {STEPS} steps (batch {BATCH}): {time.perf_counter() - t0:.1f} s")
    return models


@pytest.fixture(scope="module")
def full(corpus: Corpus) -> list[Mimic]:
    return _train_arm(corpus, "full")


@pytest.fixture(scope="module")
def grl_clip_off(corpus: Corpus) -> list[Mimic]:
    return _train_arm(corpus, "grl_clip_off")


@pytest.fixture(scope="module")
def style_cls_off(corpus: Corpus) -> list[Mimic]:
    return _train_arm(corpus, "style_cls_off")


# --------------------------------------------------------------------------------------
# Codes and the linear probe
# --------------------------------------------------------------------------------------


def _codes(m: Mimic, corpus: Corpus, splits: tuple[str, ...], subjects: set[str]):
    """Style codes (N, d), time-averaged content codes (N, d) and subject names (N,) of the
    ``subjects``' whole clips in ``splits``."""
    styles, contents, names = [], [], []
    for split in splits:
        for seq in corpus.sequences(split):
            if seq.subject not in subjects:
                continue
            clip = corpus.load(seq)
            off = torch.from_numpy((clip.vertices - clip.template).reshape(clip.num_frames, -1))[None]  # (1, T, 3V)
            with torch.no_grad():
                styles.append(m.style_codes(off)[0].numpy())
                contents.append(m.content_codes(off)[0].mean(0).numpy())
            names.append(seq.subject)
    return np.stack(styles), np.stack(contents), np.array(names)


def linear_probe_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, l2: float = 1e-2
) -> float:
    """Multinomial logistic regression (L2-penalised, full-batch L-BFGS, float64) fitted on
    standardised (N, d) train features; its accuracy on the test features."""
    labels = sorted(set(y_train.tolist()))
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    a = torch.tensor((x_train - mu) / sd, dtype=torch.float64)  # (N, d)
    b = torch.tensor([labels.index(v) for v in y_train])  # (N,)
    w = torch.zeros(a.shape[1], len(labels), dtype=torch.float64, requires_grad=True)  # (d, K)
    bias = torch.zeros(len(labels), dtype=torch.float64, requires_grad=True)  # (K,)
    opt = torch.optim.LBFGS([w, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, b) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (torch.tensor((x_test - mu) / sd, dtype=torch.float64) @ w + bias).argmax(-1).tolist()
    return float(np.mean([labels[p] == y for p, y in zip(pred, y_test.tolist(), strict=True)]))


def _probe_figures(models: list[Mimic], corpus: Corpus) -> tuple[list[float], list[float]]:
    """Per model: subject-id probe accuracy from the time-averaged content code and from the
    style code, fitted on the training subjects' train clips, scored on their held-out
    (val, test-A) clips (chance 1/8)."""
    train = set(corpus.info.train_subjects)
    content_acc, style_acc = [], []
    for m in models:
        s_tr, c_tr, y_tr = _codes(m, corpus, ("train",), train)
        s_te, c_te, y_te = _codes(m, corpus, ("val", "test-A"), train)
        content_acc.append(linear_probe_accuracy(c_tr, y_tr, c_te, y_te))
        style_acc.append(linear_probe_accuracy(s_tr, y_tr, s_te, y_te))
    return content_acc, style_acc


def _report(name: str, per_seed: list[float]) -> float:
    mean = float(np.mean(per_seed))
    figures = ", ".join(f"seed {s} {v:.4g}" for s, v in zip(SEEDS, per_seed, strict=True))
    print(f"\n[mimic] {name}: {figures}; mean {mean:.4g}")
    return mean


def test_linear_probe_separates_and_ignores():
    """The probe reads a linearly coded identity and finds none in noise."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 20)
    x = rng.normal(size=(80, 6))
    x_sig = x + 3.0 * np.eye(6)[y]
    tr, te = np.arange(80) % 2 == 0, np.arange(80) % 2 == 1
    assert linear_probe_accuracy(x_sig[tr], y[tr], x_sig[te], y[te]) >= 0.9
    assert linear_probe_accuracy(x[tr], y[tr], x[te], y[te]) <= 0.5


# --------------------------------------------------------------------------------------
# §12.9 style transfer
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def style_transfer(full: list[Mimic], corpus: Corpus) -> dict[str, list[float]]:
    """Per seed, the test-B audio (unseen speakers) decoded with each of the 12 speakers'
    styles (encoded from their style-reference pools): mean lip-motion std with the
    highest- and the lowest-articulation-gain speaker's style, the rank correlation of lip
    amplitude with the recorded gain, and ``ldd`` against the clip's speaker's ground truth
    with its own style vs the 11 mismatched ones."""
    gains = {k: v["articulation_gain"] for k, v in speaker_styles(corpus.root).items()}
    names = sorted(gains)
    lips = np.asarray(corpus.regions().lips)
    clips = [corpus.load(seq) for seq in corpus.sequences("test-B")]
    refs = {spk: corpus.reference_clip(spk, 600.0) for spk in names}
    out: dict[str, list[float]] = {k: [] for k in ("amp_high", "amp_low", "rho", "ldd_own", "ldd_other")}
    for m in full:
        styles = {spk: m.encode_style(ref) for spk, ref in refs.items()}
        amp: dict[str, list[float]] = {k: [] for k in names}
        own, other = [], []
        for clip in clips:
            for spk, style in styles.items():
                v = m.generate(clip.audio, clip.template, style=style)["vertices"].numpy()  # (T, V, 3)
                amp[spk].append(float(np.std(v[:, lips] - clip.template[lips], axis=0).mean()))
                (own if spk == clip.subject else other).append(M.ldd([v], [clip.vertices], [clip.template], lips))
        mean_amp = [float(np.mean(amp[k])) for k in names]
        ranks = [np.argsort(np.argsort(x)) for x in ([gains[k] for k in names], mean_amp)]
        out["rho"].append(float(np.corrcoef(*ranks)[0, 1]))  # Spearman's rank correlation
        out["amp_high"].append(mean_amp[names.index(max(gains, key=gains.get))])
        out["amp_low"].append(mean_amp[names.index(min(gains, key=gains.get))])
        out["ldd_own"].append(float(np.mean(own)))
        out["ldd_other"].append(float(np.mean(other)))
    return out


def test_style_reference_amplitude_orders_the_lip_motion(style_transfer):
    """§12.9: the same audio decoded with a high- and a low-amplitude speaker's reference
    gives lip-motion std in the same order (every seed), clearly apart (ratio >= 1.3 on
    average), and lip amplitude follows the recorded gain over the 12 speakers."""
    f = style_transfer
    ratio = [h / lo for h, lo in zip(f["amp_high"], f["amp_low"], strict=True)]
    _report("lip std, highest-gain style", f["amp_high"])
    _report("lip std, lowest-gain style", f["amp_low"])
    mean_ratio = _report("lip std ratio high / low", ratio)
    mean_rho = _report("rank correlation lip std ~ gain", f["rho"])
    assert all(r > 1.0 for r in ratio), ratio
    assert mean_ratio >= 1.3 and mean_rho >= 0.6, (ratio, f["rho"])


def test_matching_style_reference_lowers_ldd(style_transfer):
    """§12.9: ``ldd`` against the reference speaker's ground truth is lower with its own
    reference than with a mismatched one (mean over 3 seeds)."""
    f = style_transfer
    own, other = _report("ldd, matching style", f["ldd_own"]), _report("ldd, mismatched styles", f["ldd_other"])
    _report("ldd margin (mismatched - matching)", [o - w for w, o in zip(f["ldd_own"], f["ldd_other"], strict=True)])
    assert own < other, (f["ldd_own"], f["ldd_other"])


# --------------------------------------------------------------------------------------
# §12.10 disentanglement ablation
# --------------------------------------------------------------------------------------


@pytest.mark.ablation(
    reason="§12.10's content-probe direction is not reliably reached on the synthetic corpus: the 3-seed means "
    "differ by about one held-out clip in 32 and their order changes between runs (on 0.385 vs off 0.417 in one "
    "environment, on 0.417 vs off 0.344 in a fresh clone); instance norm already keeps most speaker identity out "
    "of the time-averaged content code. Figures are printed on every run.",
)
def test_grl_and_clip_lower_the_identity_in_content_codes(full, grl_clip_off, corpus):
    """§12.10: a linear probe predicts the subject from the time-averaged content code less
    accurately with the GRL and CLIP terms on than with both off (mean over 3 seeds). Not met
    reliably (see the mark): stronger GRL weights, CLIP x10 and the layer content norm all
    left the "on" arm as high or higher in one-seed trials."""
    on, _ = _probe_figures(full, corpus)
    off, _ = _probe_figures(grl_clip_off, corpus)
    mean_on, mean_off = _report("content probe, GRL+CLIP on", on), _report("content probe, GRL+CLIP off", off)
    assert mean_on < mean_off, (on, off)


def test_style_classifier_raises_the_identity_in_style_codes(full, style_cls_off, corpus):
    """§12.10: a linear probe predicts the subject from the style code s more accurately
    with the style classifier C_s on than off (mean over 3 seeds)."""
    _, on = _probe_figures(full, corpus)
    _, off = _probe_figures(style_cls_off, corpus)
    mean_on, mean_off = _report("style probe, C_s on", on), _report("style probe, C_s off", off)
    assert mean_on > mean_off, (on, off)


def _loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy (cosine on standardised features)."""
    z = (x - x.mean(0)) / (x.std(0) + 1e-12)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    hits = 0
    for i in range(len(z)):
        keep = np.arange(len(z)) != i
        labels = sorted(set(y[keep]))
        cents = np.stack([z[keep][y[keep] == lab].mean(0) for lab in labels])
        hits += labels[int(np.argmax(cents @ z[i]))] == y[i]
    return hits / len(z)


def test_style_codes_identify_unseen_speakers_and_content_codes_do_not(full, corpus):
    """The unseen speakers' clips (reference, val, test-B) are told apart by their style codes
    and much less by their content codes (leave-one-out nearest centroid, chance 0.25); the
    inverse classifier cannot tell the training speakers from content (held-out clips).
    Means over the 3 seeds."""
    unseen = {s.subject for s in corpus.sequences("test-B")} | {s.subject for s in corpus.sequences("reference")}
    train = set(corpus.info.train_subjects)
    style_acc, content_acc, inverse, style_cls = [], [], [], []
    for m in full:
        s, c, y = _codes(m, corpus, ("reference", "val", "test-B"), unseen)
        style_acc.append(_loo_nearest_centroid(s, y))
        content_acc.append(_loo_nearest_centroid(c, y))
        s, c, y = _codes(m, corpus, ("val", "test-A"), train)
        idx = np.array([corpus.info.train_subjects.index(v) for v in y])
        with torch.no_grad():
            inverse.append(float((m.inverse_classifier(torch.from_numpy(c)).argmax(-1).numpy() == idx).mean()))
            style_cls.append(float((m.style_classifier(torch.from_numpy(s)).argmax(-1).numpy() == idx).mean()))
    style, content = _report("unseen speakers, style codes (LOO centroid)", style_acc), _report(
        "unseen speakers, content codes (LOO centroid)", content_acc)
    inv, sty = _report("inverse classifier accuracy", inverse), _report("style classifier accuracy", style_cls)
    assert len(unseen) == 4 and style >= 0.6 and style >= content + 0.15
    assert inv <= 1 / len(train) + 0.15 and sty >= inv + 0.2
