"""Unit tests of the Idempotency-Key middleware's rules (idemd_client.http): the header, the idemd
key (the spec's shared vectors), the fingerprint form, what is stored, the problem documents, and
the idemd_timeout bound against an idemd that accepts connections and never answers. The whole
behaviour against a real idemd is the conformance suite (tests/suite/http_middleware.rs)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import pathlib
import re
import socket
import threading
import time
import uuid

import grpc
import pytest

from idemd_client import AsyncClient, Client, fingerprint
from idemd_client.errors import (
    FingerprintMismatch,
    IdemdUnavailable,
    InvalidRequest,
    Overloaded,
    RateLimited,
    StoreFull,
)
from idemd_client.http import (
    PROBLEM_BASE,
    IdempotencyMiddleware,
    InvalidKey,
    WsgiIdempotencyMiddleware,
    default_storable,
    idemd_key,
    parse_key,
    request_fingerprint,
)
from idemd_client.http._core import (
    acquire_failure,
    problem,
    replay_headers,
    retry_after_seconds,
    stored_metadata,
)

SPEC = pathlib.Path(__file__).resolve().parents[2] / "HTTP-MIDDLEWARE.md"


# -- the header (§2) ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fields, key",
    [
        ([b'"abc"'], "abc"),
        ([b"abc"], "abc"),
        ([b" \t abc \t"], "abc"),
        ([b' "abc" '], "abc"),
        ([b'"a\\"b\\\\c"'], 'a"b\\c'),
        ([b'"with space"'], "with space"),
        ([b'"a,b"'], "a,b"),
        ([b"k" * 255], "k" * 255),
        ([b'"' + b"k" * 255 + b'"'], "k" * 255),
        ([], None),
    ],
)
def test_keys_that_parse(fields, key):
    assert parse_key(fields) == key


@pytest.mark.parametrize(
    "fields, rule",
    [
        ([b'"a"', b'"b"'], "appears 2 times"),
        ([b"a", b"b"], "appears 2 times"),
        ([b'""'], "empty"),
        ([b""], "empty"),
        ([b"  "], "empty"),
        ([b"k" * 256], "256 bytes"),
        ([b'"' + b"k" * 256 + b'"'], "256 bytes"),
        ([b"ab\tcd"], "control character 0x09"),
        ([b'"ab\x01cd"'], "control character 0x01"),
        ([b"ab\x7fcd"], "control character 0x7F"),
        ([b"caf\xc3\xa9"], "byte 0xC3"),
        ([b'"caf\xc3\xa9"'], "byte 0xC3"),
        ([b'"abc'], "no closing quote"),
        ([b'"abc"def'], "text after its closing quote"),
        ([b'"abc\\'], "inside an escape"),
        ([b'"ab\\ncd"'], "escape \\n"),
        ([b"k1, k2"], "','"),
        ([b"k1,k2"], "','"),
    ],
)
def test_invalid_keys_say_which_rule(fields, rule):
    with pytest.raises(InvalidKey) as caught:
        parse_key(fields)
    assert rule in str(caught.value)


# -- the idemd key (§3): the vectors every language shares ------------------------------------

def test_key_vectors():
    assert idemd_key("", "abc") == "e3b0c44298fc1c149afbf4c8996fb924:abc"
    tag = hashlib.sha256("tenant-ä".encode()).hexdigest()[:32]
    assert idemd_key("tenant-ä", "abc") == f"{tag}:abc"
    longest_plain = "k" * 222
    assert idemd_key("", longest_plain) == "e3b0c44298fc1c149afbf4c8996fb924:" + longest_plain
    assert len(idemd_key("", longest_plain)) == 255
    hashed = "k" * 223
    assert idemd_key("", hashed) == "e3b0c44298fc1c149afbf4c8996fb924#" + hashlib.sha256(hashed.encode()).hexdigest()
    assert idemd_key("", "k" * 255) != idemd_key("", "k" * 254 + "j")


def test_scopes_are_apart():
    assert idemd_key("A", "order-1") != idemd_key("B", "order-1")
    assert idemd_key("A", "order-1").split(":")[1] == "order-1"


# -- the fingerprint form (§3) --------------------------------------------------------------

def test_json_bodies_are_canonical():
    body = b'{ "b": [1, 2], "a": "x" }'
    expected = fingerprint({"method": "POST", "target": "/orders?x=%20", "json": {"a": "x", "b": [1, 2]}})
    assert request_fingerprint("post", "/orders?x=%20", "application/json; charset=utf-8", body) == expected
    assert request_fingerprint("POST", "/orders?x=%20", "application/json", b'{"a":"x","b":[1,2]}') == expected
    assert request_fingerprint("POST", "/orders", "application/merge-patch+json", b"[1]") == fingerprint(
        {"method": "POST", "target": "/orders", "json": [1]}
    )


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("text/plain", b'{"a": 1}'),
        (None, b'{"a": 1}'),
        ("application/json", b'{"a": '),
        ("application/json", b'{"a": NaN}'),
        ("application/json", b'{"a": 9007199254740993}'),
        ("application/json", b"\xff\xfe"),
        ("application/json", b""),
        ("application/+json", b"{}"),
    ],
)
def test_other_bodies_are_bytes(content_type, body):
    expected = fingerprint({"method": "PATCH", "target": "/t", "bytes": base64.b64encode(body).decode()})
    assert request_fingerprint("PATCH", "/t", content_type, body) == expected


def test_include_exclude_and_headers():
    body = b'{"id": 1, "at": "2026-12-02", "n": 2}'
    assert request_fingerprint("POST", "/t", "application/json", body, exclude={"at"}) == fingerprint(
        {"method": "POST", "target": "/t", "json": {"id": 1, "n": 2}}
    )
    assert request_fingerprint("POST", "/t", "application/json", body, include={"id"}) == fingerprint(
        {"method": "POST", "target": "/t", "json": {"id": 1}}
    )
    assert request_fingerprint("POST", "/t", "application/json", body, headers={}) == fingerprint(
        {"method": "POST", "target": "/t", "json": {"id": 1, "at": "2026-12-02", "n": 2}, "headers": {}}
    )
    assert request_fingerprint("POST", "/t", "text/plain", b"x", headers={"x-a": "1, 2"}) == fingerprint(
        {"method": "POST", "target": "/t", "bytes": "eA==", "headers": {"x-a": "1, 2"}}
    )


# -- what is stored (§4) --------------------------------------------------------------------

def test_storable_statuses():
    stored = [status for status in range(100, 600) if default_storable(status)]
    assert stored[0] == 200 and stored[-1] == 499
    for status in (408, 409, 425, 429, 500, 503, 199):
        assert not default_storable(status)
    for status in (200, 201, 303, 400, 404, 422):
        assert default_storable(status)


def test_kept_headers_round_trip():
    metadata = stored_metadata(
        [("Content-Type", "application/json"), ("Link", "<a>"), ("link", "<b>"), ("X-Run", "r"),
         ("Set-Cookie", "a=1"), ("set-cookie", "b=2")],
        {"content-type", "link", "set-cookie"},
    )
    assert metadata == {"content-type": "application/json", "link": "<a>, <b>", "set-cookie": "a=1\nb=2"}
    assert replay_headers(metadata) == [
        ("content-type", "application/json"),
        ("link", "<a>, <b>"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("idempotent-replayed", "true"),
    ]


def test_retry_after_is_whole_seconds():
    assert [retry_after_seconds(s) for s in (None, 0.0, 0.2, 1.0, 1.2, 29.9)] == [1, 1, 1, 1, 2, 30]


# -- problem documents (§5) -----------------------------------------------------------------

def spec_problem_table():
    rows = re.findall(r"^\| (\d{3}) \| `(https://[^`]+)` \|$", SPEC.read_text(), re.MULTILINE)
    assert len(rows) == 7, "the spec's problem table changed shape"
    return [(int(status), uri) for status, uri in rows]


def test_problem_documents_match_the_spec():
    for status, uri in spec_problem_table():
        slug = uri.split("#", 1)[1]
        assert uri == PROBLEM_BASE + slug
        answer_status, headers, body = problem(slug, "why")
        document = json.loads(body)
        assert answer_status == status
        assert headers[0] == ("content-type", "application/problem+json")
        assert document == {"type": uri, "title": document["title"], "status": status, "detail": "why"}
        assert document["title"]
        assert f"### {slug}" in SPEC.read_text(), f"no anchor section for {slug}"


def error(cls, code, reason):
    return cls("idemd Acquire: refused", code=code, reason=reason)


def test_acquire_failures():
    assert acquire_failure(error(FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT_MISMATCH"))[0] == 422
    for exc in (
        error(IdemdUnavailable, grpc.StatusCode.UNAVAILABLE, None),
        error(RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, "CALLER_LIMITED"),
        error(Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
        error(StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "STORE_FULL"),
        TimeoutError("slow"),
        asyncio.TimeoutError(),
    ):
        status, headers, body = acquire_failure(exc)
        assert status == 503 and ("retry-after", "1") in headers, exc
        assert json.loads(body)["type"].endswith("#idemd-unavailable")
    status, _, body = acquire_failure(error(InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"))
    assert status == 500
    assert "INVALID_ARGUMENT INVALID_REQUEST" in json.loads(body)["detail"]


# -- idemd_timeout against an idemd that never answers ---------------------------------------

@pytest.fixture
def silent_idemd():
    """A TCP listener that accepts connections and never answers: a hung idemd."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield "127.0.0.1:%d" % listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def wsgi_call(app, key=b'"k"'):
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/orders", "QUERY_STRING": "", "SCRIPT_NAME": "",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "2", "wsgi.input": io.BytesIO(b"{}"),
        "HTTP_IDEMPOTENCY_KEY": key.decode("latin-1"),
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict((k.lower(), v) for k, v in headers)
        return lambda data: None

    answer["body"] = b"".join(app(environ, start_response))
    return answer


