package dev.idemd.client.servlet;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Which responses are stored (HTTP-MIDDLEWARE.md §4) and the problem documents (§5). */
class ProblemAndStorableTest {
  @Test
  void defaultStorableStatuses() {
    for (int status : List.of(200, 201, 204, 299, 301, 303, 304, 400, 401, 404, 410, 422, 499)) {
      assertTrue(IdempotencyFilter.storableByDefault(status), "stores " + status);
    }
    for (int status : List.of(100, 199, 408, 409, 425, 429, 500, 502, 503, 504, 599)) {
      assertFalse(IdempotencyFilter.storableByDefault(status), "does not store " + status);
    }
  }

  @Test
  void everyProblemHasItsStatusTypeAndTitle() {
    String base = "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#";
    Map<Problem, Object[]> expected =
        Map.of(
            Problem.MISSING_KEY, new Object[] {400, "missing-key"},
            Problem.INVALID_KEY, new Object[] {400, "invalid-key"},
            Problem.REQUEST_IN_PROGRESS, new Object[] {409, "request-in-progress"},
            Problem.REQUEST_TOO_LARGE, new Object[] {413, "request-too-large"},
            Problem.KEY_REUSED, new Object[] {422, "key-reused"},
            Problem.IDEMD_REJECTED, new Object[] {500, "idemd-rejected"},
            Problem.IDEMD_UNAVAILABLE, new Object[] {503, "idemd-unavailable"});
    assertEquals(Problem.values().length, expected.size());
    for (Map.Entry<Problem, Object[]> entry : expected.entrySet()) {
      Problem problem = entry.getKey();
      JsonObject document =
          JsonParser.parseString(
                  new String(problem.document("why \"quoted\""), StandardCharsets.UTF_8))
              .getAsJsonObject();
      assertEquals(java.util.Set.of("type", "title", "status", "detail"), document.keySet(), problem.name());
      assertEquals(entry.getValue()[0], document.get("status").getAsInt(), problem.name());
      assertEquals(base + entry.getValue()[1], document.get("type").getAsString(), problem.name());
      assertFalse(document.get("title").getAsString().isEmpty(), problem.name());
      assertEquals("why \"quoted\"", document.get("detail").getAsString(), problem.name());
    }
    assertEquals("application/problem+json", Problem.CONTENT_TYPE);
  }
}
