"""H.265 for test-side aiortc receivers: an RFC 7798 depacketizer and a PyAV hevc decoder.

aiortc 1.x cannot receive H.265. ``enable_h265_receiving()`` adds H265/90000 to this test
process's aiortc codec table (the agent's own registration, agent/webrtc/internals.py) and
wraps aiortc's receiver-side ``depayload`` and ``get_decoder`` so that H265 payloads become
Annex-B access units decoded by FFmpeg's hevc decoder, undone after the test (monkeypatch).
Test code only: the agent never receives video.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import aiortc.codecs
import aiortc.rtcrtpreceiver
import av
import pytest
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame

from agent.webrtc import internals

START = b"\x00\x00\x00\x01"
CLOCK = Fraction(1, 90_000)
AP, FU, PACI = 48, 49, 50


def depayload(payload: bytes) -> bytes:
    """One RFC 7798 payload (no DONL: sprop-max-don-diff 0) → Annex-B bytes; the pieces
    of one access unit, concatenated in sequence order, are the access unit."""
    if len(payload) < 3:
        raise ValueError("an H265 payload is at least 3 bytes")
    kind = (payload[0] >> 1) & 0x3F
    if kind == AP:  # §4.4.2: 16-bit size, NAL unit, …
        out, pos = [], 2
        while pos + 2 <= len(payload):
            size = int.from_bytes(payload[pos:pos + 2], "big")
            if size == 0 or pos + 2 + size > len(payload):
                raise ValueError("an aggregation unit runs past the payload")
            out.append(START + payload[pos + 2:pos + 2 + size])
            pos += 2 + size
        return b"".join(out)
    if kind == FU:  # §4.4.3: the NAL header is rebuilt from the payload header + FU type
        fu = payload[2]
        if fu & 0x80:
            header = bytes([(payload[0] & 0x81) | ((fu & 0x3F) << 1), payload[1]])
            return START + header + payload[3:]
        return payload[3:]
    if kind == PACI:
        raise ValueError("PACI packets are not expected from the agent")
    return START + payload


def depacketize(payloads: list[bytes]) -> bytes:
    """The access unit carried by ``payloads`` (one frame's, in order), Annex-B."""
    return b"".join(depayload(p) for p in payloads)


class HevcDecoder(Decoder):
    """Annex-B access units → frames (FFmpeg's hevc decoder)."""

    def __init__(self) -> None:
        self.codec: Any = av.CodecContext.create("hevc", "r")

    def decode(self, encoded_frame: JitterFrame) -> list[Any]:
        packet = av.Packet(encoded_frame.data)
        packet.pts = encoded_frame.timestamp
        packet.time_base = CLOCK
        return list(self.codec.decode(packet))


def isolate_codec_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the test registers in aiortc's video codec table (the agent's H265 entry)
    is gone after it: later aiortc viewers in this process offer what aiortc alone does."""
    monkeypatch.setitem(aiortc.codecs.CODECS, "video", list(aiortc.codecs.CODECS["video"]))


def enable_h265_receiving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process's aiortc peers offer and decode H265, for the test's duration."""
    isolate_codec_table(monkeypatch)
    internals.register_h265()
    receiver: Any = aiortc.rtcrtpreceiver  # the names it imported from aiortc.codecs
    original_depayload = receiver.depayload
    original_decoder: Callable[[Any], Decoder] = receiver.get_decoder

    def depayload_any(codec: Any, payload: bytes) -> bytes:
        if codec.name.upper() == "H265":
            return depayload(payload)
        return bytes(original_depayload(codec, payload))

    def decoder_any(codec: Any) -> Decoder:
        if codec.mimeType.lower() == "video/h265":
            return HevcDecoder()
        return original_decoder(codec)

    monkeypatch.setattr(receiver, "depayload", depayload_any)
    monkeypatch.setattr(receiver, "get_decoder", decoder_any)
