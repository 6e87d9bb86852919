"""The one authorization path: ``authorize(AccessRequest) -> Decision``.

Sans-I/O: the caller passes the token index (a mapping public id → record, kept fresh by the
store watcher), the site identity and the failure limiter. Every LAN protocol builds the same
:class:`AccessRequest`; no handler decides on its own.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from agent.access.model import ADMIN_PROTOCOL, LISTING_PROTOCOL, ScopeLevel, TokenRecord
from agent.access.tokens import KIND_OF_PREFIX, FormatProblem, Kind, check, token_hash


class Reason(StrEnum):
    """Why a request was decided the way it was, in checking order."""

    GRANTED = "granted"
    MISSING = "missing"
    MALFORMED = "malformed"
    CORRUPTED = "corrupted"
    UNKNOWN = "unknown"
    BAD_SECRET = "bad_secret"
    WRONG_KIND = "wrong_kind"
    REVOKED = "revoked"
    EXPIRED = "expired"
    SCOPE_MISMATCH = "scope_mismatch"
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"
    RATE_LIMITED = "rate_limited"
    #: The token already holds its ``max_sessions`` live sessions (every protocol counted).
    SESSION_LIMIT = "session_limit"


#: What a client is told (plain status, no detail); the reason goes to the audit log.
HTTP_STATUS: dict[Reason, int] = {
    Reason.GRANTED: 200,
    Reason.MISSING: 401,
    Reason.MALFORMED: 401,
    Reason.CORRUPTED: 401,
    Reason.UNKNOWN: 401,
    Reason.BAD_SECRET: 401,
    Reason.REVOKED: 401,
    Reason.EXPIRED: 401,
    Reason.WRONG_KIND: 403,
    Reason.SCOPE_MISMATCH: 403,
    Reason.PROTOCOL_NOT_ALLOWED: 403,
    Reason.RATE_LIMITED: 429,
    Reason.SESSION_LIMIT: 429,
}

#: The seed page's "Token Not Working" list, one fix per reason.
FIX: dict[Reason, str] = {
    Reason.GRANTED: "Nothing to fix: this token grants this request.",
    Reason.MISSING: "Send the token as 'Authorization: Bearer <token>' (or ?token= for players "
    "that cannot set headers).",
    Reason.MALFORMED: "This is not a TheRelay token: copy the whole token, which starts with "
    "tra_ and is 66 characters long.",
    Reason.CORRUPTED: "The token was damaged in copying (checksum mismatch): copy it again "
    "from where it was first shown, or create a new one.",
    Reason.UNKNOWN: "This agent does not know the token: it was created elsewhere or deleted. "
    "Create a new token on this agent (or wait for the relay to sync it).",
    Reason.BAD_SECRET: "The token's id is known but its secret is wrong: the token was "
    "mistyped or forged. Copy it again or create a new one.",
    Reason.WRONG_KIND: "Use an access token (tra_) to view cameras and an admin token (trk_) "
    "for the admin API; publisher tokens (trp_) are for the agent itself.",
    Reason.REVOKED: "The token was revoked. Ask for a new token (tokens cannot be un-revoked).",
    Reason.EXPIRED: "The token has expired. Create a new one, with a longer --ttl if needed.",
    Reason.SCOPE_MISMATCH: "The token's scope does not cover this camera: use a token for this "
    "camera, this host or the account.",
    Reason.PROTOCOL_NOT_ALLOWED: "The token is restricted to other protocols: create one that "
    "allows this protocol (or all protocols).",
    Reason.RATE_LIMITED: "Too many failed attempts from this address: wait a minute, then try "
    "again with a valid token.",
    Reason.SESSION_LIMIT: "The token already holds as many live sessions as it may "
    "(max_sessions): close a player using it, or raise the cap with 'therelay-agent token "
    "update ID --max-sessions N'.",
}


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One request from any protocol. ``camera`` is None for requests about no camera."""

    token: str | None
    camera: str | None
    protocol: str
    peer_ip: str | None
    now: float


class Decision(NamedTuple):
    """The outcome; ``token_id`` is set once the token's public id could be read.

    A NamedTuple rather than a dataclass: one is built per request, and this is cheaper.
    """

    reason: Reason
    token_id: str | None = None
    record: TokenRecord | None = None
    detail: str | None = None

    @property
    def granted(self) -> bool:
        return self.reason is Reason.GRANTED

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.reason]

    @property
    def fix(self) -> str:
        return FIX[self.reason]


@dataclass(frozen=True, slots=True)
class Site:
    """Who this agent is, for host and account scopes."""

    agent_id: str
    account_id: str


