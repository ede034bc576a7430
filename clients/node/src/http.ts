/**
 * `Idempotency-Key` middleware for Express and Connect: `app.post("/orders", idempotency({ client, namespace }), handler)`.
 * It behaves as clients/HTTP-MIDDLEWARE.md says (the same in every language); this module is a thin layer over
 * the client: its Acquire, Wait, Complete and Release, its lease renewal (`keepLease`) and its `fingerprint`.
 */
import { createHash } from "node:crypto";
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from "node:http";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { defaultHolder, durationFromMs, durationToMs, type IdempotencyClient, type Lease, type StoredResult } from "./client.js";
import { FingerprintMismatchError, IdemdError, isUnavailable } from "./errors.js";
import { fingerprint } from "./fingerprint.js";

/** Where the `type` URIs of the problem documents point (anchors of clients/HTTP-MIDDLEWARE.md). */
export const PROBLEM_BASE = "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#";

/** The response headers stored and replayed by default (`set-cookie` only when listed explicitly). */
export const DEFAULT_KEEP_HEADERS: readonly string[] = [
  "content-type",
  "content-language",
  "content-encoding",
  "location",
  "etag",
  "last-modified",
  "cache-control",
  "link",
  "retry-after",
];

/** The longest Idempotency-Key value, in bytes. */
export const MAX_KEY_BYTES = 255;

/** A request as the middleware reads it: Node's IncomingMessage, plus what Express and Connect add. */
export type IdempotencyRequest = IncomingMessage & { originalUrl?: string; body?: unknown; rawBody?: Buffer };
type Next = (err?: unknown) => void;

export interface IdempotencyOptions {
  /** The idemd client (shared by every request). */
  client: IdempotencyClient;
  /** The idemd namespace of the keys. Required. */
  namespace: string;
  /** Methods covered (upper case). Default `["POST", "PATCH"]`; any other method passes straight through. */
  methods?: string[];
  /** A covered request without the header gets 400 `missing-key` (true) or runs unprotected (false, the default). */
  required?: boolean;
  /** The caller's identity (user, API key, tenant): the same key under two scopes is two records. Default: "" for everyone. */
  scope?: (req: IdempotencyRequest) => string | Promise<string>;
  /** Lease asked for at Acquire and each Renew (renewed every third of it). Default: idemd's default lease. */
  leaseTtlMs?: number;
  /** Retention of the stored response. Default: idemd's default. */
  retentionMs?: number;
  /** Wait up to this long for an in-flight duplicate to finish, instead of answering 409 at once. Default 0 (no wait). */
  waitMs?: number;
  /** Longest request body read (to fingerprint it); a larger one gets 413. Default 1 MiB. */
  maxBodyBytes?: number;
  /** Largest response body stored (idemd's limit, 1 MiB by default); a larger one is sent but not stored. Default 1 MiB. */
  maxStoredBytes?: number;
  /** Deadline of each call to idemd (Complete is retried as the client retries it, each call within this). Default 5000. */
  idemdTimeoutMs?: number;
  /** idemd unreachable: run the handler unprotected instead of answering 503. Never for RESOURCE_EXHAUSTED. Default false. */
  failOpen?: boolean;
  /** Top-level JSON fields left out of the fingerprint. */
  fingerprintExclude?: string[];
  /** Only these top-level JSON fields go into the fingerprint. */
  fingerprintInclude?: string[];
  /** Request headers (lower case) added to the fingerprint. */
  fingerprintHeaders?: string[];
  /** Which statuses are stored. Default `isStorable`: 200–499 except 408, 409, 425 and 429. */
  storable?: (status: number) => boolean;
  /** Response headers stored and replayed (lower case). Default `DEFAULT_KEEP_HEADERS`. */
  keepHeaders?: string[];
  /** Shown in idemd's record. Default `hostname:pid`, as the client's `idempotent()`. */
  holder?: string;
  /** Where failures after the handler ran are reported. Default `console` (stderr). */
  logger?: Pick<Console, "error" | "warn">;
}

// ---------------------------------------------------------------------------------------------
// The pieces, exported for tests and for other frameworks.
// ---------------------------------------------------------------------------------------------

/** The result of reading the `Idempotency-Key` fields of a request. */
export type ParsedKey = { kind: "none" } | { kind: "key"; key: string } | { kind: "invalid"; detail: string };

