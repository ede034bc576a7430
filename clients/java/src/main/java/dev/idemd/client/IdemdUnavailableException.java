package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * idemd could not be reached: UNAVAILABLE (a refused or broken connection, or the store is
 * unreachable), or a deadline passed before idemd answered. The only error after which {@code
 * failOpen} runs the work unprotected; the helper first retries with backoff within its deadline.
 */
public class IdemdUnavailableException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public IdemdUnavailableException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
  }

  IdemdUnavailableException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
  }
}
