// The Express middleware against a live idemd (memory store) and a real Express app on 127.0.0.1: the behaviours the
// conformance driver (clients/conformance/http/driver.py) does not reach through the example app's routes.
import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import type { Server } from "node:http";
import { after, before, describe, test } from "node:test";
import express from "express";
import { IdempotencyClient } from "../src/index.js";
import { idempotency, type IdempotencyOptions } from "../src/http.js";
import { startIdemd, uniqueKey, type Idemd } from "./helpers.js";

describe("Express middleware against idemd", () => {
  let idemd: Idemd;
  let client: IdempotencyClient;
  let server: Server;
  let base: string;
  const runs = new Map<string, number>();
  const logged: string[] = [];
  const logger = { error: (m: string) => logged.push(m), warn: (m: string) => logged.push(m) };

  const count = (id: string) => {
    runs.set(id, (runs.get(id) ?? 0) + 1);
    return runs.get(id)!;
  };
  const route = (options: Partial<IdempotencyOptions>) => idempotency({ client, namespace: "node-mw", logger, leaseTtlMs: 2000, ...options });

  before(async () => {
    idemd = await startIdemd();
    client = new IdempotencyClient(idemd.address);
    const app = express();
    // A response larger than maxStoredBytes: sent, not stored.
    app.post("/big", route({ maxStoredBytes: 1000 }), (req, res) => {
      const run = count(`big ${(req.body as { id: string }).id}`);
      res.status(201).type("text/plain").send(`${run}:${"x".repeat(5000)}`);
    });
    // A handler that throws: Express answers 500 itself.
    app.post("/throws", route({}), (req) => {
      count(`throws ${(req.body as { id: string }).id}`);
      throw new Error("the handler failed");
    });
    // A handler that never answers (until the caller goes away), unless asked to.
    app.post("/hangs", route({ leaseTtlMs: 3000 }), (req, res) => {
      const run = count(`hangs ${(req.body as { id: string }).id}`);
      if (req.get("x-answer")) res.status(201).json({ run });
    });
    // A namespace idemd refuses: the middleware's configuration is wrong.
    app.post("/misconfigured", idempotency({ client, namespace: "not a namespace!", logger }), (_req, res) => {
      res.status(201).end();
    });
    // A client timestamp left out of the fingerprint.
    app.post("/exclude", route({ fingerprintExclude: ["ts"] }), (req, res) => {
      res.status(201).json({ run: count(`exclude ${(req.body as { id: string }).id}`) });
    });
    // Mounted after a body parser: fails loudly, never fingerprints an empty body.
    app.post("/late", express.json(), route({}), (_req, res) => {
      res.status(201).end();
    });
    app.use((err: Error, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      res.status(500).type("text/plain").send(err.message);
    });
    server = app.listen(0, "127.0.0.1");
    await new Promise<void>((resolve) => server.once("listening", () => resolve()));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(async () => {
    server?.closeAllConnections();
    await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
    client?.close();
    await idemd?.stop();
  });

  const post = (path: string, key: string, body: unknown, signal?: AbortSignal, headers: Record<string, string> = {}) =>
    fetch(base + path, {
      method: "POST",
      headers: { "Idempotency-Key": key, "Content-Type": "application/json", ...headers },
      body: JSON.stringify(body),
      signal,
    });

  test("a response larger than maxStoredBytes is sent whole, not stored, and the key released", async () => {
    const id = uniqueKey("big");
    const key = uniqueKey("k");
    const first = await post("/big", key, { id });
    assert.equal(first.status, 201);
    assert.equal((await first.text()).length, "1:".length + 5000);
    const second = await post("/big", key, { id });
    assert.equal(second.status, 201);
    assert.equal(second.headers.get("idempotent-replayed"), null);
    assert.ok((await second.text()).startsWith("2:"), "the retry ran the handler again");
    assert.ok(logged.some((m) => m.includes("larger than 1000 bytes")), `logged: ${logged.join("\n")}`);
  });

  test("a handler that throws releases the key: Express's 500 goes out, the retry runs again", async () => {
    const id = uniqueKey("throws");
    const key = uniqueKey("k");
    for (let attempt = 1; attempt <= 2; attempt++) {
      const answer = await post("/throws", key, { id });
      assert.equal(answer.status, 500);
      assert.equal(await answer.text(), "the handler failed");
    }
    assert.equal(runs.get(`throws ${id}`), 2);
  });

  test("a caller that goes away before the answer releases the key", async () => {
    const id = uniqueKey("hangs");
    const key = uniqueKey("k");
    const abort = new AbortController();
    const first = post("/hangs", key, { id }, abort.signal);
    for (let i = 0; i < 200 && !runs.get(`hangs ${id}`); i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(runs.get(`hangs ${id}`), 1, "the first request reached the handler");
    abort.abort();
    await assert.rejects(first);
    // Released, not held until the lease (3 s) expires: well within it, the retry runs the handler again.
    const aborted = Date.now();
    const retry = () => post("/hangs", key, { id }, undefined, { "X-Answer": "1" });
    let answer = await retry();
    while (answer.status === 409 && Date.now() - aborted < 1500) {
      await new Promise((r) => setTimeout(r, 10)); // the Release is on its way
      answer = await retry();
    }
    assert.equal(answer.status, 201, `still ${answer.status} 1.5 s after the caller went away`);
    assert.deepEqual(await answer.json(), { run: 2 });
  });

  test("idemd refusing the middleware's call is a 500 idemd-rejected naming the code", async () => {
    const answer = await post("/misconfigured", uniqueKey("k"), {});
    assert.equal(answer.status, 500);
    assert.equal(answer.headers.get("content-type"), "application/problem+json");
    const problem = (await answer.json()) as { type: string; detail: string };
    assert.ok(problem.type.endsWith("#idemd-rejected"), problem.type);
    assert.match(problem.detail, /INVALID_ARGUMENT/);
  });

  test("fingerprintExclude: a changed excluded field replays, a changed kept one is key-reused", async () => {
    const id = uniqueKey("exclude");
    const key = uniqueKey("k");
    const first = await post("/exclude", key, { id, amount: 5, ts: "10:00" });
    assert.equal(first.status, 201);
    const again = await post("/exclude", key, { id, amount: 5, ts: "10:01" });
    assert.equal(again.status, 201);
    assert.equal(again.headers.get("idempotent-replayed"), "true");
    assert.deepEqual(await again.json(), await first.json());
    const changed = await post("/exclude", key, { id, amount: 6, ts: "10:00" });
    assert.equal(changed.status, 422);
    assert.equal(runs.get(`exclude ${id}`), 1);
  });

  test("mounted after a body parser, it fails loudly instead of fingerprinting nothing", async () => {
    const answer = await post("/late", uniqueKey("k"), { a: 1 });
    assert.equal(answer.status, 500);
    assert.match(await answer.text(), /mount the middleware before the body parsers/);
  });
});
