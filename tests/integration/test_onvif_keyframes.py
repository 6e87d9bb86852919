"""A viewer's keyframe request (RTCP PLI) reaches an adopted ONVIF camera as ONVIF Media
``SetSynchronizationPoint``, at most once per interval (agent/discovery/keyframes.py).

Real peers: the test ONVIF device (captured Hikvision answers, WS-Security checked), a
GStreamer RTSP camera behind it, the daemon, and an aiortc viewer sending RTCP by hand.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket

from agent.discovery.adopted import AdoptedCamera, AdoptedCameras
from agent.discovery.catalog import Sighting, short_id
from agent.discovery.keyframes import CameraKeyframes
from agent.discovery.onvif import OnvifError, set_synchronization_point
from agent.state.database import StateDB
from agent.state.db import db_path
from tests.conftest import write_secret
from tests.integration.test_webrtc_media import media_ssrc, send_rtcp
from tests.support.agent import AgentProcess, WhepViewer, wait_until
from tests.support.camera import (
    RtspCamera,
    rtsp_camera_factory_fixture,  # noqa: F401
)
from tests.support.onvif_device import OnvifDevice

USER = "installer"
PASSWORD = "c0rrect-h0rse"  # a camera password, not a token


def synchronizations(device: OnvifDevice) -> list[str | None]:
    """The profile tokens of the SetSynchronizationPoint requests the device accepted."""
    return [r.profile_token for r in device.requests
            if r.operation == "SetSynchronizationPoint" and r.authorized]


async def test_the_request_names_the_profile_and_carries_credentials() -> None:
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD) as device:
        await set_synchronization_point(device.xaddr, USER, PASSWORD, "Profile_2")
        assert synchronizations(device) == ["Profile_2"]
        assert all(r.reason in ("ok", "pre-auth") for r in device.requests)
        with pytest.raises(OnvifError):
            await set_synchronization_point(device.xaddr, USER, "wrong", "Profile_2")
        assert synchronizations(device) == ["Profile_2"]


async def test_a_camera_without_the_operation_is_a_clear_error() -> None:
    async with OnvifDevice("dahua", user=USER, password=PASSWORD) as device:
        with pytest.raises(OnvifError) as caught:
            await set_synchronization_point(device.xaddr, USER, PASSWORD, "Profile001")
    assert PASSWORD not in str(caught.value) and str(caught.value)


def _adopted(tmp_path: Path, device: OnvifDevice, camera_id: str) -> AdoptedCameras:
    adopted = AdoptedCameras(StateDB(tmp_path / "state.db"), tmp_path)
    adopted.credentials.mkdir(mode=0o700)
    write_secret(adopted.password_file(camera_id), PASSWORD + "\n")
    return adopted


async def test_many_requests_make_one_per_interval_and_a_refusal_is_said_once(
        tmp_path: Path) -> None:
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD) as hik, \
            OnvifDevice("dahua", user=USER, password=PASSWORD) as dahua:
        adopted = _adopted(tmp_path, hik, "door")
        write_secret(adopted.password_file("gate"), PASSWORD + "\n")
        keyframes = CameraKeyframes(adopted, interval=0.5)
        keyframes.set_cameras([
            AdoptedCamera("door", "urn:uuid:hik", "onvif", "rtsp://x/1", username=USER,
                          xaddr=hik.xaddr),
            AdoptedCamera("gate", "urn:uuid:dahua", "onvif", "rtsp://x/2", username=USER,
                          xaddr=dahua.xaddr),
            AdoptedCamera("lobby", "urn:uuid:mdns", "mdns", "rtsp://x/3"),  # not ONVIF
        ])
        assert not keyframes.asks("lobby") and not keyframes.request("lobby")
        started = [keyframes.request("door") for _ in range(100)]  # a PLI flood
        assert started.count(True) == 1
        await wait_until(lambda: keyframes.sent == 1, 5)
        assert not keyframes.request("door")  # done, but within the interval
        await asyncio.sleep(0.6)
        assert keyframes.request("door")
        await wait_until(lambda: keyframes.sent == 2, 5)
        assert synchronizations(hik) == ["Profile_1", "Profile_1"]  # main: the largest H.264
        assert [r.operation for r in hik.requests].count("GetProfiles") == 1  # token kept
        for _ in range(2):  # refused twice: a warning the first time only
            assert keyframes.request("gate")
            await wait_until(lambda: not keyframes._busy, 5)
            await asyncio.sleep(0.6)
        assert keyframes.sent == 2
        await keyframes.close()


async def test_a_viewers_pli_asks_the_adopted_onvif_camera_for_a_keyframe(
        tmp_path: Path, rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, width=320, height=240, fps=15,
                                     gop=10, path="/Streaming/Channels/101", user=USER,
                                     password=PASSWORD, auth="digest")
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD,
                           stream_host=f"127.0.0.1:{camera.port}") as device:
        agent = await AgentProcess.start(tmp_path, [])
        try:
            sighting = Sighting("urn:uuid:hik-door", methods=["onvif"], name="Door",
                                addresses=["127.0.0.1"], xaddrs=[device.xaddr])

            def remember() -> None:
                db = StateDB(db_path(agent.state_dir))
                AdoptedCameras(db, agent.state_dir).remember(
                    [(sighting.identity, sighting.to_dict())])
                db.close()
            await asyncio.to_thread(remember)
            password_file = tmp_path / "camera.password"
            write_secret(password_file, PASSWORD + "\n")
            adopt = await agent.cli("cameras", "adopt", short_id(sighting.identity), "--user",
                                    USER, "--password-file", str(password_file), "--id",
                                    "door", "--json")
            assert adopt.returncode == 0, adopt.stderr
            assert json.loads(adopt.stdout)["adopted"]["id"] == "door"
            _, token = await agent.token("--camera", "door")
            viewer = WhepViewer(agent.base, "door", token, audio=False)
            deadline = time.monotonic() + 10  # the daemon serves an adoption within a second
            while (status := await viewer.connect()) == 404 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert status == 201, viewer.body
            await viewer.frame()
            before = len(synchronizations(device))
            pli = bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=media_ssrc(viewer)))
            for _ in range(5):
                await send_rtcp(viewer, [pli])
                await asyncio.sleep(0.3)
            await wait_until(lambda: len(synchronizations(device)) > before, 5)
            await asyncio.sleep(0.5)
            assert synchronizations(device)[before:] == ["Profile_1"]  # once per interval
            await viewer.close()
        finally:
            assert await agent.stop() == 0
