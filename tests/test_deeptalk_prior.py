"""DEEPTalk TH-VQVAE prior and code decoder (specs/deeptalk.md §5, §6.1, §7; §13 items 1, 6, 11):
shapes, the symmetric ALiBi bias, the straight-through path, the decoding modes, the EMA
quirk of ``VectorQuantizer`` and a short learning check, at the debug sizes."""

from __future__ import annotations

import pytest
import torch

from talkmesh.methods.deeptalk.configuration import DEEPTalkConfig
from talkmesh.methods.deeptalk.prior import (
    THVQVAE,
    BiasedEncoderLayer,
    CodeDecoder,
    FaceFeatureExtractor,
    SymmetricAlibiEncoder,
    expand_bias,
    gumbel_onehot,
    stack_frames,
    symmetric_bias,
)
from talkmesh.nn.vq import VectorQuantizer

CFG = DEEPTalkConfig.debug()


def _parts(seed: int = 0) -> tuple[THVQVAE, FaceFeatureExtractor, CodeDecoder]:
    torch.manual_seed(seed)
    vq = THVQVAE(CFG.vq).eval().requires_grad_(False)
    face = FaceFeatureExtractor(CFG.generator)
    dec = CodeDecoder(CFG.generator, CFG.vq.top_codes, CFG.vq.bottom_codes, CFG.vq.top_dim)
    return vq, face, dec


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- attention bias ---------------------------------------------------------------------


def test_symmetric_bias_values_by_hand():
    # 2 heads: ALiBi slopes 1/16, 1/256.
    plain = symmetric_bias(2, 4)
    dist = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=torch.float32)
    assert plain.shape == (2, 4, 4)
    assert torch.equal(plain[0], -dist / 16) and torch.equal(plain[1], -dist / 256)
    periodic = symmetric_bias(2, 4, period=2)
    steps = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(periodic[0], -steps / 16) and torch.equal(periodic[1], -steps / 256)
    assert torch.equal(symmetric_bias(8, 30, period=25)[0, 0, 25], torch.tensor(-0.5))  # slope 1/2, one period
    with pytest.raises(ValueError):
        symmetric_bias(2, 4, period=0)


def test_expand_bias_layout_is_batch_major_and_batch_invariant():
    bias = symmetric_bias(2, 5)
    big = expand_bias(bias, 3)
    assert big.shape == (6, 5, 5)
    for b in range(3):
        for h in range(2):
            assert torch.equal(big[b * 2 + h], bias[h])
    # With the right layout each item sees its own heads' biases: a batch equals items alone.
    torch.manual_seed(0)
    enc = SymmetricAlibiEncoder(8, 2, 16, 2, 0.0).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        both = enc(x)
        torch.testing.assert_close(both[1:], enc(x[1:]), atol=1e-5, rtol=0)
        torch.testing.assert_close(both[:1], enc(x[:1]), atol=1e-5, rtol=0)


def test_biased_layer_applies_the_float_bias_in_eval_without_grad():
    # torch's own encoder-layer fast path (eval, no grad) reads a float mask as boolean;
    # BiasedEncoderLayer must give the reference (grad-mode) result in both modes.
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0, activation="gelu", batch_first=True).eval()
    layer = BiasedEncoderLayer(8, 2, 16, 0.0, activation="gelu", batch_first=True).eval()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)
    mask = expand_bias(symmetric_bias(2, 5), 2)
    expected = ref(x, src_mask=mask).detach()  # grad enabled: torch's reference path
    torch.testing.assert_close(layer(x, src_mask=mask).detach(), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, src_mask=mask), expected)
        assert (layer(x, src_mask=mask * 10) - expected).abs().max() > 1e-3  # the bias values matter
    enc = SymmetricAlibiEncoder(8, 2, 16, 1, 0.0).eval()
    enc.layers[0].load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc(x), expected)


# ---- shapes (§13 item 1) ------------------------------------------------------------------


def test_shapes_debug_t16():
    vq, face, dec = _parts()
    b, k_t, k_b, top = 2, CFG.vq.top_codes, CFG.vq.bottom_codes, CFG.vq.top_dim
    x = torch.randn(b, 16, 53)
    e_b, e_t = vq.encode(x)
    assert e_b.shape == (b, 8, top) and e_t.shape == (b, 4, top)
    out = vq(x)
    assert out.recon.shape == (b, 16, 53)
    assert out.top.quantized.shape == (b, 4, top) and out.bottom.quantized.shape == (b, 8, CFG.vq.bottom_dim)
    assert vq.decode_top(out.top.quantized).shape == (b, 8, top)
    assert vq.top_codebook.shape == (k_t, top) and vq.bottom_codebook.shape == (k_b, CFG.vq.bottom_dim)
    with torch.no_grad():  # quantized = z + sg[e - z] equals the looked-up codes up to rounding
        torch.testing.assert_close(vq.decode_indices(out.top.indices, out.bottom.indices),
                                   vq.decode(out.top.quantized, out.bottom.quantized))
    d = CFG.generator.d
    f = face(torch.randn(b, 16, d), torch.randn(b, 16, d))
    assert f.shape == (b, 16, d)
    res = dec(f, vq, mode="argmax")
    assert res.logits_top.shape == (b, 4, k_t) and res.logits_bottom.shape == (b, 8, k_b)
    assert res.onehot_top.shape == (b, 4, k_t) and res.onehot_bottom.shape == (b, 8, k_b)
    assert res.motion.shape == (b, 16, 53)
    with pytest.raises(ValueError):
        vq.encode(torch.randn(b, 18, 53))
    with pytest.raises(ValueError):
        dec(torch.randn(b, 18, d), vq, mode="argmax")
    with pytest.raises(ValueError):
        dec(f, vq, mode="nearest")  # type: ignore[arg-type]


