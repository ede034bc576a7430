package dev.idemd.client.servlet;

import dev.idemd.client.FingerprintMismatchException;
import dev.idemd.client.IdemdException;
import dev.idemd.client.IdemdUnavailableException;
import dev.idemd.client.IdempotencyClient;
import dev.idemd.client.IdempotentOptions;
import dev.idemd.client.IdempotentResult;
import dev.idemd.client.InProgressException;
import dev.idemd.client.InvalidRequestException;
import dev.idemd.client.ResourceExhaustedException;
import dev.idemd.client.RetryableException;
import dev.idemd.client.StoredResult;
import dev.idemd.client.WorkContext;
import dev.idemd.idempotency.v1.ReleaseRequest;
import jakarta.servlet.Filter;
import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.ServletRequest;
import jakarta.servlet.ServletResponse;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.Enumeration;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Objects;
import java.util.Set;
import java.util.function.Function;
import java.util.function.IntPredicate;

/**
 * A Jakarta Servlet (6.0+) filter that makes an HTTP API idempotent for callers that send an
 * {@code Idempotency-Key} header, over an idemd {@link IdempotencyClient}: it behaves exactly as
 * {@code clients/HTTP-MIDDLEWARE.md} says, like the middleware of every other idemd client.
 *
 * <pre>{@code
 * context.addFilter(new FilterHolder(IdempotencyFilter.builder(idemd, "orders-api").build()),
 *     "/orders/*", EnumSet.of(DispatcherType.REQUEST));
 * }</pre>
 *
 * <ul>
 *   <li>A request whose method is covered (default {@code POST} and {@code PATCH}) with a key runs
 *       its handler at most once per key and scope: the handler's response (status, the kept
 *       headers, body) is stored, and every retry gets it back with {@code Idempotent-Replayed:
 *       true} without running the handler.
 *   <li>A duplicate while the first still runs gets 409 with {@code Retry-After} (or, with {@link
 *       Builder#waitUpTo}, the first one's response); the same key with a different request gets
 *       422; a response that is not {@linkplain Builder#storable storable} (5xx, 408, 409, 425,
 *       429) or a handler that throws releases the key, so a retry runs again.
 *   <li>idemd unreachable at Acquire: 503 (fail closed), or with {@link Builder#failOpen} the
 *       handler runs unprotected.
 *   <li>Its own answers are RFC 9457 problem documents ({@code application/problem+json}).
 * </ul>
 *
 * <p>The request body is read (up to {@link Builder#maxBody}) to fingerprint it and handed to the
 * handler from memory; the response is held in memory until it is stored, then sent. The handler
 * must answer before it returns: asynchronous processing ({@code startAsync}) is not supported.
 * The filter does not close the client.
 */
public final class IdempotencyFilter implements Filter {
  private static final System.Logger LOG = System.getLogger(IdempotencyFilter.class.getName());
  private static final String HEADER = "Idempotency-Key";

  private final IdempotencyClient client;
  private final String namespace;
  private final Set<String> methods;
  private final boolean keyRequired;
  private final Function<HttpServletRequest, String> scope;
  private final Duration waitUpTo;
  private final long maxBody;
  private final int maxStoredBody;
  private final IntPredicate storable;
  private final List<String> keepHeaders;
  private final RequestFingerprint fingerprint;
  private final Duration leaseTtl;
  private final Duration retention;
  private final boolean failOpen;
  private final Duration idemdTimeout;
  /** The helper's options without waiting (built once: they are immutable). */
  private final IdempotentOptions noWait;

