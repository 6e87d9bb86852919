"""The agent's RTSP server against real clients (FFmpeg, GStreamer), all on loopback.

The camera is the GStreamer RTSP server (tests/support/rtsp_camera.py); the agent pulls it
once and serves it at rtsp://127.0.0.1:<port>/<camera-id> with access tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.agent import AgentProcess, wait_until
from tests.support.camera import RtspCamera, needs_rtsp_server

pytestmark = needs_rtsp_server

W, H = 320, 240
SESSION_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def cameras() -> Iterator[dict[str, RtspCamera]]:
    cams = {"cam": RtspCamera.start(width=W, height=H, fps=15, gop=15, bitrate=300,
                                    audio="pcmu"),
            "hevc": RtspCamera.start(width=W, height=H, fps=15, gop=15, bitrate=300,
                                     codec="h265")}
    try:
        yield cams
    finally:
        for cam in cams.values():
            cam.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory,
          cameras: dict[str, RtspCamera]) -> Iterator[AgentProcess]:
    process = asyncio.run(AgentProcess.start(tmp_path_factory.mktemp("rtsp"), [
        {"id": "cam", "source": cameras["cam"].url},
        {"id": "hevc", "source": cameras["hevc"].url},
        {"id": "other", "source": "testsrc://?size=160x120&fps=10&gop=1"},
    ], media={"camera_timeout": 3.0, "idle_grace": 60.0},
        rtsp={"session_timeout": SESSION_TIMEOUT}))
    yield process
    assert asyncio.run(process.stop()) == 0


def url(agent: AgentProcess, camera: str, token: str | None = None, query: bool = False) -> str:
    if token is None:
        return f"rtsp://127.0.0.1:{agent.rtsp_port}/{camera}"
    if query:
        return f"rtsp://127.0.0.1:{agent.rtsp_port}/{camera}?token={token}"
    return f"rtsp://token:{token}@127.0.0.1:{agent.rtsp_port}/{camera}"


async def token(agent: AgentProcess, *args: str) -> tuple[str, str]:
    return await agent.token(*args)


async def run(*cmd: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def ffmpeg_frames(source: str, transport: str, frames: int) -> tuple[int, bytes, bytes]:
    """Decode ``frames`` video frames to 8-bit grey: the output is frames × W × H bytes."""
    return await run("ffmpeg", "-nostdin", "-v", "error", "-rtsp_transport", transport,
                     "-i", source, "-map", "0:v", "-frames:v", str(frames), "-f", "rawvideo",
                     "-pix_fmt", "gray", "-")


async def ffprobe(source: str, transport: str = "tcp") -> list[str]:
    rc, out, err = await run("ffprobe", "-v", "error", "-rtsp_transport", transport,
                             "-show_entries", "stream=codec_name,width,height", "-of", "csv=p=0",
                             source)
    assert rc == 0, err.decode()
    return out.decode().split()


class RawClient:
    """A bare RTSP connection for what real clients never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, agent: AgentProcess) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", agent.rtsp_port))

    async def request(self, method: str, target: str, cseq: int = 1,
                      **headers: str) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {target} RTSP/1.0", f"CSeq: {cseq}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        first, *rest = head.decode().split("\r\n")
        found = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in rest if x)}
        body = await self.reader.readexactly(int(found.get("content-length", 0)))
        return int(first.split()[1]), found, body

    async def closed(self, timeout: float = 15.0) -> bool:
        """True once the agent closed the connection (reads and discards what remains)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True  # reset: the agent closed with our unread bytes in its buffer
        return True

    def close(self) -> None:
        self.writer.close()


async def playing_raw_client(agent: AgentProcess, camera: str, secret: str) -> RawClient:
    """SETUP (TCP interleaved) and PLAY the video track; the caller decides what to read."""
    client = await RawClient.open(agent)
    status, headers, _ = await client.request(
        "SETUP", url(agent, camera) + "/trackID=0", 1, Authorization=basic(secret),
        Transport="RTP/AVP/TCP;unicast;interleaved=0-1")
    assert status == 200
    status, _, _ = await client.request("PLAY", url(agent, camera), 2,
                                        Authorization=basic(secret),
                                        Session=headers["session"].split(";")[0])
    assert status == 200
    return client


def basic(secret: str) -> str:
    return "Basic " + base64.b64encode(f"token:{secret}".encode()).decode()


def fds(agent: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))


# -- real clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_ffmpeg_decodes_frames_of_the_camera_size_with_audio(
        agent: AgentProcess, transport: str) -> None:
    token_id, secret = await token(agent, "--camera", "cam", "--protocol", "rtsp")
    rc, out, err = await ffmpeg_frames(url(agent, "cam", secret), transport, 20)
    assert rc == 0, err.decode()
    assert len(out) == 20 * W * H
    streams = await ffprobe(url(agent, "cam", secret, query=True), transport)
    assert streams == [f"h264,{W},{H}", "pcm_mulaw"]
    granted = await agent.audit("--token", token_id, "--event", "access.granted")
    assert granted and {g["protocol"] for g in granted} == {"rtsp"}


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_gstreamer_rtspsrc_decodes_with_user_id_and_password(
        agent: AgentProcess, transport: str, tmp_path: Path) -> None:
    _, secret = await token(agent, "--camera", "cam")
    out = tmp_path / "frames.raw"
    rc, _, err = await run(
        "gst-launch-1.0", "-q", "rtspsrc", f"location={url(agent, 'cam')}", "user-id=anyone",
        f"user-pw={secret}", f"protocols={transport}", "!", "decodebin", "!", "videoconvert",
        "!", "video/x-raw,format=GRAY8", "!", "identity", "eos-after=16", "!", "filesink",
        f"location={out}", timeout=60)
    assert rc == 0, err.decode()[-2000:]
    assert out.stat().st_size == 15 * W * H  # identity passes N-1 buffers, then EOS


async def test_h265_camera_decodes_as_hevc_at_the_client(agent: AgentProcess) -> None:
    _, secret = await token(agent, "--camera", "hevc")
    assert (await ffprobe(url(agent, "hevc", secret)))[0] == f"hevc,{W},{H}"
    rc, out, err = await ffmpeg_frames(url(agent, "hevc", secret), "tcp", 10)
    assert rc == 0 and len(out) == 10 * W * H, err.decode()


async def test_ten_clients_share_one_camera_connection(
        agent: AgentProcess, cameras: dict[str, RtspCamera]) -> None:
    camera = cameras["cam"]
    _, secret = await token(agent, "--camera", "cam")
    await ffmpeg_frames(url(agent, "cam", secret), "tcp", 1)  # the pull is up
    before = camera.total_connections
    results = await asyncio.gather(*(ffmpeg_frames(url(agent, "cam", secret), "tcp", 30)
                                     for _ in range(10)))
    assert all(rc == 0 and len(out) == 30 * W * H for rc, out, _ in results)
    assert camera.total_connections == before and camera.connected == 1


# -- access ------------------------------------------------------------------------------------


async def test_denials(agent: AgentProcess) -> None:
    _, secret = await token(agent, "--camera", "cam")
    _, webrtc_only = await token(agent, "--camera", "cam", "--protocol", "webrtc")
    _, host = await token(agent, "--host")
    client = await RawClient.open(agent)
    try:
        status, headers, _ = await client.request("DESCRIBE", url(agent, "cam"), 1)
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="TheRelay Agent"'
        bad = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
        cases = [(url(agent, "cam"), bad, 401), (url(agent, "cam"), webrtc_only, 403),
                 (url(agent, "other"), secret, 403), (url(agent, "nope"), secret, 403),
                 (url(agent, "nope"), host, 404), (url(agent, "cam"), host, 200)]
        for seq, (target, presented, expected) in enumerate(cases, start=2):
            status, headers, _ = await client.request("DESCRIBE", target, seq,
                                                      Authorization=basic(presented))
            assert (status, headers["cseq"]) == (expected, str(seq)), target
    finally:
        client.close()


async def _playing_ffmpeg(agent: AgentProcess, token_id: str,
                          secret: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-v", "error", "-rtsp_transport", "tcp", "-i",
        url(agent, "cam", secret), "-map", "0:v", "-f", "null", "-",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await wait_until(lambda: any(e.get("event") == "rtsp_session_started"
                                 and e.get("token_id") == token_id
                                 for e in agent.log_events()), timeout=20)
    return proc


async def test_revocation_ends_a_playing_client_within_a_second(agent: AgentProcess) -> None:
    token_id, secret = await token(agent, "--camera", "cam")
    proc = await _playing_ffmpeg(agent, token_id, secret)
    result = await agent.cli("token", "revoke", token_id)
    assert result.returncode == 0, result.stderr
    revoked = time.monotonic()
    await asyncio.wait_for(proc.wait(), 5)
    assert time.monotonic() - revoked < 1.0
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    (ended,) = await agent.audit("--token", token_id, "--event", "session.ended")
    assert ended["reason"] == "revoked" and ended["protocol"] == "rtsp"


async def test_expiry_ends_a_playing_client_within_a_second(agent: AgentProcess) -> None:
    token_id, secret = await token(agent, "--camera", "cam", "--ttl", "6s")
    created = time.monotonic()
    proc = await _playing_ffmpeg(agent, token_id, secret)
    await asyncio.wait_for(proc.wait(), 15)
    assert 5.0 < time.monotonic() - created < 7.5  # the CLI's start-up costs up to ~0.5 s


async def test_the_token_session_cap_covers_rtsp(agent: AgentProcess) -> None:
    """--max-sessions counts RTSP sessions like WebRTC ones: over the cap, PLAY gets 429 and
    the audit log says session_limit; a place freed by TEARDOWN can be taken again."""
    token_id, secret = await token(agent, "--camera", "cam", "--max-sessions", "1")
    first = await playing_raw_client(agent, "cam", secret)
    try:
        second = await RawClient.open(agent)
        status, headers, _ = await second.request(
            "SETUP", url(agent, "cam") + "/trackID=0", 1, Authorization=basic(secret),
            Transport="RTP/AVP/TCP;unicast;interleaved=0-1")
        assert status == 200  # SETUP opens no live session
        status, refused, _ = await second.request(
            "PLAY", url(agent, "cam"), 2, Authorization=basic(secret),
            Session=headers["session"].split(";")[0])
        assert status == 429 and refused["retry-after"] == "60"
        second.close()
        denied = await agent.audit("--token", token_id, "--result", "denied")
        assert [(e["reason"], e["protocol"]) for e in denied] == [("session_limit", "rtsp")]
    finally:
        first.close()
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    again = await playing_raw_client(agent, "cam", secret)  # the place is free again
    again.close()


# -- bad input ---------------------------------------------------------------------------------


async def test_bad_input_gets_a_status_or_a_closed_connection(agent: AgentProcess) -> None:
    _, secret = await token(agent, "--camera", "cam")
    baseline = fds(agent)
    cases: list[tuple[bytes, int | None]] = [
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400),
        (b"DESCRIBE rtsp://x/" + b"a" * 1_000_000 + b" RTSP/1.0\r\n\r\n", 414),
        (b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n", 431),
        (b"$\x00\xff\xff" + b"\x00" * 70_000, None),  # discarded; then the connection is idle
    ]
    for wire, status in cases:
        client = await RawClient.open(agent)
        client.writer.write(wire)
        if status is not None:
            got, _, _ = await client.response()
            assert got == status
        assert await client.closed(timeout=SESSION_TIMEOUT + 5)
        client.close()
    client = await RawClient.open(agent)
    try:
        status, _, _ = await client.request("SETUP", url(agent, "cam") + "/trackID=7", 1,
                                            Authorization=basic(secret),
                                            Transport="RTP/AVP/TCP;unicast;interleaved=0-1")
        assert status == 404
        status, _, _ = await client.request("PLAY", url(agent, "cam"), 2,
                                            Authorization=basic(secret))
        assert status == 455
        status, _, _ = await client.request("SETUP", url(agent, "cam") + "/trackID=0", 3,
                                            Authorization=basic(secret),
                                            Transport="RTP/AVP;multicast")
        assert status == 461
        status, headers, _ = await client.request("OPTIONS", url(agent, "cam"), 4)
        assert status == 200 and "GET_PARAMETER" in headers["public"]
    finally:
        client.close()
    await wait_until(lambda: fds(agent) <= baseline, timeout=10)


async def test_slowloris_is_cut_off(agent: AgentProcess) -> None:
    client = await RawClient.open(agent)
    started = time.monotonic()
    for chunk in (b"OPT", b"IONS * RT", b"SP/1.0\r\nCSe"):
        client.writer.write(chunk)
        await asyncio.sleep(1.0)
    status, _, _ = await client.response()
    assert status == 408 and await client.closed()
    assert time.monotonic() - started < SESSION_TIMEOUT + 12
    client.close()


async def test_sessions_set_up_and_never_played_are_cleaned_by_the_timeout(
        agent: AgentProcess) -> None:
    _, secret = await token(agent, "--camera", "cam")
    baseline = fds(agent)
    clients = []
    for _ in range(200):
        client = await RawClient.open(agent)
        status, headers, _ = await client.request(
            "SETUP", url(agent, "cam") + "/trackID=0", 1, Authorization=basic(secret),
            Transport="RTP/AVP/TCP;unicast;interleaved=0-1")
        assert status == 200 and headers["session"].endswith(f";timeout={SESSION_TIMEOUT:g}")
        clients.append(client)
    assert fds(agent) >= baseline + 200
    closed = await asyncio.gather(*(c.closed(timeout=SESSION_TIMEOUT + 5) for c in clients))
    assert all(closed)
    for client in clients:
        client.close()
    await wait_until(lambda: fds(agent) <= baseline, timeout=10)


async def test_a_client_that_stops_reading_does_not_hold_back_others(
        agent: AgentProcess) -> None:
    _, secret = await token(agent, "--camera", "cam")
    stuck = await playing_raw_client(agent, "cam", secret)
    # the stuck client now reads nothing while a real client decodes 3 s of picture
    started = time.monotonic()
    rc, out, err = await ffmpeg_frames(url(agent, "cam", secret), "tcp", 45)
    assert rc == 0 and len(out) == 45 * W * H, err.decode()
    assert time.monotonic() - started < 10
    stuck.writer.transport.abort()


# -- what the rest of the agent shows ------------------------------------------------------------


async def _get(agent: AgentProcess, path: str, token: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}{path}", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        return await r.text()


async def test_camera_list_rtsp_url_and_metrics_count_rtsp_sessions(agent: AgentProcess) -> None:
    _, viewer = await token(agent, "--camera", "cam")
    listed = json.loads(await _get(agent, "/api/v1/cameras", viewer))
    assert listed["cameras"][0]["rtsp_url"] == f"rtsp://127.0.0.1:{agent.rtsp_port}/cam"
    _, admin = await token(agent, "--admin")
    token_id, secret = await token(agent, "--camera", "cam")
    proc = await _playing_ffmpeg(agent, token_id, secret)
    try:
        metrics = await _get(agent, "/metrics", admin)
        assert 'therelay_viewers{camera="cam",protocol="rtsp"} 1' in metrics
    finally:
        proc.kill()
        await proc.wait()


async def test_removing_the_camera_ends_its_rtsp_clients(agent: AgentProcess) -> None:
    """Last in this module: the agent loses camera "other"."""
    token_id, secret = await token(agent, "--camera", "other")
    client = await playing_raw_client(agent, "other", secret)
    config = yaml.safe_load(agent.config_path.read_text())
    config["cameras"] = [c for c in config["cameras"] if c["id"] != "other"]
    agent.config_path.write_text(yaml.safe_dump(config))
    agent.proc.send_signal(signal.SIGHUP)
    assert await client.closed(timeout=10)
    client.close()
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    (ended,) = await agent.audit("--token", token_id, "--event", "session.ended")
    assert ended["reason"] == "camera_removed" and ended["protocol"] == "rtsp"
