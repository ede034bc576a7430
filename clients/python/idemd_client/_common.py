"""Types and policy shared by the sync and the asyncio client."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

from google.protobuf import duration_pb2

from ._proto import pb
from .errors import Retryable

log = logging.getLogger("idemd_client")

Seconds = Union[int, float, _dt.timedelta]


@dataclass
class Result:
    """A stored response: what the work returns (or ``bytes``, which means ``Result(body)``)."""

    body: bytes = b""
    code: int = 0
    metadata: Dict[str, str] = field(default_factory=dict)

    def to_pb(self) -> "pb.Result":
        return pb.Result(body=bytes(self.body), code=int(self.code), metadata=dict(self.metadata))

    @classmethod
    def from_pb(cls, msg: "pb.Result") -> "Result":
        return cls(body=bytes(msg.body), code=int(msg.code), metadata=dict(msg.metadata))


@dataclass
class Outcome:
    """What :meth:`Client.idempotent` returns.

    ``replayed`` is True when the key was already completed and ``result`` is the stored result
    (the work did not run). ``protected`` is False only when idemd was unreachable and
    ``fail_open=True`` let the work run without a lease.
    """

    result: Result
    replayed: bool
    protected: bool = True
    fencing_token: Optional[int] = None
    record: Optional[Any] = None  # idempotency.v1.Record when idemd answered with one

    @property
    def body(self) -> bytes:
        return self.result.body

    @property
    def code(self) -> int:
        return self.result.code


@dataclass
class Options:
    """Options of ``idempotent``/``lease``/``idempotent_fn`` (all keyword-only).

    lease_ttl:         lease length asked at Acquire and Renew (default 30 s); renewed every
                       lease_ttl/3 while the work runs.
    retention:         how long idemd keeps the completed record (None: the server default).
    holder:            name shown in Record.holder (default "hostname:pid").
    wait_timeout:      longest single Wait for an in-flight duplicate (default 30 s).
    max_waits:         Wait rounds before giving up with InProgressError (default 10).
    retryable:         ``callable(exc) -> bool``; True marks a failure retryable (Release).
                       Exceptions deriving from :class:`Retryable` always are.
    complete_on_error: ``callable(exc) -> Result | bytes | None`` for non-retryable failures:
                       the returned result is stored with Complete (so retries replay it) and
                       the exception re-raised; None releases instead.
    fail_open:         when idemd is unreachable at Acquire (after the retries), run the work
                       unprotected instead of raising IdemdUnavailable (default False: fail
                       closed). Never when idemd answered: RateLimited, Overloaded, StoreFull and
                       the other refusals are raised (clients/BEHAVIOUR.md).
    max_attempts:      calls of Acquire (and of Complete) in all when idemd is unreachable, rate
                       limited or overloaded (default 4).
    backoff_initial:   before retry n the helper sleeps a random time in
    backoff_max:       [0, min(backoff_max, backoff_initial * 2**(n-1))] ("full jitter";
                       defaults 0.1 s and 2 s).
    """

    lease_ttl: Seconds = 30.0
    retention: Optional[Seconds] = None
    holder: Optional[str] = None
    wait_timeout: Seconds = 30.0
    max_waits: int = 10
    retryable: Optional[Callable[[BaseException], bool]] = None
    complete_on_error: Optional[Callable[[BaseException], Any]] = None
    fail_open: bool = False
    max_attempts: int = 4
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 2.0

    def __post_init__(self) -> None:
        self.lease_ttl = to_seconds(self.lease_ttl)
        if self.lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if self.retention is not None:
            self.retention = to_seconds(self.retention)
        self.wait_timeout = to_seconds(self.wait_timeout)
        if self.wait_timeout <= 0:
            raise ValueError("wait_timeout must be positive")
        if self.max_waits < 0:
            raise ValueError("max_waits must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.backoff_initial = to_seconds(self.backoff_initial)
        self.backoff_max = to_seconds(self.backoff_max)
        if self.backoff_initial < 0 or self.backoff_max < 0:
            raise ValueError("backoffs must be >= 0")

    def backoff(self, retry: int) -> float:
        """The sleep before retry ``retry`` (1 for the first): full jitter, so that a fleet's
        retries spread out instead of hitting a recovering idemd at once."""
        return jitter(min(float(self.backoff_max), float(self.backoff_initial) * 2 ** (retry - 1)))

    @property
    def renew_interval(self) -> float:
        return float(self.lease_ttl) / 3.0

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, Retryable):
            return True
        if self.retryable is not None and isinstance(exc, Exception):
            try:
                return bool(self.retryable(exc))
            except Exception:  # noqa: BLE001 - a broken predicate must not mask the failure
                log.exception("idemd_client: retryable predicate raised; treating failure as not retryable")
        return False


def jitter(ceiling: float) -> float:
    """A uniformly random time in [0, ceiling]."""
    return random.uniform(0.0, max(0.0, ceiling))


def to_seconds(value: Seconds) -> float:
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    return float(value)


def duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def duration_seconds(msg: duration_pb2.Duration) -> float:
    return msg.seconds + msg.nanos / 1e9


def timestamp_datetime(ts) -> Optional[_dt.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=_dt.timezone.utc)


def default_holder() -> str:
    holder = f"{socket.gethostname()}:{os.getpid()}"
    raw = holder.encode("utf-8")[:128]
    return raw.decode("utf-8", errors="ignore")


def normalize_result(value: Any) -> Result:
    if isinstance(value, Result):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Result(body=bytes(value))
    raise TypeError(
        f"idempotent work must return bytes or idemd_client.Result, not {type(value).__name__}"
    )


class LeaseBase:
    """State of one helper run; passed to the work as ``ctx`` and yielded by ``lease()``.

    ``fencing_token`` / ``lease_token``: the lease's tokens (None when replayed or unprotected).
    ``replayed``: the key was already completed; ``result`` holds the stored result.
    ``protected``: False only for a fail-open run without idemd.
    ``lost``: set when a renewal found the lease taken over (the work should stop if it can).
    """

    def __init__(self, namespace: str, key: str, fingerprint: bytes, options: Options) -> None:
        self.namespace = namespace
        self.key = key
        self.fingerprint = fingerprint
        self.options = options
        self.fencing_token: Optional[int] = None
        self.lease_token: Optional[str] = None
        self.expires_at: Optional[_dt.datetime] = None
        self.replayed = False
        self.protected = True
        self.result: Optional[Result] = None
        self.record = None
        self.completed = False
        self.released = False
        self.lost_error: Optional[BaseException] = None
        self._complete_failed = False

    @property
    def lost(self) -> bool:
        return self.lost_error is not None

    @property
    def held(self) -> bool:
        """True while this caller holds an unfinished lease."""
        return (
            self.protected
            and not self.replayed
            and self.lease_token is not None
            and not self.completed
            and not self.released
        )

    def _set_acquired(self, resp) -> None:
        self.lease_token = resp.lease.token
        self.fencing_token = int(resp.lease.fencing_token)
        self.expires_at = timestamp_datetime(resp.lease.expires_at)
        self.record = resp.record if resp.HasField("record") else None

    def _set_replayed(self, record) -> None:
        self.replayed = True
        self.record = record
        self.fencing_token = int(record.fencing_token) if record is not None else None
        self.result = Result.from_pb(record.result) if record is not None else Result()

    def _set_unprotected(self) -> None:
        self.protected = False

    def outcome(self) -> Outcome:
        return Outcome(
            result=self.result if self.result is not None else Result(),
            replayed=self.replayed,
            protected=self.protected,
            fencing_token=self.fencing_token,
            record=self.record,
        )

    def __repr__(self) -> str:
        state = (
            "replayed" if self.replayed else "unprotected" if not self.protected
            else "completed" if self.completed else "released" if self.released else "held"
        )
        return f"<{type(self).__name__} {self.namespace}/{self.key} {state} fencing_token={self.fencing_token}>"


def wait_timeout_for(retry_after_s: Optional[float], options: Options) -> float:
    """min(remaining retry_after, wait_timeout), never 0 (0 would mean the server default)."""
    timeout = float(options.wait_timeout)
    if retry_after_s is not None:
        timeout = min(timeout, retry_after_s)
    return max(timeout, 0.001)
