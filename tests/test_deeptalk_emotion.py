"""DEEPTalk emotion modules (specs/deeptalk.md §3-§4, §13 items 1-2): the expression-emotion
MLP, GPO, the CSD algebra and losses, and the DEE encoders on the debug config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from talkmesh.methods.deeptalk.configuration import DEEPTalkConfig, FERConfig
from talkmesh.methods.deeptalk.emotion import (
    DEE,
    GPO,
    ExpressionEmotionMLP,
    Gaussian,
    csd_matrix,
    csd_pairs,
    match_loss,
    match_matrix,
    sample_embedding,
    vib_loss,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

DEBUG = DEEPTalkConfig.debug()


# ---- expression-emotion MLP (§3) ----------------------------------------------------------


def _mlp(seed: int = 0, **fer: object) -> ExpressionEmotionMLP:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(DEBUG.fer, **fer) if fer else DEBUG.fer
    return ExpressionEmotionMLP(cfg, n_emotions=4)


def _randomise_bn(mlp: ExpressionEmotionMLP) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not identity-like."""
    g = torch.Generator().manual_seed(1)
    for block in mlp.blocks:
        bn = block[1]
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g))


def test_mlp_shapes_and_layers():
    mlp = _mlp()
    x = torch.randn(2, 16, 53)
    assert mlp(x).shape == (2, 16, 4)
    assert mlp.features(x).shape == (2, 16, DEBUG.fer.feature_dim) == (2, 16, 16)  # §13 item 1
    block = mlp.blocks[0]
    assert [type(m) for m in block] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.LeakyReLU, torch.nn.Dropout]
    assert [b[0].out_features for b in mlp.blocks] == list(DEBUG.fer.hidden)
    assert mlp.head.in_features == 16 and mlp.head.out_features == 4
    paper = ExpressionEmotionMLP(FERConfig(), n_emotions=8)
    assert paper.feature_dim == 128 and paper.feature_index == 5


def test_features_mode_independent_and_pre_activation():
    mlp = _mlp(dropout=0.5)
    _randomise_bn(mlp)
    x = torch.randn(5, 7, 53)
    mlp.train()
    f_train = mlp.features(x)
    mlp.eval()
    f_eval = mlp.features(x)
    assert torch.equal(f_train, f_eval)
    # hand-built eval-mode path: blocks 0..1 fully, block 2 (feature_block -1) up to its BN
    h = x.reshape(-1, 53)
    for i, block in enumerate(mlp.blocks):
        h = block[1](block[0](h))  # eval-mode BN
        if i < 2:
            h = F.leaky_relu(h, 0.01)
    assert torch.allclose(f_eval, h.reshape(5, 7, 16), atol=1e-6)
    assert (f_eval < 0).any()  # before the LeakyReLU: negative values are kept as they are
    # the check has teeth: training-mode BN (batch statistics) gives a different block output
    block = mlp.blocks[0]
    eval_out = block[1](block[0](x.reshape(-1, 53)))
    mlp.train()
    assert not torch.allclose(block[1](block[0](x.reshape(-1, 53))), eval_out, atol=1e-3)


def test_features_inner_block_and_gradient():
    mlp = _mlp(feature_block=1)
    _randomise_bn(mlp)
    x = torch.randn(3, 53, requires_grad=True)
    f = mlp.features(x)
    assert f.shape == (3, 32)
    f.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # BN running statistics are untouched by features()
    before = mlp.blocks[0][1].running_mean.clone()
    mlp.train()
    mlp.features(torch.randn(4, 53))
    assert torch.equal(mlp.blocks[0][1].running_mean, before)


def test_class_weights_formula_and_loss():
    mlp = _mlp()
    assert torch.equal(mlp.class_weights, torch.ones(4))
    counts = torch.tensor([10.0, 30.0, 0.0, 20.0])
    mlp.set_class_weights(counts)
    n, k = 60.0, 3
    expected = torch.tensor([n / (k * 10), n / (k * 30), 0.0, n / (k * 20)])
    assert torch.allclose(mlp.class_weights, expected)
    x = torch.randn(8, 53)
    labels = torch.tensor([0, 1, 3, 0, 1, 3, 1, 0])
    mlp.eval()
    logits = mlp(x)
    manual = F.cross_entropy(logits, labels, weight=expected)
    assert torch.allclose(mlp.loss(x, labels), manual)
    with pytest.raises(ValueError):
        mlp.set_class_weights(torch.zeros(4))