def handler(ran):
    def app(environ, start_response):
        ran.append(environ["wsgi.input"].read())
        start_response("201 Created", [("Content-Type", "application/json")])
        return [b'{"ok": true}']

    return app


@pytest.mark.parametrize("fail_open", [False, True])
def test_wsgi_idemd_timeout_bounds_a_hung_idemd(silent_idemd, fail_open):
    ran = []
    with Client(silent_idemd, rpc_timeout=30) as client:
        app = WsgiIdempotencyMiddleware(handler(ran), client=client, namespace="ns", idemd_timeout=0.3,
                                        fail_open=fail_open)
        started = time.monotonic()
        answer = wsgi_call(app)
        elapsed = time.monotonic() - started
    assert elapsed < 5, f"the bound of 0.3 s took {elapsed:.1f} s"
    if fail_open:
        assert answer["status"].startswith("201") and ran == [b"{}"]
    else:
        assert answer["status"] == "503 Service Unavailable" and ran == []
        assert answer["headers"]["retry-after"] == "1"
        assert json.loads(answer["body"])["type"] == PROBLEM_BASE + "idemd-unavailable"


def test_wsgi_invalid_key_never_calls_idemd():
    ran = []
    app = WsgiIdempotencyMiddleware(handler(ran), client=None, namespace="ns")  # type: ignore[arg-type]
    answer = wsgi_call(app, key=b'"k1", "k2"')
    assert answer["status"] == "400 Bad Request" and ran == []
    assert answer["headers"]["content-type"] == "application/problem+json"


