"""The admin API (/api/v1/admin/…), its OpenAPI document and /metrics, against the real daemon.

Every endpoint is called over loopback with admin tokens made by the CLI or by the API
itself. Statuses, error codes, fields and audit entries are checked exactly; times are
checked against the moments the test saw before and after the request.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiortc.mediastreams import MediaStreamError

from agent import __version__
from agent.access.model import Protocol, format_time, parse_time
from agent.access.policy import FIX, Reason
from agent.access.tokens import Kind, check, generate
from agent.http import openapi
from agent.http.admin import AUDIT_COLUMNS, AdminApi
from tests.conftest import TOKEN_RE, remember
from tests.support.agent import AgentProcess, WhepViewer

SRC = "testsrc://?size=320x240&fps=15"
API = "/api/v1/admin"
PROTOCOLS = sorted(p.value for p in Protocol)
_UNSET: Any = object()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    # The failure limiter is widened: this module sends a few dozen bad tokens on purpose and
    # must see their own reasons, not rate_limited (which has its own test below).
    process = asyncio.run(AgentProcess.start(tmp_path_factory.mktemp("admin"), [
        {"id": "cam1", "source": SRC},
        {"id": "cam2", "source": SRC},
    ], tokens={"failed_attempts": {"burst": 1000, "per_minute": 1000}}))
    yield process
    assert asyncio.run(process.stop()) == 0


@pytest.fixture(scope="module")
def admin(agent: AgentProcess) -> tuple[str, str]:
    """(id, token) of an admin token made on the CLI, as an installer would."""
    return asyncio.run(agent.token("--admin", "--label", "test admin"))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)

    def error(self, status: int, code: str) -> str:
        """Assert a JSON error answer; returns its message."""
        assert self.status == status, self.text
        assert self.headers["Content-Type"].startswith("application/json")
        body = self.json
        assert body["error"] == code, body
        assert isinstance(body["message"], str) and body["message"]
        return str(body["message"])


async def call(agent: AgentProcess, method: str, path: str, token: str | None = None, *,
               body: Any = _UNSET, data: str | bytes | None = None,
               params: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> Answer:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if body is not _UNSET:
        data = json.dumps(body)
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as http, http.request(
            method, agent.base + path, data=data, params=params, headers=sent) as response:
        text = await response.text()
    remember(text)  # a new token in an answer joins the session-wide leak check
    return Answer(response.status, dict(response.headers), text)


async def create(agent: AgentProcess, admin_token: str, **fields: Any) -> dict[str, Any]:
    answer = await call(agent, "POST", f"{API}/tokens", admin_token, body=fields)
    assert answer.status == 201, answer.text
    created: dict[str, Any] = answer.json
    return created


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """``probe()`` until it returns something true (the audit log is written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s: last {result!r}")
        await asyncio.sleep(0.05)


async def audit(agent: AgentProcess, admin_token: str, **params: str) -> list[dict[str, Any]]:
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"limit": "1000", **params})
    assert answer.status == 200, answer.text
    entries: list[dict[str, Any]] = answer.json["entries"]
    return entries


def epoch(text: str) -> float:
    return parse_time(text)


def backdate(agent: AgentProcess, token_id: str, created_at: float) -> None:
    """Pretend a token was created long ago (the only way to test "unused for N days")."""
    with sqlite3.connect(agent.env["THERELAY_STATE_DIR"] + "/agent.db", timeout=10) as db:
        changed = db.execute("UPDATE tokens SET created_at = ? WHERE id = ?",
                             (created_at, token_id)).rowcount
    assert changed == 1


