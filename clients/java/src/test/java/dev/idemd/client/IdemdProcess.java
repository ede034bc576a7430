package dev.idemd.client;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** An {@code idemd serve} process of this build ({@code $IDEMD_BINARY}), for the tests. */
final class IdemdProcess implements AutoCloseable {
  private static final Pattern SERVING = Pattern.compile("serving gRPC on (\\S+:\\d+)");

  private final Process process;
  private final String address;
  private final StringBuffer log = new StringBuffer();

  private IdemdProcess(String listen, List<String> args) throws Exception {
    String binary = System.getenv("IDEMD_BINARY");
    if (binary == null || binary.isEmpty()) {
      // No default: a binary left by an earlier build could be stale. cargo test sets it.
      throw new IllegalStateException(
          "IDEMD_BINARY is not set: set it to the idemd binary to test (cargo test sets it)");
    }
    List<String> command = new ArrayList<>();
    command.add(binary);
    command.add("serve");
    command.addAll(
        List.of(
            "--listen", listen, "--metrics-listen", "127.0.0.1:0", "--min-lease-ttl", "10ms"));
    command.addAll(args);
    ProcessBuilder builder = new ProcessBuilder(command);
    // Only what the test passes configures idemd, not IDEMD_* settings of the surrounding run.
    builder.environment().keySet().removeIf(name -> name.startsWith("IDEMD_"));
    builder.environment().put("NO_COLOR", "1");
    builder.redirectInput(ProcessBuilder.Redirect.PIPE);
    builder.redirectOutput(ProcessBuilder.Redirect.DISCARD);
    process = builder.start();
    process.getOutputStream().close();
    CompletableFuture<String> announced = new CompletableFuture<>();
    Thread drain =
        new Thread(
            () -> {
              // Read stderr for the whole life of the process, so idemd never blocks on it.
              try (BufferedReader lines =
                  new BufferedReader(
                      new InputStreamReader(process.getErrorStream(), StandardCharsets.UTF_8))) {
                String line;
                while ((line = lines.readLine()) != null) {
                  log.append(line).append('\n');
                  Matcher serving = SERVING.matcher(line);
                  if (serving.find()) {
                    announced.complete(serving.group(1));
                  }
                }
              } catch (IOException closed) {
                // The process ended.
              }
              announced.completeExceptionally(
                  new IllegalStateException("idemd exited before serving:\n" + log));
            },
            "idemd-test-log");
    drain.setDaemon(true);
    drain.start();
    try {
      address = announced.get(60, TimeUnit.SECONDS);
    } catch (Exception notServing) {
      process.destroyForcibly();
      throw new IllegalStateException("idemd did not start:\n" + log, notServing);
    }
  }

  /** Starts idemd on a free port with {@code args} (e.g. a database URL). */
  static IdemdProcess start(String... args) throws Exception {
    return new IdemdProcess("127.0.0.1:0", List.of(args));
  }

  /** Starts idemd on {@code listen} ({@code host:port}), so a restart keeps its address. */
  static IdemdProcess startOn(String listen, String... args) throws Exception {
    return new IdemdProcess(listen, List.of(args));
  }

  /** A port on 127.0.0.1 that nothing listens on now. */
  static int freePort() throws IOException {
    try (ServerSocket socket = new ServerSocket(0)) {
      return socket.getLocalPort();
    }
  }

  /** {@code host:port} of the gRPC listener. */
  String address() {
    return address;
  }

  /** Everything idemd logged so far. */
  String log() {
    return log.toString();
  }

  /** SIGKILL, the way a crashed or evicted pod ends, then waits for the process to be gone. */
  void kill() {
    process.destroyForcibly();
    try {
      process.waitFor(30, TimeUnit.SECONDS);
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
    }
  }

  @Override
  public void close() {
    kill();
  }
}
