"""The fake relay against docs/relay-protocol.md, driven by a minimal hand-written agent.

These tests prove the test peer itself (tests/support/fake_relay.py): the upgrade checks of
1.1, the envelope and session start of 1.2–1.3, acks and idempotency, tokens.sync/revoke
with cursors, the close codes of 1.6, and the WHIP endpoint of section 2 with real media.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import aiohttp
import av
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from agent.access.tokens import Kind, generate
from tests.conftest import remember
from tests.support.fake_relay import PROTOCOL, FakeRelay

AGENT = "nvr1"
CAMERA = {"id": "door", "name": "Front door", "state": "online", "error": None,
          "video": {"codec": "h264", "width": 160, "height": 120, "fps": 15}, "audio": None}


@pytest.fixture
async def relay() -> AsyncIterator[FakeRelay]:
    async with FakeRelay() as fake:
        fake.check_retries = False  # these clients reconnect at will
        yield fake


class Agent:
    """Just enough of an agent to speak the control channel by hand."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, type_: str, /, message_id: str | None = None, **fields: Any) -> str:
        mid = message_id or str(uuid.uuid4())
        await self.ws.send(json.dumps({"type": type_, "id": mid, "ts": time.time(), **fields}))
        return mid

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        assert isinstance(message, dict)
        return message

    async def expect(self, type_: str) -> dict[str, Any]:
        message = await self.recv()
        assert message["type"] == type_, message
        return message

    async def hello(self, agent_id: str = AGENT,
                    cursor: str | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
        """hello → welcome → tokens.sync → ack; (welcome, sync, hello id)."""
        hid = await self.send("hello", agent_id=agent_id, version="0.1.0",
                              capabilities=["whip", "tokens.sync.v1", "usage.v1"],
                              token_cursor=cursor, cameras=[CAMERA])
        welcome = await self.expect("welcome")
        sync = await self.expect("tokens.sync")
        await self.ack(sync, cursor=sync["cursor"])
        return welcome, sync, hid

    async def ack(self, message: dict[str, Any], ok: bool = True, **fields: Any) -> str:
        return await self.send("ack", ack=message["id"], ok=ok, **fields)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the relay closes; its close code and reason."""
        async def drain() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await self.ws.recv()
        await asyncio.wait_for(drain(), timeout)
        return self.ws.close_code, self.ws.close_reason


async def open_agent(relay: FakeRelay, token: str | None, *,
                     subprotocols: tuple[str, ...] = (PROTOCOL,)) -> Agent:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    ws = await connect(relay.url, subprotocols=[Subprotocol(p) for p in subprotocols] or None,
                       additional_headers=headers, user_agent_header="therelay-agent/0.1.0",
                       open_timeout=5, close_timeout=2)
    return Agent(ws)


async def refusal(relay: FakeRelay, token: str | None,
                  subprotocols: tuple[str, ...] = (PROTOCOL,)) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as refused:
        await open_agent(relay, token, subprotocols=subprotocols)
    response = refused.value.response
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body)


# ---- 1.1 connecting ---------------------------------------------------------------------

async def test_session_start_hello_welcome_sync_ack(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    _, record = relay.issue_access_token("camera:door", ["webrtc"], label="guard")
    agent = await open_agent(relay, token)
    assert agent.ws.subprotocol == PROTOCOL
    welcome, sync, hid = await agent.hello()
    assert welcome["ack"] == hid
    assert {k: welcome[k] for k in ("account_id", "agent_id", "permission", "token_scope",
                                    "ice_servers", "heartbeat_s")} == {
        "account_id": "acme", "agent_id": AGENT, "permission": "publish",
        "token_scope": "agent", "ice_servers": [], "heartbeat_s": 20}
    assert abs(welcome["server_time"] - time.time()) < 5
    assert isinstance(welcome["id"], str) and isinstance(welcome["ts"], float)
    assert sync["full"] is True and sync["tokens"] == [record]
    ack = await relay.wait_ack(sync["id"])
    assert ack["ok"] is True and relay.agent_cursor == sync["cursor"]
    assert relay.received[0]["type"] == "hello" and relay.cameras == {"door": CAMERA}
    assert (await relay.wait_agent())["id"] == hid
    assert relay.connections == 1 and relay.open_connections == 1
    assert relay.attempts[-1].status == 101
    await agent.ws.close()
    closed = await relay.wait_closed()
    assert closed.code == 1000 and not closed.by_relay and closed.agent_id == AGENT
    assert relay.violations == []


async def test_account_level_and_read_only_tokens(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher(permission="read"))
    welcome, _, _ = await agent.hello("any-agent")
    assert (welcome["agent_id"], welcome["permission"], welcome["token_scope"]) == (
        "any-agent", "read", "account")
    await agent.ws.close()


@pytest.mark.parametrize("case", ["unknown", "malformed", "corrupted", "access", "none",
                                  "expired", "revoked"])
async def test_bad_publisher_tokens_are_refused_with_401(relay: FakeRelay, case: str) -> None:
    token: str | None = relay.issue_publisher(agent_id=AGENT, expired=case == "expired",
                                              revoked=case == "revoked")
    if case == "unknown":
        token = generate(Kind.PUBLISHER).text
        remember(token)
    elif case == "malformed":
        token = "trp_nonsense"
    elif case == "corrupted":
        assert token is not None
        token = token[:-1] + ("A" if token[-1] != "A" else "B")
    elif case == "access":
        token, _ = relay.issue_access_token("host:nvr1")
    elif case == "none":
        token = None
    status, body = await refusal(relay, token)
    expected = {"expired": "token_expired", "revoked": "token_revoked"}.get(case,
                                                                         "token_invalid")
    assert status == 401 and body["error"] == expected and body["message"]
    assert relay.attempts[-1].error == expected and relay.connections == 0


@pytest.mark.parametrize("offered", [(), ("therelay.agent.v0",)])
async def test_no_common_subprotocol_is_refused_with_426(relay: FakeRelay,
                                                         offered: tuple[str, ...]) -> None:
    status, body = await refusal(relay, relay.issue_publisher(), subprotocols=offered)
    assert status == 426 and body["error"] == "version_unsupported"
    assert PROTOCOL in body["message"]


async def test_forced_refusals_then_success(relay: FakeRelay) -> None:
    token = relay.issue_publisher()
    relay.fail_upgrades(503, times=1)
    relay.fail_upgrades(403, "agent_not_allowed")
    assert (await refusal(relay, token))[0] == 503
    assert await refusal(relay, token) == (403, {"error": "agent_not_allowed",
                                                 "message": "agent_not_allowed"})
    agent = await open_agent(relay, token)
    await agent.hello()
    await agent.ws.close()


# ---- 1.2, 1.6 envelope and close codes --------------------------------------------------

@pytest.mark.parametrize("frame", [
    "{not json", "[1, 2]", json.dumps({"id": "x", "ts": 1.0}),
    json.dumps({"type": "hello", "ts": 1.0, "agent_id": AGENT}),
    json.dumps({"type": "hello", "id": "x", "agent_id": AGENT}),
    json.dumps({"type": "usage", "id": "x", "ts": 1.0, "batch": "b", "events": []}),  # order
])
async def test_invalid_envelopes_and_wrong_order_close_4009(relay: FakeRelay,
                                                            frame: str) -> None:
    agent = await open_agent(relay, relay.issue_publisher())
    await agent.ws.send(frame)
    assert await agent.closed() == (4009, "protocol_error")
    closed = await relay.wait_closed()
    assert closed.code == 4009 and closed.by_relay


async def test_garbage_after_the_session_started_closes_4009(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher())
    await agent.hello()
    await agent.ws.send(b"\x00binary")
    assert await agent.closed() == (4009, "protocol_error")
    assert relay.invalid_frames == [b"\x00binary"]


async def test_oversized_message_closes_1009(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher())
    await agent.hello()
    await agent.send("cameras.update", cameras=[], removed=["x" * 2**20])
    assert (await agent.closed())[0] == 1009


async def test_agent_id_other_than_the_bound_one_closes_4005(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher(agent_id="nvr-lobby"))
    await agent.send("hello", agent_id="nvr-garage", version="0.1.0", capabilities=[],
                     token_cursor=None, cameras=[])
    assert await agent.closed() == (4005, "agent_not_allowed")


async def test_second_connection_for_an_agent_id_replaces_the_first(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    first = await open_agent(relay, token)
    await first.hello()
    second = await open_agent(relay, token)
    await second.hello()
    assert await first.closed() == (4008, "replaced")
    assert relay.open_connections == 1
    await second.ws.close()


async def test_publisher_revoked_mid_session_closes_4003(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    await agent.hello()
    await relay.revoke_publisher(token)
    assert await agent.closed() == (4003, "token_revoked")
    assert (await relay.wait_closed()).code == 4003
    assert await refusal(relay, token) == (401, {"error": "token_revoked",
                                                 "message": "the publisher token was revoked"})


async def test_close_agent_with_any_code(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher())
    await agent.hello()
    await relay.close_agent(1001, "going away")
    assert await agent.closed() == (1001, "going away")


# ---- 1.4, 1.5 steady state ----------------------------------------------------------------

async def test_acks_idempotency_unknown_types_and_ping(relay: FakeRelay) -> None:
    agent = await open_agent(relay, relay.issue_publisher())
    await agent.hello()
    mid = await agent.send("cameras.update", cameras=[dict(CAMERA, state="offline")],
                           removed=[])
    assert (await agent.expect("ack"))["ack"] == mid
    await agent.send("cameras.update", message_id=mid, cameras=[], removed=["door"])
    again = await agent.expect("ack")
    assert again["ack"] == mid and again["ok"] is True
    assert relay.cameras["door"]["state"] == "offline"  # the repeat was not applied
    assert [d["id"] for d in relay.duplicates] == [mid]
    mid = await agent.send("cameras.rename", camera="door")
    ack = await agent.expect("ack")
    assert ack["ack"] == mid and ack["ok"] is False and ack["error"]["code"] == "unsupported"
    pid = await agent.send("ping", ping="p1")
    assert (await agent.expect("pong"))["ping"] == pid
    ping = asyncio.ensure_future(relay.ping())
    message = await agent.expect("ping")
    await agent.send("pong", ping=message["id"])
    assert (await ping)["ping"] == message["id"]
    await agent.ws.close()
    assert relay.violations == []


async def test_usage_batches_are_acked_or_left_for_a_resend(relay: FakeRelay) -> None:
    token = relay.issue_publisher()
    event = {"token_id": None, "ts": time.time(), "camera": "door", "protocol": "webrtc",
             "ip": "192.168.1.23", "result": "denied", "reason": "unknown"}
    relay.ack_usage = False
    agent = await open_agent(relay, token)
    await agent.hello()
    await agent.send("usage", batch="b-1", events=[event])
    await relay.wait_for("usage")
    await agent.ws.close()
    relay.ack_usage = True
    agent = await open_agent(relay, token)
    await agent.hello()
    mid = await agent.send("usage", batch="b-1", events=[event])  # the resend
    assert (await agent.expect("ack"))["ack"] == mid
    assert relay.usage_events == [event] and list(relay.usage_batches) == ["b-1"]
    assert len([m for m in relay.received if m["type"] == "usage"]) == 2
    await agent.ws.close()


async def test_tokens_sync_revoke_and_cursor(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    _, first, _ = await agent.hello()
    assert first["tokens"] == []
    text, record = relay.issue_access_token("camera:door", ["webrtc"], label="guard")
    assert record["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert record["last4"] == text[-4:] and record["id"] == text[4:16]
    sid = await relay.send_tokens([record])
    assert sid is not None
    sync = await agent.expect("tokens.sync")
    assert sync["id"] == sid and sync["full"] is False and sync["tokens"] == [record]
    assert text not in json.dumps(sync)  # only the hash crosses the channel
    await agent.ack(sync, cursor=sync["cursor"])
    assert (await relay.wait_ack(sid))["cursor"] == sync["cursor"] == relay.agent_cursor
    rid = await relay.revoke(record["id"])
    revoke = await agent.expect("tokens.revoke")
    assert revoke["id"] == rid and revoke["token_id"] == record["id"]
    assert abs(revoke["revoked_at"] - time.time()) < 5
    await agent.ack(revoke)
    assert (await relay.wait_ack(rid))["ok"] is True
    await agent.ws.close()
    # Reconnecting with the acked cursor: only what changed since (the revocation).
    agent = await open_agent(relay, token)
    _, since, _ = await agent.hello(cursor=sync["cursor"])
    assert since["full"] is False
    assert [(t["id"], t["revoked_at"]) for t in since["tokens"]] == [
        (record["id"], revoke["revoked_at"])]
    await agent.ws.close()
    # A full replacement cannot be expressed since an older cursor: full again.
    await relay.send_tokens([], full=True)
    agent = await open_agent(relay, token)
    _, full, _ = await agent.hello(cursor=since["cursor"])
    assert full["full"] is True and full["tokens"] == []
    await agent.ws.close()
    assert relay.violations == []


async def test_unacked_publish_is_repeated_after_a_reconnect(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    await agent.hello()
    sid = await relay.publish("door")
    publish = await agent.expect("publish")
    assert publish["session_id"] == sid and publish["camera_id"] == "door"
    assert publish["whip_url"] == f"{relay.whip_base}/{sid}" and publish["bearer"] is None
    await agent.ws.close()
    agent = await open_agent(relay, token)
    await agent.hello()
    again = await agent.expect("publish")
    assert again["id"] == publish["id"]
    await agent.ack(again)
    await relay.wait_ack(publish["id"])
    await agent.send("publish.status", session_id=sid, state="starting", error=None)
    await agent.expect("ack")
    assert (await relay.wait_status(sid, "starting"))["session_id"] == sid
    uid = await relay.unpublish(sid)
    assert (await agent.expect("unpublish"))["id"] == uid
    await agent.ws.close()


# ---- 2 WHIP ----------------------------------------------------------------------------

class Pattern(VideoStreamTrack):
    """Small changing grey frames."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(160, 120, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([(self.count * 8) % 256]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, Fraction(time_base.numerator, time_base.denominator)
        self.count += 1
        return frame


async def sendonly_offer() -> RTCPeerConnection:
    """An H.264 sendonly offer with its candidates gathered, like the agent's."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver(Pattern(), direction="sendonly")
    capabilities = RTCRtpSender.getCapabilities("video")
    transceiver.setCodecPreferences(
        [c for c in capabilities.codecs if c.mimeType in ("video/H264", "video/rtx")])
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def post(url: str, token: str, sdp: str,
               content_type: str = "application/sdp") -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.post(
            url, data=sdp, allow_redirects=False,
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type,
                     "User-Agent": "therelay-agent/0.1.0"}) as r:
        return r.status, dict(r.headers), await r.text()


async def call(method: str, url: str, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.request(
            method, url, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_whip_publish_delivers_decoded_frames(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    await agent.hello()
    sid = await relay.publish("door")
    publish = await agent.expect("publish")
    await agent.ack(publish)
    pc = await sendonly_offer()
    try:
        offer = pc.localDescription.sdp
        assert (await post(publish["whip_url"], "nope", offer))[0] == 401
        assert (await post(publish["whip_url"], token, offer, "text/plain"))[0] == 415
        assert (await post(f"{relay.whip_base}/s-unknown", token, offer))[0] == 404
        status, headers, answer = await post(publish["whip_url"], token, offer)
        assert status == 201 and headers["Content-Type"] == "application/sdp"
        location = headers["Location"]
        assert location.startswith(f"/whip/{sid}/resource/")
        assert "a=recvonly" in answer and "H264" in answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        frame = await relay.whip_frame(sid)
        assert (frame.width, frame.height) == (160, 120)
        assert isinstance(await relay.whip_frame(sid), av.VideoFrame)  # a fresh one
        resource = relay.whip_resource(sid)
        assert resource is not None and resource.bearer == token
        base = relay.whip_base.removesuffix("/whip")
        assert await call("PATCH", base + location, token) == 405
        assert await call("DELETE", base + location, "nope") == 401
        assert await call("DELETE", base + location, token) == 200
        assert (await relay.wait_whip_deleted(sid)).pc.connectionState == "closed"
        assert await call("DELETE", base + location, token) == 404
    finally:
        await pc.close()
    await agent.ws.close()
    assert relay.violations == []


async def test_whip_redirect_and_publish_bearer(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    await agent.hello()
    bearer = generate(Kind.ACCESS).text
    sid = await relay.publish("door", bearer=bearer)
    publish = await agent.expect("publish")
    assert publish["bearer"] == bearer
    relay.whip_redirect = True
    relay.whip_ice_servers = [{"urls": ["turn:127.0.0.1:3478"], "username": "u",
                               "credential": "c"}]
    pc = await sendonly_offer()
    try:
        offer = pc.localDescription.sdp
        status, headers, _ = await post(publish["whip_url"], bearer, offer)
        assert status == 307 and headers["Location"] == f"/whip/{sid}/hop/1"
        target = relay.whip_base.removesuffix("/whip") + headers["Location"]
        assert (await post(target, token, offer))[0] == 401  # the publish bearer, only it
        status, headers, _ = await post(target, bearer, offer)
        assert status == 201
        assert headers["Link"].startswith('<turn:127.0.0.1:3478>; rel="ice-server"')
    finally:
        await pc.close()
    await agent.ws.close()


async def test_always_mode_path_checks_the_publisher_binding(relay: FakeRelay) -> None:
    token = relay.issue_publisher(agent_id=AGENT)
    other = relay.issue_publisher(agent_id="nvr2")
    url = relay.whip_url_template.format(agent_id=AGENT, camera_id="door")
    pc = await sendonly_offer()
    try:
        offer = pc.localDescription.sdp
        assert (await post(url, other, offer))[0] == 403
        status, headers, _ = await post(url, token, offer)
        assert status == 201
        key = relay.always_session(AGENT, "door")
        assert headers["Location"].startswith(f"/whip/{key}/resource/")
        assert relay.whip_resource(key) is not None
    finally:
        await pc.close()


async def test_contract_breaches_are_listed_as_violations(relay: FakeRelay) -> None:
    token = relay.issue_publisher()
    agent = await open_agent(relay, token)
    await agent.hello()
    leaked = dict(CAMERA, source="rtsp://admin:pw@10.0.0.9/stream")
    await agent.send("cameras.update", cameras=[leaked], removed=[], note=token)
    await agent.expect("ack")
    await agent.send("publish.status", session_id="s-x", state="failed", error=None)
    await agent.expect("ack")
    _, record = relay.issue_access_token("camera:door")
    sid = await relay.send_tokens([record])
    assert sid is not None
    sync = await agent.expect("tokens.sync")
    await agent.ack(sync, cursor=sync["cursor"], refused=[{"token_id": record["id"],
                                                          "code": "because"}])
    await relay.wait_ack(sid)
    await agent.ws.close()
    text = "\n".join(relay.violations)
    assert "malformed refused list" in text
    assert "a token crossed the control channel" in text and token not in text
    assert "URL with credentials" in text and "carries ['source']" in text
    assert "failed without error" in text


async def test_the_v1_1_rules_on_the_agent_are_checked(relay: FakeRelay) -> None:
    """Each rule the fake checks on a real agent fires when a client breaks it."""
    relay.expect_within = 0.5
    token = relay.issue_publisher(agent_id=AGENT)
    agent = await open_agent(relay, token)
    await agent.hello()
    await (await agent.ws.ping())  # a ping frame at once, not heartbeat_s after welcome
    # An online camera without video; an update that changes nothing.
    await agent.send("cameras.update", cameras=[dict(CAMERA, video=None)], removed=[])
    await agent.expect("ack")
    await agent.send("cameras.update", cameras=[dict(CAMERA, video=None)], removed=[])
    await agent.expect("ack")
    # A refused publish without publish.status failed; an accepted one never reported
    # stopped after the channel dropped.
    await relay.publish("door")
    await agent.ack(await agent.expect("publish"), ok=False,
                    error={"code": "read_only", "message": "read-only"})
    running = await relay.publish("door")
    await agent.ack(await agent.expect("publish"))
    await relay.wait_ack(relay.sessions[running].publish_id or "")
    await agent.ws.close()
    await relay.wait_closed()
    # A retry 0 s after an ordinary failure (the close), then the reconnect's silence.
    relay.check_retries = True
    agent = await open_agent(relay, token)
    await agent.hello()
    # A WHIP POST without the agent's User-Agent.
    async with aiohttp.ClientSession() as http, http.post(
            relay.sessions[running].whip_url, data="v=0",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/sdp",
                     "User-Agent": "curl/8"}) as r:
        await r.read()
    await asyncio.sleep(1.0)
    await agent.ws.close()
    # A welcome naming another agent id, which the client ignores (it acks the sync).
    relay.check_retries = False
    relay.welcome_agent_id = "someone-else"
    agent = await open_agent(relay, token)
    await agent.hello()
    await agent.ws.close()
    await relay.wait_closed(since=2)
    text = "\n".join(relay.violations)
    for expected in ("online with video null", "did not change",
                     "refused (read_only) without publish.status failed",
                     f"session {running}, running when the control channel dropped",
                     "retry after an ordinary failure (attempt 1) came after",
                     "WHIP POST: User-Agent 'curl/8'", "sent ack after a welcome naming",
                     "did not close with 4005", "(heartbeat_s 20)"):
        assert expected in text, (expected, text)
