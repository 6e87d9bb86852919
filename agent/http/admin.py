"""The admin API (``/api/v1/admin/…``), authorized by admin tokens (``trk_``).

Every request goes through the same ``authorize`` as viewers (protocol ``admin``); every
change is made in the store by the same calls as the CLI, audited with the admin token as
the actor, and applied to the running agent at once (live sessions of a revoked token end
before the response is sent). Errors are JSON ``{"error": code, "message": …}``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiohttp import web

from agent import __version__
from agent.access import audit, usage
from agent.access.audit import AuditQuery
from agent.access.model import (
    MAX_LABEL,
    Action,
    Protocol,
    Scope,
    ScopeLevel,
    Status,
    check_max_sessions,
    format_time,
    parse_duration,
    parse_protocols,
    parse_time,
    public_view,
)
from agent.access.policy import Decision
from agent.access.service import AccessService
from agent.access.sessions import Session
from agent.access.store import KEEP, NewToken, TokenChange, TokenStore
from agent.access.tokens import Kind, is_public_id
from agent.errors import (
    NotFoundError,
    StoreError,
    TokenError,
    TokenLimitError,
    TokenReadOnlyError,
)
from agent.http.auth import denial, error, header_token, peer_ip
from agent.http.connections import read_body
from agent.http.tls import Certificate
from agent.logs import redact_text
from agent.media.cameras import Cameras
from agent.media.hub import CameraState

if TYPE_CHECKING:
    from agent.webrtc.rtpsend import ReceptionStats

log = structlog.get_logger(__name__)

PREFIX = "/api/v1/admin"
AUDIT_COLUMNS = ("seq", "ts", "event", "token_id", "camera", "protocol", "peer_ip", "actor",
                 "result", "reason", "detail", "prev_hash", "hash")
#: Bounds that keep every stored time printable (``format_time`` stops at the year 9999):
#: a token expiring later would break every listing that shows it.
MAX_DURATION = 100 * 365 * 86400.0
MAX_DURATION_TEXT = 32
LATEST_EXPIRY = 253370764800.0  # 9999-01-01T00:00:00Z
#: Audit entries per chunk of an export.
EXPORT_PAGE = 1000

T = TypeVar("T")
V = TypeVar("V")
#: The fields PATCH /tokens/{id} may change.
UPDATABLE = ("label", "ttl", "expires_at", "protocols", "max_sessions")
Handler = Callable[[web.Request, Decision], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A field of the request is unusable; the message names it."""


