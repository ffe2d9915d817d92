"""Request bounds that must hold before a route runs: the body size, enforced while the body
streams in, and decoding kept off the event loop.

* :class:`BodyLimitMiddleware` is a pure ASGI middleware. A request whose ``Content-Length``
  exceeds the limit is answered 413 at once, before a byte of its body is read; a body
  without a length (chunked) or one longer than it said is counted as it arrives and cut
  off with a 413 the moment it passes the limit. Nothing is buffered here: the route's own
  parser (multipart spooling) sees the chunks as they come. Answers use the service's
  error schema (:mod:`talkmesh.serving.errors`, ``field: "body"``).
* :class:`BlockingRunner` runs blocking work (audio and ``.npy`` decoding, numpy checks) on
  worker threads, at most ``max_workers`` at a time, so a slow decode never stalls the
  event loop (and ``/healthz`` with it); when ``max_waiting`` calls already wait for a
  worker, the next one is refused with 503 and ``Retry-After`` instead of queueing without
  bound. :func:`run_blocking` is the same through one shared, lazily made runner.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talkmesh.serving.errors import ServiceError, error_response

__all__ = ["BlockingRunner", "BodyLimitMiddleware", "BodyTooLarge", "run_blocking"]

log = logging.getLogger("talkmesh.serving.limits")
T = TypeVar("T")


class BodyTooLarge(ServiceError):
    """A request body over the limit (413, ``field: "body"``)."""

    def __init__(self, max_bytes: int, seen: int | None = None) -> None:
        size = f"request body is {seen} bytes" if seen is not None else "request body exceeds the limit"
        super().__init__(
            413, "too_large", f"{size}; at most {max_bytes} bytes accepted", "body", {"Connection": "close"}
        )


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` while they stream in (see the module doc)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes: a byte count >= 0 expected, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _content_length(scope)
        except ServiceError as e:
            await _answer(e, scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await _answer(BodyTooLarge(self.max_bytes, declared), scope, receive, send)
            return
        guard = _BodyGuard(self.max_bytes, scope, receive, send)
        try:
            await self.app(scope, guard.receive, guard.send)
        except BodyTooLarge:
            if guard.answered or not guard.started:
                await guard.refuse()
                return
            raise  # the app had already begun answering: nothing sane left to send
        if guard.over and not guard.answered:  # the app swallowed the error and answered nothing
            await guard.refuse()


class _BodyGuard:
    """One request's byte count: wraps ``receive`` (counts, stops past the limit) and
    ``send`` (once over, whatever the app answers is replaced by the 413)."""

    def __init__(self, max_bytes: int, scope: Scope, receive: Receive, send: Send) -> None:
        self.max_bytes = max_bytes
        self.scope, self._receive, self._send = scope, receive, send
        self.seen = 0
        self.over = False
        self.started = False  # the app's own response began
        self.answered = False  # our 413 went out

    async def receive(self) -> Message:
        if self.over:
            raise BodyTooLarge(self.max_bytes)
        message = await self._receive()
        if message.get("type") == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.max_bytes:
                self.over = True
                log.info("request body cut off past %d bytes: %s", self.max_bytes, self.scope.get("path"))
                raise BodyTooLarge(self.max_bytes)
        return message

    async def send(self, message: Message) -> None:
        if self.over:
            # The app turned the failed read into an answer of its own (FastAPI makes it a
            # 400 "error parsing the body"): answer the 413 instead, once.
            if message.get("type") == "http.response.start" and not self.answered:
                await self.refuse()
            return
        if message.get("type") == "http.response.start":
            self.started = True
        await self._send(message)

    async def refuse(self) -> None:
        if self.answered:
            return
        self.answered = True
        await _answer(BodyTooLarge(self.max_bytes), self.scope, self._receive, self._send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; ``None`` when absent; a 400 when malformed or repeated
    with different values (request smuggling)."""
    values = {v.strip() for k, v in scope.get("headers", ()) if k.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not all(v.isdigit() for v in values):
        raise ServiceError(400, "bad_request", "Content-Length must be one non-negative integer", "content-length")
    return int(values.pop())


async def _answer(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error.status, error.code, error.message, error.field, error.headers)
    await response(scope, receive, send)


class BlockingRunner:
    """Blocking calls on worker threads, ``max_workers`` at once, ``max_waiting`` queued."""

    def __init__(self, max_workers: int = 2, max_waiting: int = 64, retry_after_s: int = 1) -> None:
        if max_workers < 1 or max_waiting < 0:
            raise ValueError(f"max_workers >= 1 and max_waiting >= 0 expected, got {max_workers}, {max_waiting}")
        self.max_workers = max_workers
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._limiter = anyio.CapacityLimiter(max_workers)
        self.running = 0
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread; its exceptions (an ``InputError``)
        propagate unchanged. A 503 :class:`ServiceError` when too many calls wait already."""
        if self.waiting >= self.max_waiting and self.running >= self.max_workers:
            raise ServiceError(
                503,
                "busy",
                f"{self.waiting} uploads are waiting to be decoded; retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._limiter.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            # The thread pool's own default limiter applies too; ours is the tighter bound.
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        finally:
            self.running -= 1
            self._limiter.release()


_shared: BlockingRunner | None = None


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process's shared :class:`BlockingRunner` (2 workers)."""
    global _shared
    if _shared is None:
        _shared = BlockingRunner()
    return await _shared.run(fn, *args, **kwargs)
