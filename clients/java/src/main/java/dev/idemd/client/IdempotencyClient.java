package dev.idemd.client;

import com.google.protobuf.ByteString;
import dev.idemd.idempotency.v1.AcquireRequest;
import dev.idemd.idempotency.v1.AcquireResponse;
import dev.idemd.idempotency.v1.CompleteRequest;
import dev.idemd.idempotency.v1.CompleteResponse;
import dev.idemd.idempotency.v1.GetRequest;
import dev.idemd.idempotency.v1.GetResponse;
import dev.idemd.idempotency.v1.IdempotencyServiceGrpc;
import dev.idemd.idempotency.v1.Lease;
import dev.idemd.idempotency.v1.Record;
import dev.idemd.idempotency.v1.ReleaseRequest;
import dev.idemd.idempotency.v1.ReleaseResponse;
import dev.idemd.idempotency.v1.RenewRequest;
import dev.idemd.idempotency.v1.RenewResponse;
import dev.idemd.idempotency.v1.WaitOutcome;
import dev.idemd.idempotency.v1.WaitRequest;
import dev.idemd.idempotency.v1.WaitResponse;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.opentelemetry.api.trace.propagation.W3CTraceContextPropagator;
import io.opentelemetry.context.propagation.TextMapSetter;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Objects;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledThreadPoolExecutor;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * A client of idemd's {@code idempotency.v1.IdempotencyService}.
 *
 * <p>{@link #idempotent} runs a piece of work at most once per (namespace, key):
 *
 * <ul>
 *   <li><b>Acquired</b>: the work runs on the calling thread while the lease is renewed in the
 *       background every third of its length; its result is stored with Complete and returned.
 *   <li><b>In progress</b> elsewhere: Wait until the other caller finishes, then return its stored
 *       result (or Acquire again if it gave the key back).
 *   <li><b>Completed</b>: the stored result is returned and the work does not run.
 *   <li>The work fails: the key is released (a retry runs the work again), or with {@code
 *       completeOnError} the failure's result is stored so retries replay it; the failure is
 *       rethrown.
 *   <li>idemd unreachable, this caller rate-limited, or idemd overloaded: Acquire (and Complete)
 *       are retried with exponential backoff and full jitter, up to {@code maxAttempts} calls and
 *       never past the caller's {@code deadline}; then the error is raised ({@link
 *       IdemdUnavailableException}: fail closed). Only when idemd stayed <em>unreachable</em> does
 *       {@code failOpen} run the work unprotected instead.
 * </ul>
 *
 * <p>What the helper does for every answer is written once for all idemd clients in {@code
 * clients/BEHAVIOUR.md}; the exceptions are the Java names of its error kinds.
 *
 * <p>The client is thread-safe; make one per process and share it. It owns a channel, a scheduler
 * thread for lease renewals and (unless given one) a thread pool for {@link #idempotentAsync}:
 * {@link #close()} stops all of them.
 */
public final class IdempotencyClient implements AutoCloseable {
  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
  private static final Duration DEFAULT_WAIT_TIMEOUT = Duration.ofSeconds(30);

  private final ManagedChannel channel;
  private final Channel calls;
  private final Duration rpcTimeout;
  private final ScheduledThreadPoolExecutor scheduler;
  private final ExecutorService executor;
  private final boolean ownsExecutor;
  /** How many times calls retried Acquire or Complete (read by the tests). */
  private final java.util.concurrent.atomic.AtomicLong retries =
      new java.util.concurrent.atomic.AtomicLong();

  private IdempotencyClient(Builder builder) {
    this.channel = Grpc.newChannelBuilder(builder.target, builder.credentials).build();
    // Interceptors run last-added first; both only add headers, so their order does not matter.
    Channel traced = io.grpc.ClientInterceptors.intercept(channel, new TraceContext());
    this.calls =
        builder.token == null
            ? traced
            : io.grpc.ClientInterceptors.intercept(traced, new BearerToken(builder.token));
    this.rpcTimeout = builder.rpcTimeout;
    this.scheduler = new ScheduledThreadPoolExecutor(1, daemonThreads("idemd-lease-renewal"));
    this.scheduler.setRemoveOnCancelPolicy(true);
    this.scheduler.setExecuteExistingDelayedTasksAfterShutdownPolicy(false);
    this.ownsExecutor = builder.executor == null;
    this.executor =
        ownsExecutor ? Executors.newCachedThreadPool(daemonThreads("idemd-async")) : builder.executor;
  }

  /**
   * A client of the idemd at {@code target} over plaintext with the default options; see {@link
   * #builder(String)} for TLS, a bearer token and timeouts.
   *
   * @param target {@code host:port} or a gRPC target URI
   * @return the client
   */
  public static IdempotencyClient create(String target) {
    return builder(target).build();
  }

  /**
   * A builder for a client of the idemd at {@code target}.
   *
   * @param target {@code host:port} or a gRPC target URI, e.g. {@code dns:///idemd:50051}
   * @return the builder
   */
  public static Builder builder(String target) {
    return new Builder(target);
  }

  /**
   * Connects the channel now rather than at the first call, waiting at most {@code timeout} for
   * it to be ready: a warm-up at start-up, so the first call's deadline is not spent connecting.
   * Calls work without it.
   *
   * @param timeout the longest to wait
   * @return whether the channel is ready (false at once when a connection attempt failed)
   * @throws InterruptedException if the thread is interrupted while it waits
   */
  public boolean connect(Duration timeout) throws InterruptedException {
    long deadline = System.nanoTime() + timeout.toNanos();
    while (true) {
      io.grpc.ConnectivityState state = channel.getState(true);
      if (state == io.grpc.ConnectivityState.READY) {
        return true;
      }
      long remaining = deadline - System.nanoTime();
      if (remaining <= 0
          || state == io.grpc.ConnectivityState.TRANSIENT_FAILURE
          || state == io.grpc.ConnectivityState.SHUTDOWN) {
        return false; // not there (yet): calls will meet the failure and retry
      }
      java.util.concurrent.CountDownLatch changed = new java.util.concurrent.CountDownLatch(1);
      channel.notifyWhenStateChanged(state, changed::countDown);
      changed.await(remaining, TimeUnit.NANOSECONDS);
    }
  }

  // ------------------------------------------------------------------------------------------
  // Low-level RPCs. Each has the client's RPC timeout as its deadline and throws IdemdException
  // (the subclass its reason names); none is retried here.
  // ------------------------------------------------------------------------------------------

  private IdempotencyServiceGrpc.IdempotencyServiceBlockingStub blocking(Duration timeout) {
    return IdempotencyServiceGrpc.newBlockingStub(calls)
        .withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  private IdempotencyServiceGrpc.IdempotencyServiceFutureStub future() {
    return IdempotencyServiceGrpc.newFutureStub(calls)
        .withDeadlineAfter(rpcTimeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  /**
   * Acquire: claims a key, or reports that its work is in progress or done.
   *
   * @param request the request
   * @return idemd's answer
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public AcquireResponse acquire(AcquireRequest request) {
    try {
      return blocking(rpcTimeout).acquire(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  /**
   * Complete: stores the result of the work done under a lease.
   *
   * @param request the request
   * @return the completed record
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public CompleteResponse complete(CompleteRequest request) {
    try {
      return blocking(rpcTimeout).complete(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  /**
   * Release: gives a key back after a retryable failure.
   *
   * @param request the request
   * @return the (empty) answer
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public ReleaseResponse release(ReleaseRequest request) {
    try {
      return blocking(rpcTimeout).release(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  /**
   * Renew: extends a lease.
   *
   * @param request the request
   * @return the renewed lease
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public RenewResponse renew(RenewRequest request) {
    try {
      return blocking(rpcTimeout).renew(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  /**
   * Get: reads a key's record.
   *
   * @param request the request
   * @return the record
   * @throws RecordNotFoundException if the key has no live record
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public GetResponse get(GetRequest request) {
    try {
      return blocking(rpcTimeout).get(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  /**
   * Wait: blocks until a key is completed or free, or its timeout passes. The call's deadline is
   * the wait's timeout (30 s when unset) plus the RPC timeout.
   *
   * @param request the request
   * @return how the wait ended
   * @throws IdemdException if idemd refused the call or could not be reached
   */
  public WaitResponse waitFor(WaitRequest request) {
    Duration timeout =
        request.hasTimeout()
            ? Duration.ofSeconds(request.getTimeout().getSeconds(), request.getTimeout().getNanos())
            : DEFAULT_WAIT_TIMEOUT;
    if (timeout.isZero() || timeout.isNegative()) {
      timeout = DEFAULT_WAIT_TIMEOUT;
    }
    try {
      return blocking(timeout.plus(rpcTimeout)).wait(request);
    } catch (StatusRuntimeException failure) {
      throw Errors.from(failure);
    }
  }

  // ------------------------------------------------------------------------------------------
  // The helper.
  // ------------------------------------------------------------------------------------------

  /**
   * Runs {@code work} at most once per (namespace, key) with the default options; see {@link
   * #idempotent(String, String, Object, IdempotentOptions, Work)}.
   *
   * @param <E> the checked exception the work may throw
   * @param namespace the key's namespace (1–64 bytes of {@code [A-Za-z0-9._-]})
   * @param key the idempotency key
   * @param request the request the key stands for, or its fingerprint, or {@code null}
   * @param work the work
   * @return the stored result, and whether it was replayed
   * @throws E the work's own failure, rethrown after the key was released (or its result stored)
   */
  public <E extends Exception> IdempotentResult idempotent(
      String namespace, String key, Object request, Work<E> work) throws E {
    return idempotent(namespace, key, request, IdempotentOptions.defaults(), work);
  }

  /**
   * Runs {@code work} at most once per (namespace, key): see the class documentation for what
   * happens on each of idemd's answers.
   *
   * <p>{@code request} is what the key stands for, so a key reused for another request is caught
   * ({@link FingerprintMismatchException}): a {@code byte[]} is sent as the fingerprint as it is (at
   * most 64 bytes); any other value is fingerprinted with {@link Fingerprint#of(Object)};
   * {@code null} sends no fingerprint.
   *
   * @param <E> the checked exception the work may throw
   * @param namespace the key's namespace (1–64 bytes of {@code [A-Za-z0-9._-]})
   * @param key the idempotency key (1–255 bytes of UTF-8 without control characters)
   * @param request the request the key stands for, or its fingerprint, or {@code null}
   * @param options lease length, waits, deadline, failure handling
   * @param work the work, run on the calling thread
   * @return the stored result, and whether it was replayed
   * @throws E the work's own failure, rethrown after the key was released (or its result stored)
   * @throws FingerprintMismatchException the key was used for a different request
   * @throws LeaseLostException the lease was taken over while the work ran: its result is not
   *     stored
   * @throws InProgressException another caller still held the key after {@code maxWaits} Waits
   * @throws IdemdUnavailableException idemd stayed unreachable through the retries (fail closed),
   *     or Complete could not reach it after the work ran (the result is not stored)
   * @throws RateLimitedException this caller stayed over its rate limit through the retries
   * @throws OverloadedException idemd stayed overloaded through the retries
   * @throws IdemdException any other refusal, e.g. {@link StoreFullException}, {@link
   *     UnauthenticatedException}, {@link InvalidRequestException}
   * @throws IllegalArgumentException {@code request} has no canonical JSON form
   */
  public <E extends Exception> IdempotentResult idempotent(
      String namespace, String key, Object request, IdempotentOptions options, Work<E> work)
      throws E {
    Objects.requireNonNull(namespace, "namespace");
    Objects.requireNonNull(key, "key");
    Objects.requireNonNull(options, "options");
    Objects.requireNonNull(work, "work");
    AcquireRequest.Builder acquireRequest =
        AcquireRequest.newBuilder()
            .setNamespace(namespace)
            .setKey(key)
            .setFingerprint(ByteString.copyFrom(fingerprintOf(request)))
            .setLeaseTtl(protoDuration(options.leaseTtl()))
            .setHolder(options.holder() != null ? options.holder() : Holder.DEFAULT);
    if (options.retention() != null) {
      acquireRequest.setRetention(protoDuration(options.retention()));
    }
    AcquireRequest acquire = acquireRequest.build();
    long deadline = deadlineOf(options);
    int waits = 0;
    while (true) {
      AcquireResponse answer;
      try {
        answer = acquireWithRetry(acquire, options, deadline);
      } catch (IdemdUnavailableException unreachable) {
        if (!options.failOpen()) {
          throw unreachable;
        }
        // Fail open: idemd stayed unreachable (and only that) through the retries, and the caller
        // chose to run the work unprotected rather than not at all.
        WorkContext unprotected = new WorkContext(namespace, key, 0, "", false);
        return new IdempotentResult(requireResult(work.run(unprotected)), false, false, 0);
      }
      switch (answer.getOutcome()) {
        case OUTCOME_ACQUIRED:
          return runLeased(namespace, key, answer.getLease(), options, deadline, work);
        case OUTCOME_COMPLETED:
          return replay(answer.getRecord());
        case OUTCOME_IN_PROGRESS:
          break;
        default:
          throw new IdemdException(
              "unexpected Acquire outcome " + answer.getOutcome(),
              io.grpc.Status.Code.INTERNAL,
              "UNEXPECTED_OUTCOME",
              null);
      }
      if (waits >= options.maxWaits()) {
        throw new InProgressException(
            namespace + "/" + key + " is still in progress after " + waits + " waits",
            answer.hasRetryAfter()
                ? Duration.ofSeconds(
                    answer.getRetryAfter().getSeconds(), answer.getRetryAfter().getNanos())
                : null);
      }
      waits++;
      Duration timeout = options.waitTimeout();
      if (answer.hasRetryAfter()) {
        Duration retryAfter =
            Duration.ofSeconds(
                answer.getRetryAfter().getSeconds(), answer.getRetryAfter().getNanos());
        if (retryAfter.compareTo(timeout) < 0) {
          timeout = retryAfter;
        }
      }
      if (timeout.toMillis() < 1) {
        timeout = Duration.ofMillis(1);
      }
      WaitResponse waited;
      try {
        waited =
            waitFor(
                WaitRequest.newBuilder()
                    .setNamespace(namespace)
                    .setKey(key)
                    .setTimeout(protoDuration(timeout))
                    .build());
      } catch (IdemdException failed) {
        if (failed.code() == io.grpc.Status.Code.DEADLINE_EXCEEDED) {
          continue; // counts as TIMED_OUT: Acquire again
        }
        if (failed instanceof IdemdUnavailableException
            || "TOO_MANY_WAITERS".equals(failed.reason())) {
          // Back off a little, then Acquire again (which carries the retries).
          long pause = Math.min(timeout.toNanos(), TimeUnit.SECONDS.toNanos(1));
          Backoff.sleep(Duration.ofNanos(Backoff.jitter(pause)));
          continue;
        }
        throw failed;
      }
      if (waited.getOutcome() == WaitOutcome.WAIT_OUTCOME_COMPLETED) {
        if (!waited.getRecord().getFingerprint().equals(acquire.getFingerprint())) {
          throw new FingerprintMismatchException(
              namespace + "/" + key + " was completed for a different request",
              io.grpc.Status.Code.FAILED_PRECONDITION,
              "FINGERPRINT_MISMATCH",
              null);
        }
        return replay(waited.getRecord());
      }
      // FREE or TIMED_OUT: Acquire again.
    }
  }

  /** Acquire, retried within the options' budget on the errors BEHAVIOUR.md retries. */
  private AcquireResponse acquireWithRetry(
      AcquireRequest request, IdempotentOptions options, long deadline) {
    Duration acquireTimeout = options.acquireTimeout();
    long acquireDeadline =
        acquireTimeout == null
            ? deadline
            : Math.min(deadline, System.nanoTime() + acquireTimeout.toNanos());
    Backoff backoff = new Backoff(options, acquireDeadline);
    while (true) {
      try {
        if (acquireTimeout == null) {
          return acquire(request);
        }
        // Each call's own deadline ends with the Acquire's budget (never below 1 ms).
        long left = Math.max(TimeUnit.MILLISECONDS.toNanos(1), acquireDeadline - System.nanoTime());
        Duration callTimeout = Duration.ofNanos(Math.min(left, rpcTimeout.toNanos()));
        try {
          return blocking(callTimeout).acquire(request);
        } catch (StatusRuntimeException failure) {
          throw Errors.from(failure);
        }
      } catch (IdemdException failed) {
        if (!Errors.retried(failed) || !backoff.pause()) {
          throw failed;
        }
        retries.incrementAndGet();
      }
    }
  }

  /** Complete is safe to retry with the same lease token: a repeat returns the stored record. */
  private CompleteResponse completeWithRetry(
      CompleteRequest request, IdempotentOptions options, long deadline) {
    Backoff backoff = new Backoff(options, deadline);
    while (true) {
      try {
        return complete(request);
      } catch (IdemdException failed) {
        if (!Errors.retried(failed) || !backoff.pause()) {
          throw failed;
        }
        retries.incrementAndGet();
      }
    }
  }

  /** The absolute deadline ({@link System#nanoTime()}) of a call that starts now. */
  private static long deadlineOf(IdempotentOptions options) {
    Duration deadline = options.deadline();
    if (deadline == null) {
      return Long.MAX_VALUE;
    }
    long now = System.nanoTime();
    long nanos = deadline.compareTo(Duration.ofDays(365)) > 0 ? Long.MAX_VALUE / 2 : deadline.toNanos();
    return now + nanos;
  }

  /**
   * The {@link CompletableFuture} form of {@link #idempotent(String, String, Object,
   * IdempotentOptions, Work)}: the same steps, with the work's result given as a {@link
   * java.util.concurrent.CompletionStage}.
   *
   * <p>The protocol (Acquire, Wait, retries, Complete) runs on the client's executor (a cached
   * daemon pool unless {@link Builder#executor} gave one), taking one of its threads per call in
   * flight; the work's stage is awaited there. The returned future fails with the same exceptions
   * as the blocking form (wrapped in {@link CompletionException}, as {@code CompletableFuture}
   * does).
   *
   * @param namespace the key's namespace
   * @param key the idempotency key
   * @param request the request the key stands for, or its fingerprint, or {@code null}
   * @param options lease length, waits, deadline, failure handling
   * @param work starts the work
   * @return completes with the stored result, and whether it was replayed
   */
  public CompletableFuture<IdempotentResult> idempotentAsync(
      String namespace, String key, Object request, IdempotentOptions options, AsyncWork work) {
    Objects.requireNonNull(work, "work");
    java.util.function.Supplier<IdempotentResult> protocol =
        () -> {
          try {
            return idempotent(
                namespace,
                key,
                request,
                options,
                context -> {
                  try {
                    return work.run(context).toCompletableFuture().get();
                  } catch (ExecutionException failed) {
                    Throwable cause = failed.getCause();
                    if (cause instanceof Exception exception) {
                      throw exception;
                    }
                    throw failed;
                  }
                });
          } catch (RuntimeException unchecked) {
            throw unchecked;
          } catch (Exception checked) {
            throw new CompletionException(checked);
          }
        };
    // The protocol runs on the executor: the caller's OpenTelemetry context goes with it, so its
    // calls continue the caller's trace as the blocking helper's do.
    return CompletableFuture.supplyAsync(
        io.opentelemetry.context.Context.current().wrapSupplier(protocol), executor);
  }

  /**
   * {@link #idempotentAsync(String, String, Object, IdempotentOptions, AsyncWork)} with the
   * default options.
   *
   * @param namespace the key's namespace
   * @param key the idempotency key
   * @param request the request the key stands for, or its fingerprint, or {@code null}
   * @param work starts the work
   * @return completes with the stored result, and whether it was replayed
   */
  public CompletableFuture<IdempotentResult> idempotentAsync(
      String namespace, String key, Object request, AsyncWork work) {
    return idempotentAsync(namespace, key, request, IdempotentOptions.defaults(), work);
  }

  private <E extends Exception> IdempotentResult runLeased(
      String namespace,
      String key,
      Lease lease,
      IdempotentOptions options,
      long deadline,
      Work<E> work)
      throws E {
    String leaseToken = lease.getToken();
    WorkContext context =
        new WorkContext(namespace, key, lease.getFencingToken(), leaseToken, true);
    RenewRequest renew =
        RenewRequest.newBuilder()
            .setNamespace(namespace)
            .setKey(key)
            .setLeaseToken(leaseToken)
            .setLeaseTtl(protoDuration(options.leaseTtl()))
            .build();
    StoredResult produced;
    LeaseRenewal renewal =
        new LeaseRenewal(scheduler, this::future, renew, options.leaseTtl().toNanos() / 3, context);
    try {
      produced = requireResult(work.run(context));
    } catch (Exception | Error failure) {
      renewal.close();
      settleFailure(namespace, key, leaseToken, options, deadline, failure);
      throw failure;
    } finally {
      renewal.close();
    }
    CompleteRequest complete =
        CompleteRequest.newBuilder()
            .setNamespace(namespace)
            .setKey(key)
            .setLeaseToken(leaseToken)
            .setResult(produced.toProto())
            .build();
    CompleteResponse completed;
    try {
      completed = completeWithRetry(complete, options, deadline);
    } catch (LeaseLostException | RecordNotFoundException | RecordCompletedException lost) {
      throw new LeaseLostException(
          "lease on "
              + namespace
              + "/"
              + key
              + " was lost before Complete; the result was not stored: "
              + lost.getMessage(),
          lost.code(),
          lost.reason(),
          lost);
    }
    StoredResult stored =
        completed.getRecord().hasResult()
            ? StoredResult.fromProto(completed.getRecord().getResult())
            : produced;
    return new IdempotentResult(stored, false, true, lease.getFencingToken());
  }

  /**
   * After the work failed: store the failure's result if asked to, else give the key back (once,
   * best effort: the lease expires by itself). What goes wrong here is added to the work's failure
   * as suppressed, never thrown instead of it.
   */
  private void settleFailure(
      String namespace,
      String key,
      String leaseToken,
      IdempotentOptions options,
      long deadline,
      Throwable failure) {
    if (!options.isRetryable(failure) && options.completeOnError() != null) {
      try {
        StoredResult errorResult = requireResult(options.completeOnError().apply(failure));
        completeWithRetry(
            CompleteRequest.newBuilder()
                .setNamespace(namespace)
                .setKey(key)
                .setLeaseToken(leaseToken)
                .setResult(errorResult.toProto())
                .build(),
            options,
            deadline);
        return;
      } catch (RuntimeException notStored) {
        // Could not store the failure's result: release instead, so a retry can run the work.
        failure.addSuppressed(notStored);
      }
    }
    try {
      release(
          ReleaseRequest.newBuilder()
              .setNamespace(namespace)
              .setKey(key)
              .setLeaseToken(leaseToken)
              .build());
    } catch (IdemdException notReleased) {
      failure.addSuppressed(notReleased);
    }
  }

  /** How many times calls of this client retried Acquire or Complete (read by the tests). */
  long retries() {
    return retries.get();
  }

  private static IdempotentResult replay(Record record) {
    return new IdempotentResult(
        StoredResult.fromProto(record.getResult()), true, true, record.getFencingToken());
  }

  private static StoredResult requireResult(StoredResult result) {
    if (result == null) {
      throw new NullPointerException("the work returned null instead of a StoredResult");
    }
    return result;
  }

  private static byte[] fingerprintOf(Object request) {
    if (request == null) {
      return new byte[0];
    }
    if (request instanceof byte[] raw) {
      return raw.clone();
    }
    return Fingerprint.of(request);
  }

  private static com.google.protobuf.Duration protoDuration(Duration duration) {
    return com.google.protobuf.Duration.newBuilder()
        .setSeconds(duration.getSeconds())
        .setNanos(duration.getNano())
        .build();
  }

  /**
   * Stops the lease-renewal scheduler, the executor of {@link #idempotentAsync} (unless it was
   * given to the builder) and the channel, waiting up to 5 s for calls in flight. Call it once the
   * client's calls have finished.
   */
  @Override
  public void close() {
    scheduler.shutdownNow();
    if (ownsExecutor) {
      executor.shutdown();
    }
    channel.shutdown();
    try {
      if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
        channel.shutdownNow();
      }
      scheduler.awaitTermination(5, TimeUnit.SECONDS);
      if (ownsExecutor && !executor.awaitTermination(5, TimeUnit.SECONDS)) {
        executor.shutdownNow();
      }
    } catch (InterruptedException interrupted) {
      channel.shutdownNow();
      if (ownsExecutor) {
        executor.shutdownNow();
      }
      Thread.currentThread().interrupt();
    }
  }

  private static ThreadFactory daemonThreads(String prefix) {
    AtomicInteger count = new AtomicInteger();
    return runnable -> {
      Thread thread = new Thread(runnable, prefix + "-" + count.incrementAndGet());
      thread.setDaemon(true);
      return thread;
    };
  }

  /** Adds {@code authorization: Bearer <token>} to every call. */
  private static final class BearerToken implements ClientInterceptor {
    private final String header;

    BearerToken(String token) {
      this.header = "Bearer " + token;
    }

    @Override
    public <Q, R> ClientCall<Q, R> interceptCall(
        MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
      return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
        @Override
        public void start(Listener<R> listener, Metadata headers) {
          headers.put(AUTHORIZATION, header);
          super.start(listener, headers);
        }
      };
    }
  }

  /**
   * Adds the caller's current OpenTelemetry context to every call as W3C {@code
   * traceparent}/{@code tracestate}, so idemd's spans join the caller's trace. The W3C propagator is
   * used directly, not {@code GlobalOpenTelemetry}'s (a no-op until an SDK registers one): W3C trace
   * context is the one format idemd reads, whatever the application configured. With no valid
   * current span, nothing is added.
   */
  private static final class TraceContext implements ClientInterceptor {
    private static final TextMapSetter<Metadata> SETTER =
        (headers, name, value) -> {
          if (headers != null) {
            headers.put(Metadata.Key.of(name, Metadata.ASCII_STRING_MARSHALLER), value);
          }
        };

    @Override
    public <Q, R> ClientCall<Q, R> interceptCall(
        MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
      return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
        @Override
        public void start(Listener<R> listener, Metadata headers) {
          W3CTraceContextPropagator.getInstance()
              .inject(io.opentelemetry.context.Context.current(), headers, SETTER);
          super.start(listener, headers);
        }
      };
    }
  }

  /** The default {@code AcquireRequest.holder}: {@code hostname:pid}, cut to idemd's limits. */
  private static final class Holder {
    static final String DEFAULT = compute();

    private static String compute() {
      String host = System.getenv("HOSTNAME");
      if (host == null || host.isEmpty()) {
        try {
          host = java.net.InetAddress.getLocalHost().getHostName();
        } catch (IOException unknown) {
          host = "java";
        }
      }
      String holder =
          (host + ":" + ProcessHandle.current().pid()).replaceAll("[\\x00-\\x1f\\x7f-\\x9f]", "");
      while (holder.getBytes(StandardCharsets.UTF_8).length > 128) {
        holder = holder.substring(0, holder.length() - 1);
      }
      return holder;
    }
  }

  /** Builds an {@link IdempotencyClient}. */
  public static final class Builder {
    private final String target;
    private ChannelCredentials credentials = InsecureChannelCredentials.create();
    private String token;
    private Duration rpcTimeout = Duration.ofSeconds(10);
    private ExecutorService executor;

    private Builder(String target) {
      this.target = Objects.requireNonNull(target, "target");
    }

    /**
     * Sends {@code authorization: Bearer <token>} on every call (see docs/SECURITY.md). Use it
     * with TLS unless the network is trusted.
     *
     * @param token the caller's token
     * @return this builder
     */
    public Builder token(String token) {
      this.token = Objects.requireNonNull(token, "token");
      return this;
    }

    /**
     * Connects over TLS, trusting the system's certificate authorities.
     *
     * @return this builder
     */
    public Builder tls() {
      this.credentials = TlsChannelCredentials.create();
      return this;
    }

    /**
     * Connects over TLS, trusting the certificate authorities in {@code trustedCertificates}
     * (PEM).
     *
     * @param trustedCertificates a PEM file of CA certificates
     * @return this builder
     * @throws IOException if the file cannot be read
     */
    public Builder tls(File trustedCertificates) throws IOException {
      this.credentials = TlsChannelCredentials.newBuilder().trustManager(trustedCertificates).build();
      return this;
    }

    /**
     * Any channel credentials, e.g. mutual TLS built with {@link TlsChannelCredentials#newBuilder()}.
     * Default: plaintext.
     *
     * @param credentials the credentials
     * @return this builder
     */
    public Builder credentials(ChannelCredentials credentials) {
      this.credentials = Objects.requireNonNull(credentials, "credentials");
      return this;
    }

    /**
     * The deadline of each Acquire, Complete, Release, Renew and Get (Wait gets its timeout on
     * top). Default 10 s.
     *
     * @param rpcTimeout a positive duration
     * @return this builder
     */
    public Builder rpcTimeout(Duration rpcTimeout) {
      if (rpcTimeout.isNegative() || rpcTimeout.isZero()) {
        throw new IllegalArgumentException("rpcTimeout must be positive");
      }
      this.rpcTimeout = rpcTimeout;
      return this;
    }

    /**
     * The executor that runs {@link IdempotencyClient#idempotentAsync} calls. The caller keeps
     * ownership: {@link IdempotencyClient#close()} does not shut it down. Default: a cached pool of
     * daemon threads that the client owns.
     *
     * @param executor the executor
     * @return this builder
     */
    public Builder executor(ExecutorService executor) {
      this.executor = Objects.requireNonNull(executor, "executor");
      return this;
    }

    /** The client. */
    public IdempotencyClient build() {
      return new IdempotencyClient(this);
    }
  }
}
