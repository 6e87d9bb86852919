// TheRelay Agent — Token Studio: tokens, cameras, audit log and usage, over the admin API.
//
// Rules this file keeps, and why:
// - The admin token (trk_…) lives in sessionStorage only: it dies with the tab, is never sent
//   as a cookie (no CSRF surface) and never appears in a URL (no history, logs or Referer).
//   It is read from storage for each request instead of being copied into globals.
// - A newly created token is shown once, in the "secret" dialog, and wiped from the DOM and
//   from every variable when that dialog closes. Everywhere else only the display form
//   (tra_<id>…<last 4>) or the id is shown.
// - The page runs under a strict CSP (no inline script, no eval) and may have no internet, so
//   everything is plain DOM code in this one file; text is always set with textContent, never
//   parsed as HTML (labels and camera names come from people).
// - Every admin request is itself audited by the agent, so the page never polls: it loads
//   when a view is opened or "Refresh" is pressed.
"use strict";

const STORAGE_KEY = "therelay.studio.admin";
const API = "/api/v1/admin";
const PROTOCOLS = ["webrtc", "rtsp", "hls", "snapshot"];
const AUDIT_PAGE = 100;
const VIEWS = ["hosts", "cameras", "tokens", "audit", "usage", "unused"];

// What the browser tests read. Never put a token's text in here.
const studio = {
  ready: false, loggedIn: false, view: null, loading: 0,
  lastCreatedId: null, lastRevokedId: null, lastRotatedId: null, lastUpdatedId: null,
  lastExport: null,
  loginMessage: "", errors: [], rendered: {},
};
window.__studio = studio;

// Data of the current session (public views only; cleared on logout).
const data = { hosts: [], cameras: [], tokens: [], audit: null, usageToken: null };

// ---------------------------------------------------------------------------------------
// Small DOM helpers

function $(id) { return document.getElementById(id); }

/** An element with attributes/properties and children (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** The same for SVG elements (they need their namespace). */
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") el.setAttribute("class", value);
    else el.setAttribute(key, String(value));
  }
  el.append(...children);
  return el;
}

/** A table cell carrying its column name, which the phone layout shows before the value
 * (the value is wrapped in one element so that layout has exactly two columns). */
function cell(label, ...children) {
  // An empty value ("—") is left out of the phone's cards, which stay short that way.
  const empty = children.every((c) => c === "—" || c === null || c === undefined);
  return h("td", { "data-label": label, class: empty ? "none" : null }, h("div", {}, ...children));
}

/** The last cell of a row: its buttons, which wrap when the table is narrow. */
function actions(...buttons) {
  return h("td", { class: "actions" }, h("div", { class: "buttons-row" }, ...buttons));
}

function badge(text, kind = text) {
  return h("span", { class: `badge ${kind}` }, text);
}

function code(text) {
  return h("code", {}, text);
}

function toDate(value) {
  // The API gives ISO strings for token times and epoch seconds for audit/usage times.
  if (value === null || value === undefined || value === "-" || value === "") return null;
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? null : date;
}

/** Local time, short: the year only when it is not this one; seconds for the audit log. */
function shortTime(date, seconds = false) {
  const thisYear = date.getFullYear() === new Date().getFullYear();
  return date.toLocaleString(undefined, {
    year: thisYear ? undefined : "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: seconds ? "2-digit" : undefined,
  });
}

/** A <time> element in local time (ISO in datetime/title for the precise value). */
function when(value, none = "never", seconds = false) {
  const date = toDate(value);
  if (!date) return h("span", { class: "sub" }, none);
  const iso = date.toISOString();
  return h("time", { datetime: iso, title: iso }, shortTime(date, seconds));
}

/** 93784 → "1 d 2 h": the two largest units that are not zero. */
function duration(seconds) {
  let rest = Math.floor(seconds);
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]]) {
    const n = Math.floor(rest / size);
    rest -= n * size;
    if (n && parts.length < 2) parts.push(`${n} ${unit}`);
  }
  return parts.join(" ") || "0 s";
}

function setStatus(text, isError = false) {
  $("status").textContent = text || "";
  $("status").classList.toggle("error", !!isError);
}

function rendered(view) {
  studio.rendered[view] = (studio.rendered[view] || 0) + 1;
}

// ---------------------------------------------------------------------------------------
// The admin API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Thrown after a 401/403: the session has already been ended and the login shown. */
class LoggedOut extends Error {}

function adminToken() {
  return sessionStorage.getItem(STORAGE_KEY);
}

async function explain(response) {
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON: use the status */ }
  return {
    code: body.error || `http_${response.status}`,
    message: body.message || `The agent answered ${response.status} ${response.statusText}.`,
  };
}

/**
 * One admin API call. Returns the parsed JSON (or the Response with `raw`). A 401/403 means
 * the admin token is no longer good (revoked, expired, not an admin token): end the session
 * with the server's message. Other failures throw ApiError with the server's message.
 */
