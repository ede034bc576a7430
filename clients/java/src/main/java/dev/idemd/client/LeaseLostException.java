package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * The lease is not (or no longer) the key's current lease ({@code LEASE_NOT_HELD}, or {@code
 * RECORD_NOT_FOUND} while completing): it was taken over after it expired, or released. In the
 * helper, the work's result was not stored.
 */
public class LeaseLostException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public LeaseLostException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  LeaseLostException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
