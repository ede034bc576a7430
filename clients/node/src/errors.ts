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

/** idemd could not be reached (UNAVAILABLE, connection failure, or an RPC deadline passed): the call failed closed. */
export class IdemdUnavailableError extends IdemdError {}

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
  return err instanceof IdemdError && (err.code === GrpcStatus.UNAVAILABLE || err.code === GrpcStatus.DEADLINE_EXCEEDED);
}

/** Converts a grpc-js ServiceError into an IdemdError (subclass where the reason says so). */
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
  if (reason === "FINGERPRINT_MISMATCH") return new FingerprintMismatchError(message, code, reason, opts);
  if (code === GrpcStatus.UNAVAILABLE || code === GrpcStatus.DEADLINE_EXCEEDED) {
    return new IdemdUnavailableError(`idemd unavailable (${codeName(code)}): ${message}`, code, reason, opts);
  }
  return new IdemdError(message, code, reason, opts);
}
