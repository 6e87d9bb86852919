"""The control-channel protocol, version 1 (docs/relay-protocol.md), without any I/O.

Text in (``receive``), events out; messages to send are plain dicts from the builders. The
link module only moves them over a WebSocket.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SUBPROTOCOL = "therelay.agent.v1"
MAX_MESSAGE = 1024 * 1024

#: Close codes (section 1.6) and what they mean for the agent.
CLOSE_REASONS = {
    4001: "token_invalid", 4002: "token_expired", 4003: "token_revoked",
    4005: "agent_not_allowed", 4006: "version_unsupported", 4008: "replaced",
    4009: "protocol_error",
}
#: Refusals that mean the publisher token (or its binding) is not accepted: slow retries.
TOKEN_REJECTIONS = {"token_invalid", "token_expired", "token_revoked", "agent_not_allowed",
                    "version_unsupported"}

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ProtocolError(ValueError):
    """The relay sent something this version cannot accept; the link closes with 4009."""


def envelope(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "id": str(uuid.uuid4()), "ts": round(time.time(), 3), **fields}


def ack(message_id: str, error: tuple[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    if error is None:
        return envelope("ack", ack=message_id, ok=True, **fields)
    return envelope("ack", ack=message_id, ok=False,
                    error={"code": error[0], "message": error[1]})


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    account_id: str
    agent_id: str
    permission: str  # publish | read
    token_scope: str  # agent | account
    ice_servers: list[dict[str, Any]]
    server_time: float
    heartbeat_s: float


@dataclass(frozen=True)
class SyncedToken:
    id: str
    kind: str
    sha256: bytes
    last4: str
    scope: str
    protocols: tuple[str, ...]
    expires_at: float | None
    revoked_at: float | None
    label: str


@dataclass(frozen=True)
class TokensSync:
    message_id: str
    full: bool
    cursor: str
    tokens: list[SyncedToken]


@dataclass(frozen=True)
class TokensRevoke:
    message_id: str
    token_id: str
    revoked_at: float


@dataclass(frozen=True)
class Publish:
    message_id: str
    session_id: str
    camera_id: str
    whip_url: str
    bearer: str | None


@dataclass(frozen=True)
class Unpublish:
    message_id: str
    session_id: str


@dataclass(frozen=True)
class Acked:
    message_id: str
    ok: bool
    error: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ping:
    message_id: str


@dataclass(frozen=True)
class Unsupported:
    """A message type this version does not know; answered if it asked for an ack."""

    message_id: str
    kind: str


Event = Welcome | TokensSync | TokensRevoke | Publish | Unpublish | Acked | Ping | Unsupported


# -- parsing --------------------------------------------------------------------------------


def _str(msg: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{msg.get('type')}: '{key}' must be a non-empty string")
    return value


def _num(msg: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{msg.get('type')}: '{key}' must be a number")
    return float(value)


def _token(item: Any) -> SyncedToken:
    if not isinstance(item, dict):
        raise ProtocolError("tokens.sync: every token must be an object")
    digest = _str(item, "sha256")
    if not _HEX64.fullmatch(digest):
        raise ProtocolError("tokens.sync: sha256 must be 64 lowercase hex digits")
    protocols = item.get("protocols") or []
    if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
        raise ProtocolError("tokens.sync: protocols must be a list of strings")
    return SyncedToken(
        id=_str(item, "id"), kind=_str(item, "kind"), sha256=bytes.fromhex(digest),
        last4=_str(item, "last4"), scope=_str(item, "scope"), protocols=tuple(protocols),
        expires_at=_num(item, "expires_at", optional=True),
        revoked_at=_num(item, "revoked_at", optional=True),
        label=str(item.get("label") or ""),
    )


def parse(text: str | bytes) -> Event:
    """One message from the relay as an event; ProtocolError if it breaks the contract."""
    if isinstance(text, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    if len(text) > MAX_MESSAGE:
        raise ProtocolError("message larger than 1 MiB")
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError("a message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = _str(msg, "type")
    message_id = _str(msg, "id")
    if kind == "welcome":
        servers = msg.get("ice_servers") or []
        if not isinstance(servers, list):
            raise ProtocolError("welcome: ice_servers must be a list")
        permission = _str(msg, "permission")
        if permission not in ("publish", "read"):
            raise ProtocolError("welcome: permission must be publish or read")
        return Welcome(_str(msg, "account_id"), _str(msg, "agent_id"), permission,
                       str(msg.get("token_scope") or "agent"), servers,
                       _num(msg, "server_time"), float(msg.get("heartbeat_s") or 20))
    if kind == "tokens.sync":
        tokens = msg.get("tokens")
        if not isinstance(tokens, list):
            raise ProtocolError("tokens.sync: tokens must be a list")
        return TokensSync(message_id, bool(msg.get("full")), _str(msg, "cursor"),
                          [_token(t) for t in tokens])
    if kind == "tokens.revoke":
        return TokensRevoke(message_id, _str(msg, "token_id"),
                            _num(msg, "revoked_at", optional=True) or time.time())
    if kind == "publish":
        return Publish(message_id, _str(msg, "session_id"), _str(msg, "camera_id"),
                       _str(msg, "whip_url"), _str(msg, "bearer", optional=True))
    if kind == "unpublish":
        return Unpublish(message_id, _str(msg, "session_id"))
    if kind == "ping":
        return Ping(message_id)
    if kind == "pong":
        return Acked(message_id, True)  # nothing to do: the connection is alive
    if kind == "ack":
        error = msg.get("error") if isinstance(msg.get("error"), dict) else None
        extra = {k: v for k, v in msg.items() if k not in ("type", "id", "ts", "ack", "ok",
                                                            "error")}
        return Acked(_str(msg, "ack"), msg.get("ok") is True, error, extra)
    return Unsupported(message_id, kind)


USAGE_BATCH = 1000


def usage_batch(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A ``usage`` message (section 1.5) from audit entries, named by their seq range so a
    resend after a reconnect is the same batch; None if none of them is an access event."""
    events = [{"token_id": e["token_id"], "ts": e["ts"], "camera": e["camera"],
               "protocol": e["protocol"], "ip": e["peer_ip"], "result": e["result"],
               "reason": e["reason"]}
              for e in entries if e["event"] in ("access.granted", "access.denied")]
    if not events:
        return None
    return envelope("usage", batch=f"b-{entries[0]['seq']}-{entries[-1]['seq']}",
                    events=events[:USAGE_BATCH])


def pong(ping_id: str) -> dict[str, Any]:
    """The answer to the relay's ping (section 1.4): it names the ping's id."""
    return envelope("pong", ping=ping_id)


def hello(agent_id: str, version: str, cursor: str | None,
          cameras: list[dict[str, Any]]) -> dict[str, Any]:
    return envelope("hello", agent_id=agent_id, version=version,
                    capabilities=["whip", "tokens.sync.v1", "usage.v1", "audio.opus",
                                  "audio.g711"],
                    token_cursor=cursor, cameras=cameras)
