package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.Gson;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Fingerprints against the vectors every idemd client shares (clients/fingerprint-vectors.json). */
class FingerprintTest {
  private static Path vectorsFile() {
    String configured = System.getenv("IDEMD_FINGERPRINT_VECTORS");
    return Path.of(configured != null ? configured : "../fingerprint-vectors.json");
  }

  /** A vector's input as the plain Java values an application would pass. */
  private static Object toJava(JsonElement json) {
    if (json.isJsonNull()) {
      return null;
    }
    if (json.isJsonObject()) {
      Map<String, Object> map = new LinkedHashMap<>();
      for (Map.Entry<String, JsonElement> entry : json.getAsJsonObject().entrySet()) {
        map.put(entry.getKey(), toJava(entry.getValue()));
      }
      return map;
    }
    if (json.isJsonArray()) {
      List<Object> list = new ArrayList<>();
      for (JsonElement item : json.getAsJsonArray()) {
        list.add(toJava(item));
      }
      return list;
    }
    var primitive = json.getAsJsonPrimitive();
    if (primitive.isBoolean()) {
      return primitive.getAsBoolean();
    }
    if (primitive.isNumber()) {
      return primitive.getAsDouble();
    }
    return primitive.getAsString();
  }

  @Test
  void everySharedVectorMatches() throws Exception {
    JsonObject file = new Gson().fromJson(Files.readString(vectorsFile()), JsonObject.class);
    JsonArray vectors = file.getAsJsonArray("vectors");
    assertTrue(vectors.size() >= 10, "the vectors file has its vectors");
    for (JsonElement element : vectors) {
      JsonObject vector = element.getAsJsonObject();
      Object input = toJava(vector.get("input"));
      String canonical = vector.get("canonical").getAsString();
      assertEquals(canonical, Fingerprint.canonicalJson(input), "canonical form of " + input);
      assertEquals(
          vector.get("sha256").getAsString(),
          HexFormat.of().formatHex(Fingerprint.of(input)),
          "fingerprint of " + input);
    }
  }

  @Test
  void integersAndDoublesAgree() {
    // An application passes ints and longs, not only doubles: they give the same form.
    assertEquals(
        Fingerprint.canonicalJson(Map.of("amount", 1250.0, "n", 9007199254740991.0)),
        Fingerprint.canonicalJson(Map.of("amount", 1250, "n", 9007199254740991L)));
    assertArrayEquals(
        Fingerprint.of(List.of(1, 2L, (short) 3)), Fingerprint.of(new Object[] {1.0, 2.0, 3.0}));
  }

  @Test
  void numbersAreWrittenAsEcmaScriptDoes() {
    // Values whose shortest digits Java 17's Double.toString misses, and the layout edges.
    assertEquals("2e-323", Fingerprint.ecmaScriptNumber(2.0E-323));
    assertEquals("1.7976931348623157e+308", Fingerprint.ecmaScriptNumber(Double.MAX_VALUE));
    assertEquals("123456789012345680000", Fingerprint.ecmaScriptNumber(1.2345678901234568E20));
    assertEquals("0.000001", Fingerprint.ecmaScriptNumber(1e-6));
    assertEquals("1e-7", Fingerprint.ecmaScriptNumber(1e-7));
    assertEquals("-1.5", Fingerprint.ecmaScriptNumber(-1.5));
    assertEquals("0", Fingerprint.ecmaScriptNumber(-0.0));
    assertEquals("333333333.3333333", Fingerprint.ecmaScriptNumber(333333333.3333333));
  }

  @Test
  void requestsWithoutCanonicalJsonAreRefused() {
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of(Map.of("n", 1L << 53)));
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of(List.of(Double.NaN)));
    assertThrows(
        IllegalArgumentException.class, () -> Fingerprint.of(Double.POSITIVE_INFINITY));
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of("lone \ud800 surrogate"));
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of(Map.of(1, "non-string key")));
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of(new Object()));
    List<Object> cycle = new ArrayList<>();
    cycle.add(cycle);
    assertThrows(IllegalArgumentException.class, () -> Fingerprint.of(cycle));
  }

  @Test
  void controlCharactersAreEscapedInLowercaseHex() {
    assertEquals("\"\\u001f\\u0000\\b\\f\"", Fingerprint.canonicalJson("\u001f\u0000\b\f"));
  }
}
