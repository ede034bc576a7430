package dev.idemd.client.servlet;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HexFormat;
import java.util.List;

/**
 * The {@code Idempotency-Key} header and the idemd key made of it (clients/HTTP-MIDDLEWARE.md §2
 * and §3), the same in every idemd middleware.
 */
final class IdempotencyKeys {
  /** The longest key a caller may send, in bytes. */
  static final int MAX_KEY_BYTES = 255;

  /** Keys longer than this are hashed, so {@code tag ":" key} stays within idemd's 255 bytes. */
  static final int MAX_PLAIN_KEY_BYTES = 222;

  private IdempotencyKeys() {}

  /** What the header said: no key, a key, or why it is not a usable one. */
  sealed interface Parsed permits Missing, Valid, Invalid {}

  /** The request has no {@code Idempotency-Key} field. */
  record Missing() implements Parsed {}

  /**
   * A usable key.
   *
   * @param key the key, printable ASCII, 1–255 bytes
   */
  record Valid(String key) implements Parsed {}

  /**
   * The header is not a usable key.
   *
   * @param why the rule it broke, for the problem document's detail
   */
  record Invalid(String why) implements Parsed {}

  /**
   * Parses the {@code Idempotency-Key} fields of a request: a Structured Field string (RFC 8941
   * §3.3.3), or for compatibility a bare value taken as it is.
   *
   * @param fields every field value of the header, in order (empty when absent)
   * @return the key, or why there is none
   */
  static Parsed parse(List<String> fields) {
    if (fields.isEmpty()) {
      return new Missing();
    }
    if (fields.size() > 1) {
      return new Invalid("the Idempotency-Key field appears " + fields.size() + " times");
    }
    String value = trimSpacesAndTabs(fields.get(0));
    String key;
    if (value.startsWith("\"")) {
      StringBuilder unquoted = new StringBuilder(value.length());
      int end = -1;
      for (int i = 1; i < value.length(); i++) {
        char c = value.charAt(i);
        if (c == '\\') {
          if (i + 1 >= value.length()) {
            return new Invalid("the quoted key ends inside an escape");
          }
          char escaped = value.charAt(i + 1);
          if (escaped != '"' && escaped != '\\') {
            return new Invalid("the quoted key has an escape other than \\\" or \\\\");
          }
          unquoted.append(escaped);
          i++;
        } else if (c == '"') {
          end = i;
          break;
        } else {
          String bad = badCharacter(c);
          if (bad != null) {
            return new Invalid(bad);
          }
          unquoted.append(c);
        }
      }
      if (end < 0) {
        return new Invalid("the quoted key has no closing quote");
      }
      if (end != value.length() - 1) {
        return new Invalid("the quoted key has text after its closing quote");
      }
      key = unquoted.toString();
    } else {
      for (int i = 0; i < value.length(); i++) {
        String bad = badCharacter(value.charAt(i));
        if (bad != null) {
          return new Invalid(bad);
        }
      }
      if (value.indexOf(',') >= 0) {
        // Servers and proxies join repeated fields with ",": such a value may be two keys.
        return new Invalid("a bare key contains a comma (two fields joined?): quote it");
      }
      key = value;
    }
    if (key.isEmpty()) {
      return new Invalid("the key is empty");
    }
    // Printable ASCII only by now: one byte per character.
    if (key.length() > MAX_KEY_BYTES) {
      return new Invalid(
          "the key is " + key.length() + " bytes long, more than " + MAX_KEY_BYTES);
    }
    return new Valid(key);
  }

  /** Why {@code c} may not be in a key, or {@code null} when it may. */
  private static String badCharacter(char c) {
    if (c < 0x20 || c == 0x7f) {
      return String.format("the key contains the control character 0x%02X", (int) c);
    }
    if (c > 0x7e) {
      return "the key contains a character outside printable ASCII";
    }
    return null;
  }

  private static String trimSpacesAndTabs(String value) {
    int start = 0;
    int end = value.length();
    while (start < end && (value.charAt(start) == ' ' || value.charAt(start) == '\t')) {
      start++;
    }
    while (end > start && (value.charAt(end - 1) == ' ' || value.charAt(end - 1) == '\t')) {
      end--;
    }
    return value.substring(start, end);
  }

  /**
   * The idemd key of {@code key} sent under {@code scope}: {@code tag ":" key}, where {@code tag}
   * is the first 32 hex digits of SHA-256 of the scope, or {@code tag "#" sha256hex(key)} for keys
   * longer than 222 bytes. Only the scope is hashed, so keys stay readable in the console.
   *
   * @param scope the caller's identity ("" when the application configured none)
   * @param key a valid key
   * @return the key idemd stores the record under
   */
  static String idemdKey(String scope, String key) {
    String tag = sha256Hex(scope.getBytes(StandardCharsets.UTF_8)).substring(0, 32);
    byte[] keyBytes = key.getBytes(StandardCharsets.UTF_8);
    if (keyBytes.length <= MAX_PLAIN_KEY_BYTES) {
      return tag + ":" + key;
    }
    return tag + "#" + sha256Hex(keyBytes);
  }

  static String sha256Hex(byte[] bytes) {
    try {
      return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bytes));
    } catch (NoSuchAlgorithmException impossible) {
      // Every Java platform must provide SHA-256 (MessageDigest's documentation).
      throw new IllegalStateException("SHA-256 is not available", impossible);
    }
  }
}
