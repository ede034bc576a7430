"""The caller's OpenTelemetry trace context, as W3C ``traceparent``/``tracestate`` call metadata.

OpenTelemetry is optional (the ``otel`` extra): without ``opentelemetry-api`` installed the
client sends no trace metadata and costs nothing more. The W3C propagator is used directly, not
the globally configured one, because W3C trace context is what idemd reads: a service whose
global propagator is B3 (or none) still gets its trace continued into idemd.
"""
from __future__ import annotations

from typing import Dict, Tuple

try:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed: no trace context to send
    _PROPAGATOR = None
else:
    _PROPAGATOR = TraceContextTextMapPropagator()

Metadata = Tuple[Tuple[str, str], ...]


def trace_metadata() -> Metadata:
    """The current context's ``traceparent``/``tracestate`` pairs; empty when there is no valid span."""
    if _PROPAGATOR is None:
        return ()
    carrier: Dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


def call_metadata(base: Metadata) -> Metadata:
    """``base`` (the authorization header) plus the caller's trace context, built per call."""
    return base + trace_metadata()
