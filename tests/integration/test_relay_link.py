"""The agent's relay link against a faithful fake of TheRelay cloud (docs/relay-protocol.md).

The fake (tests/support/fake_relay.py) speaks the documented protocol over real sockets on
127.0.0.1; the agent is the real daemon. Every test ends with the fake's list of contract
violations empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.camera import RtspCamera, rtsp_camera_factory_fixture
from tests.support.fake_relay import FakeRelay, Message

__all__ = ["rtsp_camera_factory_fixture"]
Factory = Callable[..., RtspCamera]

SMALL = "testsrc://?size=320x240&fps=15&gop=1"


async def start_agent(tmp: Path, relay: FakeRelay, token: str, **extra: object) -> AgentProcess:
    secret = tmp / "publisher-token.secret"
    secret.write_text(token + "\n")
    return await AgentProcess.start(tmp, [{"id": "cam1", "name": "Lobby", "source": SMALL}],
                                    agent={"id": "nvr1", "account_id": "acme"},
                                    relay={"url": relay.url,
                                           "publisher_token_file": str(secret)}, **extra)


async def snapshot_status(agent: AgentProcess, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{agent.base}/snapshot/cam1.jpg", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_hello_inventory_token_sync_and_instant_revocation(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher(agent_id="nvr1"))
        try:
            hello = await relay.wait_agent(timeout=20)
            assert hello["agent_id"] == "nvr1" and "whip" in hello["capabilities"]
            assert [c["id"] for c in hello["cameras"]] == ["cam1"]
            assert "source" not in hello["cameras"][0]
            # A token issued in the cloud works on the LAN once synced (only its hash came).
            text, record = relay.issue_access_token("camera:cam1", protocols=["webrtc",
                                                                             "snapshot"])
            message = await relay.send_tokens([record])
            assert message is not None
            assert (await relay.wait_ack(message))["ok"] is True
            assert await snapshot_status(agent, text) == 200
            viewer = WhepViewer(agent.base, "cam1", text)
            assert await viewer.connect() == 201
            await viewer.frame()
            # Revoked in the cloud: the live session ends and the token stops working.
            revoke = await relay.revoke(record["id"])
            assert (await relay.wait_ack(revoke))["ok"] is True
            await wait_until(lambda: viewer.pc.connectionState in ("closed", "failed"), 10)
            await viewer.close()
            assert await snapshot_status(agent, text) == 401
            ended = await agent.audit("--token", record["id"], "--event", "session.ended")
            assert ended and ended[0]["reason"] == "revoked"
            assert (await agent.audit("--token", record["id"], "--event", "token.revoked"))[0][
                "actor"] == "relay"
            pong = await relay.ping()
            assert pong["type"] == "pong"
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving
        assert relay.violations == []


async def test_publish_on_demand_over_whip(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            await relay.wait_agent(timeout=20)
            session = await relay.publish("cam1")
            await relay.wait_status(session, "live", timeout=20)
            frame = await relay.whip_frame(session)
            assert (frame.width, frame.height) == (320, 240)
            await relay.unpublish(session)
            await relay.wait_whip_deleted(session)
            await relay.wait_status(session, "stopped")
            await relay.publish("nope")
            refused = await relay.wait_for("ack", lambda m: m.get("ok") is False, timeout=10)
            assert refused["error"]["code"] == "unknown_camera"
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving
        assert relay.violations == []


async def test_redirects_are_followed_and_failures_reported(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        relay.whip_redirect = True
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            await relay.wait_agent(timeout=20)
            session = await relay.publish("cam1")
            await relay.wait_status(session, "live", timeout=20)
            relay.whip_redirect = False
            relay.whip_fail = 503
            failing = await relay.publish("cam1")
            status = await relay.wait_status(failing, "failed", timeout=20)
            assert status["error"]["code"] == "http_503"
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving
        assert relay.violations == []


async def test_a_read_only_token_registers_but_never_publishes(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher(permission="read"))
        try:
            await relay.wait_agent(timeout=20)
            message = await relay.publish("cam1")
            ack = await relay.wait_for("ack", lambda m: m.get("ok") is False, timeout=10)
            assert ack["error"]["code"] == "read_only"
            assert relay.whip_resource(message) is None
            await wait_until(lambda: any(e.get("event") == "relay_read_only"
                                         for e in agent.log_events()), 5)
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving


async def test_a_revoked_publisher_token_is_said_once_and_retried_slowly(
        tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        token = relay.issue_publisher(revoked=True)
        agent = await start_agent(tmp_path, relay, token)
        try:
            await wait_until(lambda: len(relay.attempts) >= 1, 20)
            await asyncio.sleep(5)
            assert len(relay.attempts) == 1  # no hammering: the next try is >= 15 s away
            assert relay.attempts[0].status == 401
            rejected = [e for e in agent.log_events() if e.get("event") == "relay_rejected_agent"]
            assert len(rejected) == 1 and rejected[0]["reason"] == "token_revoked"
            assert "TheRelay Dashboard" in rejected[0]["fix"]
            assert token not in agent.log_path.read_text()
            status, _, body = await _get(f"{agent.base}/healthz")
            assert status == 200 and b'"relay": "rejected"' in body
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving


async def test_reconnects_after_the_relay_drops_and_resumes_from_its_cursor(
        tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            await relay.wait_agent(timeout=20)
            _, record = relay.issue_access_token("host:nvr1")
            message = await relay.send_tokens([record])
            assert message is not None
            ack = await relay.wait_ack(message)
            mark = len(relay.received)
            await relay.close_agent(1001, "restart")
            hello = await relay.wait_for("hello", since=mark, timeout=20)
            assert hello["token_cursor"] == ack["cursor"]
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving
        assert relay.violations == []


async def _get(url: str) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def test_always_mode_publishes_to_any_whip_server_without_a_control_channel(
        tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        token = relay.issue_publisher()
        secret = tmp_path / "publisher-token.secret"
        secret.write_text(token + "\n")
        agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL},
                                         {"id": "cam2", "source": SMALL}],
                                         agent={"id": "nvr1"},
                                         relay={"publish": "always",
                                                "publisher_token_file": str(secret),
                                                "whip_url_template": relay.whip_url_template,
                                                "always_cameras": ["cam2"]})
        try:
            frame = await relay.whip_frame(relay.always_session("nvr1", "cam2"), timeout=20)
            assert (frame.width, frame.height) == (320, 240)
            assert relay.whip_resource(relay.always_session("nvr1", "cam1")) is None
            assert relay.connections == 0  # no control channel was needed
        finally:
            assert await agent.stop() == 0
        await relay.wait_whip_deleted(relay.always_session("nvr1", "cam2"))


async def test_usage_reaches_the_relay_in_acknowledged_batches(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher(agent_id="nvr1"))
        try:
            await relay.wait_agent(timeout=20)
            text, record = relay.issue_access_token("host:nvr1")
            assert await relay.send_tokens([record]) is not None
            await wait_until(lambda: any(m["type"] == "ack" for m in relay.received), 10)
            relay.ack_usage = False  # the first batch is never acknowledged…
            for _ in range(3):
                assert await snapshot_status(agent, text) == 200
            assert await snapshot_status(agent, "junk") == 401
            first = await relay.wait_for("usage", timeout=20)
            mark = len(relay.received)
            relay.ack_usage = True
            await relay.close_agent(1001, "restart")  # …so it comes again after reconnecting
            again = await relay.wait_for("usage", lambda m: m["batch"] == first["batch"],
                                         since=mark, timeout=40)
            assert again["events"] == first["events"]

            # The first batch holds what was written when it went out (on a loaded machine
            # perhaps only the first snapshot); the rest follow once it is acknowledged.
            def mine() -> list[Message]:
                return [e for e in relay.usage_events if e["token_id"] == record["id"]]

            def malformed() -> bool:
                return any(e["token_id"] is None and e["reason"] == "malformed"
                           for e in relay.usage_events)

            await wait_until(lambda: len(mine()) >= 3 and malformed(), 20)
            assert [e["result"] for e in mine()] == ["granted"] * 3  # each once, resend or not
            assert {e["protocol"] for e in mine()} == {"snapshot"}
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_camera_to_relay_on_demand_and_robust_to_a_misbehaving_relay(
        tmp_path: Path, rtsp_camera_factory: Factory) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, width=320, height=240, fps=15,
                                   gop=15, bitrate=300)
    async with FakeRelay() as relay:
        relay.clock_offset = 120.0  # the relay's clock is two minutes ahead
        secret = tmp_path / "publisher-token.secret"
        secret.write_text(relay.issue_publisher() + "\n")
        agent = await AgentProcess.start(tmp_path, [{"id": "door", "source": camera.url}],
                                         agent={"id": "nvr1"}, media={"idle_grace": 1.0},
                                         relay={"url": relay.url,
                                                "publisher_token_file": str(secret)})
        try:
            await relay.wait_agent(timeout=20)
            assert camera.total_connections == 0  # nothing is pulled before publish
            session = await relay.publish("door")
            await relay.wait_status(session, "live", timeout=20)
            frame = await relay.whip_frame(session)
            assert (frame.width, frame.height) == (320, 240)
            # A LAN viewer shares the same single pull.
            _, token = await agent.token("--camera", "door")
            viewer = WhepViewer(agent.base, "door", token)
            assert await viewer.connect() == 201
            await viewer.frame()
            assert camera.connected == 1
            # Garbage from the relay: the agent closes the channel (4009) and comes back,
            # and LAN viewing never stops.
            mark = len(relay.received)
            await relay.send_raw("{not json")
            await relay.wait_for("hello", since=mark, timeout=20)
            assert any(c.code == 4009 for c in relay.closed)
            await viewer.frame()
            # The relay asks again after the reconnect; unpublish, and the pull stops when the
            # last consumer (the viewer) has gone too.
            again = await relay.publish("door")
            await relay.wait_status(again, "live", timeout=20)
            await relay.unpublish(again)
            await relay.wait_whip_deleted(again)
            await viewer.delete()
            await viewer.close()
            await wait_until(lambda: camera.connected == 0, 15)
            assert camera.total_connections == 1
            assert any(e.get("event") == "clock_skew" for e in agent.log_events())
        finally:
            assert await agent.stop() == 0
