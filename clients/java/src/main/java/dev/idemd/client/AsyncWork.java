package dev.idemd.client;

import java.util.concurrent.CompletionStage;

/** The work done at most once per key, for {@link IdempotencyClient#idempotentAsync}. */
@FunctionalInterface
public interface AsyncWork {
  /**
   * Starts the work under the lease.
   *
   * @param context the lease's fencing token and lease-loss signal
   * @return completes with the result to store, or exceptionally when the work failed
   */
  CompletionStage<StoredResult> run(WorkContext context);
}
