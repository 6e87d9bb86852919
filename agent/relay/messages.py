"""The control channel's messages (docs/relay-protocol.md v1.1, sections 1.2–1.5), no I/O.

Text in, typed events out; messages to send are plain dicts from the builders. Two kinds of
bad input are told apart (section 1.2):

- a broken **envelope** (not JSON, not an object, a repeated key, a missing or oversized
  ``type``/``id``, a binary frame) is a :class:`ProtocolError`: the link closes with 4009;
- a known message with a bad **field** (missing, wrong type, too long) is an
  :class:`Invalid` event: an acked type is answered with ``ack ok:false, code invalid``
  naming the field, the connection stays up.

Big frames (a ``tokens.sync`` may carry 100,000 records) are parsed in steps
(:func:`parse_steps` yields between chunks) so the event loop keeps running.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, overload

SUBPROTOCOL = "therelay.agent.v1"
#: Any message but tokens.sync (section 1.2).
MAX_MESSAGE = 1024 * 1024
#: tokens.sync only: room for MAX_SYNC_TOKENS records of ~250 bytes.
MAX_SYNC_MESSAGE = 64 * 1024 * 1024
MAX_SYNC_TOKENS = 200_000
#: Bounds on fields (section 1.2): longer is ``invalid``.
MAX_ID = 128
MAX_TEXT = 256
MAX_URL = 2048
MAX_BEARER = 4096
MAX_ICE_SERVERS = 16
#: Records decoded per step of a big tokens.sync (a step takes a few milliseconds).
CHUNK = 250

_HEX64 = re.compile(r"[0-9a-f]{64}")
_WS = re.compile(r"[ \t\n\r]*")


class ProtocolError(ValueError):
    """The relay broke the envelope of section 1.2; the link closes with 4009."""


class TooBig(ProtocolError):
    """A message over the size limit (1.2); the link closes with 1009."""


class FieldError(ValueError):
    """One field of a known message is missing, of the wrong type or too long."""


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


class SyncedToken(NamedTuple):
    """One token record of a tokens.sync (1.5)."""

    id: str
    kind: str
    sha256: bytes
    last4: str
    scope: str
    protocols: tuple[str, ...]
    expires_at: float | None
    revoked_at: float | None
    label: str


class SyncedTokens(Sequence[SyncedToken]):
    """The records of a tokens.sync, kept as plain tuples of plain values: CPython stops
    tracking such tuples in its garbage collector, so 100,000 records add nothing to the
    full collections that would otherwise stall the event loop for hundreds of ms."""

    def __init__(self, rows: list[tuple[Any, ...]] | None = None) -> None:
        self._rows = rows or []

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> SyncedToken: ...
    @overload
    def __getitem__(self, index: slice) -> SyncedTokens: ...

    def __getitem__(self, index: int | slice) -> SyncedToken | SyncedTokens:
        if isinstance(index, slice):
            return SyncedTokens(self._rows[index])
        return SyncedToken(*self._rows[index])

    def __iter__(self) -> Iterator[SyncedToken]:
        return (SyncedToken(*row) for row in self._rows)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def discard(self, count: int) -> int:
        """Forget up to ``count`` records (the last ones); returns how many are left. Once
        a sync is applied, its records are freed a chunk at a time: freeing 100,000 at once
        (a million strings and tuples) was one event-loop step of ~40 ms."""
        del self._rows[max(0, len(self._rows) - count):]
        return len(self._rows)


@dataclass(frozen=True)
class TokensSync:
    message_id: str
    full: bool
    cursor: str
    tokens: SyncedTokens


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
    message_id: str  # the id of the message acknowledged
    ok: bool
    error: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ping:
    message_id: str


@dataclass(frozen=True)
class Pong:
    message_id: str


@dataclass(frozen=True)
class Unsupported:
    """A message type this version does not know: answered ``unsupported``."""

    message_id: str
    kind: str


@dataclass(frozen=True)
class Invalid:
    """A known type with a bad field: answered ``invalid`` when the type is acked."""

    message_id: str
    kind: str
    problem: str


Event = (Welcome | TokensSync | TokensRevoke | Publish | Unpublish | Acked | Ping | Pong
         | Unsupported | Invalid)

#: relay → agent messages the agent acks (section 1.4).
ACKED_TYPES = frozenset({"publish", "unpublish", "tokens.sync", "tokens.revoke"})
#: agent → relay messages the relay acks.
ACKED_BY_RELAY = frozenset({"cameras.update", "publish.status", "usage"})


# -- fields ---------------------------------------------------------------------------------


def _str(msg: dict[str, Any], key: str, limit: int = MAX_ID, optional: bool = False) -> Any:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise FieldError(f"'{key}' must be a non-empty string")
    if len(value) > limit:
        raise FieldError(f"'{key}' is longer than {limit} characters")
    return value


def _num(msg: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) \
            or not math.isfinite(value):
        raise FieldError(f"'{key}' must be a number")
    return float(value)


def _bool(msg: dict[str, Any], key: str) -> bool:
    value = msg.get(key, False)
    if not isinstance(value, bool):
        raise FieldError(f"'{key}' must be true or false")
    return value


def _token(item: Any) -> tuple[Any, ...]:
    if not isinstance(item, dict):
        raise FieldError("every token must be an object")
    digest = _str(item, "sha256")
    if not _HEX64.fullmatch(digest):
        raise FieldError("'sha256' must be 64 lowercase hex digits")
    protocols = item.get("protocols")
    if protocols is None:
        protocols = []
    if not isinstance(protocols, list) or len(protocols) > 16 \
            or not all(isinstance(p, str) and 0 < len(p) <= 32 for p in protocols):
        raise FieldError("'protocols' must be a list of at most 16 short strings")
    label = item.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > MAX_TEXT):
        raise FieldError(f"'label' must be a string of at most {MAX_TEXT} characters")
    # A plain tuple in SyncedToken's order (see SyncedTokens).
    return (_str(item, "id", 64), _str(item, "kind", 32), bytes.fromhex(digest),
            _str(item, "last4", 8), _str(item, "scope", MAX_TEXT), tuple(protocols),
            _num(item, "expires_at", optional=True), _num(item, "revoked_at", optional=True),
            label or "")


def _welcome(msg: dict[str, Any]) -> Welcome:
    servers = msg.get("ice_servers")
    if servers is None:
        servers = []
    if not isinstance(servers, list) or len(servers) > MAX_ICE_SERVERS \
            or not all(isinstance(s, dict) for s in servers):
        raise FieldError(f"'ice_servers' must be a list of at most {MAX_ICE_SERVERS} objects")
    permission = _str(msg, "permission")
    if permission not in ("publish", "read"):
        raise FieldError("'permission' must be publish or read")
    scope = _str(msg, "token_scope", optional=True) or "agent"
    heartbeat = _num(msg, "heartbeat_s", optional=True)
    return Welcome(_str(msg, "account_id"), _str(msg, "agent_id"), permission, scope, servers,
                   _num(msg, "server_time"), 20.0 if heartbeat is None else heartbeat)


def _event(msg: dict[str, Any], kind: str, mid: str,
           tokens: SyncedTokens | None) -> Event:
    if kind == "welcome":
        return _welcome(msg)
    if kind == "tokens.sync":
        if tokens is None:
            raise FieldError("'tokens' must be a list")
        return TokensSync(mid, _bool(msg, "full"), _str(msg, "cursor"), tokens)
    if kind == "tokens.revoke":
        return TokensRevoke(mid, _str(msg, "token_id", 64),
                            _num(msg, "revoked_at", optional=True) or time.time())
    if kind == "publish":
        return Publish(mid, _str(msg, "session_id"), _str(msg, "camera_id"),
                       _str(msg, "whip_url", MAX_URL), _str(msg, "bearer", MAX_BEARER, True))
    if kind == "unpublish":
        return Unpublish(mid, _str(msg, "session_id"))
    if kind == "ping":
        return Ping(mid)
    if kind == "pong":
        return Pong(mid)
    if kind == "ack":
        if not isinstance(msg.get("ok"), bool):
            raise FieldError("'ok' must be true or false")
        error = msg.get("error") if isinstance(msg.get("error"), dict) else None
        extra = {k: v for k, v in msg.items()
                 if k not in ("type", "id", "ts", "ack", "ok", "error")}
        return Acked(_str(msg, "ack"), msg["ok"], error, extra)
    return Unsupported(mid, kind)


# -- parsing --------------------------------------------------------------------------------


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # RFC 8259 §4: names SHOULD be unique; here they MUST be
            raise ProtocolError(f"the key {key!r} is repeated in one object")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_repeats)


def _skip(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return i if match is None else match.end()


@dataclass
class _Tokens:
    """A ``tokens`` array decoded record by record, or the first bad record's problem."""

    items: list[tuple[Any, ...]] = field(default_factory=list)
    problem: str | None = None
    count: int = 0

    def add(self, item: Any) -> None:
        if self.problem is None:
            try:
                self.items.append(_token(item))
            except FieldError as exc:
                self.problem = f"tokens[{self.count}]: {exc}"
                self.items = []
        self.count += 1


