package dev.idemd.client;

import java.util.concurrent.CompletableFuture;

/** What the work gets while it runs under a lease. */
public final class WorkContext {
  private final String namespace;
  private final String key;
  private final long fencingToken;
  private final String leaseToken;
  private final boolean isProtected;
  private final CompletableFuture<LeaseLostException> leaseLost = new CompletableFuture<>();

  WorkContext(String namespace, String key, long fencingToken, String leaseToken, boolean isProtected) {
    this.namespace = namespace;
    this.key = key;
    this.fencingToken = fencingToken;
    this.leaseToken = leaseToken;
    this.isProtected = isProtected;
  }

  /** The namespace of the key. */
  public String namespace() {
    return namespace;
  }

  /** The idempotency key. */
  public String key() {
    return key;
  }

  /**
   * The lease's fencing token, an unsigned 64-bit number that grows with every lease: pass it to
   * downstream systems so they can refuse writes from a caller whose lease was taken over. 0 when
   * the work runs unprotected ({@code failOpen}). {@link Long#toUnsignedString(long)} prints it.
   */
  public long fencingToken() {
    return fencingToken;
  }

  /** The secret token of the lease; empty when the work runs unprotected. */
  public String leaseToken() {
    return leaseToken;
  }

  /** False only when idemd was unreachable and {@code failOpen} runs the work without it. */
  public boolean isProtected() {
    return isProtected;
  }

  /**
   * Completes with the reason when a background Renew finds that the lease was taken over or
   * released: the work should stop, its result will not be stored. Never completes otherwise.
   */
  public CompletableFuture<LeaseLostException> leaseLost() {
    return leaseLost.copy();
  }

  /** Whether a background Renew has found the lease gone. */
  public boolean isLeaseLost() {
    return leaseLost.isDone();
  }

  void markLeaseLost(LeaseLostException reason) {
    leaseLost.complete(reason);
  }
}
