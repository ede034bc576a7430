package dev.idemd.client;

import com.google.common.util.concurrent.ListenableFuture;
import com.google.common.util.concurrent.MoreExecutors;
import dev.idemd.idempotency.v1.IdempotencyServiceGrpc.IdempotencyServiceFutureStub;
import dev.idemd.idempotency.v1.RenewRequest;
import dev.idemd.idempotency.v1.RenewResponse;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.function.Supplier;

/**
 * Renews one lease every third of its length while the work runs. Renew is sent asynchronously,
 * so one slow answer never holds up the client's single scheduler thread (shared by every lease);
 * a tick that finds the previous Renew still in flight is skipped.
 */
final class LeaseRenewal implements AutoCloseable {
  private final Supplier<IdempotencyServiceFutureStub> stub;
  private final RenewRequest request;
  private final WorkContext context;
  private final AtomicBoolean inFlight = new AtomicBoolean();
  private final ScheduledFuture<?> task;

  LeaseRenewal(
      ScheduledExecutorService scheduler,
      Supplier<IdempotencyServiceFutureStub> stub,
      RenewRequest request,
      long periodNanos,
      WorkContext context) {
    this.stub = stub;
    this.request = request;
    this.context = context;
    long period = Math.max(TimeUnit.MILLISECONDS.toNanos(1), periodNanos);
    this.task = scheduler.scheduleWithFixedDelay(this::renew, period, period, TimeUnit.NANOSECONDS);
  }

  private void renew() {
    if (context.isLeaseLost() || !inFlight.compareAndSet(false, true)) {
      return;
    }
    ListenableFuture<RenewResponse> answer;
    try {
      answer = stub.get().renew(request);
    } catch (RuntimeException refused) {
      // The channel is shut down (the client is closing): nothing more to renew.
      inFlight.set(false);
      return;
    }
    answer.addListener(
        () -> {
          try {
            answer.get();
          } catch (ExecutionException failed) {
            IdemdException error = Errors.from(failed.getCause());
            // Unreachable or overloaded: try again at the next tick, the lease has time left.
            // Any other answer (LEASE_NOT_HELD, RECORD_COMPLETED, RECORD_NOT_FOUND...) means the
            // lease is no longer ours.
            if (!(error instanceof IdemdUnavailableException)
                && !(error instanceof ResourceExhaustedException)) {
              context.markLeaseLost(
                  new LeaseLostException(
                      "lease on " + request.getNamespace() + "/" + request.getKey() + " lost: "
                          + error.getMessage(),
                      error.code(),
                      error.reason(),
                      error));
              task.cancel(false);
            }
          } catch (InterruptedException impossible) {
            // The listener runs once the future is done, so get() does not block.
            Thread.currentThread().interrupt();
          } finally {
            inFlight.set(false);
          }
        },
        MoreExecutors.directExecutor());
  }

  /** Stops renewing (a Renew in flight may still land; it only extends a lease we hold). */
  @Override
  public void close() {
    task.cancel(false);
  }
}
