"""The trace metadata a call carries (no server needed: what goes on the wire is checked by
tests/suite/tracing_otlp.rs, the_python_client_carries_the_callers_context)."""
from __future__ import annotations

import asyncio

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from idemd_client._traces import call_metadata

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
AUTH = (("authorization", "Bearer t"),)


def _span(state: TraceState = TraceState()) -> context.Context:
    span_context = SpanContext(TRACE, SPAN, is_remote=True, trace_flags=TraceFlags(1), trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def test_no_current_span_sends_only_the_base():
    assert call_metadata(AUTH) == AUTH
    assert call_metadata(()) == ()


def test_the_current_span_becomes_traceparent_and_tracestate():
    token = context.attach(_span(TraceState([("congo", "t61rcWkgMzE")])))
    try:
        assert call_metadata(AUTH) == AUTH + (
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
        )
    finally:
        context.detach(token)
    assert call_metadata(AUTH) == AUTH


def test_each_task_sends_its_own_context():
    async def in_task(ctx):
        token = context.attach(ctx)
        try:
            await asyncio.sleep(0)  # let the other task run in between
            return dict(call_metadata(()))
        finally:
            context.detach(token)

    async def both():
        return await asyncio.gather(in_task(_span()), in_task(context.Context()))

    traced, untraced = asyncio.run(both())
    assert traced["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert untraced == {}
