"""The SDP a DESCRIBE answers (RFC 2326 Appendix C, RFC 4566), from the camera's StreamInfo.

Video is track 0, audio (when the camera has it) track 1; controls are relative to the
Content-Base (``rtsp://host:port/<camera>/``), which VLC, FFmpeg and GStreamer all resolve.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from agent.media.audio import webrtc_audio_codec
from agent.media.rtp import H264Packetizer, H265Packetizer, split_annexb
from agent.media.stream import StreamInfo

VIDEO_PT = 96
OPUS_PT = 97
AUDIO_PAYLOAD = {"PCMU": (0, "PCMU/8000"), "PCMA": (8, "PCMA/8000"),
                 "opus": (OPUS_PT, "opus/48000/2")}


@dataclass(frozen=True)
class Track:
    control: str  # "trackID=0"
    video: bool
    payload_type: int
    clock: int


def tracks(info: StreamInfo) -> list[Track]:
    out = [Track("trackID=0", True, VIDEO_PT, 90_000)]
    audio = webrtc_audio_codec(info.audio.codec) if info.audio else None
    if audio in AUDIO_PAYLOAD:
        pt, rtpmap = AUDIO_PAYLOAD[audio]
        out.append(Track("trackID=1", False, pt, int(rtpmap.split("/")[1])))
    return out


def _b64(nal: bytes) -> str:
    return base64.b64encode(nal).decode()


def video_fmtp(info: StreamInfo, keyframe: bytes) -> str | None:
    """``a=fmtp`` for the video: parameter sets from the stream info, else the keyframe."""
    nals = [bytes(n) for n in split_annexb(info.parameter_sets + keyframe)]
    if info.codec == "h264":
        h264 = H264Packetizer(b"")
        sps = next((n for n in nals if h264.nal_type(n) == 7), None)
        pps = next((n for n in nals if h264.nal_type(n) == 8), None)
        fmtp = f"a=fmtp:{VIDEO_PT} packetization-mode=1"
        if sps is not None and len(sps) >= 4:
            fmtp += f";profile-level-id={sps[1:4].hex()}"
        if sps is not None and pps is not None:
            fmtp += f";sprop-parameter-sets={_b64(sps)},{_b64(pps)}"
        return fmtp
    h265 = H265Packetizer(b"")
    found = {k: next((n for n in nals if h265.nal_type(n) == t), None)
             for k, t in (("vps", 32), ("sps", 33), ("pps", 34))}
    if any(v is None for v in found.values()):
        return None
    return f"a=fmtp:{VIDEO_PT} " + ";".join(
        f"sprop-{k}={_b64(v)}" for k, v in found.items() if v is not None)


def describe(info: StreamInfo, keyframe: bytes, address: str) -> str:
    """The session description for a camera; track controls relative to the Content-Base."""
    family = "IP6" if ":" in address else "IP4"
    lines = [
        "v=0",
        f"o=- 0 0 IN {family} {address}",
        "s=TheRelay Agent",
        f"c=IN {family} {'::' if family == 'IP6' else '0.0.0.0'}",  # noqa: S104 (unicast)
        "t=0 0",
        "a=control:*",
        "a=range:npt=now-",
    ]
    for track in tracks(info):
        if track.video:
            name = "H264" if info.codec == "h264" else "H265"
            lines += [f"m=video 0 RTP/AVP {VIDEO_PT}", f"a=rtpmap:{VIDEO_PT} {name}/90000"]
            fmtp = video_fmtp(info, keyframe)
            if fmtp:
                lines.append(fmtp)
            if info.fps:
                lines.append(f"a=framerate:{info.fps:g}")
        else:
            assert info.audio is not None
            codec = webrtc_audio_codec(info.audio.codec)
            assert codec is not None
            pt, rtpmap = AUDIO_PAYLOAD[codec]
            lines += [f"m=audio 0 RTP/AVP {pt}", f"a=rtpmap:{pt} {rtpmap}"]
        lines.append(f"a=control:{track.control}")
    return "\r\n".join(lines) + "\r\n"
