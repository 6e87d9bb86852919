"""An adopted camera follows an announcement only when the new address proves it is the same
device: the follower against the project's ONVIF device (real WS-Security checks) on two
loopback addresses, with a real state database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.access.db import db_path
from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.config import DiscoverySection
from agent.discovery.adopted import AdoptedCamera, AdoptedCameras, rtsp_auth_rule
from agent.discovery.follow import CameraFollower
from tests.support.onvif_device import OnvifDevice

PASSWORD = "door-Pw-1"
OLD, NEW = "127.0.0.1", "127.0.0.2"


@pytest.fixture
async def adopted(tmp_path: Path) -> AsyncIterator[AdoptedCameras]:
    store = await asyncio.to_thread(TokenStore, db_path(tmp_path), Site("site1", "acme"), 10,
                                    lambda: ())
    yield AdoptedCameras(store, tmp_path)
    await asyncio.to_thread(store.close)


async def adopt(adopted: AdoptedCameras, xaddr: str, *, serial: str | None) -> AdoptedCamera:
    camera = AdoptedCamera(id="door", identity="urn:uuid:door", method="onvif",
                           source=f"rtsp://{OLD}:8554/Streaming/Channels/101", username="admin",
                           xaddr=xaddr, serial=serial, home_network=f"{OLD}/32")
    return await asyncio.to_thread(adopted.add, camera, PASSWORD, taken=[], actor="test")


async def follow(adopted: AdoptedCameras, networks: list[str], camera: AdoptedCamera,
                 xaddr: str) -> AdoptedCamera:
    follower = CameraFollower(DiscoverySection(follow_networks=networks, probe_timeout=2),
                              adopted, None)
    await follower._follow(camera, [xaddr], None)
    return await asyncio.to_thread(adopted.get, camera.id)


async def test_a_camera_adopted_without_a_serial_records_it_then_moves_with_proof(
    adopted: AdoptedCameras
) -> None:
    """The migration: a camera adopted before serials were kept is asked where it was
    adopted; the same model and password at the new address then proves the move."""
    async with OnvifDevice("hikvision", password=PASSWORD, host=OLD) as old, \
            OnvifDevice("hikvision", password=PASSWORD, host=NEW,
                        stream_host=f"{NEW}:8554") as new:
        camera = await adopt(adopted, old.xaddr, serial=None)
        after = await follow(adopted, ["127.0.0.0/8"], camera, new.xaddr)
    assert after.serial == "DS-2CD2143G0-I20190312AAWRD12345678"
    assert after.source.startswith(f"rtsp://{NEW}:8554/") and after.xaddr == new.xaddr
    assert after.moved and after.pending is None
    assert rtsp_auth_rule(after) == "digest"  # moved: its password goes by Digest only


@pytest.mark.parametrize(("model", "password", "why"), [
    ("hikvision", "attacker-guess", "did not prove it is this camera"),
    ("dahua", PASSWORD, "another serial number"),
])
async def test_a_device_that_does_not_prove_itself_is_held(
    adopted: AdoptedCameras, model: str, password: str, why: str
) -> None:
    async with OnvifDevice(model, password=password, host=NEW) as impostor:
        camera = await adopt(adopted, "http://127.0.0.1:9/onvif/device_service",
                             serial="DS-2CD2143G0-I20190312AAWRD12345678")
        for _ in range(3):  # repeated announcements: one held move, one audit row
            after = await follow(adopted, ["127.0.0.0/8"], camera, impostor.xaddr)
    assert after.source == camera.source and not after.moved
    assert after.pending is not None and why in after.pending["reason"]
    rows = await asyncio.to_thread(adopted._store.read, lambda c: c.execute(
        "SELECT count(*) FROM audit WHERE event = 'camera.move_held'").fetchone()[0])
    assert rows == 1


async def test_outside_the_allowed_networks_nothing_is_asked(adopted: AdoptedCameras) -> None:
    async with OnvifDevice("hikvision", password=PASSWORD, host=NEW) as elsewhere:
        camera = await adopt(adopted, "http://127.0.0.1:9/onvif/device_service",
                             serial="DS-2CD2143G0-I20190312AAWRD12345678")
        after = await follow(adopted, [], camera, elsewhere.xaddr)  # default: its /32 home
        assert elsewhere.requests == []  # not even the unauthenticated clock question
    assert after.source == camera.source
    assert after.pending is not None and "outside the networks" in after.pending["reason"]