/** Parses the `Idempotency-Key` field values (one per field line): a Structured Field string, or a bare value (§2). */
export function parseIdempotencyKey(fields: readonly string[]): ParsedKey {
  if (fields.length === 0) return { kind: "none" };
  if (fields.length > 1) return { kind: "invalid", detail: "the Idempotency-Key field appears more than once" };
  const value = fields[0]!.replace(/^[ \t]+|[ \t]+$/g, "");
  let key: string;
  if (value.startsWith('"')) {
    let out = "";
    let i = 1;
    let closed = false;
    while (i < value.length) {
      const c = value[i]!;
      if (c === "\\") {
        const escaped = value[i + 1];
        if (escaped !== '"' && escaped !== "\\") {
          return { kind: "invalid", detail: "the quoted Idempotency-Key has an escape other than \\\" or \\\\" };
        }
        out += escaped;
        i += 2;
      } else if (c === '"') {
        closed = true;
        i += 1;
        break;
      } else {
        const bad = badCharacter(c);
        if (bad) return { kind: "invalid", detail: bad };
        out += c;
        i += 1;
      }
    }
    if (!closed) return { kind: "invalid", detail: "the quoted Idempotency-Key has no closing quote" };
    if (i !== value.length) return { kind: "invalid", detail: "the Idempotency-Key has text after its closing quote" };
    key = out;
  } else {
    for (const c of value) {
      const bad = badCharacter(c);
      if (bad) return { kind: "invalid", detail: bad };
    }
    // Servers and proxies join repeated fields with ", ": a bare key with a comma reads as two.
    if (value.includes(",")) return { kind: "invalid", detail: "a bare Idempotency-Key must not contain ',' (it reads as two fields joined); quote it" };
    key = value;
  }
  if (key.length === 0) return { kind: "invalid", detail: "the Idempotency-Key is empty" };
  // Only 0x20–0x7E got here: one byte per character.
  if (key.length > MAX_KEY_BYTES) return { kind: "invalid", detail: `the Idempotency-Key is longer than ${MAX_KEY_BYTES} bytes` };
  return { kind: "key", key };
}

/** Node reads header bytes as Latin-1: a byte above 0x7E is a character above U+007E. */
function badCharacter(c: string): string | undefined {
  const code = c.charCodeAt(0);
  if (code < 0x20 || code === 0x7f) return `the Idempotency-Key contains a control character (0x${code.toString(16).padStart(2, "0")})`;
  if (code > 0x7e) return "the Idempotency-Key contains a byte outside printable ASCII";
  return undefined;
}

const sha256hex = (data: string) => createHash("sha256").update(data, "utf8").digest("hex");

/** The idemd key of an Idempotency-Key under a scope (§3): `tag:key`, or `tag#sha256(key)` when that would pass 255 bytes. */
export function idemdKey(scope: string, key: string): string {
  const tag = sha256hex(scope).slice(0, 32);
  const plain = `${tag}:${key}`;
  return Buffer.byteLength(plain, "utf8") <= MAX_KEY_BYTES ? plain : `${tag}#${sha256hex(key)}`;
}

/** Whether a content type is JSON: `application/json` or any `type/subtype+json`. */
export function isJsonContentType(contentType: string | undefined): boolean {
  if (!contentType) return false;
  const media = contentType.split(";")[0]!.trim().toLowerCase();
  return media === "application/json" || /^[^/\s]+\/[^/\s]+\+json$/.test(media);
}

export interface FingerprintInput {
  method: string;
  /** The request target as received: raw path plus `?query`. */
  target: string;
  contentType?: string;
  body: Buffer;
  /** Header name (lower case) → its field values. */
  headers?: Record<string, readonly string[] | undefined>;
}

