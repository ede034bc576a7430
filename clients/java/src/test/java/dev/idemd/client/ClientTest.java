package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.idemd.idempotency.v1.AcquireRequest;
import dev.idemd.idempotency.v1.AcquireResponse;
import dev.idemd.idempotency.v1.GetRequest;
import dev.idemd.idempotency.v1.Outcome;
import dev.idemd.idempotency.v1.Record;
import dev.idemd.idempotency.v1.RecordState;
import dev.idemd.idempotency.v1.ReleaseRequest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Collectors;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** idempotent() against this build's idemd on a PostgreSQL cluster of the test's own. */
class ClientTest {
  static final String NS = "java-client-test";

  private static PostgresCluster postgres;
  private static IdemdProcess idemd;
  private static IdempotencyClient client;

  @BeforeAll
  static void start() throws Exception {
    postgres = PostgresCluster.create();
    idemd = IdemdProcess.start("--database-url", postgres.url());
    client = IdempotencyClient.create(idemd.address());
  }

  @AfterAll
  static void stop() throws Exception {
    if (client != null) {
      client.close();
    }
    if (idemd != null) {
      idemd.close();
    }
    if (postgres != null) {
      postgres.close();
    }
  }

  static String uniqueKey(String label) {
    return label + "-" + UUID.randomUUID();
  }

  private static Record record(String key) {
    return client.get(GetRequest.newBuilder().setNamespace(NS).setKey(key).build()).getRecord();
  }

  @Test
  void aFreshKeyRunsTheWorkAndARetryReplaysTheStoredResult() {
    String key = uniqueKey("replay");
    AtomicInteger calls = new AtomicInteger();
    List<Long> fencingTokens = new ArrayList<>();
    Work<RuntimeException> work =
        context -> {
          calls.incrementAndGet();
          fencingTokens.add(context.fencingToken());
          assertTrue(context.isProtected());
          assertTrue(context.leaseToken().matches("[0-9a-f]{32}"), context.leaseToken());
          return StoredResult.of(
              "charged".getBytes(), 201, Map.of("content-type", "text/plain"));
        };
    IdempotentResult first =
        client.idempotent(NS, key, Map.of("amount", 1250, "currency", "EUR"), work);
    assertFalse(first.replayed());
    assertTrue(first.isProtected());
    assertEquals("charged", first.result().bodyUtf8());
    assertEquals(201, first.result().code());
    assertEquals(Map.of("content-type", "text/plain"), first.result().metadata());
    assertTrue(fencingTokens.get(0) > 0);

    // The same request built in another order has the same fingerprint: a replay.
    Map<String, Object> sameRequest = new java.util.LinkedHashMap<>();
    sameRequest.put("currency", "EUR");
    sameRequest.put("amount", 1250.0);
    IdempotentResult second = client.idempotent(NS, key, sameRequest, work);
    assertTrue(second.replayed());
    assertEquals(first.result(), second.result());
    assertEquals(fencingTokens.get(0), second.fencingToken());
    assertEquals(1, calls.get());

    Record stored = record(key);
    assertEquals(RecordState.RECORD_STATE_COMPLETED, stored.getState());
    assertEquals((long) fencingTokens.get(0), stored.getFencingToken());
  }

  @Test
  void theAsyncFormRunsOnceReplaysAndFailsWithTheWorksOwnError() throws Exception {
    String key = uniqueKey("async");
    AtomicInteger calls = new AtomicInteger();
    AsyncWork work =
        context -> {
          calls.incrementAndGet();
          return CompletableFuture.supplyAsync(() -> StoredResult.of("async result"));
        };
    IdempotentResult first = client.idempotentAsync(NS, key, List.of("a", 1), work).get(30, TimeUnit.SECONDS);
    IdempotentResult second = client.idempotentAsync(NS, key, List.of("a", 1), work).get(30, TimeUnit.SECONDS);
    assertFalse(first.replayed());
    assertTrue(second.replayed());
    assertEquals("async result", second.result().bodyUtf8());
    assertEquals(1, calls.get());

    String failingKey = uniqueKey("async-failure");
    IllegalStateException declined = new IllegalStateException("declined");
    ExecutionException failed =
        assertThrows(
            ExecutionException.class,
            () ->
                client
                    .idempotentAsync(
                        NS, failingKey, null, context -> CompletableFuture.failedFuture(declined))
                    .get(30, TimeUnit.SECONDS));
    assertSame(declined, failed.getCause());
    // Released: the key is free again.
    assertEquals(
        Outcome.OUTCOME_ACQUIRED,
        client
            .acquire(AcquireRequest.newBuilder().setNamespace(NS).setKey(failingKey).build())
            .getOutcome());
  }

