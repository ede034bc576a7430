"""Synchronous idemd client (grpcio)."""
from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import grpc

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

__all__ = ["Client", "Lease"]



class Client:
    """Blocking client of an idemd server.

    ``target`` is a gRPC target such as ``"idemd:50051"``. ``token`` is sent as
    ``authorization: Bearer <token>`` on every call. ``credentials`` (``grpc.ChannelCredentials``)
    switches to a TLS channel. ``rpc_timeout`` bounds every call but Wait (which gets its own
    timeout plus ``rpc_timeout``).
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
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        self.target = target
        self.rpc_timeout = float(rpc_timeout)
        self.holder = holder or default_holder()
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = list(channel_options or [])
        if channel is not None:
            self._channel = channel
            self._owns_channel = False
        elif credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
            self._owns_channel = True
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
            self._owns_channel = True
        self._rpcs = {
            name: self._channel.unary_unary(
                SERVICE + name,
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
            for name, (req, resp) in METHODS.items()
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw RPCs ----------------------------------------------------------------------------

    def _call(self, method: str, request, timeout: Optional[float] = None):
        try:
            return self._rpcs[method](
                request,
                timeout=self.rpc_timeout if timeout is None else timeout,
                metadata=call_metadata(self._metadata),
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, method) from err

    def acquire(
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
        return self._call("Acquire", req)

    def complete(
        self, namespace: str, key: str, lease_token: str, result: Any, *, retention: Optional[float] = None
    ) -> "pb.CompleteResponse":
        req = pb.CompleteRequest(
            namespace=namespace, key=key, lease_token=lease_token, result=normalize_result(result).to_pb()
        )
        if retention is not None:
            req.retention.CopyFrom(duration(retention))
        return self._call("Complete", req)

    def release(self, namespace: str, key: str, lease_token: str) -> "pb.ReleaseResponse":
        return self._call("Release", pb.ReleaseRequest(namespace=namespace, key=key, lease_token=lease_token))

    def renew(
        self, namespace: str, key: str, lease_token: str, *, lease_ttl: Optional[float] = None
    ) -> "pb.RenewResponse":
        req = pb.RenewRequest(namespace=namespace, key=key, lease_token=lease_token)
        if lease_ttl is not None:
            req.lease_ttl.CopyFrom(duration(lease_ttl))
        return self._call("Renew", req)

    def get(self, namespace: str, key: str) -> "pb.GetResponse":
        return self._call("Get", pb.GetRequest(namespace=namespace, key=key))

    def wait(self, namespace: str, key: str, timeout: Optional[float] = None) -> "pb.WaitResponse":
        req = pb.WaitRequest(namespace=namespace, key=key)
        if timeout is not None:
            req.timeout.CopyFrom(duration(timeout))
        deadline = (timeout if timeout is not None else 30.0) + self.rpc_timeout
        return self._call("Wait", req, timeout=deadline)

    # -- helpers -----------------------------------------------------------------------------

    def lease(self, namespace: str, key: str, request_or_fingerprint: Any = None, **options) -> "Lease":
        """Context manager around Acquire/Wait/Renew/Complete/Release::

            with client.lease("payments", key, request) as lease:
                if lease.replayed:
                    return lease.result
                lease.complete(do_the_work(lease.fencing_token))

        Leaving the block with an exception releases the key (or stores
        ``complete_on_error(exc)``); leaving it without ``complete()`` releases it too.
        Options: see :class:`idemd_client.Options`.
        """
        return Lease(self, namespace, key, to_fingerprint(request_or_fingerprint), Options(**options))

    def idempotent(
        self,
        namespace: str,
        key: str,
        request_or_fingerprint: Any,
        work: Callable[["Lease"], Any],
        **options,
    ) -> Outcome:
        """Run ``work(ctx)`` at most once per (namespace, key); see the package docs."""
        with self.lease(namespace, key, request_or_fingerprint, **options) as lease:
            if lease.replayed:
                return lease.outcome()
            result = normalize_result(work(lease))
            lease.complete(result)
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
        """Decorator: ``key(*args, **kwargs)`` names the key, ``fingerprint(*args, **kwargs)``
        gives the request (canonicalised) or a ready fingerprint (bytes). The wrapped function
        returns an :class:`Outcome`. With ``pass_context=True`` the function gets the lease
        context as its first argument."""
        Options(**options)  # validate early

        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                k = key(*args, **kwargs) if callable(key) else key
                fp = fingerprint(*args, **kwargs) if callable(fingerprint) else fingerprint

                def work(ctx):
                    return fn(ctx, *args, **kwargs) if pass_context else fn(*args, **kwargs)

                return self.idempotent(namespace, k, fp, work, **options)

            return wrapper

        return decorate


class _Renewer:
    def __init__(self, client: Client, lease: "Lease") -> None:
        self._client = client
        self._lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"idemd-renew-{lease.namespace}/{lease.key}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._client.rpc_timeout)

    def _run(self) -> None:
        lease = self._lease
        interval = lease.options.renew_interval
        while not self._stop.wait(interval):
            try:
                resp = self._client.renew(
                    lease.namespace, lease.key, lease.lease_token, lease_ttl=lease.options.lease_ttl
                )
                lease.expires_at = timestamp_datetime(resp.lease.expires_at)
            except (LeaseNotHeld, RecordCompleted, RecordNotFound) as exc:
                if not self._stop.is_set():
                    log.warning("idemd_client: lease on %s/%s lost: %s", lease.namespace, lease.key, exc)
                    lease.lost_error = exc
                return
            except Exception as exc:  # noqa: BLE001 - keep renewing through transient errors
                log.warning("idemd_client: renewing %s/%s failed (will retry): %s", lease.namespace, lease.key, exc)


class Lease(LeaseBase):
    """Sync lease context; see :meth:`Client.lease`."""

    def __init__(self, client: Client, namespace: str, key: str, fingerprint: bytes, options: Options) -> None:
        super().__init__(namespace, key, fingerprint, options)
        self._client = client
        self._renewer: Optional[_Renewer] = None

    # -- acquisition -------------------------------------------------------------------------

    def __enter__(self) -> "Lease":
        self._acquire()
        return self

    def _acquire(self) -> None:
        client, opts = self._client, self.options
        waits = 0
        while True:
            try:
                resp = self._retrying(
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
                self._renewer = _Renewer(client, self)
                self._renewer.start()
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
                w = client.wait(self.namespace, self.key, timeout)
            except RETRIED as exc:
                # A Wait out of time is a TIMED_OUT; too many waiters or idemd unreachable: back
                # off, and let Acquire (with its retries) decide.
                if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    # Overloaded or unreachable: back off, then let Acquire decide.
                    time.sleep(jitter(min(timeout, 1.0)))
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
            # FREE or TIMED_OUT: Acquire again.

    def _retrying(self, call):
        """``call()`` until it succeeds, fails for good, or ``max_attempts`` calls were made:
        unreachable, rate limited and overloaded are retried after a jittered backoff."""
        attempt = 1
        while True:
            try:
                return call()
            except RETRIED as exc:
                if attempt >= self.options.max_attempts:
                    raise
                log.debug("idemd_client: %s; retry %d after a backoff", exc, attempt)
                time.sleep(self.options.backoff(attempt))
                attempt += 1

    # -- completion --------------------------------------------------------------------------

    def complete(self, result: Any) -> Result:
        """Store the work's result (bytes or Result) and end the lease; returns the stored result
        (on a retried Complete, the first stored one)."""
        result = normalize_result(result)
        if self.replayed:
            raise IdemdError("idemd: cannot complete a replayed lease")
        if self.completed:
            raise IdemdError("idemd: lease already completed")
        if self.released:
            raise IdemdError("idemd: lease already released")
        self._stop_renewer()
        if not self.protected:
            self.result, self.completed = result, True
            return result
        try:
            resp = self._retrying(
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

    def release(self) -> None:
        """Give the key back so the next Acquire gets it (errors are logged, not raised)."""
        self._stop_renewer()
        if not self.held:
            return
        self.released = True
        try:
            self._client.release(self.namespace, self.key, self.lease_token)
        except Exception as exc:  # noqa: BLE001 - never mask the failure that led here
            log.warning("idemd_client: releasing %s/%s failed: %s", self.namespace, self.key, exc)

    def _stop_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_renewer()
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
            self.release()
            return False
        if (
            not self._complete_failed
            and isinstance(exc, Exception)
            and not self.options.is_retryable(exc)
            and self.options.complete_on_error is not None
        ):
            try:
                error_result = self.options.complete_on_error(exc)
                if error_result is not None:
                    self.complete(error_result)
                    return False
            except Exception as store_exc:  # noqa: BLE001
                log.warning("idemd_client: storing the error result of %s/%s failed: %s",
                            self.namespace, self.key, store_exc)
        self.release()
        return False
