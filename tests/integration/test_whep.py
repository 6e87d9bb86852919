"""WHEP viewing, snapshots and the camera list against the real daemon, on loopback."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import av
import pytest
from aiortc.mediastreams import MediaStreamError

from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.media import write_clip

SMALL = "testsrc://?size=320x240&fps=15&gop=1"


@pytest.fixture(scope="module")
def hevc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short H.265 recording: a camera format WebRTC viewers cannot play."""
    return write_clip(tmp_path_factory.mktemp("media") / "hevc.mp4", "libx265", 160, 120,
                      fps=10, frames=10, options={"x265-params": "log-level=error"})


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, hevc_file: Path):
    closed = _closed_port()
    process = AgentProcess(tmp_path_factory.mktemp("agent"), [
        {"id": "cam1", "name": "Front door", "source": SMALL},
        {"id": "cam2", "source": SMALL},
        {"id": "h265", "source": f"file://{hevc_file}"},
        {"id": "gone", "source": f"rtsp://127.0.0.1:{closed}/stream"},
    ], media={"camera_timeout": 2.0, "idle_grace": 2.0},
        # a dozen deliberate denials from 127.0.0.1 in a few seconds: the limiter (tested
        # on its own) must not turn the later ones into 429s
        tokens={"failed_attempts": {"burst": 100}})
    yield process
    assert process.stop() == 0


def _closed_port() -> int:
    from tests.support.netns import free_port
    return free_port()  # nothing listens there


async def request(method: str, url: str, **kw) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_viewer_gets_decoded_frames_of_the_camera(agent: AgentProcess) -> None:
    token_id, token = agent.token("--camera", "cam1")
    viewer = WhepViewer(agent.base, "cam1", token)
    assert await viewer.connect() == 201, viewer.body
    assert viewer.headers["Content-Type"] == "application/sdp"
    assert viewer.location and viewer.location.startswith("/whep/cam1/sessions/")
    assert "a=rtpmap:" in viewer.body and "H264" in viewer.body
    frame = await viewer.frame()
    assert (frame.width, frame.height) == (320, 240)
    for _ in range(15):  # a second of moving picture
        frame = await viewer.frame()
    await viewer.close()
    granted = agent.audit("--token", token_id, "--event", "access.granted")
    assert granted[-1]["protocol"] == "webrtc" and granted[-1]["peer_ip"] == "127.0.0.1"


async def test_delete_ends_the_session_and_it_is_audited(agent: AgentProcess) -> None:
    token_id, token = agent.token("--camera", "cam2")
    viewer = WhepViewer(agent.base, "cam2", token)
    assert await viewer.connect() == 201
    await viewer.frame()
    assert await viewer.delete() == 200
    assert await viewer.delete() == 404
    await viewer.close()
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    (ended,) = agent.audit("--token", token_id, "--event", "session.ended")
    assert ended["reason"] == "deleted" and ended["detail"]["bytes"] > 0
    assert ended["protocol"] == "webrtc"
    assert viewer.location is not None
    assert viewer.location.endswith(ended["detail"]["session"])  # one id everywhere


async def test_token_in_the_query_works_and_never_reaches_the_log(agent: AgentProcess) -> None:
    _, token = agent.token("--camera", "cam1")
    viewer = WhepViewer(agent.base, "cam1", token, via_query=True)
    assert await viewer.connect() == 201
    await viewer.frame()
    assert await viewer.delete() == 200
    await viewer.close()
    assert token not in agent.log_path.read_text()


