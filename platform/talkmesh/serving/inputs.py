"""Uploads -> validated arrays. Nothing here unpickles: ``.npy`` files are read with
``allow_pickle=False`` and audio through libsndfile.

Every failure raises :class:`InputError` carrying the HTTP status the service answers
with and a message that names the field and what was expected:

* 400 - not decodable (not audio, not an ``.npy`` array, empty upload);
* 413 - too large or too long;
* 422 - decodable but wrong (shape, vertex count, non-finite values, too short, bad spec),
  or an option the served method does not take.

:func:`animate_options` maps the option fields of ``POST /v1/animate`` (``emotion``,
``intensity``, ``emotion_audio``, ``sample``, ``temperature``, ``seed``) to the keyword
options of ``MotionMethod.generate``; an option the method does not list in its
``generate_options`` is a 422 naming the field and the method.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ANIMATE_OPTIONS",
    "EMOTION_LABEL",
    "InputError",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "STYLE_NAME",
    "animate_options",
    "check_supported",
    "parse_style_spec",
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


class InputError(ValueError):
    """A bad request: ``status`` (HTTP), ``field`` (the form field), ``message``."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = int(status)
        self.field = field
        self.message = message


def read_audio(data: bytes, field: str, max_seconds: float, min_seconds: float = 0.2) -> np.ndarray:
    """An uploaded audio file (WAV/FLAC/OGG/... at any rate, int or float PCM, mono or
    stereo) -> float32 mono 16 kHz (S,)."""
    from talkmesh.audio.io import AudioError, load_audio

    if not data:
        raise InputError(400, field, "empty upload; expected an audio file (WAV, FLAC or OGG)")
    if bytes(data[:6]) == b"\x93NUMPY":
        raise InputError(400, field, "got a .npy array; expected an audio file (WAV, FLAC or OGG) with its sample rate")
    try:
        audio = load_audio(bytes(data), max_seconds=max_seconds)
    except AudioError as e:
        msg = str(e).removeprefix("<upload>: ")
        raise InputError(413 if "at most" in msg else 400, field, msg) from None
    seconds = audio.shape[0] / SAMPLE_RATE
    if seconds > max_seconds:
        raise InputError(413, field, f"audio is {seconds:.1f} s long; at most {max_seconds:g} s accepted")
    if seconds < min_seconds:
        raise InputError(422, field, f"audio is {seconds:.2f} s long; at least {min_seconds:g} s expected")
    if not np.isfinite(audio).all():
        raise InputError(422, field, "audio holds non-finite samples")
    return audio


def read_array(data: bytes, field: str) -> np.ndarray:
    """An uploaded ``.npy`` file -> a finite float32 array (never unpickled)."""
    if not data:
        raise InputError(400, field, "empty upload; expected a .npy array")
    try:
        arr = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(400, field, f"not a readable .npy array (numpy.save format, no objects): {e}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise InputError(400, field, "got an .npz archive; expected a single .npy array")
    if arr.dtype.kind not in "fiu":
        raise InputError(422, field, f"expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(422, field, "array holds non-finite values")
    return arr


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
