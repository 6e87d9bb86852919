"""A state database made by the previous release (schema 2) upgrades in place: its tokens
still decide the same, its audit chain still verifies (and grows on), its adopted camera
is still there — and the new migrations' promises hold on the upgraded file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.access import audit
from agent.access.model import Action, Protocol, Scope
from agent.access.policy import AccessRequest, Reason, authorize
from agent.access.recorder import AccessRecorder
from agent.access.tokens import Kind
from agent.cli import main
from agent.config import load
from agent.state.db import MIGRATIONS, db_path
from agent.stores import State, open_state

RELEASE = Path(__file__).parents[1] / "data" / "state" / "release-schema-2.sql"
# The tokens the release created in that database (test data, valid nowhere else).
VIEWER = "tra_X8zfE0sk0ADb_aOYCbvhzL9nZR9aUNL1cK2AIoUHh6bVV7lbgkZT7HQE1txTlw"
ADMIN = "trk_lw9iGHABEctd_ABpRJjF1MvdJo4dTXkIqeIQyPAo8WyXXcaIZCsBWF6O3vG4mb"
REVOKED = "tra_0JSHc41Z10rF_rQKj1QR8PBvropY5n4Lqaym5dlKMjicrUapmulY33Nw2Qoq4P"
T0 = 1_790_000_000.0
LATER = T0 + 86400


@pytest.fixture
def released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The release's database in a fresh state directory (not yet opened by this agent)."""
    conn = sqlite3.connect(db_path(tmp_path))
    conn.executescript(RELEASE.read_text())
    conn.close()
    monkeypatch.setenv("THERELAY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("THERELAY_AGENT_ID", "site1")
    monkeypatch.setenv("THERELAY_AGENT_ACCOUNT_ID", "acme")
    return tmp_path


def version(state_dir: Path) -> int:
    conn = sqlite3.connect(db_path(state_dir))
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def opened(state_dir: Path) -> State:
    return open_state(load(None, {"THERELAY_STATE_DIR": str(state_dir),
                                  "THERELAY_AGENT_ID": "site1",
                                  "THERELAY_AGENT_ACCOUNT_ID": "acme"}))


def test_the_fixture_is_the_previous_schema(released: Path) -> None:
    assert version(released) == 2 < len(MIGRATIONS)


def test_tokens_decide_as_before_after_the_upgrade(released: Path) -> None:
    state = opened(released)
    try:
        assert version(released) == len(MIGRATIONS)
        tokens, _ = state.tokens.load_all()
        assert len(tokens) == 3

        def decide(token: str, camera: str | None, action: Action,
                   protocol: Protocol | None) -> Reason:
            req = AccessRequest(token, camera, action, protocol, "192.0.2.50", LATER)
            return authorize(req, tokens, state.tokens.site).reason

        assert decide(VIEWER, "lobby", Action.VIEW, Protocol.WEBRTC) is Reason.GRANTED
        assert decide(VIEWER, "garage", Action.VIEW, Protocol.WEBRTC) is Reason.SCOPE_MISMATCH
        assert decide(ADMIN, None, Action.ADMIN, None) is Reason.GRANTED
        assert decide(REVOKED, "lobby", Action.VIEW, Protocol.SNAPSHOT) is Reason.REVOKED
        viewer = next(r for r in tokens.values() if r.label == "front desk")
        assert viewer.max_sessions is None  # the column migration 3 added: no cap
        # Migration 3's trigger guards the revocation the release made.
        revoked = next(r for r in tokens.values() if r.revoked_at is not None)
        with pytest.raises(sqlite3.IntegrityError, match="revocation is final"):
            state.db.write(lambda c: c.execute(
                "UPDATE tokens SET revoked_at = NULL WHERE id = ?", (revoked.id,)))
    finally:
        state.close()


def test_the_audit_chain_verifies_and_grows_on(released: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify"]) == 0
    assert "10 entries verified" in capsys.readouterr().out
    state = opened(released)
    try:
        tokens, _ = state.tokens.load_all()
        recorder = AccessRecorder(state.tokens.path, max_ips=10)
        for req in (AccessRequest(ADMIN, None, Action.ADMIN, None, "192.0.2.51", LATER),
                    AccessRequest(VIEWER, None, Action.LIST, None, "192.0.2.51", LATER + 1)):
            recorder.record_decision(req, authorize(req, tokens, state.tokens.site))
        recorder.close()
        state.tokens.create(Kind.ACCESS, Scope.parse("camera:garage"), LATER + 2)
        rows = state.db.read(lambda c: audit.query(c, audit.AuditQuery(limit=100)))
    finally:
        state.close()
    # The release's rows and the new ones name a listing and the admin API alike.
    assert [(r["event"], r["protocol"]) for r in rows if r["protocol"] in ("api", "admin")] \
        == [("access.granted", "admin"), ("access.granted", "api")] * 2
    assert main(["audit", "verify"]) == 0
    assert "13 entries verified" in capsys.readouterr().out


def test_the_adopted_camera_survives(released: Path) -> None:
    state = opened(released)
    try:
        (camera,) = state.adopted.all()
        # A camera-scoped token may name it: the CLI's known cameras include adopted ones.
        state.tokens.create(Kind.ACCESS, Scope.parse("camera:garage"), LATER)
    finally:
        state.close()
    assert (camera.id, camera.identity, camera.method, camera.name, camera.username) == (
        "garage", "urn:uuid:0b6e2c1e-garage", "onvif", "Garage", "admin")
    assert camera.source == "rtsp://192.0.2.20:554/stream1"
    assert camera.xaddr == "http://192.0.2.20/onvif/device_service"
    assert camera.adopted_at == T0 + 4
    # Migration 4's columns: nothing proven yet, no move, Basic not allowed after a move.
    assert (camera.serial, camera.moved, camera.allow_basic, camera.pending) == (
        None, False, False, None)