  @Test
  void inProgressWithoutWaitingSaysWhenToRetry() {
    String key = uniqueKey("in-progress");
    AcquireResponse holder =
        client.acquire(
            AcquireRequest.newBuilder()
                .setNamespace(NS)
                .setKey(key)
                .setLeaseTtl(com.google.protobuf.Duration.newBuilder().setSeconds(20))
                .build());
    assertEquals(Outcome.OUTCOME_ACQUIRED, holder.getOutcome());
    InProgressException inProgress =
        assertThrows(
            InProgressException.class,
            () ->
                client.idempotent(
                    NS,
                    key,
                    null,
                    IdempotentOptions.builder().maxWaits(0).build(),
                    context -> StoredResult.of("never")));
    // The other lease's remaining time, as idemd reported it (an HTTP Retry-After's source).
    Duration retryAfter = inProgress.retryAfter().orElseThrow();
    assertTrue(
        retryAfter.compareTo(Duration.ZERO) > 0 && retryAfter.compareTo(Duration.ofSeconds(20)) <= 0,
        "retryAfter " + retryAfter);
  }

  @Test
  void concurrentDuplicatesWaitForTheFirstAndGetItsResult() throws Exception {
    String key = uniqueKey("concurrent");
    AtomicInteger calls = new AtomicInteger();
    Work<InterruptedException> work =
        context -> {
          int call = calls.incrementAndGet();
          TimeUnit.MILLISECONDS.sleep(500); // the work takes a while: duplicates find it in progress
          return StoredResult.of("result-" + call);
        };
    // One thread per duplicate: the common pool has a single thread on a two-core machine.
    ExecutorService callers = Executors.newFixedThreadPool(10);
    List<CompletableFuture<IdempotentResult>> results = new ArrayList<>();
    for (int i = 0; i < 10; i++) {
      results.add(
          CompletableFuture.supplyAsync(
              () -> {
                try {
                  return client.idempotent(NS, key, Map.of("op", "concurrent"), work);
                } catch (InterruptedException interrupted) {
                  throw new IllegalStateException(interrupted);
                }
              },
              callers));
    }
    callers.shutdown();
    List<IdempotentResult> done = new ArrayList<>();
    for (CompletableFuture<IdempotentResult> result : results) {
      done.add(result.get(60, TimeUnit.SECONDS));
    }
    assertEquals(1, calls.get());
    for (IdempotentResult result : done) {
      assertEquals("result-1", result.result().bodyUtf8());
    }
    assertEquals(1, done.stream().filter(result -> !result.replayed()).count());
    assertEquals(9, done.stream().filter(IdempotentResult::replayed).count());
    assertEquals(1, record(key).getAttempts(), "the lease was never taken over");
  }

  @Test
  void aLeaseRenewedInTheBackgroundOutlivesItsTtl() throws Exception {
    String key = uniqueKey("renewed");
    IdempotentOptions shortLease =
        IdempotentOptions.builder().leaseTtl(Duration.ofMillis(300)).build();
    CountDownLatch started = new CountDownLatch(1);
    CompletableFuture<IdempotentResult> slow =
        CompletableFuture.supplyAsync(
            () ->
                client.idempotent(
                    NS,
                    key,
                    null,
                    shortLease,
                    context -> {
                      started.countDown();
                      // Four lease lengths: without renewal another caller could take over.
                      // (The duplicate's Wait returns early only if the lease lapses.)
                      try {
                        TimeUnit.MILLISECONDS.sleep(1200);
                      } catch (InterruptedException interrupted) {
                        throw new IllegalStateException(interrupted);
                      }
                      assertFalse(context.isLeaseLost());
                      return StoredResult.of("slow result");
                    }));
    assertTrue(started.await(30, TimeUnit.SECONDS));
    IdempotentResult duplicate =
        client.idempotent(
            NS, key, null, shortLease, context -> StoredResult.of("must not run"));
    assertTrue(duplicate.replayed());
    assertEquals("slow result", duplicate.result().bodyUtf8());
    assertFalse(slow.get(30, TimeUnit.SECONDS).replayed());
    assertEquals(1, record(key).getAttempts(), "the lease was never taken over");
  }

