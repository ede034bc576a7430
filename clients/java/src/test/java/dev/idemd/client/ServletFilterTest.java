package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.idemd.client.servlet.IdempotencyFilter;
import jakarta.servlet.DispatcherType;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.io.PrintWriter;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.EnumSet;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.eclipse.jetty.ee10.servlet.FilterHolder;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The Servlet filter in embedded Jetty against this build's idemd on PostgreSQL: what the HTTP
 * conformance suite's example app does not exercise (a handler that throws, a writer, a redirect,
 * a response too large to store, the bound of {@code waitUpTo}).
 */
class ServletFilterTest {
  private static final String NS = "java-servlet-filter-test";

  private static PostgresCluster postgres;
  private static IdemdProcess idemd;
  private static IdempotencyClient client;
  private static Server server;
  private static String base;
  private static final HttpClient HTTP = HttpClient.newHttpClient();

  private static final AtomicInteger runs = new AtomicInteger();
  private static volatile CountDownLatch started = new CountDownLatch(1);
  private static volatile CountDownLatch release = new CountDownLatch(0);

  /** Counts its runs; answers as the request's X-Mode header says. */
  private static final class Handler extends HttpServlet {
    private static final long serialVersionUID = 1L;

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      int run = runs.incrementAndGet();
      String body = request.getReader().lines().reduce("", String::concat);
      String mode = String.valueOf(request.getHeader("X-Mode"));
      switch (mode) {
        case "throw-first" -> {
          if (run == 1) {
            throw new IllegalStateException("the handler failed");
          }
          response.setStatus(201);
          response.getOutputStream().write(("ran " + run).getBytes(StandardCharsets.UTF_8));
        }
        case "writer" -> {
          response.setStatus(200);
          response.setContentType("text/plain; charset=utf-8");
          response.setHeader("ETag", "\"e" + run + "\"");
          response.setHeader("X-Not-Kept", "x");
          PrintWriter writer = response.getWriter();
          writer.print("héllo " + run + " " + body);
          writer.flush();
          response.flushBuffer(); // held by the filter: nothing is committed yet
        }
        case "redirect" -> response.sendRedirect("/done/" + run);
        case "large" -> {
          response.setStatus(201);
          response.getOutputStream().write(("large body " + run).getBytes(StandardCharsets.UTF_8));
        }
        case "block" -> {
          started.countDown();
          try {
            release.await(30, TimeUnit.SECONDS);
          } catch (InterruptedException interrupted) {
            Thread.currentThread().interrupt();
          }
          response.setStatus(201);
          response.getOutputStream().write(("blocked " + run).getBytes(StandardCharsets.UTF_8));
        }
        default -> response.setStatus(204);
      }
    }
  }

  @BeforeAll
  static void start() throws Exception {
    postgres = PostgresCluster.create();
    idemd = IdemdProcess.start("--database-url", postgres.url());
    client = IdempotencyClient.create(idemd.address());
    ServletContextHandler context = new ServletContextHandler();
    EnumSet<DispatcherType> requests = EnumSet.of(DispatcherType.REQUEST);
    context.addFilter(
        new FilterHolder(IdempotencyFilter.builder(client, NS).build()), "/plain", requests);
    context.addFilter(
        new FilterHolder(IdempotencyFilter.builder(client, NS).maxStoredBody(10).build()),
        "/small",
        requests);
    context.addFilter(
        new FilterHolder(
            IdempotencyFilter.builder(client, NS).waitUpTo(Duration.ofMillis(300)).build()),
        "/wait",
        requests);
    context.addFilter(
        new FilterHolder(IdempotencyFilter.builder(client, "not a namespace!").build()),
        "/misconfigured",
        requests);
    context.addServlet(new ServletHolder(new Handler()), "/*");
    server = new Server();
    ServerConnector connector = new ServerConnector(server);
    connector.setHost("127.0.0.1");
    connector.setPort(0);
    server.addConnector(connector);
    server.setHandler(context);
    server.start();
    base = "http://127.0.0.1:" + connector.getLocalPort();
  }

  @AfterAll
  static void stop() throws Exception {
    if (server != null) {
      server.stop();
    }
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

  private static HttpResponse<byte[]> post(String path, String key, String mode, String body)
      throws Exception {
    return HTTP.send(
        HttpRequest.newBuilder(URI.create(base + path))
            .header("Idempotency-Key", key)
            .header("X-Mode", mode)
            .header("Content-Type", "text/plain")
            .POST(HttpRequest.BodyPublishers.ofString(body))
            .build(),
        HttpResponse.BodyHandlers.ofByteArray());
  }

  private static String text(HttpResponse<byte[]> response) {
    return new String(response.body(), StandardCharsets.UTF_8);
  }

  @Test
  void aHandlerThatThrowsReleasesTheKeyAndTheRetryRuns() throws Exception {
    runs.set(0);
    String key = UUID.randomUUID().toString();
    HttpResponse<byte[]> failed = post("/plain", key, "throw-first", "b");
    assertEquals(500, failed.statusCode(), text(failed));
    HttpResponse<byte[]> retried = post("/plain", key, "throw-first", "b");
    assertEquals(201, retried.statusCode(), text(retried));
    assertEquals("ran 2", text(retried));
    HttpResponse<byte[]> replayed = post("/plain", key, "throw-first", "b");
    assertEquals("ran 2", text(replayed));
    assertEquals("true", replayed.headers().firstValue("Idempotent-Replayed").orElse(null));
    assertEquals(2, runs.get());
  }

  @Test
  void aWrittenResponseIsStoredAndReplayedByteForByte() throws Exception {
    runs.set(0);
    String key = UUID.randomUUID().toString();
    HttpResponse<byte[]> first = post("/plain", key, "writer", "the body");
    assertEquals(200, first.statusCode());
    // The handler read the body the filter had read before it.
    assertEquals("héllo 1 the body", text(first));
    assertEquals("x", first.headers().firstValue("X-Not-Kept").orElse(null));
    assertNull(first.headers().firstValue("Idempotent-Replayed").orElse(null));
    HttpResponse<byte[]> replayed = post("/plain", key, "writer", "the body");
    assertEquals(200, replayed.statusCode());
    assertArrayEquals(first.body(), replayed.body());
    assertEquals(
        first.headers().firstValue("Content-Type"), replayed.headers().firstValue("Content-Type"));
    assertEquals("\"e1\"", replayed.headers().firstValue("ETag").orElse(null));
    assertTrue(replayed.headers().firstValue("X-Not-Kept").isEmpty(), "not a kept header");
    assertEquals("true", replayed.headers().firstValue("Idempotent-Replayed").orElse(null));
    assertEquals(1, runs.get());
  }

  @Test
  void aRedirectIsStoredWithItsLocation() throws Exception {
    runs.set(0);
    String key = UUID.randomUUID().toString();
    HttpResponse<byte[]> first = post("/plain", key, "redirect", "");
    assertEquals(302, first.statusCode());
    assertEquals("/done/1", first.headers().firstValue("Location").orElse(null));
    HttpResponse<byte[]> replayed = post("/plain", key, "redirect", "");
    assertEquals(302, replayed.statusCode());
    assertEquals("/done/1", replayed.headers().firstValue("Location").orElse(null));
    assertEquals("true", replayed.headers().firstValue("Idempotent-Replayed").orElse(null));
    assertEquals(1, runs.get());
  }

  @Test
  void aResponseTooLargeToStoreIsSentAndTheKeyReleased() throws Exception {
    runs.set(0);
    String key = UUID.randomUUID().toString();
    HttpResponse<byte[]> first = post("/small", key, "large", "");
    assertEquals(201, first.statusCode());
    assertEquals("large body 1", text(first));
    // Released at once (not left to the lease's end): the retry runs again.
    HttpResponse<byte[]> second = post("/small", key, "large", "");
    assertEquals("large body 2", text(second));
    assertTrue(second.headers().firstValue("Idempotent-Replayed").isEmpty());
    assertEquals(2, runs.get());
  }

  @Test
  void aDuplicateWaitsOnlyUpToTheBoundThenGets409() throws Exception {
    runs.set(0);
    started = new CountDownLatch(1);
    release = new CountDownLatch(1);
    String key = UUID.randomUUID().toString();
    CompletableFuture<HttpResponse<byte[]>> first =
        CompletableFuture.supplyAsync(
            () -> {
              try {
                return post("/wait", key, "block", "");
              } catch (Exception failed) {
                throw new IllegalStateException(failed);
              }
            });
    assertTrue(started.await(30, TimeUnit.SECONDS), "the first request's handler started");
    // The first is held until this duplicate has its answer: the 409 comes from the bound.
    HttpResponse<byte[]> duplicate = post("/wait", key, "block", "");
    release.countDown();
    assertEquals(409, duplicate.statusCode(), text(duplicate));
    assertEquals(
        "application/problem+json", duplicate.headers().firstValue("Content-Type").orElse(null));
    assertTrue(
        Integer.parseInt(duplicate.headers().firstValue("Retry-After").orElse("0")) >= 1,
        "Retry-After of at least 1 s");
    assertEquals(201, first.get(30, TimeUnit.SECONDS).statusCode());
    assertEquals(1, runs.get());
    // Now that it is stored, a duplicate replays it.
    HttpResponse<byte[]> replayed = post("/wait", key, "block", "");
    assertEquals("blocked 1", text(replayed));
  }

  @Test
  void aMisconfiguredFilterAnswers500IdemdRejected() throws Exception {
    runs.set(0);
    HttpResponse<byte[]> rejected = post("/misconfigured", UUID.randomUUID().toString(), "", "");
    assertEquals(500, rejected.statusCode(), text(rejected));
    assertEquals(
        "application/problem+json", rejected.headers().firstValue("Content-Type").orElse(null));
    String document = text(rejected);
    assertTrue(
        document.contains("HTTP-MIDDLEWARE.md#idemd-rejected")
            && document.contains("INVALID_ARGUMENT"),
        document);
    assertEquals(0, runs.get(), "the handler did not run");
  }
}
