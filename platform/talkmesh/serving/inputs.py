"""Uploads -> validated arrays, bounded before anything is decoded. Nothing here unpickles:
``.npy`` files are parsed with :mod:`numpy.lib.format` (no objects) and audio goes through
libsndfile.

Every failure raises :class:`InputError` (a :class:`~talkmesh.serving.errors.ServiceError`,
so the service answers it in its one error schema) carrying the HTTP status, a ``code`` and
a message that names the field and what was expected:

* 400 - not decodable (not audio, not an ``.npy`` array, empty, truncated, a header that
  lies about its length, an object array);
* 413 - too large or too long (bytes, declared duration, declared decoded size, elements);
* 422 - decodable but wrong (sample rate or channels out of range, dtype, rank, shape,
  vertex count, non-finite values, too short, bad spec), or an option the served method
  does not take.

Limits come from one :class:`InputLimits`. They are checked from the headers first:
:func:`probe_audio` reads the audio header only (``soundfile.info``: rate, channels,
frames) and :func:`probe_array` the ``.npy`` header only (dtype, shape), so a 170 KB FLAC
declaring 8 channels at 655 kHz for 30 s, or an ``.npy`` declaring a terabyte, is refused
before a byte of it is decoded or allocated. :func:`read_audio` then decodes in blocks,
mixing down to mono as it goes, so memory stays near the mono signal's size.

:func:`animate_options` maps the option fields of ``POST /v1/animate`` (``emotion``,
``intensity``, ``emotion_audio``, ``sample``, ``temperature``, ``seed``) to the keyword
options of ``MotionMethod.generate``; an option the method does not list in its
``generate_options`` is a 422 naming the field and the method.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from talkmesh.serving.errors import ServiceError, code_for_status

__all__ = [
    "ANIMATE_OPTIONS",
    "EMOTION_LABEL",
    "MOTION_RANKS",
    "TEMPLATE_RANKS",
    "ArrayHeader",
    "AudioHeader",
    "InputError",
    "InputLimits",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "STYLE_NAME",
    "animate_options",
    "canonical_style_spec",
    "check_supported",
    "parse_style_spec",
    "probe_array",
    "probe_audio",
    "read_array",
    "read_audio",
    "reference_motion",
    "template_array",
]

SAMPLE_RATE = 16000
# A style id or a training-subject name: what may appear in a style spec and a URL path.
STYLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_MIX = 8
# An emotion label as a request names it (lower case; the model knows which labels it has).
EMOTION_LABEL = re.compile(r"[a-z][a-z_]{0,31}")
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
# POST /v1/animate option fields -> the generate options (MotionMethod.generate_options) each sets.
ANIMATE_OPTIONS: dict[str, tuple[str, ...]] = {
    "emotion": ("emotion",),
    "intensity": ("intensity",),
    "emotion_audio": ("audio_emotion",),
    "sample": ("sample",),
    "temperature": ("temp_top", "temp_bottom"),
    "seed": ("seed",),
}
# The ranks read_array accepts for each upload: motion (T, V, 3) / (T, D); template (V, 3) / (D,).
MOTION_RANKS = (2, 3)
TEMPLATE_RANKS = (1, 2, 3)
MiB = 2**20
DECODE_BLOCK_FRAMES = 65536  # frames decoded at once: <= 2 MiB of float32 at 8 channels
# A decoded clip may fall short of the frames its header declares by this fraction (encoder
# estimates, e.g. MP3); further short is a truncated file or a header that lies.
SHORT_READ_TOLERANCE = 0.01
NPY_MESSAGE = "not a readable .npy array (numpy.save format, no objects)"
AUDIO_MESSAGE = "not a readable audio file (WAV/FLAC/OGG expected)"


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """Every bound on an upload, checked from headers before decoding.

    The defaults suit the service (``ServeConfig``'s defaults); the ingress builds one from
    its config (:meth:`from_megabytes`).
    """

    max_upload_bytes: int = 50 * MiB  # one uploaded file
    max_body_bytes: int = 3 * 50 * MiB + MiB  # a whole request: three files and the form fields
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_audio_seconds: float = 120.0  # /v1/animate audio and emotion_audio
    min_audio_seconds: float = 0.2
    max_reference_seconds: float = 60.0  # /v1/styles reference clip
    min_reference_seconds: float = 1.0
    # frames * channels * 4: what a float32 decode of the whole file would take.
    max_decoded_bytes: int = 96 * MiB
    max_array_elements: int = 2**25  # an .npy upload: 32 Mi elements (128 MiB as float32)
    max_array_bytes: int = 128 * MiB  # its data as declared (elements * itemsize)
    max_array_ndim: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"InputLimits.{f.name}: must be a number > 0, got {value!r}")
        for low, high in [
            ("min_sample_rate", "max_sample_rate"),
            ("min_audio_seconds", "max_audio_seconds"),
            ("min_reference_seconds", "max_reference_seconds"),
            ("max_upload_bytes", "max_body_bytes"),
        ]:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"InputLimits.{low} ({getattr(self, low)}) exceeds {high} ({getattr(self, high)})")

    @classmethod
    def from_megabytes(cls, max_upload_mb: float, files_per_request: int = 3, **fields: Any) -> InputLimits:
        """Limits for uploads of at most ``max_upload_mb`` MiB each (``ServeConfig.max_upload_mb``):
        the body limit allows ``files_per_request`` such files plus 1 MiB of form fields."""
        upload = max(1, int(max_upload_mb * MiB))
        return cls(max_upload_bytes=upload, max_body_bytes=files_per_request * upload + MiB, **fields)


class InputError(ServiceError, ValueError):
    """A bad request: ``status`` (HTTP), ``field`` (the form field), ``message``, ``code``."""

    def __init__(self, status: int, field: str, message: str, code: str | None = None) -> None:
        super().__init__(status, code or code_for_status(status), message, field)


# ------------------------------------------------------------------------------ audio


@dataclasses.dataclass(frozen=True)
class AudioHeader:
    """What an audio file's header declares (read without decoding)."""

    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    @property
    def decoded_bytes(self) -> int:
        """The size of a float32 decode of every channel."""
        return self.frames * self.channels * 4


def probe_audio(
    data: bytes,
    field: str,
    limits: InputLimits | None = None,
    max_seconds: float | None = None,
    min_seconds: float | None = None,
) -> AudioHeader:
    """The header of an uploaded audio file, checked against ``limits`` (sample rate,
    channels, declared duration, declared decoded size) before any sample is decoded.
    ``max_seconds`` / ``min_seconds`` default to the limits' animate-audio bounds."""
    import soundfile as sf

    limits = limits or InputLimits()
    max_seconds = limits.max_audio_seconds if max_seconds is None else max_seconds
    min_seconds = limits.min_audio_seconds if min_seconds is None else min_seconds
    if not data:
        raise InputError(400, field, "empty upload; expected an audio file (WAV, FLAC or OGG)", "empty_upload")
    if bytes(data[:6]) == b"\x93NUMPY":
        msg = "got a .npy array; expected an audio file (WAV, FLAC or OGG) with its sample rate"
        raise InputError(400, field, msg, "wrong_type")
    try:
        info = sf.info(io.BytesIO(bytes(data)))
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError, OverflowError) as e:
        raise InputError(400, field, f"{AUDIO_MESSAGE}: {_sndfile_reason(e)}", "unreadable_audio") from None
    head = AudioHeader(int(info.samplerate), int(info.channels), int(info.frames), str(info.format), str(info.subtype))
    _check_audio_header(head, field, limits, max_seconds, min_seconds)
    return head


