"""The sync client against a live idemd (memory store and PostgreSQL)."""
import threading
import time

import grpc
import pytest

from idemd_client import (
    Client,
    FingerprintMismatch,
    IdemdError,
    InProgressError,
    InvalidRequest,
    LeaseNotHeld,
    RecordNotFound,
    Result,
    Retryable,
    pb,
)

NS = "pytest"


def test_replay_of_completed_key(client, key, counter):
    request = {"amount": 1250, "currency": "EUR"}

    def work(ctx):
        counter.incr()
        assert ctx.fencing_token > 0 and len(ctx.lease_token) == 32
        return Result(body=b"charged", code=201, metadata={"content-type": "text/plain"})

    first = client.idempotent(NS, key, request, work)
    assert not first.replayed and first.protected
    assert first.result == Result(b"charged", 201, {"content-type": "text/plain"})

    second = client.idempotent(NS, key, {"currency": "EUR", "amount": 1250}, work)
    assert second.replayed
    assert second.result == first.result
    assert second.fencing_token == first.fencing_token
    assert counter.value == 1

    record = client.get(NS, key).record
    assert record.state == pb.RECORD_STATE_COMPLETED
    assert record.result.body == b"charged"


def test_work_returning_bytes(client, key):
    out = client.idempotent(NS, key, None, lambda ctx: b"plain")
    assert out.result == Result(b"plain") and out.body == b"plain" and out.code == 0


def test_concurrent_duplicates_resolved_by_wait(client, key, counter):
    n = 10
    barrier = threading.Barrier(n)
    outcomes, errors = [None] * n, []

    def work(ctx):
        counter.incr()
        time.sleep(0.5)
        return f"result-{ctx.fencing_token}".encode()

    def run(i):
        try:
            barrier.wait()
            outcomes[i] = client.idempotent(NS, key, {"req": 1}, work)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert counter.value == 1
    assert len({o.result.body for o in outcomes}) == 1
    assert sum(1 for o in outcomes if not o.replayed) == 1
    assert sum(1 for o in outcomes if o.replayed) == n - 1


@pytest.mark.parametrize("how", ["exception-class", "predicate"])
def test_release_on_retryable_failure(client, key, counter, how):
    class Flaky(Exception):
        pass

    def failing(ctx):
        counter.incr()
        raise Retryable("psp timeout") if how == "exception-class" else Flaky("psp timeout")

    opts = {} if how == "exception-class" else {"retryable": lambda exc: isinstance(exc, Flaky)}
    with pytest.raises(Retryable if how == "exception-class" else Flaky):
        client.idempotent(NS, key, {"r": 1}, failing, **opts)

    # Released: the next call runs the work again at once (no waiting for the lease to expire).
    started = time.monotonic()
    out = client.idempotent(NS, key, {"r": 1}, lambda ctx: (counter.incr(), b"ok")[1], **opts)
    assert time.monotonic() - started < 2
    assert not out.replayed and out.body == b"ok"
    assert counter.value == 2
    assert client.get(NS, key).record.attempts == 2


def test_other_exception_releases_by_default(client, key, counter):
    def boom(ctx):
        counter.incr()
        raise ValueError("bug")

    with pytest.raises(ValueError):
        client.idempotent(NS, key, None, boom)
    out = client.idempotent(NS, key, None, lambda ctx: (counter.incr(), b"ok")[1])
    assert not out.replayed and counter.value == 2


def test_complete_on_error_stores_error_result(client, key, counter):
    def declined(ctx):
        counter.incr()
        raise PermissionError("card declined")

    store = lambda exc: Result(body=str(exc).encode(), code=402)  # noqa: E731
    with pytest.raises(PermissionError):
        client.idempotent(NS, key, None, declined, complete_on_error=store)
    out = client.idempotent(NS, key, None, declined, complete_on_error=store)
    assert out.replayed and out.result == Result(b"card declined", 402)
    assert counter.value == 1

    # A retryable failure is released even when complete_on_error is set.
    key2 = key + "-2"
    with pytest.raises(Retryable):
        client.idempotent(NS, key2, None, lambda ctx: (_ for _ in ()).throw(Retryable("x")), complete_on_error=store)
    assert not client.idempotent(NS, key2, None, lambda ctx: b"ok").replayed


def test_lease_kept_alive_through_long_work(client, key, counter):
    """lease_ttl 1 s, work 3 s: renewals keep the lease, a concurrent duplicate never takes over."""
    in_work = threading.Event()
    dup_result, dup_errors = [], []

    def long_work(ctx):
        counter.incr()
        in_work.set()
        time.sleep(3)
        assert not ctx.lost
        return b"long"

    def duplicate():
        try:
            dup_result.append(client.idempotent(NS, key, None, long_work, lease_ttl=1))
        except BaseException as exc:  # noqa: BLE001
            dup_errors.append(exc)

    first = {}
    t1 = threading.Thread(target=lambda: first.setdefault("out", client.idempotent(NS, key, None, long_work, lease_ttl=1)))
    t1.start()
    assert in_work.wait(5)
    time.sleep(1.5)  # past the original lease_ttl
    record = client.get(NS, key).record
    assert record.state == pb.RECORD_STATE_IN_PROGRESS
    assert record.lease_expires_at.ToNanoseconds() / 1e9 > time.time() + 0.2  # renewed: still live
    t2 = threading.Thread(target=duplicate)
    t2.start()
    t1.join(10)
    t2.join(10)
    assert not dup_errors, dup_errors
    assert counter.value == 1
    assert not first["out"].replayed
    assert dup_result[0].replayed and dup_result[0].body == b"long"
    assert client.get(NS, key).record.attempts == 1