async def ended(viewer: WhepViewer, timeout: float = 10.0) -> float:
    """Read frames until the agent ends the stream; returns the moment it did."""
    track = viewer.tracks["video"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(track.recv(), 0.1)
        except (MediaStreamError, TimeoutError):
            if viewer.pc.connectionState in ("closed", "failed") or track.readyState == "ended":
                return time.monotonic()
            continue
        if viewer.pc.connectionState in ("closed", "failed"):
            return time.monotonic()
    raise AssertionError("the agent never ended the session")


# -- who may use the admin API --------------------------------------------------------------


def _corrupt(token: str) -> str:
    return token[:30] + ("A" if token[30] != "A" else "B") + token[31:]


@pytest.mark.parametrize(("case", "status", "reason"), [
    ("missing", 401, "missing"),
    ("garbage", 401, "malformed"),
    ("corrupted admin", 401, "corrupted"),
    ("unknown admin", 401, "unknown"),
    ("access token", 403, "wrong_kind"),
    ("publisher token", 403, "wrong_kind"),
    ("revoked admin", 401, "revoked"),
    ("expired admin", 401, "expired"),
])
async def test_only_a_valid_admin_token_opens_the_admin_api(
        agent: AgentProcess, admin: tuple[str, str], case: str, status: int,
        reason: str) -> None:
    admin_id, admin_token = admin
    token_id: str | None = None
    token: str | None
    if case == "missing":
        token = None
    elif case == "garbage":
        token = "garbage"
    elif case == "corrupted admin":
        token = _corrupt(admin_token)
    elif case == "unknown admin":
        token = generate(Kind.ADMIN).text
        remember(token)
        token_id = token[4:16]
    elif case == "access token":
        token_id, token = (await agent.token("--host"))
    elif case == "publisher token":
        token = generate(Kind.PUBLISHER).text  # only the relay holds these
        remember(token)
        token_id = token[4:16]
    elif case == "revoked admin":
        made = await create(agent, admin_token, kind="admin")
        token_id, token = made["id"], made["token"]
        revoked = await call(agent, "POST", f"{API}/tokens/{token_id}/revoke", admin_token)
        assert revoked.status == 200
        # no wait: the API applies its own change before it answers
    else:
        made = await create(agent, admin_token, kind="admin", ttl="1s")
        token_id, token = made["id"], made["token"]
        assert (await call(agent, "GET", f"{API}/hosts", token)).status == 200
        await asyncio.sleep(1.2)
    started = time.time()
    for path in (f"{API}/tokens", f"{API}/audit", f"{API}/tokens/{admin_id}/revoke"):
        method = "POST" if path.endswith("/revoke") else "GET"
        answer = await call(agent, method, path, token)
        assert answer.error(status, reason) == FIX[Reason(reason)]
        if status == 401:
            error = "invalid_request" if reason == "missing" else "invalid_token"
            assert answer.headers["WWW-Authenticate"] == (
                f'Bearer realm="therelay-agent", error="{error}"')
        else:
            assert "WWW-Authenticate" not in answer.headers
    # the admin token the denied request tried to revoke is untouched
    assert (await call(agent, "GET", f"{API}/tokens/{admin_id}", admin_token)).json[
        "status"] == "active"

    async def denials() -> list[dict[str, Any]]:
        found = await audit(agent, admin_token, event="access.denied", reason=reason,
                            since=format_time(started - 1))
        return [e for e in found if e["protocol"] == "admin" and e["ts"] >= started]

    entries = await eventually(denials)
    # the first denial has its own entry; the others from that address for that reason
    # (and token) within audit.denial_window are counted in one more
    assert [e["detail"].get("count") for e in entries] == [None, 2]
    for entry in entries:
        assert entry["result"] == "denied" and entry["peer_ip"] == "127.0.0.1"
        assert entry["camera"] is None
        assert entry["token_id"] == token_id  # None when no id could be read


async def test_every_admin_action_is_audited_with_the_admin_as_actor(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, observer = admin
    actor_id, actor = await agent.token("--admin", "--label", "actor")
    made = await create(agent, actor, scope="camera:cam1", label="audited")
    assert made["created_by"] == f"admin:{actor_id}"
    other = await create(agent, actor)
    calls = [
        ("GET", f"{API}/tokens", 200),
        ("GET", f"{API}/tokens/{made['id']}", 200),
        ("GET", f"{API}/tokens/{made['id']}/usage", 200),
        ("POST", f"{API}/tokens/{made['id']}/rotate", 201),
        ("POST", f"{API}/tokens/{other['id']}/revoke", 200),
        ("GET", f"{API}/usage/unused", 200),
        ("GET", f"{API}/audit", 200),
        ("GET", f"{API}/cameras", 200),
        ("GET", f"{API}/hosts", 200),
    ]
    rotated_to = ""
    for method, path, expected in calls:
        answer = await call(agent, method, path, actor)
        assert answer.status == expected, (path, answer.text)
        if path.endswith("/rotate"):
            rotated_to = answer.json["id"]
            assert answer.json["created_by"] == f"admin:{actor_id}"

    expected = 1 + 2 + len(calls)  # its own creation, the two creations, every call above

    async def granted() -> list[dict[str, Any]]:
        found = await audit(agent, observer, token=actor_id)
        return found if len(found) >= expected else []

    entries = await eventually(granted)
    await asyncio.sleep(0.3)  # nothing more comes
    assert len(await audit(agent, observer, token=actor_id)) == expected
    assert entries[0]["event"] == "token.created" and entries[0]["actor"].startswith("cli:")
    requests = entries[1:]
    for entry in requests:
        assert entry["event"] == "access.granted" and entry["protocol"] == "admin"
        assert entry["reason"] == "granted" and entry["peer_ip"] == "127.0.0.1"
        assert entry["camera"] is None
    changes = {(e["event"], e["token_id"]): e
               for e in await audit(agent, observer, since=format_time(
                   entries[0]["ts"] - 1)) if e["event"].startswith("token.")}
    for key in [("token.created", made["id"]), ("token.created", other["id"]),
                ("token.rotated", made["id"]), ("token.created", rotated_to),
                ("token.revoked", other["id"])]:
        assert changes[key]["actor"] == f"admin:{actor_id}", key
    assert changes[("token.rotated", made["id"])]["detail"] == {
        "replaced_by": rotated_to, "grace_seconds": 0}


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, {"kind": "access", "scope": "host:site1", "protocols": ["all"], "label": "",
          "expires_at": None}),
    ({"scope": "host"}, {"kind": "access", "scope": "host:site1"}),
    ({"scope": "account", "label": "whole account"},
     {"kind": "access", "scope": "account:acme", "label": "whole account"}),
    ({"scope": "camera:cam1", "protocols": ["webrtc", "snapshot"], "ttl": "1h",
      "label": "door"},
     {"scope": "camera:cam1", "protocols": ["snapshot", "webrtc"], "label": "door"}),
    ({"expires_at": "2099-01-01T00:00Z"}, {"expires_at": "2099-01-01T00:00:00Z"}),
    ({"kind": "admin", "label": "ops"},
     {"kind": "admin", "scope": "host:site1", "protocols": ["all"], "label": "ops"}),
    ({"kind": "admin", "scope": "account"}, {"kind": "admin", "scope": "account:acme"}),
    ({"label": "x" * 200}, {"label": "x" * 200}),
])
async def test_create_token(agent: AgentProcess, admin: tuple[str, str],
                            fields: dict[str, Any], expected: dict[str, Any]) -> None:
    admin_id, admin_token = admin
    before = time.time()
    answer = await call(agent, "POST", f"{API}/tokens", admin_token, body=fields)
    after = time.time()
    assert answer.status == 201, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    made = answer.json
    for key, value in expected.items():
        assert made[key] == value, key
    token = made["token"]
    assert check(token) == made["id"]
    prefix = "trk" if made["kind"] == "admin" else "tra"
    assert token.startswith(f"{prefix}_")
    assert made["display"] == f"{prefix}_{made['id']}…{token[-4:]}"
    assert made["status"] == "active" and made["origin"] == "local"
    assert made["created_by"] == f"admin:{admin_id}"
    assert made["revoked_at"] is None and made["replaced_by"] is None
    assert made["replaces"] is None and made["last_used_at"] is None
    assert made["permission"] is None
    assert int(before) <= epoch(made["created_at"]) <= after
    if "ttl" in fields:
        assert int(before) + 3600 <= epoch(made["expires_at"]) <= after + 3600
    # shown once: the listing and the token's own page never carry it
    shown = await call(agent, "GET", f"{API}/tokens/{made['id']}", admin_token)
    assert shown.status == 200 and token not in shown.text and "token" not in shown.json
    assert shown.json == {k: v for k, v in made.items() if k != "token"}
    listed = await call(agent, "GET", f"{API}/tokens", admin_token)
    assert token not in listed.text and not TOKEN_RE.search(listed.text)


