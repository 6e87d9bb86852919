"""Headless Chromium drives the Token Studio (/studio) as a site admin on the LAN would.

The agent runs in one network namespace with testsrc cameras, Chromium in the other (see
test_browser_viewer.py). Each browser run is a fresh context, so each one logs in again with
the admin token made on the CLI. The page's own JavaScript runs under the agent's strict CSP;
the driver bypasses CSP only for its probes, so the CSP rules are also checked statically.
Screenshots go to test-artifacts/studio/ (the create-dialog one shows a live token).
"""

from __future__ import annotations

import calendar
import json
import re
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from agent.http import tls
from tests.conftest import remember
from tests.support.agent import NamespacedAgent
from tests.support.browser import artifact_path, chromium_available, run_in_browser
from tests.support.netns import NetnsPair, netns_pair

__all__ = ["netns_pair"]

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

# A tiny HTTP client run inside a namespace; the request comes on stdin so that no token
# appears in a command line.
HTTP_CLIENT = """
import json, sys, urllib.error, urllib.request
r = json.load(sys.stdin)
body = r["body"].encode() if r.get("body") is not None else None
req = urllib.request.Request(r["url"], data=body, method=r["method"], headers=r["headers"])
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        status, headers, data = resp.status, dict(resp.headers), resp.read()
except urllib.error.HTTPError as e:
    status, headers, data = e.code, dict(e.headers), e.read()
print(json.dumps({"status": status, "headers": headers, "body": data.decode("latin-1")}))
"""