def _check_audio_header(
    head: AudioHeader, field: str, limits: InputLimits, max_seconds: float, min_seconds: float
) -> None:
    if not limits.min_sample_rate <= head.sample_rate <= limits.max_sample_rate:
        msg = f"sample rate {head.sample_rate} Hz; {limits.min_sample_rate}..{limits.max_sample_rate} Hz accepted"
        raise InputError(422, field, msg, "unsupported_sample_rate")
    if head.channels < 1:
        msg = f"{AUDIO_MESSAGE}: the header declares {head.channels} channels"
        raise InputError(400, field, msg, "unreadable_audio")
    if head.channels > limits.max_channels:
        msg = f"{head.channels} channels; at most {limits.max_channels} accepted (mono or stereo expected)"
        raise InputError(422, field, msg, "too_many_channels")
    if head.frames <= 0:
        raise InputError(400, field, "the audio holds no samples", "empty_upload")
    if head.seconds > max_seconds:
        msg = f"audio is {head.seconds:.1f} s long; at most {max_seconds:g} s accepted"
        raise InputError(413, field, msg, "too_long")
    if head.decoded_bytes > limits.max_decoded_bytes:
        msg = (
            f"{head.frames} frames x {head.channels} channels would decode to {head.decoded_bytes / MiB:.0f} MiB; "
            f"at most {limits.max_decoded_bytes / MiB:g} MiB (use a lower sample rate or fewer channels)"
        )
        raise InputError(413, field, msg, "too_large")
    if head.seconds < min_seconds:
        msg = f"audio is {head.seconds:.2f} s long; at least {min_seconds:g} s expected"
        raise InputError(422, field, msg, "too_short")