async def test_a_created_token_works_at_once(agent: AgentProcess,
                                            admin: tuple[str, str]) -> None:
    _, admin_token = admin
    snap = await create(agent, admin_token, scope="camera:cam1", protocols=["snapshot"])
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {snap['token']}"}
        async with http.get(f"{agent.base}/snapshot/cam1.jpg", headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            assert (await r.read())[:2] == b"\xff\xd8"
        async with http.get(f"{agent.base}/snapshot/cam2.jpg", headers=headers) as r:
            assert r.status == 403 and (await r.json())["error"] == "scope_mismatch"
        async with http.post(f"{agent.base}/whep/cam1", data="v=0\r\n", headers={
                **headers, "Content-Type": "application/sdp"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "protocol_not_allowed"
    host = await create(agent, admin_token, scope="host")
    listed = await call(agent, "GET", "/api/v1/cameras", host["token"])
    assert listed.status == 200
    assert [c["id"] for c in listed.json["cameras"]] == ["cam1", "cam2"]
    assert (await call(agent, "GET", f"{API}/hosts", host["token"])).error(
        403, "wrong_kind")
    new_admin = await create(agent, admin_token, kind="admin")
    hosts = await call(agent, "GET", f"{API}/hosts", new_admin["token"])
    assert hosts.status == 200 and hosts.json["hosts"][0]["rtsp_port"] == agent.rtsp_port
    assert (await call(agent, "GET", "/api/v1/cameras", new_admin["token"])).error(
        403, "wrong_kind")


@pytest.mark.parametrize(("body", "field"), [
    ({"scope": "site"}, "scope"),
    ({"scope": "host:site1"}, "scope"),
    ({"scope": "camera:"}, "scope"),
    ({"scope": "camera:no spaces"}, "scope"),
    ({"scope": 5}, "scope"),
    ({"protocols": ["ftp"]}, "protocols"),
    ({"protocols": ["webrtc", "admin"]}, "protocols"),
    ({"protocols": "webrtc"}, "protocols"),
    ({"protocols": [1]}, "protocols"),
    ({"ttl": "soon"}, "ttl"),
    ({"ttl": "0s"}, "ttl"),
    ({"ttl": 3600}, "ttl"),
    ({"ttl": "9" * 400 + "w"}, "ttl"),  # more than a float holds: was a 500
    ({"ttl": "9" * 31 + "w"}, "ttl"),
    ({"ttl": "99999999999w"}, "ttl"),  # past the year 9999: was stored, then every list 500
    ({"ttl": "36501d"}, "ttl"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_at": 1767225600}, "expires_at"),
    ({"expires_at": "9999-12-31T23:59:59-01:00"}, "expires_at"),  # the year 10000 in UTC
    ({"ttl": "1h", "expires_at": "2099-01-01T00:00Z"}, "give ttl or expires_at"),
    ({"label": "x" * 201}, "label"),
    ({"label": 5}, "label"),
    ({"label": None}, "label"),
    ({"kind": "publisher"}, "kind"),
    ({"kind": "root"}, "kind"),
    ([], "the body must be a JSON object"),
    ("host", "the body must be a JSON object"),
    (None, "the body must be a JSON object"),
])
async def test_create_rejects_each_bad_field_by_name(
        agent: AgentProcess, admin: tuple[str, str], body: Any, field: str) -> None:
    _, admin_token = admin
    count = len((await call(agent, "GET", f"{API}/tokens", admin_token)).json["tokens"])
    message = (await call(agent, "POST", f"{API}/tokens", admin_token, body=body)).error(
        400, "invalid_request")
    assert message.startswith(field), message
    after = len((await call(agent, "GET", f"{API}/tokens", admin_token)).json["tokens"])
    assert after == count  # nothing was stored


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"{", b"[" * 60_000,  # nested too deep for the parser: was a 500
    b"{\"label\": \"\xc3\x28\"}",  # not UTF-8
])
async def test_create_rejects_a_body_that_is_not_json(
        agent: AgentProcess, admin: tuple[str, str], raw: bytes) -> None:
    _, admin_token = admin
    answer = await call(agent, "POST", f"{API}/tokens", admin_token, data=raw,
                        headers={"Content-Type": "application/json"})
    assert answer.error(400, "invalid_request") == "the body must be a JSON object"


async def test_create_rejects_text_that_is_not_unicode(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    """A lone surrogate is valid JSON but not storable text (it was a 500)."""
    _, admin_token = admin
    for name in ("label", "ttl", "expires_at"):
        answer = await call(agent, "POST", f"{API}/tokens", admin_token,
                            data=f'{{"{name}": "a\\ud800b"}}')
        assert answer.error(400, "invalid_request").startswith(name)


@pytest.mark.parametrize("path", ["tokens", "tokens/{id}/rotate"])
async def test_a_long_duration_is_refused_at_once(
        agent: AgentProcess, admin: tuple[str, str], path: str) -> None:
    """parse_duration's regex backtracks quadratically: 60 kB of digits (under the body
    limit) held the event loop for about 100 s. The daemon's log (checked at stop, asyncio
    debug mode) would also show any step over 100 ms."""
    _, admin_token = admin
    target = await create(agent, admin_token)
    name = "ttl" if path == "tokens" else "grace"
    for text in ("1" * 60_000, "1" * 5_000 + "x", "1h" * 20):
        started = time.monotonic()
        answer = await call(agent, "POST", f"{API}/{path.format(id=target['id'])}",
                            admin_token, body={name: text})
        assert answer.error(400, "invalid_request").startswith(f"{name}: at most 32")
        assert time.monotonic() - started < 2.0  # unbounded, 60 kB took about 100 s
    assert (await call(agent, "GET", f"{API}/tokens/{target['id']}", admin_token)).json[
        "replaced_by"] is None


async def test_create_rejects_a_body_over_the_limit(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    answer = await call(agent, "POST", f"{API}/tokens", admin_token,
                        body={"label": "x" * 70_000})
    answer.error(413, "request_entity_too_large")


@pytest.mark.parametrize(("body", "words"), [
    ({"scope": "camera:nope"}, "'nope' does not exist"),
    ({"kind": "admin", "scope": "camera:cam1"}, "admin tokens are scoped"),
    ({"kind": "admin", "protocols": ["webrtc"]}, "only access tokens"),
    ({"expires_at": "2000-01-01T00:00Z"}, "in the past"),
])
async def test_create_refuses_what_the_store_refuses(
        agent: AgentProcess, admin: tuple[str, str], body: dict[str, Any],
        words: str) -> None:
    _, admin_token = admin
    answer = await call(agent, "POST", f"{API}/tokens", admin_token, body=body)
    assert words in answer.error(409, "refused")


async def test_token_limit_and_rate_limit(tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SRC}], tokens={
        "max_active": 2, "failed_attempts": {"burst": 2, "per_minute": 1}})
    try:
        _, admin_token = await agent.token("--admin")
        second = await create(agent, admin_token, scope="camera:cam1")
        answer = await call(agent, "POST", f"{API}/tokens", admin_token, body={})
        assert "tokens.max_active" in answer.error(409, "token_limit")
        # rotating replaces a token: it is not one more
        rotated = await call(agent, "POST", f"{API}/tokens/{second['id']}/rotate", admin_token)
        assert rotated.status == 201, rotated.text
        answer = await call(agent, "POST", f"{API}/tokens/{rotated.json['id']}/revoke",
                            admin_token)
        assert answer.status == 200
        assert (await call(agent, "POST", f"{API}/tokens", admin_token, body={})).status == 201
        # two failures are let through, then 429 with Retry-After; a valid token still works
        statuses = [(a.status, a.json["error"], a.headers.get("Retry-After")) for a in [
            await call(agent, "GET", f"{API}/hosts", "junk") for _ in range(4)]]
        assert statuses == [(401, "malformed", None)] * 2 + [(429, "rate_limited", "60")] * 2
        assert (await call(agent, "GET", f"{API}/hosts", admin_token)).status == 200
    finally:
        assert await agent.stop() == 0


async def test_list_tokens_with_filters(agent: AgentProcess, admin: tuple[str, str]) -> None:
    admin_id, admin_token = admin
    cam = await create(agent, admin_token, scope="camera:cam1", label="listed")
    gone = await create(agent, admin_token, scope="camera:cam2")
    assert (await call(agent, "POST", f"{API}/tokens/{gone['id']}/revoke",
                       admin_token)).status == 200

    async def listing(**params: str) -> list[dict[str, Any]]:
        answer = await call(agent, "GET", f"{API}/tokens", admin_token, params=params)
        assert answer.status == 200, answer.text
        tokens: list[dict[str, Any]] = answer.json["tokens"]
        return tokens

    everything = await listing()
    ids = [t["id"] for t in everything]
    assert {admin_id, cam["id"], gone["id"]} <= set(ids)
    assert len(ids) == len(set(ids))
    admins = await listing(kind="admin")
    assert admins and {t["kind"] for t in admins} == {"admin"}
    assert admin_id in [t["id"] for t in admins] and cam["id"] not in [t["id"] for t in admins]
    assert await listing(kind="publisher") == []
    revoked = await listing(status="revoked")
    assert {t["status"] for t in revoked} == {"revoked"}
    assert gone["id"] in [t["id"] for t in revoked]
    active = await listing(status="active")
    assert {t["status"] for t in active} == {"active"}
    assert cam["id"] in [t["id"] for t in active] and gone["id"] not in [t["id"] for t in active]
    on_cam1 = await listing(scope="camera:cam1")
    assert {t["scope"] for t in on_cam1} == {"camera:cam1"}
    assert cam["id"] in [t["id"] for t in on_cam1]
    both = await listing(scope="camera:cam2", status="revoked", kind="access")
    assert gone["id"] in [t["id"] for t in both]
    assert all(t["scope"] == "camera:cam2" and t["status"] == "revoked" for t in both)
    assert await listing(scope="camera:nope") == []
    for name in ("kind", "status"):
        answer = await call(agent, "GET", f"{API}/tokens", admin_token, params={name: "bogus"})
        assert answer.error(400, "invalid_request").startswith(name)


async def test_show_token_and_unknown_ids(agent: AgentProcess, admin: tuple[str, str]) -> None:
    admin_id, admin_token = admin
    shown = await call(agent, "GET", f"{API}/tokens/{admin_id}", admin_token)
    assert shown.status == 200
    assert shown.json["id"] == admin_id and shown.json["kind"] == "admin"
    assert shown.json["label"] == "test admin" and shown.json["created_by"].startswith("cli:")
    for token_id in ("AAAAAAAAAAAA", "nope", "A" * 13):
        for method, suffix in (("GET", ""), ("POST", "/revoke"), ("POST", "/rotate"),
                               ("GET", "/usage")):
            answer = await call(agent, method, f"{API}/tokens/{token_id}{suffix}", admin_token)
            assert "no token with id" in answer.error(404, "not_found"), (method, suffix)


async def test_revoke(agent: AgentProcess, admin: tuple[str, str]) -> None:
    admin_id, admin_token = admin
    made = await create(agent, admin_token, scope="camera:cam1", protocols=["snapshot"])
    url = f"{agent.base}/snapshot/cam1.jpg"
    headers = {"Authorization": f"Bearer {made['token']}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        assert r.status == 200
    before = time.time()
    answer = await call(agent, "POST", f"{API}/tokens/{made['id']}/revoke", admin_token)
    assert answer.status == 200, answer.text
    assert answer.json["status"] == "revoked" and answer.json["id"] == made["id"]
    assert int(before) <= epoch(answer.json["revoked_at"]) <= time.time()
    assert "token" not in answer.json
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        assert r.status == 401 and (await r.json())["error"] == "revoked"  # at once
    again = await call(agent, "POST", f"{API}/tokens/{made['id']}/revoke", admin_token)
    assert "already revoked" in again.error(409, "refused")
    shown = await call(agent, "GET", f"{API}/tokens/{made['id']}", admin_token)
    assert shown.json["revoked_at"] == answer.json["revoked_at"]
    (entry,) = await eventually(lambda: audit(agent, admin_token, token=made["id"],
                                              event="token.revoked"))
    assert entry["actor"] == f"admin:{admin_id}"


async def test_rotate_with_grace_keeps_the_old_token_until_then(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    admin_id, admin_token = admin
    old = await create(agent, admin_token, scope="camera:cam1", protocols=["snapshot"],
                       ttl="1d", label="rotated")
    before = time.time()
    answer = await call(agent, "POST", f"{API}/tokens/{old['id']}/rotate", admin_token,
                        body={"grace": "1h"})
    after = time.time()
    assert answer.status == 201, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    new = answer.json
    assert check(new["token"]) == new["id"] != old["id"]
    assert new["replaces"] == old["id"] and new["created_by"] == f"admin:{admin_id}"
    for key in ("kind", "scope", "protocols", "label"):
        assert new[key] == old[key], key
    assert int(before) + 86400 <= epoch(new["expires_at"]) <= after + 86400  # ttl again
    shown = (await call(agent, "GET", f"{API}/tokens/{old['id']}", admin_token)).json
    assert shown["status"] == "active" and shown["replaced_by"] == new["id"]
    assert shown["revoked_at"] is None
    assert int(before) + 3600 <= epoch(shown["expires_at"]) <= after + 3600
    async with aiohttp.ClientSession() as http:
        for token in (old["token"], new["token"]):
            async with http.get(f"{agent.base}/snapshot/cam1.jpg",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
    again = await call(agent, "POST", f"{API}/tokens/{old['id']}/rotate", admin_token)
    assert "already rotated" in again.error(409, "refused")
    for grace, field in (("soon", "grace"), (60, "grace"), ("36501d", "grace"),
                         ("99999999999w", "grace")):
        bad = await call(agent, "POST", f"{API}/tokens/{new['id']}/rotate", admin_token,
                         body={"grace": grace})
        assert bad.error(400, "invalid_request").startswith(field)
    bad = await call(agent, "POST", f"{API}/tokens/{new['id']}/rotate", admin_token, body=[])
    assert bad.error(400, "invalid_request") == "the body must be a JSON object"
    listed = await call(agent, "GET", f"{API}/tokens", admin_token)
    assert listed.status == 200  # nothing unprintable was stored


@pytest.mark.parametrize("body", [_UNSET, {}, {"grace": None}])
async def test_rotate_without_grace_revokes_the_old_token(
        agent: AgentProcess, admin: tuple[str, str], body: Any) -> None:
    _, admin_token = admin
    old = await create(agent, admin_token, scope="camera:cam2", protocols=["snapshot"])
    answer = await call(agent, "POST", f"{API}/tokens/{old['id']}/rotate", admin_token,
                        body=body)
    assert answer.status == 201, answer.text
    new = answer.json
    assert new["replaces"] == old["id"] and new["expires_at"] is None
    shown = (await call(agent, "GET", f"{API}/tokens/{old['id']}", admin_token)).json
    assert shown["status"] == "revoked" and shown["replaced_by"] == new["id"]
    async with aiohttp.ClientSession() as http:
        for token, status in ((old["token"], 401), (new["token"], 200)):
            async with http.get(f"{agent.base}/snapshot/cam2.jpg",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == status
    again = await call(agent, "POST", f"{API}/tokens/{old['id']}/rotate", admin_token)
    assert "already rotated" in again.error(409, "refused")
    revoked = await create(agent, admin_token)
    await call(agent, "POST", f"{API}/tokens/{revoked['id']}/revoke", admin_token)
    answer = await call(agent, "POST", f"{API}/tokens/{revoked['id']}/rotate", admin_token)
    assert "is revoked" in answer.error(409, "refused")


# -- revocation ends live sessions ----------------------------------------------------------


async def test_revoking_ends_a_live_webrtc_session(agent: AgentProcess,
                                                  admin: tuple[str, str]) -> None:
    _, admin_token = admin
    made = await create(agent, admin_token, scope="host", label="live viewer")
    viewer = WhepViewer(agent.base, "cam1", made["token"])
    try:
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
        cameras = (await call(agent, "GET", f"{API}/cameras", admin_token)).json["cameras"]
        viewers = {c["id"]: c["viewers"] for c in cameras}
        assert viewers == {"cam1": {**dict.fromkeys(PROTOCOLS, 0), "webrtc": 1},
                           "cam2": dict.fromkeys(PROTOCOLS, 0)}
        hosts = (await call(agent, "GET", f"{API}/hosts", admin_token)).json["hosts"]
        assert hosts[0]["sessions"] == 1
        answer = await call(agent, "POST", f"{API}/tokens/{made['id']}/revoke", admin_token)
        answered = time.monotonic()
        assert answer.status == 200
        # the session was over in the agent before the answer was sent
        cameras = (await call(agent, "GET", f"{API}/cameras", admin_token)).json["cameras"]
        assert [c["viewers"]["webrtc"] for c in cameras] == [0, 0]
        hosts = (await call(agent, "GET", f"{API}/hosts", admin_token)).json["hosts"]
        assert hosts[0]["sessions"] == 0
        stopped = await ended(viewer, timeout=5)
        assert stopped - answered < 1.0, stopped - answered
    finally:
        await viewer.close()
    (entry,) = await eventually(lambda: audit(agent, admin_token, token=made["id"],
                                              event="session.ended"))
    assert entry["reason"] == "revoked" and entry["protocol"] == "webrtc"
    assert entry["camera"] == "cam1" and entry["detail"]["bytes"] > 0
    again = WhepViewer(agent.base, "cam1", made["token"])
    assert await again.connect() == 401
    await again.close()


# -- usage ----------------------------------------------------------------------------------


async def test_usage_of_a_token(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    made = await create(agent, admin_token, scope="camera:cam2", protocols=["snapshot"])
    fresh = (await call(agent, "GET", f"{API}/tokens/{made['id']}/usage", admin_token)).json
    assert fresh == {"token_id": made["id"], "last_used_at": None, "per_hour": [], "uses": 0,
                     "denied": 0, "per_day": [], "per_protocol": {}, "ips": []}
    started = time.time()
    headers = {"Authorization": f"Bearer {made['token']}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"{agent.base}/snapshot/cam2.jpg", headers=headers) as r:
                assert r.status == 200
        async with http.post(f"{agent.base}/whep/cam2", data="v=0\r\n", headers={
                **headers, "Content-Type": "application/sdp"}) as r:
            assert r.status == 403  # protocol_not_allowed: a denial counted for the token
    finished = time.time()

    async def counted() -> dict[str, Any] | None:
        answer = await call(agent, "GET", f"{API}/tokens/{made['id']}/usage", admin_token)
        assert answer.status == 200
        stats: dict[str, Any] = answer.json
        return stats if stats["uses"] + stats["denied"] == 4 else None

    stats = await eventually(counted)
    assert stats["token_id"] == made["id"]
    assert stats["uses"] == 3 and stats["denied"] == 1
    assert stats["per_protocol"] == {"snapshot": {"granted": 3, "denied": 0},
                                     "webrtc": {"granted": 0, "denied": 1}}
    (ip,) = stats["ips"]
    assert ip["ip"] == "127.0.0.1" and ip["count"] == 4
    assert started <= ip["last_seen"] <= finished
    assert started <= stats["last_used_at"] <= finished
    hours = {int(started // 3600), int(finished // 3600)}
    assert {h["hour"] for h in stats["per_hour"]} <= hours
    assert sum(h["granted"] for h in stats["per_hour"]) == 3
    assert sum(h["denied"] for h in stats["per_hour"]) == 1
    days = {int(started // 86400), int(finished // 86400)}
    assert {d["day"] for d in stats["per_day"]} <= days
    assert sum(d["granted"] for d in stats["per_day"]) == 3
    assert sum(d["denied"] for d in stats["per_day"]) == 1
    shown = (await call(agent, "GET", f"{API}/tokens/{made['id']}", admin_token)).json
    assert shown["last_used_at"] == format_time(stats["last_used_at"])


async def test_unused_tokens(agent: AgentProcess, admin: tuple[str, str]) -> None:
    """Active tokens neither used nor created within ``days``: (last use or creation) is
    before now - days."""
    _, admin_token = admin
    now = time.time()
    fresh = await create(agent, admin_token, label="created now")
    old = await create(agent, admin_token, label="created 2 days ago")
    used = await create(agent, admin_token, scope="camera:cam1", protocols=["snapshot"],
                        label="created 10 days ago, used now")
    revoked = await create(agent, admin_token, label="created 5 days ago, revoked")
    await call(agent, "POST", f"{API}/tokens/{revoked['id']}/revoke", admin_token)
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/snapshot/cam1.jpg",
            headers={"Authorization": f"Bearer {used['token']}"}) as r:
        assert r.status == 200
    await eventually(lambda: _used(agent, admin_token, used["id"]))
    await asyncio.to_thread(backdate, agent, old["id"], now - 2 * 86400)
    await asyncio.to_thread(backdate, agent, used["id"], now - 10 * 86400)
    await asyncio.to_thread(backdate, agent, revoked["id"], now - 5 * 86400)

    async def unused(days: str | None) -> set[str]:
        answer = await call(agent, "GET", f"{API}/usage/unused", admin_token,
                            params={"days": days} if days else None)
        assert answer.status == 200, answer.text
        assert answer.json["days"] == int(days or 30)
        assert all(t["status"] == "active" for t in answer.json["tokens"])
        return {t["id"] for t in answer.json["tokens"]} & {
            fresh["id"], old["id"], used["id"], revoked["id"]}

    assert await unused("1") == {old["id"]}
    assert await unused("3") == set()
    assert await unused(None) == set()
    for days in ("0", "3651", "abc", "1.5", ""):
        answer = await call(agent, "GET", f"{API}/usage/unused", admin_token,
                            params={"days": days})
        assert answer.error(400, "invalid_request").startswith("days"), days


async def _used(agent: AgentProcess, admin_token: str, token_id: str) -> bool:
    answer = await call(agent, "GET", f"{API}/tokens/{token_id}", admin_token)
    return answer.json["last_used_at"] is not None


# -- audit ----------------------------------------------------------------------------------


async def _five_entries(agent: AgentProcess, admin_token: str) -> tuple[str, float]:
    """A token with exactly five audit entries: created, three snapshots of cam1 granted,
    one of cam2 denied (scope_mismatch). Also one malformed token, which names no token."""
    started = time.time()
    made = await create(agent, admin_token, scope="camera:cam1", protocols=["snapshot"])
    async with aiohttp.ClientSession() as http:
        for token, camera, status in [(made["token"], "cam1", 200)] * 3 + [
                (made["token"], "cam2", 403), ("garbage", "cam1", 401)]:
            async with http.get(f"{agent.base}/snapshot/{camera}.jpg",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == status
    await eventually(lambda: _count(agent, admin_token, made["id"], 5))
    return made["id"], started


async def _count(agent: AgentProcess, admin_token: str, token_id: str, n: int) -> bool:
    return len(await audit(agent, admin_token, token=token_id)) == n


async def test_audit_filters(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    token_id, started = await _five_entries(agent, admin_token)
    mine = await audit(agent, admin_token, token=token_id)
    assert [e["event"] for e in mine] == ["token.created"] + ["access.granted"] * 3 + [
        "access.denied"]
    assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)  # oldest first
    assert set(mine[0]) == set(AUDIT_COLUMNS)
    assert mine[-1]["reason"] == "scope_mismatch" and mine[-1]["camera"] == "cam2"
    assert await audit(agent, admin_token, token=token_id, result="denied") == [mine[-1]]
    assert await audit(agent, admin_token, token=token_id, result="granted") == mine[1:4]
    assert await audit(agent, admin_token, token=token_id, event="token.created") == mine[:1]
    assert await audit(agent, admin_token, token=token_id,
                       reason="scope_mismatch") == [mine[-1]]
    assert await audit(agent, admin_token, token=token_id, camera="cam1") == mine[1:4]
    assert await audit(agent, admin_token, token=token_id, ip="127.0.0.1") == mine[1:]
    assert await audit(agent, admin_token, token=token_id, ip="10.9.9.9") == []
    since = await audit(agent, admin_token, since=format_time(started))
    assert all(e["ts"] >= int(started) for e in since)
    assert {e["seq"] for e in mine} <= {e["seq"] for e in since}
    until = await audit(agent, admin_token, until=format_time(started))
    assert until and all(e["ts"] < int(started) for e in until)
    assert not {e["seq"] for e in mine} & {e["seq"] for e in until}
    for field, check_entry in (("result", lambda e: e["result"] == "denied"),
                               ("event", lambda e: e["event"] == "access.denied"),
                               ("reason", lambda e: e["reason"] == "malformed")):
        value = {"result": "denied", "event": "access.denied", "reason": "malformed"}[field]
        found = await audit(agent, admin_token, **{field: value})
        assert found and all(check_entry(e) for e in found), field


async def test_audit_pages(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    token_id, _ = await _five_entries(agent, admin_token)
    mine = await audit(agent, admin_token, token=token_id)
    pages, after = [], "0"
    while True:
        answer = await call(agent, "GET", f"{API}/audit", admin_token,
                            params={"token": token_id, "limit": "2", "after": after})
        assert answer.status == 200
        pages.append(answer.json["entries"])
        if answer.json["next_after"] is None:
            break
        assert answer.json["next_after"] == answer.json["entries"][-1]["seq"]
        after = str(answer.json["next_after"])
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [e for p in pages for e in p] == mine
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"token": token_id, "limit": "5"})
    assert answer.json["next_after"] == mine[-1]["seq"]  # a full page says: ask again
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"token": token_id, "after": str(mine[-1]["seq"])})
    assert answer.json == {"entries": [], "next_after": None, "next_before": None}
    # Newest first, paging backwards with before=.
    pages, before = [], None
    while True:
        params = {"token": token_id, "limit": "2", "order": "newest"}
        if before is not None:
            params["before"] = before
        answer = await call(agent, "GET", f"{API}/audit", admin_token, params=params)
        assert answer.status == 200 and answer.json["next_after"] is None
        pages.append(answer.json["entries"])
        if answer.json["next_before"] is None:
            break
        before = str(answer.json["next_before"])
    assert [e for p in pages for e in p] == mine[::-1]
    bad = await call(agent, "GET", f"{API}/audit", admin_token, params={"order": "sideways"})
    assert bad.status == 400


async def test_audit_exports(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    token_id, _ = await _five_entries(agent, admin_token)
    mine = await audit(agent, admin_token, token=token_id)
    # jsonl: every matching entry, whatever the page size
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"token": token_id, "format": "jsonl", "limit": "1"})
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/x-ndjson")
    assert answer.headers["Content-Disposition"] == 'attachment; filename="audit.jsonl"'
    assert answer.text.endswith("\n")
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert lines == mine
    for entry in lines:
        assert len(entry["hash"]) == 64 and len(entry["prev_hash"]) == 64
    # consecutive entries of the whole log chain their hashes
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"format": "jsonl", "after": str(mine[0]["seq"] - 1)})
    chain = [json.loads(line) for line in answer.text.splitlines()]
    assert len(chain) >= 5
    for earlier, later in itertools.pairwise(chain):
        assert later["seq"] == earlier["seq"] + 1
        assert later["prev_hash"] == earlier["hash"]
    # csv: a header row of the columns, then one row per entry
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"token": token_id, "format": "csv"})
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert answer.headers["Content-Disposition"] == 'attachment; filename="audit.csv"'
    rows = list(csv.reader(io.StringIO(answer.text)))
    assert rows[0] == list(AUDIT_COLUMNS)
    assert len(rows) == 1 + len(mine)
    for row, entry in zip(rows[1:], mine, strict=True):
        record = dict(zip(AUDIT_COLUMNS, row, strict=True))
        assert int(record["seq"]) == entry["seq"] and record["hash"] == entry["hash"]
        assert record["event"] == entry["event"] and record["token_id"] == token_id
        assert json.loads(record["detail"]) == entry["detail"]
    answer = await call(agent, "GET", f"{API}/audit", admin_token,
                        params={"token": "none-such", "format": "csv"})
    assert list(csv.reader(io.StringIO(answer.text))) == [list(AUDIT_COLUMNS)]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"after": "-1"}, "after"),
    ({"after": str(2**62 + 1)}, "after"),
    ({"format": "xml"}, "format"),
    ({"result": "maybe"}, "result"),
    ({"since": "garbage"}, "since"),
    ({"until": "yesterday"}, "until"),
])
async def test_audit_rejects_bad_parameters(agent: AgentProcess, admin: tuple[str, str],
                                            params: dict[str, str], field: str) -> None:
    _, admin_token = admin
    answer = await call(agent, "GET", f"{API}/audit", admin_token, params=params)
    assert answer.error(400, "invalid_request").startswith(field)


