"""The relay messages without I/O (agent/relay/messages.py): exact text in, events out."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from agent.access.model import Origin, Scope
from agent.access.policy import AccessRequest, Reason, Site, authorize
from agent.access.store import TokenStore
from agent.access.tokens import Kind, generate
from agent.relay import messages
from agent.relay.messages import (
    Acked,
    ProtocolError,
    Publish,
    TokensRevoke,
    TokensSync,
    Unsupported,
    Welcome,
)
from tests.conftest import remember

NOW = 1_800_000_000.0
H = "ab" * 32


def msg(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, "id": "m1", "ts": NOW, **fields})


def test_welcome() -> None:
    event = messages.parse(msg("welcome", account_id="acme", agent_id="nvr1",
                               permission="read", token_scope="agent", ice_servers=[],
                               server_time=NOW, heartbeat_s=15))
    assert event == Welcome("acme", "nvr1", "read", "agent", [], NOW, 15.0)


def test_tokens_sync_and_revoke_and_publish() -> None:
    sync = messages.parse(msg("tokens.sync", full=True, cursor="c-9", tokens=[{
        "id": "Ab3dE5gH7jK9", "kind": "access", "sha256": H, "last4": "99S2",
        "scope": "camera:door", "protocols": ["webrtc"], "expires_at": NOW + 60,
        "revoked_at": None, "label": "guard", "future_field": 1}]))
    assert isinstance(sync, TokensSync) and sync.full and sync.cursor == "c-9"
    (token,) = sync.tokens
    assert (token.id, token.sha256, token.protocols, token.expires_at) == (
        "Ab3dE5gH7jK9", bytes.fromhex(H), ("webrtc",), NOW + 60)
    assert "tokens.sync" in messages.ACKED_TYPES
    revoke = messages.parse(msg("tokens.revoke", token_id="Ab3dE5gH7jK9", revoked_at=NOW))
    assert revoke == TokensRevoke("m1", "Ab3dE5gH7jK9", NOW)
    publish = messages.parse(msg("publish", session_id="s1", camera_id="door",
                                 whip_url="https://w/s1"))
    assert publish == Publish("m1", "s1", "door", "https://w/s1", None)
    assert messages.parse(msg("brand.new")) == Unsupported("m1", "brand.new")
    assert messages.parse(msg("ack", ack="x", ok=False, error={"code": "c"})) == Acked(
        "x", False, {"code": "c"}, {})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        (json.dumps({"id": "x"}), "'type'"),
        (json.dumps({"type": "welcome"}), "'id'"),
        (msg("welcome", account_id="a", agent_id="b", permission="admin", server_time=1),
         "'permission' must be publish or read"),
        (msg("tokens.sync", cursor="c", tokens={}), "'tokens' must be a list"),
        (msg("tokens.sync", cursor="c", tokens=[{"id": "x", "kind": "access", "sha256": "zz",
                                                 "last4": "1", "scope": "host:a"}]),
         "sha256' must be 64"),
        (msg("tokens.revoke"), "'token_id'"),
    ],
)
def test_broken_fields_are_invalid_events(text: str, problem: str) -> None:
    if problem in ("not valid JSON", "JSON object", "'type'", "'id'"):
        with pytest.raises(ProtocolError, match=problem):
            messages.parse(text)
    else:
        event = messages.parse(text)
        assert isinstance(event, messages.Invalid) and problem in event.problem


def test_outgoing_messages() -> None:
    hello = messages.hello("nvr1", "1.0", "c-3", [{"id": "door"}])
    assert hello["type"] == "hello" and hello["token_cursor"] == "c-3"
    assert {"whip", "usage.v1", "tokens.sync.v1"} <= set(hello["capabilities"])
    refused = messages.ack("m1", error=("unsupported", "no"))
    assert (refused["ack"], refused["ok"], refused["error"]["code"]) == ("m1", False,
                                                                         "unsupported")
    assert messages.ack("m2", cursor="c")["cursor"] == "c"


def test_relay_tokens_are_stored_by_hash_and_enforced(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "agent.db", Site("nvr1", "acme"), 1, lambda: {"door"})
    store.create(Kind.ACCESS, Scope.parse("host:nvr1"), NOW)  # the one local token allowed
    issued = generate(Kind.ACCESS)
    remember(issued.text)
    token = messages.parse(msg("tokens.sync", full=False, cursor="c-1", tokens=[{
        "id": issued.public_id, "kind": "access",
        "sha256": hashlib.sha256(issued.text.encode()).hexdigest(), "last4": issued.text[-4:],
        "scope": "camera:door", "protocols": [], "expires_at": None, "revoked_at": None}]))
    assert isinstance(token, TokensSync)
    assert store.apply_relay_sync(token.tokens, full=False, cursor="c-1", now=NOW).changed == 1
    assert store.apply_relay_sync(token.tokens, full=False, cursor="c-1", now=NOW).changed == 0
    assert store.relay_cursor() == "c-1"
    record = store.get(issued.public_id)
    assert record.origin is Origin.RELAY and record.created_by == "relay"
    assert issued.text.encode() not in (tmp_path / "agent.db").read_bytes()

    def decide(at: float) -> Reason:
        return authorize(AccessRequest(issued.text, "door", "webrtc", "10.0.0.2", at),
                         store.load_all()[0], store.site).reason

    assert decide(NOW) is Reason.GRANTED  # relay tokens do not count against max_active
    assert store.revoke_relay(issued.public_id, NOW + 5, NOW + 5)
    assert decide(NOW + 6) is Reason.REVOKED
    assert not store.revoke_relay("Zz0000000000", NOW, NOW)  # unknown: nothing to do
    # A full sync revokes relay tokens it does not list, and never touches local ones.
    clash = token.tokens[0]._replace(id="Xx0000000000")  # same hash, another id: refused
    other = token.tokens[0]._replace(id="Yy0000000000", sha256=bytes(32))
    result = store.apply_relay_sync([clash, other], full=False, cursor="c-2", now=NOW + 7)
    assert result.changed == 1
    assert [(r.token_id, r.code) for r in result.refused] == [("Xx0000000000", "hash_in_use")]
    assert store.apply_relay_sync([], full=True, cursor="c-3", now=NOW + 8).changed == 1
    assert store.get("Yy0000000000").revoked_at == NOW + 8
    assert all(r.status(NOW + 9).value == "active" for r in store.list_tokens(NOW + 9)
               if r.origin is Origin.LOCAL)
    store.close()


def test_a_sync_never_undoes_a_revocation_nor_changes_a_hash(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "agent.db", Site("nvr1", "acme"), 5, lambda: {"door"})
    issued, forged = generate(Kind.ACCESS), generate(Kind.ACCESS)
    remember(f"{issued.text} {forged.text}")
    record = messages.SyncedToken(
        id=issued.public_id, kind="access", sha256=hashlib.sha256(issued.text.encode()).digest(),
        last4=issued.text[-4:], scope="camera:door", protocols=(), expires_at=None,
        revoked_at=None, label="")
    assert store.apply_relay_sync([record], full=False, cursor="c-1", now=NOW).refused == []
    assert store.revoke_relay(issued.public_id, NOW + 1, NOW + 1)
    # Listed as active again (twice: a full sync repeats it), and with another hash.
    again = store.apply_relay_sync([record], full=True, cursor="c-2", now=NOW + 2)
    repeat = store.apply_relay_sync([record], full=True, cursor="c-3", now=NOW + 3)
    rehashed = record._replace(revoked_at=NOW + 1,
                       sha256=hashlib.sha256(forged.text.encode()).digest())
    moved = store.apply_relay_sync([rehashed], full=False, cursor="c-4", now=NOW + 4)
    assert [(r.code, r.new) for r in again.refused] == [("revocation_final", True)]
    assert [(r.code, r.new) for r in repeat.refused] == [("revocation_final", False)]
    assert [r.code for r in moved.refused] == ["hash_changed"]
    assert again.changed == repeat.changed == moved.changed == 0
    kept = store.get(issued.public_id)
    assert kept.revoked_at == NOW + 1 and kept.secret_hash == record.sha256
    assert store.relay_cursor() == "c-4"  # the rest of each sync was applied
    tokens = store.load_all()[0]
    for text in (issued.text, forged.text):
        decision = authorize(AccessRequest(text, "door", "webrtc", None, NOW + 5), tokens,
                             store.site)
        assert not decision.granted
    audited = store.read(lambda c: c.execute(
        "SELECT reason FROM audit WHERE event = 'token.sync_refused' ORDER BY seq").fetchall())
    assert [r[0] for r in audited] == ["revocation_final", "hash_changed"]  # once each
    # A revocation may move earlier, never later.
    earlier = record._replace(revoked_at=NOW)
    assert store.apply_relay_sync([earlier], full=False, cursor="c-5", now=NOW + 6).changed == 1
    assert store.get(issued.public_id).revoked_at == NOW
    later = record._replace(revoked_at=NOW + 100)
    store.apply_relay_sync([later], full=False, cursor="c-6", now=NOW + 7)
    assert store.get(issued.public_id).revoked_at == NOW
    store.close()


def test_the_database_itself_refuses_an_unrevoke_or_a_new_hash(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "agent.db", Site("nvr1", "acme"), 5, lambda: {"door"})
    new = store.create(Kind.ACCESS, Scope.parse("host:nvr1"), NOW)
    remember(new.token)
    store.revoke(new.record.id, NOW + 1, "test")
    for statement in ("UPDATE tokens SET revoked_at = NULL",
                      "UPDATE tokens SET revoked_at = revoked_at + 10",
                      "UPDATE tokens SET secret_hash = zeroblob(32)"):
        def run(conn: sqlite3.Connection, sql: str = statement) -> None:
            conn.execute(sql)

        with pytest.raises(sqlite3.IntegrityError):
            store.write(run)
    kept = store.get(new.record.id)
    assert kept.revoked_at == NOW + 1 and kept.secret_hash == new.record.secret_hash
    store.close()
