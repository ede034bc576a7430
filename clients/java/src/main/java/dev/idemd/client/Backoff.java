package dev.idemd.client;

import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * Exponential backoff with jitter, bounded by a deadline: after the n-th failure it sleeps a random
 * time in [c/2, c], c = min(2 s, 50 ms × 2^n), so callers that failed together do not come back
 * together, and never past the deadline.
 */
final class Backoff {
  private static final long BASE_NANOS = TimeUnit.MILLISECONDS.toNanos(50);
  private static final long CAP_NANOS = TimeUnit.SECONDS.toNanos(2);

  private final long deadlineNanos;
  private int failures;

  /** A backoff whose sleeps end by {@code System.nanoTime() + budgetNanos}. */
  Backoff(long budgetNanos) {
    this.deadlineNanos = System.nanoTime() + budgetNanos;
  }

  /**
   * Sleeps before the next attempt; false (without sleeping) when the deadline has passed.
   *
   * @throws IdemdException (CANCELLED) if the thread is interrupted while it sleeps
   */
  boolean pause() {
    long remaining = deadlineNanos - System.nanoTime();
    if (remaining <= 0) {
      return false;
    }
    long ceiling = Math.min(CAP_NANOS, BASE_NANOS << Math.min(failures, 20));
    failures++;
    long delay = ceiling / 2 + ThreadLocalRandom.current().nextLong(ceiling / 2 + 1);
    try {
      TimeUnit.NANOSECONDS.sleep(Math.min(delay, remaining));
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
      throw new IdemdException(
          "interrupted while waiting to retry", io.grpc.Status.Code.CANCELLED, "CANCELLED", interrupted);
    }
    return true;
  }
}
