"""The rules a relay token sync must keep (docs/relay-protocol.md §1.5), without I/O of its
own: given the stored row, is a synced record acceptable? A refused record is audited once
per token and reason and reported back in the sync's ack.

Two promises hold against the relay too: a revoked token never grants again, and a token
id keeps the hash it was issued with. (Migration 3's triggers enforce both in the database
as well; these checks turn them into per-token answers instead of a failed sync.)
"""

from __future__ import annotations

import sqlite3
import typing
from dataclasses import dataclass, field
from typing import Any

from agent.access import audit
from agent.access.model import Origin, format_time

#: Why a record was refused: the ``code`` in the ack's ``refused`` list.
SYNC_REVOKED = "revocation_final"
SYNC_HASH_CHANGED = "hash_changed"
SYNC_ID_IS_LOCAL = "local_token"
SYNC_HASH_IN_USE = "hash_in_use"


class RelayToken(typing.Protocol):
    """What a relay-issued token record carries (relay.protocol.SyncedToken)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def sha256(self) -> bytes: ...
    @property
    def last4(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def protocols(self) -> tuple[str, ...]: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def revoked_at(self) -> float | None: ...
    @property
    def label(self) -> str: ...


@dataclass(frozen=True, slots=True)
class SyncRefusal:
    """One token of a relay sync the agent did not apply."""

    token_id: str
    code: str
    message: str
    #: First time this refusal is recorded (audited now): log it; a repeat is only acked.
    new: bool


@dataclass(frozen=True, slots=True)
class SyncResult:
    changed: int
    refused: list[SyncRefusal] = field(default_factory=list)


def sync_problem(conn: sqlite3.Connection, t: RelayToken,
                 row: tuple[Any, ...] | None) -> tuple[str, str] | None:
    """Why a synced record must not be applied (code, message), or None. ``row`` is the
    stored (origin, secret_hash, scope, protocols, expires_at, revoked_at, label)."""
    if row is not None and row[0] != Origin.RELAY.value:
        return SYNC_ID_IS_LOCAL, "a token made on the agent has this id; it stays"
    if row is not None and bytes(row[1]) != t.sha256:
        return SYNC_HASH_CHANGED, ("a token id keeps the hash it was issued with: issue a new "
                                   "token (new id) instead")
    if row is not None and row[5] is not None and t.revoked_at is None:
        return SYNC_REVOKED, (f"revoked at {format_time(row[5])}; revocation is final: issue "
                              "a new token instead")
    if conn.execute("SELECT 1 FROM tokens WHERE secret_hash = ? AND id != ?",
                    (t.sha256, t.id)).fetchone():
        return SYNC_HASH_IN_USE, "another token already has this hash"
    return None


def refuse(conn: sqlite3.Connection, token_id: str, code: str, message: str,
           now: float) -> SyncRefusal:
    """Audit a refused record once per token and reason (a full sync repeats it); call in
    the sync's transaction."""
    seen = conn.execute(
        "SELECT 1 FROM audit WHERE token_id = ? AND event = ? AND reason = ? LIMIT 1",
        (token_id, audit.SYNC_REFUSED, code)).fetchone()
    if not seen:
        audit.append(conn, [audit.AuditEntry(
            now, audit.SYNC_REFUSED, token_id=token_id, actor="relay", result="refused",
            reason=code, detail={"message": message})])
    return SyncRefusal(token_id, code, message, new=not seen)