export interface FingerprintOptions {
  fingerprintExclude?: readonly string[];
  fingerprintInclude?: readonly string[];
  fingerprintHeaders?: readonly string[];
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** The JSON value of a JSON body, or undefined when it is not UTF-8 JSON. */
function parseJson(body: Buffer): { value: unknown } | undefined {
  try {
    return { value: JSON.parse(strictUtf8.decode(body)) };
  } catch {
    return undefined;
  }
}

/** The object whose `fingerprint()` is the request's fingerprint (§3). */
export function fingerprintForm(input: FingerprintInput, options: FingerprintOptions = {}): Record<string, unknown> {
  const form: Record<string, unknown> = { method: input.method.toUpperCase(), target: input.target };
  const json = isJsonContentType(input.contentType) ? parseJson(input.body) : undefined;
  if (json) {
    let value = json.value;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      const fields = value as Record<string, unknown>;
      if (options.fingerprintInclude) {
        const include = new Set(options.fingerprintInclude);
        value = Object.fromEntries(Object.entries(fields).filter(([name]) => include.has(name)));
      } else if (options.fingerprintExclude) {
        const exclude = new Set(options.fingerprintExclude);
        value = Object.fromEntries(Object.entries(fields).filter(([name]) => !exclude.has(name)));
      }
    }
    form.json = value;
  } else {
    form.bytes = input.body.toString("base64");
  }
  if (options.fingerprintHeaders && options.fingerprintHeaders.length > 0) {
    const headers: Record<string, string> = {};
    for (const name of options.fingerprintHeaders) {
      const values = input.headers?.[name.toLowerCase()];
      if (values && values.length > 0) headers[name.toLowerCase()] = values.join(", ");
    }
    form.headers = headers;
  }
  return form;
}

/** The default storable statuses: 200–499 except 408, 409, 425 and 429 (§4). */
export function isStorable(status: number): boolean {
  return status >= 200 && status <= 499 && status !== 408 && status !== 409 && status !== 425 && status !== 429;
}

export type ProblemType =
  | "missing-key"
  | "invalid-key"
  | "request-in-progress"
  | "request-too-large"
  | "key-reused"
  | "idemd-rejected"
  | "idemd-unavailable";

const PROBLEMS: Record<ProblemType, { status: number; title: string }> = {
  "missing-key": { status: 400, title: "Idempotency-Key required" },
  "invalid-key": { status: 400, title: "Invalid Idempotency-Key" },
  "request-in-progress": { status: 409, title: "Request in progress" },
  "request-too-large": { status: 413, title: "Request too large" },
  "key-reused": { status: 422, title: "Idempotency-Key reused" },
  "idemd-rejected": { status: 500, title: "idemd rejected the request" },
  "idemd-unavailable": { status: 503, title: "idemd unavailable" },
};

/** An RFC 9457 problem document of the middleware (§5). */
export function problemDocument(type: ProblemType, detail: string): { type: string; title: string; status: number; detail: string } {
  const { status, title } = PROBLEMS[type];
  return { type: PROBLEM_BASE + type, title, status, detail };
}

/** The stored metadata of a response's headers: kept names in lower case, repeated fields joined by ", " (set-cookie by "\n"). */
export function keptHeaders(headers: OutgoingHttpHeaders, keep: readonly string[]): Record<string, string> {
  const kept: Record<string, string> = {};
  const wanted = new Set(keep.map((name) => name.toLowerCase()));
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase();
    if (!wanted.has(lower) || value === undefined) continue;
    const values = Array.isArray(value) ? value.map(String) : [String(value)];
    kept[lower] = values.join(lower === "set-cookie" ? "\n" : ", ");
  }
  return kept;
}

// ---------------------------------------------------------------------------------------------
// The middleware
// ---------------------------------------------------------------------------------------------

function sendProblem(res: ServerResponse, type: ProblemType, detail: string, headers: Record<string, string> = {}): void {
  const doc = problemDocument(type, detail);
  const body = JSON.stringify(doc);
  res.statusCode = doc.status;
  for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
  res.setHeader("Content-Type", "application/problem+json");
  res.setHeader("Content-Length", Buffer.byteLength(body));
  res.end(body);
}

/** The values of every field line named `name` (lower case): Node joins repeated fields, rawHeaders does not. */
function fieldValues(req: IncomingMessage, name: string): string[] {
  const values: string[] = [];
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i]!.toLowerCase() === name) values.push(req.rawHeaders[i + 1]!);
  }
  return values;
}

class TooLarge extends Error {
  /** Whether the rest of the body is being read and discarded (so the connection can carry the 413 and stay open). */
  constructor(readonly draining: boolean) {
    super("request body too large");
  }
}

/**
 * After a 413, the rest of the body is read and thrown away, up to 4 × `max` in all, so that a client that sends
 * its whole body before reading (most do) gets the answer instead of a reset connection; past that the connection
 * is closed.
 */
function discardRest(req: IncomingMessage, alreadyRead: number, max: number): void {
  let read = alreadyRead;
  req.on("data", (chunk: Buffer) => {
    read += chunk.length;
    if (read > 4 * max) req.socket?.destroy();
  });
  req.resume();
}

