// The Express example app of the Idempotency-Key conformance suite (clients/HTTP-MIDDLEWARE.md, "The example
// app contract"). Run it from clients/node after `npm run build`:
//   PORT=8080 IDEMD_ADDR=http://127.0.0.1:50051 NAMESPACE=orders-api LEASE_MS=2000 IDEMD_TIMEOUT_MS=2000 \
//   EFFECTS_FILE=/tmp/effects node examples/express-app.js
import { appendFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { credentials } from "@grpc/grpc-js";
import express from "express";
import { IdempotencyClient } from "@idemd/client";
import { idempotency } from "@idemd/client/http";

function setting(name) {
  const value = process.env[name];
  if (value === undefined || value === "") {
    console.error(`express-app: ${name} must be set`);
    process.exit(2);
  }
  return value;
}
function milliseconds(name) {
  const value = Number(setting(name));
  if (!Number.isInteger(value) || value <= 0) {
    console.error(`express-app: ${name} must be a positive whole number of milliseconds`);
    process.exit(2);
  }
  return value;
}

const port = Number(setting("PORT"));
const address = setting("IDEMD_ADDR");
const namespace = setting("NAMESPACE");
const leaseTtlMs = milliseconds("LEASE_MS");
const idemdTimeoutMs = milliseconds("IDEMD_TIMEOUT_MS");
const effectsFile = setting("EFFECTS_FILE");

// grpc-js takes host:port; the scheme says whether to use TLS.
const tls = address.startsWith("https://");
const client = new IdempotencyClient(address.replace(/^https?:\/\//, ""), {
  token: process.env.IDEMD_TOKEN || undefined,
  credentials: tls ? credentials.createSsl() : credentials.createInsecure(),
});

const base = { client, namespace, leaseTtlMs, idemdTimeoutMs };
const tenant = (req) => req.get("x-tenant") ?? "anonymous";
const ordersKey = idempotency({ ...base, required: true, scope: tenant });
const ordersWait = idempotency({ ...base, required: true, scope: tenant, waitMs: 10_000 });
const notesKey = idempotency({ ...base });
const openKey = idempotency({ ...base, required: true, failOpen: true });

/** Every run of a handler appends one line (appendFileSync opens the file with O_APPEND). */
function effect(kind, req) {
  const id = req.body && typeof req.body === "object" && "id" in req.body ? String(req.body.id) : "-";
  appendFileSync(effectsFile, `${kind} ${id}\n`);
  return id;
}

/** Answers `value` as JSON with exactly `Content-Type: application/json` (res.json would add a charset). */
function json(res, status, value, headers = {}) {
  res.statusCode = status;
  for (const [name, v] of Object.entries(headers)) res.setHeader(name, v);
  res.setHeader("Content-Type", "application/json");
  res.end(JSON.stringify(value));
}

async function orderHandler(req, res) {
  const id = effect("orders", req);
  const run = randomUUID();
  const delay = Number(req.get("x-delay-ms") ?? 0);
  if (Number.isFinite(delay) && delay > 0) await sleep(delay);
  if (req.get("x-fail") === "1") return json(res, 500, { error: "failed" });
  const status = req.get("x-status");
  if (status !== undefined) {
    const code = Number(status);
    if (!Number.isInteger(code) || code < 200 || code > 599) return json(res, 400, { error: "bad X-Status" });
    return json(res, code, { status: code, run });
  }
  json(res, 201, { run, id: req.body?.id ?? null, tenant: tenant(req) }, {
    Location: `/orders/${run}`,
    "Set-Cookie": `s=${run}`,
    "X-Run": run,
  });
}

const runs = (kind, status) => (req, res) => {
  effect(kind, req);
  json(res, status, { run: randomUUID() });
};

const app = express();
const body = express.json({ type: ["application/json", "application/*+json"] });
app.get("/health", (_req, res) => {
  res.type("text/plain").send("ok");
});
app.post("/orders", ordersKey, body, orderHandler);
app.post("/orders-wait", ordersWait, body, orderHandler);
app.post("/notes", notesKey, body, runs("notes", 201));
app.post("/open", openKey, body, runs("open", 201));
app.get("/orders", ordersKey, body, runs("list", 200));
app.put("/orders/:id", ordersKey, body, runs("put", 200));
// Errors (a body that is not JSON, a failing handler) are answered as JSON, on stderr only.
app.use((err, _req, res, _next) => {
  console.error("express-app:", err);
  json(res, err.status ?? err.statusCode ?? 500, { error: String(err.message ?? err) });
});

const server = app.listen(port, "127.0.0.1", () => console.error(`express-app listening on 127.0.0.1:${port}`));
process.on("SIGTERM", () => {
  server.close();
  client.close();
  process.exit(0);
});
