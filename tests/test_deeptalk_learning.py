"""DEEPTalk learning checks on the synthetic corpus in the FLAME flavour (specs/deeptalk.md §13
items 3, 4, 8, 10, 11, 12, 13; ``make test-learning``). One pipeline (fer -> dee -> vq ->
stage1 -> stage2) is trained once per module with a plain torch loop over training windows,
as the shared loop would; the ablations retrain the generator stages from its priors."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from talkmesh.data.dataset import ClipDataset, collate_clips
from talkmesh.eval import metrics as M
from talkmesh.methods import build_method
from talkmesh.methods.base import DataFacts
from talkmesh.methods.deeptalk import DEEPTalk
from talkmesh.methods.deeptalk.method import GENERATOR_MODULES

pytestmark = [pytest.mark.learning, pytest.mark.usefixtures("one_intra_op_thread")]

# The debug preset with the spec's 2 s DEE window (50 frames at 25 fps; the debug column's
# 0.64 s leaves too little prosody to tell emotions apart), all layers of the tiny audio
# encoder trainable (§4.2: raise the trainable layers first) and 40 log-mel bins beside the
# encoder's frames (deviation 10: the frozen random CNN alone gave held-out retrieval at chance).
OVERRIDES: dict[str, object] = {
    "dee.window_s": 2.0,
    "dee.exp_window_frames": 50,
    "dee.audio_encoder.trainable_layers": 2,
    "dee.audio_mel_bins": 40,
}
STEPS = {"fer": 300, "dee": 1200, "vq": 600, "stage1": 600, "stage2": 150}
ABLATION_STEPS = {"stage1": 400, "stage2": 150}
EPOCH_STEPS = 50  # steps per pseudo-epoch (the tau schedule advances per epoch)
BATCH = 16
SEEDS = (0, 1, 2)


def synthetic_corpus():
    from talkmesh.config import DataConfig
    from talkmesh.data import open_corpus

    return open_corpus(DataConfig(format="synthetic", synthetic_preset="small", synthetic_flavour="flame",
                                  window_seconds=2.0))


def train_stage(m: DEEPTalk, corpus, stage: str, steps: int, seed: int = 0, batch: int = BATCH) -> dict:
    """``steps`` optimiser steps of ``stage`` on random training windows (fit_stage first)."""
    windows = ClipDataset(corpus, "train", mode="window", seed=seed)
    m.set_stage(stage)
    m.fit_stage(ClipDataset(corpus, "train", mode="sequence"))
    m.train()
    sched = m.config.stage_schedule(stage)
    opt = m.config.build_optimizer(m.trainable_parameters(), stage=stage, lr=sched.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    logs: dict = {}
    for step in range(steps):
        m.on_epoch_start(step // EPOCH_STEPS)
        b = windows.collate([windows[int(i)] for i in rng.choice(len(windows), batch, replace=False)])
        loss, logs = m(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logs


def build(corpus, seed: int = 0, **overrides: object) -> DEEPTalk:
    torch.manual_seed(seed)
    epochs = {"generator.stage1_epochs": STEPS["stage1"] // EPOCH_STEPS,
              "generator.stage2_epochs": STEPS["stage2"] // EPOCH_STEPS}
    m = build_method("deeptalk", {**OVERRIDES, **epochs, **overrides}, DataFacts.from_corpus(corpus), preset="debug")
    assert isinstance(m, DEEPTalk)
    m.set_face_model(corpus.face_model())
    return m


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def priors(corpus) -> DEEPTalk:
    """fer, dee and vq trained (seed 0)."""
    m = build(corpus)
    for stage in ("fer", "dee", "vq"):
        train_stage(m, corpus, stage, STEPS[stage])
    return m.eval()


@pytest.fixture(scope="module")
def after_stage1(corpus, priors) -> DEEPTalk:
    """The priors plus stage1 (seed 0)."""
    m = copy.deepcopy(priors)
    train_stage(m, corpus, "stage1", STEPS["stage1"])
    return m.eval()


@pytest.fixture(scope="module")
def trained(corpus, after_stage1) -> DEEPTalk:
    """The whole pipeline: stage2 after stage1 (seed 0)."""
    m = copy.deepcopy(after_stage1)
    train_stage(m, corpus, "stage2", STEPS["stage2"])
    return m.eval()


def with_weights(m: DEEPTalk, **weights: float) -> DEEPTalk:
    """A copy of ``m`` with generator loss weights replaced."""
    m = copy.deepcopy(m)
    lw = dataclasses.replace(m.config.generator.loss_weights, **weights)
    m.config = dataclasses.replace(m.config, generator=dataclasses.replace(m.config.generator, loss_weights=lw))
    return m


def fresh_generator(m: DEEPTalk, corpus, seed: int) -> DEEPTalk:
    """``m`` with its generator modules re-initialised as a model built with ``seed``."""
    init = build(corpus, seed)
    for name in GENERATOR_MODULES:
        getattr(m, name).load_state_dict(getattr(init, name).state_dict())
    return m


def held_out(corpus, n: int = 64) -> list:
    """Clips of unseen speakers (val, test-B) and held-out clips of training speakers (test-A)."""
    clips = [corpus.load(s) for split in ("val", "test-A", "test-B") for s in corpus.sequences(split)]
    return clips[:n]


def labels_of(m: DEEPTalk, clips: list) -> np.ndarray:
    return m.emotion_class(torch.tensor([c.emotion for c in clips])).cpu().numpy()


def emo_acc(m: DEEPTalk, clips: list, outputs: list[torch.Tensor], labels: np.ndarray) -> float:
    """metrics.md §10: the MLP's clip logits (mean of frame logits) of generated params."""
    with torch.no_grad():
        logits = np.stack([m.fer(p).mean(0).cpu().numpy() for p in outputs])
    return M.emotion_accuracy(logits, labels)


