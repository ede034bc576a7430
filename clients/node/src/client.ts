import { existsSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import {
  FingerprintMismatchError,
  IdemdError,
  InProgressError,
  LeaseLostError,
  RetryableError,
  fromServiceError,
  isRetried,
  isUnavailable,
} from "./errors.js";
import { fingerprint } from "./fingerprint.js";
import { traceMetadata } from "./traces.js";

// ---------------------------------------------------------------------------------------------
// Wire types, as @grpc/proto-loader presents them with the options below: camelCase field names,
// enums as their names, bytes as Buffer, and 64-bit integers as decimal strings (so uint64 fencing
// tokens never lose precision). The high-level API turns fencing tokens into `bigint`.
// ---------------------------------------------------------------------------------------------

/** google.protobuf.Duration / Timestamp on the wire (`seconds` is a decimal string when read). */
export interface Duration {
  seconds: string | number;
  nanos: number;
}
export type Timestamp = Duration;

export type Outcome = "OUTCOME_UNSPECIFIED" | "OUTCOME_ACQUIRED" | "OUTCOME_IN_PROGRESS" | "OUTCOME_COMPLETED";
export type RecordState = "RECORD_STATE_UNSPECIFIED" | "RECORD_STATE_IN_PROGRESS" | "RECORD_STATE_COMPLETED";
export type WaitOutcome = "WAIT_OUTCOME_UNSPECIFIED" | "WAIT_OUTCOME_COMPLETED" | "WAIT_OUTCOME_FREE" | "WAIT_OUTCOME_TIMED_OUT";

/** idempotency.v1.Result as read from idemd. */
export interface StoredResult {
  body: Buffer;
  code: number;
  metadata: Record<string, string>;
}

export interface Lease {
  token: string;
  /** uint64, as a decimal string. */
  fencingToken: string;
  expiresAt: Timestamp | null;
}

export interface IdemRecord {
  namespace: string;
  key: string;
  state: RecordState;
  fingerprint: Buffer;
  result: StoredResult | null;
  /** uint64, as a decimal string. */
  fencingToken: string;
  attempts: number;
  holder: string;
  createdAt: Timestamp | null;
  leaseExpiresAt: Timestamp | null;
  completedAt: Timestamp | null;
  expiresAt: Timestamp | null;
}

export interface AcquireRequest {
  namespace: string;
  key: string;
  fingerprint?: Uint8Array;
  leaseTtl?: Duration;
  retention?: Duration;
  holder?: string;
}
export interface AcquireResponse {
  outcome: Outcome;
  lease: Lease | null;
  record: IdemRecord | null;
  retryAfter: Duration | null;
}
export interface ResultMessage {
  body?: Uint8Array;
  code?: number;
  metadata?: Record<string, string>;
}
export interface CompleteRequest {
  namespace: string;
  key: string;
  leaseToken: string;
  result: ResultMessage;
  retention?: Duration;
}
export interface CompleteResponse {
  record: IdemRecord | null;
}
export interface ReleaseRequest {
  namespace: string;
  key: string;
  leaseToken: string;
}
export interface RenewRequest {
  namespace: string;
  key: string;
  leaseToken: string;
  leaseTtl?: Duration;
}
export interface RenewResponse {
  lease: Lease | null;
}
export interface GetRequest {
  namespace: string;
  key: string;
}
export interface GetResponse {
  record: IdemRecord | null;
}
export interface WaitRequest {
  namespace: string;
  key: string;
  timeout?: Duration;
}
export interface WaitResponse {
  outcome: WaitOutcome;
  record: IdemRecord | null;
}

// ---------------------------------------------------------------------------------------------
// High-level API types
// ---------------------------------------------------------------------------------------------

export type Bytes = Buffer | Uint8Array | string;

/** What `work` may return: raw bytes / a string (UTF-8), or a full result with a status code and metadata. */
export type ResultInput = Bytes | { body?: Bytes; code?: number; metadata?: Record<string, string> };

export interface WorkContext {
  namespace: string;
  key: string;
  /** Monotonic fencing token of the lease (uint64 as bigint); pass it to downstream systems. 0n when run unprotected (failOpen). */
  fencingToken: bigint;
  /** Secret token of the lease; "" when run unprotected (failOpen). */
  leaseToken: string;
  /** False only when idemd was unreachable and `failOpen` ran the work anyway. */
  protected: boolean;
  /** Aborted (with a LeaseLostError) if a Renew finds that the lease was taken over. */
  signal: AbortSignal;
}

export interface IdempotentOptions {
  /** Lease length asked for at Acquire and each Renew. Default 30000. The lease is renewed every leaseTtlMs/3. */
  leaseTtlMs?: number;
  /** How long idemd keeps the completed record. Default: the server's default (24 h unless configured). */
  retentionMs?: number;
  /** Shown in Record.holder. Default `${hostname}:${pid}`. */
  holder?: string;
  /** Longest single Wait on an in-flight duplicate (each Wait lasts min(retry_after, this)). Default 30000. */
  waitTimeoutMs?: number;
  /** Most Wait rounds on an in-flight duplicate before InProgressError. Default 10. */
  maxWaits?: number;
  /** Marks a failure of `work` as retryable (the key is released). `RetryableError` is always retryable. */
  isRetryable?: (err: unknown) => boolean;
  /** For a non-retryable failure: the result to store (so retries replay it) before rethrowing. Default: release instead. */
  completeOnError?: (err: unknown) => ResultInput | Promise<ResultInput>;
  /**
   * When idemd is unreachable (after the retries), run the work unprotected instead of throwing IdemdUnavailableError. Default false.
   * Never when idemd answered: RateLimitedError, OverloadedError, StoreFullError and the other refusals are thrown (clients/BEHAVIOUR.md).
   */
  failOpen?: boolean;
  /** Calls of Acquire (and of Complete) in all when idemd is unreachable, rate limited or overloaded. Default 4. */
  maxAttempts?: number;
  /** Before retry n the helper sleeps a random time in [0, min(backoffMaxMs, backoffInitialMs * 2^(n-1))] ("full jitter"). Default 100. */
  backoffInitialMs?: number;
  /** See backoffInitialMs. Default 2000. */
  backoffMaxMs?: number;
}

export interface IdempotentResult {
  /** The stored (or, unprotected, the produced) result. */
  result: StoredResult;
  /** True when the result was stored by an earlier call and `work` did not run. */
  replayed: boolean;
  /** False only when `failOpen` ran the work without idemd. */
  protected: boolean;
}

/** Per-call options of the low-level methods. */
export interface CallOptions {
  /** This call's deadline, instead of the client's `rpcTimeoutMs`. */
  timeoutMs?: number;
}

/** A lease kept alive in the background (`IdempotencyClient.keepLease`). */
export interface LeaseKeeper {
  /** Aborted, with a LeaseLostError as its reason, when a Renew finds that the lease was taken over. */
  readonly signal: AbortSignal;
  /** Stops renewing. */
  stop(): void;
}

export interface ClientOptions {
  /** Bearer token sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Channel credentials. Default: plaintext (`grpc.credentials.createInsecure()`). */
  credentials?: grpc.ChannelCredentials;
  /** Extra grpc-js channel options. */
  channelOptions?: grpc.ChannelOptions;
  /** Deadline of each Acquire, Complete, Release, Renew and Get (a Wait's is its timeout plus this). Default 10000 ms. */
  rpcTimeoutMs?: number;
  /** Path of idempotency/v1/idempotency.proto, in a tree that also holds google/api/{annotations,http}.proto (its imports). Default: env IDEMD_PROTO_PATH, then `proto/` in the package, then the repository's `proto/`. */
  protoPath?: string;
}

// ---------------------------------------------------------------------------------------------

const PROTO_LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: String,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
};

