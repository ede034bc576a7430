#!/usr/bin/env python3
"""The Idempotency-Key middleware conformance driver (clients/HTTP-MIDDLEWARE.md, section 6).

Runs every case against one example app that follows the example-app contract, and the
idemd-down cases against a second instance of the same app whose idemd address has nothing
listening:

    python3 driver.py --app http://127.0.0.1:P --effects FILE \\
        --dead-app http://127.0.0.1:Q --dead-effects FILE2 [--lease-ms 1000] [--only CASE]

With ``--peer-app URL --peer-effects FILE`` instead of the dead app (another framework's app on
the same idemd and NAMESPACE), it runs the cross_* cases: a request served by one app replays
from the other, so both derive the same idemd key and fingerprint.

Prints ``ok <case>`` or ``FAIL <case>: why`` per case and exits 1 if any failed (2 for a usage
error). Python 3.11 standard library only. Every case uses fresh UUID keys and order ids, so
cases never see each other's records, and side effects are counted in the effects files, outside
the app and idemd.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

PROBLEM_BASE = "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#"
PROBLEM_STATUS = {
    "missing-key": 400,
    "invalid-key": 400,
    "request-in-progress": 409,
    "request-too-large": 413,
    "key-reused": 422,
    "idemd-rejected": 500,
    "idemd-unavailable": 503,
}
# Bounds on waiting for the app; a case that hits one fails, naming what it waited for.
REQUEST_TIMEOUT = 60.0
EFFECT_WAIT = 30.0
MAX_BODY = 1024 * 1024


class Fail(Exception):
    """A case's expectation did not hold."""


