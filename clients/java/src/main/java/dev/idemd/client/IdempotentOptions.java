package dev.idemd.client;

import java.time.Duration;
import java.util.Objects;
import java.util.function.Function;
import java.util.function.Predicate;

/**
 * How {@link IdempotencyClient#idempotent} treats one key. Immutable; build with {@link
 * #builder()}, or take {@link #defaults()}.
 */
public final class IdempotentOptions {
  private static final IdempotentOptions DEFAULTS = builder().build();

  private final Duration leaseTtl;
  private final Duration retention;
  private final String holder;
  private final Duration waitTimeout;
  private final int maxWaits;
  private final Duration deadline;
  private final Duration acquireTimeout;
  private final int maxAttempts;
  private final Duration backoffInitial;
  private final Duration backoffMax;
  private final boolean failOpen;
  private final Predicate<Throwable> retryable;
  private final Function<Throwable, StoredResult> completeOnError;

  private IdempotentOptions(Builder builder) {
    this.leaseTtl = builder.leaseTtl;
    this.retention = builder.retention;
    this.holder = builder.holder;
    this.waitTimeout = builder.waitTimeout;
    this.maxWaits = builder.maxWaits;
    this.deadline = builder.deadline;
    this.acquireTimeout = builder.acquireTimeout;
    this.maxAttempts = builder.maxAttempts;
    this.backoffInitial = builder.backoffInitial;
    this.backoffMax = builder.backoffMax;
    this.failOpen = builder.failOpen;
    this.retryable = builder.retryable;
    this.completeOnError = builder.completeOnError;
  }

  /** The defaults: see each {@link Builder} method. */
  public static IdempotentOptions defaults() {
    return DEFAULTS;
  }

  /** A builder starting from the defaults. */
  public static Builder builder() {
    return new Builder();
  }

  Duration leaseTtl() {
    return leaseTtl;
  }

  Duration retention() {
    return retention;
  }

  String holder() {
    return holder;
  }

  Duration waitTimeout() {
    return waitTimeout;
  }

  int maxWaits() {
    return maxWaits;
  }

  /** The caller's deadline, or {@code null} for none. */
  Duration deadline() {
    return deadline;
  }

  /** The budget of each Acquire with its retries, or {@code null} for none. */
  Duration acquireTimeout() {
    return acquireTimeout;
  }

  int maxAttempts() {
    return maxAttempts;
  }

  Duration backoffInitial() {
    return backoffInitial;
  }

  Duration backoffMax() {
    return backoffMax;
  }

  boolean failOpen() {
    return failOpen;
  }

  boolean isRetryable(Throwable failure) {
    return failure instanceof RetryableException || retryable.test(failure);
  }

  Function<Throwable, StoredResult> completeOnError() {
    return completeOnError;
  }

  /** Builds {@link IdempotentOptions}. */
  public static final class Builder {
    private Duration leaseTtl = Duration.ofSeconds(30);
    private Duration retention;
    private String holder;
    private Duration waitTimeout = Duration.ofSeconds(30);
    private int maxWaits = 10;
    private Duration deadline;
    private Duration acquireTimeout;
    private int maxAttempts = 4;
    private Duration backoffInitial = Duration.ofMillis(100);
    private Duration backoffMax = Duration.ofSeconds(2);
    private boolean failOpen;
    private Predicate<Throwable> retryable = failure -> false;
    private Function<Throwable, StoredResult> completeOnError;

    private Builder() {}

    /**
     * The lease length asked for at Acquire and at each Renew; the lease is renewed every third of
     * it while the work runs. Default 30 s.
     *
     * @param leaseTtl a positive duration within the server's bounds
     * @return this builder
     */
    public Builder leaseTtl(Duration leaseTtl) {
      if (leaseTtl.isNegative() || leaseTtl.isZero()) {
        throw new IllegalArgumentException("leaseTtl must be positive");
      }
      this.leaseTtl = leaseTtl;
      return this;
    }

    /**
     * How long idemd keeps the completed record. Default: the server's default (24 h unless
     * configured).
     *
     * @param retention a positive duration within the server's bounds
     * @return this builder
     */
    public Builder retention(Duration retention) {
      this.retention = Objects.requireNonNull(retention, "retention");
      return this;
    }

    /**
     * Shown in the record's holder for debugging. Default: {@code hostname:pid}.
     *
     * @param holder at most 128 bytes, no control characters
     * @return this builder
     */
    public Builder holder(String holder) {
      this.holder = Objects.requireNonNull(holder, "holder");
      return this;
    }

