"""``therelay-agent doctor`` against real peers: GStreamer RTSP cameras, a Digest camera on a
real socket, a fake TheRelay cloud, a running daemon, damaged state, a namespace whose DNS
answers nothing. Only loopback and namespaces the tests create are used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.doctor import Report, Status, diagnose
from tests.conftest import remember, write_secret
from tests.support.agent import AgentProcess
from tests.support.camera import RtspCamera, needs_rtsp_server, rtsp_camera_factory_fixture
from tests.support.fake_relay import FakeRelay
from tests.support.netns import NetnsPair, free_port, netns_pair

__all__ = ["netns_pair", "rtsp_camera_factory_fixture"]
Factory = Callable[..., RtspCamera]
SMALL = {"width": 160, "height": 120, "fps": 10}
TESTSRC = "testsrc://?size=160x120&fps=5"


def write_config(tmp: Path, cameras: list[dict[str, Any]], **sections: Any) -> Path:
    config = {"agent": {"id": "site1", "account_id": "acme"}, "state_dir": str(tmp / "state"),
              "http": {"listen": f"127.0.0.1:{free_port()}"},
              "webrtc": {"host_addresses": ["127.0.0.1"]}, "cameras": cameras, **sections}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def by_check(report: Report) -> dict[tuple[str, str], tuple[Status, str, str | None]]:
    return {(r.group, r.name): (r.status, r.finding, r.fix) for r in report.results}


def doctor_cli(config: Path, *args: str, prefix: list[str] | None = None,
               timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    """The real command in a subprocess; (exit status, its JSON, stderr)."""
    done = subprocess.run([*(prefix or []), sys.executable, "-m", "agent", "doctor", "--config",
                           str(config), "--json", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=Path(__file__).parents[2])
    remember(done.stdout)
    data: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, data, done.stderr


def statuses(data: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(c["group"], c["check"]): c["status"] for c in data["checks"]}


# -- cameras ----------------------------------------------------------------------------------


@needs_rtsp_server
async def test_cameras_with_right_wrong_and_missing_credentials(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, user="viewer",
                                     password="right-horse-9", **SMALL)
    creds = tmp_path / "creds"
    creds.mkdir()
    write_secret(creds / "good", "right-horse-9\n")
    write_secret(creds / "bad", "wrong-horse-1\n")
    config = write_config(tmp_path, [
        {"id": "good", "source": camera.url, "username": "viewer",
         "password_file": str(creds / "good")},
        {"id": "bad", "source": camera.url, "username": "viewer",
         "password_file": str(creds / "bad")},
        {"id": "none", "source": camera.url},
        {"id": "inline", "source": camera.url_with_credentials("viewer", "right-horse-9")},
    ])
    report = await diagnose(config, timeout=5)
    got = by_check(report)
    assert got[("camera good", "dns")][0] is Status.OK
    assert got[("camera good", "tcp")][0] is Status.OK
    assert got[("camera good", "rtsp")][:2] == (
        Status.OK, "DESCRIBE answered 200; credentials accepted (Basic)")
    assert got[("camera good", "codec")][0] is Status.OK
    codec = got[("camera good", "codec")][1]
    assert "H.264" in codec and "WebRTC (all browsers)" in codec
    status, finding, fix = got[("camera bad", "rtsp")]
    assert status is Status.FAIL and "refused the credentials (401)" in finding
    assert fix is not None and "password_file" in fix
    assert got[("camera bad", "codec")][0] is Status.SKIP
    status, finding, fix = got[("camera none", "rtsp")]
    assert status is Status.FAIL and "needs credentials (basic)" in finding
    assert fix is not None and "username and password_file" in fix
    assert got[("camera inline", "rtsp")][0] is Status.OK
    # Nothing listens on loopback port 80: no ONVIF, which is information, not a problem.
    assert got[("camera good", "onvif")][0] is Status.INFO
    assert report.failed
    rendered = json.dumps([r.as_dict() for r in report.results])
    assert "right-horse-9" not in rendered and "wrong-horse-1" not in rendered


def test_connection_refused_through_the_command(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there now
    config = write_config(tmp_path, [{"id": "door", "source": f"rtsp://127.0.0.1:{port}/s"},
                                     {"id": "demo", "source": TESTSRC}])
    code, data, err = doctor_cli(config)
    assert code == 1, err
    got = statuses(data)
    assert got[("camera door", "tcp")] == "fail"
    assert got[("camera door", "rtsp")] == got[("camera door", "codec")] == "skip"
    finding = next(c for c in data["checks"] if c["check"] == "tcp")
    assert "connection refused" in finding["finding"] and "554" in finding["fix"]
    assert got[("camera demo", "encoder")] == "ok"
    assert data["ok"] is False and data["exit_status"] == 1
    assert " took " not in err  # the command's own loop (asyncio debug) was never blocked


async def serve_digest_camera(user: str, password: str, sdp: str) -> tuple[asyncio.Server, int]:
    """A camera that wants Digest (RFC 2069 form) and hangs up after each 401, as some do."""
    realm, nonce = "IP Camera(C6372)", "4f2e8a9d1c0b"

    def expected(uri: str) -> str:
        ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"DESCRIBE:{uri}".encode()).hexdigest()
        return hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method, uri, _ = head.split("\r\n")[0].split(" ")
                cseq = re.search(r"CSeq: (\d+)", head)
                assert cseq is not None
                answer = f"CSeq: {cseq.group(1)}\r\n"
                if method == "OPTIONS":
                    writer.write(f"RTSP/1.0 200 OK\r\n{answer}Public: OPTIONS, DESCRIBE, "
                                 "SETUP, PLAY, TEARDOWN\r\n\r\n".encode())
                    continue
                auth = re.search(r'response="([0-9a-f]+)"', head)
                if method == "DESCRIBE" and auth and auth.group(1) == expected(uri):
                    body = sdp.encode()
                    writer.write(f"RTSP/1.0 200 OK\r\n{answer}Content-Type: application/sdp\r\n"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    continue
                writer.write(f'RTSP/1.0 401 Unauthorized\r\n{answer}WWW-Authenticate: Digest '
                             f'realm="{realm}", nonce="{nonce}", stale="FALSE"\r\n\r\n'.encode())
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_digest_camera_sending_h265_is_a_warning(tmp_path: Path) -> None:
    sdp = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=Media Presentation\r\nt=0 0\r\n"
           "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H265/90000\r\na=control:trackID=1\r\n")
    server, port = await serve_digest_camera("admin", "d1gest-Pass", sdp)
    creds = tmp_path / "creds"
    creds.mkdir()
    write_secret(creds / "cam", "d1gest-Pass")
    write_secret(creds / "wrong", "nope")
    async with server:
        config = write_config(tmp_path, [
            {"id": "hevc", "source": f"rtsp://127.0.0.1:{port}/Streaming/Channels/101",
             "username": "admin", "password_file": str(creds / "cam")},
            {"id": "wrong", "source": f"rtsp://127.0.0.1:{port}/Streaming/Channels/101",
             "username": "admin", "password_file": str(creds / "wrong")}])
        report = await diagnose(config, timeout=5)
    got = by_check(report)
    assert got[("camera hevc", "rtsp")][:2] == (
        Status.OK, "DESCRIBE answered 200; credentials accepted (Digest)")
    status, finding, fix = got[("camera hevc", "codec")]
    assert status is Status.WARN and "H.265" in finding and "501" in finding
    assert fix is not None and "H.264" in fix
    assert got[("camera wrong", "rtsp")][0] is Status.FAIL
    assert "refused the credentials" in got[("camera wrong", "rtsp")][1]


def test_a_name_that_does_not_resolve_inside_a_namespace(
        tmp_path: Path, netns_pair: NetnsPair) -> None:
    # The pair's resolv.conf names only the namespace's own loopback, where nothing answers:
    # the lookup fails at once and never leaves the namespace.
    config = write_config(tmp_path, [
        {"id": "door", "source": "rtsp://door-camera.example.test:554/Streaming/Channels/102"}])
    code, data, err = doctor_cli(config, prefix=netns_pair.command("agent", []))
    assert code == 1, err
    got = statuses(data)
    assert got[("camera door", "dns")] == "fail"
    assert got[("camera door", "tcp")] == "skip"
    dns = next(c for c in data["checks"] if c["check"] == "dns")
    assert "door-camera.example.test does not resolve" in dns["finding"]
    assert "IP address" in dns["fix"]


# -- state ------------------------------------------------------------------------------------


def test_corrupted_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"id": "demo", "source": TESTSRC}])
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent.db").write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 4000)
    code, data, err = doctor_cli(config)
    assert code == 1, err
    got = statuses(data)
    assert got[("agent", "database")] == "fail"
    assert got[("agent", "audit")] == "skip"
    db = next(c for c in data["checks"] if c["check"] == "database")
    assert "damaged" in db["finding"] and "backup" in db["fix"]


def test_broken_audit_chain_and_intact_one(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"id": "demo", "source": TESTSRC}])
    for _ in range(3):
        made = subprocess.run([sys.executable, "-m", "agent", "token", "create", "--camera",
                               "demo", "--config", str(config)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert made.returncode == 0, made.stderr
        remember(made.stdout)
    code, data, _ = doctor_cli(config)
    assert code == 0 and statuses(data)[("agent", "audit")] == "ok"
    assert statuses(data)[("agent", "database")] == "ok"
    with sqlite3.connect(tmp_path / "state" / "agent.db") as conn:
        conn.execute("UPDATE audit SET camera = 'elsewhere' WHERE seq = 2")
    code, data, _ = doctor_cli(config)
    assert code == 1
    assert statuses(data)[("agent", "database")] == "ok"
    audit = next(c for c in data["checks"] if c["check"] == "audit")
    assert audit["status"] == "fail"
    assert "entry 2 was modified after it was written" in audit["finding"]
    assert "audit --export jsonl" in audit["fix"]


async def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"id": "demo", "source": TESTSRC}])
    (tmp_path / "state").write_text("not a directory")
    got = by_check(await diagnose(config, timeout=5))
    assert got[("agent", "state_dir")][0] is Status.FAIL
    assert "not a directory" in got[("agent", "state_dir")][1]


def test_state_dir_on_a_read_only_mount(tmp_path: Path) -> None:
    """Root ignores permission bits, so make the directory read-only the way an SD card or
    a read-only root file system is: a read-only bind mount, in a private mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    config = write_config(tmp_path, [{"id": "demo", "source": TESTSRC}])
    state = tmp_path / "state"
    state.mkdir()
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("mount namespaces unavailable here")
    script = (f"mount --bind {state} {state} && mount -o remount,bind,ro {state} && exec "
              f"{sys.executable} -m agent doctor --json --config {config}")
    done = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    check = next(c for c in data["checks"] if c["check"] == "state_dir")
    assert check["status"] == "fail" and "Read-only file system" in check["finding"]


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("tokens:\n  max_activ: 5\n")
    code, data, _ = doctor_cli(config)
    assert code == 2
    (check,) = data["checks"]
    assert check["status"] == "fail" and "did you mean 'max_active'" in check["finding"]


