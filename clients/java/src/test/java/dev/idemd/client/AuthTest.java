package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.HexFormat;
import org.junit.jupiter.api.Test;

/** The bearer token reaches idemd's authorisation, and its refusals are typed. */
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
}
