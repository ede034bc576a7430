package dev.idemd.client;

import java.time.Duration;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * The retry budget of one RPC (clients/BEHAVIOUR.md, "Retries"): at most {@code maxAttempts}
 * calls in all, and before retry n a sleep drawn uniformly from [0, min(backoffMax, backoffInitial
 * × 2^(n-1))] ("full jitter", so callers that failed together do not come back together), never
 * past the caller's deadline.
 */
final class Backoff {
  private final int maxAttempts;
  private final long initialNanos;
  private final long maxNanos;
  private final long deadlineNanos;
  private int attempts = 1;

  /** The budget of one RPC whose first call was just made; {@code deadlineNanos} is absolute. */
  Backoff(IdempotentOptions options, long deadlineNanos) {
    this.maxAttempts = options.maxAttempts();
    this.initialNanos = options.backoffInitial().toNanos();
    this.maxNanos = options.backoffMax().toNanos();
    this.deadlineNanos = deadlineNanos;
  }

  /**
   * Sleeps before the next call; false (without sleeping) when the budget is spent.
   *
   * @throws IdemdException (CANCELLED) if the thread is interrupted while it sleeps
   */
  boolean pause() {
    long remaining = deadlineNanos - System.nanoTime();
    if (attempts >= maxAttempts || remaining <= 0) {
      return false;
    }
    int shift = Math.min(attempts - 1, 40);
    long ceiling =
        initialNanos > (Long.MAX_VALUE >> shift) ? maxNanos : Math.min(maxNanos, initialNanos << shift);
    attempts++;
    sleep(Duration.ofNanos(Math.min(jitter(ceiling), remaining)));
    return true;
  }

  /** A uniformly random duration in [0, ceilingNanos]. */
  static long jitter(long ceilingNanos) {
    return ThreadLocalRandom.current().nextLong(Math.max(0, ceilingNanos) + 1);
  }

  /** Sleeps, turning an interrupt into a CANCELLED error (and keeping the interrupt flag). */
  static void sleep(Duration duration) {
    try {
      TimeUnit.NANOSECONDS.sleep(duration.toNanos());
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
      throw new IdemdException(
          "interrupted while waiting to retry", io.grpc.Status.Code.CANCELLED, "CANCELLED", interrupted);
    }
  }
}
