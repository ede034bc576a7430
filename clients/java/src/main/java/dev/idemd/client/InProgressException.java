package dev.idemd.client;

import io.grpc.Status;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * Another caller still held the key after the configured number of Wait rounds ({@code
 * IdempotentOptions.maxWaits}); the work did not run here.
 */
public class InProgressException extends IdemdException {
  private static final long serialVersionUID = 1L;

  /** The other caller's remaining lease as idemd last reported it, or {@code null}. */
  private final Duration retryAfter;

  /**
   * Builds the error from an answer.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason
   * @param cause the underlying error, or {@code null}
   */
  public InProgressException(String message, Status.Code code, String reason, Throwable cause) {
    super(message, code, reason, cause);
    this.retryAfter = null;
  }

  /** The helper's error after its last Acquire answered IN_PROGRESS with {@code retryAfter}. */
  InProgressException(String message, Duration retryAfter) {
    super(message, Status.Code.ABORTED, "IN_PROGRESS", null);
    this.retryAfter = retryAfter;
  }

  InProgressException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, code, reason, errorMetadata, fieldViolations, cause);
    this.retryAfter = null;
  }

  /**
   * When the key's holder may be done: the {@code retry_after} of idemd's last IN_PROGRESS answer
   * (the remaining time of the other caller's lease), for a {@code Retry-After} of one's own.
   *
   * @return the duration, or empty when idemd sent none
   */
  public Optional<Duration> retryAfter() {
    return Optional.ofNullable(retryAfter);
  }
}