def test_augment_probability_fraction_and_std():
    mlp = _mlp(aug_prob=0.5, aug_fraction=0.7, aug_std=0.02)
    x = torch.zeros(4000, 53)
    y = mlp.augment(x, torch.Generator().manual_seed(0))
    changed = y != 0
    per_row = changed.sum(dim=1)
    assert set(per_row.unique().tolist()) <= {0, round(0.7 * 53)}  # all or nothing: 37 of 53
    assert 0.45 < (per_row > 0).float().mean() < 0.55
    assert y[changed].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(y, mlp.augment(x, torch.Generator().manual_seed(0)))  # seeded
    assert torch.equal(_mlp(aug_prob=0.0).augment(x), x)


def test_clip_logits_mean_over_valid_frames():
    mlp = _mlp().eval()
    x = torch.randn(2, 5, 53)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    c = mlp.clip_logits(x, valid)
    assert torch.allclose(c[0], mlp(x[0]).mean(0), atol=1e-6)
    assert torch.allclose(c[1], mlp(x[1, :2]).mean(0), atol=1e-6)


# ---- GPO (§4.3) ----------------------------------------------------------------------------


def test_gpo_constant_and_weights():
    torch.manual_seed(0)
    gpo = GPO(8, 0.1)
    w = gpo.position_weights(6)
    assert w.shape == (6,) and torch.allclose(w.sum(), torch.tensor(1.0)) and (w > 0).all()
    x = torch.full((2, 6, 3), 2.5)
    assert torch.allclose(gpo(x), torch.full((2, 3), 2.5), atol=1e-6)


def test_gpo_sorted_pooling_is_order_free_and_matches_hand_sum():
    torch.manual_seed(0)
    gpo = GPO(8, 0.1)
    x = torch.randn(1, 7, 4)
    perm = torch.randperm(7)
    out = gpo(x)
    assert torch.allclose(out, gpo(x[:, perm]), atol=1e-6)  # sorting removes the time order
    w = gpo.position_weights(7)
    manual = (x[0].sort(dim=0, descending=True).values * w[:, None]).sum(0)
    assert torch.allclose(out[0], manual, atol=1e-6)
    # the weighted sum lies between the channel min and max
    assert (out[0] <= x[0].max(0).values + 1e-6).all() and (out[0] >= x[0].min(0).values - 1e-6).all()


def test_gpo_padding_invariance():
    torch.manual_seed(0)
    gpo = GPO(8, 0.1)
    lengths = [9, 4, 9, 1]
    x = torch.randn(4, 9, 5)
    x[1, 4:] = 1e6  # garbage in the padding must not matter
    x[3, 1:] = -1e6
    valid = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    out = gpo(x, valid)
    for i, n in enumerate(lengths):
        assert torch.allclose(out[i], gpo(x[i : i + 1, :n])[0], atol=1e-6)
    assert torch.allclose(out[3], x[3, 0], atol=1e-6)  # one valid frame: that frame
    out.sum().backward()  # gradients stay finite through the -inf sort
    assert all(torch.isfinite(p.grad).all() for p in gpo.parameters())
    with pytest.raises(ValueError, match="prefix"):
        gpo(x, valid.flip(1))


# ---- CSD algebra and losses (§4.4, §13 item 2) ----------------------------------------------


def test_csd_matches_formula():
    mu_e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    mu_a = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8]])
    var_e = torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.05, 0.5]])
    var_a = torch.tensor([[0.2, 0.2, 0.2], [0.01, 0.02, 0.03], [1.0, 0.5, 0.25]])
    d = csd_matrix(mu_e, var_e.log(), mu_a, var_a.log())
    assert d.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            hand = sum((mu_e[i, k] - mu_a[j, k]).item() ** 2 for k in range(3))
            hand += var_e[i].sum().item() + var_a[j].sum().item()
            assert d[i, j].item() == pytest.approx(hand, rel=1e-6)
    # row 0 vs col 1: identical means -> the variance sums only: 0.6 + 0.06
    assert d[0, 1].item() == pytest.approx(0.66, rel=1e-6)
    pairs = csd_pairs(mu_e, var_e.log(), mu_a[:2], var_a[:2].log())
    assert torch.allclose(pairs, torch.stack([d[0, 0], d[1, 1]]))


