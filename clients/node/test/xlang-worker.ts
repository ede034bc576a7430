// The Node worker of the cross-language test (tests/suite/cross_language.rs):
//
//   node dist-xlang/test/xlang-worker.js ADDRESS
//
// reads commands from stdin, one JSON line each: {"namespace", "repeats", "calls": [{"key",
// "request"}]}; it answers {"ready": true} and starts on the next line ("go"), so that every
// language starts at once. For every call it runs `IdempotencyClient.idempotent` `repeats` times, all runs of
// all calls at once, with the fingerprint this client computes from `request`. The work returns
// "node:KEY:N" (N counts this worker's work runs, so two runs never return the same bytes). It
// prints one JSON line per run: {"key", "work_runs", "error" (a kind of clients/BEHAVIOUR.md, or
// null), "body", "replayed"}, then {"done": number of runs}. It ends when stdin closes.
import { createInterface } from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";
import * as idemd from "../src/index.js";
import { idemdKindOf } from "./error-kinds.js";

const LANGUAGE = "node";

interface Call {
  key: string;
  request: unknown;
}
interface Command {
  namespace: string;
  repeats: number;
  calls: Call[];
}

let workRuns = 0;

async function runOne(client: idemd.IdempotencyClient, namespace: string, call: Call): Promise<Record<string, unknown>> {
  let executed = 0;
  try {
    const outcome = await client.idempotent(namespace, call.key, idemd.fingerprint(call.request), async () => {
      executed++;
      const n = ++workRuns;
      // The work takes a moment, as real work does, so other callers meet the key held.
      await sleep(20);
      return `${LANGUAGE}:${call.key}:${n}`;
    });
    return {
      key: call.key,
      work_runs: executed,
      error: null,
      body: outcome.result.body.toString("utf8"),
      replayed: outcome.replayed,
    };
  } catch (err) {
    const e = err as Error;
    return { key: call.key, work_runs: executed, error: idemdKindOf(err), body: null, replayed: null, detail: `${e?.name}: ${e?.message}` };
  }
}

async function main(): Promise<void> {
  const [address] = process.argv.slice(2);
  if (!address) throw new Error("usage: xlang-worker ADDRESS");
  const client = new idemd.IdempotencyClient(address);
  try {
    const input = createInterface({ input: process.stdin, crlfDelay: Infinity })[Symbol.asyncIterator]();
    for (let next = await input.next(); !next.done; next = await input.next()) {
      if (!next.value.trim()) continue;
      const command = JSON.parse(next.value) as Command;
      process.stdout.write(JSON.stringify({ ready: true }) + "\n");
      if ((await input.next()).done) break;
      const runs = command.calls.flatMap((call) => Array.from({ length: command.repeats }, () => call));
      const lines = await Promise.all(runs.map((call) => runOne(client, command.namespace, call)));
      for (const line of lines) process.stdout.write(JSON.stringify(line) + "\n");
      process.stdout.write(JSON.stringify({ done: lines.length }) + "\n");
    }
  } finally {
    client.close();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`xlang worker failed: ${err?.stack ?? err}\n`);
    process.exit(2);
  },
);