# -- relay ------------------------------------------------------------------------------------


def relay_config(tmp: Path, relay: FakeRelay, token: str, url: str | None = None) -> Path:
    creds = tmp / "creds"
    creds.mkdir(exist_ok=True)
    write_secret(creds / "publisher-token", token + "\n")
    return write_config(tmp, [{"id": "demo", "source": TESTSRC}],
                        relay={"url": url or relay.url,
                               "publisher_token_file": str(creds / "publisher-token")})


async def test_relay_accepts_the_token_with_the_real_protocol(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        token = relay.issue_publisher(agent_id="site1")
        report = await diagnose(relay_config(tmp_path, relay, token), timeout=5)
        got = by_check(report)
        status, finding, _ = got[("relay", "token")]
        assert status is Status.OK
        assert "account acme, agent site1, permission publish (agent token)" in finding
        assert got[("relay", "clock")][0] is Status.OK
        hello = await relay.wait_for("hello")
        assert [c["id"] for c in hello["cameras"]] == ["demo"]
        assert hello["cameras"][0]["state"] == "idle"
        await relay.wait_closed()
        assert relay.closed[0].code == 1000
    assert relay.violations == []
    assert not report.failed
    assert token not in json.dumps([r.as_dict() for r in report.results])


@pytest.mark.parametrize(("kind", "reason", "advice"), [
    ("revoked", "token_revoked", "was revoked"),
    ("expired", "token_expired", "has expired"),
    ("unknown", "token_invalid", "copy it again"),
    ("other_agent", "agent_not_allowed", "set agent.id"),
])
async def test_relay_refuses_the_token(tmp_path: Path, kind: str, reason: str,
                                       advice: str) -> None:
    async with FakeRelay() as relay:
        if kind == "unknown":
            token = FakeRelay().issue_publisher()  # well-formed, but this relay never saw it
        else:
            token = relay.issue_publisher(agent_id="nvr9" if kind == "other_agent" else "site1",
                                          revoked=kind == "revoked", expired=kind == "expired")
        got = by_check(await diagnose(relay_config(tmp_path, relay, token), timeout=5))
    status, finding, fix = got[("relay", "token")]
    assert status is Status.FAIL and reason in finding
    assert fix is not None and advice in fix
    assert got[("relay", "clock")][0] is Status.SKIP
    assert relay.violations == []


async def test_relay_with_a_skewed_clock_and_a_read_only_token(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        relay.clock_offset = -95.0  # the relay is 95 s behind: this machine is ahead
        token = relay.issue_publisher(permission="read")
        got = by_check(await diagnose(relay_config(tmp_path, relay, token), timeout=5))
    status, finding, fix = got[("relay", "clock")]
    assert status is Status.WARN and "95 s ahead of the relay's" in finding
    assert fix is not None and "timedatectl set-ntp true" in fix
    assert got[("relay", "token")][0] is Status.WARN
    assert "read-only" in got[("relay", "token")][1]


async def test_relay_down(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        token = relay.issue_publisher()
    url = f"ws://127.0.0.1:{free_port()}/agent"
    got = by_check(await diagnose(relay_config(tmp_path, relay, token, url), timeout=5))
    status, finding, fix = got[("relay", "token")]
    assert status is Status.FAIL and "connection refused" in finding and url in finding
    assert fix is not None and "relay.url" in fix


async def test_relay_overloaded(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        relay.fail_upgrades(503, "unavailable")
        token = relay.issue_publisher()
        got = by_check(await diagnose(relay_config(tmp_path, relay, token), timeout=5))
    status, finding, _ = got[("relay", "token")]
    assert status is Status.FAIL and "HTTP 503" in finding


# -- next to a running daemon ---------------------------------------------------------------


async def test_next_to_a_running_daemon_nothing_is_disturbed(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        token = relay.issue_publisher(agent_id="site1")
        secret = tmp_path / "publisher-token.secret"
        write_secret(secret, token + "\n")
        daemon = await AgentProcess.start(
            tmp_path, [{"id": "demo", "source": TESTSRC}],
            relay={"url": relay.url, "publisher_token_file": str(secret)})
        try:
            await relay.wait_agent(timeout=20)
            # The daemon's own config, with the state_dir its environment gave it.
            data = yaml.safe_load(daemon.config_path.read_text())
            data["state_dir"] = str(tmp_path / "state")
            config = tmp_path / "doctor.yaml"
            config.write_text(yaml.safe_dump(data))
            report = await diagnose(config, timeout=5)
            got = by_check(report)
            status, finding, _ = got[("agent", "http")]
            assert status is Status.INFO and "the agent is running" in finding
            assert "relay connected" in finding
            status, finding, _ = got[("relay", "token")]
            assert status is Status.OK and "not saying hello" in finding
            assert got[("relay", "clock")][0] is Status.OK  # from the upgrade's Date header
            assert got[("agent", "database")][0] is Status.OK
            assert got[("agent", "audit")][0] is Status.OK
            # The daemon's link was not replaced (no 4008) and is still the one welcomed.
            assert all(c.code != 4008 for c in relay.closed)
            assert relay.open_connections == 1
            assert len([m for m in relay.received if m["type"] == "hello"]) == 1
        finally:
            assert await daemon.stop() == 0
    assert relay.violations == []


async def test_port_taken_by_another_program(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        config = write_config(tmp_path, [{"id": "demo", "source": TESTSRC}],
                              http={"listen": f"127.0.0.1:{port}"})
        got = by_check(await diagnose(config, timeout=5))
    status, finding, fix = got[("agent", "http")]
    assert status is Status.FAIL and "another program already listens" in finding
    assert fix is not None and "http.listen" in fix


# -- secret files ---------------------------------------------------------------------------


async def test_secret_files_others_may_read_are_refused_everywhere(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    token = write_secret(creds / "publisher-token", FakeRelay().issue_publisher() + "\n")
    password = write_secret(creds / "door", "right-horse-9\n")
    config = write_config(tmp_path, [
        {"id": "door", "source": "rtsp://127.0.0.1:9/live", "username": "viewer",
         "password_file": str(password)}],
        relay={"url": "ws://127.0.0.1:9/agent", "publisher_token_file": str(token)})
    token.chmod(0o644)
    password.chmod(0o640)
    got = by_check(await diagnose(config, timeout=2))
    for (group, name), path in ((("relay", "token"), token), (("camera door", "source"),
                                                               password)):
        status, finding, fix = got[(group, name)]
        assert status is Status.FAIL and "can be read or changed by other users" in finding
        assert fix == f"chmod 600 {path}"
    env = {**os.environ, "THERELAY_STATE_DIR": str(tmp_path / "state")}
    for command in (["config", "check"], ["run"]):
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *command, "--config", str(config), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(done.communicate(), 60)
        assert done.returncode == 2, (command, out, err)
        line = err.decode().strip()
        assert line.startswith("error: secret file ") and "chmod 600 " in line, line
        assert len(line.splitlines()) == 1  # one line, no traceback
    token.chmod(0o600)
    password.chmod(0o600)
    got = by_check(await diagnose(config, timeout=2))
    assert not [finding for _, finding, _ in got.values() if "other users" in finding]
    assert ("camera door", "source") not in got  # it went on to resolve and connect
