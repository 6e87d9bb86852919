"""A camera's audio on its way to WebRTC: passed through, or transcoded once per camera.

G.711 (PCMU/PCMA) and Opus go through untouched. AAC, which WebRTC cannot carry, is
decoded and encoded to Opus here, in the camera's pull thread — once for every viewer.
PyAV is imported there too, not when the hub imports this module (an idle agent never
loads it: docs/field-notes.md, "What the idle agent's memory is made of").
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from agent.media.stream import PASSTHROUGH_AUDIO, MediaPacket

OPUS_RATE = 48_000
OPUS_FRAME = 960  # 20 ms


class AudioPath:
    """Turns the camera's audio packets into packets a WebRTC sender can carry."""

    def __init__(self, transcode: bool) -> None:
        self._transcode = transcode
        self._decoder: Any = None
        self._resampler: Any = None
        self._encoder: Any = None
        self._samples = 0

    @classmethod
    def for_stream(cls, stream: Any, mode: str) -> AudioPath | None:
        """The path for this PyAV stream's codec under ``mode``, or None to drop its audio."""
        return cls.for_codec(stream.codec_context.name, mode, stream.codec_context.extradata)

    @classmethod
    def for_codec(cls, name: str, mode: str, extradata: bytes | None) -> AudioPath | None:
        """The path for codec ``name`` (FFmpeg's name; AAC with its AudioSpecificConfig)."""
        if name in PASSTHROUGH_AUDIO:
            return cls(transcode=False)
        if name == "aac" and mode == "auto":
            import av  # noqa: PLC0415 (in the pull thread: an idle agent never loads it)

            path = cls(transcode=True)
            path._decoder = av.CodecContext.create("aac", "r")
            if extradata:
                path._decoder.extradata = extradata
            path._resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE,
                                                frame_size=OPUS_FRAME)
            enc = av.CodecContext.create("libopus", "w")
            enc.sample_rate = OPUS_RATE
            enc.layout = "stereo"
            enc.format = "s16"
            enc.time_base = Fraction(1, OPUS_RATE)
            enc.bit_rate = 32_000
            enc.open()
            path._encoder = enc
            return path
        return None

    def convert(self, packet: Any) -> list[MediaPacket]:
        """A PyAV packet of the camera's audio."""
        if not self._transcode:
            return [MediaPacket(False, bytes(packet), int(packet.pts), Fraction(packet.time_base),
                                False)]
        return self._transcoded(packet)

    def convert_bytes(self, data: bytes, pts: int, time_base: Fraction) -> list[MediaPacket]:
        """One audio frame as the camera's RTP carried it (the agent's own RTSP client)."""
        if not self._transcode:
            return [MediaPacket(False, data, pts, time_base, False)]
        import av  # noqa: PLC0415 (a sys.modules lookup: loaded by for_codec)

        packet = av.Packet(data)
        packet.pts, packet.time_base = pts, time_base
        return self._transcoded(packet)

    def _transcoded(self, packet: Any) -> list[MediaPacket]:
        import av  # noqa: PLC0415 (a sys.modules lookup: loaded by for_codec)

        out = []
        try:
            frames = self._decoder.decode(packet)
        except av.error.FFmpegError:
            return []  # one damaged AAC frame costs 20 ms of sound, not the stream
        for frame in frames:
            for chunk in self._resampler.resample(frame):
                chunk.pts = self._samples
                chunk.time_base = Fraction(1, OPUS_RATE)
                self._samples += chunk.samples
                for encoded in self._encoder.encode(chunk):
                    out.append(MediaPacket(False, bytes(encoded), int(encoded.pts),
                                           Fraction(1, OPUS_RATE), False))
        return out


def webrtc_audio_codec(codec: str) -> str | None:
    """The WebRTC codec name a camera's audio codec arrives as (after transcoding)."""
    if codec in PASSTHROUGH_AUDIO:
        return PASSTHROUGH_AUDIO[codec]
    return "opus" if codec == "aac" else None