function defaultProtoPath(): string {
  if (process.env.IDEMD_PROTO_PATH) return process.env.IDEMD_PROTO_PATH;
  const rel = "idempotency/v1/idempotency.proto";
  // This file is dist/src/client.js: the package root is two levels up.
  const candidates = [
    fileURLToPath(new URL(`../../proto/${rel}`, import.meta.url)), // a copy shipped inside the package
    fileURLToPath(new URL(`../../../../proto/${rel}`, import.meta.url)), // the repository's proto/ (clients/node/../../proto)
  ];
  return candidates.find((p) => existsSync(p)) ?? candidates[candidates.length - 1]!;
}

type ServiceCtor = grpc.ServiceClientConstructor;
const serviceCache = new Map<string, ServiceCtor>();

function loadService(protoPath: string): ServiceCtor {
  let ctor = serviceCache.get(protoPath);
  if (!ctor) {
    // The proto imports google/api/annotations.proto (its HTTP routes) from the root it lives
    // under, `<root>/idempotency/v1/idempotency.proto`: proto-loader resolves imports against
    // includeDirs only (protobufjs alone would look next to the importing file).
    const absolute = resolve(protoPath);
    const root = resolve(dirname(absolute), "..", "..");
    const def = protoLoader.loadSync(absolute, { ...PROTO_LOADER_OPTIONS, includeDirs: [root] });
    const pkg = grpc.loadPackageDefinition(def) as any;
    ctor = pkg.idempotency.v1.IdempotencyService as ServiceCtor;
    serviceCache.set(protoPath, ctor);
  }
  return ctor;
}

