"""query_device against the captured-answer ONVIF device (tests/support/onvif_device.py).

Everything listens on 127.0.0.1 only. Each test also checks that the query left no aiohttp
session or connection open (the loop's exception handler would report it when collected).
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.discovery.onvif import (
    NotOnvifError,
    OnvifAuthError,
    OnvifProtocolError,
    OnvifTimeoutError,
    OnvifUnreachableError,
    choose_profile,
    query_device,
)
from tests.conftest import write_secret
from tests.support.camera import (
    RtspCamera,
    needs_rtsp_server,
    rtsp_camera_factory_fixture,  # noqa: F401
)
from tests.support.netns import free_port
from tests.support.onvif_device import ENTITY_BOMB, PASSWORD_DIGEST, WSSE, WSU, OnvifDevice

USER = "installer"
PASSWORD = "c0rrect-h0rse"  # a camera password, not a token
STREAM = "127.0.0.1:18554"


@pytest.fixture(autouse=True)
async def _loop_exceptions() -> AsyncIterator[list[str]]:
    """What the test's loop was told (an unclosed aiohttp session says so when collected)."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(str(context.get("message"))))
    yield seen
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not seen, seen


@pytest.fixture(autouse=True)
def _no_unclosed_sessions(_loop_exceptions: list[str]) -> Iterator[None]:
    yield
    # Between the test and the check above, outside the loop: a full collection of the test
    # process's heap takes a quarter of a second or more (in a thread it still holds the GIL).
    gc.collect()


EXPECTED: dict[str, dict[str, Any]] = {
    "hikvision": {
        "identity": ("HIKVISION", "DS-2CD2143G0-I", "V5.5.82 build 190220",
                     "DS-2CD2143G0-I20190312AAWRD12345678", "88"),
        "profiles": [
            ("Profile_1", "mainStream", "H264", 1920, 1080, 10.0, 16384,
             f"rtsp://{STREAM}/Streaming/Channels/101?transportmode=unicast&profile=Profile_1",
             "/onvif-http/snapshot?Profile_1"),
            ("Profile_2", "subStream", "H264", 640, 360, 25.0, 768,
             f"rtsp://{STREAM}/Streaming/Channels/102?transportmode=unicast&profile=Profile_2",
             "/onvif-http/snapshot?Profile_2"),
        ],
        "auth_status": 401,
        "operations": ["GetSystemDateAndTime", "GetServices", "GetDeviceInformation"],
    },
    "dahua": {
        "identity": ("Dahua", "IPC-HDW1230S", "2.800.0000000.16.R, Build Date 2020-06-04",
                     "5L0AB12PAZ12345", "1.00"),
        "profiles": [
            ("Profile000", "Profile000", "H265", 1920, 1080, 1.0, 1536,
             f"rtsp://{STREAM}/cam/realmonitor?channel=1&subtype=0&unicast=true&proto=Onvif",
             "/onvifsnapshot/media_service/snapshot?channel=1&subtype=0"),
            ("Profile001", "Profile001", "H264", 704, 576, 15.0, 512,
             f"rtsp://{STREAM}/cam/realmonitor?channel=1&subtype=1&unicast=true&proto=Onvif",
             "/onvifsnapshot/media_service/snapshot?channel=1&subtype=1"),
        ],
        "auth_status": 400,
        # no GetServices on this firmware: the fallback to GetCapabilities
        "operations": ["GetSystemDateAndTime", "GetServices", "GetCapabilities",
                       "GetDeviceInformation"],
    },
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
async def test_each_model_gives_identity_profiles_and_uris(model: str) -> None:
    want = EXPECTED[model]
    async with OnvifDevice(model, user=USER, password=PASSWORD, stream_host=STREAM) as dev:
        device = await query_device(dev.xaddr, USER, PASSWORD)
        http_host = f"127.0.0.1:{dev.port}"
    assert device.xaddr == dev.xaddr
    assert (device.manufacturer, device.model, device.firmware, device.serial,
            device.hardware_id) == want["identity"]
    got = [(p.token, p.name, p.encoding, p.width, p.height, p.fps, p.bitrate_kbps, p.stream_uri,
            p.snapshot_uri) for p in device.profiles]
    assert got == [(*p[:8], f"http://{http_host}{p[8]}") for p in want["profiles"]]
    assert ("http://www.onvif.org/ver10/media/wsdl", f"http://{http_host}/onvif/"
            + ("Media" if model == "hikvision" else "media_service")) in device.services
    assert abs(device.clock_offset_s) < 2
    ops = dev.operations()
    assert ops[: len(want["operations"])] == want["operations"]
    assert ops.count("GetStreamUri") == ops.count("GetSnapshotUri") == 2
    # The clock is read without credentials; everything else carried a valid digest.
    assert dev.requests[0].reason == "pre-auth"
    assert all(r.reason == "ok" for r in dev.requests[1:])


@pytest.mark.parametrize("model", sorted(EXPECTED))
async def test_wrong_password_is_an_auth_error_without_the_password(model: str) -> None:
    async with OnvifDevice(model, user=USER, password=PASSWORD, stream_host=STREAM) as dev:
        with pytest.raises(OnvifAuthError) as caught:
            await query_device(dev.xaddr, USER, "wrong-" + PASSWORD)
    message = str(caught.value)
    assert "rejected the user name or password" in message
    assert PASSWORD not in message
    assert f"127.0.0.1:{dev.port}" in message
    # Two refused requests: the library takes a refused GetServices for "not supported" and
    # asks GetCapabilities. Cameras lock an account out after a few: no more than that.
    assert [r.reason for r in dev.requests if not r.authorized] == ["wrong digest"] * 2


async def test_unknown_user_and_no_credentials_are_auth_errors() -> None:
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD, stream_host=STREAM) as dev:
        with pytest.raises(OnvifAuthError):
            await query_device(dev.xaddr, "admin", PASSWORD)
        with pytest.raises(OnvifAuthError):
            await query_device(dev.xaddr, None, None)
    refused = [r.reason for r in dev.requests if not r.authorized]
    assert refused == ["wrong digest"] * 2 + ["no token"] * 2