class FailureLimiter:
    """Per-IP token bucket of failed attempts, bounded in memory (least recently seen evicted).

    Never keyed by token id: ids are public, so limiting by id would let anyone lock a viewer
    out. A holder of a valid token is never limited (see :func:`authorize`).
    """

    def __init__(self, burst: int, per_minute: float, max_ips: int = 10_000) -> None:
        if burst < 1 or per_minute <= 0 or max_ips < 1:
            raise ValueError("burst, per_minute and max_ips must be positive")
        self._burst = float(burst)
        self._rate = per_minute / 60.0
        self._max_ips = max_ips
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def consume(self, ip: str, now: float) -> bool:
        """Count one failure from ``ip``; False when its bucket was already empty."""
        level, last = self._buckets.pop(ip, (self._burst, now))
        level = min(self._burst, level + max(0.0, now - last) * self._rate)
        allowed = level >= 1.0
        self._buckets[ip] = (level - 1.0 if allowed else level, now)
        if len(self._buckets) > self._max_ips:
            self._buckets.popitem(last=False)
        return allowed


_DUMMY_HASH = token_hash("tra_000000000000_" + "0" * 49)


def _required_kind(protocol: str) -> Kind:
    return Kind.ADMIN if protocol == ADMIN_PROTOCOL else Kind.ACCESS


def scope_covers(record: TokenRecord, camera: str | None, site: Site) -> bool:
    """Does the token's scope include ``camera`` on this agent? (Exact match only.)"""
    scope = record.scope
    if scope.level is ScopeLevel.CAMERA:
        return camera is not None and camera == scope.value
    if scope.level is ScopeLevel.HOST:
        return scope.value == site.agent_id
    return scope.value == site.account_id


def _check(
    req: AccessRequest, tokens: Mapping[str, TokenRecord], site: Site
) -> tuple[Reason, str | None, TokenRecord | None]:
    if not req.token:
        return Reason.MISSING, None, None
    public_id = check(req.token)
    if public_id is FormatProblem.MALFORMED:
        return Reason.MALFORMED, None, None
    if public_id is FormatProblem.CORRUPTED:
        return Reason.CORRUPTED, None, None
    record = tokens.get(public_id)
    presented = token_hash(req.token)
    # An unknown id costs the same comparison as a known one (no timing oracle).
    if not hmac.compare_digest(presented, record.secret_hash if record else _DUMMY_HASH):
        if record is None and KIND_OF_PREFIX[req.token[:3]] is not _required_kind(req.protocol):
            # The prefix (public) already says this token cannot serve here, e.g. a relay
            # publisher token (never in this store) presented to a viewer or admin endpoint.
            return Reason.WRONG_KIND, public_id, None
        return (Reason.BAD_SECRET if record else Reason.UNKNOWN), public_id, None
    if record is None:  # only reachable if the dummy hash were ever presented
        return Reason.UNKNOWN, public_id, None
    if record.kind is not _required_kind(req.protocol):
        return Reason.WRONG_KIND, record.id, record
    if record.revoked_at is not None and record.revoked_at <= req.now:
        return Reason.REVOKED, record.id, record
    if record.expires_at is not None and record.expires_at <= req.now:
        return Reason.EXPIRED, record.id, record
    if req.protocol == LISTING_PROTOCOL and req.camera is None:
        return Reason.GRANTED, record.id, record  # the caller filters with scope_covers
    if not scope_covers(record, req.camera, site):
        return Reason.SCOPE_MISMATCH, record.id, record
    if (
        record.kind is Kind.ACCESS
        and record.protocols
        and req.protocol not in record.protocols
    ):
        return Reason.PROTOCOL_NOT_ALLOWED, record.id, record
    return Reason.GRANTED, record.id, record


def authorize(
    req: AccessRequest,
    tokens: Mapping[str, TokenRecord],
    site: Site,
    limiter: FailureLimiter | None = None,
) -> Decision:
    """Decide ``req``. Deny by default; every denial from an IP spends its failure budget.

    ``rate_limited`` comes last: once an address has spent its budget, its failed requests
    are answered ``rate_limited`` (429) whatever the underlying reason, which is kept in
    ``detail`` for the audit log. A request whose token is valid is still granted, so an
    attacker sharing a NAT address cannot lock real viewers out.
    """
    reason, token_id, record = _check(req, tokens, site)
    if reason is Reason.GRANTED:
        return Decision(reason, token_id, record)
    if limiter is not None and req.peer_ip and not limiter.consume(req.peer_ip, req.now):
        return Decision(Reason.RATE_LIMITED, token_id, record, detail=reason.value)
    return Decision(reason, token_id, record)
