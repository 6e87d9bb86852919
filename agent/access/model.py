"""Token records and their parts: scope, protocols, permission, lifetime."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from agent.access.tokens import Kind, display


class Protocol(StrEnum):
    """Ways a LAN client consumes a camera. An empty protocol set on a token means all."""

    WEBRTC = "webrtc"
    RTSP = "rtsp"
    HLS = "hls"
    SNAPSHOT = "snapshot"


#: The protocols this agent serves; what reports per protocol (/metrics) reads this, so
#: nothing shows a protocol that no server answers. (Tokens may be restricted to any Protocol.)
SERVED_PROTOCOLS: tuple[Protocol, ...] = (Protocol.WEBRTC, Protocol.RTSP, Protocol.HLS,
                                          Protocol.SNAPSHOT)
#: Served protocols whose viewers hold a live session (a snapshot is one request); they
#: count against a token's ``max_sessions``.
SESSION_PROTOCOLS: tuple[Protocol, ...] = tuple(
    p for p in SERVED_PROTOCOLS if p is not Protocol.SNAPSHOT)

class Action(StrEnum):
    """What a request wants to do, apart from how (its protocol), as MediaMTX's auth.Request
    separates action and protocol."""

    #: Watch a camera over a protocol (WHEP offer, snapshot, RTSP PLAY, HLS playlist).
    VIEW = "view"
    #: List the cameras a token may see: any access token, whatever its protocols; the list
    #: is then filtered by the token's scope.
    LIST = "list"
    #: The admin API and /metrics: an admin token rather than an access token.
    ADMIN = "admin"


#: The name the audit log and the usage counters give a request that is not about viewing,
#: in their ``protocol`` column (kept as earlier releases wrote it: docs/tokens.md section 9).
RECORDED_ACTION: dict[Action, str] = {Action.LIST: "api", Action.ADMIN: "admin"}


class Permission(StrEnum):
    """Publisher tokens only: may the holder publish, or only register and report?"""

    READ = "read"
    PUBLISH = "publish"


class ScopeLevel(StrEnum):
    CAMERA = "camera"
    HOST = "host"
    ACCOUNT = "account"


_SCOPE_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Scope:
    """``camera:<id>`` | ``host:<agent_id>`` | ``account:<account_id>``; matched exactly."""

    level: ScopeLevel
    value: str

    @classmethod
    def parse(cls, text: str) -> Scope:
        level, sep, value = text.partition(":")
        if not sep or level not in ScopeLevel.__members__.values():
            raise ValueError(
                f"scope {text!r} must be camera:<id>, host:<agent id> or account:<account id>"
            )
        if not _SCOPE_VALUE.fullmatch(value):
            raise ValueError(
                f"scope value {value!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        return cls(ScopeLevel(level), value)

    def __str__(self) -> str:
        return f"{self.level}:{self.value}"


def is_identifier(text: str) -> bool:
    """Camera, agent and account ids share the scope-value alphabet."""
    return _SCOPE_VALUE.fullmatch(text) is not None


def parse_protocols(text: str) -> frozenset[Protocol]:
    """``"webrtc,snapshot"`` → a set; empty text → empty set (= all protocols)."""
    items = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in Protocol.__members__.values()]
    if bad:
        allowed = ", ".join(p.value for p in Protocol)
        raise ValueError(f"unknown protocol {bad[0]!r}; choose from {allowed}")
    return frozenset(Protocol(p) for p in items)


_DURATION = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION = 100 * 365 * 86400.0  # longer would reach past year 9999 soon enough
#: Labels are for people: a line, not a document.
MAX_LABEL = 200
#: The largest per-token session cap: far above any real use, low enough to stay a number
#: every client (JavaScript included) keeps exactly and to say "this is a typo".
MAX_SESSIONS_CAP = 10_000


def check_max_sessions(value: object) -> int | None:
    """A session cap: a whole number from 1 to MAX_SESSIONS_CAP, or None for no cap."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("max_sessions must be a whole number (or null for no cap)")
    if not 1 <= value <= MAX_SESSIONS_CAP:
        raise ValueError(f"max_sessions must be from 1 to {MAX_SESSIONS_CAP} "
                         "(leave it out for no cap; revoke the token to stop it)")
    return value