  private IdempotencyFilter(Builder builder) {
    this.client = builder.client;
    this.namespace = builder.namespace;
    this.methods = Set.copyOf(builder.methods);
    this.keyRequired = builder.keyRequired;
    this.scope = builder.scope;
    this.waitUpTo = builder.waitUpTo;
    this.maxBody = builder.maxBody;
    this.maxStoredBody = builder.maxStoredBody;
    this.storable = builder.storable;
    this.keepHeaders = List.copyOf(builder.keepHeaders);
    this.fingerprint =
        new RequestFingerprint(
            builder.fingerprintExclude, builder.fingerprintInclude, builder.fingerprintHeaders);
    this.leaseTtl = builder.leaseTtl;
    this.retention = builder.retention;
    this.failOpen = builder.failOpen;
    this.idemdTimeout = builder.idemdTimeout;
    this.noWait = baseOptions().maxWaits(0).build();
  }

  /** The helper's options every call shares (a new builder: builders are not thread-safe). */
  private IdempotentOptions.Builder baseOptions() {
    IdempotentOptions.Builder base =
        IdempotentOptions.builder()
            .leaseTtl(leaseTtl)
            .failOpen(failOpen)
            .acquireTimeout(idemdTimeout);
    if (retention != null) {
      base.retention(retention);
    }
    return base;
  }

  /**
   * A builder for a filter that keeps its records in {@code namespace} of the idemd that {@code
   * client} talks to.
   *
   * @param client the idemd client (the application keeps it, and closes it at shutdown)
   * @param namespace the idemd namespace, e.g. {@code orders-api}
   * @return the builder
   */
  public static Builder builder(IdempotencyClient client, String namespace) {
    return new Builder(client, namespace);
  }

  @Override
  public void doFilter(ServletRequest req, ServletResponse res, FilterChain chain)
      throws IOException, ServletException {
    if (!(req instanceof HttpServletRequest request)
        || !(res instanceof HttpServletResponse response)
        || !methods.contains(request.getMethod().toUpperCase(Locale.ROOT))) {
      chain.doFilter(req, res);
      return;
    }
    IdempotencyKeys.Parsed parsed = IdempotencyKeys.parse(headerValues(request, HEADER));
    if (parsed instanceof IdempotencyKeys.Invalid invalid) {
      Problem.INVALID_KEY.send(response, invalid.why());
    } else if (parsed instanceof IdempotencyKeys.Valid valid) {
      protect(request, response, chain, valid.key());
    } else if (keyRequired) {
      Problem.MISSING_KEY.send(
          response, "this route requires an Idempotency-Key header: a new unique value per operation");
    } else {
      chain.doFilter(request, response);
    }
  }

  private void protect(
      HttpServletRequest request, HttpServletResponse response, FilterChain chain, String key)
      throws IOException, ServletException {
    byte[] body = readBody(request);
    if (body == null) {
      Problem.REQUEST_TOO_LARGE.send(
          response, "the request body is larger than " + maxBody + " bytes");
      return;
    }
    String target =
        request.getQueryString() == null || request.getQueryString().isEmpty()
            ? request.getRequestURI()
            : request.getRequestURI() + "?" + request.getQueryString();
    byte[] requestFingerprint =
        fingerprint.of(
            request.getMethod(),
            target,
            request.getContentType(),
            body,
            name -> headerValues(request, name));
    String callerScope = scope.apply(request);
    String idemdKey = IdempotencyKeys.idemdKey(callerScope == null ? "" : callerScope, key);
    BufferedRequest handlerRequest = new BufferedRequest(request, body);
    Attempt attempt = new Attempt(chain, handlerRequest, response);
    long waitEnds = waitUpTo == null ? 0 : System.nanoTime() + waitUpTo.toNanos();
    IdempotentResult result;
    while (true) {
      try {
        result =
            client.idempotent(
                namespace, idemdKey, requestFingerprint, optionsFor(waitEnds), attempt::run);
        break;
      } catch (Exception | Error failure) {
        if (failure == attempt.handlerFailure) {
          // The helper released the key; the container answers the handler's failure.
          rethrow(failure);
        }
        if (attempt.captured != null) {
          handlerRanButNotStored(idemdKey, attempt, failure);
          return;
        }
        if (failure instanceof InProgressException && waitUpTo != null
            && waitEnds - System.nanoTime() > 0) {
          continue; // the bound is not reached: Acquire and Wait again
        }
        answerFailure(response, failure);
        return;
      }
    }
    if (result.replayed()) {
      replay(response, result.result());
    } else {
      attempt.captured.sendAsWritten();
    }
  }

