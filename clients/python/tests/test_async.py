"""The asyncio client against a live idemd (memory store and PostgreSQL)."""
import asyncio
import time

import pytest

from idemd_client import AsyncClient, FingerprintMismatch, IdemdUnavailable, Result, Retryable, pb

NS = "pytest-aio"


async def test_async_replay_and_concurrent_duplicates(idemd, key):
    calls = 0

    async def work(ctx):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        return Result(body=b"async", code=1, metadata={"k": "v"})

    async with AsyncClient(idemd.address) as client:
        outcomes = await asyncio.gather(*(client.idempotent(NS, key, {"x": 1}, work) for _ in range(10)))
        assert calls == 1
        assert all(o.result == Result(b"async", 1, {"k": "v"}) for o in outcomes)
        assert sum(not o.replayed for o in outcomes) == 1
        again = await client.idempotent(NS, key, {"x": 1}, work)
        assert again.replayed and calls == 1


async def test_async_release_on_retryable_and_sync_work(idemd, key):
    async with AsyncClient(idemd.address) as client:
        async def failing(ctx):
            raise Retryable("later")

        with pytest.raises(Retryable):
            await client.idempotent(NS, key, None, failing)
        out = await client.idempotent(NS, key, None, lambda ctx: b"plain function")
        assert not out.replayed and out.body == b"plain function"
        assert (await client.get(NS, key)).record.attempts == 2


async def test_async_lease_kept_alive(idemd, key):
    async with AsyncClient(idemd.address) as client:
        async def long_work(ctx):
            await asyncio.sleep(2.5)
            assert not ctx.lost
            return b"long"

        task = asyncio.ensure_future(client.idempotent(NS, key, None, long_work, lease_ttl=1))
        await asyncio.sleep(1.5)
        record = (await client.get(NS, key)).record
        assert record.state == pb.RECORD_STATE_IN_PROGRESS
        assert record.lease_expires_at.ToNanoseconds() / 1e9 > time.time() + 0.2
        dup = await client.idempotent(NS, key, None, long_work, lease_ttl=1)
        first = await task
        assert not first.replayed and dup.replayed and dup.body == b"long"
        assert (await client.get(NS, key)).record.attempts == 1


async def test_async_lease_context_manager(idemd, key):
    async with AsyncClient(idemd.address) as client:
        with pytest.raises(KeyError):
            async with client.lease(NS, key, {"a": 1}) as lease:
                raise KeyError("released")
        async with client.lease(NS, key, {"a": 1}) as lease:
            assert not lease.replayed and lease.fencing_token > 0
            await lease.complete(b"cm")
        async with client.lease(NS, key, {"a": 1}) as lease:
            assert lease.replayed and lease.result.body == b"cm"
        with pytest.raises(FingerprintMismatch):
            async with client.lease(NS, key, {"a": 2}):
                pass


async def test_async_decorator(idemd, key):
    client = AsyncClient(idemd.address)
    calls = []

    @client.idempotent_fn(NS, key=lambda n: f"{key}-{n}", fingerprint=lambda n: {"n": n})
    async def square(n):
        calls.append(n)
        return str(n * n).encode()

    assert (await square(3)).body == b"9"
    assert (await square(3)).replayed
    assert calls == [3]
    await client.close()


async def test_async_fail_closed_and_open(closed_port):
    async with AsyncClient(f"127.0.0.1:{closed_port}", rpc_timeout=3) as client:
        with pytest.raises(IdemdUnavailable):
            await client.idempotent(NS, "k", None, lambda ctx: b"never")
        out = await client.idempotent(NS, "k", None, lambda ctx: b"unprotected", fail_open=True)
        assert out.body == b"unprotected" and not out.replayed and not out.protected
