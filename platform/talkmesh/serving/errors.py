"""The service's one error schema, and the FastAPI handlers that answer every failure in it.

Every error response of the service has the body::

    {"error": {"code": "too_large", "message": "audio is 31.0 s long; at most 30 s accepted", "field": "audio"}}

``code`` is a stable, machine-readable word (clients branch on it), ``message`` is for
people and names what was expected, ``field`` names the form field / query parameter /
header at fault, or is ``null`` when no single field is. Why one schema: clients (and the
fuzz tests) handle one shape instead of FastAPI's ``{"detail": ...}`` variants.

* :class:`ServiceError` is what route code raises (``talkmesh.serving.inputs.InputError``
  is one, so upload validation errors render the same way);
* :func:`install_error_handlers` renders :class:`ServiceError`, FastAPI's request
  validation errors (422, naming the field; the offending input is never echoed back),
  Starlette's ``HTTPException`` (404 for unknown routes, 405, ...) and any unexpected
  exception (500 with a generic message; the traceback goes to the log, never to the
  client);
* :func:`error_body` / :func:`error_response` build the body for code that answers
  outside the handlers (a pure ASGI middleware such as ``talkmesh.serving.limits``);
* :data:`ERROR_RESPONSES` documents the schema in OpenAPI (``FastAPI(responses=...)``).
"""

from __future__ import annotations

import http
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = [
    "ERROR_RESPONSES",
    "STATUS_CODES",
    "ErrorBody",
    "ErrorDetail",
    "ServiceError",
    "code_for_status",
    "error_body",
    "error_response",
    "install",
    "install_error_handlers",
    "validation_summary",
]

log = logging.getLogger("talkmesh.serving.errors")

# The default ``code`` of each HTTP status (a ServiceError may name a more specific one).
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    410: "gone",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}
INTERNAL_MESSAGE = "internal error; the service logged the details"


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a message for people, the field at fault."""

    code: str = Field(description="stable machine-readable code, e.g. too_large, invalid_input, not_found")
    message: str = Field(description="what was wrong and what was expected")
    field: str | None = Field(default=None, description="the form field, parameter or header at fault; null if none")


class ErrorBody(BaseModel):
    """The body of every error response of the service."""

    error: ErrorDetail


# OpenAPI: every route may answer these with ErrorBody (``FastAPI(responses=ERROR_RESPONSES)``).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": http.HTTPStatus(status).phrase}
    for status in (400, 401, 404, 409, 413, 422, 429, 500, 503)
}


def code_for_status(status: int) -> str:
    """The default ``code`` of an HTTP status (``client_error`` / ``server_error`` for unlisted ones)."""
    return STATUS_CODES.get(int(status)) or ("server_error" if int(status) >= 500 else "client_error")


class ServiceError(Exception):
    """A failure the service answers with ``status`` and the error schema.

    ``headers`` go on the response (``Retry-After`` for 429/503, ``WWW-Authenticate`` for 401).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        if not 400 <= int(status) <= 599:
            raise ValueError(f"status: an HTTP error status 400..599 expected, got {status}")
        self.status = int(status)
        self.code = code or code_for_status(status)
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The error schema of this error."""
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "field"}}``, validated by :class:`ErrorBody`."""
    return ErrorBody(error=ErrorDetail(code=code, message=message, field=field)).model_dump()


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON response in the error schema (also an ASGI app: ``await response(scope, receive, send)``)."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(code, message, field), status_code=int(status), headers=dict(headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure of ``app`` in the error schema. Call once, before the app serves.

    Unexpected exceptions are answered by Starlette's outermost middleware with the generic
    500 and logged here with their traceback; Starlette then re-raises them, by design, so
    that the server (uvicorn, the Serve replica) records the request as failed too.
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


install = install_error_handlers  # the short name other modules of this round already use


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors: Sequence[Mapping[str, Any]] = exc.errors()  # type: ignore[attr-defined]
    field, message = validation_summary(errors)
    return error_response(422, "invalid_input", message, field)


def validation_summary(errors: Sequence[Mapping[str, Any]]) -> tuple[str | None, str]:
    """(the first field at fault, one message naming each) of pydantic/FastAPI validation
    errors; the input values are left out (they may be large, binary or secret)."""
    parts: list[str] = []
    fields: list[str] = []
    for err in errors[:10]:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie", "form"):
            loc = loc[1:]
        name = ".".join(loc) or None
        msg = str(err.get("msg") or "invalid value")
        if name:
            fields.append(name)
        parts.append(f"{name}: {msg}" if name else msg)
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    return (fields[0] if fields else None), "; ".join(parts) or "invalid request"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = int(getattr(exc, "status_code", 500))
    detail = getattr(exc, "detail", None)
    message = detail if isinstance(detail, str) and detail else http.HTTPStatus(status).phrase
    field = None
    if isinstance(detail, Mapping) and isinstance(detail.get("error"), Mapping):  # already in the schema
        inner = detail["error"]
        message, field = str(inner.get("message") or message), inner.get("field")
        code = str(inner.get("code") or code_for_status(status))
    else:
        code = code_for_status(status)
    headers = getattr(exc, "headers", None) or {}
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    return error_response(status, code, message, field, headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s -> 500: unexpected %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", INTERNAL_MESSAGE)
