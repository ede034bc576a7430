// The idemd console in a real browser: Debian's chromium, driven by playwright-core.
// Run by tests/suite/console.rs (inside `cargo test`), which starts idemd with --console-listen
// on PostgreSQL, seeds the records named below through gRPC, and after this script checks
// through gRPC what the clicks changed. Every step asserts; the first failure exits non-zero.
//
// Environment (all set by the Rust test): CONSOLE_URL, CONSOLE_TOKEN, CALLER, NAMESPACE,
// STUCK_PREFIX, STUCK_KEY, COMPLETED_KEY, CSRF_TARGET_KEY, XSS_KEY, REASON, SCREENSHOT_DIR.

import assert from "node:assert/strict";
import http from "node:http";
import path from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/suite/console.rs sets it)`);
  return value;
};
const consoleUrl = env("CONSOLE_URL");
const token = env("CONSOLE_TOKEN");
const caller = env("CALLER");
const namespace = env("NAMESPACE");
const stuckPrefix = env("STUCK_PREFIX");
const stuckKey = env("STUCK_KEY");
const completedKey = env("COMPLETED_KEY");
const csrfTargetKey = env("CSRF_TARGET_KEY");
const xssKey = env("XSS_KEY");
const reason = env("REASON");
const screenshots = env("SCREENSHOT_DIR");

const recordUrl = (key) =>
  `${consoleUrl}/record?namespace=${encodeURIComponent(namespace)}&key=${encodeURIComponent(key)}`;

let passed = 0;
async function step(name, run) {
  try {
    await run();
    passed += 1;
    console.log(`ok - ${name}`);
  } catch (error) {
    console.log(`not ok - ${name}`);
    throw error;
  }
}

// The flags this machine needs (see the env README): no sandbox as root, no GPU, and none of
// Chromium's background connections, which the closed network refuses. Playwright's launch()
// gives every run a fresh, empty profile directory of its own.
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
// A cross-origin page to attack from, on another port of the same host: the same *site* as
// the console (so a SameSite=Strict cookie alone would not stop it), another *origin*.
const attacker = http.createServer((request, response) => {
  response.writeHead(200, { "content-type": "text/html; charset=utf-8" });
  response.end(`<!doctype html><title>attacker</title>
    <form method="post" action="${consoleUrl}/actions/purge">
      <input type="hidden" name="namespace" value="${namespace}">
      <input type="hidden" name="key" value="${csrfTargetKey}">
      <input type="hidden" name="reason" value="cross-site">
      <input type="hidden" name="csrf" value="guessed">
      <button id="go" type="submit">win a prize</button>
    </form>`);
});
await new Promise((resolve) => attacker.listen(0, "127.0.0.1", resolve));
const attackerUrl = `http://127.0.0.1:${attacker.address().port}/`;