def _walk(text: str) -> Generator[None, None, tuple[dict[str, Any], _Tokens | None]]:
    """The top-level object, its ``tokens`` array decoded into records one by one with a
    pause every CHUNK (no list of 100,000 dicts is ever built); (the other keys, tokens)."""
    out: dict[str, Any] = {}
    tokens: _Tokens | None = None
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        if len(text) <= MAX_MESSAGE:
            _DECODER.decode(text)  # ValueError: not JSON at all
        raise ProtocolError("a message must be a JSON object")
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        return out, None
    while True:
        key, i = _DECODER.raw_decode(text, i)
        if not isinstance(key, str) or key in out or (key == "tokens" and tokens is not None):
            raise ProtocolError("a message must be a JSON object with unique keys")
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise ValueError("':' expected")
        i = _skip(text, i + 1)
        if key == "tokens" and text[i:i + 1] == "[":
            tokens, i = _Tokens(), _skip(text, i + 1)
            if text[i:i + 1] == "]":
                i += 1
            while text[i - 1:i] != "]":
                item, i = _DECODER.raw_decode(text, i)
                tokens.add(item)
                if tokens.count > MAX_SYNC_TOKENS:
                    raise TooBig(f"tokens.sync with more than {MAX_SYNC_TOKENS} tokens")
                if tokens.count % CHUNK == 0:
                    yield
                i = _skip(text, i)
                if text[i:i + 1] not in (",", "]"):
                    raise ValueError("',' or ']' expected")
                i = _skip(text, i + 1) if text[i] == "," else i + 1
        else:
            out[key], i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i:i + 1] == "}":
            break
        if text[i:i + 1] != ",":
            raise ValueError("',' or '}' expected")
        i = _skip(text, i + 1)
    if _skip(text, i + 1) != len(text):
        raise ValueError("text after the object")
    return out, tokens


