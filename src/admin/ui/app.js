// keygate settings page: manages API keys, AI secrets and env vars through keygate's admin API
// (/v1/api_key, /v1/ai_secret, /v1/env_var) on this same origin.
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

  /** A trash-icon button that asks before deleting `label` (adding `warning` to the question). */
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
      if (await confirmDelete(label, warning)) await busy(b, onConfirmed);
    });
    return b;
  }

  /** A table row for the object `id`: its cells, then a trash button that deletes `label` at
   * `url` (after a confirmation that adds `warning`) and reloads the list with `reload`. */
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

  function confirmDelete(label, warning) {
    const dialog = $("confirm");
    $("confirm-text").textContent =
      `Delete ${label}? This takes effect immediately and cannot be undone.${warning ? ` ${warning}` : ""}`;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
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
        return objectRow(
          k.id,
          [name, cell(k.preview_name, "preview"), cell(k.role || ""), cell(when(k.created)), status],
          `the key “${k.name}” (${k.preview_name})`,
          `/v1/api_key/${encodeURIComponent(k.id)}`,
          loadKeys,
          mine ? "This page is signed in with this key: you will be signed out." : "",
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

  // ---------------------------------------------------------------- tabs and session

  const loaders = { "panel-keys": loadKeys, "panel-secrets": loadSecrets, "panel-env": loadEnv };

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
    for (const id of ["keys-table", "secrets-table", "env-table"]) {
      $(id).querySelector("tbody").replaceChildren();
    }
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
    for (const t of document.querySelectorAll('[role="tab"]')) {
      t.addEventListener("click", () => selectTab(t));
    }
    if (adminKey()) busy(null, enter);
  });
})();
