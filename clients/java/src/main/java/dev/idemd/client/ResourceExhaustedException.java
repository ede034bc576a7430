package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * idemd refused the call for want of capacity ({@code RESOURCE_EXHAUSTED}): the caller is over its
 * rate limit ({@code CALLER_LIMITED}), the server is overloaded ({@code OVERLOADED}), the memory
 * store is full ({@code STORE_FULL}) or too many callers wait ({@code TOO_MANY_WAITERS}). idemd is
 * reachable, so {@code failOpen} never applies: the work stays protected.
 */
public class ResourceExhaustedException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public ResourceExhaustedException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  ResourceExhaustedException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
