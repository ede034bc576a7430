package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * The caller's token may not use this RPC or namespace ({@code PERMISSION_DENIED}).
 */
public class PermissionDeniedException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public PermissionDeniedException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  PermissionDeniedException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
