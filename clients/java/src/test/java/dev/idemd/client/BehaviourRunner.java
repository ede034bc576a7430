package dev.idemd.client;

import com.google.gson.Gson;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * The Java runner of the client behaviour suite (clients/BEHAVIOUR.md, "Running the suite"):
 * {@code java dev.idemd.client.BehaviourRunner ADDRESS CASES_FILE CASE_NAME} runs the helper once
 * against ADDRESS with the case's options and work, and prints one line of JSON: {@code error} (a
 * kind, or null), {@code work_runs}, and on success {@code body}, {@code replayed}, {@code
 * protected}. It exits 0 whatever the outcome.
 */
public final class BehaviourRunner {
  /** The fingerprint every runner sends: the fake's completed records carry the last one seen. */
  private static final byte[] FINGERPRINT = "behaviour-fingerprint".getBytes(StandardCharsets.UTF_8);

  private BehaviourRunner() {}

  /**
   * Runs one case.
   *
   * @param args ADDRESS CASES_FILE CASE_NAME
   * @throws Exception if the arguments or the case file are unusable (a non-zero exit fails the
   *     case)
   */
  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      throw new IllegalArgumentException("usage: BehaviourRunner ADDRESS CASES_FILE CASE_NAME");
    }
    JsonObject file = new Gson().fromJson(Files.readString(Path.of(args[1])), JsonObject.class);
    JsonObject testCase = null;
    for (JsonElement element : file.getAsJsonArray("cases")) {
      if (element.getAsJsonObject().get("name").getAsString().equals(args[2])) {
        testCase = element.getAsJsonObject();
      }
    }
    if (testCase == null) {
      throw new IllegalArgumentException("no case " + args[2]);
    }
    JsonObject options = file.getAsJsonObject("defaults").deepCopy();
    if (testCase.has("options")) {
      for (Map.Entry<String, JsonElement> entry : testCase.getAsJsonObject("options").entrySet()) {
        options.add(entry.getKey(), entry.getValue());
      }
    }
    JsonObject work =
        testCase.has("work") ? testCase.getAsJsonObject("work") : file.getAsJsonObject("default_work");
    Map<String, Object> outcome = run(args[0], args[2], options, work);
    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    out.println(new Gson().newBuilder().serializeNulls().create().toJson(outcome));
    // grpc-java's shared threads would keep the JVM a moment longer than needed.
    System.exit(0);
  }

  private static long millis(JsonObject options, String name) {
    return options.get(name).getAsLong();
  }

  private static Map<String, Object> run(
      String address, String key, JsonObject options, JsonObject work)
      throws InterruptedException {
    IdempotentOptions.Builder helper =
        IdempotentOptions.builder()
            .failOpen(options.get("fail_open").getAsBoolean())
            .maxAttempts(options.get("max_attempts").getAsInt())
            .backoff(
                Duration.ofMillis(millis(options, "backoff_initial_ms")),
                Duration.ofMillis(millis(options, "backoff_max_ms")))
            .maxWaits(options.get("max_waits").getAsInt())
            .waitTimeout(Duration.ofMillis(millis(options, "wait_timeout_ms")))
            .leaseTtl(Duration.ofMillis(millis(options, "lease_ttl_ms")));
    String fails = work.has("fails") ? work.get("fails").getAsString() : null;
    if (work.has("store")) {
      String stored = work.get("store").getAsString();
      helper.completeOnError(failure -> StoredResult.of(stored));
    }
    AtomicInteger runs = new AtomicInteger();
    Map<String, Object> outcome = new LinkedHashMap<>();
    try (IdempotencyClient client =
        IdempotencyClient.builder(address)
            .rpcTimeout(Duration.ofMillis(millis(options, "rpc_timeout_ms")))
            .build()) {
      // Connect first, as the other runners do: a cold JVM can take longer to set up its first
      // connection than a case's rpc_timeout, and the case is about the helper, not the warm-up.
      // (Against a closed port this gives up at once and the helper meets the refusal itself.)
      client.connect(Duration.ofSeconds(5));
      IdempotentResult result =
          client.idempotent(
              "behaviour",
              key,
              FINGERPRINT,
              helper.build(),
              context -> {
                runs.incrementAndGet();
                if ("retryable".equals(fails)) {
                  throw new RetryableException("retryable");
                }
                if ("terminal".equals(fails)) {
                  throw new WorkFailed("terminal");
                }
                if (!work.has("returns")) {
                  throw new RetryableException("unknown work " + work);
                }
                return StoredResult.of(work.get("returns").getAsString());
              });
      outcome.put("error", null);
      outcome.put("work_runs", runs.get());
      outcome.put("body", result.result().bodyUtf8());
      outcome.put("replayed", result.replayed());
      outcome.put("protected", result.isProtected());
    } catch (RuntimeException failure) {
      outcome.put("error", kind(failure));
      outcome.put("work_runs", runs.get());
      outcome.put("body", null);
      outcome.put("replayed", null);
      outcome.put("protected", null);
      outcome.put("detail", failure.toString());
    }
    return outcome;
  }

  /** The work's own failure in the terminal cases. */
  private static final class WorkFailed extends RuntimeException {
    private static final long serialVersionUID = 1L;

    WorkFailed(String message) {
      super(message);
    }
  }

  /** The kind (BEHAVIOUR.md, "The errors by language") of what the helper threw. */
  static String kind(Throwable failure) {
    if (failure instanceof RetryableException || failure instanceof WorkFailed) {
      return "work_failed";
    }
    if (failure instanceof IdemdUnavailableException) {
      return "unavailable";
    }
    if (failure instanceof RateLimitedException) {
      return "rate_limited";
    }
    if (failure instanceof OverloadedException) {
      return "overloaded";
    }
    if (failure instanceof StoreFullException) {
      return "store_full";
    }
    if (failure instanceof UnauthenticatedException) {
      return "unauthenticated";
    }
    if (failure instanceof PermissionDeniedException) {
      return "permission_denied";
    }
    if (failure instanceof InvalidRequestException) {
      return "invalid_request";
    }
    if (failure instanceof FingerprintMismatchException) {
      return "fingerprint_mismatch";
    }
    if (failure instanceof LeaseLostException) {
      return "lease_lost";
    }
    if (failure instanceof InProgressException) {
      return "in_progress";
    }
    if (failure instanceof IdemdInternalException) {
      return "internal";
    }
    if (failure instanceof IdemdException) {
      return "rpc_error";
    }
    return "unmapped: " + failure;
  }
}
