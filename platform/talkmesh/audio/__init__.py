"""Audio: loading and resampling to 16 kHz mono (io), encoders (encoders), frame counts (frames),
alignment to the motion rate (align), feature cache (cache), chunked encoding of long files (chunks)."""

from talkmesh.audio.io import SAMPLE_RATE, AudioError, load_audio, resample, to_mono_float

__all__ = ["SAMPLE_RATE", "AudioError", "load_audio", "resample", "to_mono_float"]
