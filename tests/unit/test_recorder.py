"""Access events are written in batches off the event loop, and counted per token."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.model import Action, Protocol, Scope
from agent.access.policy import AccessRequest, FailureLimiter, Site, authorize
from agent.access.recorder import OVERFLOW, AccessRecorder
from agent.access.store import TokenStore
from agent.access.tokens import Kind
from agent.state.database import StateDB
from agent.state.db import connect

T0 = 1_800_000_000.0  # a whole hour: 500000 * 3600


@pytest.fixture
def store(tmp_path: Path):
    s = TokenStore(StateDB(tmp_path / "agent.db"), Site("site1", "acme"), 100, lambda: {"cam1"})
    yield s
    s.close()


def audit_count(path: Path) -> int:
    conn = connect(path)
    n = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    conn.close()
    return n


def test_decisions_are_batched_then_counted(store: TokenStore) -> None:
    new = store.create(Kind.ACCESS, Scope.parse("camera:cam1"), T0)
    recorder = AccessRecorder(store.path, max_ips=100, flush_interval=3600)
    recorder.start()
    tokens, _ = store.load_all()
    site = store.site
    plan = [  # (token, camera, protocol, ip, ts)
        *[(new.token, "cam1", "webrtc", "10.0.0.1", T0 + i) for i in range(300)],
        *[(new.token, "cam1", "snapshot", "10.0.0.2", T0 + 86400 + i) for i in range(100)],
        *[(new.token, "cam2", "webrtc", "10.0.0.3", T0 + 10) for _ in range(50)],  # scope
        *[("garbage", "cam1", "webrtc", "10.0.0.4", T0) for _ in range(50)],  # no token id
    ]
    for token, camera, protocol, ip, ts in plan:
        req = AccessRequest(token, camera, Action.VIEW, Protocol(protocol), ip, ts)
        recorder.record_decision(req, authorize(req, tokens, site))
    assert audit_count(store.path) == 1  # only token.created: nothing written per request
    assert recorder.flush()
    assert audit_count(store.path) == 1 + len(plan)
    stats = store.read(lambda c: usage.stats(c, new.record.id))
    assert stats["uses"] == 400 and stats["denied"] == 50
    assert stats["last_used_at"] == T0 + 86400 + 99
    assert stats["per_day"] == [{"day": int(T0 // 86400), "granted": 300, "denied": 50},
                                {"day": int(T0 // 86400) + 1, "granted": 100, "denied": 0}]
    assert stats["per_protocol"] == {"snapshot": {"granted": 100, "denied": 0},
                                     "webrtc": {"granted": 300, "denied": 50}}
    assert {(i["ip"], i["count"]) for i in stats["ips"]} == {
        ("10.0.0.1", 300), ("10.0.0.2", 100), ("10.0.0.3", 50)}
    denied = store.read(lambda c: audit.query(c, audit.AuditQuery(reason="malformed",
                                                                  limit=100)))
    assert len(denied) == 50 and denied[0]["peer_ip"] == "10.0.0.4"
    recorder.close()
    assert store.read(audit.verify).ok


def test_ip_table_is_bounded_per_token(store: TokenStore) -> None:
    new = store.create(Kind.ACCESS, Scope.parse("camera:cam1"), T0)
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600)
    tokens, _ = store.load_all()
    for i in range(20):
        req = AccessRequest(new.token, "cam1", Action.VIEW, Protocol.WEBRTC, f"10.0.1.{i}",
                            T0 + i)
        recorder.record_decision(req, authorize(req, tokens, store.site))
    recorder.close()  # not started: writes synchronously
    ips = [i["ip"] for i in store.read(lambda c: usage.stats(c, new.record.id))["ips"]]
    assert ips == [f"10.0.1.{i}" for i in range(19, 14, -1)]  # the five most recent


def test_pending_events_are_bounded_and_overflow_is_audited(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=5, max_pending=10)
    for i in range(25):
        recorder.record(AuditEntry(T0 + i, audit.DENIED, reason="malformed"))
    recorder.close()
    entries = store.read(lambda c: audit.query(c, audit.AuditQuery(limit=100)))
    assert len(entries) == 11
    assert entries[-1]["event"] == OVERFLOW and entries[-1]["detail"] == {"dropped": 15}


def test_close_writes_what_is_pending(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600)
    recorder.start()
    recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
    recorder.close()
    assert audit_count(store.path) == 1


def test_the_limiter_feeds_rate_limited_into_the_audit(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=5)
    limiter = FailureLimiter(burst=2, per_minute=1)
    for _ in range(4):
        req = AccessRequest("junk", "cam1", Action.VIEW, Protocol.WEBRTC, "10.9.9.9", T0)
        recorder.record_decision(req, authorize(req, {}, store.site, limiter))
    recorder.close()
    entries = store.read(lambda c: audit.query(c, audit.AuditQuery(limit=100)))
    assert [(e["reason"], e["detail"]) for e in entries] == [
        ("malformed", {}), ("malformed", {}),
        ("rate_limited", {"underlying": "malformed"}),
        ("rate_limited", {"underlying": "malformed"})]
