package dev.idemd.client;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Map;
import java.util.Objects;

/**
 * The result of the work, as idemd stores it and replays it to every later call with the key
 * ({@code idempotency.v1.Result}): a body, a status code of the caller's choosing (e.g. an HTTP
 * status) and string metadata (e.g. {@code content-type}).
 */
public final class StoredResult {
  private final byte[] body;
  private final int code;
  private final Map<String, String> metadata;

  private StoredResult(byte[] body, int code, Map<String, String> metadata) {
    this.body = body.clone();
    this.code = code;
    this.metadata = Map.copyOf(metadata);
  }

  /**
   * A result with a body, a code and metadata.
   *
   * @param body the response body (at most 1 MiB unless the server allows more)
   * @param code a status code of the caller's choosing
   * @param metadata response attributes (at most 64 entries)
   * @return the result
   */
  public static StoredResult of(byte[] body, int code, Map<String, String> metadata) {
    return new StoredResult(
        Objects.requireNonNull(body, "body"), code, Objects.requireNonNull(metadata, "metadata"));
  }

  /**
   * A result with only a body (code 0, no metadata).
   *
   * @param body the response body
   * @return the result
   */
  public static StoredResult of(byte[] body) {
    return of(body, 0, Map.of());
  }

  /**
   * A result whose body is {@code body} in UTF-8 (code 0, no metadata).
   *
   * @param body the response body as text
   * @return the result
   */
  public static StoredResult of(String body) {
    return of(body.getBytes(StandardCharsets.UTF_8));
  }

  static StoredResult fromProto(dev.idemd.idempotency.v1.Result result) {
    return new StoredResult(
        result.getBody().toByteArray(), result.getCode(), result.getMetadataMap());
  }

  dev.idemd.idempotency.v1.Result toProto() {
    return dev.idemd.idempotency.v1.Result.newBuilder()
        .setBody(com.google.protobuf.ByteString.copyFrom(body))
        .setCode(code)
        .putAllMetadata(metadata)
        .build();
  }

  /** The body (a copy). */
  public byte[] body() {
    return body.clone();
  }

  /** The body decoded as UTF-8. */
  public String bodyUtf8() {
    return new String(body, StandardCharsets.UTF_8);
  }

  /** The status code of the caller's choosing (0 unless set). */
  public int code() {
    return code;
  }

  /** The metadata (unmodifiable). */
  public Map<String, String> metadata() {
    return metadata;
  }

  @Override
  public boolean equals(Object other) {
    return other instanceof StoredResult that
        && Arrays.equals(body, that.body)
        && code == that.code
        && metadata.equals(that.metadata);
  }

  @Override
  public int hashCode() {
    return Objects.hash(Arrays.hashCode(body), code, metadata);
  }

  @Override
  public String toString() {
    return "StoredResult{code=" + code + ", body=" + body.length + " bytes, metadata=" + metadata + "}";
  }
}
