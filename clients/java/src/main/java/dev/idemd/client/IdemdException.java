package dev.idemd.client;

import io.grpc.Status;
import java.util.List;
import java.util.Map;

/**
 * An error answered by idemd, or met on the way to it.
 *
 * <p>Branch on the subclass or on {@link #reason()}: idemd attaches a {@code google.rpc.ErrorInfo}
 * (domain {@code "idemd"}) to every error, whose reason (e.g. {@code "LEASE_NOT_HELD"}) is stable,
 * while messages are for people. When the answer carried no such detail (a proxy, a broken
 * connection), the reason is the gRPC code's name.
 */
public class IdemdException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  private final Status.Code code;
  private final String reason;
  private final Map<String, String> errorMetadata;
  private final List<FieldViolation> fieldViolations;

  /**
   * An error with a gRPC code and a reason.
   *
   * @param message what went wrong, for people
   * @param code the gRPC status code
   * @param reason the machine-readable reason (the ErrorInfo reason, else the code's name)
   * @param cause the underlying error, or {@code null}
   */
  public IdemdException(String message, Status.Code code, String reason, Throwable cause) {
    this(message, code, reason, Map.of(), List.of(), cause);
  }

  IdemdException(
      String message,
      Status.Code code,
      String reason,
      Map<String, String> errorMetadata,
      List<FieldViolation> fieldViolations,
      Throwable cause) {
    super(message, cause);
    this.code = code;
    this.reason = reason;
    this.errorMetadata = Map.copyOf(errorMetadata);
    this.fieldViolations = List.copyOf(fieldViolations);
  }

  /** The gRPC status code of the answer. */
  public Status.Code code() {
    return code;
  }

  /** The ErrorInfo reason (e.g. {@code "FINGERPRINT_MISMATCH"}), else the gRPC code's name. */
  public String reason() {
    return reason;
  }

  /** The ErrorInfo metadata idemd attached (empty when there was none). */
  public Map<String, String> errorMetadata() {
    return errorMetadata;
  }

  /** For {@code INVALID_REQUEST}: each field that broke a rule, from the BadRequest detail. */
  public List<FieldViolation> fieldViolations() {
    return fieldViolations;
  }

  /**
   * One field of a request that broke a rule.
   *
   * @param field the field's name, e.g. {@code "key"}
   * @param description the rule it broke
   */
  public record FieldViolation(String field, String description) {}
}