async def asgi_call(app, key=b'"k"'):
    scope = {
        "type": "http", "method": "POST", "path": "/orders", "raw_path": b"/orders", "query_string": b"",
        "headers": [(b"idempotency-key", key), (b"content-type", b"application/json")],
    }
    sent = []
    requests = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def asgi_handler(ran):
    async def app(scope, receive, send):
        message = await receive()
        ran.append(message["body"])
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    return app


@pytest.mark.parametrize("fail_open", [False, True])
async def test_asgi_idemd_timeout_bounds_a_hung_idemd(silent_idemd, fail_open):
    ran = []
    async with AsyncClient(silent_idemd, rpc_timeout=30) as client:
        app = IdempotencyMiddleware(asgi_handler(ran), client=client, namespace="ns", idemd_timeout=0.3,
                                    fail_open=fail_open)
        started = time.monotonic()
        status, headers, body = await asgi_call(app)
        elapsed = time.monotonic() - started
    assert elapsed < 5, f"the bound of 0.3 s took {elapsed:.1f} s"
    if fail_open:
        assert status == 201 and ran == [b"{}"]
    else:
        assert status == 503 and ran == []
        assert headers[b"retry-after"] == b"1"
        assert json.loads(body)["type"] == PROBLEM_BASE + "idemd-unavailable"


# -- against a live idemd (memory store and PostgreSQL) --------------------------------------

