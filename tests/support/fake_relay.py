"""A fake TheRelay cloud for the agent's integration tests, built from docs/relay-protocol.md.

``FakeRelay`` speaks the cloud side of protocol version 1 over real sockets on 127.0.0.1:

- the **control channel** (section 1): a WebSocket server (``websockets``) at ``relay.url``
  that checks the upgrade (1.1), validates every envelope (1.2), runs the session start
  (1.3: hello → welcome → tokens.sync), acks and records the agent's messages (1.4, 1.5),
  keeps its own token table with cursors, and closes with the codes of 1.6;
- a **WHIP endpoint** (section 2, RFC 9725) at ``relay.whip_base`` (aiohttp), answering
  ``sendonly`` offers with an aiortc peer connection whose decoded frames a test can read.

Everything the agent sends is recorded (``received``, ``acks``, ``usage_events``,
``cameras``, ``statuses``, ``whip_requests``, ``attempts``, ``closed``); what it sends that
breaks the contract without being fatal is listed in ``violations`` (a test that drives the
real agent should end with ``assert relay.violations == []``).

Choices where the protocol text leaves room are marked "(choice)" below. The rules of
version 1.1 that the fake checks on the agent (each a ``violations`` entry when broken):

- retries follow section 3: the gap before each attempt lies within the schedule of the
  last failure's kind (rejection or ordinary), counts restarting after a 30 s session
  (``check_retries``; off for hand-driven clients that reconnect at will);
- a refused ``publish`` (ack ``ok: false``) is followed by ``publish.status failed`` with
  the same code within 10 s; a session running when the control channel dropped is
  reported ``stopped`` within 10 s of the next ``welcome``;
- after a ``welcome`` naming another agent id the agent sends nothing and closes with 4005;
- an ``online`` camera has ``video``; a ``cameras.update`` changes something;
- WHIP requests carry ``User-Agent: therelay-agent/<version>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from multidict import CIMultiDict
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from agent.access import tokens as wire
from agent.access.tokens import Kind
from agent.webrtc.ice import install_host_addresses
from tests.conftest import TOKEN_RE, remember

PROTOCOL = "therelay.agent.v1"
MAX_MESSAGE = 2**20  # 1.2: larger messages are closed with 1009 (websockets does it)

#: Close codes of section 1.6, by name; the close reason the fake sends is the name (choice).
CLOSE = {
    "normal": 1000, "going_away": 1001, "token_invalid": 4001, "token_expired": 4002,
    "token_revoked": 4003, "agent_not_allowed": 4005, "version_unsupported": 4006,
    "replaced": 4008, "protocol_error": 4009,
}

#: relay → agent messages the agent must ack (1.4).
ACKED_BY_AGENT = frozenset({"tokens.sync", "tokens.revoke", "publish", "unpublish"})
#: Codes an agent may give for a tokens.sync record it did not apply (1.5).
SYNC_REFUSALS = frozenset({"revocation_final", "hash_changed", "local_token", "hash_in_use"})
CAMERA_STATES = frozenset({"idle", "connecting", "online", "offline", "unsupported"})
PUBLISH_STATES = frozenset({"starting", "live", "stopped", "failed"})
#: Keys that would carry camera credentials or source URLs (never sent, 1.3).
SECRET_CAMERA_KEYS = frozenset({"source", "url", "uri", "username", "password", "credentials",
                                "credential", "user", "rtsp", "stream_url"})
TOKEN_RECORD_KEYS = ("id", "kind", "sha256", "last4", "scope", "protocols", "expires_at",
                     "revoked_at", "label")
_SOURCE_URL = re.compile(r"\b(rtsps?|rtmp|http|https)://[^\s\"']*@", re.IGNORECASE)

T = TypeVar("T")
Message = dict[str, Any]


def new_id() -> str:
    return str(uuid.uuid4())


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Publisher:
    """A publisher token as the relay knows it: only its hash, never its text."""

    public_id: str
    sha256: str
    agent_id: str | None  # None: an account-level token
    permission: Literal["publish", "read"]
    expires_at: float | None = None
    revoked_at: float | None = None

    def problem(self, now: float) -> str | None:
        if self.revoked_at is not None:
            return "token_revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "token_expired"
        return None


@dataclass(frozen=True)
class Attempt:
    """One HTTP request to the control-channel URL, refused or upgraded (status 101)."""

    at: float  # time.monotonic()
    status: int
    error: str | None
    user_agent: str | None
    subprotocols: tuple[str, ...]


@dataclass(frozen=True)
class Closed:
    """How one upgraded control connection ended."""

    code: int | None
    reason: str
    by_relay: bool
    agent_id: str | None


@dataclass
class Link:
    """One upgraded control connection."""

    ws: ServerConnection
    publisher: Publisher
    hello: Message | None = None
    welcome: Message | None = None
    closed_by_relay: bool = False
    welcomed_at: float | None = None  # time.monotonic() of the welcome
    mismatch: bool = False  # the welcome named another agent id than the hello
    pings: list[float] = field(default_factory=list)  # time.monotonic() of ping frames

    @property
    def agent_id(self) -> str | None:
        return None if self.hello is None else str(self.hello["agent_id"])

    @property
    def open(self) -> bool:
        return self.ws.state is State.OPEN


@dataclass
class WhipResource:
    """One accepted WHIP POST: a receiving peer connection and what it decoded."""

    id: str
    session_id: str
    location: str
    pc: RTCPeerConnection
    bearer: str
    offer: str
    answer: str = ""
    tracks: dict[str, MediaStreamTrack] = field(default_factory=dict)
    latest: dict[str, av.VideoFrame | av.AudioFrame] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    deleted: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class WhipSession:
    """A publish session (from ``publish``), or an ``always``-mode path agent/camera."""

    id: str
    camera_id: str
    whip_url: str
    bearer: str | None = None
    publish_id: str | None = None  # id of the publish message; None in always mode
    agent_id: str | None = None  # set in always mode (from the URL)
    unpublished: bool = False
    resources: list[WhipResource] = field(default_factory=list)


class FakeRelay:
    """TheRelay cloud, faithful to docs/relay-protocol.md, on 127.0.0.1.

    ``async with FakeRelay() as relay:`` starts both servers; the agent is pointed at
    ``relay.url`` with a token from ``relay.issue_publisher(...)``.
    """

    def __init__(self, *, account_id: str = "acme", heartbeat_s: float = 20,
                 ice_servers: list[dict[str, Any]] | None = None,
                 hello_timeout: float = 10.0) -> None:
        self.account_id = account_id
        self.heartbeat_s = heartbeat_s
        self.ice_servers: list[dict[str, Any]] = list(ice_servers or [])
        self.hello_timeout = hello_timeout
        # Behaviour knobs, changeable at any time.
        self.ack_usage = True  # False: usage messages are recorded but never acked
        self.resend_unacked = True  # repeat unacked publish/unpublish/revoke after a reconnect
        self.duplicate_policy: Literal["replace", "refuse"] = "replace"  # 4008 old or new
        self.welcome_agent_id: str | None = None  # force another agent_id into welcome
        self.clock_offset = 0.0  # added to server_time and every ts the relay sends
        self.whip_redirect = False  # answer POSTs on the whip_url with a redirect first
        self.whip_redirect_hops = 1  # how many redirects in a row
        self.whip_redirect_status = 307
        self.whip_fail: int | None = None  # answer every WHIP POST with this HTTP status
        self.whip_ice_servers: list[dict[str, Any]] = []  # sent as Link headers (§4.6)
        self.send_welcome = True  # False: accept the upgrade and the hello, never answer
        self.check_retries = True  # check the agent's retry schedule (section 3)
        self.expect_within = 10.0  # seconds the agent has for an expected publish.status
        # What happened.
        self.received: list[Message] = []  # every valid message from the agent, in order
        self.invalid_frames: list[str | bytes] = []
        self.sent: list[Message] = []  # every message the relay sent
        self.acks: dict[str, Message] = {}  # the agent's first ack for each relay message id
        self.duplicates: list[Message] = []  # agent messages whose id was already answered
        self.usage_batches: dict[str, list[Message]] = {}  # batch id → events (first copy)
        self.usage_events: list[Message] = []  # events of every distinct batch
        self.cameras: dict[str, Message] = {}  # inventory from hello and cameras.update
        self.statuses: dict[str, list[Message]] = {}  # session id → publish.status messages
        self.sessions: dict[str, WhipSession] = {}
        self.whip_requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.attempts: list[Attempt] = []
        self.closed: list[Closed] = []
        self.violations: list[str] = []
        self.connections = 0  # upgrades accepted, ever
        # Section 3 bookkeeping: the last attempt's end (kind, time) and counts per kind.
        self._last_end: tuple[str, float] | None = None
        self._counts = {"ordinary": 0, "rejected": 0}
        self._active: set[str] = set()  # sessions whose publish was accepted, not ended
        self._lost: set[str] = set()  # sessions a dropped channel ended: "stopped" expected
        self.agent_cursor: str | None = None  # the cursor the agent last acked
        # Token table (1.5): id → record, with the sequence number of its last change.
        self._publishers: dict[str, Publisher] = {}  # sha256 → publisher
        self._tokens: dict[str, Message] = {}
        self._token_seq: dict[str, int] = {}
        self._seq = 0
        self._full_seq = 0  # a change an incremental sync cannot carry (deletions)
        self._refusals: list[tuple[int, str, str]] = []
        self._links: list[Link] = []
        self._unacked: dict[str, Message] = {}  # relay messages awaiting the agent's ack
        self._answers: dict[tuple[str | None, str], Message | None] = {}  # dedup (1.2)
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._ws_server: Server | None = None
        self._runner: web.AppRunner | None = None
        self._ws_port = 0
        self._http_port = 0

    # ---- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> FakeRelay:
        install_host_addresses(["127.0.0.1"])  # process-wide, as WhepViewer does
        self._ws_server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._process_request,
            subprotocols=[Subprotocol(PROTOCOL)],
            max_size=MAX_MESSAGE, ping_interval=self.heartbeat_s, ping_timeout=self.heartbeat_s,
            close_timeout=2, server_header="therelay-fake/1")
        self._ws_port = self._ws_server.sockets[0].getsockname()[1]
        app = web.Application()
        app.router.add_route("*", "/whip/{path:.+}", self._whip)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._http_port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for link in self._links:
            link.closed_by_relay = True
        if self._ws_server is not None:
            self._ws_server.close()  # closes every connection with 1001
            await self._ws_server.wait_closed()
        for session in self.sessions.values():
            for resource in session.resources:
                await self._end_resource(resource)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        """The control channel: ``ws://127.0.0.1:<port>/agent``."""
        return f"ws://127.0.0.1:{self._ws_port}/agent"

    @property
    def whip_base(self) -> str:
        """``http://127.0.0.1:<port2>/whip``; a publish session's URL is ``{whip_base}/{id}``."""
        return f"http://127.0.0.1:{self._http_port}/whip"

    @property
    def whip_url_template(self) -> str:
        """For ``relay.publish: always`` (section 2): ``{whip_base}/{agent_id}/{camera_id}``."""
        return self.whip_base + "/{agent_id}/{camera_id}"

    @property
    def open_connections(self) -> int:
        return sum(1 for link in self._links if link.open)

    # ---- publisher tokens ---------------------------------------------------------------

    def add_publisher(self, token_text: str, agent_id: str | None = None,
                      permission: Literal["publish", "read"] = "publish",
                      expired: bool = False, revoked: bool = False) -> None:
        """Know a publisher token (only its hash is kept). ``agent_id``: an agent-level token."""
        parsed = wire.parse(token_text)
        if isinstance(parsed, wire.FormatProblem) or parsed.kind is not Kind.PUBLISHER:
            raise ValueError("add_publisher needs a well-formed publisher (trp_) token")
        remember(token_text)
        now = time.time()
        self._publishers[sha256_hex(token_text)] = Publisher(
            parsed.public_id, sha256_hex(token_text), agent_id, permission,
            expires_at=now - 60 if expired else None, revoked_at=now if revoked else None)

    def issue_publisher(self, agent_id: str | None = None,
                        permission: Literal["publish", "read"] = "publish",
                        expired: bool = False, revoked: bool = False) -> str:
        """A new publisher token, registered and remembered; returns its text."""
        text = wire.generate(Kind.PUBLISHER).text
        self.add_publisher(text, agent_id, permission, expired, revoked)
        return text

    async def revoke_publisher(self, token_text: str, close: bool = True) -> None:
        """Revoke it; live connections under it are closed at once with 4003 (1.6), unless
        ``close`` is False (the revocation shows at the next upgrade)."""
        if not close:
            self._publishers[sha256_hex(token_text)].revoked_at = time.time()
            return
        await self._end_publisher(token_text, "token_revoked")

    async def expire_publisher(self, token_text: str) -> None:
        """Let it expire now; live connections under it are closed with 4002."""
        await self._end_publisher(token_text, "token_expired")

    async def _end_publisher(self, token_text: str, why: str) -> None:
        publisher = self._publishers[sha256_hex(token_text)]
        if why == "token_revoked":
            publisher.revoked_at = time.time()
        else:
            publisher.expires_at = time.time() - 1
        for link in list(self._links):
            if link.publisher is publisher and link.open:
                await self._close(link, why)

    def fail_upgrades(self, status: int, error: str = "unavailable", message: str = "",
                      times: int = 1) -> None:
        """Refuse the next ``times`` upgrades with this HTTP answer (e.g. 403, 429, 503)."""
        self._refusals.extend([(status, error, message or error)] * times)

    # ---- access tokens (1.5) ------------------------------------------------------------

    def issue_access_token(self, scope: str, protocols: Sequence[str] = (),
                           expires_at: float | None = None, label: str = "",
                           ) -> tuple[str, Message]:
        """A new access token in the agent's format; stores its record (not sent yet)."""
        parsed = wire.generate(Kind.ACCESS)
        remember(parsed.text)
        record: Message = {
            "id": parsed.public_id, "kind": "access", "sha256": sha256_hex(parsed.text),
            "last4": parsed.text[-4:], "scope": scope, "protocols": list(protocols),
            "expires_at": expires_at, "revoked_at": None, "label": label}
        self._store_tokens([record])
        return parsed.text, dict(record)

    @property
    def token_table(self) -> list[Message]:
        return [dict(r) for r in self._tokens.values()]

    @property
    def cursor(self) -> str:
        return f"c-{self._seq:06d}"

    def _store_tokens(self, records: Iterable[Message], full: bool = False) -> None:
        self._seq += 1
        if full:
            self._tokens.clear()
            self._token_seq.clear()
            self._full_seq = self._seq
        for record in records:
            self._tokens[str(record["id"])] = dict(record)
            self._token_seq[str(record["id"])] = self._seq

    def _sync_since(self, cursor: object) -> Message:
        """The tokens.sync body for an agent at ``cursor`` (None or unknown: full)."""
        since: int | None = None
        if isinstance(cursor, str) and re.fullmatch(r"c-\d{6,}", cursor):
            since = int(cursor[2:])
        if since is None or since > self._seq or since < self._full_seq:
            return {"full": True, "cursor": self.cursor, "tokens": self.token_table}
        changed = [dict(self._tokens[i]) for i, s in self._token_seq.items() if s > since]
        return {"full": False, "cursor": self.cursor, "tokens": changed}

    async def send_tokens(self, tokens: list[Message], full: bool = False) -> str | None:
        """Store these records and send them as tokens.sync; the message id, or None if no
        agent is connected (the next hello's sync carries them)."""
        self._store_tokens(tokens, full)
        if self._current() is None:
            return None
        return await self.send("tokens.sync", full=full, cursor=self.cursor,
                               tokens=[dict(t) for t in tokens])

    async def revoke(self, token_id: str, revoked_at: float | None = None) -> str:
        """Mark the token revoked in the table and send tokens.revoke; the message id."""
        when = time.time() + self.clock_offset if revoked_at is None else revoked_at
        if token_id in self._tokens:
            record = dict(self._tokens[token_id], revoked_at=when)
            self._store_tokens([record])
        return await self.send("tokens.revoke", token_id=token_id, revoked_at=when)

    # ---- publish sessions (1.4, 2) ------------------------------------------------------

    async def publish(self, camera_id: str, bearer: str | None = None,
                      session_id: str | None = None) -> str:
        """Send ``publish`` for a new WHIP session at ``{whip_base}/{session_id}``."""
        sid = session_id or f"s-{uuid.uuid4().hex[:16]}"
        if bearer is not None:
            remember(bearer)
        session = WhipSession(sid, camera_id, f"{self.whip_base}/{sid}", bearer=bearer)
        self.sessions[sid] = session
        session.publish_id = await self.send("publish", session_id=sid, camera_id=camera_id,
                                             whip_url=session.whip_url, bearer=bearer)
        return sid

    async def unpublish(self, session_id: str) -> str:
        """Send ``unpublish``; the agent is expected to DELETE the resource. The message id."""
        if session_id in self.sessions:
            self.sessions[session_id].unpublished = True
        return await self.send("unpublish", session_id=session_id)

    def crash_whip(self, session_id: str) -> WhipResource:
        """The WHIP server side of the session's newest resource dies without a word: its
        UDP sockets close, so no DTLS alert, no RTCP and no ICE answer reach the agent (a
        crashed or unplugged server). Returns the dead resource."""
        resource = self.whip_resource(session_id)
        if resource is None:
            raise RuntimeError(f"no live WHIP resource for {session_id}")
        for transceiver in resource.pc.getTransceivers():
            ice = transceiver.receiver.transport.transport
            for stun in list(ice._connection._protocols):
                if stun.transport is not None:
                    stun.transport.close()
        resource.deleted = True  # gone: a later DELETE finds nothing
        self._notify()
        return resource

    def always_session(self, agent_id: str, camera_id: str) -> str:
        """The session id under which ``always``-mode POSTs to the template are kept."""
        return f"{agent_id}/{camera_id}"

    # ---- sending ------------------------------------------------------------------------

    def _message(self, type_: str, fields: dict[str, Any]) -> Message:
        return {"type": type_, "id": new_id(), "ts": time.time() + self.clock_offset, **fields}

    async def send(self, type_: str, /, **fields: Any) -> str:
        """Send any message to the connected agent; the types of 1.4 that need an ack are
        kept until acked and repeated after a reconnect. Returns the message id."""
        message = self._message(type_, fields)
        if type_ in ACKED_BY_AGENT:
            self._unacked[message["id"]] = message
        link = self._current()
        if link is None:
            if type_ not in ACKED_BY_AGENT:
                raise RuntimeError("no agent is connected")
            return str(message["id"])  # goes out after the next welcome
        try:
            await self._send(link, message)
        except ConnectionClosed:
            if type_ not in ACKED_BY_AGENT:
                raise  # an acked message stays queued and is repeated after a reconnect
        return str(message["id"])

    async def send_raw(self, data: str | bytes, fragment: int | None = None) -> None:
        """Send a frame as is (to test the agent's handling of garbage). With
        ``fragment``, ``data`` (UTF-8 bytes) goes as one text message in fragments of that
        many bytes (RFC 6455 §5.4), as a relay sends a big tokens.sync."""
        link = self._require_link()
        if fragment is None:
            await link.ws.send(data)
            return
        raw = data.encode() if isinstance(data, str) else data
        await link.ws.send([raw[i:i + fragment] for i in range(0, len(raw), fragment)],
                           text=True)

    async def ping(self, timeout: float = 5.0) -> Message:
        """Send ``ping`` and return the agent's ``pong``."""
        link = self._require_link()
        message = self._message("ping", {})
        message["ping"] = message["id"]  # (choice) both readings of `{"ping": <id>}`
        await self._send(link, message)
        return await self.wait_for("pong", lambda m: m.get("ping") == message["id"],
                                   timeout=timeout)

    async def close_agent(self, code: int = 1000, reason: str = "") -> None:
        """Close the current agent connection with ``code`` (e.g. 4003, 4008, 1001)."""
        link = self._require_link()
        link.closed_by_relay = True
        await link.ws.close(code, reason)

    async def _send(self, link: Link, message: Message) -> None:
        self.sent.append(message)
        await link.ws.send(json.dumps(message))

    async def _send_quietly(self, link: Link, message: Message) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._send(link, message)

    async def _close(self, link: Link, name: str) -> None:
        link.closed_by_relay = True
        await link.ws.close(CLOSE[name], name)

    def _current(self) -> Link | None:
        for link in reversed(self._links):
            if link.welcome is not None and link.open:
                return link
        return None

    def _require_link(self) -> Link:
        link = self._current()
        if link is None:
            raise RuntimeError("no agent is connected")
        return link

    # ---- waiting ------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = probe()
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake relay: no {what} within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def wait_for(self, type_: str, predicate: Callable[[Message], bool] | None = None,
                       timeout: float = 10.0, *, since: int = 0) -> Message:
        """The first message of ``type_`` received (from index ``since`` of ``received``)
        that satisfies ``predicate``; waits for it."""
        def probe() -> Message | None:
            for message in self.received[since:]:
                if message["type"] == type_ and (predicate is None or predicate(message)):
                    return message
            return None
        return await self._until(probe, timeout, f"{type_!r} message")

    async def wait_ack(self, message_id: str, timeout: float = 10.0) -> Message:
        """The agent's ack of the relay message ``message_id``."""
        return await self._until(lambda: self.acks.get(message_id), timeout,
                                 f"ack of {message_id}")

    async def wait_agent(self, timeout: float = 10.0) -> Message:
        """The hello of a welcomed, open agent connection."""
        def probe() -> Message | None:
            link = self._current()
            return None if link is None else link.hello
        return await self._until(probe, timeout, "welcomed agent connection")

    async def wait_closed(self, since: int = 0, timeout: float = 10.0) -> Closed:
        """The first connection end recorded at index ``since`` of ``closed`` or later."""
        return await self._until(
            lambda: self.closed[since] if len(self.closed) > since else None,
            timeout, "closed connection")

    async def wait_status(self, session_id: str, state: str, timeout: float = 10.0) -> Message:
        """The agent's publish.status ``state`` for ``session_id``."""
        def probe() -> Message | None:
            for message in self.statuses.get(session_id, []):
                if message.get("state") == state:
                    return message
            return None
        return await self._until(probe, timeout, f"publish.status {state} of {session_id}")

    async def wait_whip_deleted(self, session_id: str, timeout: float = 10.0) -> WhipResource:
        """A WHIP resource of this session that the agent DELETEd."""
        def probe() -> WhipResource | None:
            session = self.sessions.get(session_id)
            if session is None:
                return None
            return next((r for r in session.resources if r.deleted), None)
        return await self._until(probe, timeout, f"DELETE of {session_id}'s WHIP resource")

    def whip_resource(self, session_id: str) -> WhipResource | None:
        """The newest live (not deleted) WHIP resource of the session."""
        session = self.sessions.get(session_id)
        if session is None:
            return None
        return next((r for r in reversed(session.resources) if not r.deleted), None)

    async def _fresh_frame(self, session_id: str, kind: str, timeout: float) -> Any:
        before = self.whip_resource(session_id)
        mark = (before.id, before.counts.get(kind, 0)) if before else None

        def probe() -> Any:
            resource = self.whip_resource(session_id)
            if resource is None or not resource.counts.get(kind):
                return None
            if mark is not None and mark[0] == resource.id and resource.counts[kind] <= mark[1]:
                return None
            return resource.latest[kind]
        return await self._until(probe, timeout, f"{kind} frame on WHIP session {session_id}")

    async def whip_frame(self, session_id: str, timeout: float = 10.0) -> av.VideoFrame:
        """A video frame decoded after this call from the session's newest resource."""
        frame = await self._fresh_frame(session_id, "video", timeout)
        assert isinstance(frame, av.VideoFrame)
        return frame

    async def whip_audio_frame(self, session_id: str, timeout: float = 10.0) -> av.AudioFrame:
        frame = await self._fresh_frame(session_id, "audio", timeout)
        assert isinstance(frame, av.AudioFrame)
        return frame

    # ---- the control channel: upgrade (1.1) ---------------------------------------------

    def _publisher_of(self, authorization: str | None) -> Publisher | str:
        """The publisher of an Authorization header, or the 401 error code."""
        if authorization is None:
            return "token_invalid"
        scheme, _, text = authorization.partition(" ")
        text = text.strip()
        if scheme.lower() != "bearer" or not text:
            return "token_invalid"
        parsed = wire.parse(text)
        if isinstance(parsed, wire.FormatProblem) or parsed.kind is not Kind.PUBLISHER:
            return "token_invalid"
        publisher = self._publishers.get(sha256_hex(text))
        if publisher is None:
            return "token_invalid"
        return publisher.problem(time.time()) or publisher

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        user_agent = request.headers.get("User-Agent")
        offered = tuple(p.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol")
                        for p in value.split(",") if p.strip())

        def refuse(status: int, error: str, message: str) -> Response:
            self.attempts.append(Attempt(time.monotonic(), status, error, user_agent, offered))
            self._ended("rejected" if status in (401, 403, 426) else "ordinary")
            self._notify()
            response = connection.respond(status, json.dumps({"error": error,
                                                              "message": message}))
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            if status == 426:
                response.headers["Sec-WebSocket-Protocol"] = PROTOCOL
            return response

        if urlsplit(request.path).path != "/agent":
            return refuse(404, "not_found", "the agent control channel is /agent")
        self._check_retry()
        if self._refusals:
            return refuse(*self._refusals.pop(0))
        # (choice) the token is checked before the subprotocol: authenticate first.
        publisher = self._publisher_of(request.headers.get("Authorization"))
        if isinstance(publisher, str):
            return refuse(401, publisher, {
                "token_invalid": "unknown, malformed or forged publisher token",
                "token_expired": "the publisher token has expired",
                "token_revoked": "the publisher token was revoked"}[publisher])
        if PROTOCOL not in offered:
            return refuse(426, "version_unsupported", f"this relay speaks {PROTOCOL}")
        if user_agent is None or not user_agent.startswith("therelay-agent/"):
            self.violations.append(f"upgrade: User-Agent {user_agent!r} is not "
                                   "therelay-agent/<version>")
        self.attempts.append(Attempt(time.monotonic(), 101, None, user_agent, offered))
        return None

    # ---- the control channel: messages (1.2–1.6) ----------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        publisher = self._publisher_of(ws.request.headers.get("Authorization"))
        if isinstance(publisher, str):  # revoked or expired since the upgrade was checked
            await ws.close(CLOSE[publisher], publisher)
            return
        link = Link(ws, publisher)
        self._record_pings(link)
        self._links.append(link)
        self.connections += 1
        self._notify()
        try:
            await self._serve(link)
        except ConnectionClosed:
            pass
        except Exception as error:  # a bug in the fake: make it visible, end the connection
            self.violations.append(f"fake relay failed: {error!r}")
            link.closed_by_relay = True
            await ws.close(1011, "internal_error")
            raise
        finally:
            await ws.wait_closed()
            frame = ws.protocol.close_sent if link.closed_by_relay else ws.protocol.close_rcvd
            closed = Closed(frame.code if frame else ws.close_code,
                            frame.reason if frame else "", link.closed_by_relay, link.agent_id)
            self.closed.append(closed)
            self._link_ended(link, closed)
            self._notify()

    # ---- rules of version 1.1 on the agent ------------------------------------------------

    def restarted(self) -> None:
        """The agent process was replaced (killed, then started again): its next connection
        is a first one, not a retry of the last, and no retry schedule applies to it."""
        self._last_end = None
        self._counts = {"ordinary": 0, "rejected": 0}

    def _ended(self, kind: str, stable: bool = False) -> None:
        if stable:
            self._counts = {"ordinary": 0, "rejected": 0}
        self._counts[kind] += 1
        self._last_end = (kind, time.monotonic())

    def _check_retry(self) -> None:
        """Section 3: attempt n of a kind waits [0.5, min(60, 2^(n-1))] s (ordinary) or
        [15, min(300, 30 * 2^(n-1))] s (rejection) after the last end."""
        if not self.check_retries or self._last_end is None:
            return
        kind, at = self._last_end  # "ordinary" or "rejected"
        n = self._counts[kind]
        low, high = (15.0, min(300.0, 30.0 * 2 ** (n - 1))) if kind == "rejected" else \
            (0.5, min(60.0, 2.0 ** (n - 1)))
        gap = time.monotonic() - at
        if gap < low - 0.05 or gap > high + 5.0:  # 5 s of slack for a busy test machine
            what = "a rejection" if kind == "rejected" else "an ordinary failure"
            self.violations.append(f"retry after {what} (attempt {n}) came after {gap:.2f} s, "
                                   f"outside [{low:g}, {high:g}] s")

    def _link_ended(self, link: Link, closed: Closed) -> None:
        code = closed.code or 1006
        rejected = (closed.by_relay and 4001 <= code <= 4006) or (
            not closed.by_relay and code == CLOSE["agent_not_allowed"])
        stable = link.welcomed_at is not None and time.monotonic() - link.welcomed_at >= 30
        if link.mismatch and (closed.by_relay or code != CLOSE["agent_not_allowed"]):
            self.violations.append(f"after a welcome naming another agent id the agent "
                                   f"did not close with 4005 (closed: {closed})")
        self._ended("rejected" if rejected else "ordinary", stable)
        if link.welcome is not None:
            self._lost |= self._active
            self._active = set()

    def _expect(self, what: str, done: Callable[[], bool]) -> None:
        async def check() -> None:
            await asyncio.sleep(self.expect_within)
            if not done():
                self.violations.append(what)
        self._spawn(check())

    def _record_pings(self, link: Link) -> None:
        """Note the agent's WebSocket ping frames; each gap after the welcome must be about
        ``heartbeat_s`` (1.3: the agent honours it, within 5–120 s)."""
        receive = link.ws.protocol.recv_frame

        def recv_frame(frame: Frame) -> None:
            if frame.opcode is Opcode.PING:
                now = time.monotonic()
                last = link.pings[-1] if link.pings else link.welcomed_at
                wanted = min(120.0, max(5.0, self.heartbeat_s))
                if last is not None and not wanted - 0.5 <= now - last <= wanted + 3.0:
                    self.violations.append(f"a ping frame {now - last:.1f} s after the last "
                                           f"(heartbeat_s {wanted:g})")
                link.pings.append(now)
            receive(frame)
        link.ws.protocol.recv_frame = recv_frame  # type: ignore[method-assign]

    def _expect_stopped(self, sid: str) -> None:
        mark = len(self.statuses.get(sid, []))
        self._expect(f"session {sid}, running when the control channel dropped, was not "
                     "reported stopped after the next welcome",
                     lambda: self._has_status(sid, "stopped", since=mark))

    def _has_status(self, sid: str, state: str, code: str | None = None,
                    since: int = 0) -> bool:
        return any(m.get("state") == state and (code is None or (m.get("error") or {}).get(
            "code") == code) for m in self.statuses.get(sid, [])[since:])

    def _parse(self, raw: str | bytes) -> Message | str:
        """The message, or why it breaks the envelope of 1.2."""
        if isinstance(raw, bytes):
            return "binary frame"
        for found in TOKEN_RE.findall(raw):
            self.violations.append(f"a token crossed the control channel: {found[:16]}…")
        if _SOURCE_URL.search(raw):
            self.violations.append("a URL with credentials crossed the control channel")
        try:
            message = json.loads(raw)
        except ValueError:
            return "invalid JSON"
        if not isinstance(message, dict):
            return "not a JSON object"
        if not isinstance(message.get("type"), str) or not message["type"]:
            return "missing type"
        if not isinstance(message.get("id"), str) or not message["id"]:
            return "missing id"
        if not _is_number(message.get("ts")):
            return "missing ts"
        return message

    async def _next(self, link: Link, timeout: float | None = None) -> Message | None:
        """The next valid message; None after closing the connection with 4009."""
        if timeout is None:
            raw = await link.ws.recv()
        else:
            try:
                raw = await asyncio.wait_for(link.ws.recv(), timeout)
            except TimeoutError:
                self.violations.append("no hello within hello_timeout")
                await self._close(link, "protocol_error")
                return None
        message = self._parse(raw)
        if isinstance(message, str):
            self.invalid_frames.append(raw)
            await self._close(link, "protocol_error")
            return None
        self.received.append(message)
        self._notify()
        return message

    async def _serve(self, link: Link) -> None:
        hello = await self._next(link, self.hello_timeout)
        if hello is None:
            return
        if not self.send_welcome:  # a relay that accepts and then says nothing
            await link.ws.wait_closed()
            return
        if hello["type"] != "hello" or not isinstance(hello.get("agent_id"), str) \
                or not hello["agent_id"]:
            await self._close(link, "protocol_error")  # wrong order, or hello without id
            return
        self._check_hello(hello)
        bound = link.publisher.agent_id
        if bound is not None and hello["agent_id"] != bound:
            await self._close(link, "agent_not_allowed")
            return
        for other in self._links:
            if other is not link and other.open and other.agent_id == hello["agent_id"]:
                if self.duplicate_policy == "refuse":
                    await self._close(link, "replaced")
                    return
                self._spawn(self._close(other, "replaced"))
        link.hello = hello
        for camera in hello.get("cameras") or []:
            if isinstance(camera, dict) and isinstance(camera.get("id"), str):
                self.cameras[camera["id"]] = camera
        now = time.time() + self.clock_offset
        link.welcome = {
            "type": "welcome", "id": new_id(), "ts": now, "ack": hello["id"],
            "account_id": self.account_id,
            "agent_id": self.welcome_agent_id or bound or hello["agent_id"],
            "permission": link.publisher.permission,
            "token_scope": "agent" if bound is not None else "account",
            "ice_servers": self.ice_servers, "server_time": now,
            "heartbeat_s": self.heartbeat_s}
        link.welcomed_at = time.monotonic()
        link.mismatch = link.welcome["agent_id"] != hello["agent_id"]
        await self._send(link, link.welcome)
        for sid in sorted(self._lost):
            self._expect_stopped(sid)
        self._lost = set()
        for mid in [m for m, msg in self._unacked.items() if msg["type"] == "tokens.sync"]:
            del self._unacked[mid]  # superseded by the sync below
        sync = self._message("tokens.sync", self._sync_since(hello.get("token_cursor")))
        self._unacked[sync["id"]] = sync
        await self._send(link, sync)
        if self.resend_unacked:
            for pending in list(self._unacked.values()):
                if pending is not sync:
                    await self._send(link, pending)
        self._notify()
        while True:
            message = await self._next(link)
            if message is None:
                return
            if not await self._dispatch(link, message):
                return

    def _check_hello(self, hello: Message) -> None:
        if not isinstance(hello.get("version"), str):
            self.violations.append("hello: version is not a string")
        capabilities = hello.get("capabilities")
        if not isinstance(capabilities, list) or not all(isinstance(c, str)
                                                         for c in capabilities):
            self.violations.append("hello: capabilities is not a list of strings")
        if "token_cursor" not in hello or not isinstance(hello["token_cursor"], str | None):
            self.violations.append("hello: token_cursor missing (null when none)")
        cameras = hello.get("cameras")
        if not isinstance(cameras, list):
            self.violations.append("hello: cameras is not a list")
        else:
            for camera in cameras:
                self._check_camera("hello", camera)

    def _check_camera(self, where: str, camera: object) -> None:
        if not isinstance(camera, dict) or not isinstance(camera.get("id"), str):
            self.violations.append(f"{where}: a camera entry without an id: {camera!r}")
            return
        cid = camera["id"]
        missing = [k for k in ("name", "state", "error", "video", "audio") if k not in camera]
        if missing:
            self.violations.append(f"{where}: camera {cid}: no {missing} (null when none)")
        if camera.get("state") not in CAMERA_STATES:
            self.violations.append(f"{where}: camera {cid}: state {camera.get('state')!r}")
        secret = SECRET_CAMERA_KEYS & {str(k).lower() for k in camera}
        if secret:
            self.violations.append(f"{where}: camera {cid} carries {sorted(secret)}")
        for kind, keys in (("video", ("codec", "width", "height", "fps")), ("audio", ("codec",))):
            value = camera.get(kind)
            if value is None and kind == "video" and camera.get("state") == "online":
                self.violations.append(f"{where}: camera {cid} is online with video null")
            if value is not None and (not isinstance(value, dict)
                                        or not all(k in value for k in keys)):
                self.violations.append(f"{where}: camera {cid}: {kind} {value!r}")

    async def _ack(self, link: Link, message: Message, ok: bool = True,
                   code: str = "", text: str = "") -> None:
        fields: Message = {"ack": message["id"], "ok": ok}
        if not ok:
            fields["error"] = {"code": code, "message": text}
        answer = self._message("ack", fields)
        self._answers[(link.agent_id, message["id"])] = fields
        await self._send_quietly(link, answer)

    async def _dispatch(self, link: Link, message: Message) -> bool:
        """Handle one steady-state message; False when the connection was closed."""
        kind = message["type"]
        if link.mismatch:
            self.violations.append(f"the agent sent {kind} after a welcome naming another "
                                   "agent id")
        if kind == "ack":
            self._on_ack(message)
            return True
        if kind == "hello":
            if link.hello is not None and message["id"] == link.hello["id"] \
                    and link.welcome is not None:
                self.duplicates.append(message)
                await self._send_quietly(link, link.welcome)
                return True
            await self._close(link, "protocol_error")  # a second hello: wrong order
            return False
        if kind == "pong":
            return True
        if kind == "ping":
            await self._send_quietly(link, self._message("pong", {"ping": message["id"]}))
            return True
        key = (link.agent_id, message["id"])
        if key in self._answers:  # a repeated id is the same message (1.2)
            self.duplicates.append(message)
            previous = self._answers[key]
            if previous is not None:
                await self._send_quietly(link, self._message("ack", dict(previous)))
            return True
        if kind == "cameras.update":
            await self._on_cameras(link, message)
        elif kind == "publish.status":
            await self._on_status(link, message)
        elif kind == "usage":
            await self._on_usage(link, message)
        else:  # (choice) any unknown type is answered, whether it wanted an ack or not
            await self._ack(link, message, False, "unsupported", f"unknown type {kind!r}")
        return True

    def _on_ack(self, message: Message) -> None:
        target = message.get("ack")
        if not isinstance(target, str) or not isinstance(message.get("ok"), bool):
            self.violations.append(f"ack without ack id or ok: {message!r}")
            return
        if not message["ok"] and not (isinstance(message.get("error"), dict)
                                      and "code" in message["error"]):
            self.violations.append(f"ack ok:false without error.code: {message!r}")
        original = self._unacked.pop(target, None) or next(
            (m for m in self.sent if m["id"] == target), None)
        if original is None:
            self.violations.append(f"ack of an id the relay never sent: {target}")
        elif original["type"] == "publish":
            sid = str(original["session_id"])
            if message["ok"]:
                self._active.add(sid)
            else:
                code = (message.get("error") or {}).get("code")
                self._expect(f"publish {sid} refused ({code}) without publish.status failed",
                             lambda: self._has_status(sid, "failed", code))
        elif original["type"] == "tokens.sync" and message["ok"]:
            if message.get("cursor") != original["cursor"]:
                self.violations.append(f"tokens.sync ack carries cursor "
                                       f"{message.get('cursor')!r}, not {original['cursor']!r}")
            self.agent_cursor = message.get("cursor")
            refused = message.get("refused", [])
            if not isinstance(refused, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("token_id"), str)
                    and r.get("code") in SYNC_REFUSALS and isinstance(r.get("message"), str)
                    for r in refused):
                self.violations.append(f"tokens.sync ack: malformed refused list {refused!r}")
        self.acks.setdefault(target, message)
        self._notify()

    async def _on_cameras(self, link: Link, message: Message) -> None:
        cameras, removed = message.get("cameras"), message.get("removed", [])
        if not isinstance(cameras, list) or not isinstance(removed, list):
            self.violations.append("cameras.update: cameras/removed are not lists")
            await self._ack(link, message, False, "invalid", "cameras and removed are lists")
            return
        for camera in cameras:
            self._check_camera("cameras.update", camera)
            if isinstance(camera, dict) and self.cameras.get(str(camera.get("id"))) == camera:
                self.violations.append(f"cameras.update: camera {camera['id']} did not change")
            if isinstance(camera, dict) and isinstance(camera.get("id"), str):
                self.cameras[camera["id"]] = camera
        for cid in removed:
            self.cameras.pop(str(cid), None)
        await self._ack(link, message)

    async def _on_status(self, link: Link, message: Message) -> None:
        sid, state, error = message.get("session_id"), message.get("state"), message.get("error")
        if not isinstance(sid, str) or state not in PUBLISH_STATES:
            self.violations.append(f"publish.status: session_id/state: {message!r}")
            await self._ack(link, message, False, "invalid", "session_id and state needed")
            return
        if error is not None and not (isinstance(error, dict) and "code" in error):
            self.violations.append(f"publish.status: error is not null|{{code, message}}: "
                                   f"{error!r}")
        if state == "failed" and error is None:
            self.violations.append(f"publish.status failed without error: {sid}")
        self.statuses.setdefault(sid, []).append(message)
        if state in ("stopped", "failed"):
            self._active.discard(sid)
        await self._ack(link, message)

    async def _on_usage(self, link: Link, message: Message) -> None:
        batch, events = message.get("batch"), message.get("events")
        if not isinstance(batch, str) or not isinstance(events, list):
            self.violations.append(f"usage: batch/events: {message!r}")
            await self._ack(link, message, False, "invalid", "batch and events needed")
            return
        if len(events) > 1000:
            self.violations.append(f"usage: batch {batch} holds {len(events)} events (> 1000)")
        if batch not in self.usage_batches:  # batch makes resends idempotent (1.5)
            for event in events:
                if not isinstance(event, dict) or "token_id" not in event \
                        or not _is_number(event.get("ts")) \
                        or not isinstance(event.get("result"), str):
                    self.violations.append(f"usage: event {event!r}")
            self.usage_batches[batch] = events
            self.usage_events.extend(events)
            self._notify()
        if self.ack_usage:
            await self._ack(link, message)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- WHIP (section 2, RFC 9725) -----------------------------------------------------

    def _whip_error(self, request: web.Request, status: int, error: str,
                    headers: dict[str, str] | None = None) -> web.Response:
        self.whip_requests.append((request.method, request.path, status))
        self._notify()
        return web.json_response({"error": error, "message": error}, status=status,
                                 headers=headers)

    def _whip_auth(self, request: web.Request, session: WhipSession) -> tuple[int, str] | None:
        """None when the bearer may publish to ``session``, else (status, error)."""
        scheme, _, text = request.headers.get("Authorization", "").partition(" ")
        text = text.strip()
        if scheme.lower() != "bearer" or not text:
            return 401, "token_invalid"
        if session.bearer is not None:  # (choice) the publish bearer, and only it
            return None if text == session.bearer else (401, "token_invalid")
        publisher = self._publisher_of(f"Bearer {text}")
        if isinstance(publisher, str):
            return 401, publisher
        if publisher.permission != "publish":
            return 403, "read_only"
        if session.agent_id is not None and publisher.agent_id not in (None, session.agent_id):
            return 403, "agent_not_allowed"
        return None

    async def _whip(self, request: web.Request) -> web.StreamResponse:
        parts = request.match_info["path"].split("/")
        if len(parts) >= 3 and parts[-2] == "resource":
            return await self._whip_resource(request, "/".join(parts[:-2]), parts[-1])
        hop = 0
        if len(parts) >= 3 and parts[-2] == "hop" and parts[-1].isdigit():
            hop, parts = int(parts[-1]), parts[:-2]
        if request.method != "POST":
            return self._whip_error(request, 405, "method_not_allowed", {"Allow": "POST"})
        key = "/".join(parts)
        session = self.sessions.get(key)
        if session is None and len(parts) == 2:  # always mode: {whip_base}/{agent}/{camera}
            session = WhipSession(key, parts[1], f"{self.whip_base}/{key}", agent_id=parts[0])
            self.sessions[key] = session
        if session is None or session.unpublished or len(parts) > 2:
            return self._whip_error(request, 404, "unknown_session")
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith("therelay-agent/"):
            self.violations.append(f"WHIP POST: User-Agent {agent!r} is not "
                                   "therelay-agent/<version>")
        if self.whip_redirect and hop < self.whip_redirect_hops:
            self.whip_requests.append((request.method, request.path, self.whip_redirect_status))
            return web.Response(status=self.whip_redirect_status,
                                headers={"Location": f"/whip/{key}/hop/{hop + 1}"})
        problem = self._whip_auth(request, session)
        if problem is not None:
            return self._whip_error(request, *problem)
        if request.content_type != "application/sdp":
            return self._whip_error(request, 415, "unsupported_media_type",
                                    {"Accept-Post": "application/sdp"})
        if self.whip_fail is not None:
            return self._whip_error(request, self.whip_fail, "forced_failure")
        offer = await request.text()
        return await self._answer(request, session, offer)

    async def _answer(self, request: web.Request, session: WhipSession,
                      offer: str) -> web.Response:
        directions = re.findall(r"^a=(sendonly|recvonly|sendrecv|inactive)\s*$", offer, re.M)
        if any(d not in ("sendonly", "inactive") for d in directions):
            self.violations.append(f"WHIP {session.id}: the offer is not sendonly: {directions}")
        if "a=candidate:" not in offer:
            self.violations.append(f"WHIP {session.id}: the offer has no ICE candidates "
                                   "(they are gathered first, no trickle)")
        rid = uuid.uuid4().hex[:16]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never a public STUN server
        bearer = request.headers.get("Authorization", "").partition(" ")[2]
        resource = WhipResource(rid, session.id, f"/whip/{session.id}/resource/{rid}", pc,
                                bearer.strip(), offer)

        def on_track(track: MediaStreamTrack) -> None:
            resource.tracks[track.kind] = track
            task = asyncio.ensure_future(self._consume(resource, track))
            resource.tasks.append(task)

        def on_state() -> None:
            self._notify()
            if pc.connectionState == "failed":
                self._spawn(pc.close())

        pc.on("track", on_track)
        pc.on("connectionstatechange", on_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as error:  # an offer aiortc cannot answer
            await self._end_resource(resource)
            self.violations.append(f"WHIP {session.id}: unusable offer: {error}")
            return self._whip_error(request, 400, "bad_offer")
        resource.answer = pc.localDescription.sdp
        session.resources.append(resource)
        headers = CIMultiDict({"Location": resource.location, "ETag": f'"{rid}"'})
        for server in self.whip_ice_servers:
            for url in server.get("urls", []):
                link = f'<{url}>; rel="ice-server"'
                if server.get("username") is not None:
                    link += f'; username="{server["username"]}"'
                    link += f'; credential="{server.get("credential", "")}"'
                    link += '; credential-type="password"'
                headers.add("Link", link)
        self.whip_requests.append((request.method, request.path, 201))
        self._notify()
        return web.Response(status=201, body=resource.answer.encode(),
                            content_type="application/sdp", headers=headers)

    async def _whip_resource(self, request: web.Request, key: str,
                             rid: str) -> web.StreamResponse:
        session = self.sessions.get(key)
        resource = None if session is None else next(
            (r for r in session.resources if r.id == rid and not r.deleted), None)
        if request.method == "PATCH":  # no trickle ICE, no ICE restart (RFC 9725 §4.3)
            return self._whip_error(request, 405, "trickle_unsupported", {"Allow": "DELETE"})
        if request.method != "DELETE":
            return self._whip_error(request, 405, "method_not_allowed",
                                    {"Allow": "DELETE, PATCH"})
        if session is None or resource is None:
            return self._whip_error(request, 404, "unknown_resource")
        problem = self._whip_auth(request, session)
        if problem is not None:
            return self._whip_error(request, *problem)
        resource.deleted = True
        await self._end_resource(resource)
        self.whip_requests.append((request.method, request.path, 200))
        self._notify()
        return web.Response(status=200)

    async def _consume(self, resource: WhipResource, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.VideoFrame | av.AudioFrame):
                resource.latest[track.kind] = frame
                resource.counts[track.kind] = resource.counts.get(track.kind, 0) + 1
                self._notify()

    async def _end_resource(self, resource: WhipResource) -> None:
        await resource.pc.close()
        for task in resource.tasks:
            task.cancel()
        await asyncio.gather(*resource.tasks, return_exceptions=True)
        resource.tasks.clear()
        self._notify()
