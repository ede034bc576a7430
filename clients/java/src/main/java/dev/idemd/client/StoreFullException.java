package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * idemd's memory store holds as many records as it may ({@code RESOURCE_EXHAUSTED / STORE_FULL}):
 * new keys are refused until records expire. Not retried, never fail-open: an operator must act.
 */
public class StoreFullException extends ResourceExhaustedException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public StoreFullException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  StoreFullException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