# -- cameras, hosts, OpenAPI, metrics ---------------------------------------------------------


async def test_cameras_and_hosts(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    answer = await call(agent, "GET", f"{API}/cameras", admin_token)
    assert answer.status == 200
    cameras = answer.json["cameras"]
    assert [c["id"] for c in cameras] == ["cam1", "cam2"]
    for camera in cameras:
        assert camera["name"] == camera["id"] and camera["source"] == SRC
        assert camera["always_on"] is False
        assert camera["state"] in ("idle", "connecting", "online")
        assert set(camera["viewers"]) == set(PROTOCOLS)
        assert isinstance(camera["since"], float)
    answer = await call(agent, "GET", f"{API}/hosts", admin_token)
    assert answer.status == 200
    (host,) = answer.json["hosts"]
    assert {k: host[k] for k in ("id", "account_id", "version", "cameras")} == {
        "id": "site1", "account_id": "acme", "version": __version__, "cameras": 2}
    assert host["uptime_s"] > 0 and 0 <= host["cameras_online"] <= 2
    assert host["sessions"] == 0


def _admin_routes() -> set[tuple[str, str]]:
    app = web.Application()
    AdminApi(None, None, None, 0.0).routes(app)  # type: ignore[arg-type]
    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.resource is not None}


async def test_openapi_document_describes_every_admin_route(agent: AgentProcess) -> None:
    answer = await call(agent, "GET", "/api/v1/openapi.json")  # public: no token needed
    assert answer.status == 200
    doc = answer.json
    assert doc == json.loads(json.dumps(openapi.document()))
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["version"] == __version__
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _admin_routes()
    assert len(documented) == 12
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"401", "403", "429"} <= codes, (method, path)
            assert any(c.startswith("2") for c in codes), (method, path)
            for name in (p["name"] for p in op.get("parameters", []) if p["in"] == "path"):
                assert f"{{{name}}}" in path


