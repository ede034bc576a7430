package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * idemd refused the call for want of capacity ({@code RESOURCE_EXHAUSTED}). The helper raises one
 * of the subclasses ({@link RateLimitedException}, {@link OverloadedException}, {@link
 * StoreFullException}); this class itself stands for {@code TOO_MANY_WAITERS} from a low-level
 * Wait. idemd is reachable, so none of them is an {@link IdemdUnavailableException} and {@code
 * failOpen} never applies: the work stays protected.
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