  /** The helper's options for one call: no Wait, or one Wait round within the bound. */
  private IdempotentOptions optionsFor(long waitEnds) {
    if (waitUpTo == null) {
      return noWait;
    }
    long left = Math.max(1_000_000L, waitEnds - System.nanoTime());
    return baseOptions().maxWaits(1).waitTimeout(Duration.ofNanos(left)).build();
  }

  /** The handler ran, but its response is not stored: send it as it is. */
  private void handlerRanButNotStored(String idemdKey, Attempt attempt, Throwable failure)
      throws IOException {
    if (!(failure instanceof NotStored)) {
      LOG.log(
          System.Logger.Level.ERROR,
          "idemd: the response to " + namespace + "/" + idemdKey
              + " was sent but not stored (a retry may run the handler again)",
          failure);
      if (failure instanceof InvalidRequestException && !attempt.leaseToken.isEmpty()) {
        // idemd refused to store this response (too large for it): give the key back now rather
        // than when the lease expires.
        try {
          client.release(
              ReleaseRequest.newBuilder()
                  .setNamespace(namespace)
                  .setKey(idemdKey)
                  .setLeaseToken(attempt.leaseToken)
                  .build());
        } catch (IdemdException notReleased) {
          LOG.log(System.Logger.Level.WARNING, "idemd: Release failed", notReleased);
        }
      }
    }
    attempt.captured.sendAsWritten();
  }

  /** The answer when the handler did not run. */
  private void answerFailure(HttpServletResponse response, Throwable failure) throws IOException {
    if (failure instanceof FingerprintMismatchException) {
      Problem.KEY_REUSED.send(
          response,
          "this Idempotency-Key was already used for a different request (method, target or body)");
    } else if (failure instanceof InProgressException inProgress) {
      long seconds =
          inProgress
              .retryAfter()
              .map(after -> after.plusNanos(999_999_999L).getSeconds())
              .orElse(1L);
      response.setHeader("Retry-After", Long.toString(Math.max(1, seconds)));
      Problem.REQUEST_IN_PROGRESS.send(
          response, "a request with this Idempotency-Key is still being processed");
    } else if (failure instanceof IdemdUnavailableException
        || failure instanceof ResourceExhaustedException) {
      IdemdException idemd = (IdemdException) failure;
      LOG.log(System.Logger.Level.WARNING, "idemd unavailable: the request was not run", failure);
      response.setHeader("Retry-After", "1");
      Problem.IDEMD_UNAVAILABLE.send(
          response,
          "idemd could not be reached in time (" + idemd.code() + ", " + idemd.reason()
              + "): the request was not run");
    } else if (failure instanceof IdemdException idemd) {
      LOG.log(System.Logger.Level.ERROR, "idemd refused the filter's call", failure);
      Problem.IDEMD_REJECTED.send(
          response,
          "idemd refused the call: " + idemd.code() + " " + idemd.reason()
              + " (the filter's configuration is wrong)");
    } else {
      throw rethrowUnchecked(failure);
    }
  }

  private void replay(HttpServletResponse response, StoredResult stored) throws IOException {
    if (stored.code() < 100 || stored.code() > 599) {
      Problem.IDEMD_REJECTED.send(
          response,
          "the stored result of this key is not an HTTP response (code " + stored.code() + ")");
      return;
    }
    response.setStatus(stored.code());
    for (Map.Entry<String, String> header : stored.metadata().entrySet()) {
      String name = header.getKey();
      if (name.equals("set-cookie")) {
        for (String cookie : header.getValue().split("\n")) {
          response.addHeader(name, cookie);
        }
      } else if (name.equals("content-type")) {
        response.setContentType(header.getValue());
      } else {
        response.setHeader(name, header.getValue());
      }
    }
    response.setHeader("Idempotent-Replayed", "true");
    byte[] body = stored.body();
    response.setContentLength(body.length);
    response.getOutputStream().write(body);
  }

