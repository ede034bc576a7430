"""Fail closed (default) or open when idemd cannot be reached."""
import time

import grpc
import pytest

from idemd_client import Client, IdemdUnavailable


def test_fail_closed_when_idemd_is_down(closed_port, counter):
    with Client(f"127.0.0.1:{closed_port}", rpc_timeout=3) as client:
        started = time.monotonic()
        with pytest.raises(IdemdUnavailable) as info:
            client.idempotent("pytest", "k", {"a": 1}, lambda ctx: (counter.incr(), b"x")[1])
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert counter.value == 0
        assert time.monotonic() - started < 5


def test_fail_open_runs_work_unprotected(closed_port, counter):
    with Client(f"127.0.0.1:{closed_port}", rpc_timeout=3) as client:
        seen = {}

        def work(ctx):
            counter.incr()
            seen["fencing"] = ctx.fencing_token
            return b"ran anyway"

        out = client.idempotent("pytest", "k", {"a": 1}, work, fail_open=True)
        assert out.body == b"ran anyway"
        assert not out.replayed and not out.protected
        assert counter.value == 1 and seen["fencing"] is None

        with client.lease("pytest", "k", None, fail_open=True) as lease:
            assert not lease.protected
            lease.complete(b"x")


def test_deadline_exceeded_counts_as_unavailable():
    # A listener that accepts TCP but never speaks HTTP/2: the call runs into its deadline.
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        with Client(f"127.0.0.1:{srv.getsockname()[1]}", rpc_timeout=0.5) as client:
            with pytest.raises(IdemdUnavailable):
                client.idempotent("pytest", "k", None, lambda ctx: b"never")
    finally:
        srv.close()
