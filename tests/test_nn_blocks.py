"""Shared blocks in talkmesh.nn: Conformer, LoRA/MoLoRA, vector quantisation, k-means."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from talkmesh.nn.conformer import (
    ConformerBlock,
    ConformerEncoder,
    Conv2dSubsampling2,
    RelPositionMultiHeadAttention,
    relative_sinusoids,
)
from talkmesh.nn.kmeans import assign, kmeans
from talkmesh.nn.lora import (
    AdaptedConv1d,
    AdaptedLinear,
    LoRA,
    MoLoRA,
    adapter_parameters,
    adapter_values,
    apply_adapters,
    molora_parameter_count,
)
from talkmesh.nn.vq import VectorQuantizer, code_perplexity

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------
# Conformer
# --------------------------------------------------------------------------------------


def test_relative_sinusoids_rows_are_signed_distances():
    pe = relative_sinusoids(4, 8)
    assert pe.shape == (7, 8)
    # Row r holds distance L - 1 - r: the middle row is distance 0 -> sin 0, cos 1.
    torch.testing.assert_close(pe[3, 0::2], torch.zeros(4))
    torch.testing.assert_close(pe[3, 1::2], torch.ones(4))
    # Distances +d and -d: same cosines, opposite sines.
    torch.testing.assert_close(pe[0, 1::2], pe[6, 1::2])
    torch.testing.assert_close(pe[0, 0::2], -pe[6, 0::2])


def test_relative_attention_is_translation_equivariant_and_ignores_padding():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    # Scores depend on i - j only: the same content shifted in a longer padded sequence
    # gives the same outputs at the shifted positions.
    padded = torch.cat([x, torch.randn(1, 3, 16)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    out = attn(x)
    out_padded = attn(padded, mask)
    torch.testing.assert_close(out, out_padded[:, :6], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out_padded).all()


def test_conformer_block_shapes_masks_and_gradients():
    torch.manual_seed(0)
    enc = ConformerEncoder(d_model=16, heads=2, ff=32, kernel=5, blocks=2, dropout=0.0).eval()
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    y = enc(x, mask)
    assert y.shape == (2, 9, 16) and torch.isfinite(y).all()
    # The valid frames of the short item do not see its padding (eval: BatchNorm uses running stats).
    y_short = enc(x[1:2, :5], None)
    torch.testing.assert_close(y[1:2, :5], y_short, rtol=1e-5, atol=1e-5)
    y[mask].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert isinstance(enc.blocks[0], ConformerBlock)
    conv = enc.blocks[0].conv
    assert (
        conv.pw1.weight.shape == (32, 16, 1)
        and conv.dw.weight.shape == (16, 1, 5)
        and conv.pw2.weight.shape == (16, 16, 1)
    )
    with pytest.raises(ValueError, match="odd"):
        ConformerEncoder(16, 2, 32, 4, 1)


def test_conv2d_subsampling_halves_time():
    sub = Conv2dSubsampling2(in_features=12, d_model=8, channels=4)
    assert sub(torch.randn(3, 20, 12)).shape == (3, 10, 8)
    assert sub(torch.randn(1, 21, 12)).shape == (1, 11, 8)


# --------------------------------------------------------------------------------------
# LoRA / MoLoRA
# --------------------------------------------------------------------------------------


def test_lora_is_zero_at_init_and_has_its_rank():
    lora = LoRA((6, 3, 5), rank=2)
    assert torch.count_nonzero(lora.delta()) == 0
    with torch.no_grad():
        lora.B.normal_()
    d = lora.delta()
    assert d.shape == (6, 3, 5)
    assert torch.linalg.matrix_rank(d.reshape(6, 15)) <= 2
    assert LoRA((4, 4), rank=2, alpha=4.0).scale == 2.0


def test_molora_algebra():
    m = MoLoRA((8, 1, 5), ranks=(1, 2, 4))
    torch.testing.assert_close(m.gate_weights(), torch.full((3,), 1 / 3))
    assert math.isclose(float(m.entropy().detach()), math.log(3), rel_tol=1e-6)
    assert torch.count_nonzero(m.delta()) == 0
    with torch.no_grad():
        for e in m.experts:
            e.B.normal_()
        m.gate.copy_(torch.tensor([0.5, -1.0, 2.0]))
    w = m.gate_weights()
    assert math.isclose(float(w.sum().detach()), 1.0, rel_tol=1e-6)
    manual = sum(w[i] * m.experts[i].B @ m.experts[i].A for i in range(3)).reshape(8, 1, 5)
    torch.testing.assert_close(m.delta(), manual)
    for i, r in enumerate((1, 2, 4)):
        assert torch.linalg.matrix_rank(m.expert_delta(i).reshape(8, 5)) <= r
    # Functional values replace the parameters without touching them.
    values = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    assert torch.count_nonzero(m.delta(values)) == 0


def test_apply_adapters_is_an_exact_no_op_at_init_and_counts_parameters():
    torch.manual_seed(0)
    enc = ConformerEncoder(16, 2, 32, 5, blocks=2, dropout=0.0).eval()
    x = torch.randn(2, 7, 16)
    before = enc(x)
    names = apply_adapters(
        enc,
        lambda n, _m: ".conv." in f".{n}" and n.rsplit(".", 1)[-1] in ("pw1", "dw", "pw2"),
        lambda shape: MoLoRA(shape, (1, 2, 4, 8)),
    )
    assert len(names) == 6 and all(isinstance(enc.get_submodule(n), AdaptedConv1d) for n in names)
    torch.testing.assert_close(enc(x), before, rtol=0, atol=1e-7)
    shapes = [enc.get_submodule(n).base.weight.shape for n in names]
    params = adapter_parameters(enc)
    assert sum(p.numel() for p in params.values()) == molora_parameter_count(shapes, (1, 2, 4, 8))
    # spec §4.2: 15 x (768 + 271 + 512) + 12 per block at d = 256, kernel 15.
    block = [(512, 256, 1), (256, 1, 15), (256, 256, 1)]
    assert molora_parameter_count(block, (1, 2, 4, 8)) == 23265 + 12
    assert molora_parameter_count(block * 9, (1, 2, 4, 8)) == 209493


def test_adapter_values_apply_functionally_per_thread():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    apply_adapters(model, lambda n, _m: True, lambda shape: LoRA(shape, 2))
    assert isinstance(model[0], AdaptedLinear)
    x = torch.randn(5, 4)
    base = model(x)
    values = {k: torch.randn_like(v) for k, v in adapter_parameters(model).items()}
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with adapter_values(model, values):
        changed = model(x)
        other: list[torch.Tensor] = []
        t = threading.Thread(target=lambda: other.append(model(x)))
        t.start()
        t.join()
    assert not torch.allclose(changed, base)
    torch.testing.assert_close(other[0], base)  # another thread sees the model's own adapters
    torch.testing.assert_close(model(x), base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    # Gradients flow to the supplied values only.
    values = {k: v.requires_grad_(True) for k, v in values.items()}
    with adapter_values(model, values):
        model(x).sum().backward()
    assert all(v.grad is not None for v in values.values())
    assert all(p.grad is None for p in adapter_parameters(model).values())
    with pytest.raises(KeyError, match="no adapter"):
        with adapter_values(model, {"nope.A": torch.zeros(1)}):
            pass


# --------------------------------------------------------------------------------------
# Vector quantisation
# --------------------------------------------------------------------------------------


def test_vq_nearest_code_straight_through_and_losses():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, beta=0.25)
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    e = vq.codebook.detach()
    d = ((z.detach()[..., None, :] - e) ** 2).sum(-1)
    assert torch.equal(out.indices, d.argmin(-1))
    torch.testing.assert_close(out.quantized, e[out.indices])
    commit = ((z.detach() - e[out.indices]) ** 2).mean()
    torch.testing.assert_close(out.loss, commit * 1.25, rtol=1e-5, atol=1e-7)  # codebook + 0.25 commitment
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through
    assert 1.0 <= float(out.perplexity) <= 8.0


def test_vq_usage_and_perplexity_after_fitting_clustered_data():
    torch.manual_seed(0)
    centres = torch.randn(6, 3) * 3
    data = centres[torch.randint(0, 6, (600,))] + 0.05 * torch.randn(600, 3)
    for mode in ("straight_through", "ema"):
        torch.manual_seed(1)
        vq = VectorQuantizer(8, 3, mode=mode, decay=0.9)
        with torch.no_grad():  # data-initialised codebook (random points)
            vq.codebook.copy_(data[torch.randperm(600)[:8]])
        opt = torch.optim.SGD([p for p in vq.parameters()], lr=1.0) if mode == "straight_through" else None
        vq.train()
        commitment0 = float(vq(data).commitment)
        for _ in range(50):
            out = vq(data)
            if opt is not None:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        vq.reset_usage()
        out = vq(data)
        assert vq.usage() >= 6 / 8, mode
        assert float(out.perplexity) > 4.0, mode
        assert float(out.commitment) < 0.5 * commitment0, mode
    assert float(code_perplexity(torch.arange(4), 4)) == pytest.approx(4.0)
    mask = torch.tensor([True, False])
    vq.eval()
    before = vq.code_counts.clone()
    vq(torch.randn(2, 3), mask)
    assert torch.equal(vq.code_counts, before)  # eval calls do not count usage


# --------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=g)
    a = kmeans(x, 4, iters=50, seed=3)
    b = kmeans(x, 4, iters=50, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.centroids.shape == (4, 2) and len(a.labels.unique()) == 4
    # Every true cluster maps to one label.
    for i in range(4):
        assert len(a.labels[i * 50 : (i + 1) * 50].unique()) == 1
    torch.testing.assert_close(assign(x, a.centroids), a.labels)
    assert a.inertia / 200 < 0.05
    with pytest.raises(ValueError, match="k=5"):
        kmeans(x[:4], 5)
    # Duplicates: still k clusters when there are k distinct points.
    dup = torch.tensor([[0.0], [0.0], [0.0], [1.0], [2.0]])
    assert len(kmeans(dup, 3, seed=0).labels.unique()) == 3