    /**
     * The longest single Wait on a duplicate in progress elsewhere; each Wait lasts the shorter of
     * this and the other lease's remaining time. Default 30 s.
     *
     * @param waitTimeout a positive duration
     * @return this builder
     */
    public Builder waitTimeout(Duration waitTimeout) {
      if (waitTimeout.isNegative() || waitTimeout.isZero()) {
        throw new IllegalArgumentException("waitTimeout must be positive");
      }
      this.waitTimeout = waitTimeout;
      return this;
    }

    /**
     * How many rounds of Wait on a duplicate in progress before {@link InProgressException}.
     * Default 10.
     *
     * @param maxWaits zero or more
     * @return this builder
     */
    public Builder maxWaits(int maxWaits) {
      if (maxWaits < 0) {
        throw new IllegalArgumentException("maxWaits must not be negative");
      }
      this.maxWaits = maxWaits;
      return this;
    }

    /**
     * How many calls of Acquire, and of Complete, in all (the first included) while idemd is
     * unreachable ({@link IdemdUnavailableException}), this caller is rate-limited ({@link
     * RateLimitedException}) or idemd is overloaded ({@link OverloadedException}). Default 4.
     *
     * @param maxAttempts at least 1
     * @return this builder
     */
    public Builder maxAttempts(int maxAttempts) {
      if (maxAttempts < 1) {
        throw new IllegalArgumentException("maxAttempts must be at least 1");
      }
      this.maxAttempts = maxAttempts;
      return this;
    }

    /**
     * The backoff before retries: before retry n the helper sleeps a random time in [0,
     * min(max, initial × 2^(n-1))] (full jitter). Defaults 100 ms and 2 s.
     *
     * @param initial the ceiling of the first retry's sleep
     * @param max the largest ceiling
     * @return this builder
     */
    public Builder backoff(Duration initial, Duration max) {
      if (initial.isNegative() || max.compareTo(initial) < 0) {
        throw new IllegalArgumentException("need 0 <= initial <= max");
      }
      this.backoffInitial = initial;
      this.backoffMax = max;
      return this;
    }

    /**
     * The caller's deadline, counted from the start of the call: no retry (of Acquire, or of
     * Complete after the work) and no backoff sleep goes past it; the call then fails as its last
     * attempt did. The work itself is not interrupted. Default: none (the retry budget alone).
     *
     * @param deadline zero or more
     * @return this builder
     */
    public Builder deadline(Duration deadline) {
      if (deadline.isNegative()) {
        throw new IllegalArgumentException("deadline must not be negative");
      }
      this.deadline = deadline;
      return this;
    }

    /**
     * The longest each Acquire may take, its retries and backoff included: every call's own
     * deadline ends with it (or sooner, with the client's {@code rpcTimeout}), and no retry starts
     * past it; the call then fails as its last attempt did (e.g. {@link
     * IdemdUnavailableException}, which {@link #failOpen} may turn into an unprotected run).
     * Unlike {@link #deadline} it bounds only Acquire, counted afresh for each one (the first,
     * and each after a Wait), so Complete keeps its retries however long the work ran. An HTTP
     * middleware's {@code idemd_timeout}. Default: none (the retry budget and {@code rpcTimeout}
     * alone).
     *
     * @param acquireTimeout a positive duration
     * @return this builder
     */
    public Builder acquireTimeout(Duration acquireTimeout) {
      if (acquireTimeout.isNegative() || acquireTimeout.isZero()) {
        throw new IllegalArgumentException("acquireTimeout must be positive");
      }
      this.acquireTimeout = acquireTimeout;
      return this;
    }

    /**
     * When Acquire finds idemd unreachable after its retries ({@link IdemdUnavailableException}
     * only: never after any answer of idemd's, such as {@link RateLimitedException}), run the work
     * unprotected instead of failing. Default false: fail closed.
     *
     * @param failOpen whether to run the work without idemd
     * @return this builder
     */
    public Builder failOpen(boolean failOpen) {
      this.failOpen = failOpen;
      return this;
    }

    /**
     * Marks failures of the work as retryable: the key is released so a retry runs the work again.
     * A {@link RetryableException} is always retryable.
     *
     * @param retryable true for a retryable failure
     * @return this builder
     */
    public Builder retryable(Predicate<Throwable> retryable) {
      this.retryable = Objects.requireNonNull(retryable, "retryable");
      return this;
    }

    /**
     * For a failure of the work that is not retryable: the result to store, so every retry with
     * the key replays it (e.g. a declined payment). The failure is still rethrown. Default: release
     * the key instead.
     *
     * @param completeOnError maps the failure to the result to store
     * @return this builder
     */
    public Builder completeOnError(Function<Throwable, StoredResult> completeOnError) {
      this.completeOnError = Objects.requireNonNull(completeOnError, "completeOnError");
      return this;
    }

    /** The options. */
    public IdempotentOptions build() {
      return new IdempotentOptions(this);
    }
  }
}