async function api(path, { method = "GET", json, raw = false } = {}) {
  const token = adminToken();
  if (!token) {
    endSession("Log in with an admin token.");
    throw new LoggedOut("not logged in");
  }
  const headers = { Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  studio.loading += 1;
  try {
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "unreachable", "The agent cannot be reached. Check the network and try again.");
    }
    if (response.ok) return raw ? response : await response.json();
    const why = await explain(response);
    if (response.status === 401 || response.status === 403) {
      endSession(why.message);
      throw new LoggedOut(why.message);
    }
    throw new ApiError(response.status, why.code, why.message);
  } finally {
    studio.loading -= 1;
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") q.set(key, value);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

/** Run a UI action; show API errors in the status line (and to the tests). */
async function attempt(action, fn) {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof LoggedOut) return undefined;
    const message = e instanceof ApiError ? e.message : `Unexpected problem: ${e.message}`;
    studio.errors.push({ action, status: e.status || 0, code: e.code || "error", message });
    setStatus(message, true);
    return undefined;
  }
}

/**
 * Run a dialog's action with its button disabled; a failure is shown in the dialog (which
 * stays open) and recorded for the tests. A 401/403 has already ended the session.
 */
async function inDialog(action, button, errorBox, fn) {
  errorBox.textContent = "";
  button.disabled = true;
  try {
    await fn();
  } catch (e) {
    if (!(e instanceof LoggedOut)) {
      errorBox.textContent = e.message;
      studio.errors.push({ action, status: e.status || 0, code: e.code || "error", message: e.message });
    }
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------
// Login and logout

function showLogin(message) {
  $("main").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-message").textContent = message || "";
  studio.loginMessage = message || "";
  $("login-token").focus();
}

/** Forget the admin token and everything loaded with it; back to the login form. */
function endSession(message) {
  sessionStorage.removeItem(STORAGE_KEY);
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  data.hosts = []; data.cameras = []; data.tokens = []; data.audit = null; data.usageToken = null;
  for (const tbody of document.querySelectorAll("main tbody")) tbody.replaceChildren();
  studio.loggedIn = false;
  setStatus("");
  showLogin(message);
}

async function login(event) {
  event.preventDefault();
  const input = $("login-token");
  const token = input.value.trim();
  input.value = ""; // not kept in the form either
  if (!token) return;
  sessionStorage.setItem(STORAGE_KEY, token);
  $("login-message").textContent = "";
  studio.loginMessage = "";
  const ok = await start();
  if (!ok && adminToken()) endSession(studio.loginMessage);
}

/** Check the stored token against the API; open the Studio if it is good. */
async function start() {
  let hosts;
  try {
    hosts = await api(`${API}/hosts`);
  } catch (e) {
    if (!(e instanceof LoggedOut)) {
      // Not a token problem (agent unreachable, rate limited): say so on the login form.
      sessionStorage.removeItem(STORAGE_KEY);
      showLogin(e.message);
    }
    return false;
  }
  data.hosts = hosts.hosts;
  studio.loggedIn = true;
  studio.loginMessage = "";
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  const host = data.hosts[0] || {};
  // Show which admin token is in use by its public id only (the part before the secret).
  const publicId = (adminToken() || "").split("_")[1] || "?";
  $("who").textContent = `host ${host.id || "?"} · account ${host.account_id || "?"} · admin token ${publicId}`;
  const wanted = location.hash.slice(1);
  await showView(VIEWS.includes(wanted) ? wanted : "tokens");
  return true;
}

function logout() {
  endSession("");
  setStatus("Logged out. The admin token was removed from this tab.");
}

// ---------------------------------------------------------------------------------------
// Tabs (WAI-ARIA tabs pattern: one tab in the Tab order, arrow keys move between tabs)

const loaders = {
  hosts: loadHosts, cameras: loadCameras, tokens: loadTokens,
  audit: () => loadAudit(true), usage: loadUsage, unused: loadUnused,
};

async function showView(view, { focus = false } = {}) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
    if (selected) {
      if (focus) tab.focus();
      tab.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
  }
  studio.view = view;
  history.replaceState(null, "", `#${view}`); // the view only: never anything secret
  setStatus("");
  await attempt(`load ${view}`, loaders[view]);
}

function onTabKey(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const index = tabs.indexOf(document.activeElement);
  if (index < 0) return;
  const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const next = tabs[(moves[event.key] + tabs.length) % tabs.length];
  showView(next.dataset.view, { focus: true });
}

// ---------------------------------------------------------------------------------------
// Hosts and cameras

async function loadHosts() {
  data.hosts = (await api(`${API}/hosts`)).hosts;
  $("hosts-table").tBodies[0].replaceChildren(...data.hosts.map((host) => h("tr", {},
    cell("Host", h("strong", {}, host.id)),
    cell("Account", host.account_id || "—"),
    cell("Version", host.version),
    cell("Uptime", duration(host.uptime_s)),
    cell("Cameras online", `${host.cameras_online} of ${host.cameras}`),
    cell("Sessions", String(host.sessions)),
    tlsCell(host.tls),
    actions(
      h("button", { type: "button", class: "small", onclick: () => openCreate({ scope: "host" }) },
        "Create token for this host")),
  )));
  rendered("hosts");
}

/** The fingerprint viewers compare before trusting the agent (what the browser shows as
 * "SHA-256 fingerprint" of the certificate). */
function tlsCell(tls) {
  if (!tls) return cell("HTTPS certificate", h("span", { class: "sub" }, "off: plain HTTP on the LAN"));
  return cell("HTTPS certificate",
    h("div", { class: "mono", dataset: { fingerprint: tls.fingerprint_sha256 } }, tls.fingerprint_sha256),
    h("div", { class: "sub" },
      `SHA-256 · ${tls.self_signed ? "self-signed" : "from your certificate file"} · valid until `,
      when(tls.not_after)));
}

async function fetchCameras() {
  data.cameras = (await api(`${API}/cameras`)).cameras;
  // The audit filter offers the cameras by name.
  const select = $("audit-camera");
  const current = select.value;
  select.replaceChildren(h("option", { value: "" }, "any"),
                         ...data.cameras.map((c) => h("option", { value: c.id }, `${c.name} (${c.id})`)));
  select.value = current;
  return data.cameras;
}

function viewerCounts(viewers) {
  const parts = PROTOCOLS.map((p) => `${p} ${(viewers || {})[p] || 0}`);
  const total = PROTOCOLS.reduce((sum, p) => sum + ((viewers || {})[p] || 0), 0);
  return [h("strong", {}, String(total)), " ", h("span", { class: "sub" }, parts.join(" · "))];
}

async function loadCameras() {
  await fetchCameras();
  $("cameras-empty").hidden = data.cameras.length > 0;
  $("cameras-table").tBodies[0].replaceChildren(...data.cameras.map((camera) => {
    const size = camera.width && camera.height ? `${camera.width}×${camera.height}` : "—";
    const fps = camera.fps ? ` @ ${Math.round(camera.fps)} fps` : "";
    return h("tr", { dataset: { camera: camera.id } },
      cell("Camera", h("strong", {}, camera.name), " ", h("span", { class: "sub" }, camera.id)),
      cell("State", badge(camera.state), camera.error ? h("div", { class: "sub" }, camera.error) : null,
        camera.held_move ? h("div", { class: "sub warn", role: "note" }, "Move not followed: " + camera.held_move) : null),
      cell("Codec", camera.codec || "—", camera.audio ? h("span", { class: "sub" }, ` + ${camera.audio}`) : null),
      cell("Size", size + fps),
      cell("Viewers", ...viewerCounts(camera.viewers)),
      actions(
        h("button", {
          type: "button", class: "small",
          "aria-label": `Create token for this camera: ${camera.name}`,
          onclick: () => openCreate({ scope: "camera", camera: camera.id }),
        }, "Create token for this camera")),
    );
  }));
  rendered("cameras");
}

// ---------------------------------------------------------------------------------------
// Tokens

async function fetchTokens(params = {}) {
  const tokens = (await api(`${API}/tokens${query(params)}`)).tokens;
  if (!params.kind && !params.status) {
    data.tokens = tokens;
    fillTokenChoices(tokens);
  }
  return tokens;
}

/** The token pickers of the Usage and Audit views (ids and display forms only). */
function fillTokenChoices(tokens) {
  const select = $("usage-token");
  const current = data.usageToken || select.value;
  select.replaceChildren(h("option", { value: "" }, "choose a token…"), ...tokens.map((t) =>
    h("option", { value: t.id }, `${t.display}${t.label ? ` — ${t.label}` : ""} (${t.status})`)));
  select.value = current || "";
  $("token-ids").replaceChildren(...tokens.map((t) =>
    h("option", { value: t.id }, `${t.display}${t.label ? ` — ${t.label}` : ""}`)));
}

function protocolsText(protocols) {
  return (protocols || []).join(", ") || "all";
}

function tokenActions(token) {
  const active = token.status === "active";
  return actions(
    h("button", { type: "button", class: "small", "aria-label": `Usage of ${token.display}`,
                  onclick: () => openUsage(token.id) }, "Usage"),
    active && !token.replaced_by && token.origin === "local"
      ? h("button", { type: "button", class: "small", "aria-label": `Edit ${token.display}`,
                      dataset: { edit: token.id }, onclick: () => openEdit(token) }, "Edit")
      : null,
    active && !token.replaced_by && token.origin === "local"
      ? h("button", { type: "button", class: "small", "aria-label": `Rotate ${token.display}`,
                      onclick: () => openRotate(token) }, "Rotate")
      : null,
    active
      ? h("button", { type: "button", class: "small danger", "aria-label": `Revoke ${token.display}`,
                      dataset: { revoke: token.id }, onclick: () => openRevoke(token) }, "Revoke")
      : null,
  );
}

function statusCell(token) {
  const notes = [];
  if (token.replaced_by) notes.push(`replaced by ${token.replaced_by}`);
  if (token.replaces) notes.push(`replaces ${token.replaces}`);
  if (token.revoked_at) notes.push(`revoked ${shortTime(toDate(token.revoked_at))}`);
  return cell("Status", badge(token.status),
              notes.length ? h("div", { class: "sub" }, notes.join("; ")) : null);
}

async function loadTokens() {
  const kind = $("tokens-kind").value, status = $("tokens-status").value;
  const tokens = await fetchTokens({ kind, status });
  if (kind || status) fetchTokens().catch(() => {}); // the pickers want every token
  $("tokens-empty").hidden = tokens.length > 0;
  $("tokens-table").tBodies[0].replaceChildren(...tokens.map((t) => h("tr", { dataset: { token: t.id } },
    cell("Token", code(t.display), t.origin === "relay" ? h("div", { class: "sub" }, "from TheRelay cloud") : null),
    cell("Kind", t.kind),
    cell("Scope", t.scope),
    cell("Protocols", protocolsText(t.protocols),
         t.max_sessions ? h("div", { class: "sub" }, `at most ${t.max_sessions} live sessions`) : null),
    statusCell(t),
    cell("Created", when(t.created_at), t.created_by ? h("div", { class: "sub" }, `by ${t.created_by}`) : null),
    cell("Expires", when(t.expires_at)),
    cell("Last used", when(t.last_used_at)),
    cell("Label", t.label || "—"),
    tokenActions(t),
  )));
  rendered("tokens");
}

// -- create ----------------------------------------------------------------------------

async function openCreate({ scope = "camera", camera = null } = {}) {
  const dialog = $("create-dialog");
  $("create-form").reset();
  $("create-error").textContent = "";
  $("create-expires-at").disabled = true;
  if (!data.cameras.length) await attempt("load cameras", fetchCameras);
  const select = $("create-camera");
  select.replaceChildren(...data.cameras.map((c) => h("option", { value: c.id }, `${c.name} (${c.id})`)));
  const cameraRadio = document.querySelector('#create-form input[name="scope"][value="camera"]');
  cameraRadio.disabled = select.disabled = data.cameras.length === 0;
  if (camera) select.value = camera;
  if (!data.cameras.length && scope === "camera") scope = "host";
  document.querySelector(`#create-form input[name="scope"][value="${scope}"]`).checked = true;
  const host = data.hosts[0] || {};
  $("create-host-id").textContent = host.id ? `(${host.id})` : "";
  $("create-account-id").textContent = host.account_id ? `(${host.account_id})` : "";
  // The custom expiry cannot lie in the past.
  const now = new Date(Date.now() - new Date().getTimezoneOffset() * 60000);
  $("create-expires-at").min = now.toISOString().slice(0, 16);
  dialog.showModal();
  (camera ? $("create-camera") : document.querySelector('#create-form input[name="scope"]:checked')).focus();
}

function createRequest() {
  const form = $("create-form");
  const scope = form.querySelector('input[name="scope"]:checked').value;
  const body = { kind: "access", label: $("create-label").value.trim() };
  body.scope = scope === "camera" ? `camera:${$("create-camera").value}` : scope;
  body.protocols = [...form.querySelectorAll('input[name="protocol"]:checked')].map((i) => i.value);
  const expiry = form.querySelector('input[name="expiry"]:checked').value;
  if (expiry === "custom") {
    body.expires_at = customExpiry($("create-expires-at"));
  } else if (expiry !== "never") {
    body.ttl = expiry;
  }
  const cap = sessionCap($("create-max-sessions"));
  if (cap !== null) body.max_sessions = cap;
  return body;
}

/** A session cap field: null when empty (unlimited), else a whole number from 1 to 10000. */
function sessionCap(input) {
  const raw = input.value.trim();
  if (!raw) return null;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 10000) {
    throw new ApiError(0, "invalid", "Live sessions at once: a whole number from 1 to 10000, or empty for unlimited.");
  }
  return n;
}

