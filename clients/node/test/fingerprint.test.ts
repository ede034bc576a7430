import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { canonicalJson, fingerprint } from "../src/index.js";

// dist/test/fingerprint.test.js → clients/fingerprint-vectors.json
const vectorsPath = new URL("../../../fingerprint-vectors.json", import.meta.url);
const file = JSON.parse(readFileSync(vectorsPath, "utf8")) as {
  vectors: { input: unknown; canonical: string; sha256: string }[];
};

test("shared fingerprint vectors: canonical form and sha256 match", () => {
  assert.ok(file.vectors.length >= 10, "vectors file has vectors");
  for (const [i, v] of file.vectors.entries()) {
    assert.equal(canonicalJson(v.input), v.canonical, `vector ${i}: canonical`);
    assert.equal(fingerprint(v.input).toString("hex"), v.sha256, `vector ${i}: sha256`);
    // The vector is self-consistent, too.
    assert.equal(createHash("sha256").update(v.canonical, "utf8").digest("hex"), v.sha256, `vector ${i}: file`);
  }
});

test("fingerprint is 32 bytes and independent of key order", () => {
  const a = fingerprint({ b: 1, a: [1, { y: 2, x: 1 }] });
  const b = fingerprint({ a: [1, { x: 1, y: 2 }], b: 1 });
  assert.equal(a.length, 32);
  assert.deepEqual(a, b);
});

test("values without a JSON form are rejected", () => {
  assert.throws(() => fingerprint(undefined), TypeError);
  assert.throws(() => fingerprint({ n: NaN }), TypeError);
  assert.throws(() => fingerprint({ n: 10n }), TypeError);
});
