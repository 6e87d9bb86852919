"""Pure media helpers: H.264 bytes, source options, credentials, clocks, ICE choices."""

from __future__ import annotations

from pathlib import Path

import aioice.ice
import aiortc.clock
import av.error
import pytest

from agent.config import IceServerConfig, WebrtcSection, load
from agent.errors import ConfigError, SourceError
from agent.media.audio import webrtc_audio_codec
from agent.media.sources.pyav import describe_error, with_credentials
from agent.media.sources.testsrc import parse_options
from agent.media.stream import annexb_parameter_sets, nal_types, with_parameter_sets
from agent.webrtc import ice, speedups
from tests.conftest import write_secret

SPS = bytes([0x67, 0x42, 0xC0, 0x1E, 0xDA, 0x02, 0x80])
PPS = bytes([0x68, 0xCE, 0x3C, 0x80])
IDR = bytes([0x65, 0x88, 0x84, 0x00])
START = b"\x00\x00\x00\x01"


def avcc(sps: bytes, pps: bytes) -> bytes:
    return (bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps
            + bytes([1]) + len(pps).to_bytes(2, "big") + pps)


def test_parameter_sets_from_avcc_and_annexb() -> None:
    assert annexb_parameter_sets(avcc(SPS, PPS)) == START + SPS + START + PPS
    assert annexb_parameter_sets(START + SPS + START + PPS) == START + SPS + START + PPS
    assert annexb_parameter_sets(None) == b""
    assert annexb_parameter_sets(b"\x02junk") == b""


def test_keyframes_without_sps_get_them_and_others_are_untouched() -> None:
    sets = START + SPS + START + PPS
    bare = START + IDR
    assert nal_types(bare) == {5}
    assert with_parameter_sets(bare, sets) == sets + bare
    assert nal_types(sets + bare) == {5, 7, 8}
    assert with_parameter_sets(sets + bare, sets) == sets + bare  # already there
    assert with_parameter_sets(bare, b"") == bare  # nothing known to add


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("testsrc://", {"width": 640, "height": 360, "fps": 15, "gop": 2, "bitrate": 500}),
        ("testsrc://?size=1280x720&fps=30&gop=1&bitrate=2000",
         {"width": 1280, "height": 720, "fps": 30, "gop": 1, "bitrate": 2000}),
    ],
)
def test_testsrc_options(url: str, expected: dict[str, int]) -> None:
    assert parse_options(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("testsrc://?colour=red", "unknown option 'colour'"),
        ("testsrc://?size=big", "size is WIDTHxHEIGHT"),
        ("testsrc://?size=641x360", "must be even"),
        ("testsrc://?fps=500", "fps 1-60"),
    ],
)
def test_testsrc_bad_options(url: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_options(url)


def test_credentials_go_into_the_url_percent_encoded() -> None:
    assert with_credentials("rtsp://10.0.0.5:554/s", "ad min", "p@ss:/w") == (
        "rtsp://ad%20min:p%40ss%3A%2Fw@10.0.0.5:554/s")
    assert with_credentials("rtsp://[fe80::1]/s", "u", "p") == "rtsp://u:p@[fe80::1]/s"
    assert with_credentials("rtsp://h/s", None, "ignored") == "rtsp://h/s"


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (av.error.HTTPUnauthorizedError(-1, "x"), "refused the credentials"),
        (av.error.HTTPNotFoundError(-1, "x"), "no stream at this path"),
        (av.error.ConnectionRefusedError(111, "x"), "connection refused"),
        (av.error.TimeoutError(110, "x"), "timeout"),
        (av.error.EOFError(-1, "x"), "closed the stream"),
    ],
)
def test_camera_errors_are_explained(error: BaseException, words: str) -> None:
    assert words in describe_error(error)


def test_audio_codecs_for_webrtc() -> None:
    assert [webrtc_audio_codec(c) for c in ("pcm_mulaw", "pcm_alaw", "opus", "aac", "mp3")] == [
        "PCMU", "PCMA", "opus", "opus", None]


def test_fast_ntp_clock_matches_aiortc() -> None:
    original = aiortc.clock.current_ntp_time
    for _ in range(5):
        ours, theirs = speedups.ntp_time(), original()
        assert abs(ours - theirs) < 2**32 // 100  # within 10 ms, same epoch and format


def test_host_addresses_are_pinned_and_restored() -> None:
    before = aioice.ice.get_host_addresses
    try:
        ice.install_host_addresses(["127.0.0.1", "::1", "10.1.2.3"])
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1", "10.1.2.3"]
        assert aioice.ice.get_host_addresses(False, True) == ["::1"]
        ice.install_host_addresses(None)
        assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False)
    finally:
        aioice.ice.get_host_addresses = before


def test_interfaces_resolve_and_unknown_ones_are_named() -> None:
    assert "127.0.0.1" in ice.interface_addresses(["lo"])
    with pytest.raises(ConfigError, match="no interface named 'wlan9'"):
        ice.interface_addresses(["wlan9"])
    assert ice.host_addresses(WebrtcSection(host_addresses=["10.0.0.2"],
                                            interfaces=["lo"])) == ["10.0.0.2"]
    assert ice.host_addresses(WebrtcSection()) is None


def test_ice_servers_are_always_explicit(tmp_path: Path) -> None:
    # aiortc would use a public STUN server if given none: the agent never lets it.
    assert ice.rtc_configuration(WebrtcSection()).iceServers == []
    secret = tmp_path / "turn.secret"
    write_secret(secret, "hunter2\n")
    config = ice.rtc_configuration(WebrtcSection(ice_servers=[IceServerConfig(
        urls=["turn:turn.example.net:3478"], username="agent", credential_file=secret)]))
    assert config.iceServers is not None
    (server,) = config.iceServers
    assert (server.urls, server.username, server.credential) == (
        ["turn:turn.example.net:3478"], "agent", "hunter2")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("cameras: [{id: a, source: 'rtsp://h/s', transport: sctp}]",
         "cameras[0].transport: must be one of tcp, udp, got text 'sctp'"),
        ("cameras: [{id: a, source: 'rtsp://h/s', audio: loud}]",
         "cameras[0].audio: must be one of auto, passthrough, off, got text 'loud'"),
        ("webrtc: {host_addresses: [eth0]}", "webrtc.host_addresses[0]: 'eth0' must be an IP"),
        ("webrtc: {ice_servers: [{urls: ['http://x']}]}",
         "webrtc.ice_servers[0].urls[0]: 'http://x' must start with stun:"),
        ("media: {queue_packets: 2}", "media.queue_packets: must be at least 10"),
        ("media: {idle_grace: -1}", "media.idle_grace: must be 0 or more"),
    ],
)
def test_media_config_errors(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert message in str(info.value)
