"""The access service's token index (agent/access/index.py): same records as the store,
and nothing per token for the garbage collector to walk."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

from agent.access.index import HOT, TokenIndex, compact, record
from agent.access.model import Origin, Protocol, Scope
from agent.access.store import TokenStore
from agent.access.tokens import Kind
from agent.relay.messages import SyncedTokens
from tests.unit.test_store import NOW, make_store

N = 5000


def relay_rows(n: int, revoked_at: float | None = None) -> SyncedTokens:
    """``n`` relay token records as a tokens.sync decodes them (agent/relay/messages.py)."""
    return SyncedTokens([(f"T{i:011d}", "access", hashlib.sha256(f"t{i}".encode()).digest(),
                          "abcd", "camera:cam1", ("webrtc", "rtsp"), None, revoked_at,
                          f"viewer {i}") for i in range(n)])


def synced_index(store: TokenStore) -> TokenIndex:
    """What the daemon's access service holds after a relay sync of N tokens."""
    _, rev = store.load_rows()
    index = TokenIndex()
    store.apply_relay_sync(relay_rows(N), full=True, cursor="c1", now=NOW)
    changed, _ = store.changes_since(rev)
    assert len(changed) == N
    assert index.apply(changed) == []
    return index


def test_a_synced_index_holds_no_object_the_collector_tracks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        gc.collect()
        before = len(gc.get_objects())
        index = synced_index(store)
        gc.collect()  # a full collection: it also stops tracking the dict of rows
        assert len(gc.get_objects()) - before < 100  # was 3 objects per token
        assert not gc.is_tracked(index._rows)
        assert not any(gc.is_tracked(row) for row in index._rows.values())
        # Looked-up records are objects again, but only the last HOT of them are kept.
        assert all(index.get(f"T{i:011d}") is not None for i in range(N))
        assert len(index._hot) <= HOT < N
    finally:
        store.close()


def test_the_index_gives_the_stores_records(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        local = store.create(Kind.ACCESS, Scope.parse("camera:cam2"), NOW, label="door",
                             protocols=frozenset({Protocol.SNAPSHOT}), max_sessions=3)
        admin = store.create(Kind.ADMIN, Scope.parse("account:acme"), NOW, ttl=60)
        index = synced_index(store)
        rows, _ = store.load_rows()
        loaded = TokenIndex(rows)
        assert len(loaded) == N + 2 and set(loaded) == set(index) | {local.record.id,
                                                                      admin.record.id}
        assert loaded[local.record.id] == local.record == store.get(local.record.id)
        assert loaded.get(admin.record.id) == admin.record
        relay = store.get("T00000000007")
        assert index["T00000000007"] == relay and relay.origin is Origin.RELAY
        assert relay.protocols == {Protocol.WEBRTC, Protocol.RTSP}
        assert index.get("T99999999999") is None and "T99999999999" not in index
        # Rows share their few-valued strings (a 100,000-token sync is ~25 MiB less).
        a, b = index._rows["T00000000001"], index._rows["T00000000002"]
        assert all(a[i] is b[i] for i in (1, 2, 5, 12))
    finally:
        store.close()


def test_a_change_replaces_the_record_and_a_revocation_is_kept(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    try:
        index = synced_index(store)
        token_id = "T00000000003"
        assert index[token_id].revoked_at is None  # now also kept built (HOT)
        revoked = compact(next(r for r in store.changes_since(0)[0] if r[0] == token_id))
        revoked = (*revoked[:13], NOW - 5, *revoked[14:])
        assert index.apply([revoked]) == []
        assert index[token_id].revoked_at == NOW - 5  # not the kept record
        unrevoked = (*revoked[:13], None, *revoked[14:])
        later = (*revoked[:13], NOW, *revoked[14:])
        assert index.apply([unrevoked, later]) == [token_id, token_id]
        assert index[token_id].revoked_at == NOW - 5
        earlier = (*revoked[:13], NOW - 9, *revoked[14:])
        assert index.apply([earlier]) == [] and index[token_id].revoked_at == NOW - 9
        assert record(earlier) == index[token_id]
    finally:
        store.close()