class StudioAgent(NamespacedAgent):
    """The agent in its namespace, an admin token, and HTTP from either side."""

    def __init__(self, pair: NetnsPair, tmp: Path, **extra: Any) -> None:
        super().__init__(pair, tmp, [
            {"id": "lobby", "name": "Lobby", "source": "testsrc://?size=640x360&fps=15",
             "always_on": True},
            {"id": "yard", "name": "Yard", "source": "testsrc://?size=320x240&fps=15"},
        ], audit={"flush_interval": 0.1}, **extra)
        created = self.cli("token", "create", "--admin", "--label", "studio test", "--json")
        assert created.returncode == 0, created.stderr
        admin = json.loads(created.stdout)
        self.admin_token: str = admin["token"]
        self.admin_id: str = admin["id"]

    def http(self, method: str, path: str, token: str | None = None, body: str | None = None,
             content_type: str = "application/json", ns: str = "viewer") -> dict[str, Any]:
        """One request from ``ns`` (default: the viewer side, like a LAN client)."""
        headers = {"Content-Type": content_type} if body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = {"url": self.base + path, "method": method, "headers": headers, "body": body}
        done = self.pair.run(ns, [sys.executable, "-c", HTTP_CLIENT], input=json.dumps(request),
                             capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        answer = self.http(method, "/api/v1/admin" + path, self.admin_token,
                           None if body is None else json.dumps(body))
        assert answer["status"] < 300, answer
        return json.loads(answer["body"])



@pytest.fixture
def agent(netns_pair: NetnsPair, tmp_path: Path):
    process = StudioAgent(netns_pair, tmp_path)
    yield process
    process.stop()


def studio(agent: StudioAgent, body: str, shot: str | None, *, timeout: float = 40,
           viewport: tuple[int, int] | None = None, chromium_args: tuple[str, ...] = ()) -> Any:
    """Open /studio, run ``body`` (the inside of an async JS function, with the helpers
    below in scope) and return its value; the screenshot is of the page after ``body``."""
    script = "async () => {\n" + JS_HELPERS.replace("%ADMIN%", json.dumps(agent.admin_token)) \
        + body + "\n}"
    path = artifact_path("studio", shot) if shot else None
    report = run_in_browser(agent.pair, f"{agent.base}/studio", result=script, wait_for="true",
                            screenshot=path, timeout=timeout, viewport=viewport,
                            chromium_args=chromium_args)
    assert not report.page_errors, report.page_errors
    # Chromium logs every 4xx answer as "Failed to load resource"; those are expected here.
    assert not [c for c in report.console if c.startswith("error")
                and "Failed to load resource" not in c], report.console
    if path is not None:
        assert path.stat().st_size > 5_000
    remember(json.dumps(report.result))  # the leak check then looks for these tokens too
    return report.result


# Helpers for the scripts: real clicks (element.click()), form submits, waits on the state
# the page exposes in window.__studio.
JS_HELPERS = r"""
const ADMIN = %ADMIN%;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (what, f, ms = 15000) => {
  const end = Date.now() + ms;
  for (;;) {
    let v; try { v = f(); } catch (e) { v = undefined; }
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; studio=` +
                                          JSON.stringify(window.__studio));
    await sleep(50);
  }
};
const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => [...document.querySelectorAll(sel)];
const click = (target) => {
  const el = typeof target === "string" ? $(target) : target;
  if (!el) throw new Error(`nothing to click: ${target}`);
  el.click();
};
const fill = (sel, value) => {
  const el = $(sel);
  el.value = value;
  el.dispatchEvent(new Event("input", { bubbles: true }));
  el.dispatchEvent(new Event("change", { bubbles: true }));
};
const rendered = (view) => window.__studio.rendered[view] || 0;
const text = (el) => (el ? el.textContent.replace(/\s+/g, " ").trim() : null);
const login = async (token = ADMIN) => {
  await until("the page", () => window.__studio.ready);
  const before = rendered("tokens");
  fill("#login-token", token);
  $("#login-form").requestSubmit();
  await until("login", () => (window.__studio.loggedIn && rendered("tokens") > before)
                             || window.__studio.loginMessage);
};
const openTab = async (view) => {
  const before = rendered(view);
  click(`#tab-${view}`);
  await until(`the ${view} view`, () => settled(view, before));
};
const rowText = (tr) => (tr ? [...tr.cells].map(text).join(" | ") : null);
const rowTexts = (table) => $$(`#${table} tbody tr`).map(rowText);
const idle = () => !window.__studio.loading;
const settled = (view, before) => rendered(view) > before && idle();
const auditRows = () => $$("#audit-table tbody tr").map((tr) => ({ event: tr.dataset.event,
                                                                 text: rowText(tr) }));
const inOrder = (list, cmp) => list.every((x, i) => !i || cmp(list[i - 1], x));
const createCameraToken = async (camera, label) => {
  await openTab("cameras");
  click(`#cameras-table tr[data-camera="${camera}"] button`);
  await until("the create dialog", () => $("#create-dialog").open);
  click('#create-form input[name="protocol"][value="webrtc"]');
  click('#create-form input[name="expiry"][value="1d"]');
  fill("#create-label", label);
  const before = window.__studio.lastCreatedId;
  click("#create-submit");
  await until("the new token", () => $("#secret-dialog").open
                                     && window.__studio.lastCreatedId !== before);
  return { token: $("#secret-token").value, link: $("#secret-link").value,
           rtsp: $("#secret-rtsp").value, id: window.__studio.lastCreatedId,
           summary: text($("#secret-summary")),
           focused: document.activeElement.id };
};
"""


def test_studio_files_keep_to_the_csp() -> None:
    """No inline script or handler, no eval, no outside asset, no cookie, no innerHTML."""
    static = resources.files("agent.http").joinpath("static")
    html = static.joinpath("studio.html").read_text(encoding="utf-8")
    js = static.joinpath("studio.js").read_text(encoding="utf-8")
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts == [(' src="/studio.js"', "")]
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    for banned in ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML",
                   "document.cookie", "localStorage", "document.write", "setTimeout(\"",
                   "import("):
        assert banned not in js, banned


def test_wrong_tokens_get_the_servers_message(agent: StudioAgent) -> None:
    access = json.loads(agent.cli("token", "create", "--host", "--json").stdout)["token"]
    expected = {}
    for name, token in (("malformed", "trk_not-a-token"), ("access", access)):
        answer = agent.http("GET", "/api/v1/admin/hosts", token)
        assert answer["status"] in (401, 403)
        expected[name] = json.loads(answer["body"])["message"]
    result = studio(agent, f"""
      const out = {{}};
      await login("trk_not-a-token");
      out.malformed = text($("#login-message"));
      out.afterMalformed = {{ loggedIn: window.__studio.loggedIn, main: !$("#main").hidden,
                             stored: sessionStorage.length, field: $("#login-token").value }};
      await login({json.dumps(access)});
      await until("the second message", () => text($("#login-message")));
      out.access = text($("#login-message"));
      out.stored = sessionStorage.length;
      return out;""", "login-wrong-token.png")
    assert result["malformed"] == expected["malformed"]
    assert result["malformed"].startswith("This is not a TheRelay token")
    assert result["afterMalformed"] == {"loggedIn": False, "main": False, "stored": 0, "field": ""}
    assert result["access"] == expected["access"]  # 403 wrong_kind: an access token
    assert "admin token (trk_)" in result["access"]
    assert result["stored"] == 0