async def test_metrics_need_an_admin_token(agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    answer = await call(agent, "GET", "/metrics")
    answer.error(401, "missing")
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="therelay-agent"')
    _, access = await agent.token("--host")
    (await call(agent, "GET", "/metrics", access)).error(403, "wrong_kind")
    answer = await call(agent, "GET", "/metrics", admin_token)
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    lines = answer.text.splitlines()
    assert "# TYPE therelay_authorizations_total counter" in lines
    assert "# TYPE therelay_viewers gauge" in lines
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    for camera in ("cam1", "cam2"):  # the served protocols that hold sessions
        for protocol in ("webrtc", "rtsp", "hls"):
            assert samples[f'therelay_viewers{{camera="{camera}",protocol="{protocol}"}}'] == "0.0"
    assert not [s for s in samples if 'protocol="snapshot"' in s]  # a request, no session
    granted = float(samples['therelay_authorizations_total{reason="granted"}'])
    assert float(samples['therelay_authorizations_total{reason="wrong_kind"}']) >= 1
    assert float(samples['therelay_authorizations_total{reason="missing"}']) >= 1
    again = await call(agent, "GET", "/metrics", admin_token)
    samples = dict(line.rsplit(" ", 1) for line in again.text.splitlines()
                   if not line.startswith("#"))
    assert float(samples['therelay_authorizations_total{reason="granted"}']) == granted + 1


# -- modify ---------------------------------------------------------------------------------


async def test_update_changes_what_it_is_given_and_audits_before_and_after(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    admin_id, admin_token = admin
    made = await create(agent, admin_token, scope="camera:cam1", protocols=["webrtc"],
                        ttl="1d", label="front desk")
    assert made["max_sessions"] is None  # unlimited unless asked
    path = f"{API}/tokens/{made['id']}"
    answer = await call(agent, "PATCH", path, admin_token, body={
        "label": "front desk (night)", "expires_at": "2099-01-01T00:00Z",
        "protocols": ["webrtc", "snapshot"], "max_sessions": 3})
    assert answer.status == 200, answer.text
    shown = answer.json
    assert (shown["label"], shown["expires_at"], shown["protocols"], shown["max_sessions"]) == (
        "front desk (night)", "2099-01-01T00:00:00Z", ["snapshot", "webrtc"], 3)
    assert (shown["scope"], shown["status"], shown["id"]) == ("camera:cam1", "active",
                                                              made["id"])
    assert "token" not in shown
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/snapshot/cam1.jpg",
            headers={"Authorization": f"Bearer {made['token']}"}) as r:
        assert r.status == 200  # the new protocol works at once
    (entry,) = await eventually(lambda: audit(agent, admin_token, token=made["id"],
                                              event="token.updated"))
    assert entry["actor"] == f"admin:{admin_id}"
    was = dict(entry["detail"]["before"])
    assert 0 <= was.pop("expires_at") - epoch(made["expires_at"]) < 1
    assert was == {"label": "front desk", "ttl_seconds": 86400.0, "protocols": ["webrtc"],
                      "max_sessions": None}
    assert entry["detail"]["after"] == {
        "label": "front desk (night)", "expires_at": epoch("2099-01-01T00:00Z"),
        "ttl_seconds": None, "protocols": ["snapshot", "webrtc"], "max_sessions": 3}
    # The same values again change nothing and audit nothing; null lifts expiry and cap.
    same = await call(agent, "PATCH", path, admin_token, body={"label": "front desk (night)"})
    assert same.status == 200
    assert {**same.json, "last_used_at": None} == {**shown, "last_used_at": None}
    lifted = await call(agent, "PATCH", path, admin_token,
                        body={"expires_at": None, "max_sessions": None, "protocols": []})
    assert lifted.status == 200, lifted.text
    assert (lifted.json["expires_at"], lifted.json["max_sessions"],
            lifted.json["protocols"]) == (None, None, ["all"])
    before = time.time()
    ttl = await call(agent, "PATCH", path, admin_token, body={"ttl": "2h"})
    assert int(before) + 7200 <= epoch(ttl.json["expires_at"]) <= time.time() + 7200
    entries = await audit(agent, admin_token, token=made["id"], event="token.updated")
    assert len(entries) == 3  # written with the change, in the same transaction


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"colour": "red"}, 400, "unknown field 'colour'"),
    ({"scope": "host"}, 400, "create a new token"),
    ({"scope": "camera:cam2", "label": "x"}, 400, "rotate"),
    ({"kind": "admin"}, 400, "cannot be changed"),
    ({}, 400, "nothing to change"),
    ({"expires_at": "2001-01-01T00:00Z"}, 400, "in the past"),
    ({"expires_at": "9999-06-01T00:00Z"}, 400, "9999"),
    ({"expires_at": "tomorrow"}, 400, "expires_at"),
    ({"ttl": "1h", "expires_at": "2099-01-01T00:00Z"}, 400, "not both"),
    ({"ttl": None}, 400, "ttl"),
    ({"ttl": "36501d"}, 400, "ttl"),
    ({"protocols": ["webrtc", "ftp"]}, 400, "unknown protocol 'ftp'"),
    ({"protocols": "webrtc"}, 400, "protocols"),
    ({"max_sessions": 0}, 400, "max_sessions"),
    ({"max_sessions": -1}, 400, "max_sessions"),
    ({"max_sessions": 10**12}, 400, "max_sessions"),
    ({"max_sessions": 2.5}, 400, "max_sessions"),
    ({"max_sessions": True}, 400, "max_sessions"),
    ({"label": "x" * 201}, 400, "label"),
    ({"label": 5}, 400, "label"),
])
async def test_update_refuses_bad_input_and_changes_nothing(
        agent: AgentProcess, admin: tuple[str, str], body: dict[str, Any], status: int,
        words: str) -> None:
    _, admin_token = admin
    made = await create(agent, admin_token, scope="camera:cam2", label="unchanged", ttl="1d")
    answer = await call(agent, "PATCH", f"{API}/tokens/{made['id']}", admin_token, body=body)
    assert words in answer.error(status, "invalid_request")
    shown = (await call(agent, "GET", f"{API}/tokens/{made['id']}", admin_token)).json
    assert shown == {k: v for k, v in made.items() if k != "token"}
    await asyncio.sleep(0.3)  # the audit batch of anything that happened is written by now
    assert await audit(agent, admin_token, token=made["id"], event="token.updated") == []