/** A custom expiry from a datetime-local input (the browser's local time), as ISO. */
function customExpiry(input) {
  const local = input.value;
  const date = local ? new Date(local) : null;
  if (!date || Number.isNaN(date.getTime())) throw new ApiError(0, "invalid", "Choose the expiry date and time.");
  if (date.getTime() <= Date.now()) throw new ApiError(0, "invalid", "The expiry must lie in the future.");
  return date.toISOString();
}

// -- edit --------------------------------------------------------------------------------

let editing = null; // the token (public view) the edit dialog is about

function openEdit(token) {
  editing = token;
  const form = $("edit-form");
  form.reset();
  $("edit-error").textContent = "";
  $("edit-title").textContent = `Edit ${token.display}`;
  $("edit-scope").textContent =
    `Scope ${token.scope} (a scope cannot change: create a new token for another scope, ` +
    "or rotate this one to replace its secret).";
  $("edit-label").value = token.label || "";
  for (const box of form.querySelectorAll('input[name="protocol"]')) {
    box.checked = (token.protocols || []).includes(box.value);
  }
  $("edit-expiry-now").textContent = token.expires_at
    ? `(${shortTime(toDate(token.expires_at))})` : "(never)";
  $("edit-expires-at").disabled = true;
  const now = new Date(Date.now() - new Date().getTimezoneOffset() * 60000);
  $("edit-expires-at").min = now.toISOString().slice(0, 16);
  $("edit-max-sessions").value = token.max_sessions ? String(token.max_sessions) : "";
  // Only access tokens have protocols and open sessions (an admin token keeps its label
  // and expiry editable).
  $("edit-protocols").hidden = $("edit-cap-field").hidden = token.kind !== "access";
  $("edit-dialog").showModal();
  $("edit-label").focus();
}

