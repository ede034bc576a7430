import assert from "node:assert/strict";
import { test } from "node:test";
import { IdemdUnavailableError, IdempotencyClient } from "../src/index.js";
import { blackHole, closedPort, uniqueKey } from "./helpers.js";

test("fail closed: a closed port gives IdemdUnavailableError and work does not run", async () => {
  const client = new IdempotencyClient(`127.0.0.1:${await closedPort()}`);
  let calls = 0;
  try {
    await assert.rejects(
      client.idempotent("ns", uniqueKey("down"), { a: 1 }, async () => {
        calls++;
        return "x";
      }),
      (err: unknown) => err instanceof IdemdUnavailableError && err.code === 14, // UNAVAILABLE
    );
    assert.equal(calls, 0);
  } finally {
    client.close();
  }
});

test("fail open: a closed port with failOpen runs work unprotected", async () => {
  const client = new IdempotencyClient(`127.0.0.1:${await closedPort()}`);
  try {
    const r = await client.idempotent(
      "ns",
      uniqueKey("down"),
      { a: 1 },
      async (ctx) => {
        assert.equal(ctx.protected, false);
        assert.equal(ctx.fencingToken, 0n);
        return { body: "unprotected", code: 7 };
      },
      { failOpen: true },
    );
    assert.deepEqual(
      { body: r.result.body.toString(), code: r.result.code, replayed: r.replayed, protected: r.protected },
      { body: "unprotected", code: 7, replayed: false, protected: false },
    );
  } finally {
    client.close();
  }
});

test("fail closed: an Acquire that runs into its deadline gives IdemdUnavailableError", async () => {
  const hole = await blackHole();
  const client = new IdempotencyClient(hole.address, { rpcTimeoutMs: 300 });
  let calls = 0;
  try {
    const started = Date.now();
    await assert.rejects(
      client.idempotent("ns", uniqueKey("hang"), { a: 1 }, async () => {
        calls++;
        return "x";
      }),
      (err: unknown) => err instanceof IdemdUnavailableError && err.code === 4, // DEADLINE_EXCEEDED
    );
    assert.ok(Date.now() - started < 5000);
    assert.equal(calls, 0);
    const r = await client.idempotent("ns", uniqueKey("hang"), { a: 1 }, async () => "open", { failOpen: true });
    assert.equal(r.protected, false);
    assert.equal(r.result.body.toString(), "open");
  } finally {
    client.close();
    await hole.close();
  }
});
