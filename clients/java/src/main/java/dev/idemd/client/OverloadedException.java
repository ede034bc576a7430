package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * idemd is at its limit of concurrent calls ({@code RESOURCE_EXHAUSTED / OVERLOADED}, or
 * RESOURCE_EXHAUSTED without a reason). The helper retries it within its retry budget and never
 * runs the work unprotected.
 */
public class OverloadedException extends ResourceExhaustedException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public OverloadedException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  OverloadedException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
