"""The ASGI Idempotency-Key middleware (FastAPI, Starlette, any ASGI app), on the
:class:`~idemd_client.AsyncClient`."""
from __future__ import annotations

import asyncio
import inspect
import urllib.parse
from typing import Any, Awaitable, Callable, List, MutableMapping, Optional, Tuple

from .._common import Result, log
from ..aio import AsyncClient, AsyncLease
from ..errors import IdemdError, InProgressError
from ._core import (
    InvalidKey,
    Settings,
    acquire_failure,
    idemd_key,
    parse_key,
    problem,
    replay_headers,
    request_fingerprint,
    retry_after_seconds,
    stored_metadata,
)

__all__ = ["IdempotencyMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Disconnected(Exception):
    """The caller went away before its body arrived."""


class IdempotencyMiddleware:
    """Makes the covered requests of an ASGI app idempotent by their ``Idempotency-Key``::

        app.add_middleware(IdempotencyMiddleware, client=AsyncClient("idemd:50051"),
                           namespace="orders-api", key_required=True)

    Behaves as clients/HTTP-MIDDLEWARE.md says; the options are those of
    :class:`idemd_client.http.Settings`. Stack several, each with its own ``paths``, for routes
    with different options.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, client: AsyncClient, namespace: str, **options: Any) -> None:
        self.app = app
        self.client = client
        self.settings = Settings(namespace=namespace, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        if scope["type"] != "http" or not settings.covers(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers: List[Tuple[bytes, bytes]] = list(scope.get("headers") or [])
        try:
            key = parse_key([value for name, value in headers if name.lower() == b"idempotency-key"])
        except InvalidKey as exc:
            await _answer(send, *problem("invalid-key", str(exc)))
            return
        if key is None:
            if settings.key_required:
                await _answer(send, *problem("missing-key", "this route requires an Idempotency-Key header"))
                return
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(headers, receive, settings.max_body)
        except _Disconnected:
            return
        if body is None:
            await _answer(send, *problem(
                "request-too-large", f"the request body is larger than {settings.max_body} bytes"))
            return

        caller = settings.scope(scope) if settings.scope is not None else ""
        if inspect.isawaitable(caller):
            caller = await caller
        fingerprint = request_fingerprint(
            scope["method"],
            _target(scope),
            _header(headers, "content-type"),
            body,
            include=settings.fingerprint_include,
            exclude=settings.fingerprint_exclude,
            headers=settings.fingerprint_header_values(lambda name: _headers(headers, name)),
        )
        record_key = idemd_key(str(caller or ""), key)
        replay_receive = _replaying(body, receive)

        lease = await self._acquire(record_key, fingerprint, send)
        if lease is None:
            return
        if lease is _UNPROTECTED:
            await self.app(scope, replay_receive, send)
            return
        assert isinstance(lease, AsyncLease)
        try:
            if lease.replayed:
                result = lease.result or Result()
                await _answer(send, result.code or 200, replay_headers(result.metadata), result.body)
                return
            if not lease.protected:
                await self.app(scope, replay_receive, send)
                return
            await self._run(scope, replay_receive, send, lease, record_key)
        except BaseException as exc:
            # The handler raised (or the request was cancelled): give the key back, re-raise.
            await lease.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            await lease.__aexit__(None, None, None)

    async def _acquire(self, record_key: str, fingerprint: bytes, send: Send) -> Any:
        """The lease, or ``_UNPROTECTED`` (fail-open), or None after answering the caller."""
        settings, loop = self.settings, asyncio.get_running_loop()
        deadline = None if settings.wait is None else loop.time() + settings.wait
        while True:
            lease = self.client.lease(settings.namespace, record_key, fingerprint, **settings.lease_options())
            try:
                await asyncio.wait_for(lease.__aenter__(), settings.idemd_timeout)
                return lease
            except InProgressError as exc:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is None or remaining <= 0:
                    await _answer(send, *problem(
                        "request-in-progress",
                        "a request with this Idempotency-Key is still being processed",
                        extra_headers=[("retry-after", str(retry_after_seconds(exc.retry_after)))],
                    ))
                    return None
                await self._wait(record_key, remaining)
            except asyncio.TimeoutError as exc:
                if settings.fail_open:
                    log.warning("idemd_client.http: idemd did not answer within %ss; running %s/%s "
                                "UNPROTECTED (fail_open)", settings.idemd_timeout, settings.namespace, record_key)
                    return _UNPROTECTED
                await _answer(send, *acquire_failure(exc))
                return None
            except IdemdError as exc:
                await _answer(send, *acquire_failure(exc))
                return None

    async def _wait(self, record_key: str, remaining: float) -> None:
        """Waits (idemd's Wait) until the key's holder finishes or ``remaining`` passes; the
        Acquire that follows decides what happened."""
        try:
            await asyncio.wait_for(
                self.client.wait(self.settings.namespace, record_key, remaining),
                remaining + self.settings.idemd_timeout,
            )
        except (IdemdError, asyncio.TimeoutError) as exc:
            log.debug("idemd_client.http: Wait on %s ended: %s", record_key, exc)
            # Unreachable or overloaded: do not spin; the Acquire has its own retries.
            await asyncio.sleep(min(remaining, 0.1))

    async def _run(self, scope: Scope, receive: Receive, send: Send, lease: AsyncLease, record_key: str) -> None:
        settings = self.settings

        async def not_stored(oversized: bool) -> None:
            # Before the caller sees the answer: a retry it sends at once must find the key free.
            if oversized:
                log.error("idemd_client.http: the response to %s/%s is larger than %d bytes: not "
                          "stored, key released", settings.namespace, record_key, settings.max_stored_body)
            await lease.release()

        capture = _Capture(send, settings, not_stored)
        await self.app(scope, receive, capture.send)
        if capture.streaming:
            return
        if not capture.finished:
            # The app returned without a whole response: nothing to store.
            await lease.release()
            await capture.flush()
            return
        result = Result(
            body=b"".join(capture.body),
            code=capture.status,
            metadata=stored_metadata(capture.header_pairs(), settings.keep_headers),
        )
        try:
            await lease.complete(result)
        except IdemdError as exc:
            log.error("idemd_client.http: Complete of %s/%s failed after the handler ran; the response "
                      "goes out unstored: %s", settings.namespace, record_key, exc)
        await capture.flush()


_UNPROTECTED = object()


class _Capture:
    """Holds a storable response back until it is stored; a response that will not be stored
    (its status, or a body over the limit) streams through as soon as that is known."""

    def __init__(self, send: Send, settings: Settings, not_stored: Callable[[bool], Awaitable[None]]) -> None:
        self._send = send
        self._settings = settings
        self._not_stored = not_stored
        self.messages: List[Message] = []
        self.status = 0
        self.headers: List[Tuple[bytes, bytes]] = []
        self.body: List[bytes] = []
        self.size = 0
        self.finished = False
        self.streaming = False

    def header_pairs(self) -> List[Tuple[str, str]]:
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.headers]

    async def send(self, message: Message) -> None:
        if self.streaming:
            await self._send(message)
            return
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers") or [])
            if not self._settings.storable(self.status):
                await self._stream(oversized=False)
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body") or b"")
            self.size += len(chunk)
            self.body.append(chunk)
            if self.size > self._settings.max_stored_body:
                await self._stream(oversized=True)
            elif not message.get("more_body", False):
                self.finished = True

    async def _stream(self, oversized: bool) -> None:
        self.streaming = True
        await self._not_stored(oversized)
        await self.flush()

    async def flush(self) -> None:
        messages, self.messages = self.messages, []
        for message in messages:
            await self._send(message)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the caller's next events."""
    delivered = False

    async def receive_again() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def _read_body(headers: List[Tuple[bytes, bytes]], receive: Receive, limit: int) -> Optional[bytes]:
    """The whole request body, or None when it is larger than ``limit`` (not read further)."""
    declared = _header(headers, "content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        return None
    chunks: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected()
        if message["type"] != "http.request":
            continue
        chunk = bytes(message.get("body") or b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _headers(headers: List[Tuple[bytes, bytes]], name: str) -> List[str]:
    wanted = name.encode("latin-1")
    return [value.decode("latin-1") for key, value in headers if key.lower() == wanted]


def _header(headers: List[Tuple[bytes, bytes]], name: str) -> Optional[str]:
    values = _headers(headers, name)
    return ", ".join(values) if values else None


def _target(scope: Scope) -> str:
    """The request target as received: the raw path, and ``?query`` when there is one."""
    raw_path = scope.get("raw_path")
    if raw_path:
        path = bytes(raw_path).decode("latin-1")
    else:
        path = urllib.parse.quote(scope.get("root_path", "") + scope["path"], safe="/:@!$&'()*+,;=-._~")
    query = bytes(scope.get("query_string") or b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _answer(send: Send, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
    fields = [(_field_bytes(name), _field_bytes(value)) for name, value in headers]
    fields.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _field_bytes(text: str) -> bytes:
    # Headers captured here were decoded as latin-1 and go back byte for byte; a stored value
    # from another client's app may hold other characters, sent as UTF-8.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
