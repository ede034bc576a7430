package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * The key was already used for a different request: its record has another fingerprint ({@code
 * FAILED_PRECONDITION / FINGERPRINT_MISMATCH}). Never retried, never fail-open.
 */
public class FingerprintMismatchException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public FingerprintMismatchException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  FingerprintMismatchException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
