"""The WSGI Idempotency-Key middleware (Flask, any WSGI app), on the sync
:class:`~idemd_client.Client`."""
from __future__ import annotations

import http
import io
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .._common import Result, log
from ..client import Client, Lease
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

__all__ = ["WsgiIdempotencyMiddleware"]

Environ = Dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], Any]]


class WsgiIdempotencyMiddleware:
    """Makes the covered requests of a WSGI app idempotent by their ``Idempotency-Key``::

        app.wsgi_app = WsgiIdempotencyMiddleware(app.wsgi_app, client=Client("idemd:50051"),
                                                 namespace="orders-api", key_required=True)

    Behaves as clients/HTTP-MIDDLEWARE.md says; the options are those of
    :class:`idemd_client.http.Settings`. Stack several, each with its own ``paths``, for routes
    with different options. The server must serve requests in threads (waitress, gunicorn's
    gthread): a duplicate waiting for a 409 or a replay must not wait behind the first.

    WSGI servers join repeated header fields with "," before the app sees them: two
    Idempotency-Key fields arrive as one value with a comma, which §2 refuses.
    """

    def __init__(self, app: Callable[[Environ, StartResponse], Iterable[bytes]], *, client: Client,
                 namespace: str, **options: Any) -> None:
        self.app = app
        self.client = client
        self.settings = Settings(namespace=namespace, **options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        settings = self.settings
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not settings.covers(environ.get("REQUEST_METHOD", "GET"), path):
            return self.app(environ, start_response)
        field = environ.get("HTTP_IDEMPOTENCY_KEY")
        try:
            key = parse_key([] if field is None else [field.encode("latin-1")])
        except InvalidKey as exc:
            return _answer(start_response, *problem("invalid-key", str(exc)))
        if key is None:
            if settings.key_required:
                return _answer(start_response, *problem("missing-key", "this route requires an Idempotency-Key header"))
            return self.app(environ, start_response)
        body = _read_body(environ, settings.max_body)
        if body is None:
            return _answer(start_response, *problem(
                "request-too-large", f"the request body is larger than {settings.max_body} bytes"))
        environ = dict(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))

        caller = settings.scope(environ) if settings.scope is not None else ""
        fingerprint = request_fingerprint(
            environ.get("REQUEST_METHOD", "GET"),
            _target(environ),
            environ.get("CONTENT_TYPE"),
            body,
            include=settings.fingerprint_include,
            exclude=settings.fingerprint_exclude,
            headers=settings.fingerprint_header_values(lambda name: _headers(environ, name)),
        )
        record_key = idemd_key(str(caller or ""), key)

        outcome = self._acquire(record_key, fingerprint)
        if isinstance(outcome, tuple):
            return _answer(start_response, *outcome)
        if outcome is _UNPROTECTED:
            return self.app(environ, start_response)
        lease = outcome
        assert isinstance(lease, Lease)
        if lease.replayed:
            lease.__exit__(None, None, None)
            result = lease.result or Result()
            return _answer(start_response, result.code or 200, replay_headers(result.metadata), result.body)
        if not lease.protected:
            lease.__exit__(None, None, None)
            return self.app(environ, start_response)
        try:
            return self._run(environ, start_response, lease, record_key)
        except BaseException as exc:
            # The handler raised: give the key back, re-raise for the framework to answer.
            lease.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _acquire(self, record_key: str, fingerprint: bytes) -> Any:
        """The lease, ``_UNPROTECTED`` (fail-open), or the (status, headers, body) to answer."""
        settings = self.settings
        deadline = None if settings.wait is None else time.monotonic() + settings.wait
        while True:
            lease = self.client.lease(settings.namespace, record_key, fingerprint, **settings.lease_options())
            try:
                return _enter_within(lease, settings.idemd_timeout)
            except InProgressError as exc:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is None or remaining <= 0:
                    return problem(
                        "request-in-progress",
                        "a request with this Idempotency-Key is still being processed",
                        extra_headers=[("retry-after", str(retry_after_seconds(exc.retry_after)))],
                    )
                self._wait(record_key, remaining)
            except TimeoutError as exc:
                if settings.fail_open:
                    log.warning("idemd_client.http: idemd did not answer within %ss; running %s/%s "
                                "UNPROTECTED (fail_open)", settings.idemd_timeout, settings.namespace, record_key)
                    return _UNPROTECTED
                return acquire_failure(exc)
            except IdemdError as exc:
                return acquire_failure(exc)

    def _wait(self, record_key: str, remaining: float) -> None:
        """Waits (idemd's Wait) until the key's holder finishes or ``remaining`` passes; the
        Acquire that follows decides what happened."""
        try:
            self.client.wait(self.settings.namespace, record_key, remaining)
        except IdemdError as exc:
            log.debug("idemd_client.http: Wait on %s ended: %s", record_key, exc)
            # Unreachable or overloaded: do not spin; the Acquire has its own retries.
            time.sleep(min(remaining, 0.1))

    def _run(self, environ: Environ, start_response: StartResponse, lease: Lease, record_key: str) -> Iterable[bytes]:
        settings = self.settings
        response: Dict[str, Any] = {}
        chunks: List[bytes] = []

        def capture_start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
            if exc_info is not None and response.get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            response["status"], response["headers"] = status, list(headers)
            return chunks.append

        iterable = self.app(environ, capture_start)
        iterator = iter(iterable)
        size = sum(len(chunk) for chunk in chunks)
        oversized = False
        try:
            for chunk in iterator:
                chunks.append(chunk)
                size += len(chunk)
                if size > settings.max_stored_body:
                    oversized = True
                    break
        except BaseException:
            _close(iterable)
            raise
        if "status" not in response:
            _close(iterable)
            raise RuntimeError("the WSGI app returned without calling start_response")
        status = int(response["status"].split(" ", 1)[0])
        if oversized:
            log.error("idemd_client.http: the response to %s/%s is larger than %d bytes: not stored, "
                      "key released", settings.namespace, record_key, settings.max_stored_body)
            lease.release()
            lease.__exit__(None, None, None)
            start_response(response["status"], response["headers"])
            response["sent"] = True
            return _Streaming(chunks, iterator, iterable)
        _close(iterable)
        if settings.storable(status):
            result = Result(
                body=b"".join(chunks), code=status,
                metadata=stored_metadata(response["headers"], settings.keep_headers),
            )
            try:
                lease.complete(result)
            except IdemdError as exc:
                log.error("idemd_client.http: Complete of %s/%s failed after the handler ran; the "
                          "response goes out unstored: %s", settings.namespace, record_key, exc)
        else:
            lease.release()
        lease.__exit__(None, None, None)
        start_response(response["status"], response["headers"])
        response["sent"] = True
        return chunks


