"""choose_profile and with_host: table tests (no network, no event loop)."""

from __future__ import annotations

import pytest

from agent.discovery.onvif import (
    OnvifDevice,
    OnvifError,
    OnvifProfile,
    OnvifProfileError,
    choice_note,
    choose_profile,
    with_host,
)
from agent.errors import AgentError


def profile(token: str, encoding: str | None, width: int | None, height: int | None,
            fps: float | None = 25.0, kbps: int | None = 2048,
            uri: str | None = "rtsp://10.0.0.5/x") -> OnvifProfile:
    return OnvifProfile(token, token, encoding, width, height, fps, kbps, uri, None)


def device(*profiles: OnvifProfile) -> OnvifDevice:
    return OnvifDevice("http://10.0.0.5/onvif/device_service", "Acme", "X1", "1.0", "SN", "HW",
                       tuple(profiles), 0.0)


HIK = device(profile("Profile_1", "H264", 1920, 1080), profile("Profile_2", "H264", 640, 360),
             profile("Profile_3", "JPEG", 2688, 1520))
DAHUA = device(profile("Profile000", "H265", 2560, 1440), profile("Profile001", "H264", 704, 576))
SAME_SIZE = device(profile("a", "H264", 1280, 720, fps=15), profile("b", "H264", 1280, 720, fps=30))
NO_URI = device(profile("big", "H264", 3840, 2160, uri=None), profile("small", "H264", 640, 480))
ONLY_H265 = device(profile("big", "H265", 2560, 1440), profile("small", "H265", 640, 360),
                   profile("jpeg", "JPEG", 3840, 2160))
UNKNOWN_SIZE = device(profile("x", "H264", None, None), profile("y", "H264", 320, 240))


@pytest.mark.parametrize(
    ("dev", "want", "token"),
    [
        (HIK, "main", "Profile_1"),  # the JPEG profile is larger but not H.264
        (HIK, "sub", "Profile_2"),
        (HIK, "Profile_3", "Profile_3"),  # a token is taken as is, whatever its codec
        (DAHUA, "main", "Profile001"),  # H.265 main stream: the H.264 substream is the best
        (DAHUA, "sub", "Profile001"),
        (SAME_SIZE, "main", "b"),  # equal size: the higher frame rate
        (SAME_SIZE, "sub", "a"),
        (NO_URI, "main", "small"),  # a profile without a stream URI cannot be pulled
        (UNKNOWN_SIZE, "main", "y"),
        (UNKNOWN_SIZE, "sub", "x"),
        (ONLY_H265, "main", "big"),  # no H.264 at all: the H.265 streams, main and sub
        (ONLY_H265, "sub", "small"),
        (DAHUA, "Profile000", "Profile000"),  # the installer's choice wins
    ],
)
def test_choose_profile(dev: OnvifDevice, want: str, token: str) -> None:
    assert choose_profile(dev, want).token == token


@pytest.mark.parametrize(
    ("dev", "want", "says"),
    [
        (device(profile("p", "JPEG", 1920, 1080)), "main",
         "no H.264 or H.265 stream (its profiles: p JPEG 1920x1080)"),
        (device(), "sub", "its profiles: none"),
        (HIK, "Profile_9",
         "no profile 'Profile_9' (its profiles: Profile_1, Profile_2, Profile_3)"),
    ],
)
def test_choose_profile_explains_a_miss(dev: OnvifDevice, want: str, says: str) -> None:
    with pytest.raises(OnvifProfileError) as caught:
        choose_profile(dev, want)
    assert says in str(caught.value)
    assert isinstance(caught.value, OnvifError)
    assert isinstance(caught.value, AgentError)


@pytest.mark.parametrize(
    ("uri", "host", "expected"),
    [
        ("rtsp://192.168.1.64:554/Streaming/Channels/101?transportmode=unicast&profile=Profile_1",
         "10.0.0.7", "rtsp://10.0.0.7:554/Streaming/Channels/101?transportmode=unicast&profile=Profile_1"),
        ("rtsp://192.168.1.64/live", "10.0.0.7", "rtsp://10.0.0.7/live"),
        ("rtsp://192.168.1.64:554/live", "10.0.0.7:8554", "rtsp://10.0.0.7:8554/live"),
        ("rtsp://192.168.1.64:554/live", "fe80::1", "rtsp://[fe80::1]:554/live"),
        ("rtsp://[fd00::5]:554/live", "[fd00::6]:10554", "rtsp://[fd00::6]:10554/live"),
        ("http://192.168.1.123/onvifsnapshot/media_service/snapshot?channel=1&subtype=1",
         "cam.lan", "http://cam.lan/onvifsnapshot/media_service/snapshot?channel=1&subtype=1"),
        ("rtsp://user@192.168.1.64/a", "10.0.0.7", "rtsp://user@10.0.0.7/a"),
    ],
)
def test_with_host(uri: str, host: str, expected: str) -> None:
    assert with_host(uri, host) == expected


def test_with_host_needs_an_absolute_uri() -> None:
    with pytest.raises(ValueError, match="not an absolute URI"):
        with_host("/Streaming/Channels/101", "10.0.0.7")


@pytest.mark.parametrize(
    ("dev", "want", "says"),
    [
        (DAHUA, "main", "profile 'Profile001' (H.264) chosen over 'Profile000' (H.265): "
                        "browsers play H.264 over WebRTC; --profile Profile000 takes"),
        (DAHUA, "sub", "chosen over 'Profile000' (H.265)"),
        (ONLY_H265, "main", "profile 'big' is H.265 (the camera has no H.264 stream)"),
        (DAHUA, "Profile000", None),  # chosen by the installer: nothing to explain
        (HIK, "main", None),  # nothing H.265 to choose against
    ],
)
def test_choice_note_says_why_a_codec_was_taken(dev: OnvifDevice, want: str,
                                                says: str | None) -> None:
    note = choice_note(dev, want, choose_profile(dev, want))
    if says is None:
        assert note is None
    else:
        assert note is not None and says in note
