package dev.idemd.client;

/**
 * Thrown by (or wrapping a failure of) the work to mark it retryable: the helper releases the key,
 * so the next call with the same key runs the work again, and rethrows this exception.
 */
public class RetryableException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  /**
   * A retryable failure.
   *
   * @param message what went wrong
   */
  public RetryableException(String message) {
    super(message);
  }

  /**
   * A retryable failure caused by {@code cause}.
   *
   * @param message what went wrong
   * @param cause the failure
   */
  public RetryableException(String message, Throwable cause) {
    super(message, cause);
  }
}