def parse_max_sessions(text: str) -> int | None:
    """``--max-sessions``: a number, or ``none``/``unlimited`` for no cap."""
    raw = text.strip().lower()
    if raw in ("none", "unlimited"):
        return None
    try:
        number = int(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number (or 'unlimited')") from None
    return check_max_sessions(number)


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1h``, ``1d``, ``1w``, or combinations like ``1h30m`` → seconds."""
    if len(text) > 32:  # also keeps the scan below linear in practice
        raise ValueError("duration must be at most 32 characters, like 1h30m")
    compact = text.strip().lower().replace(" ", "")
    pos, total = 0, 0
    for m in _DURATION.finditer(compact):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not compact or pos != len(compact) or total <= 0:
        raise ValueError(f"duration {text!r} must look like 30m, 1h, 1d, 1w or 1h30m")
    if total > MAX_DURATION:
        raise ValueError("duration must be at most 100 years")
    return float(total)


def parse_time(text: str) -> float:
    """An ISO 8601 time (``2026-12-01T00:00Z``; no zone means UTC) → epoch seconds."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"time {text!r} must be ISO 8601, like 2026-12-01T00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        utc = datetime.max.replace(tzinfo=UTC)
    if utc.year >= 9999:
        raise ValueError(f"time {text!r} must be before the year 9999")
    return moment.timestamp()


def format_time(epoch: float | None) -> str:
    """Epoch seconds → ``2026-12-01T00:00:00Z`` (``-`` for none)."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Origin(StrEnum):
    LOCAL = "local"
    RELAY = "relay"


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """Everything the agent knows about a token, except the token itself (only its hash)."""

    id: str
    kind: Kind
    scope: Scope
    secret_hash: bytes
    last4: str
    created_at: float
    protocols: frozenset[Protocol] = frozenset()
    permission: Permission | None = None
    expires_at: float | None = None
    #: Set when the expiry was given as a duration: rotation then grants the same duration
    #: again, while an absolute expiry stays the same absolute time.
    ttl: float | None = None
    label: str = ""
    created_by: str = ""
    origin: Origin = Origin.LOCAL
    revoked_at: float | None = None
    replaced_by: str | None = None
    replaces: str | None = None
    last_used_at: float | None = None
    #: How many live sessions (WebRTC, RTSP, HLS…) the token may hold at once; None: no cap.
    max_sessions: int | None = None
    rev: int = field(default=0, compare=False)

    @property
    def display(self) -> str:
        return display(self.kind, self.id, self.last4)

    def status(self, now: float) -> Status:
        if self.revoked_at is not None and self.revoked_at <= now:
            return Status.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return Status.EXPIRED
        return Status.ACTIVE


def public_view(record: TokenRecord, now: float) -> dict[str, Any]:
    """A record as shown to people and programs: never the secret, never its hash."""
    return {
        "id": record.id,
        "display": record.display,
        "kind": record.kind.value,
        "scope": str(record.scope),
        "protocols": sorted(record.protocols) or ["all"],
        "permission": record.permission.value if record.permission else None,
        "status": record.status(now).value,
        "created_at": format_time(record.created_at),
        "created_by": record.created_by or None,
        "expires_at": format_time(record.expires_at) if record.expires_at else None,
        "label": record.label,
        "origin": record.origin.value,
        "revoked_at": format_time(record.revoked_at) if record.revoked_at else None,
        "replaced_by": record.replaced_by,
        "replaces": record.replaces,
        "last_used_at": format_time(record.last_used_at) if record.last_used_at else None,
        "max_sessions": record.max_sessions,
    }
