"""Audio in: any rate, int or float PCM, mono or stereo -> float32 mono 16 kHz."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from talkmesh.audio.io import AudioError, load_audio, normalize, resample, to_mono_float


def tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 16000])
def test_resample_keeps_duration_and_frequency(rate):
    y = resample(tone(rate), rate)
    assert y.dtype == np.float32 and y.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins for 1 s at 16 kHz


@pytest.mark.parametrize(
    "subtype, dtype",
    [("PCM_16", "int16"), ("PCM_24", "int32"), ("PCM_32", "int32"), ("FLOAT", "float32"), ("PCM_U8", "int16")],
)
def test_wav_subtypes_and_stereo(tmp_path, subtype, dtype):
    x = tone(22050)
    stereo = np.stack([x, x], axis=1)
    path = tmp_path / "a.wav"
    sf.write(path, stereo, 22050, subtype=subtype)
    y = load_audio(path)
    assert y.shape == (16000,) and y.dtype == np.float32
    assert np.max(np.abs(y)) == pytest.approx(0.5, abs=0.03)
    # the same decoder reads the bytes of an upload
    z = load_audio(path.read_bytes())
    np.testing.assert_allclose(y, z)


def test_int_pcm_scaling_and_channel_layouts():
    ints = np.array([0, 16384, -32768], dtype=np.int16)
    np.testing.assert_allclose(to_mono_float(ints), [0.0, 0.5, -1.0])
    u8 = np.array([128, 255, 0], dtype=np.uint8)
    np.testing.assert_allclose(to_mono_float(u8), [0.0, 127 / 128, -1.0])
    chans_first = np.stack([np.ones(100), -np.ones(100)]).astype(np.float32)  # (2, S)
    np.testing.assert_allclose(to_mono_float(chans_first), np.zeros(100))


def test_npy_audio_needs_no_rate_at_16k(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, tone(16000))
    assert load_audio(p).shape == (16000,)
    np.save(p, tone(22050))
    assert load_audio(p, sample_rate=22050).shape == (16000,)


def test_bad_audio_errors_name_the_source(tmp_path):
    with pytest.raises(AudioError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEnot really audio")
    with pytest.raises(AudioError, match="bad.wav"):
        load_audio(bad)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="not a readable"):
        load_audio(b"hello world, I am text")
    with pytest.raises(AudioError, match="NaN"):
        to_mono_float(np.array([0.0, np.nan]))
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16000 * 5, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="at most 2 s"):
        load_audio(long, max_seconds=2)


def test_normalize_is_per_utterance():
    y = normalize(np.array([1.0, 3.0, 5.0], dtype=np.float32))
    assert abs(y.mean()) < 1e-6 and abs(y.std() - 1) < 1e-3
