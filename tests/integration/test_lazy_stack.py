"""An idle agent does without the WebRTC stack, PyAV and the ONVIF client; the first viewer
and the first camera pull load what they need (agent/webrtc/stack.py).

What a process has loaded is read from ``/proc/<pid>/maps``: each of these packages ships
compiled libraries, mapped once imported.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import aiortc  # noqa: F401 (loaded here, for the probe's own check)

from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.camera import RtspCamera, rtsp_camera_factory_fixture

__all__ = ["rtsp_camera_factory_fixture"]

SMALL = "testsrc://?size=320x240&fps=15&gop=1"
#: Compiled code of each package, as its path in site-packages starts.
#: (aiortc itself is pure Python; pylibsrtp, its SRTP, stands for it.)
LIBRARIES = {"av": "/av/", "pylibsrtp": "/pylibsrtp/", "lxml": "/lxml/",
             "cryptography": "/cryptography/"}


def packages(pid: int) -> set[str]:
    """The packages (of LIBRARIES) whose compiled libraries the process has mapped."""
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if "site-packages" in line}
    return {name for name, part in LIBRARIES.items()
            if any(part in path.split("site-packages", 1)[1] for path in paths)}


def test_the_probe_sees_a_loaded_library() -> None:
    """The check below can fail: this test process has PyAV and aiortc's SRTP loaded."""
    assert {"av", "pylibsrtp"} <= packages(os.getpid())


async def test_an_idle_agent_loads_no_media_stack_until_a_viewer_comes(tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL}])
    try:
        pid = agent.proc.pid
        assert packages(pid) == set()  # TLS is off, discovery off, nobody watching
        _, token = await agent.token("--camera", "cam1")
        snapshot = await agent.cli("token", "list")  # the CLI is another process: no effect
        assert snapshot.returncode == 0
        assert packages(pid) == set()
        viewer = WhepViewer(agent.base, "cam1", token)
        assert await viewer.connect() == 201, viewer.body
        frame = await viewer.frame()
        assert (frame.width, frame.height) == (320, 240)
        assert {"av", "pylibsrtp", "cryptography"} <= packages(pid)
        await viewer.close()
        await wait_until(lambda: "webrtc_stack_loaded" in agent.log_path.read_text(), 5)
    finally:
        assert await agent.stop() == 0


async def test_a_pulled_rtsp_camera_goes_without_pyav_until_a_webrtc_viewer_comes(
        tmp_path: Path, rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    """The agent reads RTSP cameras itself: an always-on camera pulled with nobody watching
    loads no PyAV (~16 MB); the first WebRTC viewer brings it in (aiortc imports it)."""
    camera = await asyncio.to_thread(rtsp_camera_factory, width=320, height=240, fps=15,
                                     gop=15, bitrate=300)
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": camera.url,
                                                 "always_on": True}])
    try:
        pid = agent.proc.pid
        _, admin = await agent.token("--admin")
        _, token = await agent.token("--camera", "cam1")

        async def received() -> float:
            async with aiohttp.ClientSession() as http, http.get(
                    f"{agent.base}/metrics", headers={"Authorization": f"Bearer {admin}"}) as r:
                text = await r.text()
            line = next(line for line in text.splitlines()
                        if line.startswith('therelay_camera_received_bytes_total{camera="cam1"}'))
            return float(line.rsplit(" ", 1)[1])

        deadline = time.monotonic() + 10
        while await received() < 50_000 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await received() >= 50_000, "the camera is pulled"
        assert packages(pid) == set()
        viewer = WhepViewer(agent.base, "cam1", token, audio=False)
        assert await viewer.connect() == 201, viewer.body
        frame = await viewer.frame()
        assert (frame.width, frame.height) == (320, 240)
        assert {"av", "pylibsrtp"} <= packages(pid)
        await viewer.close()
    finally:
        assert await agent.stop() == 0


async def test_the_viewer_page_starts_loading_webrtc_before_the_offer(tmp_path: Path) -> None:
    """A browser fetches viewer.js a moment before it sends its offer: the stack loads
    meanwhile, so the first viewer since start does not wait for the import."""
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL}])
    try:
        assert "pylibsrtp" not in packages(agent.proc.pid)
        async with aiohttp.ClientSession() as http, http.get(f"{agent.base}/viewer.js") as r:
            assert r.status == 200
        await wait_until(lambda: "webrtc_stack_loaded" in agent.log_path.read_text(), 10)
        assert "pylibsrtp" in packages(agent.proc.pid)
    finally:
        assert await agent.stop() == 0