/** Only what the form changed: the agent audits each change with its before and after. */
function editRequest(token) {
  const form = $("edit-form");
  const body = {};
  const label = $("edit-label").value.trim();
  if (label !== (token.label || "")) body.label = label;
  const protocols = [...form.querySelectorAll('input[name="protocol"]:checked')].map((i) => i.value).sort();
  const before = (token.protocols || []).filter((p) => p !== "all").sort();
  if (token.kind === "access" && protocols.join(",") !== before.join(",")) body.protocols = protocols;
  const expiry = form.querySelector('input[name="expiry"]:checked').value;
  if (expiry === "never") body.expires_at = null;
  else if (expiry === "custom") body.expires_at = customExpiry($("edit-expires-at"));
  else if (expiry !== "keep") body.ttl = expiry;
  const cap = token.kind === "access" ? sessionCap($("edit-max-sessions")) : null;
  if (cap !== (token.max_sessions ?? null)) body.max_sessions = cap;
  if (!Object.keys(body).length) throw new ApiError(0, "unchanged", "Nothing was changed.");
  return body;
}

async function submitEdit(event) {
  event.preventDefault();
  const token = editing;
  if (!token) return;
  await inDialog("edit", $("edit-submit"), $("edit-error"), async () => {
    const updated = await api(`${API}/tokens/${encodeURIComponent(token.id)}`,
                              { method: "PATCH", json: editRequest(token) });
    $("edit-dialog").close();
    studio.lastUpdatedId = updated.id;
    setStatus(`Updated ${updated.display}. Live sessions it no longer allows have ended.`);
    await refreshAfterChange();
  });
}

