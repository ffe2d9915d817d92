"""Hand-computable metric cases (specs/metrics.md §12) and conventions (§1, §3, §11)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from talkmesh.eval import metrics as M

V = 12
LIPS = np.array([0, 1, 2, 3])
UPPER = np.array([6, 7, 8, 9])
NON_LIP = 10


def _gt(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(t, V, 3)) * 0.01  # (T, V, 3)


def _offset(x: np.ndarray, vertex: int, vec: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, vertex] += vec
    return y


# ---- §12.1 / §12.2: LVE and MVE family ---------------------------------------------------


def test_lve_one_lip_vertex_offset():
    gt = _gt(20)
    d = 0.003
    vec = np.array([1.0, 2.0, 2.0]) / 3.0 * d  # length d
    pred = _offset(gt, 2, vec)
    assert M.lve([pred], [gt], LIPS) == pytest.approx(d**2, rel=1e-12)
    assert M.lve_l2([pred], [gt], LIPS) == pytest.approx(d, rel=1e-12)
    assert M.mve_max_sq([pred], [gt]) == pytest.approx(d**2, rel=1e-12)
    assert M.mve_mean_l2([pred], [gt]) == pytest.approx(d / V, rel=1e-12)
    assert M.fve_mean_sq([pred], [gt]) == pytest.approx(d**2 / V, rel=1e-12)


def test_lve_ignores_non_lip_offset():
    gt = _gt(15)
    pred = _offset(gt, NON_LIP, np.array([0.0, 0.0, 0.01]))
    assert M.lve([pred], [gt], LIPS) == 0.0
    assert M.lve_l2([pred], [gt], LIPS) == 0.0
    assert M.mve_max_sq([pred], [gt]) > 0.0
    assert M.mve_max_sq([pred], [gt]) == pytest.approx(1e-4, rel=1e-12)


def test_lve_l2_is_not_sqrt_of_lve():
    gt = _gt(2)
    pred = gt.copy()
    pred[0, 0] += [0.0, 0.0, 1.0]  # per-frame errors 1 and 0
    assert M.lve([pred], [gt], LIPS) == pytest.approx(0.5)
    assert M.lve_l2([pred], [gt], LIPS) == pytest.approx(0.5)  # mean(sqrt e) = 0.5 < sqrt(0.5)
    pred[1, 0] += [0.0, 0.0, 3.0]  # errors 1 and 9
    assert M.lve([pred], [gt], LIPS) == pytest.approx(5.0)
    assert M.lve_l2([pred], [gt], LIPS) == pytest.approx(2.0)


# ---- §12.3: pooling --------------------------------------------------------------------


def test_lve_pools_frames_not_sequences():
    e1, e2 = 0.2**2, 0.5**2
    gt1, gt2 = _gt(10, 1), _gt(30, 2)
    pred1 = _offset(gt1, 1, np.array([0.2, 0.0, 0.0]))
    pred2 = _offset(gt2, 3, np.array([0.0, 0.5, 0.0]))
    value = M.lve([pred1, pred2], [gt1, gt2], LIPS)
    assert value == pytest.approx((10 * e1 + 30 * e2) / 40, rel=1e-12)
    assert value != pytest.approx((e1 + e2) / 2)
    # per-sequence (sum, frames) pooling gives the same number
    parts = [M.lve_sum(pred1, gt1, LIPS), M.lve_sum(pred2, gt2, LIPS)]
    assert parts[0][1] == 10 and parts[1][1] == 30
    assert M.pool(parts) == pytest.approx(value, rel=1e-12)
    # evaluate_sequences: pooled lve, per-sequence breakdown
    tmpl = np.zeros((V, 3))
    ev = M.evaluate_sequences([pred1, pred2], [gt1, gt2], tmpl, LIPS, UPPER, names=["a", "b"])
    assert isinstance(ev, dict)
    assert set(ev) == set(M.DEFAULT_METRICS)
    assert ev["lve"] == pytest.approx(value, rel=1e-12)
    assert ev.per_sequence[0]["name"] == "a" and ev.per_sequence[0]["frames"] == 10
    assert ev.per_sequence[0]["lve"] == pytest.approx(e1)
    assert ev.per_sequence[1]["lve"] == pytest.approx(e2)
    assert ev.frames == 40


def test_score_sequence_matches_standalone_functions():
    gts = [_gt(9, 3), _gt(14, 4)]
    rng = np.random.default_rng(5)
    preds = [g + rng.normal(size=g.shape) * 0.002 for g in gts]
    tmpls = [np.full((V, 3), 0.001), np.full((V, 3), -0.002)]
    ev = M.evaluate_sequences(preds, gts, tmpls, LIPS, UPPER, metrics=[*M.METRIC_NAMES])
    assert ev["lve"] == pytest.approx(M.lve(preds, gts, LIPS), rel=1e-12)
    assert ev["lve_l2"] == pytest.approx(M.lve_l2(preds, gts, LIPS), rel=1e-12)
    assert ev["mve_max_sq"] == pytest.approx(M.mve_max_sq(preds, gts), rel=1e-12)
    assert ev["mve_mean_l2"] == pytest.approx(M.mve_mean_l2(preds, gts), rel=1e-12)
    assert ev["fve_mean_sq"] == pytest.approx(M.fve_mean_sq(preds, gts), rel=1e-12)
    assert ev["fdd"] == pytest.approx(M.fdd(preds, gts, tmpls, UPPER), rel=1e-12)
    assert ev["fdd_abs"] == pytest.approx(M.fdd_abs(preds, gts, tmpls, UPPER), rel=1e-12)
    assert ev["ldd"] == pytest.approx(M.ldd(preds, gts, tmpls, LIPS), rel=1e-12)
    assert ev["ldtw"] == pytest.approx(M.ldtw(preds, gts, LIPS), rel=1e-12)
    # aliases
    ev2 = M.evaluate_sequences(preds, gts, tmpls, LIPS, UPPER, metrics=["lve_codetalker", "fdd_signed"])
    assert set(ev2) == {"lve", "fdd"}
    with pytest.raises(ValueError, match="unknown metric"):
        M.evaluate_sequences(preds, gts, tmpls, LIPS, UPPER, metrics=["mve"])


# ---- §12.4 / §12.5: FDD -------------------------------------------------------------------


def _moving(t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tmpl = rng.normal(size=(V, 3))
    x = tmpl[None] + rng.normal(size=(t, V, 3)) * 0.01  # (T, V, 3)
    return x, tmpl


def test_fdd_signs():
    (g1, m1), (g2, m2) = _moving(12, 7), _moving(20, 8)
    gts, tmpls = [g1, g2], [m1, m2]
    assert M.fdd(gts, gts, tmpls, UPPER) == 0.0
    frozen = [np.broadcast_to(m, g.shape).copy() for g, m in zip(gts, tmpls, strict=True)]
    dyn_gt = [M.dynamics(g, m, UPPER) for g, m in zip(gts, tmpls, strict=True)]
    assert M.fdd(frozen, gts, tmpls, UPPER) == pytest.approx(np.mean(dyn_gt), rel=1e-12)
    assert M.fdd(frozen, gts, tmpls, UPPER) > 0
    amplified = [m + 2.0 * (g - m) for g, m in zip(gts, tmpls, strict=True)]
    assert M.fdd(amplified, gts, tmpls, UPPER) < 0
    assert M.fdd_abs(amplified, gts, tmpls, UPPER) == pytest.approx(-M.fdd(amplified, gts, tmpls, UPPER))


def test_fdd_averages_over_sequences_not_frames():
    (g1, m1), (g2, m2) = _moving(5, 1), _moving(50, 2)
    frozen = [np.broadcast_to(m1, g1.shape).copy(), np.broadcast_to(m2, g2.shape).copy()]
    expect = (M.dynamics(g1, m1, UPPER) + M.dynamics(g2, m2, UPPER)) / 2
    assert M.fdd(frozen, [g1, g2], [m1, m2], UPPER) == pytest.approx(expect, rel=1e-12)


def test_fdd_population_std_two_frames():
    tmpl = np.zeros((V, 3))
    gt = np.zeros((2, V, 3))
    gt[0, UPPER, 0] = 1.0  # squared displacement 1 then 0 on every upper vertex
    gt[1, UPPER, 0] = 0.0
    pred = np.zeros_like(gt)  # no motion: dyn 0
    # ddof=0: std{1, 0} = 0.5; ddof=1 would give sqrt(0.5)
    assert M.fdd([pred], [gt], tmpl, UPPER) == pytest.approx(0.5, abs=1e-15)
    assert M.fdd([pred], [gt], tmpl, UPPER) != pytest.approx(np.std([1.0, 0.0], ddof=1))
    gt[0, UPPER[0], 0] = 2.0  # one vertex: displacements 4, 0 -> std 2
    assert M.dynamics(gt, tmpl, UPPER) == pytest.approx((2.0 + 3 * 0.5) / 4, abs=1e-15)


def test_ldd_is_fdd_abs_on_lips():
    (g, m) = _moving(10, 3)
    pred = m + 2.0 * (g - m)
    assert M.ldd([pred], [g], m, LIPS) == pytest.approx(M.fdd_abs([pred], [g], m, LIPS), rel=1e-12)
    assert M.ldd([pred], [g], m, LIPS) > 0
    # duplicated region indices do not double-weight (§11.3)
    dup = np.array([0, 0, 1, 2, 3, 3])
    assert M.ldd([pred], [g], m, dup) == pytest.approx(M.ldd([pred], [g], m, LIPS), rel=1e-12)


# ---- §1: length alignment and flattened input ---------------------------------------------


def test_length_truncation_and_warning():
    gt = _gt(20)
    pred = _offset(gt, 0, np.array([0.1, 0.0, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within tolerance: no warning at all
        assert M.lve([pred[:18]], [gt], LIPS) == pytest.approx(0.01)
        assert M.lve([pred], [gt[:19]], LIPS) == pytest.approx(0.01)
    with pytest.warns(M.LengthMismatchWarning, match="truncated to 15"):
        s, n = M.lve_sum(pred[:15], gt, LIPS)
    assert n == 15 and s == pytest.approx(15 * 0.01)
    with pytest.warns(M.LengthMismatchWarning):
        score = M.score_sequence(pred, gt[:10], np.zeros((V, 3)), LIPS, UPPER, name="x")
    assert (score.frames, score.pred_frames, score.gt_frames) == (10, 20, 10)


def test_flat_input_equals_vertex_input():
    gts = [_gt(8, 1), _gt(11, 2)]
    rng = np.random.default_rng(0)
    preds = [g + rng.normal(size=g.shape) * 0.003 for g in gts]
    tmpl = np.ones((V, 3)) * 0.002
    flat = lambda xs: [x.reshape(x.shape[0], -1) for x in xs]  # noqa: E731
    a = M.evaluate_sequences(preds, gts, tmpl, LIPS, UPPER)
    b = M.evaluate_sequences(flat(preds), flat(gts), tmpl.reshape(-1), LIPS, UPPER)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-12)
    # a bare (T, V*3) array is one sequence; a stacked (N, T, V, 3) array is N sequences
    assert M.lve(flat(preds)[0], flat(gts)[0], LIPS) == pytest.approx(M.lve(preds[:1], gts[:1], LIPS))
    stack_p = np.stack([preds[0][:8], preds[1][:8]])
    stack_g = np.stack([gts[0][:8], gts[1][:8]])
    assert M.lve(stack_p, stack_g, LIPS) == pytest.approx(M.lve(list(stack_p), list(stack_g), LIPS))
    with pytest.raises(ValueError, match="multiple of 3"):
        M.lve([np.zeros((4, 10))], [np.zeros((4, 10))], LIPS)
    with pytest.raises(ValueError, match="vertices"):
        M.lve([np.zeros((4, V, 3))], [np.zeros((4, V + 1, 3))], LIPS)


# ---- §7.3: LDTW ------------------------------------------------------------------------------


def test_dtw_hand_cases():
    cost = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    assert M.dtw(cost) == (0.0, 3)
    # a time-shifted copy aligns with zero cost along a longer path
    assert M.dtw(np.array([[0.0, 0.0, 5.0], [5.0, 5.0, 0.0]])) == (0.0, 3)
    total, steps = M.dtw(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert (total, steps) == (5.0, 2)  # match path 1 -> 4


def test_ldtw():
    gt = _gt(12)
    assert M.ldtw([gt], [gt], LIPS) == 0.0
    pred = gt.copy()
    pred[:, 0] += [0.0, 0.3, 0.4]  # a lip offset of length 0.5 in every frame
    value = M.ldtw([pred], [gt], LIPS)
    assert 0.0 < value <= 0.5 + 1e-12  # the diagonal path costs exactly 0.5 per step
    # a lip trajectory delayed by one frame warps back to zero cost
    s = np.sin(6 * np.linspace(0, 1, 30))
    s[25:] = s[24]  # held at the end so the delayed copy ends on the same pose
    base = np.zeros((30, V, 3))
    base[:, :4, 0] = s[:, None]
    shifted = np.concatenate([base[:1], base[:-1]])  # delayed by one frame (repeat first)
    assert M.ldtw([shifted], [base], LIPS) == pytest.approx(0.0, abs=1e-7)


# ---- §12.6 / §12.7: diversity and pose -------------------------------------------------------


def test_diversity():
    assert M.diversity_of_set(np.array([[0.0, 0, 0], [1.0, 0, 0]])) == pytest.approx(1.0, abs=1e-15)
    assert M.diversity_of_set(np.tile([[0.3, -1.0, 2.0]], (7, 1))) == 0.0
    # mean pairwise distance of a unit equilateral triangle is 1
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    assert M.diversity_of_set(tri) == pytest.approx(1.0, rel=1e-12)
    # per sequence, then the mean over sequences
    assert M.diversity([np.array([[0.0, 0, 0], [1.0, 0, 0]]), np.zeros((5, 3))]) == pytest.approx(0.5)
    # z-normalisation with training statistics
    f = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    assert M.diversity([f], mean=np.ones(3), std=np.array([2.0, 1.0, 1.0])) == pytest.approx(1.0)


def test_pose_std():
    assert M.pose_std([np.tile([0.1, -0.2, 0.3], (10, 1)), np.tile([0.1, -0.2, 0.3], (4, 1))]) == 0.0
    a = 0.25
    wave = np.zeros((10, 3))
    wave[:, 1] = np.where(np.arange(10) % 2 == 0, a, -a)  # +-a square wave on one dimension
    assert M.pose_std([wave]) == pytest.approx(a / 3, rel=1e-12)
    # frames are pooled across sequences: +a in one sequence, -a in the other
    assert M.pose_std([wave[::2], wave[1::2]]) == pytest.approx(a / 3, rel=1e-12)


def test_sample_diversity():
    y = np.zeros((3, 4, V, 3))
    y[1, :, :, 0] = 1.0  # sample 1 differs by 1 on every vertex from samples 0 and 2
    # pairs: (0,1)=1, (0,2)=0, (1,2)=1 -> 2/(3*2) * 2 = 2/3
    assert M.sample_diversity([y], "vertices") == pytest.approx(2 / 3)
    assert M.sample_diversity([y.reshape(3, 4, -1)], "vertices") == pytest.approx(2 / 3)
    p = np.zeros((2, 5, 53))
    p[1, :, :4] = 0.5  # L2 of the difference: sqrt(4 * 0.25) = 1
    assert M.sample_diversity([p, np.zeros((2, 3, 53))], "params") == pytest.approx(0.5)


# ---- §12.8: retrieval -----------------------------------------------------------------------


def test_retrieval_perfectly_separated():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    mu = np.eye(3)[labels]  # unit-norm, one direction per class
    var = np.full((7, 3), 0.01)
    r = M.retrieval_accuracy(mu, var, mu, var, labels)
    assert r["expr_to_audio"] == 1.0 and r["audio_to_expr"] == 1.0 and r["mean"] == 1.0
    assert r["chance"] == pytest.approx((2 / 7) ** 2 + (2 / 7) ** 2 + (3 / 7) ** 2)


def test_retrieval_ties_go_to_lowest_index():
    labels = np.array([2, 0, 1, 2, 0, 2])
    mu = np.tile([[0.6, 0.8]], (6, 1))
    var = np.full((6, 2), 0.1)
    sim = M.csd_similarity(mu, var, mu, var)
    assert np.all(sim == sim[0, 0])  # every pair ties
    r = M.retrieval_accuracy(mu, var, mu, var, labels)
    # every query retrieves index 0 (label 2): correct exactly for the label-2 queries
    assert r["expr_to_audio"] == pytest.approx(3 / 6)
    assert r["audio_to_expr"] == pytest.approx(3 / 6)
    # the rule is "lowest index", not "the query itself": reorder so index 0 has label 0
    r2 = M.retrieval_accuracy_from_similarity(np.zeros((6, 6)), np.array([0, 2, 1, 2, 0, 2]))
    assert r2["expr_to_audio"] == pytest.approx(2 / 6)


def test_csd_similarity_formula():
    mu_e = np.array([[1.0, 0.0]])
    mu_a = np.array([[0.0, 1.0], [1.0, 0.0]])
    var_e = np.array([[0.1, 0.2]])
    var_a = np.array([[0.0, 0.5], [0.3, 0.0]])
    s = M.csd_similarity(mu_e, var_e, mu_a, var_a)
    assert s[0, 0] == pytest.approx(-(2 - 0 + 0.3 + 0.5))
    assert s[0, 1] == pytest.approx(-(2 - 2 + 0.3 + 0.3))
    samp = M.sampled_similarity(mu_e, var_e, mu_a, var_a, alpha=1.0, beta=0.0, num_samples=4)
    assert samp.shape == (1, 2) and samp[0, 1] > samp[0, 0]


# ---- §12.9: condition aggregation (synthetic arrays) ------------------------------------------


def test_condition_aggregation_pools_frames_and_averages_fdd():
    conditions = [f"train{i}" for i in range(8)]
    lengths = {"seqA": 9, "seqB": 17, "seqC": 30}
    rng = np.random.default_rng(11)
    gts = {s: _moving(t, i)[0] for i, (s, t) in enumerate(lengths.items())}
    tmpls = {s: _moving(t, i)[1] for i, (s, t) in enumerate(lengths.items())}
    preds = {
        (s, c): gts[s] + rng.normal(size=gts[s].shape) * 0.001 * (1 + k)
        for s in lengths
        for k, c in enumerate(conditions)
    }
    out = M.evaluate_conditions(preds, gts, tmpls, LIPS, UPPER)
    assert out["conditions"] == conditions
    assert out["pairs"] == 24 and out["sequences"] == 3 and out["frames"] == 8 * sum(lengths.values())
    per = out["per_condition"]
    frames = {c: per[c]["frames"] for c in conditions}
    assert all(f == sum(lengths.values()) for f in frames.values())
    # pooled LVE over all pairs == frame-weighted mean of the per-condition LVEs
    weighted = sum(per[c]["lve"] * frames[c] for c in conditions) / sum(frames.values())
    assert out["metrics"]["lve"] == pytest.approx(weighted, rel=1e-12)
    # ... and equals lve over the flat list of all pairs
    keys = sorted(preds)
    assert out["metrics"]["lve"] == pytest.approx(
        M.lve([preds[k] for k in keys], [gts[k[0]] for k in keys], LIPS), rel=1e-12
    )
    # FDD averages over pairs
    assert out["metrics"]["fdd"] == pytest.approx(
        M.fdd([preds[k] for k in keys], [gts[k[0]] for k in keys], [tmpls[k[0]] for k in keys], UPPER), rel=1e-12
    )
    # min / max over conditions (noise grows with the condition index)
    assert out["min"]["lve"] == per["train0"]["lve"] and out["argmin"]["lve"] == "train0"
    assert out["max"]["lve"] == per["train7"]["lve"] and out["argmax"]["lve"] == "train7"
    assert out["min"]["lve"] <= out["metrics"]["lve"] <= out["max"]["lve"]


def test_unequal_condition_lengths_weighted_by_frames():
    gt_short, gt_long = _gt(10, 1), _gt(30, 2)
    gts = {"s": gt_short, "l": gt_long}
    preds = {
        ("s", "a"): _offset(gt_short, 0, np.array([0.1, 0, 0])),  # e = 0.01
        ("l", "a"): gt_long.copy(),  # e = 0
        ("s", "b"): gt_short.copy(),
        ("l", "b"): _offset(gt_long, 0, np.array([0.2, 0, 0])),  # e = 0.04
    }
    out = M.evaluate_conditions(preds, gts, np.zeros((V, 3)), LIPS, UPPER)
    assert out["per_condition"]["a"]["lve"] == pytest.approx(10 * 0.01 / 40)
    assert out["per_condition"]["b"]["lve"] == pytest.approx(30 * 0.04 / 40)
    assert out["metrics"]["lve"] == pytest.approx((10 * 0.01 + 30 * 0.04) / 80)


# ---- §5: scales and tables --------------------------------------------------------------------


def test_scales_and_table():
    assert M.SCALES["biwi"]["lve"] == 1e-4 and M.SCALES["biwi"]["fdd"] == 1e-5
    assert M.SCALES["vocaset"]["lve"] == 1e-5
    assert M.scale_of("hdtf", "fve_mean_sq") == 1e-6 and M.scale_of("biwi", "lve_codetalker") == 1e-4
    assert M.scale_of("synthetic", "lve") is None
    table = M.format_table({"CodeTalker": {"lve": 4.7914e-4, "fdd": 4.1170e-5, "lve_l2": 0.02}}, "biwi")
    header, _, row = table.splitlines()
    assert "lve (x1e-4)" in header and "fdd (x1e-5)" in header and "lve_l2 (x" not in header
    assert "4.7914e-04" in row and "4.7914" in row.split("4.7914e-04")[1]
    assert "4.1170" in row