try {
  // A zone other than the machine's UTC, so the local times the script adds are visibly local.
  const context = await browser.newContext({
    viewport: { width: 1200, height: 900 },
    timezoneId: "America/New_York",
  });
  const page = await context.newPage();
  const dialogs = [];
  page.on("dialog", async (dialog) => {
    dialogs.push(dialog.message());
    await dialog.dismiss();
  });
  // A CSP that blocked the console's own stylesheet or script would show here.
  const violations = [];
  page.on("console", (message) => {
    if (/Content Security Policy|Refused to/i.test(message.text())) violations.push(message.text());
  });

  await step("an unsigned visit lands on the sign-in page", async () => {
    await page.goto(`${consoleUrl}/namespaces`);
    assert.match(new URL(page.url()).pathname, /^\/sign-in$/);
  });

  await step("sign in with a bearer token", async () => {
    await page.fill("#token", token);
    await Promise.all([page.waitForURL(/\/namespaces$/), page.click("button[type=submit]")]);
    await page.getByText(`signed in as ${caller}`).waitFor();
    assert.ok(!page.url().includes(token), "the token is not in the address");
    const stored = await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }));
    assert.ok(!stored.includes(token), "the token is not in browser storage");
    const cookie = await page.evaluate(() => document.cookie);
    assert.equal(cookie, "", "the session cookie is HttpOnly: scripts cannot read it");
  });

  await step("namespaces view: counts, a stuck count and a chart", async () => {
    const row = page.locator("tr", { has: page.getByRole("link", { name: namespace, exact: true }) });
    await row.waitFor();
    await row.getByText("1 stuck").waitFor();
    assert.equal(await page.locator("figure.chart svg polyline.created").count() > 0, true);
    await page.screenshot({ path: path.join(screenshots, "console-namespaces.png"), fullPage: true });
  });

  await step("find the stuck key with the filters", async () => {
    await page.getByRole("link", { name: namespace, exact: true }).click();
    await page.fill("input[name=key_prefix]", stuckPrefix);
    await page.check("input[name=stuck]");
    await Promise.all([page.waitForURL(/stuck=on/), page.click("form.filters button")]);
    const rows = page.locator("table.records tbody tr");
    assert.equal(await rows.count(), 1, "exactly the stuck key matches");
    const row = rows.first();
    assert.match((await row.getAttribute("class")) ?? "", /\bstuck\b/);
    await row.getByText("STUCK", { exact: true }).waitFor();
    await row.getByRole("link", { name: stuckKey, exact: true }).click();
    await page.getByText("STUCK: lease expired").waitFor();
  });

  await step("force-release it behind a confirmation with a reason", async () => {
    await page.getByRole("link", { name: "Force release…" }).click();
    // The reason is required: an empty form is not sent.
    await page.getByRole("button", { name: "Force release" }).click();
    assert.match(new URL(page.url()).pathname, /^\/confirm\/force-release$/);
    await page.fill("#reason", reason);
    await Promise.all([
      page.waitForURL(/\/actions\/force-release$/),
      page.getByRole("button", { name: "Force release" }).click(),
    ]);
    await page.getByRole("heading", { name: "Force-released" }).waitFor();
  });

  await step("its audit entry names the caller, the key and the reason", async () => {
    await page.getByRole("link", { name: "See the audit log" }).click();
    const newest = page.locator("table.audit tbody tr").first();
    await newest.getByText("ForceRelease", { exact: true }).waitFor();
    await newest.getByText(stuckKey, { exact: true }).waitFor();
    await newest.getByText(reason, { exact: true }).waitFor();
    await newest.getByText(caller, { exact: true }).waitFor();
  });

  await step("record view: every field, local times, the JSON body pretty-printed", async () => {
    await page.goto(recordUrl(completedKey));
    await page.getByText("COMPLETED", { exact: true }).waitFor();
    const body = await page.locator("pre.body").textContent();
    assert.match(body ?? "", /\{\n  "order": 42/);
    await page.getByText("x-tag", { exact: true }).waitFor();
    assert.ok((await page.locator("time + .local").count()) >= 3, "the script added local times");
    assert.match(await page.locator("time + .local").first().textContent(), /America\/New_York/);
    await page.screenshot({ path: path.join(screenshots, "console-record.png"), fullPage: true });
  });

  await step("purge the completed key", async () => {
    await page.getByRole("link", { name: "Purge…" }).click();
    await page.fill("#reason", `${reason} (purge)`);
    await Promise.all([
      page.waitForURL(/\/actions\/purge$/),
      page.getByRole("button", { name: "Purge" }).click(),
    ]);
    await page.getByRole("heading", { name: "Purged" }).waitFor();
  });

  await step("a key that looks like HTML renders as inert text", async () => {
    await page.goto(`${consoleUrl}/records?namespace=${encodeURIComponent(namespace)}`);
    await page.getByRole("link", { name: xssKey, exact: true }).waitFor();
    await page.goto(recordUrl(xssKey));
    await page.locator("dd.key", { hasText: xssKey }).waitFor();
    assert.equal(await page.locator("main img").count(), 0, "no img element was made");
    assert.deepEqual(dialogs, [], "no dialog fired");
  });

  await step("a cross-site form post is refused", async () => {
    await page.goto(attackerUrl);
    const [response] = await Promise.all([
      page.waitForResponse((response) => response.url().endsWith("/actions/purge")),
      page.click("#go"),
    ]);
    assert.equal(response.status(), 403);
    await page.getByRole("heading", { name: "Refused" }).waitFor();
  });

  await step("the console's own CSS and script load under its CSP", async () => {
    assert.deepEqual(violations, []);
  });

  await step("sign out ends the session", async () => {
    await page.goto(`${consoleUrl}/namespaces`);
    await Promise.all([page.waitForURL(/\/sign-in$/), page.getByRole("button", { name: "Sign out" }).click()]);
    await page.goto(`${consoleUrl}/namespaces`);
    assert.match(new URL(page.url()).pathname, /^\/sign-in$/);
  });
} finally {
  attacker.close();
  await browser.close();
}
console.log(`console browser steps: ${passed} passed`);
