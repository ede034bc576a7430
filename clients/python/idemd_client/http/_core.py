"""What the ASGI and the WSGI middleware share: the rules of clients/HTTP-MIDDLEWARE.md that do
not depend on a framework (the header, the idemd key, the fingerprint, what is stored, the
problem documents). No I/O here."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import NotCanonicalizable
from ..fingerprint import fingerprint

__all__ = [
    "DEFAULT_KEEP_HEADERS",
    "DEFAULT_METHODS",
    "InvalidKey",
    "PROBLEM_BASE",
    "Settings",
    "default_storable",
    "idemd_key",
    "parse_key",
    "problem",
    "replay_headers",
    "request_fingerprint",
    "retry_after_seconds",
    "stored_metadata",
]

PROBLEM_BASE = "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#"
DEFAULT_METHODS = frozenset({"POST", "PATCH"})
DEFAULT_KEEP_HEADERS = (
    "content-type",
    "content-language",
    "content-encoding",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "link",
    "retry-after",
)
#: idemd's limit on a key, and so on the Idempotency-Key value (bytes).
MAX_KEY_BYTES = 255
#: The default of ``max_body`` and of idemd's largest stored result body.
ONE_MIB = 1024 * 1024

_TITLES = {
    "missing-key": (400, "Idempotency-Key required"),
    "invalid-key": (400, "Invalid Idempotency-Key"),
    "request-in-progress": (409, "Request in progress"),
    "request-too-large": (413, "Request too large"),
    "key-reused": (422, "Idempotency-Key reused"),
    "idemd-rejected": (500, "Idempotency service refused the call"),
    "idemd-unavailable": (503, "Idempotency service unavailable"),
}


class InvalidKey(ValueError):
    """The Idempotency-Key field is not a usable key; the message says which rule it broke."""


def parse_key(fields: Sequence[bytes]) -> Optional[str]:
    """The key carried by the Idempotency-Key field lines ``fields`` (raw bytes, in order), or
    None when there is none. A Structured Field string (RFC 8941 §3.3.3) or, for compatibility,
    a bare value; raises :class:`InvalidKey` for anything else (§2 of the spec)."""
    if not fields:
        return None
    if len(fields) > 1:
        raise InvalidKey(f"the Idempotency-Key field appears {len(fields)} times; send it once")
    value = bytes(fields[0]).strip(b" \t")
    if value.startswith(b'"'):
        key = _sf_string(value)
    else:
        for byte in value:
            _check_byte(byte)
            if byte == 0x2C:
                # A proxy or server joins repeated field lines with ", ": a bare value with a
                # comma cannot be told apart from two keys.
                raise InvalidKey("a bare key must not contain ',' (two fields joined); quote it")
        key = value.decode("ascii")
    if not key:
        raise InvalidKey("the key is empty")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(f"the key is {len(key)} bytes long; at most {MAX_KEY_BYTES} are allowed")
    return key


def _check_byte(byte: int) -> None:
    if byte < 0x20 or byte == 0x7F:
        raise InvalidKey(f"the key contains the control character 0x{byte:02X}")
    if byte > 0x7E:
        raise InvalidKey(f"the key contains the byte 0x{byte:02X}; only printable ASCII is allowed")


def _sf_string(value: bytes) -> str:
    out = bytearray()
    at = 1
    while at < len(value):
        byte = value[at]
        if byte == 0x5C:  # backslash
            if at + 1 >= len(value):
                raise InvalidKey("the quoted key ends inside an escape")
            escaped = value[at + 1]
            if escaped not in (0x22, 0x5C):
                raise InvalidKey(
                    f"the quoted key has the escape \\{chr(escaped) if 0x20 <= escaped <= 0x7E else '?'}; "
                    'only \\" and \\\\ are allowed'
                )
            out.append(escaped)
            at += 2
            continue
        if byte == 0x22:  # the closing quote
            if at + 1 != len(value):
                raise InvalidKey("the quoted key has text after its closing quote")
            return out.decode("ascii")
        _check_byte(byte)
        out.append(byte)
        at += 1
    raise InvalidKey("the quoted key has no closing quote")


def idemd_key(scope: str, key: str) -> str:
    """The idemd key of an Idempotency-Key under a scope: ``tag ":" key``, where ``tag`` is the
    first 32 hex digits of SHA-256 of the scope, or ``tag "#" sha256hex(key)`` when the first
    form would be longer than idemd's 255 bytes (keys over 222 bytes)."""
    tag = hashlib.sha256(scope.encode("utf-8")).hexdigest()[:32]
    raw = key.encode("utf-8")
    if len(tag) + 1 + len(raw) <= MAX_KEY_BYTES:
        return f"{tag}:{key}"
    return f"{tag}#{hashlib.sha256(raw).hexdigest()}"