def lve(m: DEEPTalk, clips: list, outputs: list[torch.Tensor]) -> float:
    """Max lip-vertex error (metrics.md §2.1) on V(.) at zero shape, pooled over clips."""
    lips = m.reader.lip_index
    errs = []
    with torch.no_grad():
        for c, p in zip(clips, outputs, strict=True):
            gt = torch.as_tensor(np.asarray(c.params), dtype=torch.float32)[None, : p.shape[0], :53]
            pred = m.flame_offsets(p[None, : gt.shape[1]])[0][:, lips]  # (T, L, 3)
            errs.append((pred - m.flame_offsets(gt)[0][:, lips]).square().sum(-1).max(-1).values)
    return float(torch.cat(errs).mean())


# --------------------------------------------------------------------------------------
# §13 item 3: DEE learns emotion; item 4: emotion consistency responds
# --------------------------------------------------------------------------------------


def dee_embeddings(m: DEEPTalk, clips: list):
    with torch.no_grad(), m.eval_mode():
        audio, a_len, params, valid = m.dee_windows(collate_clips(clips, [-1] * len(clips)), "fixed")
        return m.dee.encode_audio(audio, a_len), m.expression_emotion(params, valid)


@pytest.mark.xfail(
    strict=True,
    reason="not met on the synthetic corpus: held-out retrieval 0.39 (exp->audio) / 0.38 (audio->exp) against "
    "chance 0.25 (threshold 0.50; training clips 1.0 / 0.86). The synthetic audio carries weak, speaker-confounded "
    "emotion cues once each utterance is normalised (G8): a linear probe on log-mel statistics reaches 0.58 "
    "held-out accuracy; without the mel option the DEE stays at chance on held-out clips.",
)
def test_dee_retrieves_emotions_across_modalities_above_twice_chance(corpus, priors):
    clips = held_out(corpus)
    a, e = dee_embeddings(priors, clips)
    out = M.retrieval_accuracy(e.mu.numpy(), e.logvar.exp().numpy(), a.mu.numpy(), a.logvar.exp().numpy(),
                                       labels_of(priors, clips))
    print("DEE retrieval", out)
    assert out["expr_to_audio"] > 2 * out["chance"] and out["audio_to_expr"] > 2 * out["chance"], out


@pytest.mark.xfail(
    strict=True,
    reason="not met: L_emo is lower with same-emotion audio on 37/64 held-out pairs (csd and mean; threshold 80 %), "
    "as the DEE's audio side does not generalise to held-out clips (see the retrieval check)",
)
@pytest.mark.parametrize("variant", ["csd", "mean"])
def test_emotion_consistency_prefers_same_emotion_audio(corpus, priors, variant):
    clips = held_out(corpus)
    labels = labels_of(priors, clips)
    m = copy.deepcopy(priors)
    m.config = dataclasses.replace(m.config, generator=dataclasses.replace(m.config.generator, emo_loss=variant))
    a, _ = dee_embeddings(m, clips)
    rng = np.random.default_rng(0)
    wins, total = 0, 0
    with torch.no_grad():
        for i, c in enumerate(clips):
            same = [j for j in range(len(clips)) if labels[j] == labels[i] and j != i]
            other = [j for j in range(len(clips)) if labels[j] != labels[i]]
            if not same or not other:
                continue
            j, k = int(rng.choice(same)), int(rng.choice(other))
            motion = torch.as_tensor(np.asarray(c.params), dtype=torch.float32)[None, :, :53]
            pick = lambda n: type(a)(a.mu[n : n + 1], a.logvar[n : n + 1])  # noqa: E731
            wins += float(m.emotion_loss(pick(j), motion)) < float(m.emotion_loss(pick(k), motion))
            total += 1
    print(f"L_emo ({variant}) lower with same-emotion audio on {wins}/{total} pairs")
    assert wins >= 0.8 * total


