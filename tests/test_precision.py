"""bf16 mixed precision for the GPU inference path (issue 15): ``mixed_precision`` on the CPU
here (autocast runs the same bfloat16 matrix products on a GPU): every method's ``generate``
and stream stay within 2 % (relative error, as tests/test_streaming.py measures it) of float32,
adaptation runs under it, and the service setting is checked."""

from __future__ import annotations

import pytest
import torch

from talkmesh.config import ConfigError
from talkmesh.methods.base import float32_style, mixed_precision
from talkmesh.serving.settings import load_serve_config
from test_streaming import CHUNK, _inputs, _model, _relative_error, _stream

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("name", ["faceformer", "dualtalker", "mimic", "adamesh", "deeptalk"])
def test_bf16_generate_and_streams_stay_within_two_percent_of_fp32(name):
    model = _model(name)
    audio, template, key = _inputs(name)
    ref = model.generate(audio, template, None)[key]
    with mixed_precision(model.device, "bf16"):
        low = model.generate(audio, template, None)[key].float()
        streamed = _stream(model, audio, template, [CHUNK] * 30, left_s=10.0, right_s=10.0)[key].float()
    tmpl = template if key == "vertices" else None
    assert 0 < _relative_error(low, ref, tmpl) <= 0.02  # bf16 did run, and stays close
    assert _relative_error(streamed, ref, tmpl) <= 0.02
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_an_optimising_adaptation_runs_under_bf16_with_float32_parameters():
    from test_faceformer import model, shifted_clip

    m = model()
    ref = shifted_clip("S2", 20, seconds=1.0)
    full = m.adapt(ref, mode="optimize", steps=10)
    with mixed_precision(m.device, "bf16"):
        low = float32_style(m.adapt(ref, mode="optimize", steps=10))  # as the service's adaptation job stores it
    assert low["vector"].dtype == torch.float32 and torch.isfinite(low["vector"]).all()
    assert m.generate(ref.audio, ref.template, style=low)["vertices"].dtype == torch.float32
    assert low["final_loss"] <= 1.05 * full["final_loss"] + 1e-6
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_precision_is_a_checked_service_setting():
    assert load_serve_config({"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        load_serve_config({"precision": "fp16"})
    with pytest.raises(ValueError, match="precision"):
        mixed_precision(torch.device("cpu"), "int8")


@pytest.mark.parametrize("name", ["faceformer", "mimic"])
def test_a_batch_of_utterances_gives_each_its_own_generate(name):
    """The service's batched path: utterances of different lengths, templates and styles in
    one ``generate_batch`` equal one ``generate`` each (FaceFormer pads and masks one batch;
    the others loop)."""
    model = _model(name)
    g = torch.Generator().manual_seed(5)
    audio = [0.1 * torch.randn(n, generator=g) for n in (16000, 40000, 23456)]
    templates = [0.1 * torch.randn(200, 3, generator=g) for _ in audio]
    styles = ["a", "c", None] if name == "faceformer" else [None, None, None]
    batched = model.generate_batch(audio, templates, styles)
    for a, t, s, got in zip(audio, templates, styles, batched, strict=True):
        want = model.generate(a, t, s)["vertices"]
        assert got["vertices"].shape == want.shape
        assert torch.allclose(got["vertices"], want, atol=1e-4), float((got["vertices"] - want).abs().max())
    with pytest.raises(ValueError, match="generate_batch"):
        model.generate_batch(audio, templates[:2], styles)
