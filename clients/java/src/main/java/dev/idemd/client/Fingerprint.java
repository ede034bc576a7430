package dev.idemd.client;

import java.math.BigDecimal;
import java.math.BigInteger;
import java.math.MathContext;
import java.math.RoundingMode;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;

/**
 * Request fingerprints shared by every idemd client: SHA-256 of the UTF-8 bytes of the request's
 * RFC 8785 (JSON Canonicalization Scheme) form. The same request gives the same 32 bytes in Java,
 * Rust, Go, Python and Node (see {@code clients/fingerprint-vectors.json}).
 *
 * <p>A request is JSON as Java values: {@code null}, {@link Boolean}, {@link String}, {@link
 * Number}, {@link Map} with {@link String} keys, {@link Iterable} or an {@code Object[]}. Numbers
 * are IEEE-754 doubles, as in JSON itself: an integer beyond ±(2<sup>53</sup>−1), a NaN or an
 * infinity has no canonical form and is refused (pass such numbers as strings).
 */
public final class Fingerprint {
  private static final long MAX_SAFE_INTEGER = (1L << 53) - 1;

  private Fingerprint() {}

  /**
   * The fingerprint of {@code request}: {@code sha256(utf8(canonicalJson(request)))}, 32 bytes.
   *
   * @param request the request, as JSON values
   * @return the 32-byte SHA-256 digest
   * @throws IllegalArgumentException if the request has no canonical JSON form
   */
  public static byte[] of(Object request) {
    byte[] canonical = canonicalJson(request).getBytes(StandardCharsets.UTF_8);
    try {
      return MessageDigest.getInstance("SHA-256").digest(canonical);
    } catch (NoSuchAlgorithmException impossible) {
      // Every Java platform must provide SHA-256 (MessageDigest's documentation).
      throw new IllegalStateException("SHA-256 is not available", impossible);
    }
  }

  /**
   * The RFC 8785 canonical JSON text of {@code request}.
   *
   * @param request the request, as JSON values
   * @return the canonical JSON text
   * @throws IllegalArgumentException if the request has no canonical JSON form
   */
  public static String canonicalJson(Object request) {
    StringBuilder out = new StringBuilder();
    write(request, out, new IdentityHashMap<>());
    return out.toString();
  }

  private static void write(Object value, StringBuilder out, IdentityHashMap<Object, Object> path) {
    if (value == null) {
      out.append("null");
    } else if (value instanceof Boolean bool) {
      out.append(bool ? "true" : "false");
    } else if (value instanceof CharSequence text) {
      writeString(text.toString(), out);
    } else if (value instanceof Number number) {
      out.append(number(number));
    } else if (value instanceof Map<?, ?> map) {
      enter(value, path);
      List<String> keys = new ArrayList<>(map.size());
      for (Object key : map.keySet()) {
        if (!(key instanceof String name)) {
          throw new IllegalArgumentException("a JSON object's keys are strings, not " + key);
        }
        keys.add(name);
      }
      // RFC 8785 sorts by UTF-16 code units, which is exactly String.compareTo.
      keys.sort(String::compareTo);
      out.append('{');
      for (int i = 0; i < keys.size(); i++) {
        if (i > 0) {
          out.append(',');
        }
        writeString(keys.get(i), out);
        out.append(':');
        write(map.get(keys.get(i)), out, path);
      }
      out.append('}');
      path.remove(value);
    } else if (value instanceof Iterable<?> items) {
      enter(value, path);
      writeArray(items, out, path);
      path.remove(value);
    } else if (value instanceof Object[] items) {
      enter(value, path);
      writeArray(List.of(items), out, path);
      path.remove(value);
    } else {
      throw new IllegalArgumentException(
          "not a JSON value (use Map, List, String, Number, Boolean or null): "
              + value.getClass().getName());
    }
  }

  private static void enter(Object container, IdentityHashMap<Object, Object> path) {
    if (path.put(container, container) != null) {
      throw new IllegalArgumentException("the request contains itself: no JSON form");
    }
  }