def check(condition: bool, why: str) -> None:
    if not condition:
        raise Fail(why)


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, str]]
    body: bytes

    def all(self, name: str) -> List[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def header(self, name: str) -> Optional[str]:
        values = self.all(name)
        return ", ".join(values) if values else None

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise Fail(f"{self.status} answer is not JSON ({exc}): {self.body[:200]!r}") from exc

    def describe(self) -> str:
        return f"{self.status} {dict(self.headers)} {self.body[:300]!r}"


HeaderValue = Union[str, bytes]


def request(
    base: str,
    method: str,
    target: str,
    *,
    key: Optional[HeaderValue] = None,
    keys: Sequence[HeaderValue] = (),
    body: Union[None, bytes, dict] = None,
    headers: Optional[Dict[str, str]] = None,
    content_type: Optional[str] = None,
) -> Response:
    """One request on a new connection. ``key`` is the raw Idempotency-Key field value (quote it
    with :func:`sf` for the Structured Field form); ``keys`` sends one field per value."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT)
    try:
        if isinstance(body, dict):
            payload = json.dumps(body).encode()
            content_type = content_type or "application/json"
        else:
            payload = body
        connection.putrequest(method, target, skip_accept_encoding=True)
        fields = list(keys) + ([key] if key is not None else [])
        for value in fields:
            connection.putheader("Idempotency-Key", value)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if content_type:
            connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(payload or b"")))
        try:
            connection.endheaders(payload or b"")
        except (BrokenPipeError, ConnectionResetError):
            # A server may answer (413) and close before reading a body it does not want
            # (RFC 9112 §9.6): its answer can still be waiting to be read.
            pass
        answer = connection.getresponse()
        data = answer.read()
        return Response(
            answer.status, [(name.lower(), value) for name, value in answer.getheaders()], data
        )
    finally:
        connection.close()


def sf(key: str) -> str:
    """The Structured Field string form of a key: quoted, `"` and `\\` escaped."""
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fresh() -> str:
    return str(uuid.uuid4())


class Effects:
    """The app's side-effect log: one line per handler run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def lines(self) -> List[str]:
        try:
            with open(self.path, "r", encoding="utf-8") as log:
                return log.read().splitlines()
        except FileNotFoundError:
            return []

    def count(self, line: str) -> int:
        return sum(1 for seen in self.lines() if seen == line)

    def await_count(self, line: str, count: int) -> None:
        """Polls until ``line`` appears ``count`` times (a condition, not a guessed sleep)."""
        deadline = time.monotonic() + EFFECT_WAIT
        while self.count(line) < count:
            if time.monotonic() > deadline:
                raise Fail(f"{line!r} was logged {self.count(line)} times, not {count}, within {EFFECT_WAIT}s")
            time.sleep(0.02)


@dataclass
class Context:
    app: str
    effects: Effects
    dead_app: str
    dead_effects: Effects
    lease_ms: int
    peer_app: str = ""
    peer_effects: Optional[Effects] = None

    def order(self, key: Optional[HeaderValue], order_id: str, *, target: str = "/orders",
              headers: Optional[Dict[str, str]] = None, body: Optional[dict] = None,
              app: Optional[str] = None) -> Response:
        return request(app or self.app, "POST", target, key=key,
                       body=body if body is not None else {"id": order_id, "amount": 100},
                       headers=headers)

    def runs(self, order_id: str, route: str = "orders") -> int:
        return self.effects.count(f"{route} {order_id}")


# -- the checks every case shares -----------------------------------------------------------

def expect_status(response: Response, status: int, what: str) -> None:
    check(response.status == status, f"{what}: expected {status}, got {response.describe()}")


def expect_json(response: Response, what: str):
    media = (response.header("content-type") or "").split(";")[0].strip().lower()
    check(media == "application/json", f"{what}: content-type {media!r}, not application/json: {response.describe()}")
    return response.json()


def expect_problem(response: Response, slug: str, what: str) -> dict:
    """A problem document (RFC 9457) of the type ``slug``, with its status."""
    status = PROBLEM_STATUS[slug]
    expect_status(response, status, what)
    media = (response.header("content-type") or "").split(";")[0].strip().lower()
    check(media == "application/problem+json",
          f"{what}: content-type {media!r}, not application/problem+json: {response.describe()}")
    problem = response.json()
    check(isinstance(problem, dict), f"{what}: the problem is not an object: {problem!r}")
    check(problem.get("type") == PROBLEM_BASE + slug,
          f"{what}: type {problem.get('type')!r}, not {PROBLEM_BASE + slug!r}")
    check(isinstance(problem.get("title"), str) and problem["title"] != "",
          f"{what}: no title: {problem!r}")
    check(problem.get("status") == status, f"{what}: status member {problem.get('status')!r}, not {status}")
    check(isinstance(problem.get("detail"), str), f"{what}: no detail: {problem!r}")
    check(response.header("idempotent-replayed") is None, f"{what}: a problem marked as a replay")
    return problem


def expect_retry_after(response: Response, what: str) -> int:
    value = response.header("retry-after")
    check(value is not None and value.isdigit() and int(value) >= 1,
          f"{what}: Retry-After must be whole seconds >= 1, got {value!r}")
    return int(value)


def expect_fresh(response: Response, status: int, what: str) -> dict:
    """The handler's own answer: not marked as a replay."""
    expect_status(response, status, what)
    check(response.header("idempotent-replayed") is None, f"{what}: a fresh run marked as a replay: {response.describe()}")
    return expect_json(response, what)


def expect_order_created(response: Response, order_id: str, tenant: str, what: str) -> dict:
    body = expect_fresh(response, 201, what)
    run = body.get("run")
    check(isinstance(run, str) and run, f"{what}: no run in {body!r}")
    check(body.get("id") == order_id and body.get("tenant") == tenant,
          f"{what}: body {body!r}, expected id {order_id!r} and tenant {tenant!r}")
    check(response.header("location") == f"/orders/{run}", f"{what}: location {response.header('location')!r}")
    check(response.header("x-run") == run, f"{what}: x-run {response.header('x-run')!r}")
    check(response.header("set-cookie") == f"s={run}", f"{what}: set-cookie {response.header('set-cookie')!r}")
    return body


def expect_replay(response: Response, first: Response, what: str) -> None:
    """A replay of ``first``: its status, body byte for byte, its kept headers, marked."""
    check(response.status == first.status, f"{what}: replayed status {response.status}, first was {first.status}")
    check(response.body == first.body, f"{what}: replayed body {response.body!r}, first was {first.body!r}")
    check(response.header("idempotent-replayed") == "true",
          f"{what}: Idempotent-Replayed is {response.header('idempotent-replayed')!r}, not 'true'")
    for kept in ("content-type", "location"):
        check(response.header(kept) == first.header(kept),
              f"{what}: {kept} {response.header(kept)!r}, first was {first.header(kept)!r}")
    for dropped in ("set-cookie", "x-run"):
        check(response.header(dropped) is None, f"{what}: a replay carries {dropped}: {response.header(dropped)!r}")


# -- the cases ------------------------------------------------------------------------------

Case = Callable[[Context], None]
CASES: Dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@case
def first_request(ctx: Context) -> None:
    order_id = fresh()
    response = ctx.order(sf(fresh()), order_id)
    expect_order_created(response, order_id, "anonymous", "first request")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def sequential_duplicate_replays(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id)
    expect_order_created(first, order_id, "anonymous", "first request")
    for attempt in range(2):
        expect_replay(ctx.order(sf(key), order_id), first, f"duplicate {attempt + 1}")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def concurrent_duplicates_run_once(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    callers = 50
    start = threading.Barrier(callers)
    answers: List[Optional[Response]] = [None] * callers
    errors: List[str] = []

    def call(slot: int) -> None:
        try:
            start.wait(timeout=EFFECT_WAIT)
            # The run takes a second, so that the others meet the key held even on a loaded machine.
            answers[slot] = ctx.order(sf(key), order_id, headers={"X-Delay-Ms": "1000"})
        except Exception as exc:  # noqa: BLE001 - reported as the case's failure
            errors.append(f"caller {slot}: {exc!r}")

    threads = [threading.Thread(target=call, args=(slot,)) for slot in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check(not errors, "; ".join(errors[:5]))
    check(ctx.runs(order_id) == 1, f"50 concurrent duplicates ran the handler {ctx.runs(order_id)} times")
    fresh_answers = [a for a in answers if a is not None and a.status == 201 and a.header("idempotent-replayed") is None]
    check(len(fresh_answers) == 1, f"{len(fresh_answers)} answers came from a run of the handler, not 1")
    first = fresh_answers[0]
    expect_order_created(first, order_id, "anonymous", "the running request")
    in_progress = replays = 0
    for answer in answers:
        assert answer is not None
        if answer is first:
            continue
        if answer.status == 409:
            expect_problem(answer, "request-in-progress", "a concurrent duplicate")
            expect_retry_after(answer, "a concurrent duplicate")
            in_progress += 1
        else:
            expect_replay(answer, first, "a concurrent duplicate")
            replays += 1
    check(in_progress > 0, "no duplicate met the key in progress (the run took 1 s)")


@case
def changed_body_is_key_reused(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    expect_order_created(ctx.order(sf(key), order_id), order_id, "anonymous", "first request")
    changed = ctx.order(sf(key), order_id, body={"id": order_id, "amount": 101})
    expect_problem(changed, "key-reused", "the same key with a changed body")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def changed_target_is_key_reused(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    expect_order_created(ctx.order(sf(key), order_id), order_id, "anonymous", "first request")
    changed = ctx.order(sf(key), order_id, target="/orders?express=1")
    expect_problem(changed, "key-reused", "the same key on another target")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def reordered_json_replays(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id, body={"id": order_id, "amount": 100, "items": [{"sku": "a", "n": 1}]})
    expect_order_created(first, order_id, "anonymous", "first request")
    reordered = (
        '{ "items" : [ { "n" : 1 , "sku" : "a" } ] ,\n\t"amount":100, "id" : %s }' % json.dumps(order_id)
    ).encode()
    again = request(ctx.app, "POST", "/orders", key=sf(key), body=reordered, content_type="application/json")
    expect_replay(again, first, "the same JSON with keys reordered and other whitespace")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def missing_key_on_required_route(ctx: Context) -> None:
    order_id = fresh()
    expect_problem(ctx.order(None, order_id), "missing-key", "POST /orders without a key")
    check(ctx.runs(order_id) == 0, "the handler ran without a key on a key-required route")


MALFORMED_KEYS: List[Tuple[str, List[HeaderValue]]] = [
    ("an empty quoted value", ['""']),
    ("an empty value", [""]),
    ("a 256-byte key", ["k" * 256]),
    ("a 256-byte quoted key", [sf("k" * 256)]),
    ("a control character (tab) inside a bare key", ["ab\tcd"]),
    ("a control character (tab) inside a quoted key", ['"ab\tcd"']),
    ("an unclosed quote", ['"abc']),
    ("text after the closing quote", ['"abc"def']),
    ("an escape other than \\\" or \\\\", ['"ab\\ncd"']),
    ("a non-ASCII byte", [b"caf\xc3\xa9"]),
    ("a non-ASCII byte in a quoted key", [b'"caf\xc3\xa9"']),
    ("two quoted header fields", ['"k1"', '"k2"']),
    ("two bare header fields", ["k1", "k2"]),
    ("a bare value with a comma (two fields joined)", ["k1, k2"]),
]


@case
def malformed_keys_are_invalid(ctx: Context) -> None:
    for what, fields in MALFORMED_KEYS:
        order_id = fresh()
        response = request(ctx.app, "POST", "/orders", keys=fields, body={"id": order_id})
        expect_problem(response, "invalid-key", what)
        check(ctx.runs(order_id) == 0, f"{what}: the handler ran")


@case
def quoted_and_bare_are_one_key(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id)
    expect_order_created(first, order_id, "anonymous", "the quoted form")
    expect_replay(ctx.order(key, order_id), first, "the bare form")
    expect_replay(ctx.order(f" \t{key}\t ", order_id), first, "the bare form with surrounding spaces and tabs")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def longest_key_works(ctx: Context) -> None:
    order_id = fresh()
    key = (fresh() + "-" + "x" * 255)[:255]
    check(len(key.encode()) == 255, "the key is not 255 bytes")
    first = ctx.order(sf(key), order_id)
    expect_order_created(first, order_id, "anonymous", "a 255-byte key")
    expect_replay(ctx.order(key, order_id), first, "the same 255-byte key, bare")
    other_id = fresh()
    # Same first 254 bytes, another last byte: another key, even in the hashed form.
    other = key[:-1] + ("y" if key[-1] != "y" else "z")
    expect_order_created(ctx.order(sf(other), other_id), other_id, "anonymous", "a 255-byte key differing in its last byte")


@case
def escaped_key_works(ctx: Context) -> None:
    key, order_id = f'a"quoted\\key {fresh()}', fresh()
    first = ctx.order(sf(key), order_id)
    expect_order_created(first, order_id, "anonymous", 'a key with \\" and \\\\ escapes')
    expect_replay(ctx.order(sf(key), order_id), first, "the escaped key again")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def server_error_releases(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    failed = ctx.order(sf(key), order_id, headers={"X-Fail": "1"})
    expect_status(failed, 500, "a handler answering 500")
    check(expect_json(failed, "a handler answering 500") == {"error": "failed"}, f"500 body {failed.body!r}")
    check(failed.header("idempotent-replayed") is None, "a 500 marked as a replay")
    retry = ctx.order(sf(key), order_id)
    first = retry
    expect_order_created(retry, order_id, "anonymous", "the retry after a 500")
    check(ctx.runs(order_id) == 2, f"the handler ran {ctx.runs(order_id)} times, not twice")
    expect_replay(ctx.order(sf(key), order_id), first, "a duplicate of the successful retry")


@case
def stored_4xx_replays(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id, headers={"X-Status": "400"})
    body = expect_fresh(first, 400, "a handler answering 400")
    check(body.get("status") == 400 and isinstance(body.get("run"), str), f"400 body {body!r}")
    expect_replay(ctx.order(sf(key), order_id), first, "a duplicate of a 400 (without X-Status)")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def status_429_is_not_stored(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id, headers={"X-Status": "429"})
    expect_fresh(first, 429, "a handler answering 429")
    expect_order_created(ctx.order(sf(key), order_id), order_id, "anonymous", "the retry after a 429")
    check(ctx.runs(order_id) == 2, f"the handler ran {ctx.runs(order_id)} times, not twice")


@case
def tenants_are_scoped(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    a = ctx.order(sf(key), order_id, headers={"X-Tenant": "A"})
    expect_order_created(a, order_id, "A", "tenant A")
    b = ctx.order(sf(key), order_id, headers={"X-Tenant": "B"})
    expect_order_created(b, order_id, "B", "tenant B, the same key")
    check(ctx.runs(order_id) == 2, f"two tenants ran the handler {ctx.runs(order_id)} times, not twice")
    expect_replay(ctx.order(sf(key), order_id, headers={"X-Tenant": "A"}), a, "tenant A again")
    expect_replay(ctx.order(sf(key), order_id, headers={"X-Tenant": "B"}), b, "tenant B again")
    anonymous = ctx.order(sf(key), order_id)
    expect_order_created(anonymous, order_id, "anonymous", "no tenant, the same key")
    check(ctx.runs(order_id) == 3, f"the handler ran {ctx.runs(order_id)} times, not three times")


@case
def get_and_put_are_not_covered(ctx: Context) -> None:
    key = fresh()
    before = ctx.effects.count("list -")
    for attempt in range(2):
        listed = request(ctx.app, "GET", "/orders", key=sf(key))
        body = expect_fresh(listed, 200, f"GET /orders with a key, {attempt + 1}")
        check(isinstance(body.get("run"), str), f"GET body {body!r}")
    ctx.effects.await_count("list -", before + 2)
    order_id = fresh()
    runs = set()
    for attempt in range(2):
        put = request(ctx.app, "PUT", f"/orders/{order_id}", key=sf(key), body={"id": order_id})
        runs.add(expect_fresh(put, 200, f"PUT with a key, {attempt + 1}").get("run"))
    check(ctx.runs(order_id, "put") == 2 and len(runs) == 2, f"PUT ran {ctx.runs(order_id, 'put')} times, not twice")


@case
def optional_key_route(ctx: Context) -> None:
    note = fresh()
    runs = set()
    for attempt in range(2):
        answer = request(ctx.app, "POST", "/notes", body={"id": note})
        runs.add(expect_fresh(answer, 201, f"/notes without a key, {attempt + 1}").get("run"))
    check(ctx.runs(note, "notes") == 2 and len(runs) == 2, f"/notes without a key ran {ctx.runs(note, 'notes')} times, not twice")
    key, note = fresh(), fresh()
    first = request(ctx.app, "POST", "/notes", key=sf(key), body={"id": note})
    expect_fresh(first, 201, "/notes with a key")
    expect_replay(request(ctx.app, "POST", "/notes", key=sf(key), body={"id": note}), first, "/notes with the same key")
    check(ctx.runs(note, "notes") == 1, f"/notes with a key ran {ctx.runs(note, 'notes')} times, not once")


@case
def body_over_max_body(ctx: Context) -> None:
    order_id = fresh()
    body = json.dumps({"id": order_id, "pad": "x" * MAX_BODY}).encode()
    answer = request(ctx.app, "POST", "/orders", key=sf(fresh()), body=body, content_type="application/json")
    expect_problem(answer, "request-too-large", "a body over 1 MiB")
    check(ctx.runs(order_id) == 0, "the handler ran for a body over max_body")


@case
def slow_handler_keeps_its_lease(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    outcome: Dict[str, object] = {}

    def slow() -> None:
        try:
            outcome["first"] = ctx.order(sf(key), order_id, headers={"X-Delay-Ms": str(3 * ctx.lease_ms)})
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        ctx.effects.await_count(f"orders {order_id}", 1)
        # Two whole leases pass: without renewal the lease would have expired by now.
        time.sleep(2 * ctx.lease_ms / 1000)
        duplicate = ctx.order(sf(key), order_id)
        expect_problem(duplicate, "request-in-progress", "a duplicate after two leases")
        expect_retry_after(duplicate, "a duplicate after two leases")
    finally:
        thread.join()
    check("error" not in outcome, f"the slow request failed: {outcome.get('error')!r}")
    first = outcome["first"]
    assert isinstance(first, Response)
    expect_order_created(first, order_id, "anonymous", "the slow request")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")
    expect_replay(ctx.order(sf(key), order_id), first, "a duplicate after the slow request")


@case
def wait_returns_the_replay(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    outcome: Dict[str, object] = {}

    def slow() -> None:
        try:
            outcome["first"] = ctx.order(sf(key), order_id, target="/orders-wait", headers={"X-Delay-Ms": "1500"})
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        ctx.effects.await_count(f"orders {order_id}", 1)
        waited = ctx.order(sf(key), order_id, target="/orders-wait")
    finally:
        thread.join()
    check("error" not in outcome, f"the first request failed: {outcome.get('error')!r}")
    first = outcome["first"]
    assert isinstance(first, Response)
    expect_order_created(first, order_id, "anonymous", "the first request")
    expect_replay(waited, first, "a duplicate that waited")
    check(ctx.runs(order_id) == 1, f"the handler ran {ctx.runs(order_id)} times, not once")


@case
def idemd_down_fails_closed(ctx: Context) -> None:
    order_id = fresh()
    answer = ctx.order(sf(fresh()), order_id, app=ctx.dead_app)
    expect_problem(answer, "idemd-unavailable", "/orders with idemd down")
    check(answer.header("retry-after") == "1", f"Retry-After {answer.header('retry-after')!r}, not 1")
    check(ctx.dead_effects.count(f"orders {order_id}") == 0, "the handler ran with idemd down (fail closed)")


@case
def idemd_down_fail_open_runs(ctx: Context) -> None:
    note = fresh()
    answer = request(ctx.dead_app, "POST", "/open", key=sf(fresh()), body={"id": note})
    body = expect_fresh(answer, 201, "/open with idemd down (fail_open)")
    check(isinstance(body.get("run"), str), f"/open body {body!r}")
    count = ctx.dead_effects.count(f"open {note}")
    check(count == 1, f"/open ran {count} times with idemd down, not once")


# -- across frameworks: --app and --peer-app share one idemd and one NAMESPACE ----------------

CROSS_CASES: Dict[str, Case] = {}


def cross_case(fn: Case) -> Case:
    CROSS_CASES[fn.__name__] = fn
    return fn


def peer_runs(ctx: Context, line: str) -> int:
    assert ctx.peer_effects is not None
    return ctx.peer_effects.count(line)


@cross_case
def cross_json_replays(ctx: Context) -> None:
    """The same key, scope and JSON (reordered) give the same idemd key and fingerprint in the
    peer's language: it replays what the app stored."""
    key, order_id = fresh(), fresh()
    first = ctx.order(sf(key), order_id, target="/orders?src=a%20b&n=1",
                      headers={"X-Tenant": "tenant-x"},
                      body={"id": order_id, "amount": 1.5, "note": "caf\u00e9 \U0001f4b3", "items": [3, 1]})
    expect_order_created(first, order_id, "tenant-x", "the first request, on the app")
    reordered = json.dumps({"items": [3, 1], "note": "café 💳", "amount": 1.5, "id": order_id},
                           ensure_ascii=True, indent=1).encode()
    again = request(ctx.peer_app, "POST", "/orders?src=a%20b&n=1", key=key, body=reordered,
                    headers={"X-Tenant": "tenant-x"}, content_type="application/json")
    expect_replay(again, first, "the same request on the peer (bare key, reordered JSON)")
    check(peer_runs(ctx, f"orders {order_id}") == 0, "the peer ran the handler for a stored key")
    other_tenant = request(ctx.peer_app, "POST", "/orders?src=a%20b&n=1", key=sf(key), body=reordered,
                           content_type="application/json")
    expect_order_created(other_tenant, order_id, "anonymous", "the same key on the peer, another tenant")


@cross_case
def cross_long_and_escaped_keys_replay(ctx: Context) -> None:
    for what, key in (
        ("a 240-byte key (the hashed form)", (fresh() + "-" + "x" * 255)[:240]),
        ("a key with \\\" and \\\\ escapes", f'say "hi" \\ {fresh()}'),
    ):
        order_id = fresh()
        first = ctx.order(sf(key), order_id)
        expect_order_created(first, order_id, "anonymous", f"{what}, on the app")
        expect_replay(ctx.order(sf(key), order_id, app=ctx.peer_app), first, f"{what}, on the peer")
        check(peer_runs(ctx, f"orders {order_id}") == 0, f"{what}: the peer ran the handler")


@cross_case
def cross_bytes_body_replays(ctx: Context) -> None:
    """A body that is not JSON is fingerprinted as base64 of its bytes, the same everywhere."""
    key = fresh()
    body = "not JSON: caf\u00e9 \U0001f4b3 \x00\xff".encode("utf-8") + bytes([0, 159, 255])
    first = request(ctx.app, "POST", "/notes", key=sf(key), body=body, content_type="text/plain")
    expect_fresh(first, 201, "a text/plain note, on the app")
    again = request(ctx.peer_app, "POST", "/notes", key=sf(key), body=body, content_type="text/plain")
    expect_replay(again, first, "the same note, on the peer")
    changed = request(ctx.peer_app, "POST", "/notes", key=sf(key), body=body + b"!", content_type="text/plain")
    expect_problem(changed, "key-reused", "a changed note, on the peer")


@cross_case
def cross_changed_body_is_key_reused(ctx: Context) -> None:
    key, order_id = fresh(), fresh()
    expect_order_created(ctx.order(sf(key), order_id), order_id, "anonymous", "the first request, on the app")
    changed = ctx.order(sf(key), order_id, body={"id": order_id, "amount": 101}, app=ctx.peer_app)
    expect_problem(changed, "key-reused", "a changed body, on the peer")
    check(peer_runs(ctx, f"orders {order_id}") == 0, "the peer ran the handler")


# -- running --------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", help="the app backed by a live idemd")
    parser.add_argument("--effects", help="its EFFECTS_FILE")
    parser.add_argument("--dead-app", help="the same app with nothing at IDEMD_ADDR")
    parser.add_argument("--dead-effects", help="its EFFECTS_FILE")
    parser.add_argument("--peer-app", help="instead of the dead app: another framework's app on the same "
                        "idemd and NAMESPACE; runs the cross_* cases only")
    parser.add_argument("--peer-effects", help="its EFFECTS_FILE")
    parser.add_argument("--lease-ms", type=int, default=1000, help="the apps' LEASE_MS (default 1000)")
    parser.add_argument("--only", action="append", metavar="CASE", help="run only this case (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list(CASES) + list(CROSS_CASES)))
        return 0
    if not (args.app and args.effects):
        parser.error("--app and --effects are required")
    if args.peer_app:
        if not args.peer_effects:
            parser.error("--peer-app needs --peer-effects")
        cases = CROSS_CASES
    else:
        if not (args.dead_app and args.dead_effects):
            parser.error("--dead-app and --dead-effects are required (or --peer-app and --peer-effects)")
        cases = CASES
    names = args.only or list(cases)
    unknown = [name for name in names if name not in cases]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known here: {', '.join(cases)}", file=sys.stderr)
        return 2
    ctx = Context(args.app, Effects(args.effects), args.dead_app or "", Effects(args.dead_effects or os.devnull),
                  args.lease_ms, args.peer_app or "", Effects(args.peer_effects) if args.peer_effects else None)
    failed = 0
    for name in names:
        started = time.monotonic()
        try:
            cases[name](ctx)
        except Fail as exc:
            failed += 1
            print(f"FAIL {name}: {exc}", flush=True)
            continue
        except Exception:  # noqa: BLE001 - a broken connection or the like fails the case
            failed += 1
            print(f"FAIL {name}: {traceback.format_exc().strip()}", flush=True)
            continue
        print(f"ok {name} ({time.monotonic() - started:.2f}s)", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
