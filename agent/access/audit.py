"""Append-only, tamper-evident audit log of every token event.

Each entry's ``hash`` is SHA-256 over the previous entry's hash and the entry's own fields
(its sequence number included), so an edited, deleted, inserted or reordered entry breaks
the chain at that point. Pruning by age keeps the chain verifiable: the hash of the last
pruned entry becomes the anchor, and the prune itself is an audited entry naming it.
Truncating the newest entries is only detectable against a head hash kept elsewhere:
``audit verify`` prints the head for that purpose.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

GENESIS = "0" * 64

#: Event names written to the log.
CREATED = "token.created"
REVOKED = "token.revoked"
ROTATED = "token.rotated"
UPDATED = "token.updated"
#: A relay sync tried to un-revoke a token or change its hash (or clashed): not applied.
SYNC_REFUSED = "token.sync_refused"
GRANTED = "access.granted"
DENIED = "access.denied"
SESSION_ENDED = "session.ended"
PRUNED = "audit.pruned"

_COLUMNS = (
    "seq", "ts", "event", "token_id", "camera", "protocol", "peer_ip", "actor", "result",
    "reason", "detail", "prev_hash", "hash",
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One event. ``detail`` holds event-specific values (duration, bytes, linked ids)."""

    ts: float
    event: str
    token_id: str | None = None
    camera: str | None = None
    protocol: str | None = None
    peer_ip: str | None = None
    actor: str | None = None
    result: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _detail_json(detail: dict[str, Any]) -> str | None:
    return json.dumps(detail, sort_keys=True, separators=(",", ":")) if detail else None


def _entry_hash(prev_hash: str, seq: int, row: tuple[Any, ...]) -> str:
    payload = json.dumps([seq, *row], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    anchor = _anchor(conn)
    return anchor if anchor else (0, GENESIS)


def _anchor(conn: sqlite3.Connection) -> tuple[int, str] | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'audit_anchor'").fetchone()
    if row is None:
        return None
    seq, digest = json.loads(row[0])
    return int(seq), str(digest)


def append(conn: sqlite3.Connection, entries: Iterable[AuditEntry]) -> int:
    """Chain ``entries`` onto the log. Call inside a ``BEGIN IMMEDIATE`` transaction."""
    seq, prev = _head(conn)
    count = 0
    for e in entries:
        seq += 1
        row = (
            e.ts, e.event, e.token_id, e.camera, e.protocol, e.peer_ip, e.actor, e.result,
            e.reason, _detail_json(e.detail),
        )
        digest = _entry_hash(prev, seq, row)
        conn.execute(
            f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 13)})",
            (seq, *row, prev, digest),
        )
        prev = digest
        count += 1
    return count


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    problem: str | None = None


def verify(conn: sqlite3.Connection) -> VerifyResult:
    """Walk the chain from the anchor (or genesis) to the head."""
    anchor = _anchor(conn)
    expected_seq, prev = anchor if anchor else (0, GENESIS)
    checked = 0
    last_prune: tuple[int, str] | None = None
    for row in conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY seq"):
        seq, *fields, prev_hash, digest = row
        expected_seq += 1
        if seq != expected_seq:
            return VerifyResult(False, checked, seq, prev,
                                f"entry {expected_seq} is missing (next is {seq})")
        if prev_hash != prev:
            return VerifyResult(False, checked, seq, prev,
                                f"entry {seq} does not follow entry {seq - 1} (chain broken)")
        if _entry_hash(prev, seq, tuple(fields)) != digest:
            return VerifyResult(False, checked, seq, prev,
                                f"entry {seq} was modified after it was written")
        if fields[1] == PRUNED and fields[9]:
            named = json.loads(fields[9])
            last_prune = (int(named["through_seq"]), str(named["through_hash"]))
        prev = digest
        checked += 1
    if anchor is not None and anchor != last_prune:
        return VerifyResult(False, checked, expected_seq, prev,
                            "the oldest entries were removed without an audited prune")
    return VerifyResult(True, checked, expected_seq, prev)


def prune(conn: sqlite3.Connection, before: float, now: float, actor: str) -> int:
    """Delete entries older than ``before``, keeping the chain verifiable. In a transaction."""
    row = conn.execute(
        "SELECT seq, hash FROM audit WHERE ts < ? ORDER BY seq DESC LIMIT 1", (before,)
    ).fetchone()
    if row is None:
        return 0
    through_seq, through_hash = int(row[0]), str(row[1])
    deleted = conn.execute("DELETE FROM audit WHERE seq <= ?", (through_seq,)).rowcount
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_anchor', ?)",
        (json.dumps([through_seq, through_hash]),),
    )
    append(conn, [AuditEntry(now, PRUNED, actor=actor, detail={
        "through_seq": through_seq, "through_hash": through_hash, "deleted": deleted,
    })])
    return int(deleted)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    token_id: str | None = None
    camera: str | None = None
    event: str | None = None
    result: str | None = None
    reason: str | None = None
    peer_ip: str | None = None
    since: float | None = None
    until: float | None = None
    after_seq: int = 0
    #: Only entries before this seq (exclusive): paging backwards with newest_first.
    before_seq: int | None = None
    limit: int = 100
    newest_first: bool = False


def query(conn: sqlite3.Connection, q: AuditQuery) -> list[dict[str, Any]]:
    """Entries matching every filter, after ``after_seq`` (pagination), oldest first unless
    ``newest_first``."""
    where: list[str] = ["seq > ?"]
    args: list[object] = [q.after_seq]
    for column in ("token_id", "camera", "event", "result", "reason", "peer_ip"):
        value = getattr(q, column)
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if q.before_seq is not None:
        where.append("seq < ?")
        args.append(q.before_seq)
    if q.since is not None:
        where.append("ts >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("ts < ?")
        args.append(q.until)
    order = "DESC" if q.newest_first else "ASC"
    sql = (f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE {' AND '.join(where)} "
           f"ORDER BY seq {order} LIMIT ?")
    return [_row_dict(r) for r in conn.execute(sql, (*args, q.limit))]


def iter_all(conn: sqlite3.Connection, q: AuditQuery, page: int = 1000) -> Iterator[dict[str, Any]]:
    """Every matching entry, fetched page by page (for exports)."""
    after = q.after_seq
    while True:
        rows = query(conn, replace(q, after_seq=after, limit=page, newest_first=False))
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1]["seq"]


def _row_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(_COLUMNS, row, strict=True))
    out["detail"] = json.loads(out["detail"]) if out["detail"] else {}
    return out