/** Reads the whole body, up to `max` bytes. */
function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > max) {
    if (declared > 4 * max) return Promise.reject(new TooLarge(false));
    discardRest(req, 0, max);
    return Promise.reject(new TooLarge(true));
  }
  if (req.readableEnded) {
    return Promise.reject(new Error("idempotency(): the request body was already read: mount the middleware before the body parsers"));
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > max) {
        cleanup();
        discardRest(req, size, max);
        reject(new TooLarge(true));
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(chunks));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    req.on("data", onData);
    req.on("end", onEnd);
    req.on("error", onError);
  });
}

const codeName = (code: number): string => (GrpcStatus as unknown as Record<number, string>)[code] ?? `CODE_${code}`;

/**
 * The `Idempotency-Key` middleware (Express / Connect). Mount it before the body parsers: it reads the body of a
 * covered request itself (to fingerprint it), leaves the bytes in `req.rawBody`, and a JSON body parsed in
 * `req.body`, as `express.json()` would.
 */
export function idempotency(options: IdempotencyOptions): (req: IncomingMessage, res: ServerResponse, next: Next) => void {
  if (!options || !options.client) throw new TypeError("idempotency(): options.client (an IdempotencyClient) is required");
  if (typeof options.namespace !== "string" || options.namespace === "") throw new TypeError("idempotency(): options.namespace is required");
  if (options.fingerprintInclude && options.fingerprintExclude) {
    throw new TypeError("idempotency(): fingerprintInclude and fingerprintExclude cannot both be set");
  }
  const client = options.client;
  const namespace = options.namespace;
  const methods = new Set((options.methods ?? ["POST", "PATCH"]).map((m) => m.toUpperCase()));
  const maxBody = options.maxBodyBytes ?? 1024 * 1024;
  const maxStored = options.maxStoredBytes ?? 1024 * 1024;
  const idemdTimeoutMs = options.idemdTimeoutMs ?? 5000;
  const waitMs = options.waitMs ?? 0;
  const storable = options.storable ?? isStorable;
  const keep = options.keepHeaders ?? DEFAULT_KEEP_HEADERS;
  const logger = options.logger ?? console;
  const fingerprintHeaders = options.fingerprintHeaders?.map((name) => name.toLowerCase());
  const holder = options.holder ?? defaultHolder();

  /** Answers a failed call to idemd (Acquire or Wait); true when the handler may run unprotected (fail open). */
  function idemdFailed(res: ServerResponse, err: unknown, mayFailOpen: boolean): boolean {
    if (!(err instanceof IdemdError)) throw err;
    if (err instanceof FingerprintMismatchError) {
      sendProblem(res, "key-reused", "this Idempotency-Key was used for a different request (method, target or body)");
      return false;
    }
    const unreachable = isUnavailable(err);
    if (unreachable || err.code === GrpcStatus.RESOURCE_EXHAUSTED) {
      if (unreachable && mayFailOpen && options.failOpen) {
        logger.warn(`idempotency: idemd unreachable, running the handler UNPROTECTED (failOpen): ${err.message}`);
        return true;
      }
      sendProblem(res, "idemd-unavailable", `idemd could not take the request (${codeName(err.code)} ${err.reason}); retry later`, {
        "Retry-After": "1",
      });
      return false;
    }
    sendProblem(res, "idemd-rejected", `idemd refused the middleware's call: ${codeName(err.code)} ${err.reason}: ${err.message}`);
    return false;
  }

  function replay(res: ServerResponse, result: StoredResult | null | undefined): void {
    const code = result?.code ?? 0;
    if (!Number.isInteger(code) || code < 100 || code > 999) {
      sendProblem(res, "idemd-rejected", `the stored result has no HTTP status (code ${code}): the namespace holds records of another kind`);
      return;
    }
    res.statusCode = code;
    for (const [name, value] of Object.entries(result?.metadata ?? {})) {
      try {
        res.setHeader(name, name === "set-cookie" ? value.split("\n") : value);
      } catch (err) {
        logger.error(`idempotency: stored header ${JSON.stringify(name)} cannot be sent: ${(err as Error).message}`);
      }
    }
    res.setHeader("Idempotent-Replayed", "true");
    res.end(result?.body ?? Buffer.alloc(0));
  }

  /** Runs the handler under the lease, captures its response, stores it (or releases the key), then lets it end. */
  function runLeased(req: IncomingMessage, res: ServerResponse, next: Next, key: string, lease: Lease, leaseTtlMs: number | undefined, renewEveryMs: number): void {
    const leaseToken = lease.token;
    const keeper = client.keepLease(namespace, key, leaseToken, leaseTtlMs, renewEveryMs);
    const chunks: Buffer[] = [];
    let size = 0;
    let overflow = false;
    let settled = false;
    const release = (why: string) =>
      client.release({ namespace, key, leaseToken }, { timeoutMs: idemdTimeoutMs }).catch((err: unknown) => {
        logger.error(`idempotency: could not release ${namespace}/${key} (${why}); it expires with its lease: ${(err as Error).message}`);
      });

    const record = (chunk: unknown, encoding: unknown) => {
      if (chunk === undefined || chunk === null || typeof chunk === "function" || overflow) return;
      const bytes = typeof chunk === "string" ? Buffer.from(chunk, typeof encoding === "string" ? (encoding as BufferEncoding) : "utf8") : Buffer.from(chunk as Uint8Array);
      size += bytes.length;
      if (size > maxStored) {
        overflow = true;
        chunks.length = 0;
        return;
      }
      chunks.push(bytes);
    };

    const originalWriteHead = res.writeHead;
    const originalWrite = res.write;
    const originalEnd = res.end;
    const restore = () => {
      res.writeHead = originalWriteHead;
      res.write = originalWrite;
      res.end = originalEnd;
    };

    // Headers given to writeHead go through setHeader, so getHeaders() sees every header sent.
    res.writeHead = function (this: ServerResponse, statusCode: number, ...rest: unknown[]) {
      const reason = typeof rest[0] === "string" ? rest[0] : undefined;
      const headers = typeof rest[0] === "string" ? rest[1] : rest[0];
      if (headers && !this.headersSent) {
        if (Array.isArray(headers)) {
          const pairs = headers.length > 0 && Array.isArray(headers[0]) ? headers : pairsOf(headers);
          for (const [name, value] of pairs as [string, string][]) this.appendHeader(name, value);
        } else {
          for (const [name, value] of Object.entries(headers as OutgoingHttpHeaders)) {
            if (value !== undefined) this.setHeader(name, value);
          }
        }
      }
      return reason === undefined ? originalWriteHead.call(this, statusCode) : (originalWriteHead as (code: number, reason: string) => ServerResponse).call(this, statusCode, reason);
    } as typeof res.writeHead;

    res.write = function (this: ServerResponse, chunk: unknown, ...rest: unknown[]) {
      record(chunk, rest[0]);
      return (originalWrite as (...args: unknown[]) => boolean).call(this, chunk, ...rest);
    } as typeof res.write;

    res.end = function (this: ServerResponse, ...args: unknown[]) {
      const chunk = typeof args[0] === "function" ? undefined : args[0];
      const encoding = typeof args[1] === "function" ? undefined : args[1];
      record(chunk, encoding);
      restore();
      if (settled) return originalEnd.apply(this, args as Parameters<typeof originalEnd>);
      settled = true;
      keeper.stop();
      const status = this.statusCode;
      const finish = () => {
        originalEnd.apply(this, args as Parameters<typeof originalEnd>);
      };
      // The response ends only once idemd knows: a retry sent right after it replays instead of getting 409.
      let settle: Promise<unknown>;
      if (!storable(status)) {
        settle = release(`status ${status} is not stored`);
      } else if (overflow) {
        logger.error(`idempotency: the response to ${namespace}/${key} is larger than ${maxStored} bytes; not stored, key released`);
        settle = release("response too large");
      } else {
        const result = { code: status, metadata: keptHeaders(this.getHeaders(), keep), body: Buffer.concat(chunks) };
        settle = client
          .completeRetrying(
            { namespace, key, leaseToken, result, retention: options.retentionMs === undefined ? undefined : durationFromMs(options.retentionMs) },
            { timeoutMs: idemdTimeoutMs },
          )
          .catch((err: unknown) => {
            logger.error(`idempotency: the handler ran but its response to ${namespace}/${key} was not stored: ${(err as Error).message}`);
          });
      }
      settle.then(finish, finish);
      return this;
    } as typeof res.end;

    // The caller went away before the handler answered: nothing is stored, the key is released.
    res.once("close", () => {
      if (settled) return;
      settled = true;
      keeper.stop();
      restore();
      void release("the connection closed before the response ended");
    });

    next();
  }

  async function handle(req: IdempotencyRequest, res: ServerResponse, next: Next): Promise<void> {
    if (!methods.has((req.method ?? "").toUpperCase())) return next();
    const parsed = parseIdempotencyKey(fieldValues(req, "idempotency-key"));
    if (parsed.kind === "none") {
      if (options.required) {
        return sendProblem(res, "missing-key", "this route requires an Idempotency-Key header: a new unique value (a UUID) per operation");
      }
      return next();
    }
    if (parsed.kind === "invalid") return sendProblem(res, "invalid-key", parsed.detail);

    let body: Buffer;
    try {
      body = await readBody(req, maxBody);
    } catch (err) {
      if (err instanceof TooLarge) {
        const close: Record<string, string> = err.draining ? {} : { Connection: "close" };
        return sendProblem(res, "request-too-large", `the request body is larger than ${maxBody} bytes`, close);
      }
      throw err;
    }
    req.rawBody = body;
    if (isJsonContentType(req.headers["content-type"])) {
      const json = parseJson(body);
      if (json) req.body = json.value;
    }

    const scope = options.scope ? await options.scope(req) : "";
    const key = idemdKey(scope, parsed.key);
    const headers: Record<string, string[]> = {};
    for (const name of fingerprintHeaders ?? []) headers[name] = fieldValues(req, name);
    const fp = fingerprint(
      fingerprintForm(
        { method: req.method ?? "", target: req.originalUrl ?? req.url ?? "", contentType: req.headers["content-type"], body, headers },
        { ...options, fingerprintHeaders },
      ),
    );

    const leaseTtl = options.leaseTtlMs === undefined ? undefined : durationFromMs(options.leaseTtlMs);
    const waitUntil = Date.now() + waitMs;
    for (;;) {
      let acquired;
      try {
        acquired = await client.acquire(
          { namespace, key, fingerprint: fp, leaseTtl, holder },
          { timeoutMs: idemdTimeoutMs },
        );
      } catch (err) {
        if (idemdFailed(res, err, true)) next();
        return;
      }
      switch (acquired.outcome) {
        case "OUTCOME_ACQUIRED": {
          const lease = acquired.lease!;
          // Renew every third of the lease: the one asked for, else the one idemd granted.
          const granted = (durationToMs(lease.expiresAt) ?? 0) - Date.now();
          const ttl = options.leaseTtlMs ?? (granted > 0 ? granted : 30_000);
          return runLeased(req, res, next, key, lease, options.leaseTtlMs, Math.max(1, Math.floor(ttl / 3)));
        }
        case "OUTCOME_COMPLETED":
          return replay(res, acquired.record?.result);
        case "OUTCOME_IN_PROGRESS": {
          const remaining = waitUntil - Date.now();
          if (remaining <= 0) {
            const retryAfter = Math.max(1, Math.ceil((durationToMs(acquired.retryAfter) ?? 1000) / 1000));
            return sendProblem(res, "request-in-progress", "a request with this Idempotency-Key is still being processed", {
              "Retry-After": String(retryAfter),
            });
          }
          let waited;
          try {
            waited = await client.wait({ namespace, key, timeout: durationFromMs(remaining) }, { timeoutMs: idemdTimeoutMs });
          } catch (err) {
            idemdFailed(res, err, false);
            return;
          }
          if (waited.outcome === "WAIT_OUTCOME_COMPLETED") {
            if (!Buffer.from(waited.record?.fingerprint ?? []).equals(fp)) {
              return sendProblem(res, "key-reused", "this Idempotency-Key was used for a different request (method, target or body)");
            }
            return replay(res, waited.record?.result);
          }
          continue; // FREE or TIMED_OUT: Acquire again (at the bound, that answers the 409).
        }
        default:
          throw new Error(`idempotency: unexpected Acquire outcome ${acquired.outcome}`);
      }
    }
  }

  return (req, res, next) => {
    handle(req as IdempotencyRequest, res, next).catch(next);
  };
}

/** [name, value, name, value, …] → [[name, value], …]. */
function pairsOf(flat: unknown[]): [string, string][] {
  const pairs: [string, string][] = [];
  for (let i = 0; i + 1 < flat.length; i += 2) pairs.push([String(flat[i]), String(flat[i + 1])]);
  return pairs;
}