def test_create_revoke_and_audit_a_camera_token(agent: StudioAgent) -> None:
    # The Studio serves itself with the strict CSP.
    page = agent.http("GET", "/studio")
    assert page["status"] == 200
    assert "script-src" not in page["headers"]["Content-Security-Policy"]
    assert page["headers"]["Content-Security-Policy"].startswith("default-src 'self'")

    # 1. Log in, look at the tokens, hosts and cameras.
    seen = studio(agent, """
      await login();
      const out = { view: window.__studio.view, tokens: rowTexts("tokens-table"),
                    who: text($("#who")),
                    stored: sessionStorage.getItem("therelay.studio.admin") === ADMIN,
                    cookie: document.cookie, url: location.href,
                    selectedTab: $('[role="tab"][aria-selected="true"]').id };
      await openTab("hosts");
      out.hosts = rowTexts("hosts-table");
      for (let i = 0; i < 20; i += 1) {  // until the testsrc camera reports its format
        await openTab("cameras");
        if (text($('#cameras-table tr[data-camera="lobby"]')).includes("online")) break;
        await sleep(500);
      }
      out.cameras = rowTexts("cameras-table");
      out.createButtons = $$("#cameras-table button").map(text);
      out.html = document.documentElement.outerHTML.includes(ADMIN);
      return out;""", "cameras.png")
    assert seen["view"] == "tokens" and seen["selectedTab"] == "tab-tokens"
    assert seen["stored"] and seen["cookie"] == "" and seen["url"].endswith("/studio#tokens")
    assert not seen["html"], "the admin token is in the DOM"
    assert seen["who"] == f"host site1 · account acme · admin token {agent.admin_id}"
    assert len(seen["tokens"]) == 1 and f"trk_{agent.admin_id}…" in seen["tokens"][0]
    assert "admin" in seen["tokens"][0] and "studio test" in seen["tokens"][0]
    assert seen["hosts"][0].startswith("site1 | acme | ")
    lobby = next(row for row in seen["cameras"] if row.startswith("Lobby lobby |"))
    assert "online" in lobby and "h264" in lobby.lower() and "640×360" in lobby
    assert "webrtc 0 · rtsp 0 · hls 0 · snapshot 0" in lobby
    assert seen["createButtons"] == ["Create token for this camera"] * 2

    # 2. Create a camera token; the dialog shows it once (screenshot with the dialog open).
    shown = studio(agent, """
      await login();
      return await createCameraToken("lobby", "front desk tablet");""", "create-dialog-token.png")
    token, token_id = shown["token"], shown["id"]
    assert re.fullmatch(r"tra_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}", token)
    assert token.startswith(f"tra_{token_id}_")
    assert shown["link"] == f"{agent.base}/#token={token}"
    assert shown["rtsp"] == ""  # a webrtc-only token gets no RTSP URL
    assert shown["focused"] == "secret-token"
    assert "scope camera:lobby" in shown["summary"] and "protocols webrtc" in shown["summary"]
    details = json.loads(agent.cli("token", "show", token_id, "--json").stdout)
    assert details["scope"] == "camera:lobby" and details["protocols"] == ["webrtc"]
    assert details["label"] == "front desk tablet"
    assert details["created_by"] == f"admin:{agent.admin_id}"
    expires = calendar.timegm(time.strptime(details["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(expires - (time.time() + 86400)) < 120
    requests = (("--camera", "lobby"), ("--camera", "yard"),
                ("--camera", "lobby", "--protocol", "rtsp"))
    checks = {args: agent.cli("token", "check", token, *args) for args in requests}
    assert checks[("--camera", "lobby")].returncode == 0
    assert "scope_mismatch" in checks[("--camera", "yard")].stdout
    assert "protocol_not_allowed" in checks[("--camera", "lobby", "--protocol", "rtsp")].stdout

    # 3. The whole flow in one page: create, close (the token is gone), revoke, audit.
    flow = studio(agent, """
      await login();
      const out = {};
      const made = await createCameraToken("lobby", "guard booth");
      out.token = made.token; out.id = made.id;
      out.inDialog = $("#secret-token").value === made.token;
      click("#secret-done");
      await until("the dialog to close", () => !$("#secret-dialog").open);
      // Anywhere the page could still hold it: the DOM, form values, storage, test state.
      const places = () => ({ html: document.documentElement.outerHTML,
        values: $$("input, textarea, select").map((e) => e.value).join("\\n"),
        studio: JSON.stringify(window.__studio), storage: JSON.stringify({ ...sessionStorage }),
        url: location.href, title: document.title });
      const secretPart = made.token.slice(17);  // the secret part alone must be gone too
      const leftIn = () => Object.entries(places())
        .filter(([, v]) => v.includes(made.token) || v.includes(secretPart)).map(([k]) => k);
      out.leftInPage = leftIn();
      out.secretInputs = [$("#secret-token").value, $("#secret-link").value];
      await openTab("tokens");
      const row = () => $(`#tokens-table tr[data-token="${made.id}"]`);
      out.rowBefore = rowText(row());
      click(row().querySelector("button[data-revoke]"));
      await until("the confirmation", () => $("#revoke-dialog").open);
      out.confirmText = text($("#revoke-text"));
      out.confirmFocus = document.activeElement.id;
      click("#revoke-confirm");
      await until("the revoked row", () => window.__studio.lastRevokedId === made.id
                                          && text(row()).includes("revoked"));
      out.rowAfter = rowText(row());
      out.revokeButtons = row().querySelectorAll("button[data-revoke]").length;
      out.status = text($("#status"));
      await openTab("audit");
      fill("#audit-token", made.id);
      const before = rendered("audit");
      $("#audit-form").requestSubmit();
      await until("the filtered audit", () => rendered("audit") > before);
      out.audit = auditRows();
      out.leftInPage.push(...leftIn());
      out.errors = window.__studio.errors;
      return out;""", "audit.png")
    token, token_id = flow["token"], flow["id"]
    assert flow["inDialog"] and flow["leftInPage"] == [], "the new token stayed in the page"
    assert flow["secretInputs"] == ["", ""]
    assert "active" in flow["rowBefore"] and "guard booth" in flow["rowBefore"]
    assert f"tra_{token_id}…{token[-4:]}" in flow["rowBefore"]
    assert "cannot be restored" in flow["confirmText"] and flow["confirmFocus"] == "revoke-cancel"
    assert "revoked" in flow["rowAfter"] and flow["revokeButtons"] == 0
    assert flow["status"].startswith("Revoked tra_")
    events = [e["event"] for e in flow["audit"]]
    assert events[:2] == ["token.revoked", "token.created"]  # newest first
    revoked = flow["audit"][0]["text"]
    assert token_id in revoked and f"admin:{agent.admin_id}" in revoked
    assert flow["errors"] == []

    # 4. The revoked token is refused, and the refusal is in the audit log with its reason.
    whep = agent.http("POST", "/whep/lobby", token, "v=0\r\n", "application/sdp")
    assert whep["status"] == 401 and json.loads(whep["body"])["error"] == "revoked"
    check = agent.cli("token", "check", token, "--camera", "lobby")
    assert check.returncode == 1 and check.stdout.startswith("denied: revoked")
    deadline = time.monotonic() + 10
    while not agent.admin("GET", f"/audit?token={token_id}&result=denied")["entries"]:
        assert time.monotonic() < deadline, "the denial never reached the audit log"
        time.sleep(0.2)

    denied = studio(agent, f"""
      await login();
      await openTab("audit");
      fill("#audit-token", {json.dumps(token_id)});
      fill("#audit-result", "denied");
      const before = rendered("audit");
      $("#audit-form").requestSubmit();
      await until("the denial", () => rendered("audit") > before);
      return auditRows();
      """, "audit-denied.png")
    assert len(denied) == 1 and denied[0]["event"] == "access.denied"
    assert "denied: revoked" in denied[0]["text"]
    assert "lobby" in denied[0]["text"] and "webrtc" in denied[0]["text"]
    assert agent.pair.viewer_ip in denied[0]["text"]

    # 5. The token list afterwards: display forms only, never a token (screenshot).
    listed = studio(agent, f"""
      await login();
      const shown = {json.dumps([shown["token"], token])};
      const html = document.documentElement.outerHTML;
      fill("#tokens-status", "revoked");
      await until("the revoked filter", () => rowTexts("tokens-table").length === 1);
      const revokedOnly = rowTexts("tokens-table");
      fill("#tokens-status", "");
      await until("all tokens", () => rowTexts("tokens-table").length === 3 && idle());
      return {{ rows: rowTexts("tokens-table"), revokedOnly,
               leaked: shown.some((t) => html.includes(t) || html.includes(t.slice(17))) }};
      """, "tokens.png")
    assert not listed["leaked"]
    assert len(listed["rows"]) == 3 and len(listed["revokedOnly"]) == 1
    assert token_id in listed["revokedOnly"][0]


def test_usage_export_and_unused(agent: StudioAgent) -> None:
    made = json.loads(agent.cli("token", "create", "--host", "--protocol", "snapshot",
                                "--label", "nvr snapshots", "--json").stdout)
    token, token_id = made["token"], made["id"]
    for _ in range(3):
        assert agent.http("GET", "/snapshot/lobby.jpg", token)["status"] in (200, 503)
    assert agent.http("POST", "/whep/lobby", token, "v=0\r\n", "application/sdp")["status"] == 403
    deadline = time.monotonic() + 10
    while agent.admin("GET", f"/tokens/{token_id}/usage")["uses"] < 3:
        assert time.monotonic() < deadline, "usage was never counted"
        time.sleep(0.2)

    result = studio(agent, f"""
      await login();
      const id = {json.dumps(token_id)};
      const out = {{}};
      await openTab("unused");
      out.unusedEmpty = !$("#unused-empty").hidden;
      // More than a page of audit entries (each admin request is one), then page through.
      for (let i = 0; i < 120; i += 1) {{
        await fetch("/api/v1/admin/hosts", {{ headers: {{ Authorization: `Bearer ${{ADMIN}}` }} }});
      }}
      await sleep(600);  // the agent writes its audit batches every 0.1 s here
      await openTab("audit");
      const show = async () => {{
        const n = rendered("audit");
        $("#audit-form").requestSubmit();
        await until("the audit page", () => settled("audit", n));
      }};
      click("#audit-hide-admin");  // show the Studio's own requests too
      await until("all entries", () => rowTexts("audit-table").length === 100 && idle());
      fill("#audit-order", "oldest");
      await show();
      const seqs = () => $$("#audit-table tbody tr").map((tr) => Number(tr.dataset.seq));
      out.oldest = {{ rows: seqs().length, first: seqs()[0], more: !$("#audit-more").hidden }};
      let n = rendered("audit");
      click("#audit-more");
      await until("more entries", () => settled("audit", n));
      out.oldestMore = {{ rows: seqs().length, ascending: inOrder(seqs(), (a, b) => a < b) }};
      fill("#audit-order", "newest");
      await show();
      out.newest = {{ rows: seqs().length, descending: inOrder(seqs(), (a, b) => a > b),
                      first: seqs()[0], more: !$("#audit-more").hidden }};
      n = rendered("audit");
      click("#audit-more");
      await until("older entries", () => settled("audit", n));
      out.newestMore = {{ rows: seqs().length, descending: inOrder(seqs(), (a, b) => a > b) }};
      click("#audit-hide-admin");
      await until("the filtered audit", () => rowTexts("audit-table").length < 100 && idle());
      out.hidden = rowTexts("audit-table").filter((row) => row.includes("| admin |")
                                                          && row.includes("granted")).length;
      click("#export-csv");
      await until("the CSV export", () => window.__studio.lastExport);
      out.exportCsv = window.__studio.lastExport;
      window.__studio.lastExport = null;
      click("#export-jsonl");
      await until("the JSONL export", () => window.__studio.lastExport);
      out.exportJsonl = window.__studio.lastExport;
      await openTab("tokens");
      const before = rendered("usage");
      click($(`#tokens-table tr[data-token="${{id}}"]`).querySelector("button"));
      await until("the usage view", () => settled("usage", before));
      out.view = window.__studio.view;
      out.usage = window.__studio.usage;
      out.stats = $$("#usage-body .stat").map(text);
      out.bars = $$("#usage-chart svg rect").length;
      out.chartLabel = text($("#usage-chart desc"));
      out.protocols = $$("#usage-protocols .bar-row").map(
        (r) => [...r.children].map(text).filter(Boolean).join(" | "));
      out.ips = rowTexts("usage-ips");
      fill("#usage-span", "day");
      out.dayBars = $$("#usage-chart svg rect").length;
      out.focus = document.activeElement.id;
      return out;""", "usage.png")
    assert result["unusedEmpty"]  # everything here was created a moment ago
    assert result["oldest"] == {"rows": 100, "first": 1, "more": True}
    assert result["oldestMore"]["rows"] > 120 and result["oldestMore"]["ascending"]
    assert result["newest"]["rows"] == 100 and result["newest"]["descending"]
    assert result["newest"]["first"] >= result["oldestMore"]["rows"] and result["newest"]["more"]
    assert result["newestMore"]["rows"] > 120 and result["newestMore"]["descending"]
    assert result["hidden"] == 0
    assert result["exportCsv"]["format"] == "csv" and result["exportCsv"]["bytes"] > 100
    assert result["exportJsonl"]["format"] == "jsonl" and result["exportJsonl"]["bytes"] > 100
    assert result["view"] == "usage" and result["focus"] == "tab-usage"
    assert result["usage"] == {"token": token_id, "uses": 3, "denied": 1, "ips": 1}
    assert result["bars"] >= 2 and result["dayBars"] >= 2  # granted and denied in one hour
    assert "3 granted, 1 denied" in result["chartLabel"]
    assert result["protocols"] == ["snapshot | 3 granted", "webrtc | 0 granted, 1 denied"]
    assert result["ips"][0].startswith(f"{agent.pair.viewer_ip} | 4 | ")


def test_studio_on_a_phone_and_by_keyboard(agent: StudioAgent) -> None:
    result = studio(agent, """
      await login();
      const out = {};
      const fits = () => document.documentElement.scrollWidth <= window.innerWidth;
      out.width = window.innerWidth;
      out.tokensFit = fits();
      out.cardCells = getComputedStyle($("#tokens-table tbody td")).display;
      // Arrow keys move between tabs (one tab stop for the tab list).
      $("#tab-tokens").focus();
      const before = rendered("audit");
      $("#tab-tokens").dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight",
                                                                    bubbles: true }));
      await until("the audit tab", () => settled("audit", before));
      out.afterArrow = { view: window.__studio.view, focus: document.activeElement.id,
                         tabStops: $$('[role="tab"]').filter((t) => t.tabIndex === 0)
                                                       .map((t) => t.id) };
      out.auditFit = fits();
      await openTab("cameras");
      out.camerasFit = fits();
      // Every control has a name; every clickable thing is a button, link or input.
      const controls = $$("input, select, button").filter((e) => e.type !== "hidden");
      const named = (e) => (e.labels && e.labels.length) || e.getAttribute("aria-label") || text(e);
      out.unnamed = controls.filter((e) => !named(e)).map((e) => e.id || e.outerHTML.slice(0, 60));
      out.divButtons = $$("div[onclick], span[onclick], [role=button]").length;
      click('#cameras-table tr[data-camera="yard"] button');
      await until("the create dialog", () => $("#create-dialog").open);
      const box = $("#create-dialog").getBoundingClientRect();
      out.dialog = { left: box.left, right: box.right, height: box.height,
                     inner: window.innerHeight };
      out.cameraChosen = $("#create-camera").value;
      out.dialogFocus = document.activeElement.id;
      return out;""", "phone-create-dialog.png", viewport=(390, 844))
    assert result["width"] == 390
    assert result["tokensFit"] and result["auditFit"] and result["camerasFit"]
    assert result["cardCells"] == "grid"
    assert result["afterArrow"] == {"view": "audit", "focus": "tab-audit",
                                    "tabStops": ["tab-audit"]}
    assert result["unnamed"] == [] and result["divButtons"] == 0
    assert result["dialog"]["left"] >= 0 and result["dialog"]["right"] <= 390
    assert result["dialog"]["height"] <= result["dialog"]["inner"]
    assert result["cameraChosen"] == "yard" and result["dialogFocus"] == "create-camera"

    tokens = studio(agent, "await login(); return rowTexts('tokens-table');", "phone-tokens.png",
                    viewport=(390, 844))
    assert len(tokens) == 1
    audit = studio(agent, """
      await login();
      await openTab("audit");
      return { rows: rowTexts("audit-table").length,
               fits: document.documentElement.scrollWidth <= window.innerWidth };""",
                   "phone-audit.png", viewport=(390, 844))
    assert audit["rows"] > 0 and audit["fits"]
    usage = studio(agent, f"""
      await login();
      const before = rendered("usage");
      click($('#tokens-table tr[data-token="{agent.admin_id}"] button'));
      await until("the usage view", () => settled("usage", before));
      const svg = $("#usage-chart svg");
      return {{ svgWidth: svg.getBoundingClientRect().width, uses: window.__studio.usage.uses,
                fits: document.documentElement.scrollWidth <= window.innerWidth }};""",
                   "phone-usage.png", viewport=(390, 844))
    assert usage["fits"] and usage["uses"] > 0 and 280 <= usage["svgWidth"] <= 360


def test_logout_and_a_revoked_admin_token_end_the_session(agent: StudioAgent) -> None:
    result = studio(agent, """
      await login();
      click("#logout");
      await until("the login form", () => !$("#login").hidden);
      const out = { stored: sessionStorage.length, loggedIn: window.__studio.loggedIn,
                    rows: $$("main tbody tr").length, status: text($("#status")),
                    focus: document.activeElement.id };
      // Log in again and revoke the Studio's own admin token: the next call gets 401, and
      // the page goes back to the login form with the server's message.
      await login();
      click(`#tokens-table tr[data-token="${ADMIN.split("_")[1]}"] button[data-revoke]`);
      await until("the confirmation", () => $("#revoke-dialog").open);
      click("#revoke-confirm");
      await until("the login form", () => !$("#login").hidden);
      out.after = { stored: sessionStorage.length, loggedIn: window.__studio.loggedIn,
                    message: text($("#login-message")), rows: $$("main tbody tr").length,
                    dialogs: $$("dialog[open]").length };
      return out;""", "login-after-revoke.png")
    assert result.pop("after") == {
        "stored": 0, "loggedIn": False, "rows": 0, "dialogs": 0,
        "message": "The token was revoked. Ask for a new token (tokens cannot be un-revoked)."}
    assert result == {"stored": 0, "loggedIn": False, "rows": 0, "focus": "login-token",
                      "status": "Logged out. The admin token was removed from this tab."}


def test_rotate_with_a_grace_period(agent: StudioAgent) -> None:
    old = json.loads(agent.cli("token", "create", "--camera", "yard", "--ttl", "1w",
                               "--label", "yard monitor", "--json").stdout)
    result = studio(agent, f"""
      await login();
      const oldId = {json.dumps(old["id"])};
      const row = (id) => $(`#tokens-table tr[data-token="${{id}}"]`);
      click([...row(oldId).querySelectorAll("button")].find((b) => text(b) === "Rotate"));
      await until("the rotate dialog", () => $("#rotate-dialog").open);
      fill("#rotate-grace", "1h");
      click("#rotate-confirm");
      await until("the new token", () => $("#secret-dialog").open);
      const out = {{ token: $("#secret-token").value, title: text($("#secret-title")),
                    id: window.__studio.lastCreatedId, rotated: window.__studio.lastRotatedId,
                    rtsp: $("#secret-rtsp").value, rtspShown: !$("#secret-rtsp-field").hidden }};
      $("#secret-dialog").dispatchEvent(new Event("cancel"));  // as Escape does
      $("#secret-dialog").close();
      out.wiped = $("#secret-token").value === "" && $("#secret-link").value === ""
                  && $("#secret-rtsp").value === "";
      await until("the new row", () => row(out.id) && idle());
      out.oldRow = rowText(row(oldId));
      out.newRow = rowText(row(out.id));
      return out;""", "rotated.png")
    new_token = result["token"]
    assert result["title"] == "Token rotated — the new token" and result["wiped"]
    assert result["rotated"] == old["id"] and new_token.startswith(f"tra_{result['id']}_")
    # every protocol, so also a ready RTSP URL: the token as the Basic password
    assert result["rtspShown"] and result["rtsp"] == (
        f"rtsp://token:{new_token}@{agent.pair.agent_ip}:8554/yard")
    assert f"replaced by {result['id']}" in result["oldRow"] and "active" in result["oldRow"]
    assert f"replaces {old['id']}" in result["newRow"] and "yard monitor" in result["newRow"]
    for token in (old["token"], new_token):  # the old one keeps working for the grace hour
        assert agent.cli("token", "check", token, "--camera", "yard").returncode == 0


def test_edit_a_token_and_its_session_cap(agent: StudioAgent) -> None:
    old = json.loads(agent.cli("token", "create", "--camera", "yard", "--protocol",
                               "webrtc,snapshot", "--ttl", "1w", "--label", "yard monitor",
                               "--json").stdout)
    result = studio(agent, f"""
      await login();
      const id = {json.dumps(old["id"])};
      const row = () => $(`#tokens-table tr[data-token="${{id}}"]`);
      const out = {{}};
      click(row().querySelector("button[data-edit]"));
      await until("the edit dialog", () => $("#edit-dialog").open);
      out.opened = {{ title: text($("#edit-title")), scope: text($("#edit-scope")),
                     label: $("#edit-label").value, focus: document.activeElement.id,
                     protocols: $$('#edit-form input[name="protocol"]:checked').map((i) => i.value),
                     cap: $("#edit-max-sessions").value }};
      click("#edit-submit");  // nothing changed yet: said so, nothing sent
      await until("the message", () => text($("#edit-error")));
      out.unchanged = text($("#edit-error"));
      fill("#edit-max-sessions", "0");
      click("#edit-submit");
      await until("the cap message", () => text($("#edit-error")) !== out.unchanged);
      out.badCap = text($("#edit-error"));
      fill("#edit-label", "yard monitor (gate)");
      click('#edit-form input[name="protocol"][value="webrtc"]');
      click('#edit-form input[name="expiry"][value="never"]');
      fill("#edit-max-sessions", "2");
      click("#edit-submit");
      await until("the update", () => window.__studio.lastUpdatedId === id
                                      && !$("#edit-dialog").open && idle());
      await until("the new row", () => rowText(row()).includes("gate"));
      out.row = rowText(row());
      out.status = text($("#status"));
      out.errors = window.__studio.errors.map((e) => e.action);
      return out;""", "edited.png")
    assert result["opened"] == {
        "title": f"Edit {old['display']}", "label": "yard monitor", "focus": "edit-label",
        "protocols": ["webrtc", "snapshot"], "cap": "",
        "scope": "Scope camera:yard (a scope cannot change: create a new token for another "
                 "scope, or rotate this one to replace its secret)."}
    assert result["unchanged"] == "Nothing was changed."
    assert result["badCap"].startswith("Live sessions at once: a whole number from 1 to 10000")
    assert "yard monitor (gate)" in result["row"] and "at most 2 live sessions" in result["row"]
    assert "| snapshot" in result["row"]
    assert result["status"].startswith(f"Updated {old['display']}")
    assert result["errors"] == ["edit", "edit"]  # the two refused in the page, none by the API
    shown = json.loads(agent.cli("token", "show", old["id"], "--json").stdout)
    assert (shown["label"], shown["protocols"], shown["expires_at"], shown["max_sessions"]) == (
        "yard monitor (gate)", ["snapshot"], None, 2)
    audit = json.loads(agent.cli("audit", "--json", "--token", old["id"], "--event",
                                 "token.updated").stdout)
    assert len(audit) == 1 and audit[0]["actor"] == f"admin:{agent.admin_id}"
    assert audit[0]["detail"]["before"]["protocols"] == ["snapshot", "webrtc"]
    assert audit[0]["detail"]["after"] == {"label": "yard monitor (gate)", "expires_at": None,
                                           "ttl_seconds": None, "protocols": ["snapshot"],
                                           "max_sessions": 2}


def test_the_hosts_view_shows_the_https_fingerprint(netns_pair: NetnsPair,
                                                    tmp_path: Path) -> None:
    agent = StudioAgent(netns_pair, tmp_path, tls={"self_signed": True})
    try:
        cert = tls.describe(*tls.self_signed_paths(agent.state_dir))
        result = studio(agent, """
          await login();
          await openTab("hosts");
          const el = $("#hosts-table [data-fingerprint]");
          return { fingerprint: el && el.dataset.fingerprint, row: rowTexts("hosts-table")[0],
                   origin: location.origin };""", "hosts-https.png",
                        chromium_args=(f"--ignore-certificate-errors-spki-list="
                                       f"{cert.spki_sha256}",))
    finally:
        agent.stop()
    assert result["origin"].startswith("https://")
    assert result["fingerprint"] == cert.fingerprint
    assert f"{cert.fingerprint}SHA-256 · self-signed · valid until " in result["row"]
