// keygate settings page: manages API keys, AI secrets and env vars through keygate's admin API
// (/v1/api_key, /v1/ai_secret, /v1/env_var) on this same origin, and shows the audit trail
// (/v1/audit).
//
// Rules this file keeps:
// - The admin key lives in sessionStorage (this tab only) and travels only in the x-api-key
//   header of same-origin fetches; never in a URL, a cookie or the console.
// - Text from the API is only ever put in the page with textContent, never as HTML.
// - Every failed call is shown to the person in words.
"use strict";

(() => {
  const STORAGE = "keygate.adminKey";
  const PAGE = 100; // objects per list call; lists are followed by cursor to the end
  const MAX_PAGES = 100;
  const AUDIT_PAGE = 50; // audit events per page; "Load more" fetches the next one

  const SECOND = 1000;
  const MINUTE = 60 * SECOND;
  const HOUR = 60 * MINUTE;
  const DAY = 24 * HOUR;

  const $ = (id) => document.getElementById(id);

  /** An admin API failure, with words a person can act on. */
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function describe(status, body, res) {
    const said = body && typeof body.error === "string" ? body.error : "";
    switch (status) {
      case 400:
        return `keygate refused the request (400 Bad Request): ${said || "the input is not valid"}.`;
      case 401:
        return "keygate did not accept this admin key (401 Unauthorized). It may have been deleted; sign in again with a valid admin key.";
      case 403:
        return "This key is not an admin key (403 Forbidden). Sign in with a key whose role is admin.";
      case 404:
        return `Not found (404): ${said || "it may have been deleted already"}. The list has been refreshed.`;
      case 413:
        return "The request is too large (413).";
      case 429: {
        const wait = res && res.headers.get("retry-after");
        return `Too many requests (429). Wait ${wait ? `${wait} s` : "a moment"} and try again.`;
      }
      case 503:
        return `keygate cannot reach its store right now (503)${said ? `: ${said}` : ""}. Try again shortly.`;
      default:
        return `keygate answered ${status}${said ? `: ${said}` : ""}.`;
    }
  }

  function adminKey() {
    return sessionStorage.getItem(STORAGE);
  }

  /** Calls the admin API; resolves to the parsed JSON or throws an ApiError. */
  async function api(method, path, body, key = adminKey()) {
    const init = {
      method,
      headers: { "x-api-key": key || "" },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "keygate could not be reached. Is it still running?");
    }
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = null;
    }
    if (!res.ok) throw new ApiError(res.status, describe(res.status, data, res));
    return data;
  }

  /** Every object of a list, following the cursor to the end. */
  async function listAll(path, params = {}) {
    const all = [];
    let after = null;
    for (let i = 0; i < MAX_PAGES; i += 1) {
      const q = new URLSearchParams(params);
      q.set("limit", String(PAGE));
      if (after) q.set("starting_after", after);
      const page = await api("GET", `${path}?${q}`);
      const objects = Array.isArray(page && page.objects) ? page.objects : [];
      all.push(...objects);
      if (objects.length < PAGE) break;
      after = objects[objects.length - 1].id;
    }
    return all;
  }

  // ---------------------------------------------------------------- messages

  function say(text, kind = "error") {
    const m = $("message");
    m.textContent = text;
    m.className = kind === "info" ? "message info" : "message";
    m.hidden = false;
  }

  function clearMessage() {
    $("message").hidden = true;
    $("message").textContent = "";
  }

  /** Shows a failure; a 401 while signed in means the key is gone: back to sign-in. */
  function fail(e) {
    if (e instanceof ApiError && e.status === 401 && adminKey()) {
      signOut();
    }
    say(e instanceof ApiError ? e.message : `Something went wrong: ${e}`);
  }

  /** Runs `work` with `button` disabled, showing any failure. */
  async function busy(button, work) {
    if (button) button.disabled = true;
    try {
      await work();
    } catch (e) {
      fail(e);
    } finally {
      if (button) button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- rendering helpers

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    if (className) td.className = className;
    return td;
  }

  function badge(text, kind) {
    const s = document.createElement("span");
    s.className = `badge ${kind}`;
    s.textContent = text;
    return s;
  }

  function when(ts) {
    if (!ts) return "never";
    const d = new Date(ts);
    return Number.isNaN(d.getTime()) ? String(ts) : d.toLocaleString();
  }

  /** The time `ts` (RFC 3339) as a Date, or null when it is not one. */
  function parseTime(ts) {
    if (typeof ts !== "string" || !ts) return null;
    const d = new Date(ts);
    return Number.isNaN(d.getTime()) ? null : d;
  }

  /** How long before `now` the Date `d` was, in words: "just now", "5 seconds ago",
   * "1 minute ago", "3 hours ago", "2 days ago". A time ahead of this browser's clock (the
   * clocks differ a little) reads as "just now". */
  function ago(d, now = Date.now()) {
    const ms = Math.max(0, now - d.getTime());
    const n = (unit, name) => {
      const k = Math.floor(ms / unit);
      return `${k} ${name}${k === 1 ? "" : "s"} ago`;
    };
    if (ms < 10 * SECOND) return "just now";
    if (ms < MINUTE) return n(SECOND, "second");
    if (ms < HOUR) return n(MINUTE, "minute");
    if (ms < DAY) return n(HOUR, "hour");
    return n(DAY, "day");
  }

  /** A <time> showing `ts` relative to now ("2 minutes ago"), with the exact RFC 3339 time
   * on hover; "never" for no time. The page refreshes these every few seconds. */
  function relTime(ts) {
    const d = parseTime(ts);
    if (!d) return document.createTextNode(ts ? String(ts) : "never");
    const t = document.createElement("time");
    t.className = "rel";
    t.dateTime = ts;
    t.title = ts;
    t.textContent = ago(d);
    return t;
  }

  function refreshTimes() {
    const now = Date.now();
    for (const t of document.querySelectorAll("time.rel")) {
      const d = parseTime(t.dateTime);
      if (d) t.textContent = ago(d, now);
    }
  }

  const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

  /** A right-aligned cell with the count `n` written compactly (1.2K), exact on hover. */
  function countCell(n, what, className = "") {
    const ok = Number.isFinite(n) && n >= 0;
    const td = cell(ok ? compact.format(n) : "", `num ${className}`.trim());
    if (ok) td.title = `${n.toLocaleString()} ${what}`;
    return td;
  }

  /** A trash-icon button that asks before deleting `label`. `warning` is added to the
   * question: a string, or a function (called on each click) resolving to `{note, urgent}`,
   * where a non-empty `urgent` is shown as a warning that must be acknowledged. */
  function trashButton(label, warning, onConfirmed) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "icon delete";
    b.title = `Delete ${label}`;
    b.setAttribute("aria-label", `Delete ${label}`);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M9 3h6l1 2h4v2H4V5h4l1-2zm-3 6h12l-1 12H7L6 9zm4 2v8h2v-8h-2zm4 0v8h2v-8h-2z");
    svg.appendChild(path);
    b.appendChild(svg);
    b.addEventListener("click", async () => {
      let w = { note: typeof warning === "string" ? warning : "", urgent: "" };
      if (typeof warning === "function") {
        b.disabled = true;
        try {
          w = await warning();
        } finally {
          b.disabled = false;
        }
      }
      if (await confirmDelete(label, w)) await busy(b, onConfirmed);
    });
    return b;
  }

  /** A table row for the object `id`: its cells, then a trash button that deletes `label` at
   * `url` (after a confirmation that adds `warning`, see trashButton) and reloads the list with
   * `reload`. */
  function objectRow(id, cells, label, url, reload, warning = "") {
    const tr = document.createElement("tr");
    tr.dataset.id = id;
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.append(
      trashButton(label, warning, async () => {
        await api("DELETE", url);
        say(`${label[0].toUpperCase()}${label.slice(1)} deleted.`, "info");
        await reload();
      }),
    );
    tr.append(...cells, actions);
    return tr;
  }

  /** Asks before deleting `label`, adding `note`; with an `urgent` warning, Delete stays
   * disabled until the person ticks that they understand. Resolves to true for Delete. */
  function confirmDelete(label, { note = "", urgent = "" } = {}) {
    const dialog = $("confirm");
    $("confirm-text").textContent =
      `Delete ${label}? This takes effect immediately and cannot be undone.${note ? ` ${note}` : ""}`;
    $("confirm-warning").textContent = urgent;
    $("confirm-urgent").hidden = !urgent;
    $("confirm-ack").checked = false;
    $("confirm-ok").disabled = Boolean(urgent);
    $("confirm-ok").textContent = urgent ? "Delete anyway" : "Delete";
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener(
        "close",
        () => resolve(dialog.returnValue === "ok" && (!urgent || $("confirm-ack").checked)),
        { once: true },
      );
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  function fill(tableId, emptyId, rows) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
    $(emptyId).hidden = rows.length > 0;
  }

  // ---------------------------------------------------------------- API keys

  let orgId = null;

  /** The preview keygate shows for the key this tab signed in with: `sk-****` + last 4. */
  function ownPreview() {
    const key = adminKey() || "";
    return key.length > 8 ? `${key.slice(0, 3)}****${key.slice(-4)}` : null;
  }

  /** What to add to the question when deleting the key `k`: it is this page's own key, and
   * (asked afresh, since the list may be old) whether it was used within the last hour. */
  async function keyDeleteWarning(k, mine) {
    let used = k.last_used;
    try {
      const fresh = await api("GET", `/v1/api_key/${encodeURIComponent(k.id)}`);
      if (fresh && "last_used" in fresh) used = fresh.last_used;
    } catch (e) {
      // The listed time stands; the delete itself reports what is wrong (gone, 401 …).
    }
    const d = parseTime(used);
    const recent = d !== null && Date.now() - d.getTime() < HOUR;
    return {
      note: mine ? "This page is signed in with this key: you will be signed out." : "",
      urgent: recent ? `This key was used ${ago(d)}; integrations using it will stop working.` : "",
    };
  }

  async function loadKeys() {
    const keys = await listAll("/v1/api_key");
    if (keys.length && keys[0].org_id) orgId = keys[0].org_id;
    const own = ownPreview();
    fill(
      "keys-table",
      "keys-empty",
      keys.map((k) => {
        const status = document.createElement("td");
        status.append(k.exposed ? badge("exposed", "bad") : badge("ok", "good"));
        if (k.exposed) status.title = "This key was seen over plain HTTP; replace it.";
        const name = cell(k.name, "name");
        // The API does not say which key is the caller's; an admin key whose preview matches
        // the one this tab signed in with is almost surely it (previews end in 4 characters).
        const mine = k.role === "admin" && k.preview_name === own;
        if (mine) name.append(" ", badge("signed in with this key", "mine"));
        const lastUsed = cell("", "last-used");
        lastUsed.append(relTime(k.last_used));
        const limited = Number(k.rate_limited_count);
        return objectRow(
          k.id,
          [
            name,
            cell(k.preview_name, "preview"),
            cell(k.role || ""),
            cell(when(k.created)),
            lastUsed,
            countCell(Number(k.request_count), "requests authenticated with this key", "requests"),
            countCell(limited, "requests refused with 429", limited > 0 ? "limited hot" : "limited"),
            status,
          ],
          `the key “${k.name}” (${k.preview_name})`,
          `/v1/api_key/${encodeURIComponent(k.id)}`,
          loadKeys,
          () => keyDeleteWarning(k, mine),
        );
      }),
    );
  }

  function hideNewKey() {
    $("new-key-value").textContent = "";
    $("copy-status").textContent = "";
    $("new-key").hidden = true;
  }

  async function createKey(event) {
    event.preventDefault();
    clearMessage();
    hideNewKey();
    const name = $("key-name").value.trim();
    if (!name) {
      say("Give the key a descriptive name, such as ci-pipeline.");
      return;
    }
    await busy($("create-key"), async () => {
      const created = await api("POST", "/v1/api_key", { name, role: $("key-role").value });
      $("key-name").value = "";
      $("new-key-value").textContent = created.key;
      $("new-key").hidden = false;
      await loadKeys();
    });
  }

  async function copyKey() {
    const text = $("new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("copy-status").textContent = "Copied.";
    } catch (e) {
      // No clipboard permission: select the text so Ctrl+C / Cmd+C copies it.
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      $("copy-status").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
    }
  }

  // ---------------------------------------------------------------- AI secrets

  async function loadSecrets() {
    const secrets = await listAll("/v1/ai_secret");
    fill(
      "secrets-table",
      "secrets-empty",
      secrets.map((s) =>
        objectRow(
          s.id,
          [
            cell(s.name, "name"),
            cell(s.type || ""),
            cell(s.preview_secret || "(none)", "preview"),
            cell(when(s.updated_at || s.created)),
          ],
          `the secret “${s.name}”`,
          `/v1/ai_secret/${encodeURIComponent(s.id)}`,
          loadSecrets,
        ),
      ),
    );
  }

  async function saveSecret(event) {
    event.preventDefault();
    clearMessage();
    const name = $("secret-name").value.trim();
    const type = $("secret-type").value.trim();
    const secret = $("secret-value").value;
    const button = event.submitter || null;
    await busy(button, async () => {
      const body = { name, secret };
      if (type) body.type = type;
      await api("PUT", "/v1/ai_secret", body);
      $("secret-value").value = "";
      say(`Secret “${name}” saved.`, "info");
      await loadSecrets();
    });
  }

  // ---------------------------------------------------------------- env vars

  function scope() {
    return { object_type: $("env-object-type").value, object_id: $("env-object-id").value.trim() };
  }

  async function loadEnv() {
    const s = scope();
    if (!s.object_id) {
      fill("env-table", "env-empty", []);
      return;
    }
    const vars = await listAll("/v1/env_var", s);
    fill(
      "env-table",
      "env-empty",
      vars.map((v) =>
        objectRow(
          v.id,
          [cell(v.name, "name"), cell(`${v.object_type} ${v.object_id}`), cell(when(v.created)), cell(when(v.used))],
          `the env var “${v.name}”`,
          `/v1/env_var/${encodeURIComponent(v.id)}`,
          loadEnv,
        ),
      ),
    );
  }

  async function setEnv(event) {
    event.preventDefault();
    clearMessage();
    const s = scope();
    if (!s.object_id) {
      say("Choose the scope's id first (for the organization, its id is filled in for you).");
      return;
    }
    const name = $("env-name").value.trim();
    const value = $("env-value").value;
    await busy(event.submitter || null, async () => {
      await api("PUT", "/v1/env_var", { ...s, name, value });
      $("env-value").value = "";
      say(`Env var “${name}” set.`, "info");
      await loadEnv();
    });
  }

  // ---------------------------------------------------------------- activity (audit trail)

  /** The actor of an event in words: "key sk-****abcd", "cli (root)" or "keygate". */
  function actorText(a) {
    if (!a || typeof a !== "object") return "unknown";
    switch (a.type) {
      case "api_key":
        return `key ${a.preview_name || a.id || "(unknown)"}`;
      case "cli":
        return `cli (${a.user || "unknown user"})`;
      case "keygate":
        return "keygate";
      default:
        return String(a.type || "unknown");
    }
  }

  let auditAfter = null; // id of the oldest event shown: the cursor of the next page
  let auditGeneration = 0; // bumped by each fresh load, so a late "Load more" answer is dropped

  function auditRow(ev) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(ev.id || "");
    if (Number.isFinite(ev.seq)) tr.dataset.seq = String(ev.seq);
    const time = cell("", "time");
    time.append(relTime(ev.created));
    const actor = cell(actorText(ev.actor), "actor");
    const own = ownPreview();
    if (ev.actor && ev.actor.type === "api_key") {
      if (ev.actor.id) actor.title = `key id ${ev.actor.id}`;
      if (own && ev.actor.preview_name === own) actor.append(" ", badge("you", "mine"));
    } else if (ev.actor && ev.actor.type === "cli") {
      actor.title = "the keygate command line, run by this OS user";
    }
    const action = cell("", "action");
    const code = document.createElement("code");
    code.textContent = String(ev.action || "");
    action.append(code);
    const object = cell("", "object name");
    const type = document.createElement("span");
    type.className = "type";
    type.textContent = String(ev.object_type || "");
    object.append(type);
    if (ev.object_name) object.append(" ", String(ev.object_name));
    if (ev.object_id) object.title = `id ${ev.object_id}`;
    const outcome = cell("", "outcome");
    const o = String(ev.outcome || "");
    outcome.append(badge(o || "unknown", o === "ok" ? "good" : "bad"));
    tr.append(time, actor, action, object, outcome);
    return tr;
  }

  /** One page of the trail (newest first) after the cursor; appended, or replacing the list
   * when `fresh`. */
  async function loadAuditPage(fresh) {
    const generation = fresh ? ++auditGeneration : auditGeneration;
    // Until the fresh page is in, a cursor from the old list must not be followed.
    if (fresh) $("audit-more").hidden = true;
    const q = new URLSearchParams({ limit: String(AUDIT_PAGE) });
    if (!fresh && auditAfter) q.set("starting_after", auditAfter);
    const page = await api("GET", `/v1/audit?${q}`);
    if (generation !== auditGeneration) return;
    const events = Array.isArray(page && page.objects) ? page.objects : [];
    const body = $("audit-table").querySelector("tbody");
    const rows = events.map(auditRow);
    if (fresh) body.replaceChildren(...rows);
    else body.append(...rows);
    if (events.length) auditAfter = String(events[events.length - 1].id);
    else if (fresh) auditAfter = null;
    $("audit-empty").hidden = body.children.length > 0;
    $("audit-more").hidden = events.length < AUDIT_PAGE;
  }

  const loadActivity = () => loadAuditPage(true);

  // ---------------------------------------------------------------- tabs and session

  const loaders = {
    "panel-keys": loadKeys,
    "panel-secrets": loadSecrets,
    "panel-env": loadEnv,
    "panel-activity": loadActivity,
  };

  function selectTab(tab) {
    hideNewKey(); // leaving the view: the full key is gone for good
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      $(t.dataset.panel).hidden = !on;
    }
    clearMessage();
    busy(null, loaders[tab.dataset.panel]);
  }

  function showSettings() {
    $("sign-in").hidden = true;
    $("settings").hidden = false;
    $("sign-out").hidden = false;
  }

  function signOut() {
    sessionStorage.removeItem(STORAGE);
    hideNewKey();
    for (const id of ["keys-table", "secrets-table", "env-table", "audit-table"]) {
      $(id).querySelector("tbody").replaceChildren();
    }
    auditGeneration += 1;
    auditAfter = null;
    $("audit-more").hidden = true;
    $("settings").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("admin-key").value = "";
  }

  async function enter() {
    showSettings();
    await loadKeys();
    if (orgId && !$("env-object-id").value) $("env-object-id").value = orgId;
  }

  async function signIn(event) {
    event.preventDefault();
    clearMessage();
    const key = $("admin-key").value.trim();
    if (!key) return;
    await busy(event.submitter || null, async () => {
      // Checked before it is kept: a wrong key never lands in storage.
      await api("GET", "/v1/api_key?limit=1", undefined, key);
      sessionStorage.setItem(STORAGE, key);
      $("admin-key").value = "";
      await enter();
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => {
      signOut();
      clearMessage();
    });
    $("key-form").addEventListener("submit", createKey);
    $("copy-key").addEventListener("click", copyKey);
    $("new-key-done").addEventListener("click", hideNewKey);
    $("secret-form").addEventListener("submit", saveSecret);
    $("env-scope").addEventListener("submit", (e) => {
      e.preventDefault();
      clearMessage();
      busy(e.submitter || null, loadEnv);
    });
    $("env-form").addEventListener("submit", setEnv);
    $("audit-more").addEventListener("click", () => {
      clearMessage();
      busy($("audit-more"), () => loadAuditPage(false));
    });
    $("audit-refresh").addEventListener("click", () => {
      clearMessage();
      busy($("audit-refresh"), loadActivity);
    });
    $("confirm-ack").addEventListener("change", () => {
      $("confirm-ok").disabled = !$("confirm-ack").checked;
    });
    setInterval(refreshTimes, 15 * SECOND);
    for (const t of document.querySelectorAll('[role="tab"]')) {
      t.addEventListener("click", () => selectTab(t));
    }
    if (adminKey()) busy(null, enter);
  });
})();
