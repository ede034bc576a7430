// One traced call through the Node client, for tests/suite/tracing_otlp.rs:
//
//   node traced-call.js ADDRESS TRACE_ID PARENT_SPAN_ID KEY
//
// makes a remote, sampled span context of the given ids the active OpenTelemetry context and runs
// `idempotent` once in namespace "traced": its Acquire and Complete must reach idemd as children
// of that span. An SDK would register the context manager; this program registers a small one of
// its own on AsyncLocalStorage, which is what the SDK's does.
import { AsyncLocalStorage } from "node:async_hooks";
import { ROOT_CONTEXT, TraceFlags, context, trace, type Context, type ContextManager } from "@opentelemetry/api";
import { IdempotencyClient } from "../src/index.js";

class AsyncLocalContextManager implements ContextManager {
  private readonly storage = new AsyncLocalStorage<Context>();
  active(): Context {
    return this.storage.getStore() ?? ROOT_CONTEXT;
  }
  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(
    ctx: Context,
    fn: F,
    thisArg?: ThisParameterType<F>,
    ...args: A
  ): ReturnType<F> {
    return this.storage.run(ctx, () => fn.call(thisArg, ...args));
  }
  bind<T>(_ctx: Context, target: T): T {
    return target;
  }
  enable(): this {
    return this;
  }
  disable(): this {
    this.storage.disable();
    return this;
  }
}

async function main(): Promise<void> {
  const [address, traceId, spanId, key] = process.argv.slice(2);
  if (!address || !traceId || !spanId || !key) {
    throw new Error("usage: traced-call ADDRESS TRACE_ID PARENT_SPAN_ID KEY");
  }
  if (!context.setGlobalContextManager(new AsyncLocalContextManager())) {
    throw new Error("could not register the context manager");
  }
  const caller = trace.setSpanContext(ROOT_CONTEXT, { traceId, spanId, traceFlags: TraceFlags.SAMPLED, isRemote: true });
  const client = new IdempotencyClient(address);
  try {
    const outcome = await context.with(caller, () =>
      client.idempotent("traced", key, Buffer.from("node-fingerprint"), () => Buffer.from("node")),
    );
    if (outcome.replayed) throw new Error("a fresh key replayed");
  } finally {
    client.close();
  }
  console.log("ok");
}

main().catch((error: unknown) => {
  console.error("traced-call:", error);
  process.exit(1);
});
