"""Python client for idemd, the idempotency authority.

    from idemd_client import Client, Result, Retryable

    client = Client("idemd:50051", token=os.environ.get("IDEMD_TOKEN"))
    outcome = client.idempotent("payments", "order-4711", request, lambda ctx: charge(request))
    outcome.result.body, outcome.replayed
"""
from __future__ import annotations

from .errors import (
    FingerprintMismatch,
    IdemdError,
    IdemdInternal,
    IdemdUnavailable,
    InProgressError,
    InvalidRequest,
    LeaseLost,
    LeaseNotHeld,
    NotCanonicalizable,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RecordCompleted,
    RecordNotFound,
    Retryable,
    StoreFull,
    Unauthenticated,
)
from .fingerprint import canonical_json, fingerprint

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "Client",
    "FingerprintMismatch",
    "IdemdError",
    "IdemdInternal",
    "IdemdUnavailable",
    "InProgressError",
    "InvalidRequest",
    "Lease",
    "LeaseLost",
    "LeaseNotHeld",
    "NotCanonicalizable",
    "Options",
    "Outcome",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "RecordCompleted",
    "RecordNotFound",
    "Result",
    "Retryable",
    "StoreFull",
    "Unauthenticated",
    "canonical_json",
    "fingerprint",
    "pb",
]

from ._common import Options, Outcome, Result
from ._proto import pb
from .aio import AsyncClient, AsyncLease
from .client import Client, Lease