@pytest.mark.parametrize("offset", [7200.0, -7200.0])
async def test_camera_clock_two_hours_off_still_works(offset: float) -> None:
    async with OnvifDevice("dahua", user=USER, password=PASSWORD, stream_host=STREAM,
                           clock_offset=offset, max_skew=5.0) as dev:
        device = await query_device(dev.xaddr, USER, PASSWORD)
    assert abs(device.clock_offset_s - offset) < 2
    assert len(device.profiles) == 2
    assert all(r.reason in ("ok", "pre-auth") for r in dev.requests)


async def test_the_device_really_rejects_a_stale_created() -> None:
    """Without the offset, the right password is refused by a camera two hours ahead."""
    import base64
    import datetime as dt
    import hashlib
    import os

    nonce = os.urandom(16)
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD, stream_host=STREAM,
                           clock_offset=7200.0) as dev, aiohttp.ClientSession() as http:
        statuses = []
        for skew in (0.0, 7200.0):
            created = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=skew)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
            digest = base64.b64encode(hashlib.sha1(nonce + created.encode()
                                                   + PASSWORD.encode()).digest()).decode()
            body = (
                f'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Header>'
                f'<wsse:Security xmlns:wsse="{WSSE}" xmlns:wsu="{WSU}"><wsse:UsernameToken>'
                f"<wsse:Username>{USER}</wsse:Username>"
                f'<wsse:Password Type="{PASSWORD_DIGEST}">{digest}</wsse:Password>'
                f"<wsse:Nonce>{base64.b64encode(nonce).decode()}</wsse:Nonce>"
                f"<wsu:Created>{created}</wsu:Created></wsse:UsernameToken></wsse:Security>"
                '</s:Header><s:Body><GetDeviceInformation xmlns="http://www.onvif.org/ver10/'
                'device/wsdl"/></s:Body></s:Envelope>'
            )
            async with http.post(dev.xaddr, data=body) as response:
                statuses.append((response.status, "NotAuthorized" in await response.text()))
    assert statuses == [(401, True), (200, False)]
    assert [r.reason for r in dev.requests] == ["stale created", "ok"]


