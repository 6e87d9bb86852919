"""Live sessions and the rule that ends them: a session lives only while its token does.

Sans-I/O: ``sweep`` is given the current token index and the time and returns the sessions
that must end (revoked, expired, or no longer known); the caller closes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from agent.access.model import TokenRecord
from agent.access.policy import Reason


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


def end_reason(record: TokenRecord | None, now: float) -> Reason | None:
    """Why a session under ``record`` must end now, or None if it may go on."""
    if record is None:
        return Reason.UNKNOWN
    if record.revoked_at is not None and record.revoked_at <= now:
        return Reason.REVOKED
    if record.expires_at is not None and record.expires_at <= now:
        return Reason.EXPIRED
    return None


class SessionRegistry:
    """Every live session, by id; how many per camera and protocol."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        if session.id in self._sessions:
            raise ValueError(f"session {session.id} is already registered")
        self._sessions[session.id] = session

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
        """Remove and return the sessions whose token no longer allows them."""
        ended = []
        for session in list(self._sessions.values()):
            reason = end_reason(tokens.get(session.token_id), now)
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