  /** The body, or {@code null} when it is larger than {@code maxBody}. */
  private byte[] readBody(HttpServletRequest request) throws IOException {
    long declared = request.getContentLengthLong();
    if (declared > maxBody) {
      return null;
    }
    ByteArrayOutputStream body =
        new ByteArrayOutputStream((int) Math.max(0, Math.min(declared, 64 * 1024)));
    byte[] chunk = new byte[8192];
    try (InputStream in = request.getInputStream()) {
      while (true) {
        int read = in.read(chunk);
        if (read < 0) {
          return body.toByteArray();
        }
        if (body.size() + (long) read > maxBody) {
          return null;
        }
        body.write(chunk, 0, read);
      }
    }
  }

  private static List<String> headerValues(HttpServletRequest request, String name) {
    Enumeration<String> values = request.getHeaders(name);
    return values == null ? List.of() : Collections.list(values);
  }

  /** The stored metadata: each kept header, lower case, repeated fields joined. */
  private Map<String, String> keptHeaders(CapturedResponse captured) {
    Map<String, String> kept = new LinkedHashMap<>();
    for (String name : keepHeaders) {
      if (name.equals("content-type")) {
        String contentType = captured.getContentType();
        if (contentType != null) {
          kept.put(name, contentType);
        }
        continue;
      }
      Collection<String> values = captured.getHeaders(name);
      if (values != null && !values.isEmpty()) {
        kept.put(name, String.join(name.equals("set-cookie") ? "\n" : ", ", values));
      }
    }
    return kept;
  }

  private static void rethrow(Throwable failure) throws IOException, ServletException {
    if (failure instanceof IOException io) {
      throw io;
    }
    if (failure instanceof ServletException servlet) {
      throw servlet;
    }
    throw rethrowUnchecked(failure);
  }

  private static RuntimeException rethrowUnchecked(Throwable failure) {
    if (failure instanceof RuntimeException unchecked) {
      return unchecked;
    }
    if (failure instanceof Error error) {
      throw error;
    }
    return new IllegalStateException(failure);
  }

  /** The handler's response is not to be stored: the helper releases the key. */
  private static final class NotStored extends RetryableException {
    private static final long serialVersionUID = 1L;

    NotStored(String why) {
      super(why);
    }
  }

  /** One request's run of the handler, as the helper's work. */
  private final class Attempt {
    private final FilterChain chain;
    private final BufferedRequest request;
    private final HttpServletResponse response;
    private CapturedResponse captured;
    private Throwable handlerFailure;
    private String leaseToken = "";

    Attempt(FilterChain chain, BufferedRequest request, HttpServletResponse response) {
      this.chain = chain;
      this.request = request;
      this.response = response;
    }

    StoredResult run(WorkContext context) throws Exception {
      leaseToken = context.leaseToken();
      captured = new CapturedResponse(response);
      try {
        chain.doFilter(request, captured);
      } catch (Exception | Error failure) {
        handlerFailure = failure;
        throw failure;
      }
      int status = captured.status();
      if (!storable.test(status)) {
        throw new NotStored("status " + status + " is not stored");
      }
      byte[] body = captured.body();
      if (body.length > maxStoredBody) {
        LOG.log(
            System.Logger.Level.ERROR,
            "idemd: a response body of " + body.length + " bytes is larger than idemd stores ("
                + maxStoredBody + "): sent, not stored, key released");
        throw new NotStored("the body is too large to store");
      }
      return StoredResult.of(body, status, keptHeaders(captured));
    }
  }

