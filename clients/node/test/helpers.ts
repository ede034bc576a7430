import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createServer, type Server, type Socket } from "node:net";
import pg from "pg";

/** The idemd to test: $IDEMD_BINARY, never a guess (a binary left by an earlier run could be stale). `cargo test` sets it (tests/suite/clients.rs). */
export const IDEMD_BINARY = process.env.IDEMD_BINARY;
export const ADMIN_DATABASE_URL = process.env.IDEMD_TEST_DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";

export interface Idemd {
  /** host:port of the gRPC listener. */
  address: string;
  /** Everything idemd wrote to stderr so far. */
  log(): string;
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** Starts `$IDEMD_BINARY serve` on ephemeral ports and resolves once it logs its gRPC address. */
export function startIdemd(extraArgs: string[] = []): Promise<Idemd> {
  if (!IDEMD_BINARY) {
    return Promise.reject(
      new Error("IDEMD_BINARY is not set: set it to the idemd binary to test, e.g. IDEMD_BINARY=target/debug/idemd (cargo test sets it)"),
    );
  }
  const args = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--min-lease-ttl", "10ms", ...extraArgs];
  const child = spawn(IDEMD_BINARY, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, NO_COLOR: "1", RUST_LOG_STYLE: "never" },
  });
  running.add(child);
  let stderr = "";
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    }
    running.delete(child);
  };

  return new Promise<Idemd>((resolve, reject) => {
    const timer = setTimeout(() => {
      void stop();
      reject(new Error(`idemd did not report its gRPC address within 30 s. stderr:\n${stderr}`));
    }, 30_000);
    child.once("error", (err) => {
      clearTimeout(timer);
      running.delete(child);
      reject(new Error(`cannot start idemd at ${IDEMD_BINARY} (set IDEMD_BINARY): ${err.message}`));
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`idemd exited (code ${code}, signal ${signal}) before serving. stderr:\n${stderr}`));
    });
    child.stderr!.setEncoding("utf8");
    // Keep reading stderr for the whole life of the process, so idemd never blocks on a full pipe.
    child.stderr!.on("data", (chunk: string) => {
      stderr += chunk;
      const m = /serving gRPC on (\S+?:\d+)/.exec(stderr.replace(/\x1b\[[0-9;]*m/g, ""));
      if (m) {
        clearTimeout(timer);
        resolve({ address: m[1]!, log: () => stderr, stop });
      }
    });
  });
}

export interface TestDatabase {
  url: string;
  name: string;
  drop(): Promise<void>;
}

/** Creates a fresh PostgreSQL database; fails loudly if PostgreSQL is unreachable. */
export async function createDatabase(): Promise<TestDatabase> {
  const name = `idemd_node_${randomBytes(6).toString("hex")}`;
  const admin = new pg.Client({ connectionString: ADMIN_DATABASE_URL, connectionTimeoutMillis: 5000 });
  try {
    await admin.connect();
  } catch (err) {
    throw new Error(`PostgreSQL is unreachable at ${ADMIN_DATABASE_URL} (set IDEMD_TEST_DATABASE_URL): ${(err as Error).message}`);
  }
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const u = new URL(ADMIN_DATABASE_URL);
  u.pathname = `/${name}`;
  return {
    url: u.toString(),
    name,
    drop: async () => {
      const c = new pg.Client({ connectionString: ADMIN_DATABASE_URL, connectionTimeoutMillis: 5000 });
      await c.connect();
      try {
        await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await c.end();
      }
    },
  };
}

/** A TCP port on 127.0.0.1 that nothing listens on (bound, then closed). */
export async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** A TCP server that accepts connections and never answers (every RPC runs into its deadline). */
export async function blackHole(): Promise<{ address: string; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const srv: Server = createServer((s) => {
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  return {
    address: `127.0.0.1:${port}`,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Resolves when `signal` aborts (at once if it has); rejects if that takes longer than `limitMs`. */
export function abortOf(signal: AbortSignal, limitMs: number): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the signal was not aborted within ${limitMs} ms`)), limitMs);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}

export const uniqueKey = (label: string) => `${label}-${randomBytes(8).toString("hex")}`;
