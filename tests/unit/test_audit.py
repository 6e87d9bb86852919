"""The audit log is append-only and tamper-evident, and retention keeps it verifiable."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.access import audit
from agent.access.audit import AuditEntry, AuditQuery
from agent.state.db import connect, transaction

T0 = 1_800_000_000.0


@pytest.fixture
def conn(tmp_path: Path):
    c = connect(tmp_path / "agent.db")
    with transaction(c):
        audit.append(c, [
            AuditEntry(T0 + i, audit.GRANTED if i % 2 else audit.DENIED, token_id=f"tok{i % 3}",
                       camera="cam1", protocol="webrtc", peer_ip=f"10.0.0.{i}",
                       result="granted" if i % 2 else "denied",
                       reason="granted" if i % 2 else "expired", detail={"i": i})
            for i in range(10)
        ])
    yield c
    c.close()


def test_an_untouched_log_verifies(conn: sqlite3.Connection) -> None:
    result = audit.verify(conn)
    assert result.ok and result.checked == 10 and result.head_seq == 10
    assert result.head_hash == conn.execute("SELECT hash FROM audit WHERE seq=10").fetchone()[0]


def _sql(*statements: str) -> Callable[[sqlite3.Connection], None]:
    def run(c: sqlite3.Connection) -> None:
        for statement in statements:
            c.execute(statement)
    return run


TAMPERING = [
    ("edit a field", _sql("UPDATE audit SET reason='granted' WHERE seq=5"), "entry 5 was modified"),
    ("edit the time", _sql("UPDATE audit SET ts=ts+1 WHERE seq=2"), "entry 2 was modified"),
    ("edit the detail", _sql("UPDATE audit SET detail='{\"i\":99}' WHERE seq=7"),
     "entry 7 was modified"),
    ("delete one", _sql("DELETE FROM audit WHERE seq=5"), "entry 5 is missing"),
    ("delete the first", _sql("DELETE FROM audit WHERE seq=1"), "entry 1 is missing"),
    ("delete and renumber",
     _sql("DELETE FROM audit WHERE seq=5", "UPDATE audit SET seq=seq-1 WHERE seq>5"),
     "entry 5 does not follow"),
    ("swap two", _sql("UPDATE audit SET seq=100 WHERE seq=3",
                      "UPDATE audit SET seq=3 WHERE seq=4",
                      "UPDATE audit SET seq=4 WHERE seq=100"),
     "entry 3 does not follow"),
    ("rehash an edit without fixing its successor",
     lambda c: _rehash(c, 6, reason="revoked"), "entry 7 does not follow"),
    ("remove the oldest and fake the anchor",
     _sql("INSERT INTO meta VALUES ('audit_anchor', "
          "(SELECT json_array(seq, hash) FROM audit WHERE seq=3))",
          "DELETE FROM audit WHERE seq<=3"),
     "removed without an audited prune"),
]


def _rehash(c: sqlite3.Connection, seq: int, **changes: str) -> None:
    """A tamperer who recomputes the edited entry's own hash still breaks the next link."""
    for column, value in changes.items():
        c.execute(f"UPDATE audit SET {column}=? WHERE seq=?", (value, seq))
    row = c.execute("SELECT ts, event, token_id, camera, protocol, peer_ip, actor, result, "
                    "reason, detail, prev_hash FROM audit WHERE seq=?", (seq,)).fetchone()
    c.execute("UPDATE audit SET hash=? WHERE seq=?",
              (audit._entry_hash(row[-1], seq, tuple(row[:-1])), seq))


@pytest.mark.parametrize(("name", "tamper", "problem"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_detected(conn: sqlite3.Connection, name, tamper, problem) -> None:
    tamper(conn)
    result = audit.verify(conn)
    assert not result.ok, name
    assert result.problem is not None and problem in result.problem


def test_prune_keeps_the_chain_verifiable_and_is_itself_audited(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        deleted = audit.prune(conn, before=T0 + 4, now=T0 + 100, actor="retention")
    assert deleted == 4
    seqs = [r[0] for r in conn.execute("SELECT seq FROM audit ORDER BY seq")]
    assert seqs == list(range(5, 12))
    result = audit.verify(conn)
    assert result.ok and result.checked == 7
    (pruned,) = audit.query(conn, AuditQuery(event=audit.PRUNED))
    assert pruned["detail"]["through_seq"] == 4 and pruned["actor"] == "retention"
    with transaction(conn):  # appending after a prune continues the chain
        audit.append(conn, [AuditEntry(T0 + 200, audit.REVOKED, token_id="tok1")])
    assert audit.verify(conn).ok
    with transaction(conn):  # prune everything, then append
        audit.prune(conn, before=T0 + 1000, now=T0 + 1000, actor="retention")
    assert audit.verify(conn).ok
    conn.execute("DELETE FROM audit")  # losing even the prune record is detected
    assert not audit.verify(conn).ok


def test_query_filters_and_pagination(conn: sqlite3.Connection) -> None:
    assert [e["seq"] for e in audit.query(conn, AuditQuery(token_id="tok1"))] == [2, 5, 8]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(reason="expired", limit=2))] == [1, 3]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(reason="expired", after_seq=3,
                                                          limit=2))] == [5, 7]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(since=T0 + 8))] == [9, 10]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(until=T0 + 2))] == [1, 2]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(peer_ip="10.0.0.3"))] == [4]
    assert [e["seq"] for e in audit.query(conn, AuditQuery(limit=2, newest_first=True))] == [10, 9]
    assert [e["seq"] for e in audit.iter_all(conn, AuditQuery(), page=3)] == list(range(1, 11))


def test_entries_read_back_exactly(conn: sqlite3.Connection) -> None:
    (entry,) = audit.query(conn, AuditQuery(after_seq=3, limit=1))
    assert entry["detail"] == {"i": 3} and entry["ts"] == T0 + 3 and entry["peer_ip"] == "10.0.0.3"
    assert json.loads(json.dumps(entry)) == entry  # exportable as JSON lines
