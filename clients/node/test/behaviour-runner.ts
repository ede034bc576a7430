// The Node runner of the client behaviour suite (clients/BEHAVIOUR.md):
//
//   node dist-behaviour/test/behaviour-runner.js ADDRESS CASES_FILE CASE_NAME
//
// runs `IdempotencyClient.idempotent` once against the fake idemd at ADDRESS with the case's options
// and work, and prints one line of JSON: error (a kind of BEHAVIOUR.md, or null), work_runs, body,
// replayed, protected. tests/suite/behaviour.rs runs it for every case.
import { readFileSync } from "node:fs";
import * as idemd from "../src/index.js";
import { idemdKindOf } from "./error-kinds.js";

interface CaseFile {
  defaults: Record<string, unknown>;
  default_work: Work;
  cases: { name: string; options?: Record<string, unknown>; work?: Work }[];
}
interface Work {
  returns?: string;
  fails?: "retryable" | "terminal";
  store?: string;
}

class WorkFailed extends Error {}

function kindOf(err: unknown): string {
  if (err instanceof WorkFailed || err instanceof idemd.RetryableError) return "work_failed";
  return idemdKindOf(err);
}

async function main(): Promise<void> {
  const [address, casesPath, name] = process.argv.slice(2);
  if (!address || !casesPath || !name) throw new Error("usage: behaviour-runner ADDRESS CASES_FILE CASE_NAME");
  const doc = JSON.parse(readFileSync(casesPath, "utf8")) as CaseFile;
  const kase = doc.cases.find((c) => c.name === name);
  if (!kase) throw new Error(`no case ${name}`);
  const opts = { ...doc.defaults, ...(kase.options ?? {}) } as Record<string, number & boolean>;
  const work = kase.work ?? doc.default_work;
  let runs = 0;
  const client = new idemd.IdempotencyClient(address, { rpcTimeoutMs: opts.rpc_timeout_ms });
  let line: Record<string, unknown>;
  try {
    const store = work.store;
    const outcome = await client.idempotent(
      "behaviour",
      name,
      Buffer.from("behaviour-fingerprint"),
      async () => {
        runs++;
        if (work.returns !== undefined) return work.returns;
        if (work.fails === "retryable") throw new idemd.RetryableError("retryable");
        throw new WorkFailed("terminal");
      },
      {
        failOpen: opts.fail_open,
        leaseTtlMs: opts.lease_ttl_ms,
        waitTimeoutMs: opts.wait_timeout_ms,
        maxWaits: opts.max_waits,
        completeOnError: store === undefined ? undefined : () => store,
        // Unknown to a client without retries: ignored there.
        ...({ maxAttempts: opts.max_attempts, backoffInitialMs: opts.backoff_initial_ms, backoffMaxMs: opts.backoff_max_ms } as object),
      },
    );
    line = {
      error: null,
      work_runs: runs,
      body: outcome.result.body.toString("utf8"),
      replayed: outcome.replayed,
      protected: outcome.protected,
    };
  } catch (err) {
    const e = err as Error;
    line = { error: kindOf(err), work_runs: runs, body: null, replayed: null, protected: null, detail: `${e?.name}: ${e?.message}` };
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(line) + "\n");
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`behaviour runner failed: ${err?.stack ?? err}\n`);
    process.exit(2);
  },
);