export function durationFromMs(ms: number): Duration {
  const whole = Math.max(0, Math.round(ms * 1e6)); // nanoseconds
  return { seconds: Math.floor(whole / 1e9), nanos: whole % 1e9 };
}

export function durationToMs(d: Duration | null | undefined): number | undefined {
  if (!d) return undefined;
  return Number(d.seconds) * 1000 + d.nanos / 1e6;
}

function toBuffer(b: Bytes | undefined): Buffer {
  if (b === undefined) return Buffer.alloc(0);
  if (typeof b === "string") return Buffer.from(b, "utf8");
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** Normalizes what `work` returned into an idempotency.v1.Result. */
export function toResult(r: ResultInput): StoredResult {
  if (typeof r === "string" || r instanceof Uint8Array) return { body: toBuffer(r), code: 0, metadata: {} };
  if (r === null || typeof r !== "object") {
    throw new TypeError("work must return a Buffer, Uint8Array, string or { body, code?, metadata? }");
  }
  return { body: toBuffer(r.body), code: r.code ?? 0, metadata: { ...(r.metadata ?? {}) } };
}

function storedResult(r: StoredResult | null | undefined): StoredResult {
  return { body: r?.body ?? Buffer.alloc(0), code: r?.code ?? 0, metadata: r?.metadata ?? {} };
}

/** `hostname:pid`, without control characters, at most 128 bytes: the holder idemd shows for this process's leases. */
export function defaultHolder(): string {
  const h = `${hostname()}:${process.pid}`.replace(/[\u0000-\u001f\u007f-\u009f]/g, "");
  return Buffer.byteLength(h) <= 128 ? h : Buffer.from(h).subarray(0, 128).toString("utf8").replace(/\uFFFD$/, "");
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A uniformly random time in [0, ceilingMs]: retries of a fleet spread out instead of hitting a recovering idemd at once. */
const jitter = (ceilingMs: number) => Math.random() * Math.max(0, ceilingMs);

interface RetryPolicy {
  maxAttempts: number;
  backoffInitialMs: number;
  backoffMaxMs: number;
}

function retryPolicy(options: IdempotentOptions): RetryPolicy {
  const maxAttempts = options.maxAttempts ?? 4;
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1) throw new RangeError("maxAttempts must be an integer >= 1");
  return { maxAttempts, backoffInitialMs: options.backoffInitialMs ?? 100, backoffMaxMs: options.backoffMaxMs ?? 2000 };
}

/** `call()` until it succeeds, fails for good, or `maxAttempts` calls were made; retried: unreachable, rate limited, overloaded. */
async function retrying<T>(policy: RetryPolicy, call: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (attempt >= policy.maxAttempts || !isRetried(err)) throw err;
      await sleep(jitter(Math.min(policy.backoffMaxMs, policy.backoffInitialMs * 2 ** (attempt - 1))));
    }
  }
}