class AdminApi:
    def __init__(self, access: AccessService, store: TokenStore, cameras: Cameras,
                 started: float, tls: Callable[[], Certificate | None] = lambda: None,
                 held_moves: Callable[[], Mapping[str, str]] = dict,
                 rtsp_port: Callable[[], int | None] = lambda: None,
                 reception: Callable[[str], ReceptionStats | None] = lambda _id: None) -> None:
        """``held_moves``: camera id → what discovery saw and did not follow (a move for
        the installer to confirm, docs/discovery.md). ``rtsp_port``: where the RTSP server
        listens, None when it is off (Studio shows ready RTSP URLs). ``reception``: a live
        WebRTC session's latest receiver-report figures, by session id."""
        self._reception = reception
        self._tls = tls
        self._rtsp_port = rtsp_port
        self._held_moves = held_moves
        self._access = access
        self._store = store
        self._cameras = cameras
        self._started = started

    def routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("GET", f"{PREFIX}/tokens", self._guard(self.list_tokens))
        add("POST", f"{PREFIX}/tokens", self._guard(self.create_token))
        add("GET", f"{PREFIX}/tokens/{{id}}", self._guard(self.show_token))
        add("PATCH", f"{PREFIX}/tokens/{{id}}", self._guard(self.update_token))
        add("POST", f"{PREFIX}/tokens/{{id}}/revoke", self._guard(self.revoke_token))
        add("POST", f"{PREFIX}/tokens/{{id}}/rotate", self._guard(self.rotate_token))
        add("GET", f"{PREFIX}/tokens/{{id}}/usage", self._guard(self.token_usage))
        add("GET", f"{PREFIX}/usage/unused", self._guard(self.unused))
        add("GET", f"{PREFIX}/audit", self._guard(self.audit))
        add("GET", f"{PREFIX}/cameras", self._guard(self.cameras))
        add("GET", f"{PREFIX}/hosts", self._guard(self.hosts))
        add("GET", f"{PREFIX}/sessions", self._guard(self.sessions))

    def _guard(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            decision = await self._access.authorize(header_token(request), None, None,
                                                    peer_ip(request), action=Action.ADMIN)
            if not decision.granted:
                return denial(decision)
            if request.body_exists and request.content_type != "application/json":
                # text/plain and form bodies are what a cross-origin page may send without
                # a preflight: the admin API reads JSON only.
                return error(415, "unsupported_media_type",
                             "send the body as JSON with Content-Type: application/json")
            try:
                return await handler(request, decision)
            except BadRequest as exc:
                return error(400, "invalid_request", str(exc))
            except NotFoundError as exc:
                return error(404, "not_found", str(exc))
            except TokenLimitError as exc:
                return error(409, "token_limit", str(exc))
            except TokenReadOnlyError as exc:
                return error(409, "read_only", str(exc))
            except TokenError as exc:
                return error(409, "refused", str(exc))
            except StoreError as exc:  # a full or read-only disk: said once, no traceback
                log.error("state_database_failed", error=str(exc))
                return error(503, "storage_unavailable", str(exc))
        return guarded

    @staticmethod
    def _actor(decision: Decision) -> str:
        return f"admin:{decision.token_id}"

    async def _applied(self) -> None:
        """Make a change visible to the running agent now and end what it forbids."""
        await self._access.refresh(force=True)
        self._access.sweep()

    # -- tokens ----------------------------------------------------------------------------

    async def list_tokens(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        now = time.time()
        kind = _choice(request.query.get("kind"), [k.value for k in Kind], "kind")
        status = _choice(request.query.get("status"), [s.value for s in Status], "status")
        scope = request.query.get("scope")
        records = await asyncio.to_thread(
            self._store.list_tokens, now, Kind(kind) if kind else None,
            Status(status) if status else None)
        views = [public_view(r, now) for r in records if scope is None or str(r.scope) == scope]
        return web.json_response({"tokens": views})

    async def create_token(self, request: web.Request, decision: Decision) -> web.StreamResponse:
        body = await _json_object(request)
        kind = _choice(body.get("kind", "access"), ["access", "admin"], "kind") or "access"
        scope = self._scope(body.get("scope"), kind)
        protocols = frozenset[Protocol]()
        if body.get("protocols"):
            protocols = _protocols(body["protocols"])
        ttl = expires = None
        if body.get("ttl") is not None:
            ttl = _duration(body["ttl"], "ttl")
        if body.get("expires_at") is not None:
            if ttl is not None:
                raise BadRequest("give ttl or expires_at, not both")
            expires = _expiry(body["expires_at"])
        label = _label(body.get("label", ""))
        cap = _parsed(check_max_sessions, body.get("max_sessions"), "max_sessions")
        new = await asyncio.to_thread(
            self._store.create, Kind(kind), scope, time.time(), protocols=protocols,
            expires_at=expires, ttl=ttl, label=label, created_by=self._actor(decision),
            max_sessions=cap)
        await self._applied()
        return _created(new)

    def _scope(self, value: Any, kind: str) -> Scope:
        site = self._store.site
        if value in (None, "host"):
            return Scope(ScopeLevel.HOST, site.agent_id)
        if value == "account":
            return Scope(ScopeLevel.ACCOUNT, site.account_id)
        if isinstance(value, str) and value.startswith("camera:"):
            return _parsed(Scope.parse, value, "scope")
        raise BadRequest("scope: \"host\", \"account\" or \"camera:<id>\"")

    async def show_token(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        record = await asyncio.to_thread(self._store.get, _token_id(request))
        return web.json_response(public_view(record, time.time()))

    async def update_token(self, request: web.Request, decision: Decision) -> web.StreamResponse:
        """PATCH: label, expiry, protocols, session cap; never the scope (docs/admin.md)."""
        body = await _json_object(request)
        if "scope" in body or "kind" in body:
            raise BadRequest("scope: a token's scope (and kind) cannot be changed: create a new "
                             "token with the scope you need, then revoke this one, or rotate "
                             "it to replace its secret")
        unknown = sorted(set(body) - set(UPDATABLE))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:40]!r}: a token update may change "
                             f"{', '.join(UPDATABLE)}")
        if not body:
            raise BadRequest(f"nothing to change: give one of {', '.join(UPDATABLE)}")
        if "ttl" in body and "expires_at" in body:
            raise BadRequest("give ttl or expires_at, not both")
        now = time.time()
        change = TokenChange(
            label=_label(body["label"]) if "label" in body else KEEP,
            ttl=_duration(body["ttl"], "ttl") if "ttl" in body else KEEP,
            expires_at=(KEEP if "expires_at" not in body else None
                        if body["expires_at"] is None else _expiry(body["expires_at"], now)),
            protocols=_protocols(body["protocols"]) if "protocols" in body else KEEP,
            max_sessions=(_parsed(check_max_sessions, body["max_sessions"], "max_sessions")
                          if "max_sessions" in body else KEEP),
        )
        record = await asyncio.to_thread(self._store.update, _token_id(request), now,
                                         self._actor(decision), change)
        await self._applied()  # a narrowing ends what it no longer allows before we answer
        return web.json_response(public_view(record, time.time()))

    async def revoke_token(self, request: web.Request, decision: Decision) -> web.StreamResponse:
        record = await asyncio.to_thread(self._store.revoke, _token_id(request), time.time(),
                                         self._actor(decision))
        await self._applied()  # its live sessions end before we answer
        return web.json_response(public_view(record, time.time()))

    async def rotate_token(self, request: web.Request, decision: Decision) -> web.StreamResponse:
        body = await _json_object(request, optional=True)
        grace = None
        if body.get("grace") is not None:
            grace = _duration(body["grace"], "grace")
        new = await asyncio.to_thread(self._store.rotate, _token_id(request), time.time(),
                                      self._actor(decision), grace)
        await self._applied()
        return _created(new)

    # -- usage and audit -------------------------------------------------------------------

    async def token_usage(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        record = await asyncio.to_thread(self._store.get, _token_id(request))
        stats = await asyncio.to_thread(self._store.read, lambda c: usage.stats(c, record.id))
        return web.json_response(stats)

    async def unused(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        days = _int(request.query.get("days", "30"), "days", 1, 3650)
        now = time.time()
        cutoff = now - days * 86400
        records = await asyncio.to_thread(self._store.list_tokens, now, None, Status.ACTIVE)
        idle = [public_view(r, now) for r in records
                if (r.last_used_at or r.created_at) < cutoff]
        return web.json_response({"days": days, "tokens": idle})

    async def audit(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        q = request.query
        fmt = _choice(q.get("format"), ["json", "jsonl", "csv"], "format") or "json"
        query = AuditQuery(
            token_id=q.get("token"), camera=q.get("camera"), event=q.get("event"),
            result=_choice(q.get("result"), ["granted", "denied"], "result"),
            reason=q.get("reason"), peer_ip=q.get("ip"),
            since=_parsed(parse_time, q["since"], "since") if "since" in q else None,
            until=_parsed(parse_time, q["until"], "until") if "until" in q else None,
            after_seq=_int(q.get("after", "0"), "after", 0, 2**62),
            before_seq=_int(q["before"], "before", 1, 2**62) if "before" in q else None,
            limit=_int(q.get("limit", "100"), "limit", 1, 1000),
        )
        newest = _choice(q.get("order"), ["oldest", "newest"], "order") == "newest"
        # Denials folded in open windows are written now: the reader sees every one so far.
        await self._access.flush()
        if fmt == "json":
            query = replace(query, newest_first=newest)
            entries = await asyncio.to_thread(self._store.read,
                                              lambda c: audit.query(c, query))
            last = entries[-1]["seq"] if entries and len(entries) == query.limit else None
            return web.json_response({"entries": entries,
                                      "next_after": None if newest else last,
                                      "next_before": last if newest else None})
        return await self._export(request, query, fmt)

    async def _export(self, request: web.Request, query: AuditQuery,
                      fmt: str) -> web.StreamResponse:
        """Every matching entry, streamed: each page is read and formatted in a thread and
        written as one chunk, so a large export never holds the event loop (a 28 MB export
        built in one piece held it 0.39 s)."""
        content_type, name = (("application/x-ndjson", "audit.jsonl") if fmt == "jsonl"
                              else ("text/csv", "audit.csv"))
        response = web.StreamResponse(headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}"'})
        await response.prepare(request)
        if fmt == "csv":
            await response.write(_csv_rows([list(AUDIT_COLUMNS)]))
        after = query.after_seq
        while True:
            page = replace(query, after_seq=after, limit=EXPORT_PAGE, newest_first=False)
            chunk, count, last = await asyncio.to_thread(self._export_page, page, fmt)
            if chunk:
                await response.write(chunk)
            if count < EXPORT_PAGE:
                break
            after = last
        await response.write_eof()
        return response

    def _export_page(self, page: AuditQuery, fmt: str) -> tuple[bytes, int, int]:
        """(formatted bytes, entries, last seq) of one page. Blocking: run in a thread."""
        entries = self._store.read(lambda c: audit.query(c, page))
        if fmt == "jsonl":
            text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
            chunk = text.encode()
        else:
            chunk = _csv_rows([[json.dumps(e[c], sort_keys=True) if c == "detail" else e[c]
                                for c in AUDIT_COLUMNS] for e in entries])
        return chunk, len(entries), entries[-1]["seq"] if entries else page.after_seq

    # -- cameras and hosts -----------------------------------------------------------------

    async def cameras(self, _request: web.Request, _d: Decision) -> web.StreamResponse:
        held = self._held_moves()
        return web.json_response({"cameras": [{
            "id": c.id, "name": c.name, "source": redact_text(c.config.source),
            "always_on": c.config.always_on, **c.hub.status.as_dict(),
            "viewers": {p.value: self._access.sessions.count(c.id, p.value) for p in Protocol},
            "held_move": held.get(c.id),
        } for c in self._cameras]})

    async def sessions(self, request: web.Request, _d: Decision) -> web.StreamResponse:
        """Live sessions (who watches what, from where, how well): docs/admin.md."""
        camera = request.query.get("camera")
        token_id = request.query.get("token_id")
        protocol = _choice(request.query.get("protocol"), [p.value for p in Protocol],
                           "protocol")
        now = time.time()
        return web.json_response({"sessions": [
            self._session_view(s, now) for s in self._access.sessions
            if (camera is None or s.camera == camera)
            and (token_id is None or s.token_id == token_id)
            and (protocol is None or s.protocol == protocol)]})

    def _session_view(self, session: Session, now: float) -> dict[str, Any]:
        stats = self._reception(session.id)
        return {
            "id": session.id, "token_id": session.token_id, "camera": session.camera,
            "protocol": session.protocol, "peer_ip": session.peer_ip,
            "started_at": format_time(session.started_at),
            "duration_s": round(max(0.0, now - session.started_at), 1),
            "bytes_sent": session.bytes_sent(), "connecting": session.pending,
            "reception": None if stats is None else {
                "loss_fraction": round(stats.fraction_lost, 4),
                "packets_lost": stats.packets_lost,
                "jitter_ms": round(stats.jitter_seconds * 1000, 2),
                "rtt_ms": (None if stats.rtt_seconds is None
                           else round(stats.rtt_seconds * 1000, 2)),
                "retransmitted": stats.retransmitted,
                "keyframe_requests": stats.keyframe_requests,
            },
        }

    async def hosts(self, _request: web.Request, _d: Decision) -> web.StreamResponse:
        site = self._store.site
        states = [c.hub.status.state for c in self._cameras]
        return web.json_response({"hosts": [{
            "id": site.agent_id, "account_id": site.account_id, "version": __version__,
            "uptime_s": round(time.time() - self._started, 1),
            "cameras": len(states), "cameras_online": states.count(CameraState.ONLINE),
            "sessions": len(self._access.sessions),
            "tls": _tls_view(self._tls()),
            "rtsp_port": self._rtsp_port(),
        }]})


# -- helpers --------------------------------------------------------------------------------


def _tls_view(cert: Certificate | None) -> dict[str, Any] | None:
    """What a viewer compares before trusting the agent's HTTPS (null: plain HTTP)."""
    if cert is None:
        return None
    return {"fingerprint_sha256": cert.fingerprint, "spki_sha256": cert.spki_sha256,
            "not_after": cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "self_signed": cert.self_signed, "names": list(cert.names)}


def _created(new: NewToken) -> web.Response:
    return web.json_response({**public_view(new.record, time.time()), "token": new.token},
                             status=201, headers={"Cache-Control": "no-store"})


def _csv_rows(rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


def _token_id(request: web.Request) -> str:
    token_id = request.match_info["id"]
    if not is_public_id(token_id):
        raise NotFoundError(f"no token with id {token_id[:20]!r}")
    return token_id


async def _json_object(request: web.Request, optional: bool = False) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip() and optional:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def _label(value: Any) -> str:
    label = _text(value, "label")
    if len(label) > MAX_LABEL:
        raise BadRequest(f"label: at most {MAX_LABEL} characters")
    return label


def _protocols(value: Any) -> frozenset[Protocol]:
    """A JSON list of protocol names; [] means all."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest("protocols: a list like [\"webrtc\", \"snapshot\"] ([] for all)")
    if len(value) > 2 * len(Protocol):
        raise BadRequest("protocols: at most one of each")
    return _parsed(parse_protocols, ",".join(p.replace(",", " ") for p in value), "protocols")


def _expiry(value: Any, now: float | None = None) -> float:
    """An ``expires_at`` before the year 9999 (and after ``now`` when given)."""
    expires = _parsed(parse_time, _text(value, "expires_at"), "expires_at")
    if expires >= LATEST_EXPIRY:
        raise BadRequest("expires_at: must be before 9999-01-01")
    if now is not None and expires <= now:
        raise BadRequest("expires_at: is in the past (to stop a token now, revoke it)")
    return expires


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected text")
    try:
        value.encode("utf-8")  # JSON may carry lone surrogates ("\\ud800"); SQLite cannot
    except UnicodeEncodeError:
        raise BadRequest(f"{name}: not valid Unicode text") from None
    return value


def _duration(value: Any, name: str) -> float:
    text = _text(value, name)
    if len(text) > MAX_DURATION_TEXT:  # parse_duration's regex is quadratic in the length
        raise BadRequest(f"{name}: at most {MAX_DURATION_TEXT} characters, like 30m, 1h, 1d, "
                         "1w or 1h30m")
    seconds = _parsed(parse_duration, text, name)
    if seconds > MAX_DURATION:
        raise BadRequest(f"{name}: at most 100 years (36500d)")
    return seconds


def _choice(value: Any, choices: list[str], name: str) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise BadRequest(f"{name}: one of {', '.join(choices)}")
    return str(value)


def _int(value: str, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name}: a whole number") from None
    if not low <= number <= high:
        raise BadRequest(f"{name}: from {low} to {high}")
    return number


def _parsed(parse: Callable[[V], T], value: V, name: str) -> T:
    try:
        return parse(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


