"""H.265 over WebRTC: which of a viewer's offered H265 formats fits the camera, and the
answer's format parameters (RFC 7798 §7.1, §7.2.2).

Chrome 136+ and Safari offer ``H265/90000`` (one payload type per profile they can decode,
``profile-id``/``tier-flag``/``level-id``/``tx-mode=SRST`` in the fmtp) where the device has
an H.265 decoder; Firefox offers none. The agent sends the camera's own bitstream (RFC 7798
packetization, agent/media/rtp.py), so it cannot adapt it: an offered format is usable when
its profile is the camera's (or one the camera's SPS declares itself compatible with) and its
tier is at least the camera's. The answer keeps the offered profile-space, profile-id and
tier-flag (§7.2.2: these are used symmetrically, or the format is removed) and names the
camera's own level in ``level-id``: what the viewer will receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from aiortc import RTCRtpCodecParameters
from aiortc.rtcrtpparameters import RTCRtcpFeedback
from aiortc.sdp import SessionDescription

from agent.media.hub import CameraHub
from agent.media.rtp import H265_SPS, split_annexb
from agent.media.stream import rbsp
from agent.webrtc.offer import OfferError

log = structlog.get_logger(__name__)

MIME = "video/H265"
CLOCK = 90_000
#: RFC 7798 §7.1 defaults when the fmtp leaves a parameter out: Main profile, Main tier,
#: level 3.1 (level-id is 30 × the level number).
DEFAULT_PROFILE, DEFAULT_TIER, DEFAULT_LEVEL = 1, 0, 93
#: RTCP feedback the agent's send path acts on (agent/webrtc/direct.py), kept if offered.
FEEDBACK = {("nack", None), ("nack", "pli"), ("ccm", "fir"), ("goog-remb", None)}


@dataclass(frozen=True, slots=True)
class ProfileTierLevel:
    """The general profile_tier_level() of an H.265 SPS (H.265 §7.3.3)."""

    profile_space: int
    tier: int
    profile_id: int
    compatible: frozenset[int]  # profiles whose general_profile_compatibility_flag is set
    level_id: int


def sps_profile(sps: bytes) -> ProfileTierLevel | None:
    """From an SPS NAL unit (no start code); None if it is not one or too short."""
    if len(sps) < 3 or (sps[0] >> 1) & 0x3F != H265_SPS:
        return None
    payload = rbsp(sps[2:2 + 40])  # 2-byte NAL header; the general PTL ends 13 bytes in
    if len(payload) < 13:
        return None
    first = payload[1]  # after sps_video_parameter_set_id(4) max_sub_layers(3) nesting(1)
    flags = int.from_bytes(payload[2:6], "big")
    return ProfileTierLevel(
        profile_space=first >> 6, tier=(first >> 5) & 1, profile_id=first & 0x1F,
        compatible=frozenset(j for j in range(32) if flags & (1 << (31 - j))),
        level_id=payload[12])


def find_profile(annexb: bytes) -> ProfileTierLevel | None:
    """The profile of the first SPS in an Annex-B buffer (parameter sets or a keyframe)."""
    for nal in split_annexb(annexb):
        if len(nal) > 2 and (nal[0] >> 1) & 0x3F == H265_SPS:
            return sps_profile(bytes(nal))
    return None


async def camera_profile(hub: CameraHub, timeout: float) -> ProfileTierLevel | None:
    """The camera's profile, tier and level: from the parameter sets its SDP gave, else from
    the SPS of its latest keyframe (waiting for one, bounded: a recording's hvcC)."""
    assert hub.info is not None
    found = find_profile(hub.info.parameter_sets)
    if found is None and (keyframe := await hub.keyframe(timeout)) is not None:
        found = find_profile(keyframe[0].data)
    return found


def _int(parameters: dict[str, Any], key: str, default: int) -> int | None:
    value = parameters.get(key, default)
    try:
        return int(str(value).strip())
    except ValueError:
        return None  # a malformed fmtp value: that format is not used


def offered_formats(offer: str, mid: str | None = None) -> list[RTCRtpCodecParameters]:
    """The H265 formats of the offer's video section (``mid``, or the first), in the
    offerer's order of preference, and the RTX formats."""
    try:
        sections = SessionDescription.parse(offer).media
    except Exception as exc:  # aiortc raises assorted errors on bad SDP
        raise OfferError(f"the SDP offer cannot be used: {exc or type(exc).__name__}") from None
    for media in sections:
        if media.kind == "video" and (mid is None or media.rtp.muxId == mid):
            return [c for c in media.rtp.codecs if c.mimeType.lower() == MIME.lower()
                    or c.mimeType.lower() == "video/rtx"]
    return []


def offers_h265(offer: str) -> bool:
    """Whether the offer's first video section names H265 at all (cheap text check)."""
    lines = offer.replace("\r\n", "\n").split("\n")
    video = False
    for line in lines:
        if line.startswith("m="):
            if video:
                return False  # past the first video section
            video = line.startswith("m=video ")
        elif video and line.startswith("a=rtpmap:") and " h265/90000" in line.lower():
            return True
    return False


def _answer_parameters(parameters: dict[str, Any], camera: ProfileTierLevel | None,
                       exact: bool) -> dict[str, Any] | None:
    """The answer's fmtp for an offered format, or None if the camera's bitstream does not
    fit it (``exact``: the profile must be the camera's own, else a compatible one)."""
    space = _int(parameters, "profile-space", 0)
    profile = _int(parameters, "profile-id", DEFAULT_PROFILE)
    tier = _int(parameters, "tier-flag", DEFAULT_TIER)
    level = _int(parameters, "level-id", DEFAULT_LEVEL)
    if space is None or profile is None or tier is None or level is None:
        return None
    mode = str(parameters.get("tx-mode", "SRST")).strip().upper()
    if mode != "SRST":  # one RTP stream, one session: all the agent sends
        return None
    if camera is not None:
        if space != camera.profile_space or camera.tier > tier:
            return None
        if profile != camera.profile_id and (exact or profile not in camera.compatible):
            return None
    answer: dict[str, Any] = {}
    if "profile-space" in parameters:
        answer["profile-space"] = space
    answer["profile-id"] = profile
    answer["tier-flag"] = tier
    answer["level-id"] = camera.level_id if camera is not None else level
    if "tx-mode" in parameters:
        answer["tx-mode"] = "SRST"
    return answer


def choose(offered: list[RTCRtpCodecParameters], camera: ProfileTierLevel | None,
           camera_id: str = "") -> list[RTCRtpCodecParameters]:
    """The answer's video codecs: the first offered H265 format the camera fits (its own
    profile before a compatible one), with the answer's fmtp, then its RTX format if one was
    offered. Empty if none fits."""
    formats = [c for c in offered if c.mimeType.lower() == MIME.lower()]
    for exact in (True, False):
        for codec in formats:
            answer = _answer_parameters(codec.parameters, camera, exact)
            if answer is None or codec.payloadType is None:
                continue
            offered_level = _int(codec.parameters, "level-id", DEFAULT_LEVEL) or 0
            if camera is not None and camera.level_id > offered_level:
                log.info("h265_level_above_offer", camera=camera_id, camera_level=camera.level_id,
                         offered_level=offered_level)
            chosen = [RTCRtpCodecParameters(
                mimeType=MIME, clockRate=CLOCK, payloadType=codec.payloadType,
                rtcpFeedback=[RTCRtcpFeedback(type=f.type, parameter=f.parameter)
                              for f in codec.rtcpFeedback if (f.type, f.parameter) in FEEDBACK],
                parameters=answer)]
            rtx = next((c for c in offered if c.mimeType.lower() == "video/rtx"
                        and str(c.parameters.get("apt")) == str(codec.payloadType)), None)
            if rtx is not None and rtx.payloadType is not None:
                chosen.append(RTCRtpCodecParameters(
                    mimeType="video/rtx", clockRate=CLOCK, payloadType=rtx.payloadType,
                    parameters={"apt": codec.payloadType}))
            return chosen
    return []


def describe(camera: ProfileTierLevel | None) -> str:
    if camera is None:
        return "H.265"
    names = {1: "Main", 2: "Main 10", 3: "Main Still Picture", 4: "Range Extensions"}
    profile = names.get(camera.profile_id, f"profile {camera.profile_id}")
    tier = "High tier" if camera.tier else "Main tier"
    return f"H.265 {profile}, {tier}, level {camera.level_id / 30:g}"


def hls_url(camera_id: str) -> str:
    return f"/hls/{camera_id}/index.m3u8"


def refusal(camera_id: str, why: str) -> str:
    """The 501 message for an H.265 camera a WebRTC viewer cannot take: why, and the
    fallbacks (HLS, an H.264 substream, RTSP)."""
    return (f"the camera sends H.265 (HEVC) video and {why}. Watch it over HLS at "
            f"{hls_url(camera_id)} (Safari; Chrome and Edge with hardware HEVC decoding), "
            "over RTSP (VLC, ffmpeg, a VMS), or set the camera's substream to H.264 for "
            "every browser")


NO_H265_OFFERED = ("this browser's offer has no H265 (Chrome 136+ and Safari offer it where "
                   "the device can decode H.265; Firefox does not)")
AIORTC_PATH = ("webrtc.send_path is aiortc, which cannot send H.265 (set webrtc.send_path: "
               "agent)")


def no_fit(camera: ProfileTierLevel | None) -> str:
    return (f"none of the H265 formats this browser offers can carry the camera's "
            f"{describe(camera)} (profile and tier must match)")