  @Test
  void aLeaseTakenOverSignalsTheWorkAndItsResultIsNotStored() {
    String key = uniqueKey("takeover");
    AtomicInteger thiefResult = new AtomicInteger();
    LeaseLostException lost =
        assertThrows(
            LeaseLostException.class,
            () ->
                client.idempotent(
                    NS,
                    key,
                    null,
                    IdempotentOptions.builder().leaseTtl(Duration.ofMillis(300)).build(),
                    context -> {
                      // Lose the lease: give it back and let another caller take the key.
                      client.release(
                          ReleaseRequest.newBuilder()
                              .setNamespace(NS)
                              .setKey(key)
                              .setLeaseToken(context.leaseToken())
                              .build());
                      AcquireResponse thief =
                          client.acquire(
                              AcquireRequest.newBuilder().setNamespace(NS).setKey(key).build());
                      assertEquals(Outcome.OUTCOME_ACQUIRED, thief.getOutcome());
                      assertTrue(
                          Long.compareUnsigned(
                                  thief.getLease().getFencingToken(), context.fencingToken())
                              > 0);
                      thiefResult.set(1);
                      // A Renew (every 100 ms) finds the lease gone and says so.
                      LeaseLostException signalled =
                          context.leaseLost().get(10, TimeUnit.SECONDS);
                      assertEquals("LEASE_NOT_HELD", signalled.reason());
                      return StoredResult.of("late");
                    }));
    assertEquals("LEASE_NOT_HELD", lost.reason());
    assertEquals(1, thiefResult.get());
    assertEquals(RecordState.RECORD_STATE_IN_PROGRESS, record(key).getState());
  }

  @Test
  void aKeyReusedForAnotherRequestFailsWithFingerprintMismatch() {
    String key = uniqueKey("mismatch");
    AtomicInteger calls = new AtomicInteger();
    client.idempotent(
        NS,
        key,
        Map.of("amount", 100),
        context -> {
          calls.incrementAndGet();
          return StoredResult.of("ok");
        });
    FingerprintMismatchException mismatch =
        assertThrows(
            FingerprintMismatchException.class,
            () ->
                client.idempotent(
                    NS,
                    key,
                    Map.of("amount", 999),
                    IdempotentOptions.builder().failOpen(true).build(),
                    context -> {
                      calls.incrementAndGet();
                      return StoredResult.of("never");
                    }));
    assertEquals("FINGERPRINT_MISMATCH", mismatch.reason());
    assertEquals(io.grpc.Status.Code.FAILED_PRECONDITION, mismatch.code());
    assertEquals(1, calls.get());
    // A raw fingerprint is sent as it is.
    byte[] raw = Fingerprint.of(Map.of("amount", 100));
    assertTrue(client.idempotent(NS, key, raw, context -> StoredResult.of("x")).replayed());
    assertArrayEquals(raw, record(key).getFingerprint().toByteArray());
  }

  @Test
  void aRetryableFailureReleasesTheKeyAndATerminalOneCanBeStored() {
    String key = uniqueKey("failures");
    AtomicInteger calls = new AtomicInteger();
    assertThrows(
        RetryableException.class,
        () ->
            client.idempotent(
                NS,
                key,
                null,
                context -> {
                  calls.incrementAndGet();
                  throw new RetryableException("downstream timed out");
                }));
    // A plain exception marked retryable by the predicate: released too.
    assertThrows(
        java.io.UncheckedIOException.class,
        () ->
            client.idempotent(
                NS,
                key,
                null,
                IdempotentOptions.builder()
                    .retryable(failure -> failure instanceof java.io.UncheckedIOException)
                    .completeOnError(failure -> StoredResult.of("must not be stored"))
                    .build(),
                context -> {
                  calls.incrementAndGet();
                  throw new java.io.UncheckedIOException(new java.io.IOException("reset"));
                }));
    // A terminal failure with completeOnError: its result is stored and the failure rethrown.
    IllegalArgumentException declined =
        assertThrows(
            IllegalArgumentException.class,
            () ->
                client.idempotent(
                    NS,
                    key,
                    null,
                    IdempotentOptions.builder()
                        .completeOnError(
                            failure -> StoredResult.of(failure.getMessage().getBytes(), 402, Map.of()))
                        .build(),
                    context -> {
                      calls.incrementAndGet();
                      throw new IllegalArgumentException("card declined");
                    }));
    assertEquals("card declined", declined.getMessage());
    assertEquals(3, calls.get());
    IdempotentResult replay =
        client.idempotent(
            NS,
            key,
            null,
            context -> {
              calls.incrementAndGet();
              return StoredResult.of("never");
            });
    assertTrue(replay.replayed());
    assertEquals(402, replay.result().code());
    assertEquals("card declined", replay.result().bodyUtf8());
    assertEquals(3, calls.get());
  }