async function submitCreate(event) {
  event.preventDefault(); // keep the dialog open until the agent answered
  await inDialog("create", $("create-submit"), $("create-error"), async () => {
    const created = await api(`${API}/tokens`, { method: "POST", json: createRequest() });
    await knowHosts();
    $("create-dialog").close();
    showSecret(created, "created");
    refreshAfterChange(); // not awaited: the new token is on screen first
  });
}

// -- the once-only secret dialog -------------------------------------------------------

/**
 * Show a new token (from create or rotate). The token text is taken out of the response
 * object and lives only in the two read-only textareas' values (properties, not their
 * content, so it is never part of the serialized DOM) until the dialog closes.
 */
let secretFor = null; // the display form of the token the secret dialog shows (for the status)

/** The host (its RTSP port) for the ready RTSP URL, if no view has loaded it yet. */
async function knowHosts() {
  if (!data.hosts.length) data.hosts = (await api(`${API}/hosts`)).hosts;
}

function showSecret(created, verb) {
  const token = created.token;
  delete created.token;
  secretFor = created.display;
  studio.lastCreatedId = created.id;
  $("secret-title").textContent = verb === "rotated" ? "Token rotated — the new token" : "Token created";
  $("secret-summary").textContent =
    `${created.display} · ${created.kind} · scope ${created.scope} · protocols ` +
    `${protocolsText(created.protocols)} · expires ` +
    `${created.expires_at ? shortTime(toDate(created.expires_at)) : "never"}${created.label ? ` · “${created.label}”` : ""}`;
  $("secret-token").value = token;
  const viewer = created.kind === "access";
  $("secret-link-field").hidden = !viewer;
  // The fragment (#token=) is never sent to the agent, nor in a Referer.
  $("secret-link").value = viewer ? `${location.origin}/#token=${token}` : "";
  // RTSP clients take the token as the Basic password (docs/viewing.md, RTSP); a VMS
  // keeps this URL in its settings, which is why the token stays out of the viewer link.
  const port = data.hosts.length ? data.hosts[0].rtsp_port : null;
  const protocols = created.protocols || [];  // ["all"] when not restricted
  const rtsp = viewer && port && (protocols.includes("all") || protocols.includes("rtsp"));
  const camera = created.scope.startsWith("camera:") ? created.scope.slice(7) : "<camera-id>";
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  $("secret-rtsp-field").hidden = !rtsp;
  $("secret-rtsp").value = rtsp ? `rtsp://token:${token}@${host}:${port}/${camera}` : "";
  $("secret-copied").textContent = "";
  $("secret-dialog").showModal();
  $("secret-token").focus();
  $("secret-token").select();
  setStatus(`${verb === "rotated" ? "Rotated; new token" : "Created"} ${created.display}. Copy it now: it is shown only once.`);
}

function wipeSecret() {
  if (secretFor) setStatus(`${secretFor} is ready. Its full text is not shown again.`);
  secretFor = null;
  $("secret-token").value = "";
  $("secret-link").value = "";
  $("secret-rtsp").value = "";
  $("secret-copied").textContent = "";
  const selection = window.getSelection();
  if (selection) selection.removeAllRanges();
}

async function copyField(input, what) {
  let copied = false;
  // navigator.clipboard needs a secure context, which a LAN http:// address is not.
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(input.value); copied = true; } catch (e) { /* fall back */ }
  }
  if (!copied) {
    input.focus();
    input.select();
    try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
  }
  $("secret-copied").textContent = copied
    ? `${what} copied to the clipboard.`
    : `${what} selected: press Ctrl+C (or long-press and Copy) to copy it.`;
}

// -- revoke and rotate -----------------------------------------------------------------

let pending = null; // the token (public view) a confirmation dialog is about

function describe(token) {
  return `${token.display}${token.label ? ` (“${token.label}”)` : ""}, scope ${token.scope}`;
}

function openRevoke(token) {
  pending = token;
  $("revoke-text").textContent =
    `Revoke ${describe(token)}? It stops working at once and its live sessions end now. ` +
    "A revoked token cannot be restored.";
  $("revoke-error").textContent = "";
  $("revoke-dialog").showModal();
  $("revoke-cancel").focus(); // the safe choice has the focus
}

async function confirmRevoke(event) {
  event.preventDefault();
  const token = pending;
  if (!token) return;
  await inDialog("revoke", $("revoke-confirm"), $("revoke-error"), async () => {
    const revoked = await api(`${API}/tokens/${encodeURIComponent(token.id)}/revoke`, { method: "POST" });
    $("revoke-dialog").close();
    studio.lastRevokedId = revoked.id;
    setStatus(`Revoked ${revoked.display}. Its live sessions have ended.`);
    await refreshAfterChange();
  });
}