/** Client of idemd's idempotency.v1.IdempotencyService. */
export class IdempotencyClient {
  private readonly stub: grpc.Client & Record<string, Function>;
  private readonly token?: string;
  private readonly rpcTimeoutMs: number;

  constructor(target: string, options: ClientOptions = {}) {
    const Service = loadService(options.protoPath ?? defaultProtoPath());
    this.stub = new Service(target, options.credentials ?? grpc.credentials.createInsecure(), options.channelOptions) as any;
    this.token = options.token;
    this.rpcTimeoutMs = options.rpcTimeoutMs ?? 10_000;
  }

  /** Closes the channel. */
  close(): void {
    this.stub.close();
  }

  private unary<Req, Res>(method: string, req: Req, timeoutMs: number): Promise<Res> {
    return new Promise((resolve, reject) => {
      const md = new grpc.Metadata();
      if (this.token) md.set("authorization", `Bearer ${this.token}`);
      for (const [name, value] of traceMetadata()) md.set(name, value);
      this.stub[method]!(req, md, { deadline: new Date(Date.now() + timeoutMs) }, (err: grpc.ServiceError | null, res: Res) =>
        err ? reject(fromServiceError(err)) : resolve(res),
      );
    });
  }

  // Low-level RPCs: errors are IdemdError (IdemdUnavailableError for UNAVAILABLE / DEADLINE_EXCEEDED).

  // `call.timeoutMs` replaces the client's `rpcTimeoutMs` for one call.

  acquire(req: AcquireRequest, call: CallOptions = {}): Promise<AcquireResponse> {
    return this.unary("Acquire", req, call.timeoutMs ?? this.rpcTimeoutMs);
  }
  complete(req: CompleteRequest, call: CallOptions = {}): Promise<CompleteResponse> {
    return this.unary("Complete", req, call.timeoutMs ?? this.rpcTimeoutMs);
  }
  release(req: ReleaseRequest, call: CallOptions = {}): Promise<{}> {
    return this.unary("Release", req, call.timeoutMs ?? this.rpcTimeoutMs);
  }
  renew(req: RenewRequest, call: CallOptions = {}): Promise<RenewResponse> {
    return this.unary("Renew", req, call.timeoutMs ?? this.rpcTimeoutMs);
  }
  get(req: GetRequest, call: CallOptions = {}): Promise<GetResponse> {
    return this.unary("Get", req, call.timeoutMs ?? this.rpcTimeoutMs);
  }
  /** Wait; the call's deadline is the wait timeout plus the RPC timeout (or `call.timeoutMs`). */
  wait(req: WaitRequest, call: CallOptions = {}): Promise<WaitResponse> {
    const t = durationToMs(req.timeout) || 30_000;
    return this.unary("Wait", req, t + (call.timeoutMs ?? this.rpcTimeoutMs));
  }

  /**
   * Renews the lease every `everyMs` (default `leaseTtlMs/3`) until `stop()`, asking for `leaseTtlMs` (undefined:
   * idemd's default); transient failures are tried again at the next tick. `signal` is aborted (with a LeaseLostError) when a Renew finds the lease gone. `idempotent()`
   * keeps its leases with this; so does the HTTP middleware (`@idemd/client/http`).
   */
  keepLease(namespace: string, key: string, leaseToken: string, leaseTtlMs: number | undefined, everyMs?: number): LeaseKeeper {
    const every = everyMs ?? Math.floor((leaseTtlMs ?? 30_000) / 3);
    const leaseTtl = leaseTtlMs === undefined ? undefined : durationFromMs(leaseTtlMs);
    const abort = new AbortController();
    let renewing = false;
    const timer = setInterval(async () => {
      if (renewing || abort.signal.aborted) return;
      renewing = true;
      try {
        await this.renew({ namespace, key, leaseToken, leaseTtl });
      } catch (err) {
        // Transient failures: try again at the next tick. Anything else means the lease is gone.
        if (!isRetried(err)) {
          const e = err as IdemdError;
          abort.abort(new LeaseLostError(`lease on ${namespace}/${key} lost: ${e.message}`, e.code ?? grpc.status.UNKNOWN, e.reason ?? "LEASE_NOT_HELD", { cause: err }));
          clearInterval(timer);
        }
      } finally {
        renewing = false;
      }
    }, Math.max(1, every));
    return { signal: abort.signal, stop: () => clearInterval(timer) };
  }

