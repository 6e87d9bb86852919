"""The token store: hashes only, limits under concurrency, scope checks, rotation, changes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.access import audit
from agent.access.index import record
from agent.access.model import Protocol, Scope, Status
from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.access.tokens import Kind, parse
from agent.errors import NotFoundError, StoreError, TokenError, TokenLimitError
from agent.state.database import StateDB
from agent.state.db import MIGRATIONS, connect, db_path
from tests.conftest import remember

NOW = 1_800_000_000.0
CAM = Scope.parse("camera:cam1")


def make_store(state: Path, max_active: int = 100) -> TokenStore:
    return TokenStore(StateDB(db_path(state)), Site("site1", "acme"), max_active,
                      lambda: {"cam1", "cam2"})


@pytest.fixture
def store(tmp_path: Path):
    s = make_store(tmp_path)
    yield s
    s.close()


def audit_entries(store: TokenStore) -> list[dict]:
    return store.read(lambda c: audit.query(c, audit.AuditQuery(limit=1000)))


def test_only_the_hash_is_stored(store: TokenStore, tmp_path: Path) -> None:
    new = store.create(Kind.ACCESS, CAM, NOW, label="door")
    assert new.record.secret_hash == hashlib.sha256(new.token.encode()).digest()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("agent.db*"))
    assert new.token.encode() not in raw
    assert new.token[17:60].encode() not in raw  # not even the secret part
    assert stat.S_IMODE(os.stat(db_path(tmp_path)).st_mode) == 0o600


def test_create_records_every_field_and_audits(store: TokenStore) -> None:
    new = store.create(Kind.ACCESS, CAM, NOW, protocols=frozenset({Protocol.WEBRTC}),
                       expires_at=NOW + 3600, label="door", created_by="cli:ann")
    r = store.get(new.record.id)
    assert (r.kind, r.scope, r.protocols, r.expires_at, r.label, r.created_by, r.created_at) == (
        Kind.ACCESS, CAM, frozenset({Protocol.WEBRTC}), NOW + 3600, "door", "cli:ann", NOW)
    assert r.display == f"tra_{r.id}…{new.token[-4:]}"
    assert parse(new.token).public_id == r.id  # type: ignore[union-attr]
    (entry,) = audit_entries(store)
    assert (entry["event"], entry["token_id"], entry["actor"]) == ("token.created", r.id, "cli:ann")
    assert entry["detail"]["scope"] == "camera:cam1"


@pytest.mark.parametrize(
    ("kind", "scope", "extra", "message"),
    [
        (Kind.ACCESS, "camera:cam9", {}, "does not exist on this agent"),
        (Kind.ACCESS, "host:other", {}, "is not this agent"),
        (Kind.ACCESS, "account:other", {}, "is not this agent's account"),
        (Kind.ADMIN, "camera:cam1", {}, "admin tokens are scoped"),
        (Kind.PUBLISHER, "host:site1", {}, "issued by TheRelay cloud"),
        (Kind.ADMIN, "host:site1", {"protocols": frozenset({Protocol.RTSP})}, "only access"),
        (Kind.ACCESS, "camera:cam1", {"expires_at": NOW - 1}, "in the past"),
    ],
)
def test_create_refusals(store: TokenStore, kind, scope, extra, message) -> None:
    with pytest.raises(TokenError, match=message):
        store.create(kind, Scope.parse(scope), NOW, **extra)
    assert store.list_tokens(NOW) == []
    assert audit_entries(store) == []


def test_limit_counts_only_active_local_tokens(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_active=2)
    a = store.create(Kind.ACCESS, CAM, NOW)
    store.create(Kind.ACCESS, CAM, NOW, expires_at=NOW + 10)
    with pytest.raises(TokenLimitError, match=r"tokens\.max_active"):
        store.create(Kind.ACCESS, CAM, NOW)
    store.revoke(a.record.id, NOW, "t")
    store.create(Kind.ACCESS, CAM, NOW)  # room again
    with pytest.raises(TokenLimitError):
        store.create(Kind.ACCESS, CAM, NOW)
    store.create(Kind.ACCESS, CAM, NOW + 11)  # the short-lived one has expired by then
    assert len(store.list_tokens(NOW + 11, status=Status.ACTIVE)) == 2


def test_concurrent_creates_at_the_limit_leave_exactly_the_limit(tmp_path: Path) -> None:
    limit, workers, attempts = 7, 4, 6
    make_store(tmp_path, limit).close()
    barrier = threading.Barrier(workers)
    outcomes: list[str] = []

    def worker() -> None:
        store = make_store(tmp_path, limit)  # its own connection, like another process
        barrier.wait()
        for _ in range(attempts):
            try:
                store.create(Kind.ACCESS, CAM, NOW)
                outcomes.append("ok")
            except TokenLimitError:
                outcomes.append("limit")
        store.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == limit
    assert outcomes.count("limit") == workers * attempts - limit
    check = make_store(tmp_path, limit)
    assert len(check.list_tokens(NOW, status=Status.ACTIVE)) == limit
    check.close()


def test_concurrent_cli_processes_at_the_limit(tmp_path: Path) -> None:
    env = {**os.environ, "THERELAY_STATE_DIR": str(tmp_path), "THERELAY_TOKENS_MAX_ACTIVE": "3"}
    cmd = [sys.executable, "-m", "agent", "token", "create", "--host"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(5)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    created = [out for code, out, _ in results if code == 0]
    for _, out, _ in results:
        remember(out)
    assert len(created) == 3
    assert all("tokens.max_active" in err for code, _, err in results if code != 0)


def test_revoke(store: TokenStore) -> None:
    new = store.create(Kind.ACCESS, CAM, NOW)
    record = store.revoke(new.record.id, NOW + 5, "cli:ann")
    assert record.revoked_at == NOW + 5 and record.status(NOW + 5) is Status.REVOKED
    with pytest.raises(TokenError, match="already revoked"):
        store.revoke(new.record.id, NOW + 6, "cli:ann")
    with pytest.raises(NotFoundError):
        store.revoke("AAAAAAAAAAAA", NOW, "cli:ann")
    assert [e["event"] for e in audit_entries(store)] == ["token.created", "token.revoked"]


def test_rotate_now_keeps_scope_protocols_and_lifetime(store: TokenStore) -> None:
    old = store.create(Kind.ACCESS, CAM, NOW, protocols=frozenset({Protocol.HLS}),
                       ttl=7200, label="guest")
    new = store.rotate(old.record.id, NOW + 1000, "cli:ann")
    r = new.record
    assert (r.scope, r.protocols, r.label, r.replaces) == (CAM, frozenset({Protocol.HLS}),
                                                          "guest", old.record.id)
    assert r.expires_at == NOW + 1000 + 7200 and r.ttl == 7200  # same duration, from now
    after = store.get(old.record.id)
    assert after.replaced_by == r.id and after.revoked_at == NOW + 1000
    events = [(e["event"], e["token_id"], e["detail"]) for e in audit_entries(store)][1:]
    assert events[0][0:2] == ("token.rotated", old.record.id)
    assert events[0][2]["replaced_by"] == r.id
    assert events[1][0:2] == ("token.created", r.id) and events[1][2]["replaces"] == old.record.id


def test_rotate_keeps_an_absolute_expiry(store: TokenStore) -> None:
    old = store.create(Kind.ACCESS, CAM, NOW, expires_at=NOW + 7200)
    new = store.rotate(old.record.id, NOW + 1000, "t")
    assert new.record.expires_at == NOW + 7200 and new.record.ttl is None


def test_rotate_with_grace(store: TokenStore) -> None:
    old = store.create(Kind.ACCESS, CAM, NOW)
    store.rotate(old.record.id, NOW, "t", grace=600)
    after = store.get(old.record.id)
    assert after.revoked_at is None and after.expires_at == NOW + 600
    assert after.status(NOW + 599) is Status.ACTIVE and after.status(NOW + 600) is Status.EXPIRED
    with pytest.raises(TokenError, match="already rotated"):
        store.rotate(old.record.id, NOW, "t")


def test_grace_never_extends_a_token(store: TokenStore) -> None:
    old = store.create(Kind.ACCESS, CAM, NOW, expires_at=NOW + 60)
    store.rotate(old.record.id, NOW, "t", grace=3600)
    assert store.get(old.record.id).expires_at == NOW + 60


def test_rotate_at_the_limit_is_allowed_and_inactive_tokens_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_active=1)
    old = store.create(Kind.ACCESS, CAM, NOW)
    new = store.rotate(old.record.id, NOW, "t", grace=60)
    store.revoke(new.record.id, NOW, "t")
    with pytest.raises(TokenError, match="revoked"):
        store.rotate(new.record.id, NOW, "t")
    store.close()


def test_changes_since_follows_every_change(store: TokenStore) -> None:
    _, rev0 = store.load_all()
    a = store.create(Kind.ACCESS, CAM, NOW)
    changed, rev1 = store.changes_since(rev0)
    assert [record(r) for r in changed] == [a.record] and rev1 > rev0
    other = make_store(Path(store.path).parent)  # a second process would look like this
    other.revoke(a.record.id, NOW, "t")
    other.close()
    changed, rev2 = store.changes_since(rev1)
    assert [(record(r).id, record(r).revoked_at) for r in changed] == [(a.record.id, NOW)]
    assert rev2 > rev1
    assert store.changes_since(rev2) == ([], rev2)


def test_schema_is_versioned(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade the agent"):
        connect(tmp_path / "x.db")


def test_a_damaged_database_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"is damaged .* restore it from a backup"):
        connect(tmp_path / "bad.db")


def test_an_unwritable_state_dir_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="state_dir"):
        connect(blocker / "sub" / "agent.db")



def test_a_busy_database_is_a_clear_error(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blocker = sqlite3.connect(db_path(tmp_path), timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    store._conn.execute("PRAGMA busy_timeout = 100")
    with pytest.raises(StoreError, match="busy"):
        store.create(Kind.ACCESS, CAM, NOW)
    blocker.rollback()
    store.create(Kind.ACCESS, CAM, NOW)  # and it works once the lock is gone
    blocker.close()
    store.close()