function openRotate(token) {
  pending = token;
  $("rotate-text").textContent =
    `Replace ${describe(token)} with a new token of the same scope, protocols and lifetime.`;
  $("rotate-error").textContent = "";
  $("rotate-grace").value = "";
  $("rotate-dialog").showModal();
  $("rotate-grace").focus();
}

async function confirmRotate(event) {
  event.preventDefault();
  const token = pending;
  if (!token) return;
  const grace = $("rotate-grace").value;
  await inDialog("rotate", $("rotate-confirm"), $("rotate-error"), async () => {
    const created = await api(`${API}/tokens/${encodeURIComponent(token.id)}/rotate`,
                              { method: "POST", json: grace ? { grace } : {} });
    await knowHosts();
    $("rotate-dialog").close();
    studio.lastRotatedId = token.id;
    showSecret(created, "rotated");
    refreshAfterChange(); // not awaited: the new token is on screen first
  });
}

/** After a change, reload what the current view shows. */
async function refreshAfterChange() {
  const view = studio.view;
  if (view === "tokens" || view === "unused") await attempt(`load ${view}`, loaders[view]);
  else await attempt("load tokens", () => fetchTokens());
}

// ---------------------------------------------------------------------------------------
// Audit

/** The Studio's own (granted) admin API requests: every page load makes some. Hidden on
 * request, in the page, as the API cannot filter by protocol. Denied ones always show. */
function ownRequest(entry) {
  return entry.protocol === "admin" && entry.result === "granted";
}

function auditFilters() {
  return {
    token: $("audit-token").value.trim(), camera: $("audit-camera").value,
    event: $("audit-event").value, result: $("audit-result").value, reason: $("audit-reason").value,
  };
}

function resultText(entry) {
  // "denied: revoked" — the reason is the point of a rejection; "granted" needs no reason.
  if (!entry.result) return "";
  return entry.reason && entry.reason !== entry.result ? `${entry.result}: ${entry.reason}` : entry.result;
}

/** An entry's details (what a token was created with, rotation links…) in words. */
function detailText(detail) {
  return Object.entries(detail || {}).map(([key, value]) => {
    if (key.endsWith("_at") && typeof value === "number") return `${key.slice(0, -3)} ${shortTime(toDate(value))}`;
    if (key.endsWith("_seconds") && typeof value === "number") return `${key.slice(0, -8)} ${duration(value)}`;
    if (Array.isArray(value)) return `${key} ${value.join(", ") || "all"}`;
    if (value !== null && typeof value === "object") return `${key} ${JSON.stringify(value)}`;
    return `${key} ${value}`;
  }).join(" · ");
}

function auditRow(entry) {
  const result = resultText(entry);
  const detail = detailText(entry.detail);
  return h("tr", { dataset: { seq: entry.seq, event: entry.event } },
    cell("Time", when(entry.ts, "—", true)),
    cell("Event", entry.event),
    cell("Token", entry.token_id ? code(entry.token_id) : "—"),
    cell("Camera", entry.camera || "—"),
    cell("Protocol", entry.protocol || "—"),
    cell("IP", entry.peer_ip || "—"),
    cell("Result", result ? badge(result, entry.result) : null,
         detail ? h("div", { class: "sub" }, detail) : null,
         !result && !detail ? "—" : null),
    cell("Actor", entry.actor || "—"),
  );
}

/**
 * The API pages oldest first (after=<seq>) or newest first (order=newest, before=<seq>);
 * either way one page at a time, so a long log never has to be read whole.
 */
async function loadAudit(reset) {
  if (!data.cameras.length) await fetchCameras(); // for the camera filter
  const order = $("audit-order").value;
  if (reset || !data.audit) {
    data.audit = { filters: auditFilters(), order, shown: [], cursor: null, done: false };
    $("audit-table").tBodies[0].replaceChildren();
  }
  const state = data.audit;
  const hide = $("audit-hide-admin").checked;
  const wanted = (entry) => !(hide && ownRequest(entry));
  const newest = state.order !== "oldest";
  let page = [];
  // Fetch until a page has something to show (a run of hidden entries can fill pages).
  for (let tries = 0; tries < 20 && !page.length && !state.done; tries += 1) {
    const paging = newest
      ? { order: "newest", ...(state.cursor ? { before: state.cursor } : {}) }
      : { after: state.cursor || 0 };
    const answer = await api(`${API}/audit${query({ ...state.filters, ...paging, limit: AUDIT_PAGE })}`);
    page = answer.entries.filter(wanted);
    state.cursor = newest ? answer.next_before : answer.next_after;
    state.done = state.cursor === null;
  }
  state.shown.push(...page);
  $("audit-table").tBodies[0].append(...page.map(auditRow));
  $("audit-empty").hidden = state.shown.length > 0;
  $("audit-more").hidden = state.done;
  studio.audit = { entries: state.shown.length, more: !state.done, order: state.order };
  rendered("audit");
}

