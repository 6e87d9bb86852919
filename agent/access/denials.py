"""Denials folded per (source IP, reason) over a window, and stored fields kept short.

A stranger can send thousands of bad requests a second; one audit row each filled a 64 MB
state filesystem in seconds. Here the first denial of a (source IP, reason) pair in a window
is written as usual (so a single failed attempt shows at once), and the rest of that window
becomes one ``access.denied`` row with ``detail.count``: at most two rows per pair and
window, whatever the request rate. Denials of a token this agent knows (revoked, expired,
out of scope…) are folded per token as well, so a token's own audit trail still names them;
that adds at most one pair per existing token, which strangers cannot multiply.
Sans-I/O: the recorder calls it under its lock and gives it the time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from agent.access import audit
from agent.access.audit import AuditEntry
from agent.access.model import is_identifier
from agent.access.tokens import redact

#: Camera ids are at most 64 characters (model.is_identifier); anything longer in a request
#: path is not a camera id and is cut to this length, after its tokens are redacted.
MAX_CAMERA = 64


def stored_camera(camera: str | None) -> str | None:
    """What the audit keeps of a requested camera id: a valid id as it is; anything else
    (a raw path segment, maybe holding a token) redacted and cut to ``MAX_CAMERA``."""
    if camera is None or is_identifier(camera):
        return camera
    return redact(camera)[:MAX_CAMERA]


_Key = tuple[str | None, str | None, str | None]  # source IP, reason, known token id


@dataclass
class _Fold:
    opened: float  # monotonic time the window opened
    first: AuditEntry
    count: int = 0
    since: float = 0.0
    last: float = 0.0
    token_id: str | None = None
    camera: str | None = None
    protocol: str | None = None
    underlying: Any = None

    def add(self, entry: AuditEntry) -> None:
        if self.count == 0:
            self.since = entry.ts
            self.token_id, self.camera, self.protocol = (entry.token_id, entry.camera,
                                                         entry.protocol)
            self.underlying = entry.detail.get("underlying")
        else:  # fields that differ within the window are left empty
            self.token_id = self.token_id if self.token_id == entry.token_id else None
            self.camera = self.camera if self.camera == entry.camera else None
            self.protocol = self.protocol if self.protocol == entry.protocol else None
            if self.underlying != entry.detail.get("underlying"):
                self.underlying = None
        self.count += 1
        self.last = max(self.last, entry.ts)

    def entry(self) -> AuditEntry:
        detail: dict[str, Any] = {"count": self.count, "since": self.since}
        if self.underlying is not None:
            detail["underlying"] = self.underlying
        return replace(self.first, ts=self.last, token_id=self.token_id, camera=self.camera,
                       protocol=self.protocol, detail=detail)


class DenialFolder:
    """Per (source IP, reason): pass the first denial of a window, count the others."""

    def __init__(self, window: float, max_keys: int = 10_000) -> None:
        self.window = window
        self._max_keys = max_keys
        self._folds: dict[_Key, _Fold] = {}

    def offer(self, entry: AuditEntry, now: float,
              known_token: bool = False) -> tuple[AuditEntry | None, list[AuditEntry]]:
        """(the entry to write now, or None if it was folded; rows of windows it closed).
        ``known_token``: the denied token exists here (its id joins the key)."""
        if self.window <= 0 or entry.event != audit.DENIED:
            return entry, []
        key: _Key = (entry.peer_ip, entry.reason, entry.token_id if known_token else None)
        if key not in self._folds and len(self._folds) >= self._max_keys:
            key = (None, entry.reason, None)  # too many keys at once: one row for the rest
            entry = replace(entry, peer_ip=None)
        closed: list[AuditEntry] = []
        fold = self._folds.get(key)
        if fold is not None and now - fold.opened >= self.window:
            closed += self._close(key)
            fold = None
        if fold is None:
            self._folds[key] = _Fold(now, entry)
            return entry, closed
        fold.add(entry)
        return None, closed

    def due(self, now: float, everything: bool = False) -> list[AuditEntry]:
        """Rows of the windows that have ended (all of them, if ``everything``)."""
        out: list[AuditEntry] = []
        for key, fold in list(self._folds.items()):
            if everything or now - fold.opened >= self.window:
                out += self._close(key)
        return out

    def _close(self, key: _Key) -> list[AuditEntry]:
        fold = self._folds.pop(key)
        return [fold.entry()] if fold.count else []

    @property
    def folded(self) -> int:
        """Denials counted in open windows, not yet in any row."""
        return sum(f.count for f in self._folds.values())
