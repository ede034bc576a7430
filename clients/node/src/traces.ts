// The caller's OpenTelemetry trace context, as W3C traceparent/tracestate call metadata.
//
// @opentelemetry/api is an optional peer dependency: when the application has it (every traced
// Node service does), each call carries the active span's context and idemd's spans join the
// caller's trace; without it the client sends no trace metadata. It is loaded with require, not
// imported, so a missing package is a caught error here instead of a failed module load, and the
// client's types do not name it.
//
// The W3C header is written here from the active span context rather than through the API's
// global propagator: that propagator is a no-op until an SDK registers one, and W3C trace context
// is the one format idemd reads, whatever propagators the application configured.
import { createRequire } from "node:module";

/** The part of @opentelemetry/api used here. */
interface SpanContext {
  traceId: string;
  spanId: string;
  traceFlags: number;
  traceState?: { serialize(): string };
}
interface OtelApi {
  context: { active(): unknown };
  trace: { getSpanContext(context: unknown): SpanContext | undefined };
  isSpanContextValid(spanContext: SpanContext): boolean;
}

function loadApi(): OtelApi | undefined {
  try {
    return createRequire(import.meta.url)("@opentelemetry/api") as OtelApi;
  } catch {
    return undefined;
  }
}

const api = loadApi();

/** The active span's traceparent (and tracestate, if any); empty without a valid span. */
export function traceMetadata(): [string, string][] {
  if (!api) return [];
  const spanContext = api.trace.getSpanContext(api.context.active());
  if (!spanContext || !api.isSpanContextValid(spanContext)) return [];
  const flags = (spanContext.traceFlags & 0xff).toString(16).padStart(2, "0");
  const pairs: [string, string][] = [["traceparent", `00-${spanContext.traceId}-${spanContext.spanId}-${flags}`]];
  const state = spanContext.traceState?.serialize();
  if (state) pairs.push(["tracestate", state]);
  return pairs;
}
