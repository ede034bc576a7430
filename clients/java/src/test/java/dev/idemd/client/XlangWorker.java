package dev.idemd.client;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The Java worker of the cross-language test (tests/suite/cross_language.rs): {@code java
 * dev.idemd.client.XlangWorker ADDRESS} reads commands from stdin, one JSON line each: {@code
 * {"namespace", "repeats", "calls": [{"key", "request"}]}}; it answers {@code {"ready": true}} and
 * starts on the next line ("go"), so that every language starts at once. For every call it runs
 * the blocking helper {@code repeats} times, all runs of all calls at once (one thread each), with
 * the fingerprint this client computes from {@code request}. The work returns "java:KEY:N" (N
 * counts this worker's work runs, so two runs never return the same bytes). It prints one JSON line
 * per run: {@code {"key", "work_runs", "error" (a kind of clients/BEHAVIOUR.md, or null), "body",
 * "replayed"}}, then {@code {"done": number of runs}}. It ends when stdin closes.
 */
public final class XlangWorker {
  private static final String LANGUAGE = "java";
  private static final AtomicLong WORK_RUNS = new AtomicLong();

  private XlangWorker() {}

  /**
   * Serves commands until stdin closes.
   *
   * @param args ADDRESS
   * @throws Exception if the address or a command is unusable (a non-zero exit fails the test)
   */
  public static void main(String[] args) throws Exception {
    if (args.length != 1) {
      throw new IllegalArgumentException("usage: XlangWorker ADDRESS");
    }
    Gson gson = new GsonBuilder().serializeNulls().disableHtmlEscaping().create();
    PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
    BufferedReader in =
        new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    ExecutorService threads = Executors.newCachedThreadPool();
    try (IdempotencyClient client = IdempotencyClient.builder(args[0]).build()) {
      // A cold JVM's first connection is slow; make it before the first command, not inside it.
      client.connect(Duration.ofSeconds(10));
      String raw;
      while ((raw = in.readLine()) != null) {
        if (raw.isBlank()) {
          continue;
        }
        JsonObject command = gson.fromJson(raw, JsonObject.class);
        String namespace = command.get("namespace").getAsString();
        int repeats = command.get("repeats").getAsInt();
        out.println(gson.toJson(Map.of("ready", true)));
        out.flush();
        if (in.readLine() == null) {
          break;
        }
        List<Future<Map<String, Object>>> runs = new ArrayList<>();
        for (JsonElement call : command.getAsJsonArray("calls")) {
          String key = call.getAsJsonObject().get("key").getAsString();
          Object request = plain(call.getAsJsonObject().get("request"));
          for (int i = 0; i < repeats; i++) {
            runs.add(threads.submit(() -> runOne(client, namespace, key, request)));
          }
        }
        for (Future<Map<String, Object>> run : runs) {
          out.println(gson.toJson(run.get()));
        }
        out.println(gson.toJson(Map.of("done", runs.size())));
        out.flush();
      }
    } catch (ExecutionException failure) {
      throw new IllegalStateException("a run failed outside the helper", failure);
    } finally {
      threads.shutdownNow();
    }
    // grpc-java's shared threads would keep the JVM a moment longer than needed.
    System.exit(0);
  }

  private static Map<String, Object> runOne(
      IdempotencyClient client, String namespace, String key, Object request) {
    AtomicInteger executed = new AtomicInteger();
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("key", key);
    try {
      IdempotentResult result =
          client.idempotent(
              namespace,
              key,
              Fingerprint.of(request),
              context -> {
                executed.incrementAndGet();
                long n = WORK_RUNS.incrementAndGet();
                // The work takes a moment, as real work does, so other callers meet the key held.
                Thread.sleep(20);
                return StoredResult.of(LANGUAGE + ":" + key + ":" + n);
              });
      line.put("work_runs", executed.get());
      line.put("error", null);
      line.put("body", result.result().bodyUtf8());
      line.put("replayed", result.replayed());
    } catch (Exception failure) {
      line.put("work_runs", executed.get());
      line.put("error", BehaviourRunner.kind(failure));
      line.put("body", null);
      line.put("replayed", null);
      line.put("detail", failure.toString());
    }
    return line;
  }

  /** The request as the JSON values {@link Fingerprint#of(Object)} takes. */
  private static Object plain(JsonElement element) {
    if (element == null || element.isJsonNull()) {
      return null;
    }
    if (element.isJsonArray()) {
      List<Object> list = new ArrayList<>();
      for (JsonElement item : (JsonArray) element) {
        list.add(plain(item));
      }
      return list;
    }
    if (element.isJsonObject()) {
      Map<String, Object> map = new LinkedHashMap<>();
      for (Map.Entry<String, JsonElement> entry : element.getAsJsonObject().entrySet()) {
        map.put(entry.getKey(), plain(entry.getValue()));
      }
      return map;
    }
    JsonPrimitive primitive = element.getAsJsonPrimitive();
    if (primitive.isBoolean()) {
      return primitive.getAsBoolean();
    }
    if (primitive.isNumber()) {
      // JSON numbers are IEEE-754 doubles, as RFC 8785 reads them.
      return primitive.getAsDouble();
    }
    return primitive.getAsString();
  }
}
