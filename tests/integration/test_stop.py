"""Graceful stop: SIGTERM ends sessions (audited), DELETEs WHIP sessions and exits within 5 s.

5 s is a requirement, not a performance goal: it is the stop timeout the systemd unit gives
the agent before it sends SIGKILL (an unclean stop loses the in-memory audit tail and leaves
WHIP resources behind at the relay). Each test prints the measured time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.fake_relay import FakeRelay
from tests.support.netns import free_port

SMALL = "testsrc://?size=320x240&fps=15&gop=1"
STOP_LIMIT = 5.0  # systemd's stop timeout for the unit (TimeoutStopSec)


async def sigterm(agent: AgentProcess, what: str) -> float:
    """SIGTERM the daemon, wait for it, check it exited 0 and cleanly; the time it took."""
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(agent.proc.wait, 15)
    finally:
        elapsed = time.monotonic() - started
        print(f"\nSIGTERM -> exit ({what}): {elapsed:.2f} s")
    assert code == 0
    assert await asyncio.to_thread(agent.stop) == 0  # no traceback, no blocked loop
    assert elapsed < STOP_LIMIT, f"stopping took {elapsed:.2f} s (limit {STOP_LIMIT} s)"
    return elapsed


def verified(agent: AgentProcess) -> None:
    result = agent.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


@contextlib.asynccontextmanager
async def silent_camera() -> AsyncIterator[str]:
    """An RTSP URL whose server accepts the connection and never answers (a hung camera)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"rtsp://127.0.0.1:{port}/stream"
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_sigterm_with_a_live_viewer_ends_its_session_as_shutdown(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, [{"id": "cam1", "source": SMALL}])
    try:
        token_id, token = await asyncio.to_thread(agent.token, "--camera", "cam1")
        viewer = WhepViewer(agent.base, "cam1", token)
        assert await viewer.connect() == 201
        await viewer.frame()
        await sigterm(agent, "1 live WHEP viewer")
        await viewer.close()
    finally:
        if agent.proc.poll() is None:
            await asyncio.to_thread(agent.stop)
    ended = await asyncio.to_thread(agent.audit, "--token", token_id, "--event",
                                    "session.ended")
    assert [e["reason"] for e in ended] == ["shutdown"]
    assert ended[0]["detail"]["bytes"] > 0
    verified(agent)


async def test_sigterm_deletes_the_whip_session_at_the_relay(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        secret = tmp_path / "publisher-token.secret"
        secret.write_text(relay.issue_publisher(agent_id="nvr1") + "\n")
        agent = AgentProcess(tmp_path, [{"id": "cam1", "source": SMALL}],
                             agent={"id": "nvr1", "account_id": "acme"},
                             relay={"url": relay.url, "publisher_token_file": str(secret)})
        try:
            await relay.wait_agent(timeout=20)
            session = await relay.publish("cam1")
            await relay.wait_status(session, "live", timeout=20)
            await relay.whip_frame(session)
            await sigterm(agent, "relay link + 1 WHIP publish")
            deleted = await relay.wait_whip_deleted(session, timeout=1)
            assert deleted is not None
        finally:
            if agent.proc.poll() is None:
                await asyncio.to_thread(agent.stop)
        assert relay.violations == []
    verified(agent)


async def test_sigterm_while_a_camera_hangs_and_a_viewer_is_negotiating(
        tmp_path: Path) -> None:
    refused = f"rtsp://127.0.0.1:{free_port()}/nothing-listens"
    async with silent_camera() as hung:
        agent = AgentProcess(tmp_path, [
            {"id": "hung", "source": hung, "always_on": True},
            {"id": "gone", "source": refused, "always_on": True},
            {"id": "slow", "source": hung}],
            media={"camera_timeout": 30.0})
        try:
            _, token = await asyncio.to_thread(agent.token, "--host")
            await wait_until(lambda: any(e.get("event") == "camera_unavailable"
                                         for e in agent.log_events()), 15)
            # A viewer whose offer is in flight: the agent is waiting for the camera to
            # come online before it answers.
            viewer = WhepViewer(agent.base, "slow", token)
            negotiating = asyncio.create_task(viewer.connect())
            await asyncio.sleep(1.0)
            assert not negotiating.done()
            await sigterm(agent, "hung camera, refused camera, viewer mid-offer")
            with contextlib.suppress(aiohttp.ClientError):
                await negotiating
            assert viewer.status != 201
            await viewer.close()
        finally:
            if agent.proc.poll() is None:
                await asyncio.to_thread(agent.stop)
    verified(agent)
