// The behaviour tests of IdempotencyClient.idempotent against a live idemd, run once per store.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  FingerprintMismatchError,
  IdemdError,
  IdempotencyClient,
  LeaseLostError,
  RetryableError,
  type IdempotentResult,
  type WorkContext,
} from "../src/index.js";
import { abortOf, createDatabase, sleep, startIdemd, uniqueKey, type Idemd, type TestDatabase } from "./helpers.js";

const NS = "node-client-test";

export function backendSuite(backend: "memory" | "postgres"): void {
  describe(`idempotent() against idemd (${backend} store)`, () => {
    let idemd: Idemd | undefined;
    let db: TestDatabase | undefined;
    let client: IdempotencyClient;

    before(async () => {
      const args: string[] = [];
      if (backend === "postgres") {
        db = await createDatabase(); // throws (fails every test) when PostgreSQL is unreachable
        args.push("--database-url", db.url);
      }
      idemd = await startIdemd(args);
      client = new IdempotencyClient(idemd.address);
    });

    after(async () => {
      client?.close();
      await idemd?.stop();
      await db?.drop();
    });

    test("a completed key is replayed; work runs once", async () => {
      const key = uniqueKey("replay");
      let calls = 0;
      const tokens: bigint[] = [];
      const work = async (ctx: WorkContext) => {
        calls++;
        tokens.push(ctx.fencingToken);
        assert.equal(typeof ctx.leaseToken, "string");
        assert.match(ctx.leaseToken, /^[0-9a-f]{32}$/);
        return { body: "charged", code: 201, metadata: { "content-type": "text/plain" } };
      };
      const req = { amount: 1250, currency: "EUR" };
      const first = await client.idempotent(NS, key, req, work);
      assert.equal(first.replayed, false);
      assert.equal(first.protected, true);
      assert.equal(first.result.body.toString(), "charged");
      assert.equal(first.result.code, 201);
      assert.deepEqual(first.result.metadata, { "content-type": "text/plain" });
      assert.equal(typeof tokens[0], "bigint");
      assert.ok(tokens[0]! > 0n);

      // Same request, keys in another order: same canonical fingerprint, so a replay.
      const second = await client.idempotent(NS, key, { currency: "EUR", amount: 1250 }, work);
      assert.equal(second.replayed, true);
      assert.equal(second.result.body.toString(), "charged");
      assert.equal(second.result.code, 201);
      assert.deepEqual(second.result.metadata, { "content-type": "text/plain" });
      assert.equal(calls, 1);

      const { record } = await client.get({ namespace: NS, key });
      assert.equal(record?.state, "RECORD_STATE_COMPLETED");
      assert.equal(BigInt(record!.fencingToken), tokens[0]);
    });

    test("10 concurrent duplicates: one execution, all get the same result", async () => {
      const key = uniqueKey("concurrent");
      let calls = 0;
      const work = async () => {
        calls++;
        await sleep(500);
        return Buffer.from(`result-${calls}`);
      };
      const results: IdempotentResult[] = await Promise.all(
        Array.from({ length: 10 }, () => client.idempotent(NS, key, { op: "concurrent" }, work)),
      );
      assert.equal(calls, 1);
      for (const r of results) assert.equal(r.result.body.toString(), "result-1");
      assert.equal(results.filter((r) => !r.replayed).length, 1);
      assert.equal(results.filter((r) => r.replayed).length, 9);
    });

    test("a retryable failure releases the key; the next call runs work again", async () => {
      const key = uniqueKey("retryable");
      let calls = 0;
      await assert.rejects(
        client.idempotent(NS, key, { op: "retry" }, async () => {
          calls++;
          throw new RetryableError("downstream timed out");
        }),
        RetryableError,
      );
      // isRetryable classifies a plain error as retryable too.
      await assert.rejects(
        client.idempotent(
          NS,
          key,
          { op: "retry" },
          async () => {
            calls++;
            throw new Error("ECONNRESET");
          },
          { isRetryable: (e) => (e as Error).message === "ECONNRESET" },
        ),
        /ECONNRESET/,
      );
      const ok = await client.idempotent(NS, key, { op: "retry" }, async () => {
        calls++;
        return "done";
      });
      assert.equal(calls, 3);
      assert.equal(ok.replayed, false);
      assert.equal(ok.result.body.toString(), "done");
    });

    test("a non-retryable failure releases by default, or stores completeOnError's result", async () => {
      const key = uniqueKey("fatal");
      let calls = 0;
      const boom = async () => {
        calls++;
        throw new TypeError("card declined");
      };
      await assert.rejects(client.idempotent(NS, key, { op: "fatal" }, boom), TypeError);
      // Released: the key is free, so this runs the work again and stores the error result.
      await assert.rejects(
        client.idempotent(NS, key, { op: "fatal" }, boom, {
          completeOnError: (e) => ({ body: (e as Error).message, code: 402 }),
        }),
        TypeError,
      );
      assert.equal(calls, 2);
      const replay = await client.idempotent(NS, key, { op: "fatal" }, boom);
      assert.equal(calls, 2);
      assert.equal(replay.replayed, true);
      assert.equal(replay.result.code, 402);
      assert.equal(replay.result.body.toString(), "card declined");
    });

    test("the lease is renewed through work longer than its TTL; a duplicate does not run work", async () => {
      const key = uniqueKey("lease");
      let calls = 0;
      let signal: AbortSignal | undefined;
      const work = async (ctx: WorkContext) => {
        calls++;
        signal = ctx.signal;
        await sleep(3000);
        return "slow result";
      };
      const opts = { leaseTtlMs: 1000 };
      const first = client.idempotent(NS, key, { op: "slow" }, work, opts);
      await sleep(1500); // past the first lease's TTL: only renewals keep the key
      const { record } = await client.get({ namespace: NS, key });
      assert.equal(record?.state, "RECORD_STATE_IN_PROGRESS");
      const duplicate = client.idempotent(NS, key, { op: "slow" }, work, opts);
      const [a, b] = await Promise.all([first, duplicate]);
      assert.equal(calls, 1);
      assert.equal(signal?.aborted, false);
      assert.equal(a.replayed, false);
      assert.equal(b.replayed, true);
      assert.equal(a.result.body.toString(), "slow result");
      assert.equal(b.result.body.toString(), "slow result");
      const done = await client.get({ namespace: NS, key });
      assert.equal(done.record?.attempts, 1, "the lease was never taken over");
    });

    test("a lease taken over aborts ctx.signal and makes Complete fail with LeaseLostError", async () => {
      const key = uniqueKey("takeover");
      let abortedDuringWork = false;
      const p = client.idempotent(
        NS,
        key,
        undefined,
        async (ctx) => {
          // Lose the lease: give it back and let another caller take the key.
          await client.release({ namespace: NS, key, leaseToken: ctx.leaseToken });
          const thief = await client.acquire({ namespace: NS, key, leaseTtl: { seconds: 30, nanos: 0 } });
          assert.equal(thief.outcome, "OUTCOME_ACQUIRED");
          assert.match(thief.lease!.fencingToken, /^\d+$/);
          assert.ok(BigInt(thief.lease!.fencingToken) > ctx.fencingToken);
          // A Renew (every 100 ms) finds the lease gone and aborts the signal: wait for that event.
          await abortOf(ctx.signal, 5000);
          abortedDuringWork = ctx.signal.aborted;
          return "late";
        },
        { leaseTtlMs: 300 },
      );
      await assert.rejects(p, (err: unknown) => err instanceof LeaseLostError && err.reason === "LEASE_NOT_HELD");
      assert.equal(abortedDuringWork, true);
    });

    test("a key reused for a different request fails with FingerprintMismatchError", async () => {
      const key = uniqueKey("mismatch");
      let calls = 0;
      const work = async () => {
        calls++;
        return "ok";
      };
      await client.idempotent(NS, key, { amount: 1 }, work);
      await assert.rejects(client.idempotent(NS, key, { amount: 2 }, work), (err: unknown) => {
        assert.ok(err instanceof FingerprintMismatchError);
        assert.equal(err.reason, "FINGERPRINT_MISMATCH");
        assert.equal(err.code, 9); // FAILED_PRECONDITION
        assert.equal(err.errorInfo?.domain, "idemd");
        return true;
      });
      // A raw fingerprint (Buffer) is used as is: also a mismatch.
      await assert.rejects(client.idempotent(NS, key, Buffer.from("raw"), work), FingerprintMismatchError);
      assert.equal(calls, 1);
    });

    test("an invalid request surfaces INVALID_REQUEST with its field violations", async () => {
      await assert.rejects(client.idempotent("bad namespace!", "k", undefined, async () => "x"), (err: unknown) => {
        assert.ok(err instanceof IdemdError);
        assert.equal(err.reason, "INVALID_REQUEST");
        assert.equal(err.code, 3); // INVALID_ARGUMENT
        assert.ok(err.fieldViolations.some((v) => v.field === "namespace"), JSON.stringify(err.fieldViolations));
        return true;
      });
    });
  });
}