@pytest.mark.parametrize("status", [200, 404])
async def test_a_plain_web_server_is_not_onvif(status: int) -> None:
    async def page(_request: web.Request) -> web.Response:
        return web.Response(status=status, text="<html><body>Router login</body></html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with pytest.raises(NotOnvifError, match="is not an ONVIF device"):
            await query_device(f"127.0.0.1:{port}", USER, PASSWORD)
    finally:
        await runner.cleanup()


async def test_a_closed_port_is_unreachable() -> None:
    port = free_port()
    refused = r"cannot connect to 127\.0\.0\.1:\d+ \(Connection refused\)"
    with pytest.raises(OnvifUnreachableError, match=refused):
        await query_device(f"http://127.0.0.1:{port}/onvif/device_service", USER, PASSWORD)


async def test_a_server_that_never_answers_times_out_within_the_timeout() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing, keep the connection open

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(OnvifTimeoutError, match=r"did not answer within 1\.5 s"):
            await query_device(f"127.0.0.1:{port}", USER, PASSWORD, timeout=1.5)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    elapsed = time.monotonic() - started
    print(f"timeout 1.5 s raised after {elapsed:.2f} s")
    assert elapsed < 1.5 + 1.0  # bounded by the caller's timeout, not the library's 90 s


async def test_an_entity_bomb_is_refused_unexpanded() -> None:
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD, stream_host=STREAM,
                           hostile=True) as dev:
        with pytest.raises(OnvifProtocolError, match="entity declarations"):
            await query_device(dev.xaddr, USER, PASSWORD)
    assert b"&lol9;" in ENTITY_BOMB


@needs_rtsp_server
async def test_the_stream_uri_plays(rtsp_camera_factory: Callable[..., RtspCamera]) -> None:
    camera = await asyncio.to_thread(rtsp_camera_factory, width=320, height=240, fps=15,
                                     path="/Streaming/Channels/102")
    stream_host = f"127.0.0.1:{camera.port}"
    async with OnvifDevice("hikvision", user=USER, password=PASSWORD,
                           stream_host=stream_host) as dev:
        device = await query_device(dev.xaddr, USER, PASSWORD)
    uri = choose_profile(device, "sub").stream_uri
    assert uri == (f"rtsp://{stream_host}/Streaming/Channels/102"
                   "?transportmode=unicast&profile=Profile_2")
    ffprobe = shutil.which("ffprobe")
    assert ffprobe
    proc = await asyncio.create_subprocess_exec(
        ffprobe, "-v", "error", "-rtsp_transport", "tcp", "-timeout", "5000000",
        "-show_entries", "stream=codec_name,width,height", "-of", "csv=p=0", uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "h264,320,240"


async def test_the_device_runs_as_a_subprocess(tmp_path: Path) -> None:
    password_file = tmp_path / "camera-password.secret"
    write_secret(password_file, PASSWORD + "\n")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.onvif_device", "--model", "dahua",
        "--port", str(port), "--user", USER, "--password-file", str(password_file),
        "--stream-host", STREAM, "--clock-offset", "-3600",
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line == f"READY http://127.0.0.1:{port}/onvif/device_service"
        device = await query_device(line.split()[1], USER, PASSWORD)
        assert device.manufacturer == "Dahua"
        assert abs(device.clock_offset_s + 3600) < 2
        assert choose_profile(device, "main").token == "Profile001"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