# --------------------------------------------------------------------------------------
# §13 item 11: the TH-VQVAE
# --------------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="not met at the debug size in a CPU budget: held-out vertex MSE 0.42 of the zero-motion baseline after "
    "600 steps (threshold 0.10; 64 x 64 codes for 1000 steps: 0.40; the same network without quantisation: 0.24 "
    "after 600 steps); code usage passes (1.0 / 1.0 of the codes)",
)
def test_th_vqvae_reconstructs_and_uses_its_codes(corpus, priors):
    m = priors
    w = m.config.window_frames
    err, base = [], []
    top, bottom = set(), set()
    with torch.no_grad():
        for c in held_out(corpus):
            p = torch.as_tensor(np.asarray(c.params), dtype=torch.float32)[:, :53]
            n = p.shape[0] // w * w
            x = p[:n].reshape(-1, w, 53)  # (N, W, 53) consecutive windows
            out = m.vq(x)
            gt = m.flame_offsets(x)
            err.append(float((m.flame_offsets(out.recon) - gt).square().mean()))
            base.append(float(gt.square().mean()))  # the zero-motion baseline
            top |= set(out.top.indices.unique().tolist())
            bottom |= set(out.bottom.indices.unique().tolist())
    ratio = np.mean(err) / np.mean(base)
    usage = (len(top) / m.config.vq.top_codes, len(bottom) / m.config.vq.bottom_codes)
    print(f"TH-VQVAE vertex MSE {ratio:.3f} of the zero-motion baseline; code usage top/bottom {usage}")
    assert ratio < 0.10 and min(usage) > 0.25


# --------------------------------------------------------------------------------------
# §13 item 8: determinism and diversity with bounded lip error
# --------------------------------------------------------------------------------------


def test_sampling_diversity_grows_with_temperature_and_keeps_the_lips(corpus, trained):
    m = trained
    clips = held_out(corpus, 8)
    div = {}
    for temp in (0.1, 0.5, 1.0):
        per_seed = []
        for seed in SEEDS:
            samples = [torch.stack([m.generate(c.audio, None, sample=True, temp_top=temp, temp_bottom=temp,
                                               seed=100 * seed + k)["params"] for k in range(5)]).numpy()
                       for c in clips]
            per_seed.append(M.sample_diversity(samples, "params"))
        div[temp] = float(np.mean(per_seed))
    argmax = [m.generate(c.audio, None)["params"] for c in clips]
    lve_argmax = lve(m, clips, argmax)
    lve_sampled = float(np.mean([lve(m, clips, [m.generate(c.audio, None, sample=True, seed=s)["params"]
                                                for c in clips]) for s in range(5)]))
    print(f"sample_diversity (params) {div}; lve argmax {lve_argmax:.3e}, sampled {lve_sampled:.3e}")
    assert div[0.1] > 0 and div[0.1] < div[0.5] < div[1.0]
    assert lve_sampled <= 1.10 * lve_argmax


# --------------------------------------------------------------------------------------
# §13 items 12, 13: emotion from a reference's expression or from another audio
# --------------------------------------------------------------------------------------


def other_emotion_pairs(m: DEEPTalk, clips: list, seed: int) -> list[tuple[int, int]]:
    labels = labels_of(m, clips)
    rng = np.random.default_rng(seed)
    return [(i, int(rng.choice(np.flatnonzero(labels != labels[i])))) for i in range(len(clips))]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("audio", marks=pytest.mark.xfail(
            strict=True,
            reason="not met: emo_acc against the other audio's label 0.31 / 0.25 / 0.44 over 3 seeds (mean 0.33, "
            "threshold 0.50), as the DEE's audio side does not generalise to held-out clips",
        )),
        "expression",
    ],
)
def test_emotion_taken_from_another_clip_drives_emo_acc(corpus, trained, source):
    """item 13 (audio) and item 12 (expression): held-out content audio, the emotion from a
    held-out clip of another emotion; emo_acc against the source's label, 3 seeds of pairs."""
    m = trained
    clips = held_out(corpus, 32)
    labels = labels_of(m, clips)
    accs = []
    for seed in SEEDS:
        pairs = other_emotion_pairs(m, clips, seed)
        outs = [m.generate(clips[i].audio, None, m.encode_style(clips[j], source=source))["params"] for i, j in pairs]
        accs.append(emo_acc(m, clips, outs, np.array([labels[j] for _, j in pairs])))
    own = emo_acc(m, clips, [m.generate(c.audio, None)["params"] for c in clips], labels)
    print(f"emo_acc against the {source} source's label {accs} (driving audio's own: {own:.3f})")
    assert np.mean(accs) >= 0.5


