import { status as GrpcStatus, type ServiceError } from "@grpc/grpc-js";
import { decodeStatusDetails, type ErrorInfo, type FieldViolation } from "./status.js";

/** Every error idemd (or the channel to it) answers with. `reason` is the ErrorInfo reason when domain is "idemd". */
export class IdemdError extends Error {
  /** gRPC status code (see `@grpc/grpc-js` `status`). */
  readonly code: number;
  /** ErrorInfo reason, e.g. "FINGERPRINT_MISMATCH"; the gRPC code name when the server sent no ErrorInfo. */
  readonly reason: string;
  readonly errorInfo?: ErrorInfo;
  readonly fieldViolations: FieldViolation[];

  constructor(message: string, code: number, reason: string, opts: { cause?: unknown; errorInfo?: ErrorInfo; fieldViolations?: FieldViolation[] } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.reason = reason;
    this.errorInfo = opts.errorInfo;
    this.fieldViolations = opts.fieldViolations ?? [];
  }
}

/** idemd could not be reached (UNAVAILABLE, a connection that failed or broke, or an RPC deadline passed), after the helper's retries. The only error `failOpen` applies to. */
export class IdemdUnavailableError extends IdemdError {}

/** RESOURCE_EXHAUSTED `CALLER_LIMITED`: this caller is over its own limit (after the helper's retries). Not an IdemdUnavailableError: `failOpen` never applies. */
export class RateLimitedError extends IdemdError {}

/** RESOURCE_EXHAUSTED `OVERLOADED` (or `TOO_MANY_WAITERS`, or no reason): idemd is at its limit (after the helper's retries). `failOpen` never applies. */
export class OverloadedError extends IdemdError {}

/** RESOURCE_EXHAUSTED `STORE_FULL`: new keys are refused until records expire. Not retried; `failOpen` never applies. */
export class StoreFullError extends IdemdError {}

/** UNAUTHENTICATED: missing or unknown credentials. */
export class UnauthenticatedError extends IdemdError {}

/** PERMISSION_DENIED: the policy does not grant this caller the RPC in this namespace. */
export class PermissionDeniedError extends IdemdError {}

/** INVALID_ARGUMENT `INVALID_REQUEST`: `fieldViolations` names each broken field. */
export class InvalidRequestError extends IdemdError {}

/** INTERNAL: a bug or an unexpected database answer in idemd (see its logs). */
export class IdemdInternalError extends IdemdError {}

/** The key was already used with a different request fingerprint. */
export class FingerprintMismatchError extends IdemdError {}

/** Another caller still held the key after `maxWaits` rounds of Wait. */
export class InProgressError extends IdemdError {}

/** The lease was taken over (or the record vanished) while the work ran: its result was not stored. */
export class LeaseLostError extends IdemdError {}

/** Throw (or wrap a failure in) this from `work` to mark it retryable: the key is released, so the next call runs the work again. */
export class RetryableError extends Error {
  constructor(message?: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "RetryableError";
  }
}

const codeName = (code: number): string => (GrpcStatus as unknown as Record<number, string>)[code] ?? `CODE_${code}`;

/** Whether the error means idemd is unreachable (fail closed / fail open). */
export function isUnavailable(err: unknown): boolean {
  return err instanceof IdemdUnavailableError;
}

/** Whether the helper retries a failed Acquire or Complete after this error (within its budget): unreachable, rate limited or overloaded. */
export function isRetried(err: unknown): boolean {
  return err instanceof IdemdUnavailableError || err instanceof RateLimitedError || err instanceof OverloadedError;
}

type ErrorClass = new (message: string, code: number, reason: string, opts: { cause?: unknown; errorInfo?: ErrorInfo; fieldViolations?: FieldViolation[] }) => IdemdError;

const BY_REASON: Record<string, ErrorClass> = {
  FINGERPRINT_MISMATCH: FingerprintMismatchError,
  STORE_UNAVAILABLE: IdemdUnavailableError,
  DEADLINE_EXCEEDED: IdemdUnavailableError,
  CALLER_LIMITED: RateLimitedError,
  OVERLOADED: OverloadedError,
  TOO_MANY_WAITERS: OverloadedError,
  STORE_FULL: StoreFullError,
  UNAUTHENTICATED: UnauthenticatedError,
  PERMISSION_DENIED: PermissionDeniedError,
  INVALID_REQUEST: InvalidRequestError,
  INTERNAL: IdemdInternalError,
};

// Without an ErrorInfo (a proxy's answer, or the transport's own).
const BY_CODE: Partial<Record<number, ErrorClass>> = {
  [GrpcStatus.UNAVAILABLE]: IdemdUnavailableError,
  [GrpcStatus.DEADLINE_EXCEEDED]: IdemdUnavailableError,
  // The helper never cancels its own calls: a CANCELLED is the other side giving up (tonic answers
  // CANCELLED "Timeout expired" when the call's grpc-timeout passes first).
  [GrpcStatus.CANCELLED]: IdemdUnavailableError,
  [GrpcStatus.RESOURCE_EXHAUSTED]: OverloadedError,
  [GrpcStatus.UNAUTHENTICATED]: UnauthenticatedError,
  [GrpcStatus.PERMISSION_DENIED]: PermissionDeniedError,
  [GrpcStatus.INVALID_ARGUMENT]: InvalidRequestError,
  [GrpcStatus.INTERNAL]: IdemdInternalError,
};

/** Converts a grpc-js ServiceError into an IdemdError (the subclass clients/BEHAVIOUR.md names for its reason, else its code). */
export function fromServiceError(err: ServiceError | Error): IdemdError {
  if (err instanceof IdemdError) return err;
  const se = err as Partial<ServiceError>;
  const code = typeof se.code === "number" ? se.code : GrpcStatus.UNKNOWN;
  const raw = se.metadata?.get("grpc-status-details-bin")?.[0];
  const details = decodeStatusDetails(Buffer.isBuffer(raw) ? raw : undefined);
  const info = details.errorInfo && details.errorInfo.domain === "idemd" ? details.errorInfo : undefined;
  const reason = info?.reason || codeName(code);
  const message = se.details || err.message;
  const opts = { cause: err, errorInfo: details.errorInfo, fieldViolations: details.fieldViolations };
  const cls = (info?.reason ? BY_REASON[info.reason] : undefined) ?? BY_CODE[code] ?? IdemdError;
  const text = cls === IdemdUnavailableError ? `idemd unavailable (${codeName(code)}): ${message}` : message;
  return new cls(text, code, reason, opts);
}
