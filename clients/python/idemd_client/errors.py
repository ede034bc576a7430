"""Exceptions raised by idemd_client."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import grpc

__all__ = [
    "IdemdError",
    "IdemdUnavailable",
    "RateLimited",
    "Overloaded",
    "StoreFull",
    "Unauthenticated",
    "PermissionDenied",
    "IdemdInternal",
    "LeaseLost",
    "FingerprintMismatch",
    "LeaseNotHeld",
    "RecordCompleted",
    "RecordNotFound",
    "InvalidRequest",
    "InProgressError",
    "Retryable",
    "NotCanonicalizable",
    "error_from_rpc",
]


class IdemdError(Exception):
    """An error answered by (or on the way to) idemd.

    ``code`` is the gRPC status code, ``reason`` the ``google.rpc.ErrorInfo`` reason (domain
    "idemd") when the server sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        reason: Optional[str] = None,
        domain: Optional[str] = None,
        metadata: Optional[Dict[str, str]] = None,
        field_violations: Optional[List[Tuple[str, str]]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations or [])


class IdemdUnavailable(IdemdError):
    """idemd (or its store) could not be reached: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED by the
    server, or a connection that failed or broke, after the helper's retries. The helper fails closed with this unless
    ``fail_open=True``; it is the only error fail-open applies to."""


class RateLimited(IdemdError):
    """RESOURCE_EXHAUSTED ``CALLER_LIMITED``: this caller is over its own limit (after the
    helper's retries). Not an :class:`IdemdUnavailable`: fail-open never applies to it."""


class Overloaded(IdemdError):
    """RESOURCE_EXHAUSTED ``OVERLOADED`` (or ``TOO_MANY_WAITERS``, or no reason): idemd is at its
    limit and asks callers to back off (after the helper's retries). Fail-open never applies."""


class StoreFull(IdemdError):
    """RESOURCE_EXHAUSTED ``STORE_FULL``: new keys are refused until records expire. Not retried;
    fail-open never applies."""


class Unauthenticated(IdemdError):
    """UNAUTHENTICATED: missing or unknown credentials."""


class PermissionDenied(IdemdError):
    """PERMISSION_DENIED: the policy does not grant this caller the RPC in this namespace."""


class IdemdInternal(IdemdError):
    """INTERNAL: a bug or an unexpected database answer in idemd (see its logs)."""


class LeaseLost(IdemdError):
    """The helper's Complete found the lease gone (LEASE_NOT_HELD, RECORD_NOT_FOUND or
    RECORD_COMPLETED): the work ran, its result was not stored, and another caller may run it."""


class FingerprintMismatch(IdemdError):
    """The key exists with a different request fingerprint (FINGERPRINT_MISMATCH)."""


class LeaseNotHeld(IdemdError):
    """The lease token is not the key's current lease: taken over, released, or never issued."""


class RecordCompleted(IdemdError):
    """Release or Renew on a record that is already completed (RECORD_COMPLETED)."""


class RecordNotFound(IdemdError):
    """No live record for (namespace, key) (RECORD_NOT_FOUND)."""


class InvalidRequest(IdemdError):
    """A request field broke a rule (INVALID_REQUEST); see ``field_violations``."""


class InProgressError(IdemdError):
    """Another caller still holds the key after ``max_waits`` rounds of waiting. ``retry_after``
    is the last Acquire's ``retry_after`` in seconds (None when idemd sent none): when the
    holder's lease ends if it is not renewed."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class NotCanonicalizable(ValueError):
    """A request that has no RFC 8785 canonical JSON, so no fingerprint: an integer beyond
    ±(2^53-1) (pass it as a string), a NaN or infinite float, a key that is not a string, or a
    type JSON cannot represent. Raised by ``canonical_json``/``fingerprint`` before any RPC."""


class Retryable(Exception):
    """Raise (or subclass) this from the work to mark a failure retryable: the helper releases
    the key, so the next attempt runs the work again, and re-raises."""


_BY_REASON = {
    "FINGERPRINT_MISMATCH": FingerprintMismatch,
    "LEASE_NOT_HELD": LeaseNotHeld,
    "RECORD_COMPLETED": RecordCompleted,
    "RECORD_NOT_FOUND": RecordNotFound,
    "INVALID_REQUEST": InvalidRequest,
    "STORE_UNAVAILABLE": IdemdUnavailable,
    "DEADLINE_EXCEEDED": IdemdUnavailable,
    "OVERLOADED": Overloaded,
    "TOO_MANY_WAITERS": Overloaded,
    "CALLER_LIMITED": RateLimited,
    "STORE_FULL": StoreFull,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "INTERNAL": IdemdInternal,
}

# Without an ErrorInfo (a proxy's answer, or the transport's own).
_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: IdemdUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: IdemdUnavailable,
    # The helper never cancels its own calls: a CANCELLED is the other side giving up (tonic
    # answers CANCELLED "Timeout expired" when the call's grpc-timeout passes first).
    grpc.StatusCode.CANCELLED: IdemdUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: IdemdInternal,
    grpc.StatusCode.NOT_FOUND: RecordNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
}

#: What the helper retries (with backoff and jitter, within its budget) at Acquire and Complete.
RETRIED = (IdemdUnavailable, RateLimited, Overloaded)


def lease_lost(err: IdemdError, namespace: str, key: str) -> LeaseLost:
    """The helper's error for a Complete refused because the lease is gone."""
    exc = LeaseLost(
        f"idemd: the lease on {namespace}/{key} was lost before Complete; the work ran but its "
        f"result was not stored: {err.message}",
        code=err.code,
        reason=err.reason,
        domain=err.domain,
        metadata=err.metadata,
    )
    exc.__cause__ = err
    return exc


def error_from_rpc(err: grpc.RpcError, method: str = "") -> IdemdError:
    """Translate a grpc.RpcError (sync or aio) into the matching IdemdError subclass."""
    from ._proto import parse_status_details

    code = None
    details = ""
    trailing = None
    try:
        code = err.code()
        details = err.details() or ""
        trailing = err.trailing_metadata()
    except Exception:  # noqa: BLE001 - not a grpc.Call (should not happen)
        details = str(err)
    info = parse_status_details(trailing)
    cls = None
    if info.domain in (None, "idemd") and info.reason:
        cls = _BY_REASON.get(info.reason)
    if cls is None:
        cls = _BY_CODE.get(code, IdemdError)
    name = code.name if code is not None else "UNKNOWN"
    prefix = f"idemd {method}: " if method else "idemd: "
    msg = f"{prefix}{name}" + (f" {info.reason}" if info.reason else "") + (f": {details}" if details else "")
    exc = cls(
        msg,
        code=code,
        reason=info.reason,
        domain=info.domain,
        metadata=info.metadata,
        field_violations=info.field_violations,
    )
    exc.__cause__ = err
    return exc