  private static void writeArray(
      Iterable<?> items, StringBuilder out, IdentityHashMap<Object, Object> path) {
    out.append('[');
    boolean first = true;
    for (Object item : items) {
      if (!first) {
        out.append(',');
      }
      first = false;
      write(item, out, path);
    }
    out.append(']');
  }

  private static void writeString(String text, StringBuilder out) {
    out.append('"');
    for (int i = 0; i < text.length(); i++) {
      char c = text.charAt(i);
      if (Character.isHighSurrogate(c)
          && i + 1 < text.length()
          && Character.isLowSurrogate(text.charAt(i + 1))) {
        out.append(c).append(text.charAt(i + 1));
        i++;
        continue;
      }
      if (Character.isSurrogate(c)) {
        throw new IllegalArgumentException("a string holds a lone surrogate: no UTF-8 form");
      }
      switch (c) {
        case '"' -> out.append("\\\"");
        case '\\' -> out.append("\\\\");
        case '\b' -> out.append("\\b");
        case '\f' -> out.append("\\f");
        case '\n' -> out.append("\\n");
        case '\r' -> out.append("\\r");
        case '\t' -> out.append("\\t");
        default -> {
          if (c < 0x20) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
        }
      }
    }
    out.append('"');
  }

  private static String number(Number number) {
    double value;
    if (number instanceof Long
        || number instanceof Integer
        || number instanceof Short
        || number instanceof Byte) {
      long whole = number.longValue();
      if (whole > MAX_SAFE_INTEGER || whole < -MAX_SAFE_INTEGER) {
        throw new IllegalArgumentException(
            "integer " + whole + " is beyond ±(2^53-1): pass it as a string");
      }
      value = whole;
    } else if (number instanceof BigInteger big) {
      if (big.abs().compareTo(BigInteger.valueOf(MAX_SAFE_INTEGER)) > 0) {
        throw new IllegalArgumentException(
            "integer " + big + " is beyond ±(2^53-1): pass it as a string");
      }
      value = big.doubleValue();
    } else {
      value = number.doubleValue();
    }
    return ecmaScriptNumber(value);
  }

  /**
   * ECMAScript's Number::toString, which RFC 8785 prescribes: the shortest decimal digits that
   * read back as the same double, laid out as plain digits for exponents in [-6, 21) and in
   * exponent notation otherwise. (Java 17's Double.toString does not always give the shortest
   * digits, so they are found here with BigDecimal.)
   */
  static String ecmaScriptNumber(double value) {
    if (Double.isNaN(value) || Double.isInfinite(value)) {
      throw new IllegalArgumentException(value + " has no JSON form");
    }
    if (value == 0) {
      return "0"; // also -0
    }
    if (value < 0) {
      return "-" + ecmaScriptNumber(-value);
    }
    BigDecimal exact = new BigDecimal(value);
    BigDecimal shortest = exact;
    for (int precision = 1; precision <= 17; precision++) {
      BigDecimal rounded = exact.round(new MathContext(precision, RoundingMode.HALF_EVEN));
      if (rounded.doubleValue() == value) {
        shortest = rounded;
        break;
      }
    }
    String digits = shortest.unscaledValue().toString();
    // Drop trailing zeros of the digit string: they belong to the exponent.
    int end = digits.length();
    while (end > 1 && digits.charAt(end - 1) == '0') {
      end--;
    }
    int k = end;
    // value = 0.d1d2...dk × 10^n
    int n = digits.length() - shortest.scale();
    digits = digits.substring(0, k);
    StringBuilder out = new StringBuilder();
    if (k <= n && n <= 21) {
      out.append(digits);
      out.append("0".repeat(n - k));
    } else if (0 < n && n <= 21) {
      out.append(digits, 0, n).append('.').append(digits, n, k);
    } else if (-6 < n && n <= 0) {
      out.append("0.").append("0".repeat(-n)).append(digits);
    } else {
      int exponent = n - 1;
      out.append(digits.charAt(0));
      if (k > 1) {
        out.append('.').append(digits, 1, k);
      }
      out.append('e').append(exponent < 0 ? '-' : '+').append(Math.abs(exponent));
    }
    return out.toString();
  }
}
