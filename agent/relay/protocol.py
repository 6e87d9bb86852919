"""The agent's side of the relay protocol (docs/relay-protocol.md v1.1) as a state machine.

No sockets, no clock of its own, no database: like python-websockets' ``Protocol``, the
link feeds it what happened (a connection refused or closed, a message received, a
WHIP session's progress) and it answers with **actions**: messages to send, a close, token
records to apply, publish sessions to start or stop, and for a lost connection the delay
before the next attempt. Every rule of the document that concerns one connection or the
sequence of connections lives here, so the unit tests check the rules without I/O.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from agent.relay.messages import (
    ACKED_BY_RELAY,
    ACKED_TYPES,
    MAX_MESSAGE,
    MAX_SYNC_MESSAGE,
    SUBPROTOCOL,
    Acked,
    Event,
    Invalid,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    SyncedToken,
    TokensRevoke,
    TokensSync,
    TooBig,
    Unpublish,
    Unsupported,
    Welcome,
    ack,
    envelope,
    hello,
    parse,
    parse_steps,
    pong,
    publish_status,
    usage_batch,
)
from agent.retry import backoff

__all__ = ["MAX_MESSAGE", "MAX_SYNC_MESSAGE", "SUBPROTOCOL", "ProtocolError", "SyncedToken",
           "Welcome", "envelope", "hello", "parse", "parse_steps", "usage_batch"]

log = structlog.get_logger("agent.relay.link")

#: Close codes (section 1.6) by number.
CLOSE_REASONS = {
    1000: "normal", 1001: "going_away", 1009: "message_too_big", 1011: "internal_error",
    4001: "token_invalid", 4002: "token_expired", 4003: "token_revoked",
    4005: "agent_not_allowed", 4006: "version_unsupported", 4008: "replaced",
    4009: "protocol_error",
}
CLOSE_CODES = {name: code for code, name in CLOSE_REASONS.items()}
#: Refusals that mean the publisher token (or its binding) is not accepted: slow retries.
TOKEN_REJECTIONS = frozenset({"token_invalid", "token_expired", "token_revoked",
                              "agent_not_allowed", "version_unsupported"})
ADVICE = {
    "token_invalid": "the publisher token is not valid: copy it again from TheRelay Dashboard "
                     "(Settings > Tokens) into relay.publisher_token_file",
    "token_expired": "the publisher token has expired: create a new one in TheRelay Dashboard",
    "token_revoked": "the publisher token was revoked: create a new one in TheRelay Dashboard",
    "agent_not_allowed": "the publisher token is bound to another agent: set agent.id to the "
                         "agent the token was made for, or use an account-level token",
    "version_unsupported": "the relay does not speak this agent's protocol version: upgrade "
                           "the agent",
}

#: Retry schedule (section 3): attempt n after a failure of one kind waits a random time
#: in [low, min(cap, first * 2**(n-1))] (full jitter); both counts restart after a session
#: that lasted STABLE_AFTER seconds from its welcome.
ORDINARY_FIRST, ORDINARY_CAP = 1.0, 60.0
REJECTED_FIRST, REJECTED_CAP = 30.0, 300.0
STABLE_AFTER = 30.0
WELCOME_TIMEOUT = 10.0
#: welcome.heartbeat_s is honoured within these bounds (section 1.4).
HEARTBEAT_DEFAULT, HEARTBEAT_MIN, HEARTBEAT_MAX = 20.0, 5.0, 120.0
#: Relay message ids remembered for idempotent answers (section 1.2).
REMEMBERED_IDS = 1024
#: Agent messages awaiting the relay's ack, at most (oldest forgotten first).
AWAITING_MAX = 4096
#: Publish sessions running at once, at most (a relay asking for more gets too_many_sessions).
MAX_SESSIONS = 64
#: A camera's fps is reported rounded, and changes only by at least this much (1.3).
FPS_STEP = 1.0


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"  # welcomed by the relay
    REJECTED = "rejected"  # the relay refused the publisher token (see last_error)
    DISCONNECTED = "disconnected"  # not configured, or between attempts


class Rejected(Exception):
    """The relay refused the publisher token or this agent; ``reason`` is the code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    message: dict[str, Any]


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True)
class ApplySync:
    event: TokensSync


