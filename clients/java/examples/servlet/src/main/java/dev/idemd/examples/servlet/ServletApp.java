package dev.idemd.examples.servlet;

import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.gson.JsonPrimitive;
import dev.idemd.client.IdempotencyClient;
import dev.idemd.client.servlet.IdempotencyFilter;
import jakarta.servlet.DispatcherType;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.time.Duration;
import java.util.EnumSet;
import java.util.UUID;
import org.eclipse.jetty.ee10.servlet.FilterHolder;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;

/**
 * The example app of the Servlet filter, and the Java app of the HTTP conformance suite: embedded
 * Jetty 12 (ee10) serving the routes of clients/HTTP-MIDDLEWARE.md §6, configured by environment
 * variables (PORT, IDEMD_ADDR, IDEMD_TOKEN, NAMESPACE, LEASE_MS, IDEMD_TIMEOUT_MS, EFFECTS_FILE).
 * It logs to stderr only and stops on SIGTERM.
 */
public final class ServletApp {
  private ServletApp() {}

  public static void main(String[] args) throws Exception {
    int port = Integer.parseInt(required("PORT"));
    String target = required("IDEMD_ADDR").replaceFirst("^https?://", "");
    String namespace = required("NAMESPACE");
    Duration lease = Duration.ofMillis(Long.parseLong(required("LEASE_MS")));
    Duration idemdTimeout = Duration.ofMillis(Long.parseLong(required("IDEMD_TIMEOUT_MS")));
    Path effects = Path.of(required("EFFECTS_FILE"));

    IdempotencyClient.Builder clientBuilder = IdempotencyClient.builder(target);
    String token = System.getenv("IDEMD_TOKEN");
    if (token != null && !token.isEmpty()) {
      clientBuilder.token(token);
    }
    IdempotencyClient idemd = clientBuilder.build();
    // Connect ahead of the first request, so it does not spend its time connecting (a dead idemd
    // answers false at once: the filter then fails closed, or open, per route).
    idemd.connect(Duration.ofSeconds(5));

    ServletContextHandler context = new ServletContextHandler();
    EnumSet<DispatcherType> requests = EnumSet.of(DispatcherType.REQUEST);
    // The one line per route that makes it idempotent (what differs between routes: options).
    IdempotencyFilter.Builder orders =
        IdempotencyFilter.builder(idemd, namespace)
            .keyRequired(true)
            .scope(ServletApp::tenant)
            .leaseTtl(lease)
            .idemdTimeout(idemdTimeout);
    context.addFilter(new FilterHolder(orders.build()), "/orders", requests);
    context.addFilter(
        new FilterHolder(orders.waitUpTo(Duration.ofSeconds(10)).build()), "/orders-wait", requests);
    context.addFilter(
        new FilterHolder(
            IdempotencyFilter.builder(idemd, namespace)
                .leaseTtl(lease)
                .idemdTimeout(idemdTimeout)
                .build()),
        "/notes",
        requests);
    context.addFilter(
        new FilterHolder(
            IdempotencyFilter.builder(idemd, namespace)
                .keyRequired(true)
                .failOpen(true)
                .leaseTtl(lease)
                .idemdTimeout(idemdTimeout)
                .build()),
        "/open",
        requests);

    Effects log = new Effects(effects);
    context.addServlet(new ServletHolder(new Health()), "/health");
    context.addServlet(new ServletHolder(new Orders(log)), "/orders");
    context.addServlet(new ServletHolder(new Orders(log)), "/orders-wait");
    context.addServlet(new ServletHolder(new Simple(log, "notes", 201)), "/notes");
    context.addServlet(new ServletHolder(new Simple(log, "open", 201)), "/open");
    context.addServlet(new ServletHolder(new Simple(log, "put", 200)), "/orders/*");

    Server server = new Server(new InetSocketAddress("127.0.0.1", port));
    server.setHandler(context);
    server.setStopAtShutdown(true); // SIGTERM: stop serving, then exit
    server.start();
    System.err.println("servlet app listening on 127.0.0.1:" + port);
    server.join();
    idemd.close();
  }

