"""DEEPTalk emotion metrics in talkmesh.eval.metrics (specs/metrics.md §8.3, §9, §10)."""

from __future__ import annotations

import numpy as np
import pytest

from talkmesh.eval import metrics as M


def test_emotion_retrieval_perfect_and_chance():
    labels = np.array([0, 0, 1, 2, 2, 2])
    mu = np.eye(3)[labels]
    var = np.full((6, 3), 0.05)
    r = M.retrieval_accuracy(mu, var, mu, var, labels)
    assert set(r) == {"expr_to_audio", "audio_to_expr", "mean", "chance"}
    assert r["expr_to_audio"] == r["audio_to_expr"] == r["mean"] == 1.0
    assert r["chance"] == pytest.approx((2 / 6) ** 2 + (1 / 6) ** 2 + (3 / 6) ** 2)


def test_emotion_retrieval_directions_differ():
    # expression i of class 0 all point at audio 2 (class 1): exp->audio fails for them
    labels = np.array([0, 0, 1])
    mu_e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mu_a = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    var = np.zeros((3, 2))
    r = M.retrieval_accuracy(mu_e, var, mu_a, var, labels)
    # e0, e1 -> a2 (label 1): wrong; e2 -> a0 (label 0, tie with a1, lowest index): wrong
    assert r["expr_to_audio"] == 0.0
    # a0, a1 -> e2 (label 1): wrong; a2 -> e0 (label 0): wrong
    assert r["audio_to_expr"] == 0.0
    # variance shifts a whole column: audio 2 gets a large variance and is never retrieved
    var_a = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    r = M.retrieval_accuracy(mu_e, var, mu_a, var_a, labels)
    assert r["expr_to_audio"] == pytest.approx(2 / 3)  # e0, e1 -> a0 (label 0) right; e2 -> a0 wrong


def test_emotion_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    assert M.emotion_accuracy(logits, [0, 2, 1, 1]) == pytest.approx(3 / 4)  # tie in row 2 -> class 0
    assert M.emotion_accuracy(logits, [0, 2, 0, 1]) == 1.0
    with pytest.raises(ValueError):
        M.emotion_accuracy(logits, [0, 1, 2])
    with pytest.raises(ValueError):
        M.emotion_accuracy(logits, [0, 1, 2, 3])


def test_sample_diversity_usage_for_deeptalk():
    """The existing §8.3 function, as DEEPTalk calls it: one input of K samples."""
    k, t = 3, 4
    params = np.zeros((k, t, 53))
    assert M.sample_diversity([params], "params") == 0.0
    params[1, :2, 0] = 3.0
    params[1, :2, 1] = 4.0  # distance 5 on 2 of 4 frames -> 2.5 for pairs (0,1) and (1,2)
    assert M.sample_diversity([params], "params") == pytest.approx(2 / (k * (k - 1)) * (2.5 + 0 + 2.5))
    verts = np.zeros((2, t, 4, 3))
    verts[1, :, 0, 2] = 2.0  # one of 4 vertices moves by 2 -> mean over vertices 0.5
    assert M.sample_diversity([verts], "vertices") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.sample_diversity([params[:1]], "params")


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # a shift adds its squared norm exactly (same covariance)
    assert M.frechet_distance(x, x + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # 1-d hand case: (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2 = 1 + (2 - 1)^2
    a = np.array([[-1.0], [1.0]])  # mean 0, sample var 2
    b = np.array([[1.0 - 2 * np.sqrt(2.0)], [1.0 + 2 * np.sqrt(2.0)]])  # mean 1, sample var 16
    assert M.frechet_distance(a, b) == pytest.approx(1.0 + (np.sqrt(2.0) - 4.0) ** 2, rel=1e-6)
    # scaled covariance S vs 4 S: tr(S + 4 S - 2 (4 S^2)^(1/2)) = tr(S)
    big = rng.standard_normal((500, 2))
    big -= big.mean(axis=0)  # equal (zero) means: only the covariance term is left
    assert M.frechet_distance(big, 2 * big) == pytest.approx(np.cov(big, rowvar=False).trace(), rel=1e-6)
    with pytest.raises(ValueError):
        M.frechet_distance(x[:1], x)
    with pytest.raises(ValueError):
        M.frechet_distance(x, x[:, :2])
