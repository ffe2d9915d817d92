"""The response bodies of the style service as pydantic models, so that ``/docs`` and
``/openapi.json`` show the real schemas and every JSON answer is validated on the way out.

Errors have their own model (:class:`talkmesh.serving.errors.ErrorBody`). ``POST /v1/animate``
answers binary motion (``npz``/``npy``/``mp4``) or :class:`AnimateJson`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ANIMATE_RESPONSES",
    "AnimateJson",
    "Health",
    "Info",
    "LeaderboardPage",
    "Limits",
    "ModelCard",
    "Style",
    "StylePage",
]


class Health(BaseModel):
    """``GET /healthz``: the ingress and the model deployment answer."""

    status: Literal["ok"]
    method: str
    model: str = Field(description="models:/talkmesh-<method>/<version>, or the served method directory")
    model_version: int | None = Field(description="registry version; null for a local method directory")


class Limits(BaseModel):
    """The request limits (each checked from headers before anything is decoded)."""

    max_upload_mb: float
    max_body_mb: float = Field(description="a whole request body, enforced while it streams in")
    max_audio_seconds: float
    max_reference_seconds: float
    min_reference_seconds: float
    max_sample_rate: int
    max_channels: int
    max_decoded_mb: float
    max_array_mb: float
    max_page: int
    adapt_queue_max: int
    adapt_queue_per_tenant: int
    max_streams: int = Field(description="open /v1/stream sessions per ingress replica")
    stream_idle_s: float = Field(description="a /v1/stream session idle this long is closed")
    max_stream_seconds: float = Field(description="audio of one /v1/stream session")
    max_chunk_seconds: float = Field(description="audio of one /v1/stream binary message")


class Info(BaseModel):
    """``GET /v1/info``: what the served model is and what a request may hold."""

    method: str
    model: str
    model_version: int | None
    model_key: str = Field(description="the model version styles are adapted for")
    style_version: int
    fps: float
    num_vertices: int
    motion: Literal["vertices", "params"]
    param_dim: int
    train_subjects: list[str] = Field(description="training speakers: each is a style_id")
    templates: list[str] = Field(description="training speakers whose neutral face the model carries")
    default_style: str | None = Field(description="what animates when no style_id is sent")
    default_template: bool = Field(description="audio alone gets vertices: the model carries a default face")
    supports_mix: bool
    generate_options: list[str]
    adapt_options: list[str]
    limits: Limits
    tenant: str
    dev_mode: bool


class ModelCard(BaseModel):
    """``GET /v1/model-card``: the served registered version's card (Markdown)."""

    model: str
    model_version: int | None
    card: str


class LeaderboardPage(BaseModel):
    """``GET /v1/leaderboard``: the newest ``talkmesh leaderboard`` table (its JSON form)."""

    protocol_id: str
    protocol: dict[str, Any]
    rows: list[dict[str, Any]]
    skipped: dict[str, str]


class Style(BaseModel):
    """A stored style and its adaptation status for the served model."""

    model_config = ConfigDict(extra="forbid")

    style_id: str
    status: Literal["pending", "ready", "failed", "absent"]
    method: str | None
    model: str = Field(description="the model version this status is for")
    name: str
    seconds: float | None = Field(description="length of the reference clip")
    created: float | None = Field(description="Unix time the reference was stored")
    adapt_options: dict[str, Any] | None = None
    error: str | None = None
    wall_s: float | None = None
    summary: dict[str, Any] | None = Field(default=None, description="what the adaptation measured")
    attempts: int | None = None
    queue_s: float | None = Field(default=None, description="pending: time waiting for a worker")
    run_s: float | None = Field(default=None, description="pending: time running so far")


class StylePage(BaseModel):
    """``GET /v1/styles``: one page of the tenant's styles, oldest first."""

    styles: list[Style]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")
    train_subjects: list[str]


class AnimateJson(BaseModel):
    """``POST /v1/animate`` with ``format=json``."""

    fps: float
    frames: int
    model: str
    outputs: dict[str, list[Any]] = Field(description="vertices (T, V, 3), params (T, P), ... as nested lists")
    preview_mp4_base64: str | None = None


# OpenAPI of the 200 answer of POST /v1/animate: one media type per format.
ANIMATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "the motion: npz (every output and fps), npy (vertices), json, an mp4 preview, "
            "or glb (glTF 2.0 morph-target animation)"
        ),
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": AnimateJson.model_json_schema()},
            "video/mp4": {"schema": {"type": "string", "format": "binary"}},
            "model/gltf-binary": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
