package dev.idemd.client.servlet;

import com.google.gson.Gson;
import com.google.gson.Strictness;
import com.google.gson.TypeAdapter;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import dev.idemd.client.Fingerprint;
import java.io.IOException;
import java.io.StringReader;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;
import java.util.function.Function;

/**
 * The object a request is fingerprinted as (clients/HTTP-MIDDLEWARE.md §3), the same in every
 * idemd middleware: {@code {"method", "target", "json"}} for a JSON body that parses, else {@code
 * {"method", "target", "bytes"}} with the body in standard base64; {@code "headers"} when headers
 * are configured. The client's {@link Fingerprint#of(Object)} hashes it.
 */
final class RequestFingerprint {
  private static final TypeAdapter<Object> JSON_VALUES = new Gson().getAdapter(Object.class);

  private final Set<String> exclude;
  private final Set<String> include;
  private final List<String> headers;

  /**
   * @param exclude top-level JSON fields left out (empty for none)
   * @param include when not empty, only these top-level JSON fields count
   * @param headers header names, lower case, added as {@code "headers"} (empty for none)
   */
  RequestFingerprint(Set<String> exclude, Set<String> include, List<String> headers) {
    this.exclude = Set.copyOf(exclude);
    this.include = Set.copyOf(include);
    this.headers = List.copyOf(headers);
  }

  /**
   * The object to fingerprint.
   *
   * @param method the request method
   * @param target the request target as received: raw path, plus {@code ?query} when there is one
   * @param contentType the request's {@code Content-Type}, or {@code null}
   * @param body the request body
   * @param headerValues the request's values of a header name (empty when absent)
   * @return JSON values for {@link Fingerprint#of(Object)}
   */
  Map<String, Object> form(
      String method,
      String target,
      String contentType,
      byte[] body,
      Function<String, List<String>> headerValues) {
    Object json = isJson(contentType) ? parseJson(body) : NOT_JSON;
    return form(method, target, json, body, headerValues);
  }

  /**
   * The fingerprint of a request: {@link Fingerprint#of(Object)} of its {@link #form}. A JSON body
   * whose values have no canonical form (a number beyond a double's range, a lone surrogate) is
   * fingerprinted by its bytes.
   */
  byte[] of(
      String method,
      String target,
      String contentType,
      byte[] body,
      Function<String, List<String>> headerValues) {
    Object json = isJson(contentType) ? parseJson(body) : NOT_JSON;
    try {
      return Fingerprint.of(form(method, target, json, body, headerValues));
    } catch (IllegalArgumentException noCanonicalForm) {
      return Fingerprint.of(form(method, target, NOT_JSON, body, headerValues));
    }
  }

  private Map<String, Object> form(
      String method,
      String target,
      Object json,
      byte[] body,
      Function<String, List<String>> headerValues) {
    Map<String, Object> form = new LinkedHashMap<>();
    form.put("method", method.toUpperCase(Locale.ROOT));
    form.put("target", target);
    if (json != NOT_JSON) {
      form.put("json", selectFields(json));
    } else {
      form.put("bytes", Base64.getEncoder().encodeToString(body));
    }
    if (!headers.isEmpty()) {
      Map<String, Object> named = new LinkedHashMap<>();
      for (String name : headers) {
        List<String> values = headerValues.apply(name);
        if (!values.isEmpty()) {
          named.put(name, String.join(", ", values));
        }
      }
      form.put("headers", named);
    }
    return form;
  }

  private Object selectFields(Object json) {
    if (!(json instanceof Map<?, ?> object) || (exclude.isEmpty() && include.isEmpty())) {
      return json;
    }
    Map<Object, Object> kept = new LinkedHashMap<>();
    for (Map.Entry<?, ?> field : object.entrySet()) {
      Object name = field.getKey();
      if (exclude.contains(name) || (!include.isEmpty() && !include.contains(name))) {
        continue;
      }
      kept.put(name, field.getValue());
    }
    return kept;
  }

  private static final Object NOT_JSON = new Object();

  /** {@code application/json} or any {@code type/subtype+json}, parameters aside. */
  static boolean isJson(String contentType) {
    if (contentType == null) {
      return false;
    }
    int semicolon = contentType.indexOf(';');
    String mediaType =
        (semicolon < 0 ? contentType : contentType.substring(0, semicolon))
            .trim()
            .toLowerCase(Locale.ROOT);
    int slash = mediaType.indexOf('/');
    if (slash <= 0 || slash == mediaType.length() - 1) {
      return false;
    }
    return mediaType.equals("application/json") || mediaType.endsWith("+json");
  }

  /** The body as JSON values (RFC 8259, strict, UTF-8), or {@link #NOT_JSON}. */
  private static Object parseJson(byte[] body) {
    String text;
    try {
      text =
          StandardCharsets.UTF_8
              .newDecoder()
              .onMalformedInput(CodingErrorAction.REPORT)
              .onUnmappableCharacter(CodingErrorAction.REPORT)
              .decode(ByteBuffer.wrap(body))
              .toString();
    } catch (CharacterCodingException notUtf8) {
      return NOT_JSON;
    }
    try (JsonReader reader = new JsonReader(new StringReader(text))) {
      reader.setStrictness(Strictness.STRICT);
      Object value = JSON_VALUES.read(reader);
      if (reader.peek() != JsonToken.END_DOCUMENT) {
        return NOT_JSON;
      }
      return value;
    } catch (IOException | RuntimeException notJson) {
      // Gson reports malformed JSON as MalformedJsonException (an IOException) or
      // JsonSyntaxException / IllegalStateException (runtime): the body is then just bytes.
      return NOT_JSON;
    }
  }
}