_UNPROTECTED = object()


class _Streaming:
    """The rest of a response too large to store, after what was read of it."""

    def __init__(self, head: List[bytes], rest: Iterator[bytes], iterable: Iterable[bytes]) -> None:
        self._head, self._rest, self._iterable = head, rest, iterable

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        _close(self._iterable)


def _close(iterable: Iterable[bytes]) -> None:
    close = getattr(iterable, "close", None)
    if close is not None:
        close()


def _enter_within(lease: Lease, timeout: float) -> Lease:
    """``lease.__enter__()`` (Acquire with the client's retries), bounded by ``timeout``: a
    blocking call cannot be interrupted, so it runs in a thread of its own, and one that
    finishes after the caller gave up gives its lease back."""
    lock = threading.Lock()
    finished = threading.Event()
    state: Dict[str, Any] = {"abandoned": False, "error": None}

    def acquire() -> None:
        error: Optional[BaseException] = None
        try:
            lease.__enter__()
        except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
            error = exc
        with lock:
            if state["abandoned"]:
                if error is None:
                    lease.release()
                return
            state["error"] = error
            finished.set()

    threading.Thread(target=acquire, name="idemd-acquire", daemon=True).start()
    if not finished.wait(timeout):
        with lock:
            if not finished.is_set():
                state["abandoned"] = True
                raise TimeoutError(f"idemd did not answer within {timeout}s")
    if state["error"] is not None:
        raise state["error"]
    return lease


def _read_body(environ: Environ, limit: int) -> Optional[bytes]:
    """The whole request body, or None when it is larger than ``limit`` (not read further)."""
    stream = environ.get("wsgi.input")
    declared = (environ.get("CONTENT_LENGTH") or "").strip()
    if stream is None:
        return b""
    if declared.isdigit():
        length = int(declared)
        if length > limit:
            return None
        return stream.read(length) if length else b""
    if environ.get("wsgi.input_terminated"):
        body = stream.read(limit + 1)
        return None if len(body) > limit else body
    return b""


def _headers(environ: Environ, name: str) -> List[str]:
    key = name.upper().replace("-", "_")
    if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        key = "HTTP_" + key
    value = environ.get(key)
    return [] if value is None else [value]


def _target(environ: Environ) -> str:
    """The request target as received when the server says (``REQUEST_URI``: waitress, werkzeug;
    ``RAW_URI``: gunicorn), else rebuilt from the decoded path and the query string."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
    target = urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")
    query = environ.get("QUERY_STRING")
    return f"{target}?{query}" if query else target


def _answer(start_response: StartResponse, status: int, headers: List[Tuple[str, str]], body: bytes) -> List[bytes]:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    fields = [(name, _native(value)) for name, value in headers]
    fields.append(("Content-Length", str(len(body))))
    start_response(f"{status} {phrase}", fields)
    return [body]


def _native(value: str) -> str:
    # WSGI header values are latin-1 "native strings"; a stored value from another client's app
    # may hold other characters: they go as UTF-8 bytes.
    try:
        value.encode("latin-1")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8").decode("latin-1")