  /**
   * Runs `work` at most once per (namespace, key):
   * ACQUIRED → work under a renewed lease, then Complete; IN_PROGRESS → Wait, then replay or re-Acquire;
   * COMPLETED → replay the stored result without running work.
   *
   * `requestOrFingerprint`: a Buffer/Uint8Array is used as the fingerprint as is (at most 64 bytes);
   * anything else (object, array, string, number…) is fingerprinted with `fingerprint()`; undefined means no fingerprint.
   */
  async idempotent(
    namespace: string,
    key: string,
    requestOrFingerprint: unknown,
    work: (ctx: WorkContext) => ResultInput | Promise<ResultInput>,
    options: IdempotentOptions = {},
  ): Promise<IdempotentResult> {
    const fp =
      requestOrFingerprint === undefined
        ? Buffer.alloc(0)
        : requestOrFingerprint instanceof Uint8Array
          ? toBuffer(requestOrFingerprint)
          : fingerprint(requestOrFingerprint);
    const leaseTtlMs = options.leaseTtlMs ?? 30_000;
    const waitTimeoutMs = options.waitTimeoutMs ?? 30_000;
    const maxWaits = options.maxWaits ?? 10;
    const policy = retryPolicy(options);
    const acquireReq: AcquireRequest = {
      namespace,
      key,
      fingerprint: fp,
      leaseTtl: durationFromMs(leaseTtlMs),
      retention: options.retentionMs === undefined ? undefined : durationFromMs(options.retentionMs),
      holder: options.holder ?? defaultHolder(),
    };

    for (let waits = 0; ; ) {
      let acq: AcquireResponse;
      try {
        acq = await retrying(policy, () => this.acquire(acquireReq));
      } catch (err) {
        return this.onAcquireFailure(err, namespace, key, work, options);
      }

      switch (acq.outcome) {
        case "OUTCOME_ACQUIRED":
          return this.runLeased(namespace, key, acq.lease!, leaseTtlMs, work, options, policy);
        case "OUTCOME_COMPLETED":
          return { result: storedResult(acq.record?.result), replayed: true, protected: true };
        case "OUTCOME_IN_PROGRESS": {
          if (waits >= maxWaits) {
            throw new InProgressError(
              `${namespace}/${key} is still in progress after ${maxWaits} waits`,
              grpc.status.ABORTED,
              "IN_PROGRESS",
            );
          }
          waits++;
          const retryAfter = durationToMs(acq.retryAfter) ?? waitTimeoutMs;
          const timeoutMs = Math.max(1, Math.min(retryAfter, waitTimeoutMs));
          let w: WaitResponse;
          try {
            w = await this.wait({ namespace, key, timeout: durationFromMs(timeoutMs) });
          } catch (err) {
            if (err instanceof IdemdError && err.code === grpc.status.DEADLINE_EXCEEDED) continue; // treat as TIMED_OUT
            if (isRetried(err)) {
              // Too many waiters, or idemd unreachable: back off, and let Acquire (with its retries) decide.
              await sleep(jitter(Math.min(timeoutMs, 1000)));
              continue;
            }
            throw err;
          }
          if (w.outcome === "WAIT_OUTCOME_COMPLETED") {
            if (w.record && !toBuffer(w.record.fingerprint).equals(fp)) {
              throw new FingerprintMismatchError(
                `${namespace}/${key} was completed for a different fingerprint`,
                grpc.status.FAILED_PRECONDITION,
                "FINGERPRINT_MISMATCH",
              );
            }
            return { result: storedResult(w.record?.result), replayed: true, protected: true };
          }
          continue; // FREE or TIMED_OUT: Acquire again
        }
        default:
          throw new IdemdError(`unexpected Acquire outcome ${acq.outcome}`, grpc.status.INTERNAL, "UNEXPECTED_OUTCOME");
      }
    }
  }

