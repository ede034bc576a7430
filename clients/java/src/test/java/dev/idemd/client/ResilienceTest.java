package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import dev.idemd.idempotency.v1.AcquireRequest;
import dev.idemd.idempotency.v1.Outcome;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

/**
 * What the helper does when idemd or its database goes away: retries with backoff within the
 * deadline, fails closed (or open, when asked, and only when idemd is unreachable), and keeps
 * working across a restart of idemd and of PostgreSQL.
 */
class ResilienceTest {
  private static final String NS = ClientTest.NS;

  /** Retries for as long as a restart can take. */
  private static IdempotentOptions patient() {
    return IdempotentOptions.builder()
        .maxAttempts(Integer.MAX_VALUE)
        .deadline(Duration.ofSeconds(60))
        .build();
  }

  private static Work<RuntimeException> counting(AtomicInteger calls, String body) {
    return context -> {
      calls.incrementAndGet();
      return StoredResult.of(body);
    };
  }

  /** Waits until calls of {@code client} have retried more than {@code seen} times. */
  private static void awaitRetries(IdempotencyClient client, long seen) {
    awaitRetries(client, seen, null);
  }

  /**
   * Waits until calls of {@code client} have retried more than {@code seen} times; if {@code call}
   * ends first, fails with how it ended (a call answered by something else on the port, or failing
   * with an error the helper does not retry, never retries).
   */
  private static void awaitRetries(
      IdempotencyClient client, long seen, CompletableFuture<IdempotentResult> call) {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
    while (client.retries() <= seen) {
      if (call != null && call.isDone()) {
        fail("the call ended without retrying: " + describe(call));
      }
      assertTrue(System.nanoTime() < deadline, "the call never retried");
      try {
        TimeUnit.MILLISECONDS.sleep(5); // polls a condition; the client has no hook to await
      } catch (InterruptedException interrupted) {
        throw new IllegalStateException(interrupted);
      }
    }
  }

  private static String describe(CompletableFuture<IdempotentResult> call) {
    try {
      return "it returned " + call.getNow(null);
    } catch (RuntimeException failed) {
      return "it failed with " + failed.getCause();
    }
  }

