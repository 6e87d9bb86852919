"""A real RTSP camera (GStreamer's RTSP server) pulled once and watched by many."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from tests.conftest import write_secret
from tests.support.agent import AgentProcess, WhepViewer, run_async, wait_until
from tests.support.camera import RtspCamera, rtsp_camera_factory_fixture

__all__ = ["rtsp_camera_factory_fixture"]

Factory = Callable[..., RtspCamera]
CAMERA = {"width": 320, "height": 240, "fps": 15, "gop": 15, "bitrate": 300}


async def status(agent: AgentProcess, token: str, camera: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/api/v1/cameras", headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=5)) as r:
        cameras = (await r.json())["cameras"]
    return next(c for c in cameras if c["id"] == camera)


async def test_five_viewers_one_rtsp_connection(tmp_path: Path,
                                                rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}],
                                     media={"idle_grace": 1.0})
    try:
        _, token = await agent.token("--camera", "door")
        viewers = [WhepViewer(agent.base, "door", token) for _ in range(5)]
        for viewer in viewers:
            assert await viewer.connect() == 201, viewer.body
        frames = await asyncio.gather(*(v.frame() for v in viewers))
        assert {(f.width, f.height) for f in frames} == {(320, 240)}
        assert camera.connected == 1 and camera.total_connections == 1
        info = await status(agent, token, "door")
        assert (info["state"], info["codec"], info["width"]) == ("online", "h264", 320)
        assert info["viewers"] == 5
        for viewer in viewers:
            assert await viewer.delete() == 200
            await viewer.close()
        # The last viewer gone, the pull stops after media.idle_grace.
        await wait_until(lambda: camera.connected == 0, timeout=10)
    finally:
        assert await agent.stop() == 0


async def test_a_camera_blip_does_not_end_the_session(tmp_path: Path,
                                                      rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}],
                                     media={"camera_timeout": 2.0, "reconnect_max": 2.0})
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201
        await viewer.frame()
        await asyncio.to_thread(camera.kill)
        async def offline() -> bool:
            info = await status(agent, token, "door")
            return bool(info["state"] == "offline")

        await wait_until(offline, timeout=15)
        assert viewer.pc.connectionState == "connected"
        await asyncio.to_thread(camera.restart)
        # Frames flow again once the camera is back: read until one arrives after restart.
        restarted = time.monotonic()
        deadline = restarted + 30
        while time.monotonic() < deadline:
            await viewer.frame(timeout=30)
            if time.monotonic() - restarted > 0.5:
                break
        assert (await status(agent, token, "door"))["state"] == "online"
        assert viewer.pc.connectionState == "connected"
        await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_credentials_from_a_file_and_a_clear_error_when_wrong(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA, user="viewer",
                                     password="s3cret-pass")
    good, bad = tmp_path / "good.secret", tmp_path / "bad.secret"
    write_secret(good, "s3cret-pass\n")
    write_secret(bad, "wrong\n")
    agent = await AgentProcess.start(tmp_path, [
        {"id": "door", "source": camera.url, "username": "viewer", "password_file": str(good)},
        {"id": "yard", "source": camera.url, "username": "viewer", "password_file": str(bad)},
    ])
    try:
        _, token = await agent.token("--host")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
        await viewer.close()
        refused = WhepViewer(agent.base, "yard", token)
        assert await refused.connect() == 503
        await refused.close()
        assert "refused the credentials" in refused.body
        assert "s3cret" not in agent.log_path.read_text()
    finally:
        assert await agent.stop() == 0


async def test_an_open_camera_given_credentials_plays(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    """Credentials configured (an ONVIF adoption always has them) for a camera whose RTSP
    asks none: the agent's own DESCRIBE without credentials makes the camera prepare its
    stream, and GStreamer's server answered FFmpeg's DESCRIBE right after with 503 while it
    tore that down (every try, for good). The open is tried again once, a moment later."""
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA)
    secret = tmp_path / "camera.secret"
    write_secret(secret, "s3cret-pass\n")
    agent = await AgentProcess.start(tmp_path, [
        {"id": f"door{i}", "source": camera.url, "username": "admin",
         "password_file": str(secret)} for i in range(3)])
    try:
        _, token = await agent.token("--host")
        for i in range(3):
            viewer = WhepViewer(agent.base, f"door{i}", token)
            assert await viewer.connect() == 201, viewer.body
            await viewer.frame()
            await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_the_session_is_kept_alive_past_the_cameras_timeout(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    """A camera ends a session nobody keeps alive (here after 3 s): the agent's client
    sends keepalives within half of the timeout the camera announced, so one connection
    plays on, frame after frame."""
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA, session_timeout=3)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}])
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
        started = time.monotonic()
        frames = 0
        while time.monotonic() - started < 9:  # three session timeouts
            await viewer.frame(timeout=2)
            frames += 1
        assert frames >= 9 * CAMERA["fps"] * 0.8
        assert camera.total_connections == 1
        await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_a_camera_that_freezes_mid_stream_is_offline_within_its_timeout(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    """The stream is read on the event loop: a camera that stops sending (frozen, its TCP
    connection still open) must be noticed by the once-a-second check, not by a read that
    never returns; it plays again when it comes back."""
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}],
                                     media={"camera_timeout": 2.0, "reconnect_max": 1.0})
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201, viewer.body
        await viewer.frame()
        assert camera.pid is not None
        os.kill(camera.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            async def offline() -> bool:
                return bool((await status(agent, token, "door"))["state"] == "offline")

            await wait_until(offline, timeout=10)
            took = time.monotonic() - frozen
            info = await status(agent, token, "door")
            assert "timeout" in info["error"], info
            assert 2.0 <= took < 2.0 + 1.0 + 1.5, took  # the timeout, the check's second
        finally:
            os.kill(camera.pid, signal.SIGCONT)
        async def online() -> bool:
            return bool((await status(agent, token, "door"))["state"] == "online")

        await wait_until(online, timeout=20)  # reconnected
        await viewer.frame(timeout=10)
        await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_a_camera_pulled_over_udp_plays(tmp_path: Path,
                                              rtsp_camera_factory: Factory) -> None:
    """transport: udp stays with FFmpeg's RTSP client (the agent's own speaks TCP)."""
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url,
                                                 "transport": "udp"}])
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201, viewer.body
        frame = await viewer.frame()
        assert (frame.width, frame.height) == (320, 240)
        await viewer.close()
    finally:
        assert await agent.stop() == 0


@pytest.mark.parametrize(("audio", "codec"), [("pcmu", "PCMU"), ("aac", "opus")])
async def test_audio_reaches_the_viewer(tmp_path: Path, rtsp_camera_factory: Factory,
                                        audio: str, codec: str) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA, audio=audio)
    agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}])
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 201, viewer.body
        assert f"{codec}/" in viewer.body
        await viewer.frame()
        sound = await asyncio.wait_for(viewer.tracks["audio"].recv(), 10)
        assert isinstance(sound, av.AudioFrame) and sound.samples > 0
        assert (await status(agent, token, "door"))["audio"] == codec
        await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_a_username_without_password_is_a_clear_error(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, **CAMERA, user="viewer",
                                     password="s3cret-pass")
    config = tmp_path / "c.yaml"
    config.write_text(f"cameras: [{{id: door, source: '{camera.url}', username: viewer}}]\n")
    checked = await run_async([sys.executable, "-m", "agent", "config", "check", "--config",
                               str(config)],
                              env={"PATH": "/usr/bin:/bin", "THERELAY_STATE_DIR": str(tmp_path)})
    assert checked.returncode == 2
    assert "'door' has a username but no password" in checked.stderr
    agent = await AgentProcess.start(
        tmp_path, [{"id": "door", "source": camera.url, "username": "viewer"}])
    try:
        _, token = await agent.token("--camera", "door")
        viewer = WhepViewer(agent.base, "door", token)
        assert await viewer.connect() == 503
        await viewer.close()
        assert "has a username but no password" in viewer.body
    finally:
        assert await agent.stop() == 0