  /** Builds an {@link IdempotencyFilter}; every option has the default HTTP-MIDDLEWARE.md gives. */
  public static final class Builder {
    private final IdempotencyClient client;
    private final String namespace;
    private Set<String> methods = Set.of("POST", "PATCH");
    private boolean keyRequired;
    private Function<HttpServletRequest, String> scope = request -> "";
    private Duration leaseTtl = Duration.ofSeconds(30);
    private Duration retention;
    private Duration waitUpTo;
    private boolean failOpen;
    private Duration idemdTimeout = Duration.ofSeconds(5);
    private long maxBody = 1024 * 1024;
    private int maxStoredBody = 1024 * 1024;
    private Set<String> fingerprintExclude = Set.of();
    private Set<String> fingerprintInclude = Set.of();
    private List<String> fingerprintHeaders = List.of();
    private IntPredicate storable = IdempotencyFilter::storableByDefault;
    private List<String> keepHeaders =
        List.of(
            "content-type",
            "content-language",
            "content-encoding",
            "location",
            "etag",
            "last-modified",
            "cache-control",
            "link",
            "retry-after");

    private Builder(IdempotencyClient client, String namespace) {
      this.client = Objects.requireNonNull(client, "client");
      this.namespace = Objects.requireNonNull(namespace, "namespace");
    }

    /**
     * The methods the filter covers; any other passes straight to the handler. Default {@code
     * POST} and {@code PATCH}.
     *
     * @param methods method names (any case)
     * @return this builder
     */
    public Builder methods(String... methods) {
      Set<String> upper = new LinkedHashSet<>();
      for (String method : methods) {
        upper.add(method.toUpperCase(Locale.ROOT));
      }
      this.methods = upper;
      return this;
    }

    /**
     * Whether a covered request without the header is refused (400 {@code missing-key}) rather
     * than run unprotected. Default false.
     *
     * @param keyRequired true to require the header
     * @return this builder
     */
    public Builder keyRequired(boolean keyRequired) {
      this.keyRequired = keyRequired;
      return this;
    }

    /**
     * The caller's identity (authenticated user, API key, tenant): the same key under two scopes
     * is two records, so one caller's response is never replayed to another. Default: none, all
     * callers share keys.
     *
     * @param scope the request's scope ({@code null} counts as none)
     * @return this builder
     */
    public Builder scope(Function<HttpServletRequest, String> scope) {
      this.scope = Objects.requireNonNull(scope, "scope");
      return this;
    }

    /**
     * The lease asked for at Acquire, renewed in the background while the handler runs. Default
     * 30 s (idemd's default lease too).
     *
     * @param leaseTtl a positive duration within idemd's bounds
     * @return this builder
     */
    public Builder leaseTtl(Duration leaseTtl) {
      this.leaseTtl = Objects.requireNonNull(leaseTtl, "leaseTtl");
      return this;
    }

    /**
     * How long idemd keeps a stored response. Default: idemd's default.
     *
     * @param retention a positive duration within idemd's bounds
     * @return this builder
     */
    public Builder retention(Duration retention) {
      this.retention = Objects.requireNonNull(retention, "retention");
      return this;
    }

    /**
     * A duplicate that arrives while the first request runs waits for it up to {@code bound}
     * (idemd's Wait) and gets its response, instead of 409 at once; still running at the bound:
     * 409. Default: no waiting.
     *
     * @param bound a positive duration, e.g. 10 s
     * @return this builder
     */
    public Builder waitUpTo(Duration bound) {
      if (bound.isNegative() || bound.isZero()) {
        throw new IllegalArgumentException("the wait bound must be positive");
      }
      this.waitUpTo = bound;
      return this;
    }

    /**
     * When idemd cannot be reached at Acquire, run the handler unprotected instead of answering
     * 503. Never when idemd answered (rate limited, overloaded: 503 all the same). Default false.
     *
     * @param failOpen true to run unprotected
     * @return this builder
     */
    public Builder failOpen(boolean failOpen) {
      this.failOpen = failOpen;
      return this;
    }