@dataclass(frozen=True)
class ApplyRevoke:
    event: TokensRevoke


@dataclass(frozen=True)
class StartPublish:
    event: Publish


@dataclass(frozen=True)
class StopPublish:
    session_id: str
    error: tuple[str, str] | None = None  # reported with "stopped", if any


@dataclass(frozen=True)
class AckReceived:
    """The relay acknowledged one of the agent's messages (the usage loop waits for it)."""

    event: Acked
    kind: str


Action = Send | Close | ApplySync | ApplyRevoke | StartPublish | StopPublish | AckReceived


@dataclass(frozen=True)
class Retry:
    """What a lost connection means: wait ``delay`` seconds (``state`` says which kind)."""

    delay: float
    reason: str
    attempt: int


# -- connection ends ------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """The upgrade was answered with an HTTP status (body's ``error`` code, if any)."""

    status: int
    error: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Closed:
    """The WebSocket closed: ``code`` of the close frame, ``by_agent`` if the agent sent it
    first (None: no close frame, 1006)."""

    code: int | None
    by_agent: bool = False


@dataclass(frozen=True)
class Failed:
    """Any other failure (DNS, TCP, TLS, timeouts, no welcome): described in words."""

    description: str


End = Refused | Closed | Failed


def refusal_reason(status: int, error: str | None) -> str | None:
    """The rejection code of an HTTP refusal (1.1), or None for an ordinary failure."""
    if status in (401, 403, 426) and error in TOKEN_REJECTIONS:
        return error
    return {401: "token_invalid", 403: "agent_not_allowed", 426: "version_unsupported"}.get(
        status)


def describe(end: End) -> str:
    if isinstance(end, Refused):
        return f"the relay answered HTTP {end.status}" + (f" ({end.error})" if end.error
                                                            else "")
    if isinstance(end, Closed):
        if end.code is None:
            return "connection lost (1006, no close frame)"
        name = CLOSE_REASONS.get(end.code, "")
        who = "the agent closed the connection" if end.by_agent else "the relay closed the " \
                                                                     "connection"
        return f"{who} ({end.code} {name})".replace(" )", ")")
    return end.description


