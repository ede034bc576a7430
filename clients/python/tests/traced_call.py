"""One traced call through the Python client, for tests/suite/tracing_otlp.rs.

    python3 traced_call.py ADDRESS TRACE_ID PARENT_SPAN_ID KEY

makes a remote span context of the given ids (sampled) the current OpenTelemetry context, and
runs ``Client.idempotent`` (``AsyncClient.idempotent`` when the environment has
IDEMD_TRACED_CALL_PYTHON=asyncio) once in namespace
``traced``: its Acquire and Complete must reach idemd as children of that span.
"""
from __future__ import annotations

import asyncio
import os
import sys

from opentelemetry import context, trace

from idemd_client import AsyncClient, Client


def caller_context(trace_id: str, span_id: str) -> context.Context:
    span = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    )
    return trace.set_span_in_context(span)


async def run_async(address: str, key: str) -> None:
    async with AsyncClient(address) as client:
        outcome = await client.idempotent("traced", key, b"python-fingerprint", lambda _lease: b"python")
    assert not outcome.replayed


def main(argv: list) -> int:
    address, trace_id, span_id, key = argv[1:5]
    flavour = os.environ.get("IDEMD_TRACED_CALL_PYTHON", "sync")
    token = context.attach(caller_context(trace_id, span_id))
    try:
        if flavour == "asyncio":
            asyncio.run(run_async(address, key))
        else:
            with Client(address) as client:
                outcome = client.idempotent("traced", key, b"python-fingerprint", lambda _lease: b"python")
            assert not outcome.replayed
    finally:
        context.detach(token)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
