package dev.idemd.client.servlet;

import com.google.gson.JsonObject;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;

/**
 * The answers the filter makes itself: RFC 9457 problem documents whose {@code type} points at
 * their explanation in clients/HTTP-MIDDLEWARE.md §5.
 */
enum Problem {
  MISSING_KEY(400, "missing-key", "Idempotency-Key required"),
  INVALID_KEY(400, "invalid-key", "Invalid Idempotency-Key"),
  REQUEST_IN_PROGRESS(409, "request-in-progress", "Request in progress"),
  REQUEST_TOO_LARGE(413, "request-too-large", "Request too large"),
  KEY_REUSED(422, "key-reused", "Idempotency-Key reused"),
  IDEMD_REJECTED(500, "idemd-rejected", "idemd rejected the request"),
  IDEMD_UNAVAILABLE(503, "idemd-unavailable", "idemd unavailable");

  static final String CONTENT_TYPE = "application/problem+json";
  private static final String TYPE_BASE =
      "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#";

  final int status;
  final String type;
  final String title;

  Problem(int status, String anchor, String title) {
    this.status = status;
    this.type = TYPE_BASE + anchor;
    this.title = title;
  }

  /** The problem document with {@code detail}, as UTF-8 JSON. */
  byte[] document(String detail) {
    JsonObject document = new JsonObject();
    document.addProperty("type", type);
    document.addProperty("title", title);
    document.addProperty("status", status);
    document.addProperty("detail", detail);
    return document.toString().getBytes(StandardCharsets.UTF_8);
  }

  /** Sends the problem with {@code detail} as the whole response. */
  void send(HttpServletResponse response, String detail) throws IOException {
    byte[] body = document(detail);
    response.setStatus(status);
    response.setContentType(CONTENT_TYPE);
    response.setContentLength(body.length);
    response.getOutputStream().write(body);
  }
}