def test_csd_zero_variance_is_squared_distance():
    torch.manual_seed(0)
    mu_e, mu_a = torch.randn(4, 5), torch.randn(3, 5)
    zero_var = torch.full((4, 5), -float("inf")), torch.full((3, 5), -float("inf"))  # exp(-inf) = 0
    d = csd_matrix(mu_e, zero_var[0], mu_a, zero_var[1])
    assert torch.allclose(d, torch.cdist(mu_e, mu_a).square(), atol=1e-5)


def test_match_matrix_modes():
    y = torch.tensor([0, 1, 0, 2])
    m = match_matrix(y, "label")
    assert m.dtype == torch.float32 and m.shape == (4, 4)
    assert m[0, 2] == 1 and m[2, 0] == 1 and m[0, 1] == 0 and torch.equal(m.diagonal(), torch.ones(4))
    assert m.sum() == 6  # 4 diagonal + the (0, 2) pair twice
    assert torch.equal(match_matrix(y, "identity"), torch.eye(4))
    with pytest.raises(ValueError):
        match_matrix(y, "clip")  # type: ignore[arg-type]


def test_match_loss_formula_and_decreases_when_positives_move_closer():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    m = torch.eye(2)
    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    hand = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(1 - sig(0.5)) + math.log(sig(3.0)))
    assert match_loss(logits, m).item() == pytest.approx(2 * hand / 4, rel=1e-6)

    labels = torch.tensor([0, 1, 0, 1])
    m = match_matrix(labels)
    torch.manual_seed(0)
    mu_e = F.normalize(torch.randn(4, 8), dim=-1)
    mu_a = F.normalize(torch.randn(4, 8), dim=-1)
    logvar = torch.full((4, 8), -4.0)
    protos = F.normalize(torch.randn(2, 8), dim=-1)

    def loss_at(t: float) -> float:
        # move each embedding a fraction t towards its class prototype: positives get closer
        me = F.normalize((1 - t) * mu_e + t * protos[labels], dim=-1)
        ma = F.normalize((1 - t) * mu_a + t * protos[labels], dim=-1)
        logits = -5.0 * csd_matrix(me, logvar, ma, logvar) + 5.0
        return match_loss(logits, m).item()

    values = [loss_at(t) for t in (0.0, 0.5, 0.9, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_vib_loss_formula():
    mu = torch.zeros(3, 4)
    assert vib_loss(mu, torch.zeros(3, 4)).item() == pytest.approx(0.0, abs=1e-7)
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    hand = -0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(2.0) - 0 - 2)) / 2
    assert vib_loss(mu, logvar).item() == pytest.approx(hand, rel=1e-6)