  @Test
  void anUnreachableIdemdIsRetriedUntilTheDeadlineThenFailsClosed() throws Exception {
    String address = "127.0.0.1:" + IdemdProcess.freePort();
    AtomicInteger calls = new AtomicInteger();
    try (IdempotencyClient client = IdempotencyClient.create(address)) {
      long started = System.nanoTime();
      IdemdUnavailableException unavailable =
          assertThrows(
              IdemdUnavailableException.class,
              () ->
                  client.idempotent(
                      NS,
                      ClientTest.uniqueKey("closed"),
                      null,
                      IdempotentOptions.builder().maxAttempts(1_000).deadline(Duration.ofMillis(700)).build(),
                      counting(calls, "never")));
      long elapsedMillis = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started);
      assertEquals(io.grpc.Status.Code.UNAVAILABLE, unavailable.code());
      assertEquals(0, calls.get(), "fail closed: the work did not run");
      assertTrue(elapsedMillis >= 700, "retried until the deadline, gave up after " + elapsedMillis + " ms");
      assertTrue(elapsedMillis < 10_000, "gave up long after the deadline: " + elapsedMillis + " ms");

      IdempotentResult unprotected =
          client.idempotent(
              NS,
              ClientTest.uniqueKey("open"),
              null,
              IdempotentOptions.builder().deadline(Duration.ZERO).failOpen(true).build(),
              context -> {
                assertFalse(context.isProtected());
                assertEquals(0, context.fencingToken());
                calls.incrementAndGet();
                return StoredResult.of("unprotected");
              });
      assertFalse(unprotected.isProtected());
      assertFalse(unprotected.replayed());
      assertEquals("unprotected", unprotected.result().bodyUtf8());
      assertEquals(1, calls.get());
    }
  }

  @Test
  void acquireTimeoutBoundsAnAcquireThatGetsNoAnswer() throws Exception {
    // A port that accepts connections (the kernel's backlog does) and never answers: a hung idemd.
    try (java.net.ServerSocket silent =
            new java.net.ServerSocket(0, 50, java.net.InetAddress.getLoopbackAddress());
        IdempotencyClient client =
            IdempotencyClient.builder("127.0.0.1:" + silent.getLocalPort())
                .rpcTimeout(Duration.ofSeconds(30))
                .build()) {
      AtomicInteger calls = new AtomicInteger();
      IdempotentOptions bounded =
          IdempotentOptions.builder().maxAttempts(2).acquireTimeout(Duration.ofMillis(500)).build();
      long started = System.nanoTime();
      IdemdUnavailableException unavailable =
          assertThrows(
              IdemdUnavailableException.class,
              () -> client.idempotent(NS, ClientTest.uniqueKey("hung"), null, bounded, counting(calls, "never")));
      long elapsedMillis = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started);
      assertEquals(0, calls.get(), "fail closed: the work did not run");
      // Each call's deadline ended with the budget, not with the 30 s rpcTimeout.
      assertTrue(elapsedMillis >= 500, "gave up before the budget: " + elapsedMillis + " ms " + unavailable);
      assertTrue(elapsedMillis < 10_000, "gave up long after the budget: " + elapsedMillis + " ms");

      IdempotentResult unprotected =
          client.idempotent(
              NS,
              ClientTest.uniqueKey("hung-open"),
              null,
              IdempotentOptions.builder().acquireTimeout(Duration.ofMillis(200)).failOpen(true).build(),
              counting(calls, "unprotected"));
      assertFalse(unprotected.isProtected());
      assertEquals(1, calls.get());
    }
  }

  @Test
  void anInterruptStopsTheRetriesAndNeverFailsOpen() throws Exception {
    String address = "127.0.0.1:" + IdemdProcess.freePort();
    AtomicInteger calls = new AtomicInteger();
    try (IdempotencyClient client = IdempotencyClient.create(address)) {
      CompletableFuture<Throwable> thrown = new CompletableFuture<>();
      CompletableFuture<Boolean> stillInterrupted = new CompletableFuture<>();
      Thread caller =
          new Thread(
              () -> {
                try {
                  client.idempotent(
                      NS,
                      ClientTest.uniqueKey("interrupted"),
                      null,
                      IdempotentOptions.builder()
                          .maxAttempts(Integer.MAX_VALUE)
                          .failOpen(true)
                          .build(),
                      counting(calls, "never"));
                  thrown.complete(null);
                } catch (RuntimeException failure) {
                  thrown.complete(failure);
                }
                stillInterrupted.complete(Thread.currentThread().isInterrupted());
              });
      caller.start();
      awaitRetries(client, 0); // it is retrying the closed port
      caller.interrupt();
      Throwable failure = thrown.get(30, TimeUnit.SECONDS);
      assertTrue(failure instanceof IdemdException, "an IdemdException, not " + failure);
      assertFalse(failure instanceof IdemdUnavailableException, failure.toString());
      assertEquals(io.grpc.Status.Code.CANCELLED, ((IdemdException) failure).code());
      assertTrue(stillInterrupted.get(30, TimeUnit.SECONDS), "the interrupt flag is kept");
      assertEquals(0, calls.get(), "the caller gave up: no fail-open");
    }
  }

  @Test
  void resourceExhaustedNeverFailsOpen() throws Exception {
    // A memory store that holds one record: a second key is refused RESOURCE_EXHAUSTED /
    // STORE_FULL. idemd is reachable, so failOpen must not run the work unprotected.
    try (IdemdProcess idemd = IdemdProcess.start("--max-records", "1");
        IdempotencyClient client = IdempotencyClient.create(idemd.address())) {
      assertEquals(
          Outcome.OUTCOME_ACQUIRED,
          client
              .acquire(
                  AcquireRequest.newBuilder().setNamespace(NS).setKey("the-only-record").build())
              .getOutcome());
      AtomicInteger calls = new AtomicInteger();
      StoreFullException full =
          assertThrows(
              StoreFullException.class,
              () ->
                  client.idempotent(
                      NS,
                      "a-second-record",
                      null,
                      IdempotentOptions.builder().failOpen(true).deadline(Duration.ofMillis(200)).build(),
                      counting(calls, "never")));
      assertEquals("STORE_FULL", full.reason());
      assertEquals(io.grpc.Status.Code.RESOURCE_EXHAUSTED, full.code());
      assertEquals(0, calls.get(), "the work ran unprotected on RESOURCE_EXHAUSTED");
    }
  }

  @Test
  void aCallMadeBeforeIdemdIsUpSucceedsOnceItServes() throws Exception {
    String address = "127.0.0.1:" + IdemdProcess.freePort();
    AtomicInteger calls = new AtomicInteger();
    try (IdempotencyClient client = IdempotencyClient.create(address)) {
      String key = ClientTest.uniqueKey("late");
      CompletableFuture<IdempotentResult> early =
          client.idempotentAsync(
              NS,
              key,
              Map.of("late", true),
              patient(),
              context -> {
                calls.incrementAndGet();
                return CompletableFuture.completedFuture(StoredResult.of("served late"));
              });
      // Start idemd only once the call has met the closed port and is retrying.
      awaitRetries(client, 0, early);
      IdemdProcess idemd = IdemdProcess.startOn(address);
      try {
        IdempotentResult result = early.get(60, TimeUnit.SECONDS);
        assertFalse(result.replayed());
        assertEquals("served late", result.result().bodyUtf8());
        assertEquals(1, calls.get());
      } finally {
        idemd.kill();
      }
    }
  }

  @Test
  void theClientKeepsWorkingAcrossAnIdemdRestart() throws Exception {
    String address = "127.0.0.1:" + IdemdProcess.freePort();
    AtomicInteger calls = new AtomicInteger();
    String before = ClientTest.uniqueKey("before-restart");
    String during = ClientTest.uniqueKey("during-restart");
    String leased = ClientTest.uniqueKey("leased-across-restart");
    IdempotentOptions patient = patient();
    try (PostgresCluster postgres = PostgresCluster.create();
        IdempotencyClient client = IdempotencyClient.create(address)) {
      IdemdProcess idemd = IdemdProcess.startOn(address, "--database-url", postgres.url());
      try {
        client.idempotent(NS, before, null, patient, counting(calls, "stored before"));

        // idemd dies; a call made while it is down succeeds once it is back.
        idemd.kill();
        long retries = client.retries();
        CompletableFuture<IdempotentResult> waiting =
            client.idempotentAsync(
                NS,
                during,
                null,
                patient,
                context -> CompletableFuture.completedFuture(StoredResult.of("stored during")));
        awaitRetries(client, retries, waiting);
        idemd = IdemdProcess.startOn(address, "--database-url", postgres.url());
        assertEquals("stored during", waiting.get(60, TimeUnit.SECONDS).result().bodyUtf8());

        // idemd restarts while the work holds a lease: Complete reaches the new process and
        // the lease (kept in PostgreSQL) is still the caller's.
        IdemdProcess[] current = {idemd};
        IdempotentResult completed =
            client.idempotent(
                NS,
                leased,
                null,
                patient,
                context -> {
                  current[0].kill();
                  current[0] = IdemdProcess.startOn(address, "--database-url", postgres.url());
                  return StoredResult.of("completed after restart");
                });
        idemd = current[0];
        assertFalse(completed.replayed());
        assertEquals("completed after restart", completed.result().bodyUtf8());

        // Everything stored before the restarts replays from the database.
        IdempotentResult replay = client.idempotent(NS, before, null, patient, counting(calls, "again"));
        assertTrue(replay.replayed());
        assertEquals("stored before", replay.result().bodyUtf8());
        assertEquals(1, calls.get());
        assertTrue(client.idempotent(NS, leased, null, patient, counting(calls, "x")).replayed());
      } finally {
        idemd.kill();
      }
    }
  }

  @Test
  void theClientKeepsWorkingAcrossAPostgresRestart() throws Exception {
    AtomicInteger calls = new AtomicInteger();
    String before = ClientTest.uniqueKey("before-pg-restart");
    String during = ClientTest.uniqueKey("during-pg-restart");
    IdempotentOptions patient = patient();
    try (PostgresCluster postgres = PostgresCluster.create();
        IdemdProcess idemd = IdemdProcess.start("--database-url", postgres.url());
        IdempotencyClient client = IdempotencyClient.create(idemd.address())) {
      client.idempotent(NS, before, null, patient, counting(calls, "stored before"));

      postgres.crash();
      // The outage is real: idemd answers UNAVAILABLE (STORE_UNAVAILABLE) while it lasts.
      IdemdUnavailableException outage =
          assertThrows(
              IdemdUnavailableException.class,
              () ->
                  client.acquire(
                      AcquireRequest.newBuilder().setNamespace(NS).setKey(during).build()));
      assertEquals("STORE_UNAVAILABLE", outage.reason());

      CompletableFuture<IdempotentResult> waiting =
          client.idempotentAsync(
              NS,
              during,
              null,
              patient,
              context -> {
                calls.incrementAndGet();
                return CompletableFuture.completedFuture(StoredResult.of("stored after outage"));
              });
      awaitRetries(client, 0, waiting);
      postgres.start();
      IdempotentResult result = waiting.get(60, TimeUnit.SECONDS);
      assertFalse(result.replayed());
      assertEquals("stored after outage", result.result().bodyUtf8());

      IdempotentResult replay = client.idempotent(NS, before, null, patient, counting(calls, "again"));
      assertTrue(replay.replayed());
      assertEquals("stored before", replay.result().bodyUtf8());
      assertEquals(2, calls.get());
    }
  }
}