def _is_json(content_type: Optional[str]) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return True
    kind, _, subtype = media.partition("/")
    return bool(kind) and subtype.endswith("+json") and len(subtype) > len("+json")


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); Python's parser takes them unless told not to.
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> Tuple[bool, Any]:
    try:
        return True, json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError):
        return False, None


def request_fingerprint(
    method: str,
    target: str,
    content_type: Optional[str],
    body: bytes,
    *,
    include: Optional[Collection[str]] = None,
    exclude: Collection[str] = (),
    headers: Optional[Dict[str, str]] = None,
) -> bytes:
    """The client's fingerprint (SHA-256 of RFC 8785 JSON) of the request's form:
    ``{"method", "target", "json"}`` for a JSON body that parses, else
    ``{"method", "target", "bytes": base64}``; ``include``/``exclude`` choose top-level fields of
    a JSON object; ``headers`` (None when none are configured) adds ``"headers"``."""
    form: Dict[str, Any] = {"method": method.upper(), "target": target}
    parsed, document = _parse_json(body) if _is_json(content_type) else (False, None)
    if parsed:
        if isinstance(document, dict):
            if include is not None:
                document = {name: value for name, value in document.items() if name in include}
            document = {name: value for name, value in document.items() if name not in exclude}
        form["json"] = document
    else:
        form["bytes"] = base64.b64encode(body).decode("ascii")
    if headers is not None:
        form["headers"] = headers
    try:
        return fingerprint(form)
    except NotCanonicalizable:
        # JSON that parses but has no canonical form (an integer beyond 2^53): its bytes stand
        # for it, as for any other body.
        form.pop("json", None)
        form["bytes"] = base64.b64encode(body).decode("ascii")
        return fingerprint(form)


def default_storable(status: int) -> bool:
    """2xx, 3xx and 4xx are finished operations, except the 4xx that say "try again"."""
    return 200 <= status <= 499 and status not in (408, 409, 425, 429)


def stored_metadata(headers: Iterable[Tuple[str, str]], keep: Collection[str]) -> Dict[str, str]:
    """The kept response headers as idemd metadata: names in lower case, repeated fields joined
    by ", " (``set-cookie`` by a newline)."""
    metadata: Dict[str, List[str]] = {}
    for name, value in headers:
        name = name.lower()
        if name in keep:
            metadata.setdefault(name, []).append(value)
    return {
        name: ("\n" if name == "set-cookie" else ", ").join(values) for name, values in metadata.items()
    }


def replay_headers(metadata: Dict[str, str]) -> List[Tuple[str, str]]:
    """The header fields of a replay: the stored ones, and ``Idempotent-Replayed: true``."""
    headers: List[Tuple[str, str]] = []
    for name, value in sorted(metadata.items()):
        if name in ("content-length", "transfer-encoding", "idempotent-replayed"):
            continue
        if name == "set-cookie":
            headers.extend((name, cookie) for cookie in value.split("\n"))
        else:
            headers.append((name, value))
    headers.append(("idempotent-replayed", "true"))
    return headers


def retry_after_seconds(retry_after: Optional[float]) -> int:
    """idemd's ``retry_after`` as whole seconds for Retry-After: rounded up, at least 1."""
    if retry_after is None or not math.isfinite(retry_after):
        return 1
    return max(1, math.ceil(retry_after))


