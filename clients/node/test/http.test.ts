// Unit tests of the Idempotency-Key middleware's pieces (clients/HTTP-MIDDLEWARE.md §2–5); the conformance
// suite (tests/suite/http_middleware.rs) drives the whole middleware through examples/express-app.js.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";
import { fingerprint } from "../src/index.js";
import {
  fingerprintForm,
  idemdKey,
  isJsonContentType,
  isStorable,
  keptHeaders,
  DEFAULT_KEEP_HEADERS,
  parseIdempotencyKey,
  problemDocument,
  PROBLEM_BASE,
} from "../src/http.js";

const sha256hex = (s: string) => createHash("sha256").update(s, "utf8").digest("hex");
const key = (fields: string[]) => parseIdempotencyKey(fields);

test("header: quoted and bare forms are one key; spaces and tabs around are dropped", () => {
  assert.deepEqual(key(['"abc"']), { kind: "key", key: "abc" });
  assert.deepEqual(key(["abc"]), { kind: "key", key: "abc" });
  assert.deepEqual(key([' \t"abc"\t ']), { kind: "key", key: "abc" });
  assert.deepEqual(key([" abc "]), { kind: "key", key: "abc" });
  assert.deepEqual(key(['"a\\"b\\\\c"']), { kind: "key", key: 'a"b\\c' });
  assert.deepEqual(key(["a b"]), { kind: "key", key: "a b" });
  // A comma is fine inside a quoted key (only a bare one reads as two joined fields).
  assert.deepEqual(key(['"k1, k2"']), { kind: "key", key: "k1, k2" });
  assert.deepEqual(key([]), { kind: "none" });
});

test("header: every malformed value is invalid, with a detail naming the rule", () => {
  const invalid: [string[], RegExp][] = [
    [['""'], /empty/],
    [[""], /empty/],
    [["   "], /empty/],
    [["a".repeat(256)], /longer than 255/],
    [[`"${"a".repeat(256)}"`], /longer than 255/],
    [["a\u0001b"], /control character \(0x01\)/],
    [["a\tb"], /control character \(0x09\)/],
    [["a\u007fb"], /control character \(0x7f\)/],
    [['"a\u0000"'], /control character/],
    [["a\u00c3\u00a9b"], /outside printable ASCII/],
    [['"abc'], /no closing quote/],
    [['"ab"c'], /after its closing quote/],
    [['"a\\nb"'], /escape/],
    [['"a\\'], /escape/],
    [["a", "b"], /more than once/],
    [["a", "a"], /more than once/],
    [["k1, k2"], /must not contain ','/],
    [["k1,k2"], /must not contain ','/],
  ];
  for (const [fields, detail] of invalid) {
    const parsed = key(fields);
    assert.equal(parsed.kind, "invalid", JSON.stringify(fields));
    assert.match((parsed as { detail: string }).detail, detail, JSON.stringify(fields));
  }
  assert.deepEqual(key(["a".repeat(255)]), { kind: "key", key: "a".repeat(255) });
});

test("key derivation: the shared vectors (same in every language)", () => {
  assert.equal(sha256hex("").slice(0, 32), "e3b0c44298fc1c149afbf4c8996fb924");
  assert.equal(idemdKey("", "abc"), "e3b0c44298fc1c149afbf4c8996fb924:abc");
  const tenantTag = sha256hex("tenant-a").slice(0, 32);
  assert.equal(idemdKey("tenant-a", "abc"), `${tenantTag}:abc`);
  assert.notEqual(idemdKey("tenant-a", "abc"), idemdKey("tenant-b", "abc"));
  // 32 + 1 + 222 = 255 bytes: the readable form; one byte more: tag "#" sha256(key).
  const k222 = "k".repeat(222);
  assert.equal(idemdKey("", k222), `e3b0c44298fc1c149afbf4c8996fb924:${k222}`);
  assert.equal(idemdKey("", k222).length, 255);
  const k223 = "k".repeat(223);
  assert.equal(idemdKey("", k223), `e3b0c44298fc1c149afbf4c8996fb924#${sha256hex(k223)}`);
  assert.equal(idemdKey("", k223).length, 32 + 1 + 64);
  // Non-ASCII scopes are hashed as UTF-8.
  assert.equal(idemdKey("ü", "x"), `${sha256hex("ü").slice(0, 32)}:x`);
});

