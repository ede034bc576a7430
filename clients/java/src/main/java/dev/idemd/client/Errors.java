package dev.idemd.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import io.grpc.Status;
import io.grpc.protobuf.StatusProto;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/** The one place that turns what gRPC reports into the client's typed exceptions. */
final class Errors {
  /** The ErrorInfo domain of idemd's own errors; reasons of other domains are not ours to trust. */
  static final String DOMAIN = "idemd";

  private Errors() {}

  /** The typed exception for a failed call ({@code StatusRuntimeException} or anything else). */
  static IdemdException from(Throwable failure) {
    if (failure instanceof IdemdException idemd) {
      return idemd;
    }
    Status status = Status.fromThrowable(failure);
    Status.Code code = status.getCode();
    String reason = code.name();
    Map<String, String> metadata = Map.of();
    List<IdemdException.FieldViolation> violations = new ArrayList<>();
    com.google.rpc.Status rich = StatusProto.fromThrowable(failure);
    if (rich != null) {
      for (Any detail : rich.getDetailsList()) {
        try {
          if (detail.is(ErrorInfo.class)) {
            ErrorInfo info = detail.unpack(ErrorInfo.class);
            if (DOMAIN.equals(info.getDomain()) && !info.getReason().isEmpty()) {
              reason = info.getReason();
              metadata = info.getMetadataMap();
            }
          } else if (detail.is(BadRequest.class)) {
            for (BadRequest.FieldViolation violation :
                detail.unpack(BadRequest.class).getFieldViolationsList()) {
              violations.add(
                  new IdemdException.FieldViolation(
                      violation.getField(), violation.getDescription()));
            }
          }
        } catch (InvalidProtocolBufferException malformed) {
          // A detail that does not decode is ignored: the code still says what happened.
        }
      }
    }
    String description = status.getDescription() == null ? code.name() : status.getDescription();
    return of(code, reason, description, metadata, violations, failure);
  }

  private static IdemdException of(
      Status.Code code,
      String reason,
      String message,
      Map<String, String> metadata,
      List<IdemdException.FieldViolation> violations,
      Throwable cause) {
    // One row per kind of clients/BEHAVIOUR.md's table "Every error, every failure".
    switch (reason) {
      case "FINGERPRINT_MISMATCH":
        return new FingerprintMismatchException(message, code, reason, metadata, violations, cause);
      case "LEASE_NOT_HELD":
        return new LeaseLostException(message, code, reason, metadata, violations, cause);
      case "RECORD_COMPLETED":
        return new RecordCompletedException(message, code, reason, metadata, violations, cause);
      case "RECORD_NOT_FOUND":
        return new RecordNotFoundException(message, code, reason, metadata, violations, cause);
      default:
        break;
    }
    if (code == Status.Code.CANCELLED && !causedByInterrupt(cause)) {
      // The helper never cancels its own calls, so a CANCELLED it did not cause by an interrupt
      // is the other side giving up (a tonic server whose grpc-timeout passed, a proxy): the
      // same as no answer (BEHAVIOUR.md).
      return new IdemdUnavailableException(
          "idemd unavailable (CANCELLED by the other side): " + message,
          code,
          reason,
          metadata,
          violations,
          cause);
    }
    switch (code) {
      case UNAVAILABLE:
      case DEADLINE_EXCEEDED:
        return new IdemdUnavailableException(
            "idemd unavailable (" + code + "): " + message,
            code,
            reason,
            metadata,
            violations,
            cause);
      case RESOURCE_EXHAUSTED:
        switch (reason) {
          case "CALLER_LIMITED":
            return new RateLimitedException(message, code, reason, metadata, violations, cause);
          case "STORE_FULL":
            return new StoreFullException(message, code, reason, metadata, violations, cause);
          case "TOO_MANY_WAITERS":
            return new ResourceExhaustedException(
                message, code, reason, metadata, violations, cause);
          default:
            // OVERLOADED, or no reason at all (a proxy's limit): back off, as for overload.
            return new OverloadedException(message, code, reason, metadata, violations, cause);
        }
      case INVALID_ARGUMENT:
        return new InvalidRequestException(message, code, reason, metadata, violations, cause);
      case UNAUTHENTICATED:
        return new UnauthenticatedException(message, code, reason, metadata, violations, cause);
      case PERMISSION_DENIED:
        return new PermissionDeniedException(message, code, reason, metadata, violations, cause);
      case INTERNAL:
        return new IdemdInternalException(message, code, reason, metadata, violations, cause);
      default:
        return new IdemdException(message, code, reason, metadata, violations, cause);
    }
  }

  /** Whether the calling thread's interrupt cancelled the call (grpc-java's blocking stubs). */
  private static boolean causedByInterrupt(Throwable failure) {
    for (Throwable cause = failure; cause != null; cause = cause.getCause()) {
      if (cause instanceof InterruptedException) {
        return true;
      }
    }
    return Thread.currentThread().isInterrupted();
  }

  /**
   * Whether the helper retries Acquire and Complete after this error: idemd unreachable, this
   * caller rate-limited, or idemd overloaded (BEHAVIOUR.md, "Retries").
   */
  static boolean retried(IdemdException error) {
    return error instanceof IdemdUnavailableException
        || error instanceof RateLimitedException
        || error instanceof OverloadedException;
  }
}
