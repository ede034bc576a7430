"""asyncio idemd client (grpc.aio)."""
from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Callable, Optional, Sequence, Tuple

import grpc
import grpc.aio

from ._common import (
    LeaseBase,
    Options,
    Outcome,
    Result,
    default_holder,
    duration,
    duration_seconds,
    jitter,
    log,
    normalize_result,
    timestamp_datetime,
    wait_timeout_for,
)
from ._proto import METHODS, SERVICE, pb
from .errors import (
    FingerprintMismatch,
    IdemdError,
    IdemdUnavailable,
    InProgressError,
    LeaseNotHeld,
    RecordCompleted,
    RecordNotFound,
    RETRIED,
    error_from_rpc,
    lease_lost,
)
from ._traces import Metadata, call_metadata
from .fingerprint import to_fingerprint

__all__ = ["AsyncClient", "AsyncLease"]



class AsyncClient:
    """asyncio client of an idemd server; same arguments as :class:`idemd_client.Client`.

    The gRPC channel is opened on first use, inside the running event loop.
    """

    def __init__(
        self,
        target: str,
        token: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        *,
        rpc_timeout: float = 10.0,
        holder: Optional[str] = None,
        channel_options: Optional[Sequence[Tuple[str, Any]]] = None,
        channel: Optional[grpc.aio.Channel] = None,
    ) -> None:
        self.target = target
        self.rpc_timeout = float(rpc_timeout)
        self.holder = holder or default_holder()
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = credentials
        self._channel_options = list(channel_options or [])
        self._channel = channel
        self._owns_channel = channel is None
        self._rpcs = None

    def _ensure(self):
        if self._rpcs is None:
            if self._channel is None:
                if self._credentials is not None:
                    self._channel = grpc.aio.secure_channel(
                        self.target, self._credentials, options=self._channel_options
                    )
                else:
                    self._channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
            self._rpcs = {
                name: self._channel.unary_unary(
                    SERVICE + name,
                    request_serializer=req.SerializeToString,
                    response_deserializer=resp.FromString,
                )
                for name, (req, resp) in METHODS.items()
            }
        return self._rpcs

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._rpcs = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- raw RPCs ----------------------------------------------------------------------------

    async def _call(self, method: str, request, timeout: Optional[float] = None):
        rpcs = self._ensure()
        try:
            return await rpcs[method](
                request,
                timeout=self.rpc_timeout if timeout is None else timeout,
                metadata=call_metadata(self._metadata),
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, method) from err

    async def acquire(
        self,
        namespace: str,
        key: str,
        fingerprint: bytes = b"",
        *,
        lease_ttl: Optional[float] = None,
        retention: Optional[float] = None,
        holder: Optional[str] = None,
    ) -> "pb.AcquireResponse":
        req = pb.AcquireRequest(namespace=namespace, key=key, fingerprint=fingerprint, holder=holder or self.holder)
        if lease_ttl is not None:
            req.lease_ttl.CopyFrom(duration(lease_ttl))
        if retention is not None:
            req.retention.CopyFrom(duration(retention))
        return await self._call("Acquire", req)

    async def complete(
        self, namespace: str, key: str, lease_token: str, result: Any, *, retention: Optional[float] = None
    ) -> "pb.CompleteResponse":
        req = pb.CompleteRequest(
            namespace=namespace, key=key, lease_token=lease_token, result=normalize_result(result).to_pb()
        )
        if retention is not None:
            req.retention.CopyFrom(duration(retention))
        return await self._call("Complete", req)

    async def release(self, namespace: str, key: str, lease_token: str) -> "pb.ReleaseResponse":
        return await self._call("Release", pb.ReleaseRequest(namespace=namespace, key=key, lease_token=lease_token))

    async def renew(
        self, namespace: str, key: str, lease_token: str, *, lease_ttl: Optional[float] = None
    ) -> "pb.RenewResponse":
        req = pb.RenewRequest(namespace=namespace, key=key, lease_token=lease_token)
        if lease_ttl is not None:
            req.lease_ttl.CopyFrom(duration(lease_ttl))
        return await self._call("Renew", req)

    async def get(self, namespace: str, key: str) -> "pb.GetResponse":
        return await self._call("Get", pb.GetRequest(namespace=namespace, key=key))

    async def wait(self, namespace: str, key: str, timeout: Optional[float] = None) -> "pb.WaitResponse":
        req = pb.WaitRequest(namespace=namespace, key=key)
        if timeout is not None:
            req.timeout.CopyFrom(duration(timeout))
        deadline = (timeout if timeout is not None else 30.0) + self.rpc_timeout
        return await self._call("Wait", req, timeout=deadline)

    # -- helpers -----------------------------------------------------------------------------

    def lease(self, namespace: str, key: str, request_or_fingerprint: Any = None, **options) -> "AsyncLease":
        """``async with client.lease(...) as lease:``; see :meth:`idemd_client.Client.lease`."""
        return AsyncLease(self, namespace, key, to_fingerprint(request_or_fingerprint), Options(**options))

    async def idempotent(
        self,
        namespace: str,
        key: str,
        request_or_fingerprint: Any,
        work: Callable[["AsyncLease"], Any],
        **options,
    ) -> Outcome:
        """Run ``await work(ctx)`` at most once per (namespace, key). ``work`` may be an async
        function or a plain function."""
        async with self.lease(namespace, key, request_or_fingerprint, **options) as lease:
            if lease.replayed:
                return lease.outcome()
            value = work(lease)
            if inspect.isawaitable(value):
                value = await value
            await lease.complete(normalize_result(value))
            return lease.outcome()

    def idempotent_fn(
        self,
        namespace: str,
        key: Any,
        fingerprint: Any = None,
        *,
        pass_context: bool = False,
        **options,
    ):
        """Decorator for async functions; see :meth:`idemd_client.Client.idempotent_fn`."""
        Options(**options)

        def decorate(fn):
            @functools.wraps(fn)
            async def wrapper(*args, **kwargs):
                k = key(*args, **kwargs) if callable(key) else key
                fp = fingerprint(*args, **kwargs) if callable(fingerprint) else fingerprint

                def work(ctx):
                    return fn(ctx, *args, **kwargs) if pass_context else fn(*args, **kwargs)

                return await self.idempotent(namespace, k, fp, work, **options)

            return wrapper

        return decorate


