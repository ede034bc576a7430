package dev.idemd.client;

/** What {@link IdempotencyClient#idempotent} returns. */
public final class IdempotentResult {
  private final StoredResult result;
  private final boolean replayed;
  private final boolean isProtected;
  private final long fencingToken;

  IdempotentResult(StoredResult result, boolean replayed, boolean isProtected, long fencingToken) {
    this.result = result;
    this.replayed = replayed;
    this.isProtected = isProtected;
    this.fencingToken = fencingToken;
  }

  /** The stored result (or, when run unprotected, the result the work produced). */
  public StoredResult result() {
    return result;
  }

  /** True when an earlier call stored the result and the work did not run here. */
  public boolean replayed() {
    return replayed;
  }

  /** False only when idemd was unreachable and {@code failOpen} ran the work without it. */
  public boolean isProtected() {
    return isProtected;
  }

  /**
   * The fencing token of the lease the result was stored under (unsigned 64-bit); 0 when run
   * unprotected.
   */
  public long fencingToken() {
    return fencingToken;
  }

  @Override
  public String toString() {
    return "IdempotentResult{replayed="
        + replayed
        + ", protected="
        + isProtected
        + ", fencingToken="
        + Long.toUnsignedString(fencingToken)
        + ", result="
        + result
        + "}";
  }
}