  private async onAcquireFailure(
    err: unknown,
    namespace: string,
    key: string,
    work: (ctx: WorkContext) => ResultInput | Promise<ResultInput>,
    options: IdempotentOptions,
  ): Promise<IdempotentResult> {
    // Only an unreachable idemd may be bypassed: one that answered (rate limited, overloaded,
    // full, refused) said no, and running anyway would ignore it.
    if (!isUnavailable(err)) throw err;
    if (!options.failOpen) throw err; // fail closed: IdemdUnavailableError
    const ctx: WorkContext = {
      namespace,
      key,
      fencingToken: 0n,
      leaseToken: "",
      protected: false,
      signal: new AbortController().signal,
    };
    const result = toResult(await work(ctx));
    return { result, replayed: false, protected: false };
  }

  private async runLeased(
    namespace: string,
    key: string,
    lease: Lease,
    leaseTtlMs: number,
    work: (ctx: WorkContext) => ResultInput | Promise<ResultInput>,
    options: IdempotentOptions,
    policy: RetryPolicy,
  ): Promise<IdempotentResult> {
    const leaseToken = lease.token;
    const keeper = this.keepLease(namespace, key, leaseToken, leaseTtlMs);

    const ctx: WorkContext = {
      namespace,
      key,
      fencingToken: BigInt(lease.fencingToken),
      leaseToken,
      protected: true,
      signal: keeper.signal,
    };

    let produced: ResultInput;
    try {
      produced = await work(ctx);
    } catch (workErr) {
      keeper.stop();
      const retryable = workErr instanceof RetryableError || (options.isRetryable?.(workErr) ?? false);
      if (!retryable && options.completeOnError) {
        let stored = false;
        try {
          const res = toResult(await options.completeOnError(workErr));
          await this.completeWithRetry({ namespace, key, leaseToken, result: res }, policy);
          stored = true;
        } catch {
          // Could not store the error result: fall back to releasing.
        }
        if (stored) throw workErr;
      }
      await this.release({ namespace, key, leaseToken }).catch(() => {
        /* best effort: the lease expires anyway */
      });
      throw workErr;
    }
    keeper.stop();

    let result: StoredResult;
    try {
      result = toResult(produced);
    } catch (err) {
      await this.release({ namespace, key, leaseToken }).catch(() => {});
      throw err;
    }
    try {
      const resp = await this.completeWithRetry({ namespace, key, leaseToken, result }, policy);
      return { result: storedResult(resp.record?.result ?? result), replayed: false, protected: true };
    } catch (err) {
      // The work ran but its result was not stored. No Release: that would hand the key to the
      // next caller at once, to run the work again; an expiring lease at least delays it.
      if (err instanceof IdemdError && ["LEASE_NOT_HELD", "RECORD_NOT_FOUND", "RECORD_COMPLETED"].includes(err.reason)) {
        throw new LeaseLostError(
          `lease on ${namespace}/${key} was lost before Complete; the result was not stored: ${err.message}`,
          err.code,
          err.reason,
          { cause: err, errorInfo: err.errorInfo },
        );
      }
      throw err;
    }
  }

  /**
   * Complete, retried as `idempotent()` retries it (unreachable, rate limited, overloaded: `maxAttempts` calls with
   * backoff and jitter; each call's deadline `timeoutMs`). Safe: a repeated Complete with the same lease token returns
   * the first stored record. The HTTP middleware stores responses with this.
   */
  completeRetrying(req: CompleteRequest, options: Pick<IdempotentOptions, "maxAttempts" | "backoffInitialMs" | "backoffMaxMs"> & CallOptions = {}): Promise<CompleteResponse> {
    return retrying(retryPolicy(options), () => this.complete(req, options));
  }

  /** Complete is safe to retry with the same lease token (the first stored result stands). */
  private completeWithRetry(req: CompleteRequest, policy: RetryPolicy): Promise<CompleteResponse> {
    return retrying(policy, () => this.complete(req));
  }
}