# --------------------------------------------------------------------------------------
# §13 item 10: ablations (3 seeds)
# --------------------------------------------------------------------------------------


def lip_dynamics_ratio(m: DEEPTalk, clips: list, outputs: list[torch.Tensor]) -> float:
    """std(x_hat_lips) / std(x_lips) of V(.) lip offsets, pooled over clips."""
    lips = m.reader.lip_index
    with torch.no_grad():
        pred = torch.cat([m.flame_offsets(p[None])[0][:, lips] for p in outputs])
        gt = torch.cat([m.flame_offsets(torch.as_tensor(np.asarray(c.params), dtype=torch.float32)[None, :p.shape[0],
                                                                                                 :53])[0][:, lips]
                        for c, p in zip(clips, outputs, strict=True)])
    return float(pred.std() / gt.std())


@pytest.fixture(scope="module")
def emotion_ablation(corpus, priors) -> dict[str, list[tuple[float, float]]]:
    """stage1 with lambda_emo 1e-4 and 0 from the same priors, 3 seeds: (emo_acc, lve) per run."""
    clips = held_out(corpus, 32)
    out: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for seed in SEEDS:
        for arm, weight in (("on", 1e-4), ("off", 0.0)):
            m = fresh_generator(with_weights(priors, emo=weight), corpus, seed)
            train_stage(m, corpus, "stage1", ABLATION_STEPS["stage1"], seed=seed)
            m.eval()
            outs = [m.generate(c.audio, None)["params"] for c in clips]
            out[arm].append((emo_acc(m, clips, outs, labels_of(m, clips)), lve(m, clips, outs)))
    print("emotion ablation (emo_acc, lve) per seed", out)
    return out


@pytest.mark.ablation(
    reason="§13 ablation not reliably met: the lve half depends on the environment. At DEEPTalk's landing "
    "(CI, 3 seeds) emo_acc on 0.375 / 0.438 / 0.344 vs off 0.219 x3 and lve 9.0e-5 vs 1.11e-4 (met); with "
    "the package set of 2026-12-06 (CI and this machine, bit-identical) emo_acc on 0.438 / 0.313 / 0.313 vs "
    "0.219 x3 (still higher) but lve 1.04e-4 vs 9.30e-5 (12 % higher, threshold 5 %). Figures are printed on "
    "every run.",
)
def test_ablation_emotion_term_raises_emo_acc_without_hurting_lve(emotion_ablation):
    on, off = (np.mean(np.array(emotion_ablation[k]), axis=0) for k in ("on", "off"))
    assert on[0] > off[0], (on, off)
    assert on[1] <= 1.05 * off[1], (on, off)


@pytest.mark.ablation(
    reason="§13 ablation not reliably met: its direction depends on the environment. At DEEPTalk's landing "
    "|1 - lip dynamics ratio| on 0.173 / 0.011 / 0.025 vs off 0.321 / 0.026 / 0.087 (met); with the package "
    "set of 2026-12-06 (CI and this machine, bit-identical) on 0.166 / 0.323 / 0.247 vs off 0.067 / 0.008 / "
    "0.005 (reversed): 150 stage-2 steps from one stage-1 model leave the lip term's effect below the "
    "run-to-run numerical drift. Figures are printed on every run.",
)
def test_ablation_lip_term_brings_lip_dynamics_closer_to_the_data(corpus, after_stage1):
    """stage2 with lambda_lip 1e-3 (normal and swapped outputs) and 0 from the same stage-1
    model, 3 seeds: |1 - std(x_hat_lips) / std(x_lips)|."""
    clips = held_out(corpus, 32)
    gap: dict[str, list[float]] = {"on": [], "off": []}
    for seed in SEEDS:
        for arm, weight in (("on", 1e-3), ("off", 0.0)):
            m = with_weights(after_stage1, lip=weight, swap_lip=weight)
            train_stage(m, corpus, "stage2", ABLATION_STEPS["stage2"], seed=seed)
            m.eval()
            outs = [m.generate(c.audio, None)["params"] for c in clips]
            gap[arm].append(abs(1.0 - lip_dynamics_ratio(m, clips, outs)))
    print("lip ablation |1 - lip dynamics ratio| per seed", gap)
    assert np.mean(gap["on"]) < np.mean(gap["off"])