async def ended(viewer: WhepViewer, timeout: float = 10.0) -> float:
    """Read frames until the agent ends the stream; returns when it did."""
    track = viewer.tracks["video"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(track.recv(), max(0.1, deadline - time.monotonic()))
        except (MediaStreamError, TimeoutError):
            if viewer.pc.connectionState in ("closed", "failed") or track.readyState == "ended":
                return time.monotonic()
            continue
        if viewer.pc.connectionState in ("closed", "failed"):
            return time.monotonic()
    raise AssertionError("the agent never ended the session")


async def test_revocation_ends_a_live_session(agent: AgentProcess) -> None:
    token_id, token = agent.token("--host")
    viewer = WhepViewer(agent.base, "cam1", token)
    assert await viewer.connect() == 201
    await viewer.frame()
    assert agent.cli("token", "revoke", token_id).returncode == 0
    await ended(viewer)
    await viewer.close()
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    (entry,) = agent.audit("--token", token_id, "--event", "session.ended")
    assert entry["reason"] == "revoked"
    again = WhepViewer(agent.base, "cam1", token)
    assert await again.connect() == 401
    await again.close()


async def test_expiry_ends_a_live_session(agent: AgentProcess) -> None:
    token_id, token = agent.token("--camera", "cam1", "--ttl", "4s")
    viewer = WhepViewer(agent.base, "cam1", token)
    assert await viewer.connect() == 201
    await viewer.frame()
    await ended(viewer, timeout=15)
    await viewer.close()
    await wait_until(lambda: agent.audit("--token", token_id, "--event", "session.ended"))
    assert agent.audit("--token", token_id, "--event", "session.ended")[0]["reason"] == "expired"


def _change_one(token: str) -> str:
    return token[:30] + ("A" if token[30] != "A" else "B") + token[31:]


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("missing", 401, "missing"),
        ("malformed", 401, "malformed"),
        ("corrupted", 401, "corrupted"),
        ("unknown", 401, "unknown"),
        ("revoked", 401, "revoked"),
        ("expired", 401, "expired"),
        ("other camera", 403, "scope_mismatch"),
        ("snapshot only", 403, "protocol_not_allowed"),
        ("admin token", 403, "wrong_kind"),
    ],
)
async def test_each_denial_has_its_status_header_and_audit_entry(
    agent: AgentProcess, case: str, status: int, reason: str
) -> None:
    from agent.access.tokens import Kind, generate

    token: str | None
    if case == "missing":
        token = None
    elif case == "malformed":
        token = "not-a-token"
    elif case == "corrupted":
        token = _change_one(agent.token("--camera", "cam1")[1])
    elif case == "unknown":
        token = generate(Kind.ACCESS).text
    elif case == "revoked":
        token_id, token = agent.token("--camera", "cam1")
        agent.cli("token", "revoke", token_id)
        await asyncio.sleep(0.5)  # a daemon that knew the token follows the store every 0.2 s
    elif case == "expired":
        token = agent.token("--camera", "cam1", "--ttl", "1s")[1]
        await asyncio.sleep(1.5)
    elif case == "other camera":
        token = agent.token("--camera", "cam2")[1]
    elif case == "snapshot only":
        token = agent.token("--camera", "cam1", "--protocol", "snapshot")[1]
    else:
        token = agent.token("--admin")[1]
    # No wait for the watcher: an id the daemon has not seen yet makes it read the store.
    viewer = WhepViewer(agent.base, "cam1", token)
    assert await viewer.connect() == status
    await viewer.close()
    body = viewer.body
    assert f'"error": "{reason}"' in body
    if status == 401:
        error = "invalid_request" if reason == "missing" else "invalid_token"
        assert viewer.headers["WWW-Authenticate"] == (
            f'Bearer realm="therelay-agent", error="{error}"')
    await wait_until(lambda: any(e["reason"] == reason for e in agent.audit(
        "--event", "access.denied", "--camera", "cam1", "--since", "10s")))


async def test_rate_limited_after_repeated_failures(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, [{"id": "cam1", "source": SMALL}],
                         tokens={"failed_attempts": {"burst": 3, "per_minute": 1}})
    try:
        statuses = []
        for _ in range(5):
            status, headers, _ = await request("POST", f"{agent.base}/whep/cam1",
                                               headers=bearer("junk"), data=b"v=0")
            statuses.append((status, headers.get("Retry-After")))
        assert statuses == [(401, None)] * 3 + [(429, "60")] * 2
        _, token = agent.token("--camera", "cam1")  # a valid token is never limited
        viewer = WhepViewer(agent.base, "cam1", token)
        assert await viewer.connect() == 201
        await viewer.close()
    finally:
        assert agent.stop() == 0


async def test_unknown_camera_is_404_only_for_a_token_that_could_see_it(
        agent: AgentProcess) -> None:
    _, host = agent.token("--host")
    _, cam = agent.token("--camera", "cam1")
    for token, expected in ((host, 404), (cam, 403)):
        status, _, body = await request("POST", f"{agent.base}/whep/nope",
                                        headers={**bearer(token),
                                                 "Content-Type": "application/sdp"},
                                        data=b"v=0\r\n")
        assert status == expected, body


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("text/plain", b"v=0\r\n", 415, "unsupported_media_type"),
        ("application/sdp", b"hello", 400, "bad_offer"),
        ("application/sdp", b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                            b"m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n", 400, "bad_offer"),
        ("application/sdp", b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nbroken\r\n", 400,
         "bad_offer"),
        ("application/sdp", b"v=0\r\n" + b"a=x\r\n" * 20000, 413, "request_entity_too_large"),
    ],
)
async def test_bad_offers_get_clear_errors(agent: AgentProcess, content_type: str, body: bytes,
                                           status: int, code: str) -> None:
    _, token = agent.token("--camera", "cam1")
    got, _, answer = await request(
        "POST", f"{agent.base}/whep/cam1", data=body,
        headers={**bearer(token), "Content-Type": content_type})
    assert got == status, answer
    assert code.encode() in answer
    assert agent.proc.poll() is None  # the daemon is fine


