"""The ``therelay-agent`` command, run in-process through the ``run_cli`` fixture."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import agent
import agent.cli
from agent.access.audit import GENESIS
from agent.access.db import DB_NAME
from agent.access.model import parse_time
from agent.access.policy import FIX, Reason
from agent.access.tokens import ALPHABET, CHECKSUM_LEN, Kind, generate
from agent.cli import tokens as token_cli
from tests.conftest import CliResult, remember

Run = Callable[..., CliResult]

RECORD_FIELDS = {
    "id", "display", "kind", "scope", "protocols", "permission", "status", "created_at",
    "created_by", "expires_at", "label", "origin", "revoked_at", "replaced_by", "replaces",
    "last_used_at", "max_sessions",
}


def create(run_cli: Run, *args: str) -> tuple[str, str]:
    """Create a token with ``--json``; return (id, token text)."""
    result = run_cli("token", "create", *args, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert result.tokens == [data["token"]]
    return str(data["id"]), str(data["token"])


def show(run_cli: Run, token_id: str) -> dict[str, Any]:
    result = run_cli("token", "show", token_id, "--json")
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def check(run_cli: Run, token: str, *args: str) -> CliResult:
    return run_cli("token", "check", token, *args)


def change_one_char(token: str) -> str:
    i = len(token) - CHECKSUM_LEN - 10  # inside the secret part
    replacement = ALPHABET[(ALPHABET.index(token[i]) + 1) % len(ALPHABET)]
    return token[:i] + replacement + token[i + 1:]


def near(text: str | None, expected: float, slack: float = 10.0) -> bool:
    assert text is not None
    return abs(parse_time(text) - expected) <= slack


def two_cameras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(
        "cameras:\n"
        "  - {id: demo, source: 'testsrc://'}\n"
        "  - {id: yard, name: Yard, source: 'rtsp://admin:hunter2@10.0.0.9/live'}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("THERELAY_CONFIG", str(path))


# -- config check -----------------------------------------------------------------------------


def test_config_check(run_cli: Run, state_dir: Path) -> None:
    result = run_cli("config", "check")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "config OK (embedded defaults)"
    assert "  agent_id: site1" in lines
    assert "  account_id: acme" in lines
    assert f"  state_dir: {state_dir}" in lines
    assert "  publisher_token: not configured" in lines
    assert "  cameras:" in lines
    assert lines[-1].split() == ["demo", "Test", "pattern", "testsrc://"]
    assert result.err == ""


def test_config_check_json(run_cli: Run, state_dir: Path) -> None:
    result = run_cli("config", "check", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["ok"] is True
    assert data["config"] == "embedded defaults"
    assert data["agent_id"] == "site1"
    assert data["account_id"] == "acme"
    assert data["state_dir"] == str(state_dir)
    assert data["cameras"] == [{"id": "demo", "name": "Test pattern", "source": "testsrc://"}]
    assert data["tokens_max_active"] == 1000
    assert data["relay_url"] is None
    assert data["publisher_token"] == "not configured"


def test_config_check_uses_therelay_config_and_redacts_passwords(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_cameras(tmp_path, monkeypatch)
    result = run_cli("config", "check", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["config"] == str(tmp_path / "cameras.yaml")
    assert [c["id"] for c in data["cameras"]] == ["demo", "yard"]
    assert data["cameras"][1]["source"] == "rtsp://[redacted]@10.0.0.9/live"
    assert "hunter2" not in result.out


def test_therelay_config_beats_the_default_path(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "etc.yaml"
    default.write_text("tokens: {max_active: 3}\n", encoding="utf-8")
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text("tokens: {max_active: 4}\n", encoding="utf-8")
    monkeypatch.setattr(agent.cli, "DEFAULT_CONFIG_PATH", default)

    result = run_cli("config", "check", "--json")
    assert json.loads(result.out)["config"] == str(default)  # used when nothing else is set
    assert json.loads(result.out)["tokens_max_active"] == 3

    monkeypatch.setenv("THERELAY_CONFIG", str(chosen))
    result = run_cli("config", "check", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["config"] == str(chosen)
    assert json.loads(result.out)["tokens_max_active"] == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("tokens:\n  max_active: [1, 2\n", "at line 3, column 1: ", id="malformed"),
        pytest.param("toknes: {}\n", "toknes: unknown key (did you mean 'tokens'?)",
                     id="unknown-key"),
        pytest.param("- a\n", "expected a mapping of sections at the top", id="list"),
        pytest.param("log: {level: loud}\n", "log.level: 'loud' must be one of", id="invalid"),
        pytest.param("relay: {url: 'wss://r.example'}\n",
                     "relay.publisher_token_file: the relay is configured",
                     id="no-publisher-token"),
    ],
)
def test_config_check_bad_config(run_cli: Run, tmp_path: Path, text: str, expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    result = run_cli("config", "check", "--config", str(bad))
    assert result.code == 2
    assert result.err.startswith("error: ")
    assert expected in result.err
    assert "Traceback" not in result.err
    assert result.out == ""


def test_config_check_missing_file(run_cli: Run, tmp_path: Path) -> None:
    result = run_cli("config", "check", "--config", str(tmp_path / "bad.yaml"))
    assert result.code == 2
    assert result.err == f"error: config file {tmp_path / 'bad.yaml'} does not exist\n"


def test_bad_config_fails_every_command(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERELAY_TOKENS_MAX_ACTIVE", "many")
    result = run_cli("token", "create", "--camera", "demo")
    assert result.code == 2
    assert result.err == "error: tokens.max_active: expected a whole number, got text 'many'\n"
    assert result.tokens == []


def test_version(run_cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("--version")
    assert info.value.code == 0
    assert capsys.readouterr().out == f"therelay-agent {agent.__version__}\n"


# -- token create ---------------------------------------------------------------------------


def test_create_prints_exactly_one_token(run_cli: Run) -> None:
    result = run_cli("token", "create", "--camera", "demo", "--label", "lobby tv")
    assert result.code == 0, result.err
    (token,) = set(result.tokens)
    assert token.startswith("tra_")
    # the token line, and the ready RTSP URL (the token allows every protocol)
    assert result.out.count(token) == 2
    assert f"rtsp://token:{token}@" in result.out and result.out.rstrip().endswith("/demo")
    first = result.out.splitlines()[0]
    assert first.startswith(f"Created access token {token[4:16]}: scope camera:demo, ")
    assert first.endswith("protocols all, expires never.")
    assert "shown this once" in result.out


def test_create_prints_an_rtsp_url_only_when_the_token_allows_rtsp(run_cli: Run) -> None:
    webrtc = run_cli("token", "create", "--camera", "demo", "--protocol", "webrtc")
    assert webrtc.code == 0 and "rtsp://" not in webrtc.out
    host = run_cli("token", "create", "--host", "--protocol", "rtsp")
    (token,) = set(host.tokens)
    assert f"rtsp://token:{token}@" in host.out and host.out.rstrip().endswith("/<camera-id>")


def test_create_json_has_token_and_record(run_cli: Run) -> None:
    result = run_cli("token", "create", "--camera", "demo", "--protocol", "webrtc,hls",
                     "--label", "lobby", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert set(data) == RECORD_FIELDS | {"token"}
    assert result.tokens == [data["token"]]
    assert data["id"] == data["token"][4:16]
    assert data["kind"] == "access"
    assert data["scope"] == "camera:demo"
    assert data["protocols"] == ["hls", "webrtc"]
    assert data["status"] == "active"
    assert data["label"] == "lobby"
    assert data["origin"] == "local"
    assert data["expires_at"] is None
    assert data["created_by"].startswith("cli")
    assert near(data["created_at"], time.time())


def test_list_and_show_never_reveal_the_token(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo")
    for args in (("token", "list"), ("token", "list", "--json"), ("token", "show", token_id),
                 ("token", "show", token_id, "--json")):
        result = run_cli(*args)
        assert result.code == 0, result.err
        assert token_id in result.out
        assert token not in result.out
        assert token[17:] not in result.out  # not even the secret part
        assert "secret_hash" not in result.out
        assert result.tokens == []
    data = show(run_cli, token_id)
    assert set(data) == RECORD_FIELDS
    assert data["display"] == f"tra_{token_id}…{token[-4:]}"


def test_create_unknown_camera(run_cli: Run) -> None:
    result = run_cli("token", "create", "--camera", "nope")
    assert result.code == 1
    assert result.err.startswith("error: camera 'nope' does not exist on this agent")
    assert result.tokens == []
    assert run_cli("token", "list", "--json").out.strip() == "[]"


def test_create_without_scope(run_cli: Run) -> None:
    result = run_cli("token", "create")
    assert result.code == 2  # a usage error
    assert result.err == "error: choose the token's scope: --camera ID, --host or --account\n"
    assert result.tokens == []


def test_create_with_ttl_sets_expiry(run_cli: Run) -> None:
    before = time.time()
    token_id, _ = create(run_cli, "--camera", "demo", "--ttl", "1h")
    data = show(run_cli, token_id)
    assert near(data["expires_at"], before + 3600)
    assert data["status"] == "active"


def test_create_with_expires(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo", "--expires", "2999-12-01T00:00Z")
    assert show(run_cli, token_id)["expires_at"] == "2999-12-01T00:00:00Z"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("--expires", "2000-01-01T00:00Z"),
                     "error: expiry 2000-01-01T00:00:00Z is in the past", id="expires-past"),
        pytest.param(("--expires", "garbage"),
                     "error: --expires: time 'garbage' must be ISO 8601", id="expires-garbage"),
        pytest.param(("--ttl", "5x"),
                     "error: --ttl: duration '5x' must look like 30m, 1h", id="ttl-garbage"),
        pytest.param(("--ttl", "0m"), "error: --ttl: duration '0m'", id="ttl-zero"),
        pytest.param(("--protocol", "ftp"),
                     "error: --protocol: unknown protocol 'ftp'; choose from webrtc, rtsp, hls, "
                     "snapshot", id="protocol"),
    ],
)
def test_create_bad_options(run_cli: Run, args: tuple[str, ...], expected: str) -> None:
    result = run_cli("token", "create", "--camera", "demo", *args)
    # Unparseable values are usage errors (2); a well-formed past expiry is refused (1).
    assert result.code == (1 if "in the past" in expected else 2)
    assert result.err.startswith(expected)
    assert result.tokens == []
    assert run_cli("audit", "--json").out.strip() == "[]"  # nothing was created


def test_create_admin_token(run_cli: Run) -> None:
    result = run_cli("token", "create", "--admin", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["token"].startswith("trk_")
    assert result.tokens == [data["token"]]
    assert data["kind"] == "admin"
    assert data["scope"] == "host:site1"
    assert check(run_cli, data["token"], "--protocol", "admin").code == 0
    denied = check(run_cli, data["token"], "--camera", "demo")
    assert denied.code == 1
    assert denied.out.startswith("denied: wrong_kind")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--camera", "demo"), "error: admin tokens are scoped to the host or the account"),
        (("--protocol", "webrtc"), "error: only access tokens can be restricted to protocols"),
    ],
)
def test_create_admin_refusals(run_cli: Run, args: tuple[str, ...], expected: str) -> None:
    result = run_cli("token", "create", "--admin", *args)
    assert result.code == 1
    assert result.err.startswith(expected)
    assert result.tokens == []


def test_create_account_token(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--account")
    assert show(run_cli, token_id)["scope"] == "account:acme"
    assert check(run_cli, token, "--camera", "demo").code == 0


def test_max_active_limit(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERELAY_TOKENS_MAX_ACTIVE", "2")
    first, _ = create(run_cli, "--camera", "demo")
    create(run_cli, "--host")
    result = run_cli("token", "create", "--camera", "demo")
    assert result.code == 1
    assert result.err.startswith("error: this agent already has 2 active tokens "
                                 "(tokens.max_active)")
    assert result.tokens == []
    assert run_cli("token", "revoke", first).code == 0
    create(run_cli, "--camera", "demo")  # a revoked token frees its place


# -- token check ----------------------------------------------------------------------------


def test_check_granted(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo")
    result = check(run_cli, token, "--camera", "demo", "--protocol", "webrtc")
    assert result.code == 0
    assert result.out == f"granted (token tra_{token_id}…{token[-4:]})\n"
    assert result.tokens == []


def test_check_protocol_not_allowed(run_cli: Run) -> None:
    _, token = create(run_cli, "--camera", "demo", "--protocol", "snapshot")
    assert check(run_cli, token, "--camera", "demo", "--protocol", "snapshot").code == 0
    result = check(run_cli, token, "--camera", "demo", "--protocol", "webrtc")
    assert result.code == 1
    verdict, fix = result.out.splitlines()
    assert verdict.startswith("denied: protocol_not_allowed (token tra_")
    assert fix == f"fix: {FIX[Reason.PROTOCOL_NOT_ALLOWED]}"


def test_check_reads_token_from_stdin(run_cli: Run) -> None:
    _, token = create(run_cli, "--camera", "demo")
    result = run_cli("token", "check", "-", "--camera", "demo", stdin=f"{token}\n")
    assert result.code == 0
    assert result.out.startswith("granted")
    result = run_cli("token", "check", "-", "--camera", "demo", stdin="\n")
    assert result.code == 1
    assert result.out.startswith("denied: missing")


def test_check_corrupted(run_cli: Run) -> None:
    _, token = create(run_cli, "--camera", "demo")
    damaged = change_one_char(token)
    assert damaged != token
    result = check(run_cli, damaged, "--camera", "demo")
    assert result.code == 1
    assert result.out == f"denied: corrupted\nfix: {FIX[Reason.CORRUPTED]}\n"


@pytest.mark.parametrize("garbage", ["hello", "tra_short", "Bearer abc", "x" * 66])
def test_check_malformed(run_cli: Run, garbage: str) -> None:
    result = check(run_cli, garbage, "--camera", "demo")
    assert result.code == 1
    assert result.out == f"denied: malformed\nfix: {FIX[Reason.MALFORMED]}\n"


def test_check_unknown_and_bad_secret(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    stranger = generate(Kind.ACCESS).text
    forged = generate(Kind.ACCESS, token_id).text  # a known id with another secret
    remember(stranger + " " + forged)
    stranger_id = stranger[4:16]
    for args in (("--camera", "demo"), ()):
        result = check(run_cli, stranger, *args)
        assert result.code == 1
        assert result.out == (f"denied: unknown (token id {stranger_id})\n"
                              f"fix: {FIX[Reason.UNKNOWN]}\n")
        result = check(run_cli, forged, *args)
        assert result.code == 1
        assert result.out == (f"denied: bad_secret (token id {token_id})\n"
                              f"fix: {FIX[Reason.BAD_SECRET]}\n")


def test_check_scope_mismatch(run_cli: Run) -> None:
    _, token = create(run_cli, "--camera", "demo")
    result = check(run_cli, token, "--camera", "yard")
    assert result.code == 1
    assert result.out.splitlines()[0].startswith("denied: scope_mismatch")
    assert result.out.splitlines()[1] == f"fix: {FIX[Reason.SCOPE_MISMATCH]}"


def test_check_without_a_camera_says_what_the_token_is(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo", "--protocol", "webrtc,snapshot",
                             "--expires", "2099-01-01T00:00Z", "--max-sessions", "3")
    result = check(run_cli, token)
    assert result.code == 0, result.out
    assert result.out.splitlines() == [
        f"valid (token tra_{token_id}…{token[-4:]})",
        "  kind:      access",
        "  scope:     camera:demo",
        "  protocols: snapshot,webrtc",
        "  expires:   2099-01-01T00:00:00Z",
        "  sessions:  0 live, at most 3",
        "  status:    valid",
    ]
    assert check(run_cli, token, "--protocol", "snapshot").code == 0
    narrow = check(run_cli, token, "--protocol", "rtsp")
    assert narrow.code == 1 and narrow.out.startswith("denied: protocol_not_allowed")
    _, host = create(run_cli, "--host")
    assert "  sessions:  0 live, unlimited" in check(run_cli, host).out
    _, admin = create(run_cli, "--admin")
    result = check(run_cli, admin)
    assert result.code == 0 and "  kind:      admin" in result.out
    assert run_cli("token", "revoke", token_id).code == 0
    result = check(run_cli, token)
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == f"denied: revoked (token tra_{token_id}…{token[-4:]})"
    assert "  status:    revoked" in lines and lines[-1] == f"fix: {FIX[Reason.REVOKED]}"


def test_check_says_session_limit_at_the_cap(run_cli: Run, state_dir: Path) -> None:
    token_id, token = create(run_cli, "--camera", "demo", "--max-sessions", "1")
    assert check(run_cli, token, "--camera", "demo").code == 0
    with sqlite3.connect(state_dir / DB_NAME) as db:  # as the running daemon publishes it
        db.execute("INSERT INTO live_sessions VALUES (?, 1, ?)", (token_id, time.time()))
    result = check(run_cli, token, "--camera", "demo")
    assert result.code == 1
    assert result.out.splitlines() == [f"denied: session_limit (token tra_{token_id}…"
                                       f"{token[-4:]})", f"fix: {FIX[Reason.SESSION_LIMIT]}"]
    assert check(run_cli, token, "--camera", "demo", "--protocol", "snapshot").code == 0
    described = check(run_cli, token)
    assert described.code == 0 and "  sessions:  1 live, at most 1" in described.out
    assert "session_limit" in described.out


def test_host_token_grants_any_configured_camera(
    run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_cameras(tmp_path, monkeypatch)
    _, host_token = create(run_cli, "--host")
    _, camera_token = create(run_cli, "--camera", "yard")
    for camera in ("demo", "yard"):
        assert check(run_cli, host_token, "--camera", camera).code == 0
    assert check(run_cli, camera_token, "--camera", "yard").code == 0
    assert check(run_cli, camera_token, "--camera", "demo").code == 1


def test_check_json(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo", "--protocol", "snapshot")
    result = check(run_cli, token, "--camera", "demo", "--protocol", "rtsp", "--json")
    assert result.code == 1
    assert json.loads(result.out) == {
        "granted": False, "reason": "protocol_not_allowed", "token_id": token_id,
        "camera": "demo", "protocol": "rtsp", "fix": FIX[Reason.PROTOCOL_NOT_ALLOWED],
        "token": {"kind": "access", "scope": "camera:demo", "protocols": ["snapshot"],
                  "expires_at": None, "max_sessions": None, "live_sessions": 0,
                  "status": "valid"},
    }
    result = check(run_cli, token, "--camera", "demo", "--protocol", "snapshot", "--json")
    assert result.code == 0
    data = json.loads(result.out)
    assert (data["granted"], data["reason"], data["fix"]) == (True, "granted",
                                                              FIX[Reason.GRANTED])
    assert token not in result.out


def test_check_expired(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(token_cli, "time", SimpleNamespace(time=lambda: time.time() - 7200))
        token_id, token = create(run_cli, "--camera", "demo", "--ttl", "1h")
    assert show(run_cli, token_id)["status"] == "expired"
    result = check(run_cli, token, "--camera", "demo")
    assert result.code == 1
    assert result.out.startswith("denied: expired")


# -- revoke and rotate ----------------------------------------------------------------------


def test_revoke_then_check(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo")
    result = run_cli("token", "revoke", token_id)
    assert result.code == 0, result.err
    assert result.out.startswith(f"Revoked tra_{token_id}…{token[-4:]} at ")
    checked = check(run_cli, token, "--camera", "demo")
    assert checked.code == 1
    assert checked.out.splitlines() == [
        f"denied: revoked (token tra_{token_id}…{token[-4:]})", f"fix: {FIX[Reason.REVOKED]}",
    ]
    data = show(run_cli, token_id)
    assert data["status"] == "revoked"
    assert near(data["revoked_at"], time.time())


def test_revoke_twice(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", token_id).code == 0
    result = run_cli("token", "revoke", token_id)
    assert result.code == 1
    assert result.err.startswith(f"error: token tra_{token_id}…")
    assert "was already revoked at " in result.err


@pytest.mark.parametrize("command", ["revoke", "rotate", "show"])
def test_unknown_id(run_cli: Run, command: str) -> None:
    result = run_cli("token", command, "AAAAAAAAAAAA")
    assert result.code == 1
    assert result.err == ("error: no token with id 'AAAAAAAAAAAA' "
                          "(see 'therelay-agent token list')\n")


def test_rotate(run_cli: Run) -> None:
    old_id, old = create(run_cli, "--camera", "demo", "--protocol", "webrtc", "--ttl", "1h",
                         "--label", "door")
    result = run_cli("token", "rotate", old_id)
    assert result.code == 0, result.err
    assert result.out.startswith(f"Rotated {old_id}: the old token stopped working.\n")
    (new,) = result.tokens
    assert new != old
    new_id = new[4:16]
    assert check(run_cli, old, "--camera", "demo").out.startswith("denied: revoked")
    assert check(run_cli, new, "--camera", "demo").code == 0
    old_data, new_data = show(run_cli, old_id), show(run_cli, new_id)
    assert old_data["replaced_by"] == new_id
    assert old_data["status"] == "revoked"
    assert new_data["replaces"] == old_id
    assert (new_data["scope"], new_data["protocols"], new_data["label"]) == (
        "camera:demo", ["webrtc"], "door")
    assert near(new_data["expires_at"], time.time() + 3600)


def test_rotate_with_grace(run_cli: Run) -> None:
    old_id, old = create(run_cli, "--camera", "demo")
    result = run_cli("token", "rotate", old_id, "--grace", "10m", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert result.tokens == [data["token"]]
    new_id = data["id"]
    assert check(run_cli, old, "--camera", "demo").code == 0  # still works during the grace
    assert check(run_cli, data["token"], "--camera", "demo").code == 0
    old_data = show(run_cli, old_id)
    assert old_data["replaced_by"] == new_id
    assert old_data["status"] == "active"
    assert old_data["revoked_at"] is None
    assert near(old_data["expires_at"], time.time() + 600)
    again = run_cli("token", "rotate", old_id)
    assert again.code == 1
    assert "is already rotated: only an active token can be rotated" in again.err
    assert again.tokens == []


def test_rotate_revoked_token_refused(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", token_id).code == 0
    result = run_cli("token", "rotate", token_id)
    assert result.code == 1
    assert result.err.startswith(f"error: token tra_{token_id}…")
    assert "is revoked: only an active token can be rotated" in result.err
    assert result.tokens == []


def test_rotate_bad_grace(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    result = run_cli("token", "rotate", token_id, "--grace", "soon")
    assert result.code == 2  # a usage error
    assert result.err.startswith("error: --grace: duration 'soon' must look like")
    assert show(run_cli, token_id)["replaced_by"] is None


# -- token list -----------------------------------------------------------------------------


def test_list_filters(run_cli: Run) -> None:
    assert run_cli("token", "list").out.startswith("No tokens.")
    keep, _ = create(run_cli, "--camera", "demo")
    gone, _ = create(run_cli, "--camera", "demo")
    admin, _ = create(run_cli, "--admin")
    assert run_cli("token", "revoke", gone).code == 0

    def ids(*args: str) -> list[str]:
        result = run_cli("token", "list", "--json", *args)
        assert result.code == 0, result.err
        return [r["id"] for r in json.loads(result.out)]

    assert ids() == [keep, gone, admin]
    assert ids("--status", "revoked") == [gone]
    assert ids("--status", "active") == [keep, admin]
    assert ids("--status", "expired") == []
    assert ids("--kind", "admin") == [admin]
    assert ids("--kind", "access", "--status", "active") == [keep]
    table = run_cli("token", "list", "--status", "revoked").out.splitlines()
    assert table[0].split()[:5] == ["id", "kind", "scope", "protocols", "status"]
    assert len(table) == 2
    assert table[1].split()[:5] == [gone, "access", "camera:demo", "all", "revoked"]


# -- audit ----------------------------------------------------------------------------------


def test_audit_lists_events(run_cli: Run) -> None:
    assert run_cli("audit").out == "The audit log is empty.\n"
    token_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", token_id).code == 0
    result = run_cli("audit")
    assert result.code == 0, result.err
    rows = [line.split() for line in result.out.splitlines()]
    assert rows[0][:4] == ["seq", "time", "event", "token"]
    assert [r[2] for r in rows[1:]] == ["token.created", "token.revoked"]
    assert all(r[3] == token_id for r in rows[1:])
    assert run_cli("audit", "--event", "access.denied").out == "No matching audit entries.\n"


def test_audit_json_for_one_token(run_cli: Run) -> None:
    first, _ = create(run_cli, "--camera", "demo")
    second, _ = create(run_cli, "--host")
    assert run_cli("token", "revoke", first).code == 0
    result = run_cli("audit", "--json", "--token", first)
    assert result.code == 0, result.err
    entries = json.loads(result.out)
    assert [(e["event"], e["token_id"]) for e in entries] == [
        ("token.created", first), ("token.revoked", first)]
    assert entries[0]["detail"] == {"kind": "access", "scope": "camera:demo"}
    assert second not in result.out
    assert [e["token_id"] for e in json.loads(run_cli("audit", "--json").out)] == [
        first, second, first]


def test_audit_export_jsonl_is_a_hash_chain(run_cli: Run) -> None:
    old_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "rotate", old_id).code == 0
    result = run_cli("audit", "--export", "jsonl")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 3  # created, rotated, created (the new one)
    entries = [json.loads(line) for line in lines]
    assert [e["event"] for e in entries] == ["token.created", "token.rotated", "token.created"]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev_hash"] == before["hash"]
    assert all(len(e["hash"]) == 64 for e in entries)
    assert result.tokens == []


def test_audit_verify(run_cli: Run, state_dir: Path) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", token_id).code == 0
    result = run_cli("audit", "verify")
    assert result.code == 0, result.err
    assert result.out.startswith("audit log intact: 2 entries verified; head 2 ")
    data = json.loads(run_cli("audit", "verify", "--json").out)
    assert (data["ok"], data["checked"], data["head_seq"], data["problem"]) == (
        True, 2, 2, None)

    with sqlite3.connect(state_dir / DB_NAME) as conn:
        conn.execute("UPDATE audit SET actor = 'someone-else' WHERE seq = 1")
    conn.close()
    tampered = run_cli("audit", "verify")
    assert tampered.code == 1
    assert tampered.out.startswith("AUDIT LOG TAMPERED: ")


def test_audit_bad_since(run_cli: Run) -> None:
    result = run_cli("audit", "--since", "yesterday-ish")
    assert result.code == 2  # a usage error
    assert result.err.startswith("error: --since: 'yesterday-ish' is neither a time")


# -- stats ----------------------------------------------------------------------------------


def test_stats(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    result = run_cli("stats")
    assert result.code == 0, result.err
    lines = [line.split() for line in result.out.splitlines()]
    assert lines[0] == ["token", "status", "last", "used", "uses", "denied", "ips",
                        "protocols"]
    assert lines[1] == [token_id, "active", "-", "0", "0", "0", "-"]

    detail = run_cli("stats", token_id, "--json")
    assert detail.code == 0, detail.err
    assert json.loads(detail.out) == {
        "token_id": token_id, "last_used_at": None, "uses": 0, "denied": 0, "per_day": [],
        "per_hour": [], "per_protocol": {}, "ips": [],
    }
    missing = run_cli("stats", "AAAAAAAAAAAA")
    assert missing.code == 1
    assert missing.err.startswith("error: no token with id 'AAAAAAAAAAAA'")


def test_stats_unused(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    two_days_ago = time.time() - 2 * 86400
    with monkeypatch.context() as m:
        m.setattr(token_cli, "time", SimpleNamespace(time=lambda: two_days_ago))
        old_id, _ = create(run_cli, "--camera", "demo")
        old_revoked, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", old_revoked).code == 0
    fresh_id, _ = create(run_cli, "--camera", "demo")

    result = run_cli("stats", "--unused", "1d", "--json")
    assert result.code == 0, result.err
    assert [r["id"] for r in json.loads(result.out)] == [old_id]  # not fresh, not revoked
    assert [r["id"] for r in json.loads(run_cli("stats", "--unused", "3d", "--json").out)] == []
    assert run_cli("stats", "--unused", "3d").out == "No tokens match.\n"
    listed = [r["id"] for r in json.loads(run_cli("stats", "--json").out)]
    assert sorted(listed[:2]) == sorted([old_id, old_revoked])  # same instant: ordered by id
    assert listed[2] == fresh_id


def test_stats_bad_unused(run_cli: Run) -> None:
    result = run_cli("stats", "--unused", "lately")
    assert result.code == 2  # a usage error
    assert result.err.startswith("error: --unused: 'lately' is neither a time")


# -- as a separate process ------------------------------------------------------------------


def test_python_m_agent_creates_a_token(run_cli: Run, state_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("THERELAY_") and k != "CREDENTIALS_DIRECTORY"}
    env.update(THERELAY_STATE_DIR=str(state_dir), THERELAY_AGENT_ID="site1",
               THERELAY_AGENT_ACCOUNT_ID="acme")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "token", "create", "--camera", "demo"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    found = remember(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert len(set(found)) == 1  # once alone, once in the RTSP URL
    assert found[0].startswith("tra_")
    assert proc.stdout.startswith(f"Created access token {found[0][4:16]}: scope camera:demo")
    assert "Traceback" not in proc.stderr
    # the in-process CLI shares the state dir and accepts the token
    assert check(run_cli, found[0], "--camera", "demo").code == 0


def test_list_older_than_finds_tokens_due_for_rotation(run_cli: Run, monkeypatch) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100 * 86400)
    old_id, _ = create(run_cli, "--camera", "demo")
    monkeypatch.setattr(time, "time", real)
    new_id, _ = create(run_cli, "--camera", "demo")
    listed = json.loads(run_cli("token", "list", "--older-than", "90d", "--json").out)
    assert [t["id"] for t in listed] == [old_id]
    table = run_cli("token", "list").out
    assert "created_at" in table.splitlines()[0] and new_id in table
    assert run_cli("token", "list", "--older-than", "soon").code == 2


# -- update ---------------------------------------------------------------------------------


def updated_entries(run_cli: Run, token_id: str) -> list[dict[str, Any]]:
    result = run_cli("audit", "--json", "--token", token_id, "--event", "token.updated")
    assert result.code == 0, result.err
    entries: list[dict[str, Any]] = json.loads(result.out)
    return entries


def test_update_changes_label_expiry_protocols_and_cap(run_cli: Run) -> None:
    token_id, token = create(run_cli, "--camera", "demo", "--protocol", "webrtc",
                             "--label", "door", "--max-sessions", "2")
    assert show(run_cli, token_id)["max_sessions"] == 2
    result = run_cli("token", "update", token_id, "--label", "door (night)", "--ttl", "2h",
                     "--protocol", "webrtc,snapshot", "--max-sessions", "1")
    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == f"Updated tra_{token_id}…{token[-4:]}:"
    assert "  label: 'door' -> 'door (night)'" in result.out
    assert "  expires_at: never -> 20" in result.out
    assert "  protocols: webrtc -> snapshot,webrtc" in result.out
    assert "  max_sessions: 2 -> 1" in result.out
    data = show(run_cli, token_id)
    assert (data["label"], data["protocols"], data["max_sessions"], data["scope"]) == (
        "door (night)", ["snapshot", "webrtc"], 1, "camera:demo")
    assert near(data["expires_at"], time.time() + 7200)
    assert check(run_cli, token, "--camera", "demo", "--protocol", "snapshot").code == 0
    (entry,) = updated_entries(run_cli, token_id)
    assert entry["detail"]["before"]["label"] == "door"
    assert entry["detail"]["after"]["max_sessions"] == 1
    assert entry["actor"].startswith("cli")
    # Lifting: no expiry, every protocol, no cap.
    result = run_cli("token", "update", token_id, "--no-expiry", "--protocol", "all",
                     "--max-sessions", "unlimited", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert (data["expires_at"], data["protocols"], data["max_sessions"]) == (None, ["all"],
                                                                             None)
    same = run_cli("token", "update", token_id, "--no-expiry")
    assert same.code == 0 and "nothing changed" in same.out
    assert len(updated_entries(run_cli, token_id)) == 2


@pytest.mark.parametrize(("args", "expected"), [
    ((), "nothing to change"),
    (("--expires", "2001-01-01T00:00Z"), "in the past"),
    (("--expires", "9999-06-01T00:00Z"), "before the year 9999"),
    (("--ttl", "soon"), "--ttl"),
    (("--protocol", "webrtc,ftp"), "unknown protocol 'ftp'"),
    (("--max-sessions", "0"), "from 1 to 10000"),
    (("--max-sessions", "-1"), "from 1 to 10000"),
    (("--max-sessions", "1000000000000"), "from 1 to 10000"),
    (("--max-sessions", "lots"), "whole number"),
    (("--camera", "yard"), "scope cannot be changed"),
    (("--host",), "rotate"),
    (("--label", "x" * 201), "at most 200"),
])
def test_update_refuses_bad_input_and_changes_nothing(
        run_cli: Run, args: tuple[str, ...], expected: str) -> None:
    token_id, _ = create(run_cli, "--camera", "demo", "--label", "kept")
    before = show(run_cli, token_id)
    result = run_cli("token", "update", token_id, *args)
    assert result.code == 2, result.out
    assert result.err.startswith("error: ") and expected in result.err
    assert len(result.err.splitlines()) == 1
    assert show(run_cli, token_id) == before
    assert updated_entries(run_cli, token_id) == []


def test_update_refuses_revoked_unknown_and_both_expiries(run_cli: Run) -> None:
    token_id, _ = create(run_cli, "--camera", "demo")
    assert run_cli("token", "revoke", token_id).code == 0
    result = run_cli("token", "update", token_id, "--no-expiry")
    assert result.code == 2 and "revocation is final" in result.err
    result = run_cli("token", "update", "AAAAAAAAAAAA", "--label", "x")
    assert result.code == 2 and "no token with id 'AAAAAAAAAAAA'" in result.err
    with pytest.raises(SystemExit) as info:  # argparse: not allowed together
        run_cli("token", "update", token_id, "--ttl", "1h", "--no-expiry")
    assert info.value.code == 2
    assert updated_entries(run_cli, token_id) == []