def fresh_key() -> bytes:
    return b'"' + uuid.uuid4().hex.encode() + b'"'


def test_wsgi_misconfigured_namespace_is_idemd_rejected(idemd):
    ran = []
    with Client(idemd.address) as client:
        app = WsgiIdempotencyMiddleware(handler(ran), client=client, namespace="not a namespace!")
        answer = wsgi_call(app, key=fresh_key())
    assert answer["status"] == "500 Internal Server Error" and ran == []
    problem_document = json.loads(answer["body"])
    assert problem_document["type"] == PROBLEM_BASE + "idemd-rejected"
    assert "INVALID_ARGUMENT INVALID_REQUEST" in problem_document["detail"]


async def test_asgi_misconfigured_namespace_is_idemd_rejected(idemd):
    ran = []
    async with AsyncClient(idemd.address) as client:
        app = IdempotencyMiddleware(asgi_handler(ran), client=client, namespace="not a namespace!")
        status, _, body = await asgi_call(app, key=fresh_key())
    assert status == 500 and ran == []
    assert "INVALID_ARGUMENT INVALID_REQUEST" in json.loads(body)["detail"]


def big_wsgi_handler(ran, size):
    def app(environ, start_response):
        ran.append(1)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"x" * (size // 2), b"y" * (size - size // 2)]

    return app


def test_wsgi_a_response_too_large_to_store_goes_out_and_releases(idemd):
    ran = []
    size = 1024 * 1024 + 1
    with Client(idemd.address) as client:
        app = WsgiIdempotencyMiddleware(big_wsgi_handler(ran, size), client=client, namespace="pytest-http")
        key = fresh_key()
        first = wsgi_call(app, key=key)
        assert first["status"] == "200 OK" and len(first["body"]) == size
        second = wsgi_call(app, key=key)
    assert len(second["body"]) == size and ran == [1, 1], "a response over 1 MiB was stored"


async def test_asgi_a_response_too_large_to_store_goes_out_and_releases(idemd):
    ran = []
    size = 1024 * 1024 + 1

    async def big(scope, receive, send):
        await receive()
        ran.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * (size // 2), "more_body": True})
        await send({"type": "http.response.body", "body": b"y" * (size - size // 2)})

    async with AsyncClient(idemd.address) as client:
        app = IdempotencyMiddleware(big, client=client, namespace="pytest-http")
        key = fresh_key()
        status, _, body = await asgi_call(app, key=key)
        assert status == 200 and len(body) == size
        _, headers, body = await asgi_call(app, key=key)
    assert len(body) == size and ran == [1, 1] and b"idempotent-replayed" not in headers


async def test_asgi_a_waiting_duplicate_runs_when_the_first_fails(idemd):
    """With ``wait``, a duplicate waits for the first; the first answers 500 (released), so
    the duplicate acquires the key and runs the handler itself."""
    ran = []
    first_running = asyncio.Event()

    async def flaky(scope, receive, send):
        await receive()
        ran.append(len(ran))
        if len(ran) == 1:
            first_running.set()
            await asyncio.sleep(0.5)
            status = 500
        else:
            status = 201
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": str(status).encode()})

    async with AsyncClient(idemd.address) as client:
        app = IdempotencyMiddleware(flaky, client=client, namespace="pytest-http", wait=10)
        key = fresh_key()
        first = asyncio.ensure_future(asgi_call(app, key=key))
        await first_running.wait()
        second = await asgi_call(app, key=key)
        assert (await first)[0] == 500
    assert second[0] == 201 and second[2] == b"201" and len(ran) == 2
    assert b"idempotent-replayed" not in second[1]


def test_settings_paths_and_methods():
    from idemd_client.http import Settings

    one = Settings(namespace="ns", paths="/orders")
    assert one.covers("post", "/orders") and not one.covers("POST", "/o")
    assert not one.covers("PUT", "/orders") and not one.covers("GET", "/orders")
    assert Settings(namespace="ns").covers("PATCH", "/anything")
    assert Settings(namespace="ns", paths=lambda path: path.startswith("/v1/")).covers("POST", "/v1/x")
    assert Settings(namespace="ns", methods=["put"]).covers("PUT", "/x")
    with pytest.raises(ValueError):
        Settings(namespace="")
    with pytest.raises(ValueError):
        Settings(namespace="ns", wait=0)
