"""Access events are written in batches off the event loop, and counted per token."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from agent.access import audit, usage
from agent.access.audit import AuditEntry
from agent.access.model import Action, Protocol, Scope
from agent.access.policy import AccessRequest, FailureLimiter, Site, authorize
from agent.access.recorder import OVERFLOW, SUPPRESSED, AccessRecorder
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
    # grants one row each; each (source IP, reason) of denials: its first, then one count
    assert audit_count(store.path) == 1 + 400 + 2 * 2
    denied = store.read(lambda c: audit.query(c, audit.AuditQuery(result="denied")))
    assert [(e["peer_ip"], e["reason"], e["detail"].get("count")) for e in denied] == [
        ("10.0.0.3", "scope_mismatch", None), ("10.0.0.4", "malformed", None),
        ("10.0.0.3", "scope_mismatch", 49), ("10.0.0.4", "malformed", 49)]
    stats = store.read(lambda c: usage.stats(c, new.record.id))
    assert stats["uses"] == 400 and stats["denied"] == 50
    assert stats["last_used_at"] == T0 + 86400 + 99
    assert stats["per_day"] == [{"day": int(T0 // 86400), "granted": 300, "denied": 50},
                                {"day": int(T0 // 86400) + 1, "granted": 100, "denied": 0}]
    assert stats["per_protocol"] == {"snapshot": {"granted": 100, "denied": 0},
                                     "webrtc": {"granted": 300, "denied": 50}}
    assert {(i["ip"], i["count"]) for i in stats["ips"]} == {
        ("10.0.0.1", 300), ("10.0.0.2", 100), ("10.0.0.3", 50)}
    recorder.close()
    assert store.read(audit.verify).ok


def wakeups(thread: threading.Thread) -> int:
    """The thread's voluntary context switches: one each time it blocks and is woken."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def test_an_idle_writer_sleeps_until_an_event_comes(store: TokenStore) -> None:
    """Nothing to write: the writer does not wake every interval (an idle agent's CPU). An
    event wakes it and is written in its batch, one interval later."""
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=0.02)
    recorder.start()
    try:
        (writer,) = [t for t in threading.enumerate() if t.name == "access-recorder"]
        time.sleep(0.1)
        before = wakeups(writer)
        time.sleep(0.5)  # 25 intervals
        assert wakeups(writer) - before <= 2
        recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
        deadline = time.monotonic() + 1.0
        while audit_count(store.path) == 0:
            assert time.monotonic() < deadline, "the event was never written"
            time.sleep(0.01)
    finally:
        recorder.close()


def test_a_sleeping_writer_still_commits_a_grant_at_once(store: TokenStore) -> None:
    """After the writer fell asleep, ``durable`` still wakes it at once (even with a long
    interval), while a denial waits for its batch as before."""
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600)
    recorder.start()
    try:
        for i in range(20):
            started = time.monotonic()
            ticket = recorder.record(AuditEntry(T0, audit.GRANTED, token_id=f"t{i}"))
            if i % 2:
                time.sleep(0.01)  # the writer wakes for the record, then the durable comes
            recorder.durable(ticket).result(timeout=5)
            assert time.monotonic() - started < 1.0
        assert audit_count(store.path) == 20
        recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
        time.sleep(0.2)
        assert audit_count(store.path) == 20  # batched
        assert recorder.flush()
        assert audit_count(store.path) == 21
    finally:
        recorder.close()


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
        recorder.record(AuditEntry(T0 + i, audit.GRANTED, token_id=f"t{i}"))
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
        ("malformed", {}),
        ("rate_limited", {"underlying": "malformed"}),
        ("malformed", {"count": 1, "since": T0}),
        ("rate_limited", {"count": 1, "since": T0, "underlying": "malformed"})]