def parse_steps(text: str | bytes) -> Generator[None, None, Event]:
    """One message from the relay as an event, parsed in steps (``yield`` between chunks:
    the caller lets other work run). ProtocolError if the envelope is broken."""
    if isinstance(text, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    if len(text) > MAX_SYNC_MESSAGE:
        raise TooBig("message larger than 64 MiB")
    try:
        msg, items = yield from _walk(text)
    except (ValueError, IndexError, RecursionError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError("a message is not valid JSON") from None
    kind, mid = msg.get("type"), msg.get("id")
    if not isinstance(kind, str) or not kind or len(kind) > MAX_ID:
        raise ProtocolError("'type' must be a non-empty string of at most 128 characters")
    if not isinstance(mid, str) or not mid or len(mid) > MAX_ID:
        raise ProtocolError("'id' must be a non-empty string of at most 128 characters")
    if len(text) > MAX_MESSAGE and kind != "tokens.sync":
        raise TooBig("message larger than 1 MiB")
    try:
        if kind == "tokens.sync" and items is None and isinstance(msg.get("tokens"), list):
            items = _Tokens()  # a small message decoded at once by raw_decode
            for n, item in enumerate(msg["tokens"]):
                items.add(item)
                if n % CHUNK == CHUNK - 1:
                    yield
        if items is not None and items.problem is not None:
            raise FieldError(items.problem)
        return _event(msg, kind, mid, None if items is None else SyncedTokens(items.items))
    except FieldError as exc:
        return Invalid(mid, kind, f"{kind}: {exc}")


def parse(text: str | bytes) -> Event:
    """:func:`parse_steps` at once (small messages, tests)."""
    steps = parse_steps(text)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            event: Event = done.value
            return event


# -- building -------------------------------------------------------------------------------


def envelope(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "id": str(uuid.uuid4()), "ts": round(time.time(), 3), **fields}


def ack(message_id: str, error: tuple[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    if error is None:
        return envelope("ack", ack=message_id, ok=True, **fields)
    return envelope("ack", ack=message_id, ok=False,
                    error={"code": error[0], "message": error[1][:MAX_TEXT]})


def pong(ping_id: str) -> dict[str, Any]:
    """The answer to the relay's ping (section 1.4): it names the ping's id."""
    return envelope("pong", ping=ping_id)


def hello(agent_id: str, version: str, cursor: str | None,
          cameras: list[dict[str, Any]]) -> dict[str, Any]:
    return envelope("hello", agent_id=agent_id, version=version,
                    capabilities=["whip", "tokens.sync.v1", "usage.v1", "audio.opus",
                                  "audio.g711"],
                    token_cursor=cursor, cameras=cameras)


def publish_status(session_id: str, state: str,
                   error: tuple[str, str] | None = None) -> dict[str, Any]:
    return envelope("publish.status", session_id=session_id, state=state,
                    error=None if error is None else {"code": error[0],
                                                      "message": error[1][:MAX_TEXT]})


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
