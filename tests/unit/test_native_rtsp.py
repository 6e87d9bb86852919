"""The agent's RTSP client, the parts without I/O: the camera's SDP and its RTP clock."""

from __future__ import annotations

from agent.media.sources.native import Timeline, parse_sdp

SDP = """v=0
o=- 1 1 IN IP4 192.0.2.10
s=camera
a=control:*
m=video 0 RTP/AVP 96
a=rtpmap:96 H264/90000
a=fmtp:96 packetization-mode=1;sprop-parameter-sets=Z0LAHtkDxWhAAAADAEAAAA8jxYuS,aMuMsg==
a=framerate:25
a=control:trackID=1
m=audio 0 RTP/AVP 0
a=framerate:inf
a=control:rtsp://192.0.2.10/other/track2
"""


def test_the_sdp_gives_codecs_controls_and_frame_rate() -> None:
    control, (video, audio) = parse_sdp(SDP, "rtsp://192.0.2.10/live/")
    assert control == "rtsp://192.0.2.10/live/"  # "*": the request's own URL
    assert (video.kind, video.payload_type, video.encoding, video.clock) == (
        "video", 96, "h264", 90_000)
    assert video.control == "rtsp://192.0.2.10/live/trackID=1"
    assert video.fmtp["packetization-mode"] == "1" and video.framerate == 25.0
    assert (audio.encoding, audio.clock, audio.framerate) == ("pcmu", 8000, None)
    assert audio.control == "rtsp://192.0.2.10/other/track2"


def test_timestamps_run_on_across_the_rtp_clock_wrap() -> None:
    """At 90 kHz the 32-bit RTP clock wraps every 13.3 hours: pts must not."""
    clock = Timeline()
    start = 0xFFFF_F000
    assert clock.pts(start) == 0
    assert clock.pts((start + 3000) & 0xFFFFFFFF) == 3000  # past the wrap
    assert clock.pts((start + 6000) & 0xFFFFFFFF) == 6000
    assert clock.pts((start + 4500) & 0xFFFFFFFF) == 4500  # a packet late: a step back
    several = [clock.pts((start + 6000 + i * 0x4000_0000) & 0xFFFFFFFF) for i in range(1, 9)]
    assert several == [6000 + i * 0x4000_0000 for i in range(1, 9)]  # two whole wraps
