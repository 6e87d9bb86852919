"""The agent's relay link against a faithful fake of TheRelay cloud (docs/relay-protocol.md).

The fake (tests/support/fake_relay.py) speaks the documented protocol over real sockets on
127.0.0.1; the agent is the real daemon. Every test ends with the fake's list of contract
violations empty.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.bench import bench_relay_sync
from tests.conftest import write_secret
from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.camera import RtspCamera, rtsp_camera_factory_fixture
from tests.support.fake_relay import FakeRelay, Message

__all__ = ["rtsp_camera_factory_fixture"]
Factory = Callable[..., RtspCamera]

SMALL = "testsrc://?size=320x240&fps=15&gop=1"


async def start_agent(tmp: Path, relay: FakeRelay, token: str, *,
                      cameras: tuple[str, ...] = ("cam1",), always: bool = False,
                      **extra: Any) -> AgentProcess:
    """The daemon with these test-pattern cameras, linked to the fake relay (or, with
    ``always``, publishing every camera to its WHIP template without a control channel)."""
    secret = tmp / "publisher-token.secret"
    write_secret(secret, token + "\n")
    section: dict[str, str] = {"publisher_token_file": str(secret)}
    section.update({"publish": "always", "whip_url_template": relay.whip_url_template}
                   if always else {"url": relay.url})
    return await AgentProcess.start(
        tmp, [{"id": c, "name": c.title(), "source": SMALL} for c in cameras],
        agent={"id": "nvr1", "account_id": "acme"}, relay=section, **extra)


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
            # v1.1 (1.3): the refusal is also the session's terminal publish.status.
            status = await relay.wait_status(message, "failed")
            assert status["error"]["code"] == "read_only"
            assert relay.whip_resource(message) is None
            await wait_until(lambda: any(e.get("event") == "relay_read_only"
                                         for e in agent.log_events()), 5)
        finally:
            assert await agent.stop() == 0  # the fake relay keeps serving
        assert relay.violations == []


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
            session = await relay.publish("cam1")
            await relay.wait_status(session, "live", timeout=20)
            mark = len(relay.received)
            await relay.close_agent(1001, "restart")
            hello = await relay.wait_for("hello", since=mark, timeout=20)
            assert hello["token_cursor"] == ack["cursor"]
            # v1.1 (section 3): the session the drop ended is reported after the welcome.
            await relay.wait_whip_deleted(session)
            stopped = await relay.wait_status(session, "stopped")
            assert stopped["error"]["code"] == "channel_lost"
            assert relay.received.index(stopped) > relay.received.index(hello)
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
        write_secret(secret, token + "\n")
        agent = await AgentProcess.start(
            tmp_path, [{"id": "cam1", "source": SMALL}, {"id": "cam2", "source": SMALL}],
            agent={"id": "nvr1"},
            relay={"publish": "always", "publisher_token_file": str(secret),
                   "whip_url_template": relay.whip_url_template, "always_cameras": ["cam2"]})
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
            sync = await relay.send_tokens([record])
            assert sync is not None
            await relay.wait_ack(sync)  # not any ack: the hello's sync is acknowledged too
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
        write_secret(secret, relay.issue_publisher() + "\n")
        agent = await AgentProcess.start(
            tmp_path, [{"id": "door", "source": camera.url}], agent={"id": "nvr1"},
            media={"idle_grace": 1.0},
            relay={"url": relay.url, "publisher_token_file": str(secret)})
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


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == name]


async def test_a_rejection_after_other_failures_is_still_said_once(tmp_path: Path) -> None:
    """The independent relay's finding: a relay restart, an overloaded relay, then 401
    token_revoked — one relay_rejected_agent error, no relay_unavailable for it."""
    async with FakeRelay() as relay:
        token = relay.issue_publisher(agent_id="nvr1")
        agent = await start_agent(tmp_path, relay, token)
        try:
            await relay.wait_agent(timeout=20)
            await relay.revoke_publisher(token, close=False)  # seen at the next upgrade
            relay.fail_upgrades(503)
            await relay.close_agent(1001, "restart")
            await wait_until(lambda: [a.status for a in relay.attempts[1:]] == [503, 401], 15)
            await wait_until(lambda: events(agent, "relay_rejected_agent"), 5)
            (rejected,) = events(agent, "relay_rejected_agent")
            assert rejected["level"] == "error" and rejected["reason"] == "token_revoked"
            assert "TheRelay Dashboard" in rejected["fix"] and rejected["retry_in_s"] >= 15
            unavailable = events(agent, "relay_unavailable")
            assert [e["error"] for e in unavailable] == [
                "the relay closed the connection (1001 going_away)",
                "the relay answered HTTP 503 (unavailable)"]
            assert token not in agent.log_path.read_text()
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_a_welcome_naming_another_agent_is_closed_4005(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        relay.welcome_agent_id = "nvr-elsewhere"
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            closed = await relay.wait_closed(timeout=20)
            assert (closed.code, closed.by_relay) == (4005, False)
            await wait_until(lambda: events(agent, "relay_rejected_agent"), 5)
            (rejected,) = events(agent, "relay_rejected_agent")
            assert rejected["reason"] == "agent_not_allowed" and "agent.id" in rejected["fix"]
            await asyncio.sleep(3)
            assert relay.connections == 1  # the next try is 15 s or more away
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_a_relay_that_never_welcomes(tmp_path: Path) -> None:
    """It accepts the upgrade and the hello, then says nothing: the agent says so, closes
    (4009), comes back, and LAN viewing never notices."""
    async with FakeRelay() as relay:
        relay.send_welcome = False
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            _, token = await agent.token("--camera", "cam1")
            closed = await relay.wait_closed(timeout=25)
            assert (closed.code, closed.by_relay) == (4009, False)
            await wait_until(lambda: events(agent, "relay_unavailable"), 5)
            (line,) = events(agent, "relay_unavailable")
            assert line["error"] == ("the relay accepted the connection but sent no welcome "
                                     "within 10 s")
            assert await snapshot_status(agent, token) == 200
            relay.send_welcome = True
            await relay.wait_agent(timeout=20)
            assert await snapshot_status(agent, token) == 200
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_bad_input_from_the_relay(tmp_path: Path) -> None:
    """A bad field is refused with an ack, the connection stays; a too-big message is the
    agent's own 1009, logged as such."""
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            await relay.wait_agent(timeout=20)
            bad = await relay.send("publish", session_id="s-1", whip_url="x" * 5000)
            ack = await relay.wait_ack(bad)
            assert ack["ok"] is False and ack["error"]["code"] == "invalid"
            unknown = await relay.send("ack", ack="never-sent", ok=True)
            assert unknown and relay.connections == 1
            pong = await relay.ping()  # the connection is still up
            assert pong["type"] == "pong" and relay.connections == 1
            mark = len(relay.closed)
            await relay.send_raw(json.dumps({"type": "ping", "id": "big",
                                             "pad": "x" * (2 << 20)}))
            closed = await relay.wait_closed(since=mark)
            assert (closed.code, closed.by_relay) == (1009, False)
            await wait_until(lambda: events(agent, "relay_unavailable"), 5)
            assert events(agent, "relay_unavailable")[0]["error"] == (
                "the agent closed the connection (1009 message_too_big)")
            await relay.wait_agent(timeout=20)
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_always_mode_republishes_within_5_s_after_the_whip_server_dies(
        tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay,
                                        relay.issue_publisher(), always=True)
        key = relay.always_session("nvr1", "cam1")
        try:
            await relay.whip_frame(key, timeout=20)
            loop = asyncio.get_running_loop()
            live_since = loop.time()
            await wait_until(lambda: events(agent, "whip_always_publishing"), 5)
            await asyncio.sleep(max(0.0, 10.5 - (loop.time() - live_since)))  # it had worked
            dead = relay.crash_whip(key)
            crashed = loop.time()
            await wait_until(lambda: (r := relay.whip_resource(key)) is not None
                             and r is not dead, 10)
            took = loop.time() - crashed
            print(f"republished {took:.2f} s after the WHIP peer died")
            assert took <= 5.0
            await relay.whip_frame(key, timeout=10)
            (lost,) = events(agent, "whip_always_lost")
            assert "sent nothing" in lost["error"]
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_a_sync_of_100000_tokens_keeps_the_event_loop_responsive() -> None:
    """The benchmark, in its own process (its loop is the one measured, not this test's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}  # no debug cost
    bench = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_relay_sync", "--json", env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(bench.communicate(), 300)
    assert bench.returncode == 0
    result = json.loads(out.decode().strip().splitlines()[-1])
    print(bench_relay_sync.report(bench_relay_sync.TOKENS, result))
    assert result["tokens"] >= 100_000
    # No event-loop step of the agent's work takes more than 50 ms; the wall-clock lag
    # (printed) adds this busy machine's waits for a CPU (docs/field-notes.md).
    assert result["longest_step_ms"] <= 50
    # The index keeps the tokens as rows the garbage collector does not track (it was
    # 300,000 objects, walked by every full collection: 0.1-0.5 s each).
    assert result["tracked_growth"] < 20_000
    assert result["seconds"] < 120 and result["rss_growth_mib"] < 1024


async def test_the_heartbeat_follows_welcome(tmp_path: Path) -> None:
    async with FakeRelay(heartbeat_s=5) as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher())
        try:
            await relay.wait_agent(timeout=20)
            await asyncio.sleep(11.5)
            link = relay._current()
            assert link is not None and link.welcomed_at is not None
            gaps = [b - a for a, b in zip([link.welcomed_at, *link.pings], link.pings,
                                          strict=False)]
            assert len(gaps) == 2 and all(4.5 <= g <= 6 for g in gaps), gaps  # not 20 s
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []


async def test_a_camera_removed_meanwhile_and_a_shutdown_end_their_sessions(
        tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher(),
                                        cameras=("cam1", "cam2"))
        try:
            await relay.wait_agent(timeout=20)
            doomed = await relay.publish("cam2")
            await relay.wait_status(doomed, "live", timeout=20)
            config = yaml.safe_load(agent.config_path.read_text())
            config["cameras"] = config["cameras"][:1]
            agent.config_path.write_text(yaml.safe_dump(config))
            agent.proc.send_signal(signal.SIGHUP)
            stopped = await relay.wait_status(doomed, "stopped", timeout=15)
            assert stopped["error"]["code"] == "camera_removed"
            await relay.wait_whip_deleted(doomed)
            await wait_until(lambda: "cam2" not in relay.cameras, 5)
            again = await relay.publish("cam2")
            failed = await relay.wait_status(again, "failed")
            assert failed["error"]["code"] == "unknown_camera"
            live = await relay.publish("cam1")
            await relay.wait_status(live, "live", timeout=20)
        finally:
            assert await agent.stop() == 0
        # Section 2: at shutdown the session is DELETEd and reported stopped.
        await relay.wait_whip_deleted(live)
        assert relay.statuses[live][-1]["state"] == "stopped"
        assert relay.violations == []


async def test_a_sync_can_neither_unrevoke_a_token_nor_change_its_hash(tmp_path: Path) -> None:
    async with FakeRelay() as relay:
        agent = await start_agent(tmp_path, relay, relay.issue_publisher(agent_id="nvr1"))
        try:
            await relay.wait_agent(timeout=20)
            text, record = relay.issue_access_token("host:nvr1")
            kept_text, kept = relay.issue_access_token("host:nvr1")
            forged_text, forged = relay.issue_access_token("host:nvr1")
            message = await relay.send_tokens([record, kept])
            assert message is not None and (await relay.wait_ack(message))["ok"] is True
            assert (await relay.wait_ack(await relay.revoke(record["id"])))["ok"] is True
            assert await snapshot_status(agent, text) == 401
            # A misbehaving relay lists the revoked token as active, and gives another token
            # id the hash of a different secret. Both are refused, the rest applied.
            refused_ids = []
            for _ in range(2):  # a repeat is refused again, but logged and audited once
                sync = await relay.send_tokens([
                    {**record, "revoked_at": None},
                    {**kept, "sha256": forged["sha256"], "last4": forged["last4"]},
                    {**forged, "id": forged["id"]}])
                assert sync is not None
                ack = await relay.wait_ack(sync)
                assert ack["ok"] is True and ack["cursor"] == relay.cursor
                refused_ids.append({r["token_id"]: r["code"] for r in ack["refused"]})
            assert refused_ids[0] == refused_ids[1] == {record["id"]: "revocation_final",
                                                        kept["id"]: "hash_changed"}
            assert await snapshot_status(agent, text) == 401
            assert await snapshot_status(agent, kept_text) == 200  # the original still works
            assert await snapshot_status(agent, forged_text) == 200  # under its own id only
            logged = [e for e in agent.log_events() if e.get("event") == "relay_sync_refused"]
            assert sorted((e["token_id"], e["reason"]) for e in logged) == sorted(
                [(record["id"], "revocation_final"), (kept["id"], "hash_changed")])
            audited = await agent.audit("--event", "token.sync_refused")
            assert sorted((e["token_id"], e["reason"], e["actor"]) for e in audited) == sorted(
                [(record["id"], "revocation_final", "relay"),
                 (kept["id"], "hash_changed", "relay")])
            # A relay token revoked on the agent itself stays revoked whatever the relay says.
            revoked = await agent.cli("token", "revoke", kept["id"])
            assert revoked.returncode == 0, revoked.stderr
            sync = await relay.send_tokens([kept], full=True)
            assert sync is not None
            ack = await relay.wait_ack(sync)
            assert {r["token_id"]: r["code"] for r in ack["refused"]} == {
                kept["id"]: "revocation_final"}
            assert await snapshot_status(agent, kept_text) == 401
        finally:
            assert await agent.stop() == 0
        assert relay.violations == []
