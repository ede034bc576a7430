package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.HexFormat;
import org.junit.jupiter.api.Test;

/** TLS and the bearer token reach idemd, and its refusals are typed. */
class AuthTest {
  private static final String TOKEN = "java-client-test-token";

  @Test
  void theBearerTokenIsSentOnEveryCall() throws Exception {
    Path policy = Files.createTempFile("idemd-java-auth-", ".toml");
    String digest =
        HexFormat.of()
            .formatHex(
                MessageDigest.getInstance("SHA-256").digest(TOKEN.getBytes(StandardCharsets.UTF_8)));
    Files.writeString(
        policy,
        "[[callers]]\nname = \"java-test\"\ntoken_sha256 = [\""
            + digest
            + "\"]\n  [[callers.grants]]\n  namespaces = [\"java-*\"]\n  rpcs = [\"*\"]\n");
    try (IdemdProcess idemd = IdemdProcess.start("--auth-config", policy.toString());
        IdempotencyClient good = IdempotencyClient.builder(idemd.address()).token(TOKEN).build();
        IdempotencyClient anonymous = IdempotencyClient.create(idemd.address())) {
      IdempotentResult done =
          good.idempotent(
              "java-auth", ClientTest.uniqueKey("auth"), null, context -> StoredResult.of("ok"));
      assertEquals("ok", done.result().bodyUtf8());
      UnauthenticatedException unauthenticated =
          assertThrows(
              UnauthenticatedException.class,
              () ->
                  anonymous.idempotent(
                      "java-auth",
                      ClientTest.uniqueKey("auth"),
                      null,
                      IdempotentOptions.builder().failOpen(true).build(),
                      context -> StoredResult.of("never")));
      assertEquals("UNAUTHENTICATED", unauthenticated.reason());
      PermissionDeniedException denied =
          assertThrows(
              PermissionDeniedException.class,
              () ->
                  good.idempotent(
                      "other", ClientTest.uniqueKey("auth"), null, context -> StoredResult.of("never")));
      assertEquals("PERMISSION_DENIED", denied.reason());
    } finally {
      Files.deleteIfExists(policy);
    }
  }

  @Test
  void tlsWithTheServersCaIsUsedAndPlaintextIsRefused() throws Exception {
    Path dir = Files.createTempDirectory("idemd-java-tls-");
    Path cert = dir.resolve("cert.pem");
    Path key = dir.resolve("key.pem");
    // A self-signed certificate for 127.0.0.1, made with the openssl command-line tool.
    Process openssl =
        new ProcessBuilder(
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "1", "-subj", "/CN=idemd-java-test",
                "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", key.toString(), "-out", cert.toString())
            .redirectErrorStream(true)
            .start();
    String opensslOutput = new String(openssl.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
    assertEquals(0, openssl.waitFor(), "openssl failed: " + opensslOutput);
    try (IdemdProcess idemd =
            IdemdProcess.start("--tls-cert", cert.toString(), "--tls-key", key.toString());
        IdempotencyClient tls = IdempotencyClient.builder(idemd.address()).tls(new File(cert.toString())).build();
        IdempotencyClient plaintext = IdempotencyClient.create(idemd.address())) {
      IdempotentResult done =
          tls.idempotent("java-tls", ClientTest.uniqueKey("tls"), null, context -> StoredResult.of("over tls"));
      assertEquals("over tls", done.result().bodyUtf8());
      assertTrue(tls.idempotent("java-tls", "k", null, context -> StoredResult.of("x")).isProtected());
      // Plaintext to a TLS listener is a misconfiguration, not an outage: grpc-java reports the
      // TLS bytes as an HTTP/2 protocol error (INTERNAL), so even failOpen does not run the work.
      java.util.concurrent.atomic.AtomicInteger runs = new java.util.concurrent.atomic.AtomicInteger();
      IdemdException refused =
          assertThrows(
              IdemdException.class,
              () ->
                  plaintext.idempotent(
                      "java-tls",
                      ClientTest.uniqueKey("plain"),
                      null,
                      IdempotentOptions.builder().maxAttempts(1).failOpen(true).build(),
                      context -> {
                        runs.incrementAndGet();
                        return StoredResult.of("never");
                      }));
      assertEquals(io.grpc.Status.Code.INTERNAL, refused.code(), refused.toString());
      assertEquals(0, runs.get());
    } finally {
      Files.deleteIfExists(cert);
      Files.deleteIfExists(key);
      Files.deleteIfExists(dir);
    }
  }
}
