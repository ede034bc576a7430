package dev.idemd.client.servlet;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;

import java.nio.charset.StandardCharsets;
import java.util.List;
import org.junit.jupiter.api.Test;

/** The Idempotency-Key header (HTTP-MIDDLEWARE.md §2) and the idemd key made of it (§3). */
class IdempotencyKeysTest {
  private static String valid(String... fields) {
    IdempotencyKeys.Parsed parsed = IdempotencyKeys.parse(List.of(fields));
    return assertInstanceOf(IdempotencyKeys.Valid.class, parsed, () -> "" + parsed).key();
  }

  private static String invalid(String... fields) {
    IdempotencyKeys.Parsed parsed = IdempotencyKeys.parse(List.of(fields));
    return assertInstanceOf(IdempotencyKeys.Invalid.class, parsed, () -> "" + parsed).why();
  }

  @Test
  void noFieldIsMissing() {
    assertInstanceOf(IdempotencyKeys.Missing.class, IdempotencyKeys.parse(List.of()));
  }

  @Test
  void quotedAndBareFormsAreOneKey() {
    assertEquals("abc", valid("abc"));
    assertEquals("abc", valid("\"abc\""));
    assertEquals("abc", valid(" \t\"abc\"\t "));
    assertEquals("abc", valid("  abc\t"));
    assertEquals("a b", valid("a b"));
    assertEquals("a b", valid("\"a b\""));
  }

  @Test
  void quotedEscapesAreTakenOut() {
    assertEquals("a\"b\\c", valid("\"a\\\"b\\\\c\""));
    // A bare value is taken as it is, backslashes and quotes included.
    assertEquals("a\\\"b", valid("a\\\"b"));
  }

  @Test
  void theLongestKeyIs255Bytes() {
    assertEquals("k".repeat(255), valid("k".repeat(255)));
    assertEquals("k".repeat(255), valid("\"" + "k".repeat(255) + "\""));
    assertEquals("the key is 256 bytes long, more than 255", invalid("k".repeat(256)));
    invalid("\"" + "k".repeat(256) + "\"");
  }

  @Test
  void everyBrokenRuleIsInvalid() {
    assertEquals("the Idempotency-Key field appears 2 times", invalid("a", "b"));
    assertEquals("the key is empty", invalid(""));
    assertEquals("the key is empty", invalid("  "));
    assertEquals("the key is empty", invalid("\"\""));
    assertEquals("the key contains the control character 0x01", invalid("a\u0001b"));
    assertEquals("the key contains the control character 0x09", invalid("a\tb"));
    assertEquals("the key contains the control character 0x7F", invalid("a\u007fb"));
    assertEquals("the key contains the control character 0x00", invalid("\"a\u0000\""));
    assertEquals("the key contains a character outside printable ASCII", invalid("café"));
    assertEquals("the key contains a character outside printable ASCII", invalid("\"caf\u00e9\""));
    assertEquals("the quoted key has no closing quote", invalid("\"abc"));
    assertEquals("the quoted key has no closing quote", invalid("\""));
    assertEquals("the quoted key has text after its closing quote", invalid("\"abc\"d"));
    assertEquals("the quoted key has text after its closing quote", invalid("\"a\" \"b\""));
    assertEquals("the quoted key has an escape other than \\\" or \\\\", invalid("\"a\\nb\""));
    assertEquals("the quoted key ends inside an escape", invalid("\"abc\\"));
    assertEquals(
        "a bare key contains a comma (two fields joined?): quote it", invalid("k1, k2"));
    // Quoted, a comma is part of the key.
    assertEquals("k1, k2", valid("\"k1, k2\""));
  }

  @Test
  void idemdKeyIsTheScopeTagAndTheKey() {
    // The shared vector: tag = first 32 hex digits of sha256("").
    assertEquals(
        "e3b0c44298fc1c149afbf4c8996fb924:abc", IdempotencyKeys.idemdKey("", "abc"));
    // sha256("A") = 559aead08264d5795d3909718cdd05abd49572e84fe55590eef31a88a08fdffd
    assertEquals("559aead08264d5795d3909718cdd05ab:abc", IdempotencyKeys.idemdKey("A", "abc"));
    // The scope is hashed as UTF-8.
    assertEquals(
        IdempotencyKeys.sha256Hex("é".getBytes(StandardCharsets.UTF_8)).substring(0, 32) + ":k",
        IdempotencyKeys.idemdKey("é", "k"));
  }

  @Test
  void keysLongerThan222BytesAreHashed() {
    String longest = "x".repeat(222);
    assertEquals("e3b0c44298fc1c149afbf4c8996fb924:" + longest, IdempotencyKeys.idemdKey("", longest));
    assertEquals(255, IdempotencyKeys.idemdKey("", longest).length());
    String hashed = "x".repeat(223);
    String idemdKey = IdempotencyKeys.idemdKey("", hashed);
    assertEquals(
        "e3b0c44298fc1c149afbf4c8996fb924#"
            + IdempotencyKeys.sha256Hex(hashed.getBytes(StandardCharsets.UTF_8)),
        idemdKey);
    assertEquals(32 + 1 + 64, idemdKey.length());
    // sha256 of 223 'x' bytes, computed independently (Python hashlib).
    assertEquals(
        "e3b0c44298fc1c149afbf4c8996fb924#" + X223_SHA256, idemdKey);
  }

  private static final String X223_SHA256 = 
      "b392c1c5a636edf049e30f9744264fd644d356fc891c5cc13899b2a92ed5db01";
}
