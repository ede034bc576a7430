import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { IdemdError, IdempotencyClient } from "../src/index.js";
import { startIdemd, uniqueKey, type Idemd } from "./helpers.js";

const TOKEN = "node-client-test-token";
let idemd: Idemd;
let dir: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "idemd-node-auth-"));
  const policy = join(dir, "auth.toml");
  const sha = createHash("sha256").update(TOKEN).digest("hex");
  writeFileSync(
    policy,
    `[[callers]]\nname = "node-test"\ntoken_sha256 = ["${sha}"]\n  [[callers.grants]]\n  namespaces = ["node-*"]\n  rpcs = ["*"]\n`,
  );
  idemd = await startIdemd(["--auth-config", policy]);
});

after(async () => {
  await idemd?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test("the bearer token is sent as authorization metadata", async () => {
  const good = new IdempotencyClient(idemd.address, { token: TOKEN });
  const anonymous = new IdempotencyClient(idemd.address);
  try {
    const r = await good.idempotent("node-auth", uniqueKey("auth"), { a: 1 }, async () => "ok");
    assert.equal(r.result.body.toString(), "ok");
    await assert.rejects(
      anonymous.idempotent("node-auth", uniqueKey("auth"), { a: 1 }, async () => "never"),
      (err: unknown) => err instanceof IdemdError && err.reason === "UNAUTHENTICATED" && err.code === 16,
    );
    await assert.rejects(
      good.idempotent("other", uniqueKey("auth"), { a: 1 }, async () => "never"),
      (err: unknown) => err instanceof IdemdError && err.reason === "PERMISSION_DENIED" && err.code === 7,
    );
  } finally {
    good.close();
    anonymous.close();
  }
});