  private static String required(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      System.err.println("servlet app: environment variable " + name + " is required");
      System.exit(2);
    }
    return value;
  }

  /** The scope of the order routes: the tenant header, {@code anonymous} without one. */
  private static String tenant(HttpServletRequest request) {
    String tenant = request.getHeader("X-Tenant");
    return tenant == null ? "anonymous" : tenant;
  }

  /** The body's {@code "id"}, or {@code null} when the body is not a JSON object with one. */
  private static JsonElement idOf(HttpServletRequest request) throws IOException {
    byte[] body = request.getInputStream().readAllBytes();
    try {
      JsonElement json = JsonParser.parseString(new String(body, StandardCharsets.UTF_8));
      if (json.isJsonObject() && json.getAsJsonObject().has("id")) {
        return json.getAsJsonObject().get("id");
      }
    } catch (RuntimeException notJson) {
      // No id: the effect line says "-".
    }
    return null;
  }

  /** The {@code X-Status} asked for, or 0 for none (or not a status). */
  private static int statusOf(String header) {
    if (header == null) {
      return 0;
    }
    try {
      int code = Integer.parseInt(header.trim());
      return code >= 200 && code <= 599 ? code : 0;
    } catch (NumberFormatException notAStatus) {
      return 0;
    }
  }

  private static String effectId(JsonElement id) {
    if (id == null || id.isJsonNull()) {
      return "-";
    }
    return id.isJsonPrimitive() && id.getAsJsonPrimitive().isString() ? id.getAsString() : id.toString();
  }

  private static void json(HttpServletResponse response, int status, JsonObject body)
      throws IOException {
    byte[] bytes = body.toString().getBytes(StandardCharsets.UTF_8);
    response.setStatus(status);
    response.setContentType("application/json");
    response.setContentLength(bytes.length);
    response.getOutputStream().write(bytes);
  }

  /** The side-effect log: one line per run of a handler, appended with O_APPEND. */
  private static final class Effects {
    private final Path file;

    Effects(Path file) {
      this.file = file;
    }

    void append(String route, String id) throws IOException {
      Files.write(
          file,
          (route + " " + id + "\n").getBytes(StandardCharsets.UTF_8),
          StandardOpenOption.CREATE,
          StandardOpenOption.WRITE,
          StandardOpenOption.APPEND);
    }
  }

  private static final class Health extends HttpServlet {
    private static final long serialVersionUID = 1L;

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      response.setContentType("text/plain");
      response.getOutputStream().write("ok".getBytes(StandardCharsets.UTF_8));
    }
  }

  /** The order handler; {@code GET /orders} appends {@code list} instead. */
  private static final class Orders extends HttpServlet {
    private static final long serialVersionUID = 1L;
    private final transient Effects effects;

    Orders(Effects effects) {
      this.effects = effects;
    }

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      effects.append("list", effectId(idOf(request)));
      JsonObject body = new JsonObject();
      body.addProperty("run", UUID.randomUUID().toString());
      json(response, 200, body);
    }

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      JsonElement id = idOf(request);
      effects.append("orders", effectId(id));
      String run = UUID.randomUUID().toString();
      String delay = request.getHeader("X-Delay-Ms");
      if (delay != null) {
        try {
          Thread.sleep(Long.parseLong(delay.trim()));
        } catch (NumberFormatException ignored) {
          // Not a delay: none.
        } catch (InterruptedException interrupted) {
          Thread.currentThread().interrupt();
          throw new IOException("interrupted", interrupted);
        }
      }
      if ("1".equals(request.getHeader("X-Fail"))) {
        JsonObject body = new JsonObject();
        body.addProperty("error", "failed");
        json(response, 500, body);
        return;
      }
      int code = statusOf(request.getHeader("X-Status"));
      if (code != 0) {
        JsonObject body = new JsonObject();
        body.addProperty("status", code);
        body.addProperty("run", run);
        json(response, code, body);
        return;
      }
      String tenant = request.getHeader("X-Tenant");
      JsonObject body = new JsonObject();
      body.addProperty("run", run);
      body.add("id", id == null ? JsonNull.INSTANCE : id);
      body.add("tenant", new JsonPrimitive(tenant == null ? "anonymous" : tenant));
      response.setHeader("Location", "/orders/" + run);
      response.addHeader("Set-Cookie", "s=" + run);
      response.setHeader("X-Run", run);
      json(response, 201, body);
    }
  }

  /** {@code /notes}, {@code /open} and {@code PUT /orders/{id}}: one effect line, {@code {"run"}}. */
  private static final class Simple extends HttpServlet {
    private static final long serialVersionUID = 1L;
    private final transient Effects effects;
    private final String route;
    private final int status;

    Simple(Effects effects, String route, int status) {
      this.effects = effects;
      this.route = route;
      this.status = status;
    }

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      answer(request, response);
    }

    @Override
    protected void doPut(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      answer(request, response);
    }

    private void answer(HttpServletRequest request, HttpServletResponse response)
        throws IOException {
      effects.append(route, effectId(idOf(request)));
      JsonObject body = new JsonObject();
      body.addProperty("run", UUID.randomUUID().toString());
      json(response, status, body);
    }
  }
}
