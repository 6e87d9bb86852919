"""Tokens in the state database: create, list, revoke, rotate, and follow changes.

Only the SHA-256 of a token is stored; the token text exists once, in ``create``'s result.
Every change is audited in the same transaction, so neither can be lost without the other.
Blocking: call from threads (or the CLI), never from the event loop.
"""

from __future__ import annotations

import sqlite3
import threading
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.access import audit
from agent.access.db import connect, next_rev, transaction
from agent.access.model import (
    Origin,
    Permission,
    Protocol,
    Scope,
    ScopeLevel,
    Status,
    TokenRecord,
    format_time,
)
from agent.access.policy import Site
from agent.access.tokens import Kind, generate, is_public_id, token_hash
from agent.errors import NotFoundError, TokenError, TokenLimitError

_COLUMNS = (
    "id", "kind", "scope", "secret_hash", "last4", "protocols", "permission", "created_at",
    "expires_at", "ttl", "label", "created_by", "origin", "revoked_at", "replaced_by",
    "replaces", "last_used_at", "rev",
)
T = TypeVar("T")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM tokens"
_ACTIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"


def _record(row: tuple[Any, ...]) -> TokenRecord:
    (tid, kind, scope, secret_hash, last4, protocols, permission, created_at, expires_at,
     ttl, label, created_by, origin, revoked_at, replaced_by, replaces, last_used_at, rev) = row
    return TokenRecord(
        id=tid, kind=Kind(kind), scope=Scope.parse(scope), secret_hash=bytes(secret_hash),
        last4=last4, created_at=created_at,
        protocols=frozenset(Protocol(p) for p in protocols.split(",") if p),
        permission=Permission(permission) if permission else None, expires_at=expires_at,
        ttl=ttl, label=label, created_by=created_by, origin=Origin(origin), revoked_at=revoked_at,
        replaced_by=replaced_by, replaces=replaces, last_used_at=last_used_at, rev=rev,
    )


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
class NewToken:
    """The result of create/rotate: the token text, to be shown exactly once."""

    token: str
    record: TokenRecord