def test_a_flood_of_long_denials_takes_a_few_short_rows(store: TokenStore) -> None:
    """3,000 denials with 8 kB paths (a token glued into some) from one address: four rows,
    camera ids cut to 64 characters, no token kept; the chain still verifies."""
    new = store.create(Kind.ACCESS, Scope.parse("camera:cam1"), T0)
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600)
    recorder.start()
    limiter = FailureLimiter(burst=10, per_minute=1)
    size_before = store.path.stat().st_size
    for i in range(3000):
        camera = ("x" * 8000 + new.token) if i % 2 else (f"%3D{new.token}" + "y" * 8000)
        req = AccessRequest(None, camera, Action.VIEW, Protocol.WEBRTC, "10.6.6.6", T0 + i / 1000)
        recorder.record_decision(req, authorize(req, {}, store.site, limiter))
    assert recorder.flush()
    recorder.close()
    rows = store.read(lambda c: audit.query(c, audit.AuditQuery(result="denied")))
    assert [(r["reason"], r["detail"].get("count")) for r in rows] == [
        ("missing", None), ("rate_limited", None), ("missing", 9), ("rate_limited", 2989)]
    assert all(len(r["camera"] or "") <= 64 for r in rows)
    # the redaction eats the letters glued after the token too: better too much than a leak
    assert rows[0]["camera"] == "%3D" + new.token[:16] + "…[redacted]"
    raw = b"".join(p.read_bytes() for p in store.path.parent.iterdir() if p.is_file())
    assert new.token[17:40].encode() not in raw
    assert store.path.stat().st_size - size_before < 64 * 1024
    assert store.read(audit.verify).ok


def test_a_new_window_writes_the_first_denial_again(store: TokenStore) -> None:
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600, denial_window=0.05)
    for _ in range(3):
        recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
    time.sleep(0.06)  # sync test: the window is wall-clock time
    recorder.record(AuditEntry(T0 + 1, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
    recorder.record(AuditEntry(T0 + 1, audit.DENIED, reason="missing", peer_ip="10.0.0.2"))
    recorder.close()
    rows = store.read(lambda c: audit.query(c, audit.AuditQuery()))
    assert [(r["peer_ip"], r["detail"].get("count")) for r in rows] == [
        ("10.0.0.1", None), ("10.0.0.1", 2), ("10.0.0.1", None), ("10.0.0.2", None)]


def test_grants_after_folded_denials_are_durable(store: TokenStore) -> None:
    """Folded denials count as written: a grant recorded after them is released when its
    own batch commits (tickets stay in order)."""
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600)
    recorder.start()
    for _ in range(50):
        recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip="10.0.0.1"))
    ticket = recorder.record(AuditEntry(T0, audit.GRANTED, token_id="abc"))
    recorder.durable(ticket).result(timeout=5)
    recorder.close()


def test_past_the_quota_denials_are_only_counted(store: TokenStore) -> None:
    """Past audit.max_size_mb, grants are still written one by one; denials become one
    audit.suppressed count per window."""
    recorder = AccessRecorder(store.path, max_ips=5, flush_interval=3600, max_bytes=1)
    recorder.record(AuditEntry(T0, audit.GRANTED, token_id="first"))
    recorder.flush()
    assert recorder.over_quota
    for i in range(100):
        recorder.record(AuditEntry(T0, audit.DENIED, reason="missing", peer_ip=f"10.0.0.{i}"))
    recorder.record(AuditEntry(T0, audit.GRANTED, token_id="second"))
    recorder.close()
    rows = store.read(lambda c: audit.query(c, audit.AuditQuery()))
    assert [r["event"] for r in rows] == [audit.GRANTED, audit.GRANTED, SUPPRESSED]
    assert rows[-1]["detail"]["denials"] == 100
    assert store.read(audit.verify).ok


def test_the_folder_bounds_its_keys() -> None:
    """Many source addresses at once (a spoofing LAN host): past max_keys, their denials
    share one key with no address, so memory and rows stay bounded."""
    from agent.access.denials import DenialFolder

    folder = DenialFolder(window=60, max_keys=3)
    written = []
    for i in range(100):
        for _ in range(2):
            kept, closed = folder.offer(AuditEntry(T0, audit.DENIED, reason="missing",
                                                   peer_ip=f"10.0.{i}.1"), now=0.0)
            written += [e for e in [kept, *closed] if e is not None]
    written += folder.due(0.0, everything=True)
    assert len(written) <= 2 * 4
    assert sum(e.detail.get("count", 1) for e in written) == 200
    assert any(e.peer_ip is None for e in written)