    /**
     * The longest Acquire may take, retries included, before the request is answered 503 (or run
     * unprotected with {@link #failOpen}). Default 5 s.
     *
     * @param idemdTimeout a positive duration
     * @return this builder
     */
    public Builder idemdTimeout(Duration idemdTimeout) {
      if (idemdTimeout.isNegative() || idemdTimeout.isZero()) {
        throw new IllegalArgumentException("idemdTimeout must be positive");
      }
      this.idemdTimeout = idemdTimeout;
      return this;
    }

    /**
     * The largest request body read to fingerprint a request; a larger one gets 413 {@code
     * request-too-large} without asking idemd. Default 1 MiB.
     *
     * @param maxBody bytes
     * @return this builder
     */
    public Builder maxBody(long maxBody) {
      if (maxBody < 0) {
        throw new IllegalArgumentException("maxBody must not be negative");
      }
      this.maxBody = maxBody;
      return this;
    }

    /**
     * The largest response body stored (idemd's {@code --max-result-bytes}); a larger response is
     * sent, not stored, the key released and an error logged. Default 1 MiB, idemd's default.
     *
     * @param maxStoredBody bytes
     * @return this builder
     */
    public Builder maxStoredBody(int maxStoredBody) {
      if (maxStoredBody < 0) {
        throw new IllegalArgumentException("maxStoredBody must not be negative");
      }
      this.maxStoredBody = maxStoredBody;
      return this;
    }

    /**
     * Top-level JSON fields left out of the fingerprint (e.g. a client timestamp).
     *
     * @param fields field names
     * @return this builder
     */
    public Builder fingerprintExclude(String... fields) {
      this.fingerprintExclude = Set.of(fields);
      return this;
    }

    /**
     * Only these top-level JSON fields count in the fingerprint.
     *
     * @param fields field names
     * @return this builder
     */
    public Builder fingerprintInclude(String... fields) {
      this.fingerprintInclude = Set.of(fields);
      return this;
    }

    /**
     * Request headers that count in the fingerprint (as {@code "headers": {name: value}}).
     *
     * @param names header names (any case; used in lower case)
     * @return this builder
     */
    public Builder fingerprintHeaders(String... names) {
      List<String> lower = new ArrayList<>();
      for (String name : names) {
        lower.add(name.toLowerCase(Locale.ROOT));
      }
      this.fingerprintHeaders = lower;
      return this;
    }

    /**
     * Which statuses are stored; others release the key so a retry runs again. Default: 200–499
     * except 408, 409, 425 and 429.
     *
     * @param storable true for a status to store
     * @return this builder
     */
    public Builder storable(IntPredicate storable) {
      this.storable = Objects.requireNonNull(storable, "storable");
      return this;
    }

    /**
     * The response headers stored and replayed. Default {@code content-type}, {@code
     * content-language}, {@code content-encoding}, {@code location}, {@code etag}, {@code
     * last-modified}, {@code cache-control}, {@code link}, {@code retry-after}; {@code set-cookie}
     * only when listed.
     *
     * @param names header names (any case; stored in lower case)
     * @return this builder
     */
    public Builder keepHeaders(String... names) {
      List<String> lower = new ArrayList<>();
      for (String name : names) {
        lower.add(name.toLowerCase(Locale.ROOT));
      }
      this.keepHeaders = lower;
      return this;
    }

    /** The filter. */
    public IdempotencyFilter build() {
      return new IdempotencyFilter(this);
    }
  }

  /** The default {@link Builder#storable}: 200–499 except 408, 409, 425 and 429. */
  static boolean storableByDefault(int status) {
    return status >= 200
        && status <= 499
        && status != 408
        && status != 409
        && status != 425
        && status != 429;
  }
}