def test_stack_frames_keeps_time_order():
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    s = stack_frames(x, 4)
    assert s.shape == (2, 2, 12)
    assert torch.equal(s[1, 1], torch.cat([x[1, 4], x[1, 5], x[1, 6], x[1, 7]]))


# ---- straight-through path (§13 item 6) ----------------------------------------------------


def test_gumbel_onehot_is_exact_onehot_with_soft_gradient():
    logits = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(3, 5, 7)
    hard = gumbel_onehot(logits, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(hard.sum(-1), torch.ones(3, 5)) and torch.equal(hard, (hard > 0.5).float())
    (hard * w).sum().backward()
    grad_st = logits.grad.clone()
    # The same noise drawn by hand: the gradient is the soft sample's.
    logits.grad = None
    u = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(4))
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / 0.5, dim=-1)
    assert torch.equal(hard.detach(), torch.nn.functional.one_hot(soft.argmax(-1), 7).float())
    (soft * w).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)
    assert grad_st.abs().sum() > 0


def test_straight_through_reaches_both_predictors_and_not_the_prior():
    vq, face, dec = _parts()
    face.train()
    dec.train()
    d = CFG.generator.d
    f = face(torch.randn(2, 16, d), torch.randn(2, 16, d))
    res = dec(f, vq, mode="gumbel", tau=2.0, generator=torch.Generator().manual_seed(0))
    ((res.motion - torch.randn(2, 16, 53)) ** 2).mean().backward()
    for name, part in (("top", dec.top), ("bottom", dec.bottom), ("face", face)):
        norm = sum(float(p.grad.norm()) for p in part.parameters() if p.grad is not None)
        assert norm > 0, name
        assert all(p.grad is not None for p in part.parameters()), name
    assert all(p.grad is None for p in vq.parameters())


# ---- decoding modes (§7, D7) ---------------------------------------------------------------


def test_argmax_repeatable_and_sample_seeded():
    vq, face, dec = _parts()
    face.eval()
    dec.eval()
    d = CFG.generator.d
    with torch.no_grad():
        f = face(torch.randn(2, 16, d), torch.randn(2, 16, d))
        a1, a2 = dec(f, vq, mode="argmax"), dec(f, vq, mode="argmax")
        assert torch.equal(a1.motion, a2.motion)
        assert torch.equal(a1.onehot_top.argmax(-1), a1.logits_top.argmax(-1))

        def sample(seed: int, mode: str = "sample"):  # noqa: ANN202
            return dec(f, vq, mode=mode, temp_top=1.0, temp_bottom=1.0, generator=torch.Generator().manual_seed(seed))

        s1, s1b, s2 = sample(1), sample(1), sample(2)
        assert torch.equal(s1.motion, s1b.motion) and torch.equal(s1.onehot_bottom, s1b.onehot_bottom)
        assert not torch.equal(s1.onehot_top, s2.onehot_top) or not torch.equal(s1.onehot_bottom, s2.onehot_bottom)
        assert not torch.equal(s1.motion, s2.motion)
        for s in (s1, s2):  # exact one-hots
            assert torch.equal(s.onehot_top.sum(-1), torch.ones(2, 4))
        g1, g1b, g2 = sample(5, "gumbel"), sample(5, "gumbel"), sample(6, "gumbel")
        assert torch.equal(g1.motion, g1b.motion) and not torch.equal(g1.motion, g2.motion)
        # A near-zero temperature samples the argmax codes.
        cold = dec(f, vq, mode="sample", temp_top=1e-6, temp_bottom=1e-6, generator=torch.Generator().manual_seed(3))
        assert torch.equal(cold.onehot_top, a1.onehot_top) and torch.equal(cold.motion, a1.motion)


# ---- the prior: EMA quirk, eval mode, learning (§5, §13 item 11) -----------------------------


def _hand_vq(quirk: bool) -> VectorQuantizer:
    vq = VectorQuantizer(2, 1, mode="ema", decay=0.5, eps=0.1, reference_ema_quirk=quirk)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        vq.ema_sums.copy_(torch.tensor([[0.0], [10.0]]))
        vq.ema_counts.zero_()
    return vq.train()