  @Test
  void aCheckedExceptionOfTheWorkIsRethrownAsItIs() {
    String key = uniqueKey("checked");
    java.io.IOException failure = new java.io.IOException("disk full");
    java.io.IOException thrown =
        assertThrows(
            java.io.IOException.class,
            () ->
                client.<java.io.IOException>idempotent(
                    NS,
                    key,
                    null,
                    context -> {
                      throw failure;
                    }));
    assertSame(failure, thrown);
    // Released: the key is free for the next caller.
    assertEquals(
        Outcome.OUTCOME_ACQUIRED,
        client
            .acquire(AcquireRequest.newBuilder().setNamespace(NS).setKey(key).build())
            .getOutcome());
  }

  @Test
  void anInvalidRequestNamesTheField() {
    InvalidRequestException invalid =
        assertThrows(
            InvalidRequestException.class,
            () -> client.idempotent("bad namespace!", "k", null, context -> StoredResult.of("x")));
    assertEquals("INVALID_REQUEST", invalid.reason());
    assertTrue(
        invalid.fieldViolations().stream().anyMatch(violation -> violation.field().equals("namespace")),
        invalid.fieldViolations().toString());
  }

  @Test
  void closeStopsEveryThreadTheClientStarted() throws Exception {
    Set<Thread> before = idemdThreads();
    IdempotencyClient own = IdempotencyClient.create(idemd.address());
    String key = uniqueKey("close");
    own.idempotent(
        NS,
        key,
        null,
        IdempotentOptions.builder().leaseTtl(Duration.ofMillis(60)).build(),
        context -> {
          Thread.sleep(100); // a few renewals run
          return StoredResult.of("done");
        });
    own.idempotentAsync(NS, uniqueKey("close-async"), null, context -> CompletableFuture.completedFuture(StoredResult.of("a")))
        .get(30, TimeUnit.SECONDS);
    Set<Thread> during = idemdThreads();
    during.removeAll(before);
    assertFalse(during.isEmpty(), "the client's own threads are visible while it is open");
    own.close();
    for (Thread thread : during) {
      thread.join(TimeUnit.SECONDS.toMillis(10));
      assertFalse(thread.isAlive(), thread.getName() + " outlived close()");
    }
    assertThrows(IdemdException.class, () -> own.get(GetRequest.newBuilder().setNamespace(NS).setKey(key).build()));
    assertNotNull(record(key));
  }

  private static Set<Thread> idemdThreads() {
    return Thread.getAllStackTraces().keySet().stream()
        .filter(thread -> thread.getName().startsWith("idemd-") && !thread.getName().startsWith("idemd-test"))
        .collect(Collectors.toSet());
  }

  @Test
  void exceptionsAreTyped() {
    IdemdException unknown = Errors.from(new RuntimeException("not grpc"));
    assertInstanceOf(IdemdException.class, unknown);
    assertEquals(io.grpc.Status.Code.UNKNOWN, unknown.code());
    assertInstanceOf(
        IdemdUnavailableException.class,
        Errors.from(io.grpc.Status.UNAVAILABLE.asRuntimeException()));
    // RESOURCE_EXHAUSTED without a reason is overload; no capacity refusal is "unavailable".
    IdemdException exhausted = Errors.from(io.grpc.Status.RESOURCE_EXHAUSTED.asRuntimeException());
    assertInstanceOf(OverloadedException.class, exhausted);
    assertFalse(exhausted instanceof IdemdUnavailableException);
    assertInstanceOf(
        IdemdInternalException.class, Errors.from(io.grpc.Status.INTERNAL.asRuntimeException()));
    // CANCELLED that this thread did not cause is the other side giving up: unreachable.
    assertInstanceOf(
        IdemdUnavailableException.class,
        Errors.from(io.grpc.Status.CANCELLED.withDescription("Timeout expired").asRuntimeException()));
    IdemdException interrupted =
        Errors.from(
            io.grpc.Status.CANCELLED.withCause(new InterruptedException()).asRuntimeException());
    assertFalse(interrupted instanceof IdemdUnavailableException);
  }
}
