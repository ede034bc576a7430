package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * This caller is over its per-caller rate limit ({@code RESOURCE_EXHAUSTED / CALLER_LIMITED}).
 * The helper retries it within its retry budget; it never runs the work unprotected, even with
 * {@code failOpen}: a throttled caller must learn that it is throttled, not lose its protection.
 */
public class RateLimitedException extends ResourceExhaustedException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public RateLimitedException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  RateLimitedException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