class TokenStore:
    """Token records in SQLite, with the limit, scope checks and audit that go with them."""

    def __init__(
        self,
        path: Path,
        site: Site,
        max_active: int,
        known_cameras: Callable[[], Collection[str]],
    ) -> None:
        self._conn = connect(path)
        self._lock = threading.Lock()
        self.path = path
        self.site = site
        self.max_active = max_active
        self.known_cameras = known_cameras

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection (audit and usage queries)."""
        with self._lock:
            return fn(self._conn)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction."""
        with self._lock, transaction(self._conn):
            return fn(self._conn)

    # -- reads ----------------------------------------------------------------------------

    def get(self, token_id: str) -> TokenRecord:
        with self._lock:
            row = self._conn.execute(f"{_SELECT} WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFoundError(
                f"no token with id {token_id!r} (see 'therelay-agent token list')"
            )
        return _record(row)

    def list_tokens(
        self, now: float, kind: Kind | None = None, status: Status | None = None
    ) -> list[TokenRecord]:
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} ORDER BY created_at, id").fetchall()
        records = [_record(r) for r in rows]
        return [
            r for r in records
            if (kind is None or r.kind is kind) and (status is None or r.status(now) is status)
        ]

    def load_all(self) -> tuple[dict[str, TokenRecord], int]:
        """Every record and the change counter they reflect (for the in-memory index)."""
        with self._lock, transaction(self._conn):
            rev = int(self._conn.execute("SELECT value FROM meta WHERE key='rev'").fetchone()[0])
            rows = self._conn.execute(_SELECT).fetchall()
        return {r[0]: _record(r) for r in rows}, rev

    def changes_since(self, rev: int) -> tuple[list[TokenRecord], int]:
        """Records changed after ``rev``, and the newest rev."""
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE rev > ? ORDER BY rev", (rev,)).fetchall()
        records = [_record(r) for r in rows]
        return records, max([rev, *(r.rev for r in records)])

    def _count_active(self, now: float, excluding: str | None = None) -> int:
        row = self._conn.execute(
            f"SELECT count(*) FROM tokens WHERE origin = 'local' AND {_ACTIVE} AND id IS NOT ?",
            (now, excluding),
        ).fetchone()
        return int(row[0])

    # -- writes ---------------------------------------------------------------------------

    def create(
        self,
        kind: Kind,
        scope: Scope,
        now: float,
        *,
        protocols: frozenset[Protocol] = frozenset(),
        expires_at: float | None = None,
        ttl: float | None = None,
        label: str = "",
        created_by: str = "",
    ) -> NewToken:
        """A new local token, audited; refused beyond ``max_active`` or for an unknown scope.

        Expiry: none, ``expires_at`` (absolute), or ``ttl`` seconds from ``now``.
        """
        if ttl is not None:
            if expires_at is not None:
                raise ValueError("give expires_at or ttl, not both")
            expires_at = now + ttl
        self._check_new(kind, scope, protocols, expires_at, now)
        with self._lock, transaction(self._conn):
            if self._count_active(now) >= self.max_active:
                raise TokenLimitError(
                    f"this agent already has {self.max_active} active tokens "
                    "(tokens.max_active): revoke unused ones ('therelay-agent token list') "
                    "or raise the limit"
                )
            new = self._insert(kind, scope, now, protocols, expires_at, ttl, label, created_by,
                               replaces=None)
            audit.append(self._conn, [audit.AuditEntry(
                now, audit.CREATED, token_id=new.record.id, actor=created_by or None,
                detail=_describe(new.record),
            )])
        return new

    def revoke(self, token_id: str, now: float, actor: str) -> TokenRecord:
        """Revoke at once. A running daemon ends the token's sessions within a second."""
        with self._lock, transaction(self._conn):
            record = self._get_locked(token_id)
            if record.revoked_at is not None:
                raise TokenError(
                    f"token {record.display} was already revoked at "
                    f"{format_time(record.revoked_at)}"
                )
            self._conn.execute(
                "UPDATE tokens SET revoked_at = ?, rev = ? WHERE id = ?",
                (now, next_rev(self._conn), token_id),
            )
            audit.append(self._conn, [audit.AuditEntry(
                now, audit.REVOKED, token_id=token_id, actor=actor or None,
            )])
            return self._get_locked(token_id)

    def rotate(
        self, token_id: str, now: float, actor: str, grace: float | None = None
    ) -> NewToken:
        """A new token with the same scope, protocols and lifetime; the old one stops now or
        after ``grace`` seconds. Both are linked in the store and in the audit log."""
        with self._lock, transaction(self._conn):
            old = self._get_locked(token_id)
            if old.origin is not Origin.LOCAL:
                raise TokenError(
                    f"token {old.display} is managed by TheRelay cloud: rotate it there"
                )
            state = "already rotated" if old.replaced_by else old.status(now).value
            if state != Status.ACTIVE.value:
                raise TokenError(
                    f"token {old.display} is {state}: only an active token can be rotated; "
                    "create a new one instead"
                )
            if self._count_active(now, excluding=token_id) >= self.max_active:
                raise TokenLimitError(
                    f"this agent already has {self.max_active} other active tokens "
                    "(tokens.max_active): revoke unused ones first"
                )
            # A duration is granted again from now; an absolute expiry stays where it was.
            expires = now + old.ttl if old.ttl is not None else old.expires_at
            new = self._insert(old.kind, old.scope, now, old.protocols, expires, old.ttl,
                               old.label, actor, replaces=old.id)
            rev = next_rev(self._conn)
            if grace:
                ends = now + grace if old.expires_at is None else min(old.expires_at, now + grace)
                self._conn.execute(
                    "UPDATE tokens SET replaced_by = ?, expires_at = ?, rev = ? WHERE id = ?",
                    (new.record.id, ends, rev, old.id),
                )
            else:
                self._conn.execute(
                    "UPDATE tokens SET replaced_by = ?, revoked_at = ?, rev = ? WHERE id = ?",
                    (new.record.id, now, rev, old.id),
                )
            audit.append(self._conn, [audit.AuditEntry(
                now, audit.ROTATED, token_id=old.id, actor=actor or None,
                detail={"replaced_by": new.record.id, "grace_seconds": grace or 0},
            ), audit.AuditEntry(
                now, audit.CREATED, token_id=new.record.id, actor=actor or None,
                detail={**_describe(new.record), "replaces": old.id},
            )])
        return new

    # -- tokens issued by TheRelay cloud (docs/relay-protocol.md §1.5) ----------------------

    def relay_cursor(self) -> str | None:
        return self._meta("relay_cursor")

    def usage_sent_through(self) -> int:
        """The last audit seq whose access events the relay acknowledged (usage.v1)."""
        return int(self._meta("relay_usage_seq") or 0)

    def usage_outstanding(self) -> int | None:
        """The last audit seq of the usage batch sent and not yet acknowledged, if any: a
        resend (after a reconnect or a restart) covers exactly the same entries, so it has
        the same batch name and the relay counts it once."""
        value = self._meta("relay_usage_pending")
        return int(value) if value else None

    def mark_usage_outstanding(self, seq: int) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                               "VALUES ('relay_usage_pending', ?)", (str(seq),))

    def mark_usage_sent(self, seq: int) -> None:
        """The relay acknowledged everything through ``seq``; nothing is outstanding."""
        with self._lock, transaction(self._conn):
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                               "VALUES ('relay_usage_seq', ?)", (str(seq),))
            self._conn.execute("DELETE FROM meta WHERE key = 'relay_usage_pending'")

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def apply_relay_sync(
        self, tokens: Collection[RelayToken], *, full: bool, cursor: str, now: float
    ) -> int:
        """Upsert relay-issued tokens (only their hashes); with ``full``, relay tokens not
        listed are revoked. Local tokens are never touched. Returns how many changed."""
        changed = 0
        with self._lock, transaction(self._conn):
            listed = set()
            entries = []
            for t in tokens:
                listed.add(t.id)
                row = self._conn.execute(
                    "SELECT origin, secret_hash, scope, protocols, expires_at, revoked_at, "
                    "label FROM tokens WHERE id = ?", (t.id,)).fetchone()
                values = (t.sha256, t.scope, ",".join(sorted(t.protocols)), t.expires_at,
                          t.revoked_at, t.label)
                if row is not None and row[0] != Origin.RELAY.value:
                    continue  # an id clash with a local token: the local one stays
                if self._conn.execute("SELECT 1 FROM tokens WHERE secret_hash = ? AND id != ?",
                                      (t.sha256, t.id)).fetchone():
                    continue  # the same hash under two ids: a broken sync, never applied
                if row is not None and tuple(row[1:]) == values:
                    continue
                self._conn.execute(
                    "INSERT INTO tokens (id, kind, scope, secret_hash, last4, protocols, "
                    "created_at, expires_at, label, created_by, origin, revoked_at, rev) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'relay', 'relay', ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, "
                    "secret_hash = excluded.secret_hash, last4 = excluded.last4, "
                    "protocols = excluded.protocols, expires_at = excluded.expires_at, "
                    "label = excluded.label, revoked_at = excluded.revoked_at, rev = excluded.rev",
                    (t.id, t.kind, t.scope, t.sha256, t.last4, ",".join(sorted(t.protocols)),
                     now, t.expires_at, t.label, t.revoked_at, next_rev(self._conn)))
                changed += 1
                event = audit.REVOKED if t.revoked_at is not None else audit.CREATED
                entries.append(audit.AuditEntry(now, event, token_id=t.id, actor="relay",
                                                detail={"origin": "relay", "scope": t.scope}))
            if full:
                stale = [r[0] for r in self._conn.execute(
                    "SELECT id FROM tokens WHERE origin = 'relay' AND revoked_at IS NULL")
                    if r[0] not in listed]
                for token_id in stale:
                    self._conn.execute("UPDATE tokens SET revoked_at = ?, rev = ? WHERE id = ?",
                                       (now, next_rev(self._conn), token_id))
                    entries.append(audit.AuditEntry(now, audit.REVOKED, token_id=token_id,
                                                    actor="relay",
                                                    detail={"why": "absent from a full sync"}))
                changed += len(stale)
            audit.append(self._conn, entries)
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                               "VALUES ('relay_cursor', ?)", (cursor,))
        return changed

    def revoke_relay(self, token_id: str, when: float, now: float) -> bool:
        """The relay revoked one of its tokens; idempotent. False if the agent has no such
        relay token."""
        with self._lock, transaction(self._conn):
            row = self._conn.execute("SELECT origin, revoked_at FROM tokens WHERE id = ?",
                                     (token_id,)).fetchone()
            if row is None or row[0] != Origin.RELAY.value:
                return False
            if row[1] is None:
                self._conn.execute("UPDATE tokens SET revoked_at = ?, rev = ? WHERE id = ?",
                                   (min(when, now), next_rev(self._conn), token_id))
                audit.append(self._conn, [audit.AuditEntry(now, audit.REVOKED,
                                                           token_id=token_id, actor="relay")])
            return True

    # -- helpers --------------------------------------------------------------------------

    def _get_locked(self, token_id: str) -> TokenRecord:
        row = self._conn.execute(f"{_SELECT} WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no token with id {token_id!r} (see 'therelay-agent token list')")
        return _record(row)

    def _check_new(
        self,
        kind: Kind,
        scope: Scope,
        protocols: frozenset[Protocol],
        expires_at: float | None,
        now: float,
    ) -> None:
        if kind not in (Kind.ACCESS, Kind.ADMIN):
            raise TokenError("publisher tokens are issued by TheRelay cloud, not by the agent")
        if scope.level is ScopeLevel.CAMERA:
            if kind is Kind.ADMIN:
                raise TokenError("admin tokens are scoped to the host or the account")
            if scope.value not in self.known_cameras():
                raise TokenError(
                    f"camera {scope.value!r} does not exist on this agent: check the id with "
                    "'therelay-agent cameras list'"
                )
        elif scope.level is ScopeLevel.HOST and scope.value != self.site.agent_id:
            raise TokenError(
                f"host {scope.value!r} is not this agent (agent.id is {self.site.agent_id!r})"
            )
        elif scope.level is ScopeLevel.ACCOUNT and scope.value != self.site.account_id:
            raise TokenError(
                f"account {scope.value!r} is not this agent's account "
                f"(agent.account_id is {self.site.account_id!r})"
            )
        if protocols and kind is not Kind.ACCESS:
            raise TokenError("only access tokens can be restricted to protocols")
        if expires_at is not None and expires_at <= now:
            raise TokenError(f"expiry {format_time(expires_at)} is in the past")

    def _insert(
        self,
        kind: Kind,
        scope: Scope,
        now: float,
        protocols: Collection[Protocol],
        expires_at: float | None,
        ttl: float | None,
        label: str,
        created_by: str,
        replaces: str | None,
    ) -> NewToken:
        for _ in range(5):  # 62**12 ids: a collision is astronomically rare, but handled
            parsed = generate(kind)
            exists = self._conn.execute(
                "SELECT 1 FROM tokens WHERE id = ?", (parsed.public_id,)
            ).fetchone()
            if not exists:
                break
        else:  # pragma: no cover - would need a broken random source
            raise TokenError("could not allocate a token id; try again")
        assert is_public_id(parsed.public_id)
        rev = next_rev(self._conn)
        self._conn.execute(
            f"INSERT INTO tokens ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 18)})",
            (parsed.public_id, kind.value, str(scope), token_hash(parsed.text),
             parsed.text[-4:], ",".join(sorted(protocols)), None, now, expires_at, ttl, label,
             created_by, Origin.LOCAL.value, None, None, replaces, None, rev),
        )
        return NewToken(parsed.text, self._get_locked(parsed.public_id))


def _describe(record: TokenRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": record.kind.value, "scope": str(record.scope)}
    if record.protocols:
        out["protocols"] = sorted(record.protocols)
    if record.expires_at is not None:
        out["expires_at"] = record.expires_at
    if record.ttl is not None:
        out["ttl_seconds"] = record.ttl
    if record.label:
        out["label"] = record.label
    return out