def _sndfile_reason(e: BaseException) -> str:
    """libsndfile's reason without the Python object repr soundfile puts in front."""
    reason = getattr(e, "error_string", None) or str(e)
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>:?\s*", "", reason).strip() or type(e).__name__


def read_audio(
    data: bytes,
    field: str,
    max_seconds: float,
    min_seconds: float = 0.2,
    *,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """An uploaded audio file (WAV/FLAC/OGG/... at any rate within the limits, int or float
    PCM, up to ``limits.max_channels`` channels) -> float32 mono 16 kHz (S,).

    The header is checked first (:func:`probe_audio`); the samples are then decoded in
    blocks and mixed down to mono on the way, never holding every channel at once.
    """
    from talkmesh.audio.io import resample

    head = probe_audio(data, field, limits, max_seconds=max_seconds, min_seconds=min_seconds)
    mono = _decode_mono(data, field, head)
    audio = resample(mono, head.sample_rate, SAMPLE_RATE)
    seconds = audio.shape[0] / SAMPLE_RATE
    if seconds > max_seconds:
        raise InputError(413, field, f"audio is {seconds:.1f} s long; at most {max_seconds:g} s accepted", "too_long")
    if seconds < min_seconds:
        msg = f"audio is {seconds:.2f} s long; at least {min_seconds:g} s expected"
        raise InputError(422, field, msg, "too_short")
    if not np.isfinite(audio).all():
        raise InputError(422, field, "audio holds non-finite samples", "non_finite")
    return audio


def _decode_mono(data: bytes, field: str, head: AudioHeader) -> np.ndarray:
    """The samples the header declares, mixed down to float32 mono block by block; a file
    that ends (or breaks) before its declared length is a 400."""
    import soundfile as sf

    mono = np.empty(head.frames, np.float32)  # bounded: head.decoded_bytes was checked
    got = 0
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            while got < head.frames:
                block = f.read(min(DECODE_BLOCK_FRAMES, head.frames - got), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                mono[got : got + block.shape[0]] = block[:, 0] if head.channels == 1 else block.mean(axis=1)
                got += block.shape[0]
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as e:
        msg = f"audio data is truncated or corrupt after {got} of the {head.frames} frames its header declares"
        raise InputError(400, field, f"{msg} ({_sndfile_reason(e)})", "truncated") from None
    if got < head.frames * (1.0 - SHORT_READ_TOLERANCE):
        msg = f"audio data ends after {got} of the {head.frames} frames its header declares (truncated file?)"
        raise InputError(400, field, msg, "truncated")
    return mono[:got]


# ------------------------------------------------------------------------------ .npy arrays


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
    """What an ``.npy`` header declares (read without touching the data)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # where the data starts

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def probe_array(
    data: bytes,
    field: str,
    limits: InputLimits | None = None,
    ranks: Collection[int] | None = None,
) -> ArrayHeader:
    """The header of an uploaded ``.npy`` file, checked before its data is read: a numeric
    dtype (no objects), a rank in ``ranks`` (default 1..``limits.max_array_ndim``), at most
    ``limits.max_array_elements`` elements and ``max_array_bytes`` bytes, and data present
    for all of them."""
    from numpy.lib import format as npy

    limits = limits or InputLimits()
    ranks = tuple(ranks) if ranks is not None else tuple(range(1, limits.max_array_ndim + 1))
    if not data:
        raise InputError(400, field, "empty upload; expected a .npy array", "empty_upload")
    if bytes(data[:4]) == b"PK\x03\x04":
        raise InputError(400, field, "got an .npz archive; expected a single .npy array", "wrong_type")
    f = io.BytesIO(bytes(data))
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]} (1.0 or 2.0 expected)")
    except (ValueError, TypeError, EOFError, OverflowError, SyntaxError, KeyError, IndexError) as e:
        raise InputError(400, field, f"{NPY_MESSAGE}: {e}", "unreadable_array") from None
    head = ArrayHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran), f.tell())
    _check_array_header(head, field, limits, ranks, len(data))
    return head


def _check_array_header(head: ArrayHeader, field: str, limits: InputLimits, ranks: tuple[int, ...], size: int) -> None:
    if head.dtype.hasobject:
        msg = f"{NPY_MESSAGE}: dtype {head.dtype} holds Python objects, which are never unpickled"
        raise InputError(400, field, msg, "object_array")
    if head.dtype.kind not in "fiu" or head.dtype.subdtype is not None:
        msg = f"expected a numeric array (float or int), got dtype {head.dtype}"
        raise InputError(422, field, msg, "unsupported_dtype")
    if any(n < 0 for n in head.shape):
        raise InputError(400, field, f"{NPY_MESSAGE}: negative dimension in shape {head.shape}", "unreadable_array")
    if len(head.shape) not in ranks:
        want = " or ".join(f"{r}-D" for r in sorted(ranks))
        raise InputError(422, field, f"expected a {want} array; got shape {head.shape}", "wrong_shape")
    if head.size > limits.max_array_elements or head.nbytes > limits.max_array_bytes:
        msg = (
            f"shape {head.shape} of {head.dtype} is {head.size} elements ({head.nbytes / MiB:.1f} MiB); "
            f"at most {limits.max_array_elements} elements and {limits.max_array_bytes / MiB:g} MiB accepted"
        )
        raise InputError(413, field, msg, "too_large")
    if head.size == 0:
        raise InputError(422, field, f"the array is empty (shape {head.shape})", "wrong_shape")
    if size - head.offset < head.nbytes:
        held = size - head.offset
        msg = f"{NPY_MESSAGE}: shape {head.shape} needs {head.nbytes} bytes of data; the file holds {held}"
        raise InputError(400, field, msg, "truncated")


def read_array(
    data: bytes,
    field: str,
    *,
    limits: InputLimits | None = None,
    ranks: Collection[int] | None = None,
) -> np.ndarray:
    """An uploaded ``.npy`` file -> a finite float32 array (never unpickled). The header is
    checked first (:func:`probe_array`); the data is then read in place and converted once."""
    head = probe_array(data, field, limits, ranks)
    raw = np.frombuffer(data, dtype=head.dtype, count=head.size, offset=head.offset)
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        arr = raw.reshape(head.shape, order="F" if head.fortran_order else "C").astype(np.float32)
    if not np.isfinite(arr).all():
        msg = "array holds non-finite values (NaN, inf, or beyond the float32 range)"
        raise InputError(422, field, msg, "non_finite")
    return arr


# ------------------------------------------------------------------------------ motion, templates, styles


def reference_motion(
    arr: np.ndarray,
    facts: Mapping[str, Any],
    field: str = "motion",
    *,
    fps: float,
    min_seconds: float,
    max_seconds: float,
) -> dict[str, np.ndarray]:
    """Reference motion in the model's space -> the motion fields of a reference record.

    Vertex models (``facts["motion"] == "vertices"``, V vertices): (T, V, 3) or (T, V*3)
    -> ``{"vertices": (T, V, 3)}``. FLAME-parameter models: (T, 53) expression + jaw or
    (T, 56) FLAME-56 -> ``{"params": (T, 53)[, "head_pose": (T, 3)]}``; (T, V, 3) vertices
    are accepted too when the model has V vertices.
    """
    v = int(facts.get("num_vertices") or 0)
    kind = facts.get("motion", "vertices")
    out: dict[str, np.ndarray]
    if arr.ndim == 3 and v and arr.shape[1:] == (v, 3):
        out = {"vertices": arr}
    elif arr.ndim == 2 and v and arr.shape[1] == 3 * v:
        out = {"vertices": arr.reshape(arr.shape[0], v, 3)}
    elif kind == "params" and arr.ndim == 2 and arr.shape[1] in (53, 56):
        out = {"params": arr[:, :53]}
        if arr.shape[1] == 56:
            out["head_pose"] = arr[:, 53:56]
    else:
        want = f"(T, {v}, 3) or (T, {3 * v}) vertices" if v else ""
        if kind == "params":
            want = "(T, 53) FLAME expression+jaw or (T, 56) FLAME-56 parameters" + (f", or {want}" if want else "")
        raise InputError(422, field, f"expected {want}; got shape {tuple(arr.shape)}")
    if kind == "params" and "params" not in out:
        raise InputError(422, field, "this model adapts on FLAME parameters: send (T, 53) or (T, 56), not vertices")
    frames = next(iter(out.values())).shape[0]
    seconds = frames / fps
    if seconds < min_seconds:
        raise InputError(422, field, f"{frames} frames = {seconds:.2f} s at {fps:g} fps; at least {min_seconds:g} s")
    if seconds > max_seconds + 1.0 / fps:
        raise InputError(413, field, f"{frames} frames = {seconds:.1f} s at {fps:g} fps; at most {max_seconds:g} s")
    return out


def template_array(arr: np.ndarray, facts: Mapping[str, Any], field: str = "template") -> np.ndarray:
    """A neutral template (V, 3) or (V*3,) for vertex models; a FLAME shape (100,) for
    parameter models."""
    v = int(facts.get("num_vertices") or 0)
    if v and arr.shape in ((v, 3), (3 * v,), (1, v, 3), (1, 3 * v)):
        return arr.reshape(v, 3)
    if facts.get("motion") == "params" and arr.ndim == 1 and arr.shape[0] <= 300:
        return arr
    raise InputError(422, field, f"expected a ({v}, 3) neutral template; got shape {tuple(arr.shape)}")


def canonical_style_spec(style_id: str) -> str:
    """The multiplexing key of a style field: one name, or ``a:w,b:w`` with normalised weights
    (``""`` for none)."""
    if not style_id.strip():
        return ""
    parts = parse_style_spec(style_id)
    return parts[0][0] if len(parts) == 1 else ",".join(f"{n}:{w:.6g}" for n, w in parts)


def parse_style_spec(spec: str, field: str = "style_id") -> list[tuple[str, float]]:
    """``"<id>"`` or a weighted mix ``"<id>:0.7,<id2>:0.3"`` -> [(name, weight)] with the
    weights normalised to sum 1. Names are style ids or training-subject names."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError(422, field, "empty; expected a style id, a training speaker name or 'id:w,id2:w2'")
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > MAX_MIX:
        raise InputError(422, field, f"a mix of at most {MAX_MIX} styles; got {len(parts)}")
    out: list[tuple[str, float]] = []
    for p in parts:
        name, sep, w = p.partition(":")
        name = name.strip()
        if not STYLE_NAME.fullmatch(name):
            raise InputError(422, field, f"{name!r} is not a style id or speaker name (letters, digits, '_.-')")
        if sep:
            try:
                weight = float(w)
            except ValueError:
                raise InputError(422, field, f"weight {w!r} of {name!r} is not a number") from None
        else:
            weight = 1.0
        if not math.isfinite(weight) or weight < 0:
            raise InputError(422, field, f"weight of {name!r} must be a finite number >= 0, got {w!r}")
        out.append((name, weight))
    if len({n for n, _ in out}) != len(out):
        raise InputError(422, field, "a style appears twice in the mix")
    total = sum(w for _, w in out)
    if total <= 0:
        raise InputError(422, field, "the mix weights sum to 0")
    return [(n, w / total) for n, w in out]


def animate_options(fields: Mapping[str, Any], accepted: Sequence[str], method: str) -> dict[str, Any]:
    """The ``generate`` keyword options of a request's option ``fields`` (keys of
    :data:`ANIMATE_OPTIONS`; ``None`` = not sent; ``emotion_audio`` already decoded to (S,)).

    Raises :class:`InputError` 422 naming the field when ``method`` does not list an option
    the field sets in ``accepted`` (its ``generate_options``), when a value is out of range,
    when ``intensity`` comes without ``emotion``, when two emotion sources are sent, or when
    ``temperature`` / ``seed`` come without ``sample=true``.
    """
    sent = {k: v for k, v in fields.items() if v is not None}
    check_supported(sent, accepted, method)
    _check_values(sent)
    if "intensity" in sent and "emotion" not in sent:
        raise InputError(422, "intensity", "scales an emotion label; send emotion too")
    if "emotion" in sent and "emotion_audio" in sent:
        raise InputError(422, "emotion_audio", "one emotion source per request: an emotion label or emotion_audio")
    for field in ("temperature", "seed"):
        if field in sent and not sent.get("sample"):
            raise InputError(422, field, "applies to sampling only; send sample=true too")
    out: dict[str, Any] = {}
    for field, value in sent.items():
        for option in ANIMATE_OPTIONS[field]:
            out[option] = value
    return out


def check_supported(fields: Iterable[str], accepted: Sequence[str], method: str) -> None:
    """422 naming the first of the sent option ``fields`` that sets a ``generate`` option the
    ``method`` does not list in ``accepted``."""
    sent = set(fields)
    unknown = sorted(sent - set(ANIMATE_OPTIONS))
    if unknown:
        raise ValueError(f"not animate option fields: {unknown}")
    for field in ANIMATE_OPTIONS:
        missing = [o for o in ANIMATE_OPTIONS[field] if field in sent and o not in accepted]
        if missing:
            takes = ", ".join(accepted) if accepted else "no options"
            raise InputError(422, field, f"the {method} model does not accept {'/'.join(missing)} (it takes {takes})")


def _check_values(sent: dict[str, Any]) -> None:
    """Range checks (the HTTP form enforces the same bounds first); normalises in place."""
    if "emotion" in sent:
        label = str(sent["emotion"]).strip().lower()
        if not EMOTION_LABEL.fullmatch(label):
            raise InputError(422, "emotion", f"{sent['emotion']!r} is not an emotion label (e.g. 'happy')")
        sent["emotion"] = label
    if "intensity" in sent:
        x = float(sent["intensity"])
        if not 0.0 <= x <= 1.0:
            raise InputError(422, "intensity", f"must lie in [0, 1], got {sent['intensity']!r}")
        sent["intensity"] = x
    if "temperature" in sent:
        x = float(sent["temperature"])
        if not 0.0 < x <= MAX_TEMPERATURE:
            raise InputError(422, "temperature", f"must be > 0 and <= {MAX_TEMPERATURE:g}, got {sent['temperature']!r}")
        sent["temperature"] = x
    if "seed" in sent:
        if isinstance(sent["seed"], bool) or not isinstance(sent["seed"], int) or not 0 <= sent["seed"] <= MAX_SEED:
            raise InputError(422, "seed", f"must be an integer in [0, 2**63), got {sent['seed']!r}")
    if "sample" in sent:
        sent["sample"] = bool(sent["sample"])
    if "emotion_audio" in sent:
        a = np.asarray(sent["emotion_audio"])
        if a.ndim != 1 or a.dtype != np.float32:
            raise InputError(422, "emotion_audio", f"expected decoded float32 (S,) audio, got {a.dtype} {a.shape}")