def problem(slug: str, detail: str, *, extra_headers: Sequence[Tuple[str, str]] = ()) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """An ``application/problem+json`` answer (RFC 9457): (status, headers, body)."""
    status, title = _TITLES[slug]
    body = json.dumps(
        {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    ).encode("utf-8")
    headers = [("content-type", "application/problem+json")]
    headers.extend(extra_headers)
    return status, headers, body


@dataclass
class Settings:
    """The options of both middlewares (see clients/HTTP-MIDDLEWARE.md).

    namespace:           the idemd namespace (required).
    methods:             the methods covered (default POST and PATCH).
    paths:               None (every path), a collection of exact paths, or ``callable(path) -> bool``.
    key_required:        a covered request without the header gets 400 ``missing-key`` (default:
                         it runs unprotected).
    scope:               ``callable(request) -> str``, the caller's identity (default: "" for all);
                         the request is the ASGI scope or the WSGI environ.
    fingerprint_include: only these top-level JSON fields are fingerprinted (default: all).
    fingerprint_exclude: these top-level JSON fields are left out (e.g. a client timestamp).
    fingerprint_headers: header names (lower case) added to the fingerprint.
    lease_ttl:           the lease asked for, seconds (default 30, idemd's own default); renewed
                         by the client every lease_ttl/3 while the handler runs.
    wait:                None (a duplicate in progress gets 409) or the longest a duplicate waits
                         for the first request's result, seconds.
    fail_open:           run the handler unprotected when idemd cannot be reached (never when it
                         is rate limited or overloaded).
    max_body:            the largest request body read for the fingerprint (default 1 MiB).
    max_stored_body:     the largest response body stored (default 1 MiB, idemd's default limit).
    idemd_timeout:       bound on reaching idemd at Acquire, retries included (default 5 s).
    storable:            ``callable(status) -> bool`` (default: 200-499 except 408/409/425/429).
    keep_headers:        response headers stored and replayed (``set-cookie`` only if listed).
    """

    namespace: str
    methods: Collection[str] = DEFAULT_METHODS
    paths: Any = None
    key_required: bool = False
    scope: Optional[Callable[[Any], Any]] = None
    fingerprint_include: Optional[Collection[str]] = None
    fingerprint_exclude: Collection[str] = ()
    fingerprint_headers: Sequence[str] = ()
    lease_ttl: float = 30.0
    wait: Optional[float] = None
    fail_open: bool = False
    max_body: int = ONE_MIB
    max_stored_body: int = ONE_MIB
    idemd_timeout: float = 5.0
    storable: Callable[[int], bool] = default_storable
    keep_headers: Collection[str] = field(default_factory=lambda: DEFAULT_KEEP_HEADERS)

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("namespace is required")
        self.methods = frozenset(method.upper() for method in self.methods)
        self.keep_headers = frozenset(name.lower() for name in self.keep_headers)
        self.fingerprint_headers = tuple(name.lower() for name in self.fingerprint_headers)
        if self.fingerprint_include is not None:
            self.fingerprint_include = frozenset(self.fingerprint_include)
        self.fingerprint_exclude = frozenset(self.fingerprint_exclude)
        if self.lease_ttl <= 0 or self.idemd_timeout <= 0 or self.max_body < 0:
            raise ValueError("lease_ttl and idemd_timeout must be positive, max_body not negative")
        if self.wait is not None and self.wait <= 0:
            raise ValueError("wait must be positive (or None)")
        if isinstance(self.paths, str):
            self.paths = frozenset([self.paths])  # one path, not a set of its characters
        elif self.paths is not None and not callable(self.paths):
            self.paths = frozenset(self.paths)

    def covers(self, method: str, path: str) -> bool:
        if method.upper() not in self.methods:
            return False
        if self.paths is None:
            return True
        if callable(self.paths):
            return bool(self.paths(path))
        return path in self.paths

    def lease_options(self) -> Dict[str, Any]:
        # max_waits=0: the middleware answers IN_PROGRESS itself (409, or its own bounded wait).
        return {"lease_ttl": self.lease_ttl, "max_waits": 0, "fail_open": self.fail_open}

    def fingerprint_header_values(self, lookup: Callable[[str], List[str]]) -> Optional[Dict[str, str]]:
        """``{"name": value}`` of the configured headers the request has (repeated fields
        joined by ", "), or None when none are configured."""
        if not self.fingerprint_headers:
            return None
        values = {}
        for name in self.fingerprint_headers:
            found = lookup(name)
            if found:
                values[name] = ", ".join(found)
        return values


def acquire_failure(exc: BaseException) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """The answer to an Acquire that failed with ``exc`` (after the client's retries)."""
    from ..errors import FingerprintMismatch, IdemdError, IdemdUnavailable, Overloaded, RateLimited, StoreFull

    if isinstance(exc, FingerprintMismatch):
        return problem(
            "key-reused",
            "this Idempotency-Key was already used for a different request (method, target or body)",
        )
    # asyncio.TimeoutError is the builtin TimeoutError from Python 3.11 on, a class of its own before.
    timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError))
    if timed_out or isinstance(exc, (IdemdUnavailable, RateLimited, Overloaded, StoreFull)):
        what = "did not answer in time" if timed_out else f"is unavailable ({_code_and_reason(exc)})"
        return problem(
            "idemd-unavailable",
            f"the idempotency service {what}; the request was not run",
            extra_headers=[("retry-after", "1")],
        )
    if isinstance(exc, IdemdError):
        return problem(
            "idemd-rejected",
            f"the idempotency service refused the middleware's call: {_code_and_reason(exc)}",
        )
    raise TypeError(f"not an idemd failure: {exc!r}")


def _code_and_reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    reason = getattr(exc, "reason", None)
    name = code.name if code is not None else "no gRPC code"
    return f"{name} {reason}" if reason else name
