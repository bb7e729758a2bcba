// End-to-end test of keygate's settings page in a real headless Chromium, driven by
// playwright-core. Started by tests/browser.rs, which runs keygate and a recording upstream and
// passes, in the environment:
//   KG_ADMIN_URL, KG_PROXY_URL   https://127.0.0.1:<port> of the two listeners
//   KG_CA_FILE                   the per-run test CA (Chromium trusts it through the NSS
//                                database under KG_BROWSER_HOME; Node gets it as `ca`)
//   KG_ADMIN_KEY, KG_PROXY_KEY   an admin key and a proxy key (never printed)
//   KG_BROWSER_HOME              HOME for Chromium (holds .pki/nssdb)
//   KG_SCREENSHOT                where to write the screenshot (the keys tab, for the README);
//                                the other tabs go next to it (-secrets, -env, -delete, -activity)
//   KG_CHROMIUM                  the browser (default /usr/bin/chromium)
// It prints one "ok - ..." line per check and never a key or secret; it exits 1 on the first
// failed check. TLS is verified everywhere: nothing here skips certificate checks.

import fs from "node:fs";
import https from "node:https";
import { chromium } from "playwright-core";

const env = process.env;
for (const v of ["KG_ADMIN_URL", "KG_PROXY_URL", "KG_CA_FILE", "KG_ADMIN_KEY", "KG_PROXY_KEY", "KG_BROWSER_HOME", "KG_SCREENSHOT"]) {
  if (!env[v]) {
    console.error(`e2e: ${v} is not set (run this through \`cargo test --test browser\`)`);
    process.exit(2);
  }
}
const ADMIN = env.KG_ADMIN_URL;
const CA = fs.readFileSync(env.KG_CA_FILE);
const TIMEOUT = 10_000;
// An RFC 3339 time as keygate writes them: UTC, milliseconds, "Z".
const RFC3339 = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
// A relative time of the last minute, as the page writes it.
const RECENT = /^(just now|\d+ seconds? ago)$/;

let checks = 0;
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  checks += 1;
  console.log(`ok - ${what}`);
}