class AsyncLease(LeaseBase):
    """asyncio lease context; see :meth:`AsyncClient.lease`."""

    def __init__(self, client: AsyncClient, namespace: str, key: str, fingerprint: bytes, options: Options) -> None:
        super().__init__(namespace, key, fingerprint, options)
        self._client = client
        self._renewer: Optional[asyncio.Task] = None

    async def __aenter__(self) -> "AsyncLease":
        await self._acquire()
        return self

    async def _acquire(self) -> None:
        client, opts = self._client, self.options
        waits = 0
        while True:
            try:
                resp = await self._retrying(
                    lambda: client.acquire(
                        self.namespace,
                        self.key,
                        self.fingerprint,
                        lease_ttl=opts.lease_ttl,
                        retention=opts.retention,
                        holder=opts.holder,
                    )
                )
            except IdemdUnavailable as exc:
                # Only an unreachable idemd may be bypassed: one that answered (RateLimited,
                # Overloaded, StoreFull, a refusal) said no, and running anyway would ignore it.
                if opts.fail_open:
                    log.warning(
                        "idemd_client: idemd unreachable, running %s/%s UNPROTECTED (fail_open): %s",
                        self.namespace, self.key, exc,
                    )
                    self._set_unprotected()
                    return
                raise
            if resp.outcome == pb.OUTCOME_ACQUIRED:
                self._set_acquired(resp)
                self._renewer = asyncio.ensure_future(self._renew_loop())
                return
            if resp.outcome == pb.OUTCOME_COMPLETED:
                self._set_replayed(resp.record)
                return
            if resp.outcome != pb.OUTCOME_IN_PROGRESS:
                raise IdemdError(f"idemd Acquire: unexpected outcome {resp.outcome}")
            retry_after = duration_seconds(resp.retry_after) if resp.HasField("retry_after") else None
            if waits >= opts.max_waits:
                raise InProgressError(
                    f"idemd: {self.namespace}/{self.key} still in progress after {waits} waits",
                    reason="IN_PROGRESS",
                    retry_after=retry_after,
                )
            waits += 1
            timeout = wait_timeout_for(retry_after, opts)
            try:
                w = await client.wait(self.namespace, self.key, timeout)
            except RETRIED as exc:
                # A Wait out of time is a TIMED_OUT; too many waiters or idemd unreachable: back
                # off, and let Acquire (with its retries) decide.
                if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    await asyncio.sleep(jitter(min(timeout, 1.0)))
                continue
            if w.outcome == pb.WAIT_OUTCOME_COMPLETED:
                if w.record.fingerprint != self.fingerprint:
                    raise FingerprintMismatch(
                        f"idemd: {self.namespace}/{self.key} was completed for a different fingerprint",
                        reason="FINGERPRINT_MISMATCH",
                        domain="idemd",
                    )
                self._set_replayed(w.record)
                return

    async def _retrying(self, call):
        """``call()`` until it succeeds, fails for good, or ``max_attempts`` calls were made:
        unreachable, rate limited and overloaded are retried after a jittered backoff."""
        attempt = 1
        while True:
            try:
                return await call()
            except RETRIED as exc:
                if attempt >= self.options.max_attempts:
                    raise
                log.debug("idemd_client: %s; retry %d after a backoff", exc, attempt)
                await asyncio.sleep(self.options.backoff(attempt))
                attempt += 1

    async def _renew_loop(self) -> None:
        interval = self.options.renew_interval
        while True:
            await asyncio.sleep(interval)
            try:
                resp = await self._client.renew(
                    self.namespace, self.key, self.lease_token, lease_ttl=self.options.lease_ttl
                )
                self.expires_at = timestamp_datetime(resp.lease.expires_at)
            except (LeaseNotHeld, RecordCompleted, RecordNotFound) as exc:
                log.warning("idemd_client: lease on %s/%s lost: %s", self.namespace, self.key, exc)
                self.lost_error = exc
                return
            except Exception as exc:  # noqa: BLE001 - keep renewing through transient errors
                log.warning("idemd_client: renewing %s/%s failed (will retry): %s", self.namespace, self.key, exc)

    async def _stop_renewer(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait never raises the task's CancelledError into us.
            await asyncio.wait([task], timeout=self._client.rpc_timeout)

    async def complete(self, result: Any) -> Result:
        """Store the result and end the lease; see :meth:`idemd_client.Lease.complete`."""
        result = normalize_result(result)
        if self.replayed:
            raise IdemdError("idemd: cannot complete a replayed lease")
        if self.completed:
            raise IdemdError("idemd: lease already completed")
        if self.released:
            raise IdemdError("idemd: lease already released")
        await self._stop_renewer()
        if not self.protected:
            self.result, self.completed = result, True
            return result
        try:
            resp = await self._retrying(
                lambda: self._client.complete(
                    self.namespace, self.key, self.lease_token, result, retention=self.options.retention
                )
            )
        except (LeaseNotHeld, RecordNotFound, RecordCompleted) as exc:
            self._complete_failed = True
            raise lease_lost(exc, self.namespace, self.key) from exc
        except BaseException:
            self._complete_failed = True
            raise
        self.record = resp.record
        self.result = Result.from_pb(resp.record.result)
        self.completed = True
        return self.result

    async def release(self) -> None:
        """Give the key back (errors are logged, not raised)."""
        await self._stop_renewer()
        if not self.held:
            return
        self.released = True
        try:
            await self._client.release(self.namespace, self.key, self.lease_token)
        except Exception as exc:  # noqa: BLE001
            log.warning("idemd_client: releasing %s/%s failed: %s", self.namespace, self.key, exc)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        await self._stop_renewer()
        if not self.held:
            return False
        if self._complete_failed:
            # The work ran but its result was not stored. Releasing would hand the key to the
            # next caller at once, to run the work again; an expiring lease at least delays it.
            log.warning("idemd_client: Complete of %s/%s failed; leaving the lease to expire",
                        self.namespace, self.key)
            return False
        if exc is None:
            log.warning("idemd_client: lease block for %s/%s ended without complete(); releasing",
                        self.namespace, self.key)
            await self.release()
            return False
        if (
            not self._complete_failed
            and isinstance(exc, Exception)
            and not self.options.is_retryable(exc)
            and self.options.complete_on_error is not None
        ):
            try:
                error_result = self.options.complete_on_error(exc)
                if inspect.isawaitable(error_result):
                    error_result = await error_result
                if error_result is not None:
                    await self.complete(error_result)
                    return False
            except Exception as store_exc:  # noqa: BLE001
                log.warning("idemd_client: storing the error result of %s/%s failed: %s",
                            self.namespace, self.key, store_exc)
        await self.release()
        return False
