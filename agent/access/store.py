"""Tokens in the state database: create, list, revoke, rotate, and follow changes.

Only the SHA-256 of a token is stored; the token text exists once, in ``create``'s result.
Every change is audited in the same transaction, so neither can be lost without the other.
Blocking: call from threads (or the CLI), never from the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from agent.access import audit
from agent.access.index import COLUMNS, Row, compact, record
from agent.access.model import (
    Origin,
    Protocol,
    Scope,
    ScopeLevel,
    Status,
    TokenRecord,
    format_time,
)
from agent.access.policy import Site
from agent.access.relay_sync import RelayToken, SyncRefusal, SyncResult, refuse, sync_problem
from agent.access.tokens import Kind, generate, is_public_id, token_hash
from agent.errors import NotFoundError, TokenError, TokenLimitError, TokenReadOnlyError
from agent.state.database import StateDB
from agent.state.db import next_rev, transaction

T = TypeVar("T")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM tokens"
#: A relay sync writes its audit entries this many at a time: 100,000 entries held until
#: the end were as many tracked objects, and full garbage collections (agent.access.index).
AUDIT_BATCH = 500
_ACTIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"


class _Keep(Enum):
    KEEP = "keep"


#: A field of :class:`TokenChange` left as it is.
KEEP = _Keep.KEEP


@dataclass(frozen=True, slots=True)
class TokenChange:
    """What ``update`` changes; every field left at KEEP stays. The scope is not here on
    purpose: a wider scope is a new token (create or rotate), never an edit."""

    label: str | _Keep = KEEP
    #: None: never expires. With ``ttl`` set, ``expires_at`` is ignored (now + ttl).
    expires_at: float | _Keep | None = KEEP
    ttl: float | _Keep | None = KEEP
    protocols: frozenset[Protocol] | _Keep = KEEP
    #: None: no cap.
    max_sessions: int | _Keep | None = KEEP

    def empty(self) -> bool:
        return all(getattr(self, f) is KEEP for f in self.__slots__)


@dataclass(frozen=True, slots=True)
class NewToken:
    """The result of create/rotate: the token text, to be shown exactly once."""

    token: str
    record: TokenRecord


class TokenStore:
    """Token records in SQLite, with the limit, scope checks and audit that go with them."""

    def __init__(
        self,
        db: StateDB,
        site: Site,
        max_active: int,
        known_cameras: Callable[[], Collection[str]],
    ) -> None:
        """``known_cameras``: the camera ids a camera-scoped token may name (the daemon's
        running set, or the CLI's configured and adopted cameras)."""
        self.db = db
        self._conn = db.conn
        self._lock = db.lock
        self.path = db.path
        self.site = site
        self.max_active = max_active
        self._known_cameras = known_cameras

    def close(self) -> None:
        """Close the database (shared with the other tables' modules: call once, last)."""
        self.db.close()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection (audit and usage queries)."""
        return self.db.read(fn)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction."""
        return self.db.write(fn)

    # -- reads ----------------------------------------------------------------------------

    def get(self, token_id: str) -> TokenRecord:
        with self._lock:
            row = self._conn.execute(f"{_SELECT} WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFoundError(
                f"no token with id {token_id!r} (see 'therelay-agent token list')"
            )
        return record(row)

    def list_tokens(
        self, now: float, kind: Kind | None = None, status: Status | None = None
    ) -> list[TokenRecord]:
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} ORDER BY created_at, id").fetchall()
        records = [record(r) for r in rows]
        return [
            r for r in records
            if (kind is None or r.kind is kind) and (status is None or r.status(now) is status)
        ]

    def load_all(self) -> tuple[dict[str, TokenRecord], int]:
        """Every record and the change counter they reflect."""
        rows, rev = self.load_rows()
        return {r[0]: record(r) for r in rows}, rev

    def load_rows(self) -> tuple[list[Row], int]:
        """Every token as a compact row (agent.access.index) and the change counter they
        reflect: what the access service's index is built from."""
        with self._lock, transaction(self._conn):
            rev = int(self._conn.execute("SELECT value FROM meta WHERE key='rev'").fetchone()[0])
            rows = self._conn.execute(_SELECT).fetchall()
        return [compact(r) for r in rows], rev

    def changes_since(self, rev: int) -> tuple[list[Row], int]:
        """Compact rows (agent.access.index) of the tokens changed after ``rev``, and the
        newest rev."""
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE rev > ? ORDER BY rev", (rev,)).fetchall()
        return [compact(r) for r in rows], max([rev, *(r[-1] for r in rows)])

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
        max_sessions: int | None = None,
    ) -> NewToken:
        """A new local token, audited; refused beyond ``max_active`` or for an unknown scope.

        Expiry: none, ``expires_at`` (absolute), or ``ttl`` seconds from ``now``.
        """
        if ttl is not None:
            if expires_at is not None:
                raise ValueError("give expires_at or ttl, not both")
            expires_at = now + ttl
        self._check_new(kind, scope, protocols, expires_at, now)
        if max_sessions is not None and kind is not Kind.ACCESS:
            raise TokenError("only access tokens open sessions: a session cap is for them")
        with self._lock, transaction(self._conn):
            if self._count_active(now) >= self.max_active:
                raise TokenLimitError(
                    f"this agent already has {self.max_active} active tokens "
                    "(tokens.max_active): revoke unused ones ('therelay-agent token list') "
                    "or raise the limit"
                )
            new = self._insert(kind, scope, now, protocols, expires_at, ttl, label, created_by,
                               replaces=None, max_sessions=max_sessions)
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
                               old.label, actor, replaces=old.id,
                               max_sessions=old.max_sessions)
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

    def update(self, token_id: str, now: float, actor: str, change: TokenChange) -> TokenRecord:
        """Change a local token's label, expiry, protocols or session cap, audited with the
        values before and after. A running daemon applies a narrowing to the token's live
        sessions within a second (those no longer allowed end). Nothing changes when the
        values are the same; refused for a relay token, and for a token that cannot grant
        again (revoked, expired, rotated)."""
        with self._lock, transaction(self._conn):
            old = self._get_locked(token_id)
            if old.origin is not Origin.LOCAL:
                raise TokenReadOnlyError(
                    f"token {old.display} was issued by TheRelay cloud and is read-only on the "
                    "agent: change it in TheRelay Dashboard (revoking it here stays possible)"
                )
            state = old.status(now)
            if state is not Status.ACTIVE:
                fix = ("revocation is final" if state is Status.REVOKED
                       else "an expired token stays expired")
                raise TokenError(f"token {old.display} is {state.value} ({fix}): create a new "
                                 "token instead")
            if old.replaced_by:
                raise TokenError(f"token {old.display} was rotated (replaced by "
                                 f"{old.replaced_by}): update the new token instead")
            new = self._changed(old, change, now)
            before, after = editable_fields(old), editable_fields(new)
            diff = [k for k in before if before[k] != after[k]]
            if not diff:
                return old
            self._conn.execute(
                "UPDATE tokens SET label = ?, expires_at = ?, ttl = ?, protocols = ?, "
                "max_sessions = ?, rev = ? WHERE id = ?",
                (new.label, new.expires_at, new.ttl, ",".join(sorted(new.protocols)),
                 new.max_sessions, next_rev(self._conn), token_id))
            audit.append(self._conn, [audit.AuditEntry(
                now, audit.UPDATED, token_id=token_id, actor=actor or None,
                detail={"before": {k: before[k] for k in diff},
                        "after": {k: after[k] for k in diff}},
            )])
            return self._get_locked(token_id)

    @staticmethod
    def _changed(old: TokenRecord, change: TokenChange, now: float) -> TokenRecord:
        """``old`` with ``change`` applied and checked."""
        new = old
        if change.label is not KEEP:
            new = replace(new, label=change.label)
        if change.ttl is not KEEP and change.ttl is not None:
            new = replace(new, expires_at=now + change.ttl, ttl=change.ttl)
        elif change.expires_at is not KEEP:
            new = replace(new, expires_at=change.expires_at, ttl=None)
        if new.expires_at is not None and new.expires_at <= now:
            raise TokenError(f"expiry {format_time(new.expires_at)} is in the past")
        if change.protocols is not KEEP:
            if change.protocols and old.kind is not Kind.ACCESS:
                raise TokenError("only access tokens can be restricted to protocols")
            new = replace(new, protocols=change.protocols)
        if change.max_sessions is not KEEP:
            if change.max_sessions is not None and old.kind is not Kind.ACCESS:
                raise TokenError("only access tokens open sessions: a session cap is for them")
            new = replace(new, max_sessions=change.max_sessions)
        return new

    # -- live sessions, as the running daemon last published them --------------------------

    def publish_live_sessions(self, counts: dict[str, int], now: float) -> None:
        """The daemon's live sessions per token (replacing the previous counts)."""
        with self._lock, transaction(self._conn):
            self._conn.execute("DELETE FROM live_sessions")
            self._conn.executemany(
                "INSERT INTO live_sessions (token_id, count, updated_at) VALUES (?, ?, ?)",
                [(token_id, n, now) for token_id, n in counts.items()])

    def live_sessions(self) -> dict[str, int]:
        """Live sessions per token as the daemon last published them (within a second)."""
        with self._lock:
            rows = self._conn.execute("SELECT token_id, count FROM live_sessions").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # -- tokens issued by TheRelay cloud (docs/relay-protocol.md §1.5) ----------------------
    # (what was sent to the relay and acknowledged is agent.state.outbox.RelayOutbox)

    def apply_relay_sync(
        self, tokens: Collection[RelayToken], *, full: bool, cursor: str, now: float
    ) -> SyncResult:
        """Upsert relay-issued tokens (only their hashes); with ``full``, relay tokens not
        listed are revoked. Local tokens are never touched.

        Two promises hold against the relay too: a revoked token never grants again (a
        record listing it as active is refused; its revocation can only move earlier), and
        a token id keeps its hash. Refused records are left out, audited once, and
        returned, so the ack tells the relay (docs/relay-protocol.md §1.5)."""
        changed = 0
        refused: list[SyncRefusal] = []
        with self._lock, transaction(self._conn):
            listed = set()
            entries = []
            for t in tokens:
                listed.add(t.id)
                row = self._conn.execute(
                    "SELECT origin, secret_hash, scope, protocols, expires_at, revoked_at, "
                    "label FROM tokens WHERE id = ?", (t.id,)).fetchone()
                problem = sync_problem(self._conn, t, row)
                if problem is not None:
                    refused.append(refuse(self._conn, t.id, *problem, now))
                    continue
                revoked_at = t.revoked_at
                if row is not None and row[5] is not None:  # revoked: stays so, or earlier
                    revoked_at = row[5] if revoked_at is None else min(revoked_at, row[5])
                values = (t.sha256, t.scope, ",".join(sorted(t.protocols)), t.expires_at,
                          revoked_at, t.label)
                if row is not None and tuple(row[1:]) == values:
                    continue
                self._conn.execute(
                    "INSERT INTO tokens (id, kind, scope, secret_hash, last4, protocols, "
                    "created_at, expires_at, label, created_by, origin, revoked_at, rev) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'relay', 'relay', ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, "
                    "protocols = excluded.protocols, expires_at = excluded.expires_at, "
                    "label = excluded.label, revoked_at = excluded.revoked_at, rev = excluded.rev",
                    (t.id, t.kind, t.scope, t.sha256, t.last4, ",".join(sorted(t.protocols)),
                     now, t.expires_at, t.label, revoked_at, next_rev(self._conn)))
                changed += 1
                if row is None:
                    event = audit.REVOKED if revoked_at is not None else audit.CREATED
                else:
                    event = (audit.REVOKED if revoked_at is not None and row[5] is None
                             else audit.UPDATED)
                entries.append(audit.AuditEntry(now, event, token_id=t.id, actor="relay",
                                                detail={"origin": "relay", "scope": t.scope}))
                if len(entries) >= AUDIT_BATCH:
                    audit.append(self._conn, entries)
                    entries.clear()
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
        return SyncResult(changed, refused)

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
        return record(row)

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
            if scope.value not in self._known_cameras():
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
        max_sessions: int | None = None,
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
            f"INSERT INTO tokens ({', '.join(COLUMNS)}) VALUES "
            f"({', '.join('?' * len(COLUMNS))})",
            (parsed.public_id, kind.value, str(scope), token_hash(parsed.text),
             parsed.text[-4:], ",".join(sorted(protocols)), None, now, expires_at, ttl, label,
             created_by, Origin.LOCAL.value, None, None, replaces, None, max_sessions, rev),
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
    if record.max_sessions is not None:
        out["max_sessions"] = record.max_sessions
    return out


def editable_fields(record: TokenRecord) -> dict[str, Any]:
    """The fields ``update`` may change, as the audit log shows them before and after."""
    return {"label": record.label, "expires_at": record.expires_at, "ttl_seconds": record.ttl,
            "protocols": sorted(record.protocols) or ["all"],
            "max_sessions": record.max_sessions}