async def test_update_refuses_tokens_it_must_not_change(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    revoked = await create(agent, admin_token, scope="host")
    await call(agent, "POST", f"{API}/tokens/{revoked['id']}/revoke", admin_token)
    answer = await call(agent, "PATCH", f"{API}/tokens/{revoked['id']}", admin_token,
                        body={"expires_at": None})
    assert "revocation is final" in answer.error(409, "refused")
    unknown = await call(agent, "PATCH", f"{API}/tokens/Zz0000000000", admin_token,
                         body={"label": "x"})
    unknown.error(404, "not_found")
    admin_made = await create(agent, admin_token, kind="admin")
    answer = await call(agent, "PATCH", f"{API}/tokens/{admin_made['id']}", admin_token,
                        body={"max_sessions": 2})
    assert "only access tokens" in answer.error(409, "refused")
    # A token issued by TheRelay cloud is read-only here (revoking it stays possible).
    relay_id = "Rr" + revoked["id"][2:]
    with sqlite3.connect(agent.env["THERELAY_STATE_DIR"] + "/agent.db", timeout=10) as db:
        db.execute("INSERT INTO tokens (id, kind, scope, secret_hash, last4, created_at, "
                   "origin, created_by, rev) VALUES (?, 'access', 'host:site1', ?, 'abcd', ?, "
                   "'relay', 'relay', 0)", (relay_id, bytes(32), time.time()))
    answer = await call(agent, "PATCH", f"{API}/tokens/{relay_id}", admin_token,
                        body={"label": "mine now"})
    assert "TheRelay" in answer.error(409, "read_only")
    await asyncio.sleep(0.3)
    for token_id in (revoked["id"], admin_made["id"], relay_id):
        assert await audit(agent, admin_token, token=token_id, event="token.updated") == []


async def test_a_narrowing_ends_the_sessions_it_no_longer_allows(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    _, admin_token = admin
    made = await create(agent, admin_token, scope="host", max_sessions=2)
    first, second, third = (WhepViewer(agent.base, "cam1", made["token"]) for _ in range(3))
    other = await create(agent, admin_token, scope="host", label="bystander")
    bystander = WhepViewer(agent.base, "cam1", other["token"])
    try:
        assert await first.connect() == 201, first.body
        assert await second.connect() == 201, second.body
        # Over the cap: 429 session_limit, whatever the protocol of the other sessions.
        assert await third.connect() == 429
        assert third.body and json.loads(third.body)["error"] == "session_limit"
        assert await bystander.connect() == 201  # the cap is per token

        async def cli_says_session_limit() -> bool:
            checked = await agent.cli("token", "check", made["token"],
                                              "--camera", "cam1")
            return checked.returncode == 1 and "denied: session_limit" in checked.stdout

        await eventually(cli_says_session_limit, timeout=5)  # the daemon shares its count
        await first.frame()
        # A lower cap ends the newest session above it.
        answer = await call(agent, "PATCH", f"{API}/tokens/{made['id']}", admin_token,
                            body={"max_sessions": 1})
        answered = time.monotonic()
        assert answer.status == 200, answer.text
        assert await ended(second, timeout=5) - answered < 1.0
        await first.frame()
        # Fewer protocols: a WebRTC session under a snapshot-only token ends.
        answer = await call(agent, "PATCH", f"{API}/tokens/{made['id']}", admin_token,
                            body={"protocols": ["snapshot"]})
        answered = time.monotonic()
        assert await ended(first, timeout=5) - answered < 1.0
        await bystander.frame()
    finally:
        for viewer in (first, second, third, bystander):
            await viewer.close()
    denied = await eventually(lambda: audit(agent, admin_token, token=made["id"],
                                            reason="session_limit", event="access.denied"))
    assert len(denied) == 1 and denied[0]["protocol"] == "webrtc"
    ends = await eventually(lambda: audit(agent, admin_token, token=made["id"],
                                          event="session.ended"))
    assert [e["reason"] for e in ends] == ["session_limit", "protocol_not_allowed"]


async def test_cross_origin_pages_cannot_use_the_admin_api(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    """The attack that used to work: a page on another origin POSTs text/plain (no preflight)
    with the admin token in ?token= and reads the new token back. Now: the token in the URL
    is not looked at, non-JSON bodies are 415, and neither the admin API nor /metrics answers
    with CORS headers (a preflight gets none either), while WHEP keeps its CORS."""
    _, admin_token = admin
    before = (await call(agent, "GET", f"{API}/tokens", admin_token)).json["tokens"]
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    body = json.dumps({"kind": "admin", "label": "stolen"})
    answer = await call(agent, "POST", f"{API}/tokens", data=body, headers=evil,
                        params={"token": admin_token})
    answer.error(401, "missing")
    assert "Access-Control-Allow-Origin" not in answer.headers
    # the same token in the header, but a body a page may send without a preflight
    answer = await call(agent, "POST", f"{API}/tokens", admin_token, data=body, headers=evil)
    answer.error(415, "unsupported_media_type")
    assert "Access-Control-Allow-Origin" not in answer.headers
    form = {**evil, "Content-Type": "application/x-www-form-urlencoded"}
    (await call(agent, "POST", f"{API}/tokens", admin_token, data="kind=admin",
                headers=form)).error(415, "unsupported_media_type")
    after = (await call(agent, "GET", f"{API}/tokens", admin_token)).json["tokens"]
    assert [t["id"] for t in after] == [t["id"] for t in before]
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    for path in (f"{API}/tokens", "/metrics"):
        answer = await call(agent, "OPTIONS", path, headers=preflight)
        assert answer.status >= 400, answer.status
        assert not any(h.lower().startswith("access-control-") for h in answer.headers)
        answer = await call(agent, "GET", path, admin_token, headers={"Origin": "http://e.x"})
        assert answer.status == 200
        assert not any(h.lower().startswith("access-control-") for h in answer.headers)
    (await call(agent, "GET", "/metrics", params={"token": admin_token})).error(401, "missing")
    answer = await call(agent, "OPTIONS", "/whep/cam1", headers=preflight)
    assert answer.status == 204 and answer.headers["Access-Control-Allow-Origin"] == "*"


async def test_the_session_view_lists_who_watches_with_their_reception(
        agent: AgentProcess, admin: tuple[str, str]) -> None:
    """GET /sessions: each live session with its token, camera, address, bytes, and for a
    WebRTC viewer on the agent's send path its receiver-report figures (issue: media plane)."""
    _, admin_token = admin
    token_id, token = await agent.token("--camera", "cam2", "--label", "session view")
    before = time.time()
    viewer = WhepViewer(agent.base, "cam2", token)
    assert await viewer.connect() == 201, viewer.body
    try:
        for _ in range(15):  # a second of pictures: the viewer's receiver reports follow
            await viewer.frame()
        ours: dict[str, Any] = {}

        async def reported() -> bool:
            answer = await call(agent, "GET", f"{API}/sessions", admin_token,
                                params={"token_id": token_id})
            assert answer.status == 200, answer.text
            ours.clear()
            ours.update(answer.json["sessions"][0])
            return ours["reception"] is not None

        from tests.support.agent import wait_until
        await wait_until(reported, timeout=10, step=0.5)
        assert viewer.location and ours["id"] == viewer.location.rsplit("/", 1)[1]
        assert (ours["token_id"], ours["camera"], ours["protocol"]) == (token_id, "cam2",
                                                                        "webrtc")
        assert ours["peer_ip"] == "127.0.0.1" and ours["connecting"] is False
        assert before - 1 <= parse_time(ours["started_at"]) <= time.time()
        assert ours["duration_s"] > 0 and ours["bytes_sent"] > 1_000
        reception = ours["reception"]
        assert reception["loss_fraction"] == 0 and reception["packets_lost"] == 0  # loopback
        assert reception["jitter_ms"] >= 0 and reception["retransmitted"] == 0
        assert reception["rtt_ms"] is None or 0 <= reception["rtt_ms"] < 1000
        # the filters: another camera, another protocol
        for params in ({"camera": "cam1"}, {"protocol": "rtsp"}):
            answer = await call(agent, "GET", f"{API}/sessions", admin_token, params=params)
            assert token_id not in {s["token_id"] for s in answer.json["sessions"]}
        everyone = await call(agent, "GET", f"{API}/sessions", admin_token)
        assert ours["id"] in {s["id"] for s in everyone.json["sessions"]}
    finally:
        await viewer.close()
    await wait_until(lambda: _gone(agent, admin_token, token_id), timeout=5)
    bad = await call(agent, "GET", f"{API}/sessions", admin_token, params={"protocol": "x"})
    assert "protocol" in bad.error(400, "invalid_request")
    assert (await call(agent, "GET", f"{API}/sessions", token)).status == 403


async def _gone(agent: AgentProcess, admin_token: str, token_id: str) -> bool:
    answer = await call(agent, "GET", f"{API}/sessions", admin_token,
                        params={"token_id": token_id})
    return not answer.json["sessions"]