def test_sample_embedding():
    torch.manual_seed(0)
    g = Gaussian(F.normalize(torch.randn(200, 16), dim=-1), torch.full((200, 16), -3.0))
    z = sample_embedding(g, 1.0, torch.Generator().manual_seed(1))
    assert z.shape == (200, 16) and torch.allclose(z.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert torch.equal(z, sample_embedding(g, 1.0, torch.Generator().manual_seed(1)))
    # c < 1 widens the spread when sigma < 1 (§4.6)
    spread = [(sample_embedding(g, c, torch.Generator().manual_seed(2)) - g.mu).norm(dim=-1).mean() for c in (1.0, 0.5)]
    assert spread[1] > spread[0]
    zero = Gaussian(g.mu, torch.full((200, 16), -float("inf")))
    assert torch.allclose(sample_embedding(zero), g.mu, atol=1e-6)


# ---- DEE (§4.2-§4.4, §13 item 1) ------------------------------------------------------------


@pytest.fixture(scope="module")
def dee() -> DEE:
    torch.manual_seed(0)
    return DEE(DEBUG.dee, exp_in=16)


def test_dee_structure(dee: DEE):
    cfg = DEBUG.dee
    assert isinstance(dee.audio_proj, torch.nn.Identity)  # tiny encoder hidden 32 == audio_d 32
    assert len(dee.audio_trunk.layers) == cfg.audio_trunk_layers
    assert len(dee.exp_trunk.layers) == cfg.exp_layers
    layer = dee.audio_trunk.layers[0]
    assert not layer.norm_first and layer.linear1.out_features == cfg.ff and layer.self_attn.num_heads == cfg.heads
    assert dee.alpha.item() == cfg.alpha_init and dee.beta.item() == cfg.beta_init
    assert isinstance(dee.alpha, torch.nn.Parameter)
    names = {n for n, p in dee.audio_encoder.named_parameters() if p.requires_grad}
    assert names and all("encoder.layers.1." in n for n in names)  # only the top layer trains


def test_dee_shapes_and_padding_invariance(dee: DEE):
    dee.eval()
    audio = torch.randn(3, 8000)
    lengths = torch.tensor([8000, 4000, 6000])
    audio[1, 4000:] = 0.0
    audio[2, 6000:] = 0.0
    feats = torch.randn(3, 16, 16)
    valid = torch.arange(16)[None] < torch.tensor([16, 10, 5])[:, None]
    with torch.no_grad():
        ga = dee.encode_audio(audio, lengths)
        ge = dee.encode_expression(feats, valid)
        for g in (ga, ge):
            assert g.mu.shape == (3, 16) and g.logvar.shape == (3, 16)
            assert torch.allclose(g.mu.norm(dim=-1), torch.ones(3), atol=1e-5)
        for i in range(3):
            one = dee.encode_audio(audio[i : i + 1, : int(lengths[i])])
            assert torch.allclose(one.mu[0], ga.mu[i], atol=1e-5)
            assert torch.allclose(one.logvar[0], ga.logvar[i], atol=1e-5)
            n = int(valid[i].sum())
            one = dee.encode_expression(feats[i : i + 1, :n])
            assert torch.allclose(one.mu[0], ge.mu[i], atol=1e-5)
            assert torch.allclose(one.logvar[0], ge.logvar[i], atol=1e-5)


def test_dee_audio_cut_to_max_seconds():
    torch.manual_seed(0)
    cfg = dataclasses.replace(DEBUG.dee, max_seconds=0.25)  # 4000 samples
    dee = DEE(cfg, exp_in=16).eval()
    assert dee.max_samples == 4000
    audio = torch.randn(1, 6000)
    with torch.no_grad():
        long, short = dee.encode_audio(audio), dee.encode_audio(audio[:, :4000])
        assert torch.equal(long.mu, short.mu)
        padded = torch.cat([audio[:, :3000], torch.zeros(1, 3000)], dim=1)
        assert torch.allclose(dee.encode_audio(padded, torch.tensor([3000])).mu, dee.encode_audio(audio[:, :3000]).mu,
                              atol=1e-5)


def test_dee_loss_terms_and_gradients(dee: DEE):
    dee.train()
    audio = torch.randn(4, 6000)
    feats = torch.randn(4, 12, 16)
    labels = torch.tensor([0, 1, 0, 2])
    e, a = dee.encode_expression(feats), dee.encode_audio(audio)
    total, logs = dee.loss(e, a, labels)
    logits = -dee.alpha * csd_matrix(e.mu, e.logvar, a.mu, a.logvar) + dee.beta
    assert torch.allclose(dee.pair_logits(e, a), logits)
    l_match = match_loss(logits, match_matrix(labels, "label"))
    l_vib = vib_loss(e.mu, e.logvar) + vib_loss(a.mu, a.logvar)
    assert torch.allclose(logs["match"], l_match) and torch.allclose(logs["vib"], l_vib)
    assert torch.allclose(total, l_match + DEBUG.dee.vib_weight * l_vib)
    dee.zero_grad()
    total.backward()
    assert dee.alpha.grad is not None and dee.beta.grad is not None
    assert dee.exp_proj.weight.grad.abs().sum() > 0
    top = dee.audio_encoder.model.encoder.layers[-1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())
    dee.zero_grad()


def test_dee_loss_identity_match_and_vib_skip():
    torch.manual_seed(0)
    dee = DEE(dataclasses.replace(DEBUG.dee, match="identity", vib_skip=1.0, vib_weight=0.5), exp_in=16)
    mu = F.normalize(torch.randn(3, 16), dim=-1)
    small = Gaussian(mu, torch.zeros(3, 16))  # VIB = 0.5 * mean(mu^2) < 1
    labels = torch.tensor([1, 1, 1])
    total, logs = dee.loss(small, small, labels)
    l_match = match_loss(dee.pair_logits(small, small), torch.eye(3))
    assert torch.allclose(logs["match"], l_match)
    assert torch.allclose(total, l_match + 0.5 * logs["vib"]) and logs["vib"] > 0
    big = Gaussian(mu, torch.full((3, 16), 5.0))  # VIB ~ 0.5 (e^5 - 6) >> 1: skipped
    total, logs = dee.loss(big, big, labels)
    assert logs["vib"] > 1.0 and torch.allclose(total, logs["match"])