class RelayProtocol:
    """One agent's relay link, across connections."""

    def __init__(self, agent_id: str, version: str, has_camera: Callable[[str], bool],
                 rng: random.Random | None = None) -> None:
        self.agent_id = agent_id
        self.version = version
        self._has_camera = has_camera
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.welcome: Welcome | None = None
        self.state = LinkState.DISCONNECTED
        self.last_error: str | None = None
        self._welcomed_at: float | None = None
        self._ordinary: Iterator[float] = backoff(ORDINARY_FIRST, ORDINARY_CAP, rng=self._rng)
        self._rejected: Iterator[float] = backoff(REJECTED_FIRST, REJECTED_CAP, rng=self._rng)
        self._failures = 0
        self._last_outcome: tuple[str, str] | None = None  # what was last said loudly
        self._closing: str | None = None  # the agent closed on purpose: the reason code
        self._closing_text: str | None = None  # …and how to say it
        self._answered: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._awaiting: OrderedDict[str, str] = OrderedDict()  # message id → type
        self.sessions: dict[str, str] = {}  # session id → last reported state
        self._camera_of: dict[str, str] = {}  # running session id → its camera id
        self._lost: dict[str, dict[str, Any]] = {}  # session id → its unacked "stopped"
        self._reported: dict[str, dict[str, Any]] = {}  # camera id → entry last sent
        self._read_only_said = False

    # -- connecting -------------------------------------------------------------------------

    def connecting(self) -> None:
        self.state = LinkState.CONNECTING
        self.welcome, self._welcomed_at, self._closing = None, None, None
        self._closing_text = None

    def hello(self, cursor: str | None, cameras: list[dict[str, Any]]) -> dict[str, Any]:
        """The first message on a new connection (1.3)."""
        self._reported = {c["id"]: normalized(c) for c in cameras}
        return hello(self.agent_id, self.version, cursor, list(self._reported.values()))

    @property
    def heartbeat_s(self) -> float:
        """WebSocket ping interval, and how long a pong may take (1.4)."""
        wanted = self.welcome.heartbeat_s if self.welcome else HEARTBEAT_DEFAULT
        return min(HEARTBEAT_MAX, max(HEARTBEAT_MIN, wanted))

    def no_welcome(self) -> list[Action]:
        """WELCOME_TIMEOUT passed after hello without a welcome: close with 4009."""
        self._closing = "no_welcome"
        self._closing_text = (f"the relay accepted the connection but sent no welcome within "
                              f"{WELCOME_TIMEOUT:g} s")
        return [Close(CLOSE_CODES["protocol_error"], "no welcome")]

    def heartbeat_lost(self) -> list[Action]:
        """No pong frame within heartbeat_s of a ping frame: close with 1011."""
        self._closing = "heartbeat"
        self._closing_text = f"no pong from the relay within {self.heartbeat_s:g} s"
        return [Close(1011, "keepalive ping timeout")]

    # -- receiving --------------------------------------------------------------------------

    def protocol_error(self, error: ProtocolError) -> list[Action]:
        """The relay broke the envelope: close with 4009 (or 1009 for a too-big message)."""
        log.warning("relay_protocol_error", error=str(error))
        too_big = isinstance(error, TooBig)
        self._closing = "message_too_big" if too_big else "protocol_error"
        return [Close(1009 if too_big else CLOSE_CODES["protocol_error"],
                      "message too big" if too_big else "protocol_error")]

    def handle(self, event: Event, now: float) -> list[Action]:
        """One parsed message from the relay."""
        if self.welcome is None:
            return self._first(event, now)
        if isinstance(event, Acked):
            return self._acked(event)
        if isinstance(event, Ping):
            return [Send(pong(event.message_id))]
        if isinstance(event, Pong):
            return []
        if isinstance(event, Welcome) or (isinstance(event, Invalid)
                                          and event.kind == "welcome"):
            return self.protocol_error(ProtocolError("a second welcome"))
        if event.message_id in self._answered:  # a repeated id is the same message (1.2)
            previous = self._answered[event.message_id]
            log.debug("relay_repeated_message", id=event.message_id)
            return [] if previous is None else [Send(previous)]
        self._answered[event.message_id] = None  # in progress: a repeat now is ignored
        while len(self._answered) > REMEMBERED_IDS:
            self._answered.popitem(last=False)
        if isinstance(event, Invalid):
            log.warning("relay_invalid_message", problem=event.problem)
            if event.kind in ACKED_TYPES:
                return [self._answer(event.message_id, ("invalid", event.problem))]
            return []
        if isinstance(event, Unsupported):
            return [self._answer(event.message_id, ("unsupported",
                                                    f"unknown message type {event.kind!r}"))]
        if isinstance(event, TokensSync):
            return [ApplySync(event)]
        if isinstance(event, TokensRevoke):
            return [ApplyRevoke(event)]
        if isinstance(event, Publish):
            return self._publish(event)
        assert isinstance(event, Unpublish)
        actions: list[Action] = [self._answer(event.message_id)]
        if self.sessions.get(event.session_id) in ("accepted", "starting", "live"):
            actions.append(StopPublish(event.session_id))
        return actions

    def _first(self, event: Event, now: float) -> list[Action]:
        if not isinstance(event, Welcome):
            problem = event.problem if isinstance(event, Invalid) else \
                "the relay must answer hello with welcome"
            return self.protocol_error(ProtocolError(problem))
        if event.agent_id != self.agent_id:
            # 1.3: never adopt another id; close as the relay would have (4005).
            self._closing = "agent_not_allowed"
            log.warning("relay_welcome_agent_mismatch", ours=self.agent_id,
                        welcome=event.agent_id)
            return [Close(CLOSE_CODES["agent_not_allowed"], "agent_not_allowed")]
        self.welcome, self._welcomed_at = event, now
        self.state, self.last_error = LinkState.CONNECTED, None
        if self._failures:
            log.info("relay_reconnecting", after_attempts=self._failures)
        self._last_outcome = None
        log.info("relay_connected", account=event.account_id, agent=event.agent_id,
                 permission=event.permission, heartbeat_s=self.heartbeat_s)
        if event.permission == "read" and not self._read_only_said:
            self._read_only_said = True
            log.warning("relay_read_only", fix="this publisher token is read-only: cameras "
                        "are registered and reported, never published")
        # 1.3, section 3: sessions the last drop ended are reported first, same ids.
        return [Send(self._track(m)) for m in self._lost.values()]

    def _answer(self, message_id: str, error: tuple[str, str] | None = None,
                **fields: Any) -> Send:
        answer = ack(message_id, error, **fields)
        if message_id in self._answered:
            self._answered[message_id] = answer
        return Send(answer)

    def _publish(self, event: Publish) -> list[Action]:
        sid = event.session_id
        assert self.welcome is not None
        refusal: tuple[str, str] | None = None
        if self.welcome.permission != "publish":
            refusal = ("read_only", "the publisher token is read-only")
        elif not self._has_camera(event.camera_id):
            refusal = ("unknown_camera", f"no camera {event.camera_id!r} on this agent")
        elif self.sessions.get(sid) in ("accepted", "starting", "live"):
            return [self._answer(event.message_id)]  # already running: nothing new
        elif sum(1 for s in self.sessions.values()
                 if s in ("accepted", "starting", "live")) >= MAX_SESSIONS:
            refusal = ("too_many_sessions", f"at most {MAX_SESSIONS} publish sessions")
        if refusal is not None:
            # 1.4: a refused publish is acked ok:false AND ends with publish.status failed.
            self.sessions[sid] = "failed"
            return [self._answer(event.message_id, refusal),
                    Send(self._track(publish_status(sid, "failed", refusal)))]
        self.sessions[sid] = "accepted"
        self._camera_of[sid] = event.camera_id
        return [self._answer(event.message_id), StartPublish(event)]

    def _acked(self, event: Acked) -> list[Action]:
        kind = self._awaiting.pop(event.message_id, None)
        if kind is None:  # 1.2: acks nobody asked for are ignored
            log.debug("relay_ack_ignored", ack=event.message_id)
            return []
        for sid, message in list(self._lost.items()):
            if message["id"] == event.message_id:
                del self._lost[sid]
        if not event.ok:
            log.warning("relay_refused_message", type=kind, ack=event.message_id,
                        error=event.error)
        return [AckReceived(event, kind)]

    def _track(self, message: dict[str, Any]) -> dict[str, Any]:
        if message["type"] in ACKED_BY_RELAY:
            self._awaiting[message["id"]] = message["type"]
            while len(self._awaiting) > AWAITING_MAX:
                self._awaiting.popitem(last=False)
        return message

    def send(self, message: dict[str, Any]) -> Send:
        """An agent message built elsewhere (usage): tracked for its ack."""
        return Send(self._track(message))

    # -- results of actions -----------------------------------------------------------------

    def sync_applied(self, event: TokensSync,
                     refused: Sequence[dict[str, Any]] = ()) -> list[Action]:
        """The records are stored: ack with the cursor applied (1.5). ``refused``: per-token
        refusals (``{"id", "code"}``), carried by the ack when there are any."""
        extra: dict[str, Any] = {"refused": list(refused)} if refused else {}
        return [self._answer(event.message_id, cursor=event.cursor, **extra)]

    def sync_failed(self, event: TokensSync, why: str) -> list[Action]:
        """Nothing was applied (the database failed): the relay may send it again."""
        self._answered.pop(event.message_id, None)
        return [Send(ack(event.message_id, ("internal", why)))]

    def revoke_applied(self, event: TokensRevoke) -> list[Action]:
        return [self._answer(event.message_id)]

    def publish_state(self, session_id: str, state: str,
                      error: tuple[str, str] | None = None) -> list[Action]:
        """A WHIP session moved on (section 2); reported unless the session is over."""
        if self.sessions.get(session_id) in (None, "failed", "stopped"):
            return []
        self.sessions[session_id] = state
        if state in ("failed", "stopped"):
            del self.sessions[session_id]
            self.sessions[session_id] = state
            self._camera_of.pop(session_id, None)
            self._forget_ended()
        if self.welcome is None:
            return []
        return [Send(self._track(publish_status(session_id, state, error)))]

    def _forget_ended(self) -> None:
        ended = [s for s, st in self.sessions.items() if st in ("failed", "stopped")]
        for sid in ended[:-REMEMBERED_IDS]:
            del self.sessions[sid]

    def inventory(self, cameras: list[dict[str, Any]]) -> list[Action]:
        """cameras.update for what changed since it was last reported (1.4)."""
        now = {c["id"]: normalized(c, self._reported.get(c["id"])) for c in cameras}
        changed = [c for cid, c in now.items() if self._reported.get(cid) != c]
        removed = [cid for cid in self._reported if cid not in now]
        self._reported = now
        actions: list[Action] = []
        if changed or removed:
            actions.append(Send(self._track(envelope("cameras.update", cameras=changed,
                                                     removed=removed))))
        # A camera removed from the agent ends its sessions (1.4: stopped, camera_removed).
        for sid, cid in list(self._camera_of.items()):
            if cid not in now and self.sessions.get(sid) in ("accepted", "starting", "live"):
                actions.append(StopPublish(sid, ("camera_removed",
                                                 f"camera {cid!r} was removed from the agent")))
        return actions

    # -- ending -----------------------------------------------------------------------------

    def connection_ended(self, end: End, now: float) -> Retry:
        """The connection (or the attempt) is over: publish sessions end, and the delay
        before the next attempt follows section 3."""
        if self._welcomed_at is not None and now - self._welcomed_at >= STABLE_AFTER:
            self._reset()
        for sid, state in list(self.sessions.items()):
            if state in ("accepted", "starting", "live"):
                self.sessions[sid] = "stopped"
                self._camera_of.pop(sid, None)
                self._lost[sid] = self._track(publish_status(
                    sid, "stopped", ("channel_lost", "the control channel dropped")))
        self.welcome, self._welcomed_at = None, None
        reason = self._rejection(end)
        self._failures += 1
        if reason is not None:
            delay = next(self._rejected)
            self.state, self.last_error = LinkState.REJECTED, reason
            loud = self._last_outcome != ("rejected", reason)
            self._last_outcome = ("rejected", reason)
            (log.error if loud else log.debug)(
                "relay_rejected_agent", reason=reason, fix=ADVICE[reason],
                detail=describe(end), attempt=self._failures, retry_in_s=round(delay, 1))
            return Retry(delay, reason, self._failures)
        delay = next(self._ordinary)
        description = describe(end)
        if self._closing_text is not None and isinstance(end, Closed) and end.by_agent:
            description = self._closing_text
        self.state, self.last_error = LinkState.DISCONNECTED, description
        loud = self._last_outcome != ("failed", description)
        self._last_outcome = ("failed", description)
        if isinstance(end, Closed) and end.code == CLOSE_CODES["replaced"]:
            log.warning("relay_replaced", fix="another connection for this agent id replaced "
                        "this one: if two agents share agent.id, give each its own")
        (log.warning if loud else log.debug)(
            "relay_unavailable", error=description, attempt=self._failures,
            retry_in_s=round(delay, 1))
        return Retry(delay, description, self._failures)

    def _rejection(self, end: End) -> str | None:
        if isinstance(end, Refused):
            return refusal_reason(end.status, end.error)
        if isinstance(end, Closed):
            if self._closing == "agent_not_allowed" and end.by_agent:
                return "agent_not_allowed"
            name = CLOSE_REASONS.get(end.code or 0)
            if not end.by_agent and name in TOKEN_REJECTIONS:
                return name
        return None

    def _reset(self) -> None:
        self._ordinary = backoff(ORDINARY_FIRST, ORDINARY_CAP, rng=self._rng)
        self._rejected = backoff(REJECTED_FIRST, REJECTED_CAP, rng=self._rng)
        self._failures = 0


def normalized(camera: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    """An inventory entry as reported: fps rounded to a whole number, and a change smaller
    than FPS_STEP keeps the value last reported (so 15.0 ↔ 15.2 jitter is no update)."""
    video = camera.get("video")
    if not isinstance(video, dict) or not isinstance(video.get("fps"), int | float):
        return camera
    fps = float(video["fps"])
    before = (last or {}).get("video")
    if isinstance(before, dict) and isinstance(before.get("fps"), int) \
            and abs(fps - before["fps"]) < FPS_STEP:
        return {**camera, "video": {**video, "fps": before["fps"]}}
    return {**camera, "video": {**video, "fps": round(fps)}}
