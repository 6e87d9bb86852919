"""Live sessions and the rules that end them: a session lives only while its token allows it.

Sans-I/O: ``sweep`` is given the current token index and the time and returns the sessions
that must end (revoked, expired, no longer known, protocol no longer allowed, or beyond the
token's session cap); the caller closes them. The per-token cap (``max_sessions``) is one
check here, ``admits``, that every live protocol (WebRTC today, RTSP and HLS alike) calls
through ``AccessService``; ``add`` enforces it again when the session is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from agent.access.model import TokenRecord
from agent.access.policy import Reason


class SessionLimitReached(Exception):
    """The token already holds ``max_sessions`` live sessions."""


@dataclass(eq=False)
class Session:
    """One live viewer session (WebRTC, RTSP, HLS…) held open under a token."""

    id: str
    token_id: str
    camera: str | None
    protocol: str
    peer_ip: str | None
    started_at: float
    #: Ends the session from the agent's side; called at most once, with the reason
    #: (a Reason value such as "revoked", or "shutdown").
    close: Callable[[str], None]
    #: Bytes sent so far (for the session.ended audit entry).
    bytes_sent: Callable[[], int] = field(default=lambda: 0)


def end_reason(record: TokenRecord | None, now: float,
               protocol: str | None = None) -> Reason | None:
    """Why a session (of ``protocol``) under ``record`` must end now, or None if it may go
    on. A token narrowed to other protocols ends its sessions of the others."""
    if record is None:
        return Reason.UNKNOWN
    if record.revoked_at is not None and record.revoked_at <= now:
        return Reason.REVOKED
    if record.expires_at is not None and record.expires_at <= now:
        return Reason.EXPIRED
    if protocol is not None and record.protocols and protocol not in record.protocols:
        return Reason.PROTOCOL_NOT_ALLOWED
    return None


class SessionRegistry:
    """Every live session, by id; how many per camera and protocol."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def add(self, session: Session, record: TokenRecord | None = None) -> None:
        """Register ``session``; with its token's ``record``, refused (SessionLimitReached)
        when the token already holds its cap."""
        if session.id in self._sessions:
            raise ValueError(f"session {session.id} is already registered")
        if record is not None and not self.admits(record):
            raise SessionLimitReached(record.id)
        self._sessions[session.id] = session

    def admits(self, record: TokenRecord) -> bool:
        """May ``record`` open one more live session (of any protocol)?"""
        cap = record.max_sessions
        return cap is None or self.count_token(record.id) < cap

    def count_token(self, token_id: str) -> int:
        return sum(1 for s in self._sessions.values() if s.token_id == token_id)

    def per_token(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            counts[s.token_id] = counts.get(s.token_id, 0) + 1
        return counts

    def remove(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        """A snapshot: sessions may be removed while iterating."""
        return iter(list(self._sessions.values()))

    def sweep(
        self, tokens: Mapping[str, TokenRecord], now: float
    ) -> list[tuple[Session, Reason]]:
        """Remove and return the sessions whose token no longer allows them. Beyond a cap
        (lowered while sessions were live), the newest sessions end first."""
        ended = []
        held: dict[str, int] = {}
        for session in list(self._sessions.values()):  # insertion order: oldest first
            record = tokens.get(session.token_id)
            reason = end_reason(record, now, session.protocol)
            if reason is None and record is not None and record.max_sessions is not None:
                held[record.id] = held.get(record.id, 0) + 1
                if held[record.id] > record.max_sessions:
                    reason = Reason.SESSION_LIMIT
            if reason is not None:
                del self._sessions[session.id]
                ended.append((session, reason))
        return ended

    def count(self, camera: str | None = None, protocol: str | None = None) -> int:
        return sum(
            1 for s in self._sessions.values()
            if (camera is None or s.camera == camera)
            and (protocol is None or s.protocol == protocol)
        )
