package dev.idemd.client;

import io.opentelemetry.api.trace.Span;
import io.opentelemetry.api.trace.SpanContext;
import io.opentelemetry.api.trace.TraceFlags;
import io.opentelemetry.api.trace.TraceState;
import io.opentelemetry.context.Context;
import io.opentelemetry.context.Scope;
import java.nio.charset.StandardCharsets;

/**
 * One traced call through the Java client, for tests/suite/tracing_otlp.rs: {@code java
 * dev.idemd.client.TracedCall ADDRESS TRACE_ID PARENT_SPAN_ID KEY} makes a remote, sampled span
 * context of the given ids current and runs {@code idempotent} once in namespace {@code traced},
 * then {@code idempotentAsync} once on KEY-async (the protocol then runs on the client's
 * executor). Every Acquire and Complete must reach idemd as a child of that span.
 */
public final class TracedCall {
  private TracedCall() {}

  public static void main(String[] args) throws Exception {
    if (args.length != 4) {
      System.err.println("usage: TracedCall ADDRESS TRACE_ID PARENT_SPAN_ID KEY");
      System.exit(2);
    }
    SpanContext caller =
        SpanContext.createFromRemoteParent(
            args[1], args[2], TraceFlags.getSampled(), TraceState.getDefault());
    try (IdempotencyClient client = IdempotencyClient.create(args[0]);
        Scope scope = Context.root().with(Span.wrap(caller)).makeCurrent()) {
      byte[] fingerprint = "java-fingerprint".getBytes(StandardCharsets.UTF_8);
      IdempotentResult blocking =
          client.idempotent(
              "traced",
              args[3],
              fingerprint,
              context -> StoredResult.of("java".getBytes(StandardCharsets.UTF_8)));
      IdempotentResult async =
          client
              .idempotentAsync(
                  "traced",
                  args[3] + "-async",
                  fingerprint,
                  IdempotentOptions.defaults(),
                  context ->
                      java.util.concurrent.CompletableFuture.completedFuture(
                          StoredResult.of("java".getBytes(StandardCharsets.UTF_8))))
              .get();
      if (blocking.replayed() || async.replayed()) {
        throw new IllegalStateException("a fresh key replayed");
      }
    }
    System.out.println("ok");
  }
}
