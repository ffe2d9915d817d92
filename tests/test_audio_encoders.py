"""Audio encoders (tiny random wav2vec2/HuBERT), alignment to the motion rate, feature cache.

Everything runs offline on tiny random configs with the real conv geometry (README G6).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from talkmesh.audio.align import StridedConvAligner, frames_from_audio, interpolate_features
from talkmesh.audio.cache import FeatureCache
from talkmesh.audio.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    AudioEncoderError,
    EncoderWeightsMissing,
    build_audio_encoder,
    normalize_waveform,
)
from talkmesh.audio.frames import conv_output_frames
from talkmesh.audio.io import normalize

KINDS = ["wav2vec2", "hubert"]


def tiny(kind: str = "wav2vec2", **kw) -> AudioEncoder:
    return build_audio_encoder(AudioEncoderConfig(kind=kind, tiny=True, **kw)).eval()


def speechish(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000.0
    x = 0.3 * torch.sin(2 * torch.pi * 180.0 * t) * (1 + 0.5 * torch.sin(2 * torch.pi * 3.0 * t))
    return (x + 0.05 * torch.randn(n, generator=g) + 0.2).float()  # DC offset on purpose


# ----------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_encoder_shapes_and_frame_counts(kind):
    enc = tiny(kind)
    assert enc.hidden_size == 32 and enc.num_layers == 2
    assert enc.output_rate == 50.0 and enc.receptive_field == 400
    audio = torch.stack([speechish(16000, 0), speechish(16000, 1)])  # (B, S)
    out = enc(audio)
    assert out.features.shape == (2, 49, 32)
    assert out.lengths.tolist() == [49, 49]
    assert enc.frames_for_samples(16000) == 49 == out.features.shape[1]
    for n in (400, 719, 720, 16000, 32000, 96000, 123457):
        assert enc.frames_for_samples(n) == (n - 400) // 320 + 1 == conv_output_frames(n)
        assert enc(speechish(n)[None]).features.shape[1] == enc.frames_for_samples(n)
    assert enc.frames_for_samples(32000) == 99 and enc.frames_for_samples(399) == 0
    t = enc.frames_for_samples(torch.tensor([16000, 32000]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [49, 99]
    with pytest.raises(ValueError, match="too short"):
        enc(torch.zeros(1, 399))
    with pytest.raises(ValueError):
        enc(torch.zeros(16000))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_hf_model_on_normalised_audio(kind):
    """The step-by-step forward equals the HF model's own forward (guards API drift)."""
    enc = tiny(kind)
    audio = torch.stack([speechish(12000, 3), speechish(12000, 4)])
    ours = enc(audio).features
    ref = enc.model(normalize_waveform(audio)).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # Per-utterance normalisation == audio.io.normalize == Wav2Vec2Processor for one item.
    one = speechish(5000, 7)
    np.testing.assert_allclose(normalize_waveform(one[None])[0].numpy(), normalize(one.numpy()), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_ignored(kind):
    enc = tiny(kind)
    a0, a1 = speechish(16000, 0), speechish(11000, 1)
    batch = torch.randn(2, 16000) * 5.0  # garbage in the padding: must not leak anywhere
    batch[0] = a0
    batch[1, :11000] = a1
    out = enc(batch, torch.tensor([16000, 11000]))
    assert out.lengths.tolist() == [49, 34]
    alone0, alone1 = enc(a0[None]).features[0], enc(a1[None]).features[0]
    torch.testing.assert_close(out.features[0], alone0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.features[1, :34], alone1, atol=1e-4, rtol=1e-4)
    assert torch.all(out.features[1, 34:] == 0)
    # Normalisation statistics come from the valid samples only.
    nw = normalize_waveform(batch, torch.tensor([16000, 11000]))
    np.testing.assert_allclose(nw[1, :11000].numpy(), normalize(a1.numpy()), atol=1e-5)
    assert torch.all(nw[1, 11000:] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_interpolation_before_transformer(kind):
    enc = tiny(kind)
    batch = torch.zeros(2, 32000)
    batch[0] = speechish(32000, 0)
    batch[1, :20000] = speechish(20000, 1)
    out = enc(batch, torch.tensor([32000, 20000]), num_frames=torch.tensor([59, 37]))
    assert out.features.shape == (2, 59, 32) and out.lengths.tolist() == [59, 37]
    assert torch.all(out.features[1, 37:] == 0)
    alone = enc(speechish(20000, 1)[None], num_frames=37).features[0]
    torch.testing.assert_close(out.features[1, :37], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_selection_matches_hf_hidden_states(kind):
    audio = speechish(9000)[None]
    full = tiny(kind)
    hs = full.model(normalize_waveform(audio), output_hidden_states=True).hidden_states
    for layer in (0, 1):
        got = tiny(kind, layer=layer)(audio).features
        torch.testing.assert_close(got, hs[layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny(kind, layer=2)(audio).features, full(audio).features)
    with pytest.raises(ValueError):
        tiny(kind, layer=3)


@pytest.mark.parametrize("kind", KINDS)
def test_freezing_flags(kind):
    def trainable(enc: AudioEncoder) -> set[str]:
        return {n for n, p in enc.model.named_parameters() if p.requires_grad}

    enc = tiny(kind)  # defaults: CNN frozen, everything else trains
    names = trainable(enc)
    assert names and not any(n.startswith("feature_extractor.") for n in names)
    assert any(n.startswith("encoder.layers.0.") for n in names)
    assert any(n.startswith("feature_projection.") for n in names)

    enc = tiny(kind, freeze_feature_encoder=False)
    assert any(n.startswith("feature_extractor.") for n in trainable(enc))

    frozen = tiny(kind, trainable_layers=0)
    assert not trainable(frozen) and frozen.frozen
    frozen.train()
    assert frozen.training and not frozen.model.training  # no dropout/SpecAugment on frozen features

    top = tiny(kind, trainable_layers=1).train()
    names = trainable(top)
    assert names and all(n.startswith(("encoder.layers.1.", "encoder.layer_norm.")) for n in names)
    assert any(n.startswith("encoder.layers.1.") for n in names)
    assert top.model.training
    feats = top(torch.stack([speechish(8000, 1), speechish(8000, 2)])).features
    feats.pow(2).mean().backward()
    grads = {n for n, p in top.model.named_parameters() if p.grad is not None}
    assert grads and grads <= names

    with pytest.raises(ValueError):
        tiny(kind, trainable_layers=3)
    with pytest.raises(ValueError):
        AudioEncoderConfig(kind=kind, trainable_layers=-2)


def test_tiny_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    assert torch.equal(torch.rand(3), expected)
    pa, pb, pc = (next(e.model.encoder.layers[0].parameters()) for e in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.weights_fingerprint() == b.weights_fingerprint() != c.weights_fingerprint()


def test_encode_numpy_convenience():
    enc = tiny().train()
    audio = speechish(16000).numpy()
    feats = enc.encode(audio)
    assert feats.shape == (49, 32) and feats.dtype == np.float32
    assert enc.training  # mode restored
    np.testing.assert_allclose(feats, tiny()(torch.from_numpy(audio)[None]).features[0].detach().numpy(), atol=1e-6)
    assert enc.encode(audio, num_frames=25).shape == (25, 32)


def test_missing_weights_message_says_how_to_provide_them(tmp_path):
    cfg = AudioEncoderConfig(kind="wav2vec2", name_or_path="talkmesh-tests/no-such-encoder")
    with pytest.raises(EncoderWeightsMissing) as info:
        build_audio_encoder(cfg)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "huggingface-cli download talkmesh-tests/no-such-encoder" in msg
    assert "~/.cache/huggingface" in msg and "name_or_path=" in msg and "config.json" in msg

    with pytest.raises(EncoderWeightsMissing, match="does not exist"):
        build_audio_encoder(AudioEncoderConfig(kind="hubert", name_or_path=str(tmp_path / "absent")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EncoderWeightsMissing, match="no weights file") as info:
        build_audio_encoder(AudioEncoderConfig(kind="hubert", name_or_path=str(tmp_path)))
    assert "huggingface-cli download facebook/hubert-large-ls960-ft" in str(info.value)


def test_default_checkpoints():
    assert AudioEncoderConfig(kind="wav2vec2").checkpoint == "facebook/wav2vec2-base-960h"
    assert AudioEncoderConfig(kind="hubert").checkpoint == "facebook/hubert-large-ls960-ft"
    assert AudioEncoderConfig(kind="hubert", name_or_path="/m/h").checkpoint == "/m/h"


@pytest.mark.parametrize("kind", KINDS)
def test_loads_real_weights_from_local_directory(kind, tmp_path):
    src = tiny(kind, seed=5)
    src.model.save_pretrained(tmp_path)
    loaded = build_audio_encoder(AudioEncoderConfig(kind=kind, name_or_path=str(tmp_path))).eval()
    audio = torch.stack([speechish(10000, 0), speechish(10000, 1)])
    torch.testing.assert_close(loaded(audio).features, src(audio).features, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in loaded.model.feature_extractor.parameters())
    other = "hubert" if kind == "wav2vec2" else "wav2vec2"
    with pytest.raises(AudioEncoderError, match="kind"):
        build_audio_encoder(AudioEncoderConfig(kind=other, name_or_path=str(tmp_path)))


# ---------------------------------------------------------------------------- alignment


def test_interpolate_features_exact_length_and_endpoints():
    n, h = 49, 3
    ramp = torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, h).clone()  # (B, N, H)
    out = interpolate_features(ramp, 30)
    assert out.shape == (2, 30, 3)
    assert out[:, 0].eq(0).all() and torch.allclose(out[:, -1], torch.tensor(48.0))
    torch.testing.assert_close(out[0, :, 0], torch.linspace(0, 48, 30))  # linear stays linear
    torch.testing.assert_close(interpolate_features(ramp, n), ramp)  # same length: identity
    half = interpolate_features(ramp, 30, align_corners=False)
    assert half[0, 0, 0] > 0 and half[0, -1, 0] < 48

    padded = torch.full((2, n, h), 99.0)
    padded[0] = ramp[0]
    padded[1, :20] = ramp[1, :20]
    out = interpolate_features(padded, torch.tensor([30, 12]), lengths=torch.tensor([49, 20]))
    assert out.shape == (2, 30, 3)
    torch.testing.assert_close(out[1, :12, 0], torch.linspace(0, 19, 12))  # padding ignored
    assert torch.all(out[1, 12:] == 0)
    assert interpolate_features(ramp, 1).shape == (2, 1, 3)


def test_frames_from_audio_spec_rules():
    # faceformer.md §12 (2.0 s, 99 CNN frames)
    assert frames_from_audio(32000, 25, basis="encoder") == 49
    assert frames_from_audio(32000, 30, basis="encoder") == 59
    assert frames_from_audio(32000, 25, basis="encoder") == 98 // 2  # "double"
    assert frames_from_audio(32000, 25) == 32000 // 640  # Mimic windows
    assert frames_from_audio(16001, 25, rounding="ceil") == 26  # DEEPTalk ceil(seconds*25)
    assert frames_from_audio(16001, 25, rounding="floor") == 25
    assert frames_from_audio(16000 + 320, 25, rounding="round") == 26
    # The reference's float expression (58 / 50 * 25 = 28.999...) vs exact arithmetic.
    n58 = 400 + 57 * 320
    assert conv_output_frames(n58) == 58
    assert frames_from_audio(n58, 25, basis="encoder") == 28
    assert frames_from_audio(n58, 25, basis="encoder", exact=True) == 29
    with pytest.raises(ValueError):
        frames_from_audio(100, 0)


def test_strided_conv_aligner_lengths():
    aligner = StridedConvAligner(32, 16, in_rate=50, out_rate=25, kernel_size=15)
    assert aligner.stride == 2
    x = torch.randn(2, 299, 32)  # 96000 samples -> 299 CNN frames (mimic.md §2.3)
    assert conv_output_frames(96000) == 299
    out = aligner(x)
    assert out.features.shape == (2, 150, 16) and out.lengths.tolist() == [150, 150]
    exact = aligner(x, num_frames=150).features
    torch.testing.assert_close(exact, aligner.conv(x.transpose(1, 2)).transpose(1, 2))  # no interpolation
    assert aligner(x, num_frames=151).features.shape == (2, 151, 16)

    lens = torch.tensor([299, 200])
    xp = x.clone()
    xp[1, 200:] = 7.0
    out = aligner(xp, lengths=lens)
    assert out.lengths.tolist() == [150, 100] and torch.all(out.features[1, 100:] == 0)
    torch.testing.assert_close(out.features[1, :100], aligner(x[1:2, :200]).features[0], atol=1e-5, rtol=1e-5)

    to30 = StridedConvAligner(8, in_rate=50, out_rate=30, kernel_size=5)  # non-integer ratio
    y = to30(torch.randn(1, 99, 8), num_frames=59)
    assert y.features.shape == (1, 59, 8)
    assert to30(torch.randn(1, 100, 8)).features.shape == (1, 60, 8)
    y.features.sum().backward()
    assert to30.conv.weight.grad is not None
    with pytest.raises(ValueError):
        StridedConvAligner(8, kernel_size=4)


# -------------------------------------------------------------------------------- cache


def test_feature_cache_hits_misses_and_identity(tmp_path):
    cache = FeatureCache(tmp_path)
    enc = tiny(trainable_layers=0)
    audio = speechish(16000).numpy()
    first = cache.get_or_compute(audio, enc)
    assert first.shape == (49, 32) and cache.stats() == {"hits": 0, "misses": 1, "corrupt": 0}
    second = cache.get_or_compute(audio, enc)
    assert cache.hits == 1 and cache.misses == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, enc.encode(audio), atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp"))

    # Another encoder never hits: other seed, other layer, other kind.
    for other in (
        tiny(trainable_layers=0, seed=1),
        tiny(trainable_layers=0, layer=1),
        tiny("hubert", trainable_layers=0),
    ):
        cache.get_or_compute(audio, other)
    assert cache.misses == 4 and cache.hits == 1
    # Other audio misses; the same audio as float64 hits (keys are float32 bytes).
    cache.get_or_compute(audio[:-1], enc)
    assert cache.misses == 5
    cache.get_or_compute(audio.astype(np.float64), enc)
    assert cache.hits == 2

    # Changed weights of the "same" encoder -> new fingerprint -> miss. Random, not constant:
    # a constant added to a projection is a no-op on the layer-normed (zero-mean) inputs.
    with torch.no_grad():
        weight = next(enc.model.encoder.layers[1].parameters())
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    changed = cache.get_or_compute(audio, enc)
    assert cache.misses == 6 and not np.allclose(changed, first)


def test_feature_cache_refuses_trainable_encoder(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(tmp_path).get_or_compute(speechish(8000).numpy(), tiny())
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(tmp_path).get_or_compute(speechish(8000).numpy(), tiny(trainable_layers=1))


def test_feature_cache_recomputes_corrupt_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    enc = tiny("hubert", trainable_layers=0)
    audio = speechish(12000).numpy()
    good = cache.get_or_compute(audio, enc)
    path = cache.path_for(audio, enc)
    assert path.is_file() and path.suffix == ".npy"
    bad_contents = [
        b"not a numpy file",
        path.read_bytes()[:100],  # truncated
    ]
    for content in bad_contents:
        path.write_bytes(content)
        np.testing.assert_array_equal(cache.get_or_compute(audio, enc), good)
    np.save(path, np.zeros((3, 3), dtype=np.float32))  # wrong shape
    np.testing.assert_array_equal(cache.get_or_compute(audio, enc), good)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # pickled payload: never loaded
    np.testing.assert_array_equal(cache.get_or_compute(audio, enc), good)
    assert cache.corrupt == 4 and cache.misses == 5
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), good)  # rewritten
    assert cache.get_or_compute(audio, enc) is not None and cache.hits == 1


def test_feature_cache_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TALKMESH_CACHE", str(tmp_path / "tm"))
    cache = FeatureCache()
    assert cache.root == tmp_path / "tm" / "features"
    enc = tiny(trainable_layers=0)
    cache.get_or_compute(speechish(4000).numpy(), enc)
    assert len(list((tmp_path / "tm" / "features").rglob("*.npy"))) == 1


def test_single_padded_item_ignores_its_padding():
    """A batch of one with lengths < S equals the unpadded item (group-norm CNN, no mask)."""
    enc = tiny("wav2vec2").eval()
    x = speechish(8000, 3)
    padded = torch.cat([x, torch.randn(3000)])[None]  # (1, 11000) with noise past the length
    with torch.no_grad():
        a = enc(x[None]).features
        b = enc(padded, lengths=torch.tensor([8000])).features
    torch.testing.assert_close(b[:, : a.shape[1]], a, atol=1e-5, rtol=1e-4)
