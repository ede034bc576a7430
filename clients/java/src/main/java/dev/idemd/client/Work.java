package dev.idemd.client;

/**
 * The work done at most once per key, run on the calling thread by {@link
 * IdempotencyClient#idempotent}.
 *
 * @param <E> the checked exception the work may throw ({@link RuntimeException} if none)
 */
@FunctionalInterface
public interface Work<E extends Exception> {
  /**
   * Does the work under the lease and returns the result to store.
   *
   * @param context the lease's fencing token and lease-loss signal
   * @return the result to store and replay
   * @throws E when the work fails: the key is released (or, with {@code completeOnError}, the
   *     error's result is stored) and the exception is rethrown
   */
  StoredResult run(WorkContext context) throws E;
}