/** Export with the token in a header: fetch, then hand the bytes to the browser as a file. */
async function exportAudit(format) {
  const response = await api(`${API}/audit${query({ ...auditFilters(), format })}`, { raw: true });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const host = (data.hosts[0] || {}).id || "agent";
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
  const link = h("a", { href: url, download: `audit-${host}-${stamp}.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000); // the download has started by then
  studio.lastExport = { format, bytes: blob.size, type: blob.type };
  setStatus(`Exported ${blob.size} bytes as ${format === "csv" ? "CSV" : "JSON lines"}.`);
}

// ---------------------------------------------------------------------------------------
// Usage

async function openUsage(tokenId) {
  data.usageToken = tokenId;
  await showView("usage", { focus: true });
}

async function loadUsage() {
  if (!data.tokens.length) await fetchTokens();
  const select = $("usage-token");
  if (data.usageToken) select.value = data.usageToken;
  const id = select.value;
  $("usage-body").hidden = !id;
  $("usage-none").hidden = !!id;
  if (!id) { rendered("usage"); return; }
  const stats = await api(`${API}/tokens/${encodeURIComponent(id)}/usage`);
  data.usageStats = stats;
  $("usage-uses").textContent = String(stats.uses);
  $("usage-denied").textContent = String(stats.denied);
  $("usage-last").replaceChildren(when(stats.last_used_at));
  $("usage-ipcount").textContent = String(stats.ips.length);
  drawChart(stats);
  drawProtocols(stats.per_protocol);
  $("usage-ips").tBodies[0].replaceChildren(...stats.ips.map((ip) => h("tr", {},
    cell("IP address", code(ip.ip)), cell("Requests", String(ip.count)), cell("Last seen", when(ip.last_seen)))));
  $("usage-ips-empty").hidden = stats.ips.length > 0;
  studio.usage = { token: id, uses: stats.uses, denied: stats.denied, ips: stats.ips.length };
  rendered("usage");
}

/** Hours or days as a continuous series (the API omits empty ones). */
function series(stats, span) {
  const unit = span === "hour" ? 3600 : 86400;
  const key = span === "hour" ? "hour" : "day";
  const rows = span === "hour" ? stats.per_hour : stats.per_day;
  const byIndex = new Map(rows.map((r) => [r[key], r]));
  const last = Math.floor(Date.now() / 1000 / unit);
  // Hours: the last week (what the API keeps). Days: at least 30, at most 120 bars.
  let first = span === "hour" ? last - 167 : last - 29;
  if (span === "day" && rows.length) first = Math.max(Math.min(first, rows[0][key]), last - 119);
  const out = [];
  for (let i = first; i <= last; i += 1) {
    const r = byIndex.get(i) || { granted: 0, denied: 0 };
    out.push({ start: new Date(i * unit * 1000), granted: r.granted, denied: r.denied });
  }
  return out;
}

function niceMax(value) {
  if (value <= 4) return 4;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

/** A stacked bar chart (granted below, denied on top) sized to its container, in SVG. */
function drawChart(stats) {
  const span = $("usage-span").value;
  const points = series(stats, span);
  const box = $("usage-chart");
  const width = Math.max(280, Math.floor(box.clientWidth || 600));
  const height = width < 500 ? 180 : 220;
  const pad = { left: 34, right: 8, top: 10, bottom: 26 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const max = niceMax(Math.max(...points.map((p) => p.granted + p.denied), 0));
  const slot = plotW / points.length;
  const bar = Math.max(1, slot * 0.8);
  const y = (v) => pad.top + plotH - (v / max) * plotH;
  const total = points.reduce((n, p) => n + p.granted + p.denied, 0);
  const label = (d) => (span === "hour"
    ? d.toLocaleString(undefined, { weekday: "short", hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString(undefined, { month: "short", day: "numeric" }));

  const svg = s("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`,
                         role: "img", "aria-labelledby": "usage-chart-title usage-chart-desc" });
  svg.append(s("desc", { id: "usage-chart-desc" },
    `${total} requests in ${points.length} ${span}s: ` +
    `${points.reduce((n, p) => n + p.granted, 0)} granted, ${points.reduce((n, p) => n + p.denied, 0)} denied.`));
  for (const v of [0, max / 2, max]) {
    svg.append(s("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }),
               s("text", { x: pad.left - 4, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  // Label the x axis at day starts (hours) or about every 7th day, never crowded.
  const every = span === "hour" ? 24 : Math.max(7, Math.ceil(points.length / 8));
  const minGap = 60;
  let lastLabelX = -Infinity;
  points.forEach((p, i) => {
    const x = pad.left + i * slot + (slot - bar) / 2;
    const g = s("g", {});
    g.append(s("title", {}, `${label(p.start)}: ${p.granted} granted, ${p.denied} denied`));
    if (p.granted) g.append(s("rect", { class: "granted", x, width: bar, y: y(p.granted), height: y(0) - y(p.granted) }));
    if (p.denied) {
      const top = y(p.granted + p.denied);
      g.append(s("rect", { class: "denied", x, width: bar, y: top, height: y(p.granted) - top }));
    }
    svg.append(g);
    const boundary = span === "hour" ? p.start.getHours() === 0 : i % every === 0;
    if (boundary && x - lastLabelX >= minGap) {
      lastLabelX = x;
      const text = span === "hour"
        ? p.start.toLocaleDateString(undefined, { weekday: "short", day: "numeric" })
        : label(p.start);
      const anchor = x > width - minGap ? "end" : "start"; // keep the last label inside
      svg.append(s("line", { class: "grid", x1: x, x2: x, y1: y(0), y2: y(0) + 4 }),
                 s("text", { x: anchor === "end" ? width - pad.right : x, y: height - 8,
                             "text-anchor": anchor }, text));
    }
  });
  box.replaceChildren(svg);
}

function drawProtocols(perProtocol) {
  const entries = Object.entries(perProtocol || {});
  const max = Math.max(1, ...entries.map(([, v]) => v.granted + v.denied));
  $("usage-protocols").replaceChildren(...(entries.length ? entries.map(([name, v]) => {
    const granted = h("span", { class: "granted" });
    const denied = h("span", { class: "denied" });
    granted.style.width = `${(v.granted / max) * 100}%`;
    denied.style.width = `${(v.denied / max) * 100}%`;
    return h("div", { class: "bar-row", dataset: { protocol: name } },
      h("span", {}, name),
      h("span", { class: "bar-track", "aria-hidden": "true" }, granted, denied),
      h("span", {}, `${v.granted} granted${v.denied ? `, ${v.denied} denied` : ""}`));
  }) : [h("p", { class: "empty" }, "Not used yet.")]));
}

// ---------------------------------------------------------------------------------------
// Unused tokens

async function loadUnused() {
  const days = Number($("unused-days").value) || 30;
  const answer = await api(`${API}/usage/unused${query({ days })}`);
  $("unused-empty").hidden = answer.tokens.length > 0;
  $("unused-table").tBodies[0].replaceChildren(...answer.tokens.map((t) => h("tr", { dataset: { token: t.id } },
    cell("Token", code(t.display)),
    cell("Kind", t.kind),
    cell("Scope", t.scope),
    cell("Created", when(t.created_at)),
    cell("Last used", when(t.last_used_at)),
    cell("Label", t.label || "—"),
    tokenActions(t),
  )));
  rendered("unused");
}

// ---------------------------------------------------------------------------------------
// Wiring

function wire() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("tabs").addEventListener("keydown", onTabKey);
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  for (const button of document.querySelectorAll("[data-refresh]")) {
    button.addEventListener("click", () => attempt(`load ${button.dataset.refresh}`, loaders[button.dataset.refresh]));
  }
  $("tokens-kind").addEventListener("change", () => attempt("load tokens", loadTokens));
  $("tokens-status").addEventListener("change", () => attempt("load tokens", loadTokens));

  $("create-open").addEventListener("click", () => openCreate());
  $("create-form").addEventListener("submit", submitCreate);
  $("create-cancel").addEventListener("click", () => $("create-dialog").close());
  $("create-camera").addEventListener("change", () => {
    document.querySelector('#create-form input[name="scope"][value="camera"]').checked = true;
  });
  for (const radio of document.querySelectorAll('#create-form input[name="expiry"]')) {
    radio.addEventListener("change", () => {
      const custom = radio.value === "custom" && radio.checked;
      $("create-expires-at").disabled = !custom;
      if (custom) $("create-expires-at").focus();
    });
  }

  $("secret-copy").addEventListener("click", () => copyField($("secret-token"), "Token"));
  $("secret-link-copy").addEventListener("click", () => copyField($("secret-link"), "Viewer link"));
  $("secret-rtsp-copy").addEventListener("click", () => copyField($("secret-rtsp"), "RTSP URL"));
  // Closing by any means wipes the secret, at once: the "close" event comes a task later,
  // so Done and Escape ("cancel") wipe before the dialog closes, and "close" once more.
  $("secret-done").addEventListener("click", () => { wipeSecret(); $("secret-dialog").close(); });
  $("secret-dialog").addEventListener("cancel", wipeSecret);
  $("secret-dialog").addEventListener("close", wipeSecret);

  $("edit-form").addEventListener("submit", submitEdit);
  $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
  $("edit-dialog").addEventListener("close", () => { editing = null; });
  for (const radio of document.querySelectorAll('#edit-form input[name="expiry"]')) {
    radio.addEventListener("change", () => {
      const custom = radio.value === "custom" && radio.checked;
      $("edit-expires-at").disabled = !custom;
      if (custom) $("edit-expires-at").focus();
    });
  }

  $("revoke-form").addEventListener("submit", confirmRevoke);
  $("revoke-cancel").addEventListener("click", () => $("revoke-dialog").close());
  $("rotate-form").addEventListener("submit", confirmRotate);
  $("rotate-cancel").addEventListener("click", () => $("rotate-dialog").close());
  for (const id of ["revoke-dialog", "rotate-dialog"]) {
    $(id).addEventListener("close", () => { pending = null; });
  }

  $("audit-hide-admin").addEventListener("change", () => attempt("load audit", () => loadAudit(true)));
  $("audit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt("load audit", () => loadAudit(true));
  });
  $("audit-more").addEventListener("click", () => attempt("load more audit", () => loadAudit(false)));
  $("export-jsonl").addEventListener("click", () => attempt("export", () => exportAudit("jsonl")));
  $("export-csv").addEventListener("click", () => attempt("export", () => exportAudit("csv")));

  $("usage-token").addEventListener("change", () => {
    data.usageToken = $("usage-token").value || null;
    attempt("load usage", loadUsage);
  });
  $("usage-span").addEventListener("change", () => { if (data.usageStats) drawChart(data.usageStats); });
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      if (studio.view === "usage" && data.usageStats && !$("usage-body").hidden) drawChart(data.usageStats);
    }, 150);
  });

  $("unused-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt("load unused", loadUnused);
  });
}

async function init() {
  wire();
  if (adminToken()) await start();
  else showLogin("");
  studio.ready = true;
}

init();
