package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * The call carried no valid bearer token ({@code UNAUTHENTICATED}).
 */
public class UnauthenticatedException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public UnauthenticatedException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  UnauthenticatedException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