/** The status the proxy answers for a GET with `key`, over verified TLS. */
function proxyStatus(key, path) {
  return new Promise((resolve, reject) => {
    const req = https.request(new URL(path, env.KG_PROXY_URL), { method: "GET", ca: CA, headers: { "x-api-key": key } }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    req.setTimeout(TIMEOUT, () => req.destroy(new Error("proxy request timed out")));
    req.on("error", reject);
    req.end();
  });
}

async function message(page) {
  await page.waitForSelector("#message:not([hidden])", { timeout: TIMEOUT });
  return (await page.textContent("#message")).trim();
}

async function clearMessage(page) {
  await page.evaluate(() => {
    const m = document.getElementById("message");
    m.hidden = true;
    m.textContent = "";
  });
}

function row(page, table, name) {
  return page.locator(`#${table} tbody tr`).filter({ has: page.locator("td.name", { hasText: name }) });
}

/** The usage cells of the key `name` in the keys list: last used (text and exact time on
 * hover), requests and 429s. */
async function usage(page, name) {
  const r = row(page, "keys-table", name);
  const time = r.locator("td.last-used time");
  return {
    lastUsed: (await r.locator("td.last-used").textContent()).trim(),
    exact: (await time.count()) ? await time.getAttribute("title") : null,
    requests: (await r.locator("td.requests").textContent()).trim(),
    limited: (await r.locator("td.limited").textContent()).trim(),
  };
}

/** Reloads the keys list (the tab) until the key `name` shows a use: usage reaches the store
 * every keys.usage_flush_interval (200ms in this test). */
async function waitForUse(page, name) {
  for (let i = 0; i < 20; i += 1) {
    const u = await usage(page, name);
    if (u.lastUsed !== "never") return u;
    await page.waitForTimeout(300);
    await page.click("#tab-keys");
    await page.locator("#keys-table tbody tr").first().waitFor();
    await row(page, "keys-table", name).waitFor();
  }
  throw new Error(`check failed: the key ${name} still shows no use after 6 s`);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: env.KG_CHROMIUM || "/usr/bin/chromium",
    env: { ...process.env, HOME: env.KG_BROWSER_HOME },
    timeout: 60_000,
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 760 }, locale: "en-US", timezoneId: "UTC" });
    await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: ADMIN });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);

    const dialogs = [];
    page.on("dialog", (d) => {
      dialogs.push(d.type());
      d.dismiss().catch(() => {});
    });
    const problems = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("console", (m) => {
      if (m.type() === "error" && /Content.Security.Policy|Refused to/i.test(m.text())) problems.push("CSP violation");
    });
    const urls = [];
    page.on("request", (r) => urls.push(r.url()));

    // The page and its security headers.
    const res = await page.goto(`${ADMIN}/`);
    check(res.status() === 200, "GET / answers 200 over verified TLS");
    const h = res.headers();
    check(/script-src 'self'/.test(h["content-security-policy"] || "") && !/unsafe-inline/.test(h["content-security-policy"]), "strict Content-Security-Policy without unsafe-inline");
    check(h["x-frame-options"] === "DENY", "X-Frame-Options: DENY");
    check(h["referrer-policy"] === "no-referrer", "Referrer-Policy: no-referrer");

    // Errors are shown in words; a refused key is not kept.
    await page.fill("#admin-key", "kg-not-a-real-key-000000000000");
    await page.click("#sign-in-form button[type=submit]");
    let said = await message(page);
    check(said.includes("401") && /did not accept/.test(said), "a wrong key is refused in words (401)");
    check((await page.evaluate(() => sessionStorage.length)) === 0, "a refused key is not stored");
    await clearMessage(page);
    await page.fill("#admin-key", env.KG_PROXY_KEY);
    await page.click("#sign-in-form button[type=submit]");
    said = await message(page);
    check(said.includes("403") && /not an admin key/.test(said), "a proxy key is refused in words (403)");
    await clearMessage(page);

    // Sign in.
    await page.fill("#admin-key", env.KG_ADMIN_KEY);
    await page.click("#sign-in-form button[type=submit]");
    await page.waitForSelector("#settings:not([hidden])");
    check((await page.evaluate(() => sessionStorage.getItem("keygate.adminKey"))) === env.KG_ADMIN_KEY, "the admin key is kept in sessionStorage");
    check((await context.cookies()).length === 0, "no cookie is set");
    check((await page.inputValue("#admin-key")) === "", "the sign-in field is emptied");
    await page.locator("#keys-table .badge.mine").first().waitFor();
    check(
      (await page.locator("#keys-table .badge.mine").count()) === 1 &&
        (await row(page, "keys-table", "made").locator(".badge.mine").count()) === 1,
      "the key this page signed in with is marked, and only that one",
    );

    // Create a key: shown once, with a warning and a Copy button.
    await page.fill("#key-name", "e2e-browser");
    await page.click("#create-key");
    await page.waitForSelector("#new-key:not([hidden])");
    const newKey = (await page.textContent("#new-key-value")).trim();
    check(newKey.length >= 24, "the new key is shown in full once");
    check(/shown only this once/.test(await page.textContent("#new-key")), "with a warning that it will not be shown again");
    const keyRow = row(page, "keys-table", "e2e-browser");
    await keyRow.waitFor();
    const preview = (await keyRow.locator("td.preview").textContent()).trim();
    check(preview.length > 0 && preview !== newKey && !preview.includes(newKey), "the list shows a preview, not the key");
    check(!(await page.textContent("#keys-table")).includes(newKey), "the full key is not in the list");
    await page.click("#copy-key");
    await page.waitForFunction(() => document.getElementById("copy-status").textContent.length > 0);
    const copied = await page.evaluate(() => navigator.clipboard.readText().catch(() => null));
    check(copied === newKey, "Copy puts the key on the clipboard");

    // The proxy accepts it.
    check((await proxyStatus(newKey, "/e2e/accepted")) === 201, "the proxy accepts the new key (upstream answered 201)");

    // Leaving the view: the key is gone from the page for good, also after a reload.
    await page.click("#new-key-done");
    check(await page.isHidden("#new-key"), "Done hides the key");
    check(!(await page.content()).includes(newKey), "the full key is no longer anywhere in the page");
    await page.reload();
    await page.waitForSelector("#settings:not([hidden])");
    await row(page, "keys-table", "e2e-browser").waitFor();
    check(!(await page.content()).includes(newKey), "after a reload: still signed in, key still not shown");

    // Usage: the key that made the proxied request shows when, relative, with the exact time
    // on hover, and its one request; the proxy key refused at sign-in (403) counts one too.
    const used = await waitForUse(page, "e2e-browser");
    check(RECENT.test(used.lastUsed), `the key used for a proxied request shows "Last used" relative ("${used.lastUsed}")`);
    check(
      RFC3339.test(used.exact || "") && Math.abs(Date.now() - Date.parse(used.exact)) < 60_000,
      `with the exact RFC 3339 time on hover (${used.exact})`,
    );
    check(used.requests === "1" && used.limited === "0", `and its request count (${used.requests} requests, ${used.limited} 429s)`);
    const refused = await waitForUse(page, "test");
    check(
      RECENT.test(refused.lastUsed) && refused.requests === "1",
      `a request refused with 403 on the admin API counts as a use of the key ("${refused.lastUsed}", ${refused.requests})`,
    );

    // Delete with confirmation: Cancel keeps it, Delete removes it at once.
    await row(page, "keys-table", "e2e-browser").locator("button.delete").click();
    await page.waitForSelector("#confirm[open]");
    check(/cannot be undone/.test(await page.textContent("#confirm-text")), "deleting asks for confirmation");
    const warning = (await page.textContent("#confirm-warning")).trim();
    check(
      (await page.isVisible("#confirm-warning")) &&
        /^This key was used (just now|\d+ seconds? ago); integrations using it will stop working\.$/.test(warning),
      `deleting a key used within the hour says when ("${warning}")`,
    );
    check(
      (await page.isDisabled("#confirm-ok")) && (await page.textContent("#confirm-ok")).trim() === "Delete anyway",
      "and Delete waits for an explicit acknowledgement",
    );
    await page.screenshot({ path: env.KG_SCREENSHOT.replace(/\.png$/, "-delete.png"), fullPage: true });
    await page.click("#confirm-cancel");
    await page.waitForSelector("#confirm[open]", { state: "detached" });
    check((await row(page, "keys-table", "e2e-browser").count()) === 1, "Cancel keeps the key");
    await row(page, "keys-table", "made").locator("button.delete").click();
    await page.waitForSelector("#confirm[open]");
    check(/signed in with this key/.test(await page.textContent("#confirm-text")), "deleting the key the page is signed in with warns about it");
    await page.click("#confirm-cancel");
    await page.waitForSelector("#confirm[open]", { state: "detached" });
    await row(page, "keys-table", "e2e-browser").locator("button.delete").click();
    await page.check("#confirm-ack");
    check(await page.isEnabled("#confirm-ok"), "ticking the acknowledgement enables Delete");
    await page.click("#confirm-ok");
    await row(page, "keys-table", "e2e-browser").waitFor({ state: "detached" });
    check(/deleted/.test(await message(page)), "the page confirms the deletion");
    check((await proxyStatus(newKey, "/e2e/refused")) === 401, "the proxy refuses the deleted key at once (401)");

    // A hostile name renders as text.
    const xss = "<img src=x onerror=alert(1)>";
    await page.fill("#key-name", xss);
    await page.click("#create-key");
    await page.waitForSelector("#new-key:not([hidden])");
    await page.click("#new-key-done");
    const xssRow = row(page, "keys-table", "<img");
    await xssRow.waitFor();
    check((await xssRow.locator("td.name").textContent()) === xss, "a key named <img src=x onerror=alert(1)> renders as text");
    check((await page.locator("#keys-table img").count()) === 0, "no img element was created");
    const fresh = await usage(page, "<img");
    check(fresh.lastUsed === "never" && fresh.exact === null && fresh.requests === "0", `a key never used shows "never" ("${fresh.lastUsed}", ${fresh.requests} requests)`);
    await page.waitForTimeout(300);
    check(dialogs.length === 0, "no alert ran");
    await xssRow.locator("button.delete").click();
    await page.waitForSelector("#confirm[open]");
    check(
      (await page.isHidden("#confirm-urgent")) && (await page.isEnabled("#confirm-ok")) && !/was used/.test(await page.textContent("#confirm")),
      "deleting a key not used within the hour keeps the plain confirmation",
    );
    await page.click("#confirm-ok");
    await xssRow.waitFor({ state: "detached" });
    await clearMessage(page);

    // AI secrets: add (password field), replace, delete.
    const secretValue = `sk-e2e-${Math.random().toString(36).slice(2)}${Date.now()}`;
    await page.click("#tab-secrets");
    check((await page.getAttribute("#secret-value", "type")) === "password", "the secret is typed into a password field");
    await page.fill("#secret-name", "E2E_SECRET");
    await page.fill("#secret-type", "openai");
    await page.fill("#secret-value", secretValue);
    await page.click("#secret-form button[type=submit]");
    const secretRow = row(page, "secrets-table", "E2E_SECRET");
    await secretRow.waitFor();
    const sPreview = (await secretRow.locator("td.preview").textContent()).trim();
    check(sPreview.endsWith(secretValue.slice(-4)) && sPreview !== secretValue, "the secret is listed with its type and a redacted preview");
    check((await secretRow.textContent()).includes("openai"), "the secret's type is listed");
    await page.screenshot({ path: env.KG_SCREENSHOT.replace(/\.png$/, "-secrets.png"), fullPage: true });
    check(!(await page.content()).includes(secretValue), "the secret value is not in the page");
    const replaced = `${secretValue}-v2WXYZ`;
    await page.fill("#secret-name", "E2E_SECRET");
    await page.fill("#secret-value", replaced);
    await page.click("#secret-form button[type=submit]");
    await page.waitForFunction(() => [...document.querySelectorAll("#secrets-table td.preview")].some((td) => td.textContent.endsWith("WXYZ")));
    check((await page.locator("#secrets-table tbody tr").filter({ hasText: "E2E_SECRET" }).count()) === 1, "saving the same name replaces the secret");
    await secretRow.locator("button.delete").click();
    await page.click("#confirm-ok");
    await secretRow.waitFor({ state: "detached" });
    check(/secret “E2E_SECRET” deleted/.test(await message(page)), "the secret is deleted, and the page says so");
    await clearMessage(page);

    // Env vars: by scope, set, a 400 in words, delete.
    await page.click("#tab-env");
    check((await page.inputValue("#env-object-id")).length > 0, "the organization scope is filled in");
    await page.fill("#env-name", "E2E_VAR");
    await page.fill("#env-value", "e2e-value-1");
    await page.click("#env-form button[type=submit]");
    const envRow = row(page, "env-table", "E2E_VAR");
    await envRow.waitFor();
    check((await envRow.textContent()).includes("organization"), "the env var is listed in its scope");
    await page.screenshot({ path: env.KG_SCREENSHOT.replace(/\.png$/, "-env.png"), fullPage: true });
    check(!(await page.content()).includes("e2e-value-1"), "the env var value is not in the page");
    await clearMessage(page);
    await page.fill("#env-name", "A=B");
    await page.fill("#env-value", "x");
    await page.click("#env-form button[type=submit]");
    said = await message(page);
    check(said.includes("400") && said.includes("must not contain"), "a 400 from the API is shown in words");
    await envRow.locator("button.delete").click();
    await page.click("#confirm-ok");
    await envRow.waitFor({ state: "detached" });
    check(/env var “E2E_VAR” deleted/.test(await message(page)), "the env var is deleted, and the page says so");
    await clearMessage(page);

    // The screenshot for the README: the keys list (previews only; no full key on screen).
    await page.click("#tab-keys");
    for (const name of ["ci-pipeline", "slack-bot"]) {
      await page.fill("#key-name", name);
      await page.click("#create-key");
      await page.waitForSelector("#new-key:not([hidden])");
      await page.click("#new-key-done");
      await row(page, "keys-table", name).waitFor();
    }
    await page.fill("#key-name", "local-dev");
    await clearMessage(page);
    check(
      (await usage(page, "made")).lastUsed !== "never" && (await usage(page, "slack-bot")).lastUsed === "never",
      "the keys list shows when each key was last used",
    );
    await page.screenshot({ path: env.KG_SCREENSHOT, fullPage: true });
    check(fs.statSync(env.KG_SCREENSHOT).size > 10_000, "screenshot written");
    const ownPreview = (await row(page, "keys-table", "made").locator("td.preview").textContent()).trim();

    // Activity: the audit trail of what this test did, newest first, each change by the key
    // this page is signed in with (by its preview).
    await page.click("#tab-activity");
    await page.locator("#audit-table tbody tr").first().waitFor();
    const events = await page.$$eval("#audit-table tbody tr", (trs) =>
      trs.map((tr) => {
        const time = tr.querySelector("td.time time");
        return {
          seq: Number(tr.dataset.seq),
          rel: tr.querySelector("td.time").textContent.trim(),
          exact: time ? time.getAttribute("title") : null,
          actor: tr.querySelector("td.actor").textContent.trim(),
          action: tr.querySelector("td.action").textContent.trim(),
          object: tr.querySelector("td.object").textContent.trim(),
          outcome: tr.querySelector("td.outcome").textContent.trim(),
        };
      }),
    );
    check(
      events.length > 0 && events.every((e, i) => i === 0 || (e.seq < events[i - 1].seq && e.exact <= events[i - 1].exact)),
      `the Activity tab lists the audit trail newest first (${events.length} events)`,
    );
    check(
      events.every((e) => RFC3339.test(e.exact || "") && /^(just now|\d+ (second|minute)s? ago)$/.test(e.rel)),
      "each with a relative time and the exact time on hover",
    );
    const mine = (action, name) => events.filter((e) => e.action === action && e.object.endsWith(` ${name}`));
    check(
      events[0].action === "key.created" && events[0].object === "api_key slack-bot",
      `the newest event is the last change made (${events[0].action} ${events[0].object})`,
    );
    const created = events.findIndex((e) => e.action === "key.created" && e.object === "api_key e2e-browser");
    const deleted = events.findIndex((e) => e.action === "key.deleted" && e.object === "api_key e2e-browser");
    check(created > deleted && deleted >= 0, "creating and deleting the key e2e-browser are listed, the deletion above the creation");
    const byPage = [events[created], events[deleted]];
    check(
      byPage.every((e) => e.actor === `key ${ownPreview} you` && e.outcome === "ok"),
      `by the signed-in admin key, shown by its preview ("${events[deleted].actor}"), with outcome ok`,
    );
    check(
      mine("secret.created", "E2E_SECRET").length === 1 && mine("secret.replaced", "E2E_SECRET").length === 1 &&
        mine("secret.deleted", "E2E_SECRET").length === 1 && mine("env_var.created", "E2E_VAR").length === 1 &&
        mine("env_var.deleted", "E2E_VAR").length === 1,
      "the secret's and env var's changes are listed too",
    );
    check(
      mine("key.created", "<img src=x onerror=alert(1)>").length === 1 && (await page.locator("#audit-table img").count()) === 0,
      "a hostile key name renders as text in the trail too",
    );
    check(await page.isHidden("#audit-more"), `no "Load more" under 50 events`);
    check(!(await page.content()).includes(env.KG_ADMIN_KEY), "the trail shows no full key");
    await page.screenshot({ path: env.KG_SCREENSHOT.replace(/\.png$/, "-activity.png"), fullPage: true });

    // Paging, on a long trail answered by a stand-in (keygate would need 50 changes first):
    // 50 a page, then "Load more" asks for the next page after the last event shown.
    const asked = [];
    const fake = (from, n) =>
      Array.from({ length: n }, (_, i) => ({
        id: `00000000-0000-4000-8000-${String(from - i).padStart(12, "0")}`,
        seq: from - i,
        created: new Date(Date.now() - (100 - from + i) * 60_000).toISOString(),
        actor: [{ type: "cli", user: "root" }, { type: "keygate" }, { type: "api_key", id: "k", preview_name: "sk-****Fake" }][i % 3],
        action: "config.reloaded",
        object_type: "config",
        object_id: "",
        object_name: `fake-${from - i}`,
        outcome: i === 1 ? "refused" : "ok",
      }));
    const auditUrl = (url) => url.pathname === "/v1/audit";
    await page.route(
      auditUrl,
      (route) => {
        const q = new URL(route.request().url()).searchParams;
        asked.push(Object.fromEntries(q));
        const objects = q.get("starting_after") ? fake(53 - 50, 3) : fake(53, 50);
        route.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify({ objects }) });
      },
    );
    await page.click("#audit-refresh");
    await page.waitForFunction(() => document.querySelectorAll("#audit-table tbody tr").length === 50);
    check(await page.isVisible("#audit-more"), `a full page (50 events) offers "Load more"`);
    await page.click("#audit-more");
    await page.waitForFunction(() => document.querySelectorAll("#audit-table tbody tr").length === 53);
    check(
      asked.length === 2 && asked[0].limit === "50" && !asked[0].starting_after &&
        asked[1].limit === "50" && asked[1].starting_after === fake(53, 50)[49].id,
      "Load more asks for the next 50 after the last event shown (starting_after)",
    );
    check(await page.isHidden("#audit-more"), "and the last page hides it");
    const actors = await page.$$eval("#audit-table td.actor", (tds) => tds.slice(0, 3).map((td) => td.textContent.trim()));
    check(
      actors[0] === "cli (root)" && actors[1] === "keygate" && actors[2] === "key sk-****Fake",
      `actors read "cli (root)", "keygate", "key <preview>" (${actors.join(", ")})`,
    );
    await page.unroute(auditUrl);

    // 429 in words: the admin API's rate limit, reached by asking for the env vars quickly.
    await page.click("#tab-env");
    let limited = "";
    let clicks = 0;
    const started = Date.now();
    for (; clicks < 600 && !limited; clicks += 1) {
      await page.click("#env-scope button[type=submit]");
      await page.waitForFunction(() => !document.querySelector("#env-scope button").disabled);
      const m = await page.$("#message:not([hidden])");
      if (m) limited = (await m.textContent()).trim();
    }
    check(limited.includes("429") && /Wait \d+ s/.test(limited), `a 429 is shown in words with the wait (after ${clicks} calls in ${Date.now() - started} ms: "${limited}")`);

    // Sign out forgets the key.
    await page.click("#sign-out");
    check((await page.evaluate(() => sessionStorage.length)) === 0 && (await page.isVisible("#sign-in")), "sign out forgets the key");

    check(!urls.some((u) => u.includes(env.KG_ADMIN_KEY) || u.includes(newKey)), "no key ever appeared in a URL");
    check(problems.length === 0, `no script error or CSP violation (${problems.join("; ") || "none"})`);
  } finally {
    await browser.close();
  }
  console.log(`e2e: ${checks} checks passed`);
}

main().catch((e) => {
  // Messages name the check, never a key.
  console.error(`e2e: ${e && e.message ? e.message : e}`);
  process.exit(1);
});
