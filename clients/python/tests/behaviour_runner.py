"""The Python runner of the client behaviour suite (clients/BEHAVIOUR.md).

    python3 behaviour_runner.py ADDRESS CASES_FILE CASE_NAME

runs the sync ``Client.idempotent`` helper (``AsyncClient.idempotent`` when the environment has
IDEMD_BEHAVIOUR_PYTHON=asyncio) once against the fake idemd at ADDRESS with the case's
options and work, and prints one line of JSON: error (a kind of BEHAVIOUR.md, or null), work_runs,
body, replayed, protected. tests/suite/behaviour.rs runs it for every case.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

import idemd_client
from idemd_client import AsyncClient, Client, Options, Result, Retryable

# Most specific first: a subclass must be matched before its base.
KINDS = [
    ("FingerprintMismatch", "fingerprint_mismatch"),
    ("RateLimited", "rate_limited"),
    ("Overloaded", "overloaded"),
    ("StoreFull", "store_full"),
    ("Unauthenticated", "unauthenticated"),
    ("PermissionDenied", "permission_denied"),
    ("InvalidRequest", "invalid_request"),
    ("LeaseLost", "lease_lost"),
    ("InProgressError", "in_progress"),
    ("IdemdInternal", "internal"),
    ("IdemdUnavailable", "unavailable"),
    ("IdemdError", "rpc_error"),
]


class WorkFailed(Exception):
    """The case's work failing terminally."""


class WorkRetryable(Retryable):
    """The case's work failing retryably."""


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, (WorkFailed, WorkRetryable)):
        return "work_failed"
    for name, kind in KINDS:
        cls = getattr(idemd_client, name, None)
        if cls is not None and isinstance(exc, cls):
            return kind
    return f"unmapped: {type(exc).__name__}: {exc}"


def main(argv: list) -> int:
    address, cases_path, name = argv[1:4]
    with open(cases_path, encoding="utf-8") as f:
        doc = json.load(f)
    case = next(c for c in doc["cases"] if c["name"] == name)
    opts = {**doc["defaults"], **case.get("options", {})}
    work_spec = case.get("work", doc["default_work"])
    runs = 0

    def work(ctx):
        nonlocal runs
        runs += 1
        if "returns" in work_spec:
            return work_spec["returns"].encode("utf-8")
        if work_spec.get("fails") == "retryable":
            raise WorkRetryable("retryable")
        raise WorkFailed("terminal")

    store = work_spec.get("store")
    helper_options = dict(
        fail_open=opts["fail_open"],
        lease_ttl=opts["lease_ttl_ms"] / 1000,
        wait_timeout=opts["wait_timeout_ms"] / 1000,
        max_waits=opts["max_waits"],
        complete_on_error=(lambda exc: Result(body=store.encode("utf-8"))) if store is not None else None,
    )
    retry_options = dict(
        max_attempts=opts["max_attempts"],
        backoff_initial=opts["backoff_initial_ms"] / 1000,
        backoff_max=opts["backoff_max_ms"] / 1000,
    )
    known = {field.name for field in dataclasses.fields(Options)}
    helper_options.update({k: v for k, v in retry_options.items() if k in known})
    try:
        rpc_timeout = opts["rpc_timeout_ms"] / 1000
        if os.environ.get("IDEMD_BEHAVIOUR_PYTHON") == "asyncio":

            async def run_async():
                async with AsyncClient(address, rpc_timeout=rpc_timeout) as client:
                    return await client.idempotent(
                        "behaviour", name, b"behaviour-fingerprint", work, **helper_options
                    )

            outcome = asyncio.run(run_async())
        else:
            with Client(address, rpc_timeout=rpc_timeout) as client:
                outcome = client.idempotent("behaviour", name, b"behaviour-fingerprint", work, **helper_options)
        line = {
            "error": None,
            "work_runs": runs,
            "body": outcome.result.body.decode("utf-8", "replace"),
            "replayed": outcome.replayed,
            "protected": outcome.protected,
        }
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
        line = {
            "error": kind_of(exc),
            "work_runs": runs,
            "body": None,
            "replayed": None,
            "protected": None,
            "detail": f"{type(exc).__name__}: {exc}",
        }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
