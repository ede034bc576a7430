package dev.idemd.client.servlet;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.idemd.client.Fingerprint;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.Function;
import org.junit.jupiter.api.Test;

/** The object a request is fingerprinted as (HTTP-MIDDLEWARE.md §3), as canonical JSON. */
class RequestFingerprintTest {
  private static final RequestFingerprint PLAIN =
      new RequestFingerprint(Set.of(), Set.of(), List.of());
  private static final Function<String, List<String>> NO_HEADERS = name -> List.of();

  private static String form(RequestFingerprint fingerprint, String contentType, String body) {
    return Fingerprint.canonicalJson(
        fingerprint.form(
            "post", "/orders?a=%20b", contentType, body.getBytes(StandardCharsets.UTF_8), NO_HEADERS));
  }

  @Test
  void aJsonBodyIsFingerprintedParsed() {
    assertEquals(
        "{\"json\":{\"a\":[1,2.5,\"x\"],\"id\":\"o1\"},\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", "{ \"id\": \"o1\", \"a\": [1, 2.50, \"x\"] }"));
    assertEquals(
        "{\"json\":{\"id\":1},\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/merge-patch+json; charset=utf-8", "{\"id\":1}"));
    assertEquals(
        "{\"json\":\"text\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "APPLICATION/JSON", "\"text\""));
  }

  @Test
  void reorderedJsonHasTheSameFingerprint() {
    byte[] first =
        PLAIN.of("POST", "/orders", "application/json",
            "{\"id\":\"o1\",\"n\":{\"b\":1,\"a\":2}}".getBytes(StandardCharsets.UTF_8), NO_HEADERS);
    byte[] reordered =
        PLAIN.of("POST", "/orders", "application/json",
            "{\n \"n\": {\"a\": 2, \"b\": 1},\n \"id\": \"o1\"\n}".getBytes(StandardCharsets.UTF_8),
            NO_HEADERS);
    assertArrayEquals(first, reordered);
    assertEquals(32, first.length);
    byte[] otherTarget =
        PLAIN.of("POST", "/orders?x=1", "application/json",
            "{\"id\":\"o1\",\"n\":{\"b\":1,\"a\":2}}".getBytes(StandardCharsets.UTF_8), NO_HEADERS);
    assertFalse(java.util.Arrays.equals(first, otherTarget));
  }

  @Test
  void otherBodiesAreFingerprintedAsBase64Bytes() {
    // Not JSON by content type, JSON that does not parse, JSON with trailing text, no body.
    assertEquals(
        "{\"bytes\":\"eyJpZCI6MX0=\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "text/plain", "{\"id\":1}"));
    assertEquals(
        "{\"bytes\":\"eyJpZCI6MX0=\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, null, "{\"id\":1}"));
    assertEquals(
        "{\"bytes\":\"eyJpZCI6\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", "{\"id\":"));
    assertEquals(
        "{\"bytes\":\"e30ge30=\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", "{} {}"));
    assertEquals(
        "{\"bytes\":\"J2Eybg==\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", "'a2n"));
    assertEquals(
        "{\"bytes\":\"\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", ""));
    // Gson's lenient extensions (single quotes, comments) are not JSON.
    assertEquals(
        "{\"bytes\":\"eydhJzoxfQ==\",\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(PLAIN, "application/json", "{'a':1}"));
  }

  @Test
  void bodiesThatAreNotUtf8AreBytes() {
    byte[] latin1 = {'"', (byte) 0xe9, '"'};
    assertEquals(
        "{\"bytes\":\"Iuki\",\"method\":\"POST\",\"target\":\"/\"}",
        Fingerprint.canonicalJson(PLAIN.form("POST", "/", "application/json", latin1, NO_HEADERS)));
  }

  @Test
  void includeAndExcludeChooseTopLevelFields() {
    RequestFingerprint exclude = new RequestFingerprint(Set.of("ts"), Set.of(), List.of());
    assertEquals(
        "{\"json\":{\"id\":\"o1\",\"n\":{\"ts\":2}},\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(exclude, "application/json", "{\"id\":\"o1\",\"ts\":1,\"n\":{\"ts\":2}}"));
    RequestFingerprint include = new RequestFingerprint(Set.of(), Set.of("id"), List.of());
    assertEquals(
        "{\"json\":{\"id\":\"o1\"},\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(include, "application/json", "{\"id\":\"o1\",\"ts\":1}"));
    // Only an object has fields.
    assertEquals(
        "{\"json\":[1],\"method\":\"POST\",\"target\":\"/orders?a=%20b\"}",
        form(include, "application/json", "[1]"));
  }

  @Test
  void configuredHeadersAreAddedJoined() {
    RequestFingerprint headers =
        new RequestFingerprint(Set.of(), Set.of(), List.of("x-account", "x-absent"));
    Map<String, List<String>> request = Map.of("x-account", List.of("a", "b"));
    assertEquals(
        "{\"bytes\":\"\",\"headers\":{\"x-account\":\"a, b\"},\"method\":\"PATCH\",\"target\":\"/o\"}",
        Fingerprint.canonicalJson(
            headers.form("PATCH", "/o", null, new byte[0],
                name -> request.getOrDefault(name, List.of()))));
  }

  @Test
  void jsonContentTypes() {
    assertTrue(RequestFingerprint.isJson("application/json"));
    assertTrue(RequestFingerprint.isJson(" application/json ; charset=utf-8"));
    assertTrue(RequestFingerprint.isJson("application/problem+json"));
    assertTrue(RequestFingerprint.isJson("text/vnd.x+json"));
    assertFalse(RequestFingerprint.isJson("application/jsonx"));
    assertFalse(RequestFingerprint.isJson("text/plain"));
    assertFalse(RequestFingerprint.isJson("+json"));
    assertFalse(RequestFingerprint.isJson(""));
    assertFalse(RequestFingerprint.isJson(null));
  }
}
