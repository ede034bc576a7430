package dev.idemd.client;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;

/**
 * A PostgreSQL cluster of the tests' own (initdb in a temporary folder, on a free port) that they
 * may crash and start again. PostgreSQL refuses to run as root: as root, its tools run as the
 * {@code postgres} OS user.
 */
final class PostgresCluster implements AutoCloseable {
  private static final String BIN =
      System.getenv().getOrDefault("IDEMD_PG_BIN", "/usr/lib/postgresql/15/bin");
  private static final boolean ROOT = "root".equals(System.getProperty("user.name"));

  private final Path dir;
  private final int port;

  private PostgresCluster() throws Exception {
    dir = Files.createTempDirectory(Path.of("/tmp"), "idemd-java-pg-");
    if (ROOT) {
      run(List.of("chown", "-R", "postgres:postgres", dir.toString()), "chown the cluster folder");
    }
    run(
        tool("initdb", "-D", data(), "-A", "trust", "-U", "postgres", "--no-sync"),
        "initdb");
    port = IdemdProcess.freePort();
    start();
  }

  static PostgresCluster create() throws Exception {
    return new PostgresCluster();
  }

  private String data() {
    return dir.resolve("data").toString();
  }

  /** The URL of the cluster's {@code postgres} database, for idemd's --database-url. */
  String url() {
    return "postgres://postgres@127.0.0.1:" + port + "/postgres";
  }

  /** Starts (or restarts) the server on the same port and data, waiting until it accepts. */
  void start() throws Exception {
    run(
        tool(
            "pg_ctl",
            "-D",
            data(),
            "-l",
            dir.resolve("server.log").toString(),
            "-o",
            "-p " + port + " -k " + dir + " -c listen_addresses=127.0.0.1",
            "-w",
            "-t",
            "60",
            "start"),
        "pg_ctl start");
  }

  /** Stops the server the way a crash does: no checkpoint, connections cut. */
  void crash() throws IOException, InterruptedException {
    run(tool("pg_ctl", "-D", data(), "-m", "immediate", "-w", "stop"), "pg_ctl stop");
  }

  @Override
  public void close() throws IOException {
    try {
      crash();
    } catch (IllegalStateException alreadyStopped) {
      // Stopped by the test; nothing to do.
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
    }
    try (Stream<Path> paths = Files.walk(dir)) {
      paths.sorted(Comparator.reverseOrder()).forEach(path -> path.toFile().delete());
    }
  }

  private static List<String> tool(String name, String... args) {
    List<String> command = new ArrayList<>();
    if (ROOT) {
      command.addAll(List.of("runuser", "-u", "postgres", "--"));
    }
    command.add(BIN + "/" + name);
    command.addAll(List.of(args));
    return command;
  }

  private static void run(List<String> command, String what) throws IOException, InterruptedException {
    Process process = new ProcessBuilder(command).redirectErrorStream(true).start();
    process.getOutputStream().close();
    byte[] output = process.getInputStream().readAllBytes();
    if (!process.waitFor(120, TimeUnit.SECONDS) || process.exitValue() != 0) {
      throw new IllegalStateException(
          what + " failed: " + new String(output, StandardCharsets.UTF_8));
    }
  }
}