def test_fingerprint_mismatch(client, key):
    client.idempotent(NS, key, {"amount": 1}, lambda ctx: b"one")
    with pytest.raises(FingerprintMismatch) as info:
        client.idempotent(NS, key, {"amount": 2}, lambda ctx: b"two")
    assert info.value.reason == "FINGERPRINT_MISMATCH"
    assert info.value.domain == "idemd"
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_in_progress_error_after_max_waits(client, key, counter):
    held = client.acquire(NS, key, b"", lease_ttl=5)
    assert held.outcome == pb.OUTCOME_ACQUIRED
    started = time.monotonic()
    with pytest.raises(InProgressError):
        client.idempotent(NS, key, None, lambda ctx: (counter.incr(), b"x")[1], wait_timeout=0.2, max_waits=2)
    assert time.monotonic() - started < 3
    assert counter.value == 0
    client.release(NS, key, held.lease.token)


def test_takeover_of_expired_lease(client, key):
    held = client.acquire(NS, key, b"", lease_ttl=0.3)  # abandoned holder, never renews
    out = client.idempotent(NS, key, None, lambda ctx: b"taken over")
    assert not out.replayed and out.fencing_token > held.lease.fencing_token
    with pytest.raises(LeaseNotHeld) as info:
        client.complete(NS, key, held.lease.token, b"late")
    assert info.value.reason == "LEASE_NOT_HELD"
    assert client.get(NS, key).record.result.body == b"taken over"


def test_waiter_replays_when_holder_completes(client, key):
    held = client.acquire(NS, key, b"", lease_ttl=10)
    timer = threading.Timer(0.3, lambda: client.complete(NS, key, held.lease.token, Result(b"from holder", 7)))
    timer.start()
    out = client.idempotent(NS, key, None, lambda ctx: b"never")
    timer.join()
    assert out.replayed and out.result == Result(b"from holder", 7)


def test_error_details_are_parsed(client, key):
    with pytest.raises(InvalidRequest) as info:
        client.acquire("bad namespace!", key)
    assert info.value.reason == "INVALID_REQUEST"
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any("namespace" in field for field, _ in info.value.field_violations)
    with pytest.raises(RecordNotFound):
        client.get(NS, key)
    assert isinstance(info.value, IdemdError)


def test_lease_context_manager(client, key, counter):
    with client.lease(NS, key, {"a": 1}) as lease:
        assert not lease.replayed and lease.fencing_token > 0
        counter.incr()
        stored = lease.complete(Result(b"cm", 200))
    assert stored == Result(b"cm", 200)

    with client.lease(NS, key, {"a": 1}) as lease:
        assert lease.replayed and lease.result == Result(b"cm", 200)
    assert counter.value == 1


def test_lease_context_manager_releases_on_exception(client, key):
    with pytest.raises(RuntimeError):
        with client.lease(NS, key, None) as lease:
            token = lease.fencing_token
            raise RuntimeError("inside the block")
    with client.lease(NS, key, None) as lease:
        assert not lease.replayed and lease.fencing_token > token
        lease.complete(b"second try")
    assert client.get(NS, key).record.attempts == 2


def test_decorator(client, key, counter):
    @client.idempotent_fn(NS, key=lambda order: f"{key}-{order['id']}", fingerprint=lambda order: order)
    def charge(order):
        counter.incr()
        return Result(body=f"charged {order['amount']}".encode(), code=201)

    a = charge({"id": 1, "amount": 10})
    b = charge({"id": 1, "amount": 10})
    c = charge({"id": 2, "amount": 10})
    assert not a.replayed and b.replayed and not c.replayed
    assert a.result == b.result == Result(b"charged 10", 201)
    assert counter.value == 2
    with pytest.raises(FingerprintMismatch):
        charge({"id": 1, "amount": 99})

    @client.idempotent_fn(NS, key=lambda: key + "-ctx", pass_context=True)
    def with_ctx(ctx):
        return str(ctx.fencing_token).encode()

    out = with_ctx()
    assert out.body == str(out.fencing_token).encode()


def test_work_returning_wrong_type_releases(client, key):
    with pytest.raises(TypeError):
        client.idempotent(NS, key, None, lambda ctx: "not bytes")
    assert not client.idempotent(NS, key, None, lambda ctx: b"ok").replayed