async def test_patch_is_not_supported_and_cors_preflight_is(agent: AgentProcess) -> None:
    status, _, _ = await request("PATCH", f"{agent.base}/whep/cam1/sessions/x",
                                       headers={"Content-Type": "application/trickle-ice-sdpfrag"})
    assert status == 405
    status, headers, _ = await request("OPTIONS", f"{agent.base}/whep/cam1", headers={
        "Origin": "http://other.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Location" in headers["Access-Control-Expose-Headers"]


async def test_h265_camera_is_a_clear_error_for_webrtc_viewers(agent: AgentProcess) -> None:
    """The camera is pulled (RTSP clients take it, snapshots decode it); WebRTC gets 501."""
    _, token = agent.token("--camera", "h265")
    viewer = WhepViewer(agent.base, "h265", token)
    assert await viewer.connect() == 501
    await viewer.close()
    assert "H.264" in viewer.body and "HEVC" in viewer.body and "RTSP" in viewer.body
    _, _, body = await request("GET", f"{agent.base}/api/v1/cameras", headers=bearer(token))
    assert b'"state": "online"' in body and b'"codec": "hevc"' in body
    snap_token = agent.token("--camera", "h265", "--protocol", "snapshot")[1]
    status, headers, body = await request("GET", f"{agent.base}/snapshot/h265.jpg",
                                          headers=bearer(snap_token))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"


async def test_offline_camera_is_503_with_retry_after(agent: AgentProcess) -> None:
    _, token = agent.token("--camera", "gone")
    viewer = WhepViewer(agent.base, "gone", token)
    assert await viewer.connect() == 503
    await viewer.close()
    assert viewer.headers["Retry-After"] == "5"
    assert "connection refused" in viewer.body
    started = time.monotonic()
    status, headers, _ = await request("GET", f"{agent.base}/snapshot/gone.jpg",
                                          headers=bearer(token))
    assert status == 503 and headers["Retry-After"] == "5"
    assert time.monotonic() - started < 5  # the failure is known at once, no long wait


async def test_snapshot(agent: AgentProcess) -> None:
    _, token = agent.token("--camera", "cam2", "--protocol", "snapshot")
    results = await asyncio.gather(*(request("GET", f"{agent.base}/snapshot/cam2.jpg",
                                             headers=bearer(token)) for _ in range(5)))
    for status, headers, body in results:
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        with av.open(io.BytesIO(body), "r") as jpeg:
            picture = next(jpeg.decode(video=0))
            assert (picture.width, picture.height) == (320, 240)
    _, webrtc_only = agent.token("--camera", "cam2", "--protocol", "webrtc")
    status, _, body = await request("GET", f"{agent.base}/snapshot/cam2.jpg",
                                    headers=bearer(webrtc_only))
    assert status == 403 and b"protocol_not_allowed" in body


async def test_camera_list_follows_the_scope(agent: AgentProcess) -> None:
    _, host = agent.token("--host")
    _, cam = agent.token("--camera", "cam2", "--protocol", "snapshot")
    import json

    _, _, body = await request("GET", f"{agent.base}/api/v1/cameras", headers=bearer(host))
    assert [c["id"] for c in json.loads(body)["cameras"]] == ["cam1", "cam2", "h265", "gone"]
    _, _, body = await request("GET", f"{agent.base}/api/v1/cameras", headers=bearer(cam))
    listed = json.loads(body)
    assert [c["id"] for c in listed["cameras"]] == ["cam2"]
    assert listed["cameras"][0]["name"] == "cam2"
    status, _, _ = await request("GET", f"{agent.base}/api/v1/cameras")
    assert status == 401


async def test_the_viewer_page_is_served_with_a_strict_policy(agent: AgentProcess) -> None:
    status, headers, body = await request("GET", f"{agent.base}/")
    assert status == 200 and b"/viewer.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    status, headers, body = await request("GET", f"{agent.base}/viewer.js")
    assert status == 200 and b"location.hash" in body


async def test_health_tells_no_camera_ids(agent: AgentProcess) -> None:
    import json

    status, _, body = await request("GET", f"{agent.base}/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert sum(health["cameras"].values()) == 4
    assert b"cam1" not in body and b"gone" not in body


async def test_stopping_the_agent_ends_sessions_as_shutdown(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, [{"id": "cam1", "source": SMALL}])
    token_id, token = agent.token("--camera", "cam1")
    viewer = WhepViewer(agent.base, "cam1", token)
    assert await viewer.connect() == 201
    await viewer.frame()
    assert agent.stop() == 0
    await viewer.close()
    (ended,) = agent.audit("--token", token_id, "--event", "session.ended")
    assert ended["reason"] == "shutdown"