test("fingerprint form: JSON bodies canonicalised, other bodies as base64, target raw", () => {
  const form = fingerprintForm({
    method: "post",
    target: "/orders?b=2&a=%20",
    contentType: "application/json; charset=utf-8",
    body: Buffer.from('{ "b": 1, "a": [2, {"y": 1, "x": 0}] }'),
  });
  assert.deepEqual(form, { method: "POST", target: "/orders?b=2&a=%20", json: { a: [2, { x: 0, y: 1 }], b: 1 } });
  // The bytes every client hashes for this request: RFC 8785 of the form.
  const canonical = '{"json":{"a":[2,{"x":0,"y":1}],"b":1},"method":"POST","target":"/orders?b=2&a=%20"}';
  assert.equal(fingerprint(form).toString("hex"), sha256hex(canonical));
  // Key order and whitespace do not matter.
  const reordered = fingerprintForm({
    method: "POST",
    target: "/orders?b=2&a=%20",
    contentType: "application/json",
    body: Buffer.from('{"a":[2,{"x":0,"y":1}],"b":1}'),
  });
  assert.deepEqual(fingerprint(reordered), fingerprint(form));

  assert.deepEqual(fingerprintForm({ method: "PATCH", target: "/x", contentType: "text/plain", body: Buffer.from("hi") }), {
    method: "PATCH",
    target: "/x",
    bytes: "aGk=",
  });
  assert.deepEqual(fingerprintForm({ method: "POST", target: "/x", body: Buffer.alloc(0) }), { method: "POST", target: "/x", bytes: "" });
  // JSON content type that does not parse (or is not UTF-8): bytes.
  assert.deepEqual(fingerprintForm({ method: "POST", target: "/x", contentType: "application/json", body: Buffer.from("{") }), {
    method: "POST",
    target: "/x",
    bytes: "ew==",
  });
  assert.deepEqual(
    fingerprintForm({ method: "POST", target: "/x", contentType: "application/json", body: Buffer.from([0x22, 0xff, 0x22]) }),
    { method: "POST", target: "/x", bytes: "Iv8i" },
  );
  assert.ok(isJsonContentType("application/problem+json"));
  assert.ok(isJsonContentType("Application/JSON ; charset=utf-8"));
  assert.ok(!isJsonContentType("application/jsonx"));
  assert.ok(!isJsonContentType("text/plain"));
  assert.ok(!isJsonContentType(undefined));
});

test("fingerprint form: include, exclude and headers", () => {
  const input = {
    method: "POST",
    target: "/o",
    contentType: "application/json",
    body: Buffer.from('{"amount":5,"ts":"2026-12-02","note":"x"}'),
    headers: { "x-account": ["a", "b"], "x-other": ["z"] },
  };
  assert.deepEqual(fingerprintForm(input, { fingerprintExclude: ["ts"] }).json, { amount: 5, note: "x" });
  assert.deepEqual(fingerprintForm(input, { fingerprintInclude: ["amount"] }).json, { amount: 5 });
  assert.deepEqual(fingerprintForm(input, { fingerprintHeaders: ["x-account", "x-missing"] }).headers, { "x-account": "a, b" });
  assert.equal("headers" in fingerprintForm(input), false);
});

test("storable statuses: 200–499 except 408, 409, 425, 429", () => {
  for (const s of [200, 201, 204, 303, 400, 404, 422, 499]) assert.ok(isStorable(s), String(s));
  for (const s of [100, 199, 408, 409, 425, 429, 500, 503]) assert.ok(!isStorable(s), String(s));
});

test("kept headers: lower case, repeated joined by ', ', set-cookie by newline and only when listed", () => {
  const headers = {
    "Content-Type": "application/json",
    Location: "/orders/1",
    "set-cookie": ["a=1", "b=2"],
    "x-run": "r",
    link: ["<a>", "<b>"],
    "content-length": 10,
  };
  assert.deepEqual(keptHeaders(headers, DEFAULT_KEEP_HEADERS), {
    "content-type": "application/json",
    location: "/orders/1",
    link: "<a>, <b>",
  });
  assert.deepEqual(keptHeaders(headers, ["set-cookie"]), { "set-cookie": "a=1\nb=2" });
});

test("problem documents: type URI, title, status, detail", () => {
  const expected: [Parameters<typeof problemDocument>[0], number][] = [
    ["missing-key", 400],
    ["invalid-key", 400],
    ["request-in-progress", 409],
    ["request-too-large", 413],
    ["key-reused", 422],
    ["idemd-rejected", 500],
    ["idemd-unavailable", 503],
  ];
  for (const [type, status] of expected) {
    const doc = problemDocument(type, "why");
    assert.equal(doc.type, `https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#${type}`);
    assert.equal(doc.type, PROBLEM_BASE + type);
    assert.equal(doc.status, status);
    assert.ok(doc.title.length > 0);
    assert.equal(doc.detail, "why");
  }
});