def test_ema_quirk_normalises_by_sequences_and_writes_back():
    z = torch.tensor([[[1.0]], [[3.0]]])  # b = 2 sequences of 1 latent, both nearest code 0
    # Step 1: counts N = 0.5 * 0 + 0.5 * [2, 0] = [1, 0]; sums = 0.5 * [0, 10] + 0.5 * [4, 0] = [2, 5].
    std = _hand_vq(False)
    std(z)
    # standard: n = 1, smoothed = (N + 0.1) / (1 + 0.2) * 1 = [1.1, 0.1] / 1.2; raw counts kept
    torch.testing.assert_close(std.ema_counts, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(std.codebook, torch.tensor([[2 * 1.2 / 1.1], [5 * 1.2 / 0.1]]))
    quirk = _hand_vq(True)
    quirk(z)
    # quirk: b = 2, smoothed = (N + 0.1) / (2 + 0.2) * 2 = [1, 1/11], written back
    torch.testing.assert_close(quirk.ema_counts, torch.tensor([1.0, 1 / 11]))
    torch.testing.assert_close(quirk.codebook, torch.tensor([[2.0], [55.0]]))
    # Step 2 (same z, codes 0 again): N = 0.5 * [1, 1/11] + 0.5 * [2, 0] = [1.5, 1/22], smoothed again.
    quirk(z)
    n2 = torch.tensor([1.5, 1 / 22])
    torch.testing.assert_close(quirk.ema_counts, (n2 + 0.1) / 2.2 * 2)
    torch.testing.assert_close(quirk.codebook[:, 0], torch.tensor([3.0, 2.5]) / ((n2 + 0.1) / 2.2 * 2))
    # ``sequences`` overrides b (here b = 4 for the same two latents).
    q4 = _hand_vq(True)
    q4(z, sequences=4)
    torch.testing.assert_close(q4.ema_counts, (torch.tensor([1.0, 0.0]) + 0.1) / 4.2 * 4)
    # 2-d latents count as one sequence
    q1 = _hand_vq(True)
    q1(z.view(2, 1))
    torch.testing.assert_close(q1.ema_counts, (torch.tensor([1.0, 0.0]) + 0.1) / 1.2)


def test_ema_quirk_flag_defaults_and_initialisation():
    torch.manual_seed(0)
    default = VectorQuantizer(4, 3, mode="ema")
    assert not default.reference_ema_quirk and torch.equal(default.ema_sums, default.codebook)
    torch.manual_seed(0)
    quirk = VectorQuantizer(4, 3, mode="ema", reference_ema_quirk=True)
    assert torch.equal(quirk.codebook, default.codebook)  # the codebook draw is unchanged
    assert not torch.equal(quirk.ema_sums, quirk.codebook) and quirk.ema_sums.abs().max() <= 0.25
    with pytest.raises(ValueError):
        VectorQuantizer(4, 3, mode="straight_through", reference_ema_quirk=True)
    prior = THVQVAE(CFG.vq)
    assert prior.top_quantizer.reference_ema_quirk is CFG.vq.reference_ema_quirk is False
    assert prior.top_quantizer.mode == prior.bottom_quantizer.mode == "ema"
    assert prior.top_quantizer.decay == CFG.vq.decay and prior.bottom_quantizer.beta == CFG.vq.beta


def test_eval_forward_leaves_prior_state_bitwise_unchanged():
    torch.manual_seed(0)
    vq = THVQVAE(CFG.vq)
    vq.train()
    vq(torch.randn(4, 16, 53))  # move BN stats and codebooks away from their init
    vq.eval()
    before = _state(vq)
    with torch.no_grad():
        vq(torch.randn(4, 16, 53))
    vq(torch.randn(4, 16, 53))  # with grad too
    after = vq.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    vq.train()
    vq(torch.randn(4, 16, 53))
    assert not torch.equal(before["top_quantizer.codebook"], vq.top_quantizer.codebook)  # training does update


def _smooth_batch(batch: int, mix: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, 16, 53): three sinusoids with random phases mixed by a fixed (3, 53) matrix."""
    t = torch.arange(16, dtype=torch.float32)[None, :, None]  # (1, 16, 1)
    phase = torch.rand(batch, 1, 3, generator=g) * 6.283  # (B, 1, 3)
    return torch.sin(torch.tensor([0.2, 0.35, 0.5]) * t + phase) @ mix  # (B, 16, 53)


def test_prior_learns_to_reconstruct_smooth_sequences():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 53, generator=g)
    vq = THVQVAE(CFG.vq).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=3e-3)
    held_out = _smooth_batch(64, mix, g)
    zero_baseline = float(held_out.pow(2).mean())
    losses = []
    for _ in range(100):
        x = _smooth_batch(16, mix, g)
        out = vq(x)
        rec = ((out.recon - x) ** 2).mean()
        opt.zero_grad()
        (rec + out.top.loss + out.bottom.loss).backward()
        opt.step()
        losses.append(float(rec.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.3 * first and last < 0.3 * zero_baseline, (first, last, zero_baseline)
    vq.eval()
    with torch.no_grad():
        assert float(((vq(held_out).recon - held_out) ** 2).mean()) < 0.6 * zero_baseline
