"""The agent's WebRTC send path: per-viewer RTP headers over shared payloads, SRTP, UDP GSO,
sender reports, NACK from history (bounded), PLI rate limit, and the aiortc internals."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import aioice.ice
import av
import pylibsrtp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from pylibsrtp import _binding as srtp_binding
from structlog.testing import capture_logs

from agent.media.hub import CameraHub
from agent.media.rtp import Payload
from agent.media.stream import MediaPacket, StreamInfo
from agent.webrtc import internals
from agent.webrtc.direct import DirectTrack
from agent.webrtc.ice import install_host_addresses
from agent.webrtc.rtpsend import (
    GSO_MAX_SEGMENTS,
    LOSS_WINDOW_MAX,
    NACK_MAX,
    SCRATCH_BYTES,
    RtpStream,
    StreamParams,
    UdpOut,
    gso_batches,
)
from agent.webrtc.session import ViewerSession
from tests.support.agent import nominate_another_pair, wait_until

KEY = bytes(range(30))  # 16-byte key + 14-byte salt (RFC 3711 AES_CM_128_HMAC_SHA1_80)


def sessions() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    def policy(kind: int) -> pylibsrtp.Policy:
        p = pylibsrtp.Policy(key=KEY, ssrc_type=kind)
        p.allow_repeat_tx = True
        return p
    return (pylibsrtp.Session(policy(pylibsrtp.Policy.SSRC_ANY_OUTBOUND)),
            pylibsrtp.Session(policy(pylibsrtp.Policy.SSRC_ANY_INBOUND)))


PARAMS = StreamParams(ssrc=0x11223344, payload_type=102, clock=90_000, cname="agent-x",
                      rtx_ssrc=0x55667788, rtx_payload_type=103)


def frame(n: int, last: int = 300) -> tuple[Payload, ...]:
    """``n`` payloads: shared views of one buffer, full-size but the last."""
    data = memoryview(bytes(range(256)) * 20)
    out = [Payload(b"\x7c\x85", data[:1198], False, 1200) for _ in range(n - 1)]
    out.append(Payload(b"", data[:last], True, last))
    return tuple(out)


def test_each_viewer_adds_its_header_and_srtp_and_the_peer_decrypts_the_shared_payloads(
) -> None:
    tx, rx = sessions()
    stream = RtpStream(PARAMS, tx)
    first = stream.seq
    payloads = frame(3)
    out = stream.frame(payloads, 9000)
    assert len(out) == 3
    assert len({len(p) for p in out[:2]}) == 1, "equal payloads stay equal once protected"
    plain = [rx.unprotect(p) for p in out]
    for i, packet in enumerate(plain):
        b0, b1, seq, _ts, ssrc = struct.unpack("!BBHII", packet[:12])
        assert b0 == 0x80 and ssrc == PARAMS.ssrc and seq == (first + i) & 0xFFFF
        assert b1 & 0x7F == 102 and bool(b1 & 0x80) == (i == 2), "marker on the last only"
        assert packet[12:] == payloads[i].prefix + bytes(payloads[i].body)
    assert stream.bytes_sent == 2 * 1212 + 312 and stream.packets == 3
    later = stream.frame(frame(1), 12000)
    assert struct.unpack("!I", rx.unprotect(later[0])[4:8])[0] == \
        (struct.unpack("!I", plain[0][4:8])[0] + 3000) & 0xFFFFFFFF, "timestamp offset kept"


def test_nack_resends_from_history_as_rtx_and_a_huge_nack_is_bounded() -> None:
    tx, rx = sessions()
    stream = RtpStream(PARAMS, tx)
    first = stream.seq
    payloads = frame(4)
    stream.frame(payloads, 0)
    again = stream.retransmit([(first + 2) & 0xFFFF])
    assert len(again) == 1
    packet = rx.unprotect(again[0])
    _, b1, _, _, ssrc = struct.unpack("!BBHII", packet[:12])
    assert ssrc == PARAMS.rtx_ssrc and b1 & 0x7F == 103
    assert packet[12:14] == struct.pack("!H", (first + 2) & 0xFFFF), "RFC 4588 OSN"
    assert packet[14:] == payloads[2].prefix + bytes(payloads[2].body)
    # 10,000 sequence numbers, none or few in the history: bounded work, bounded answer
    started = time.perf_counter()
    resent = stream.retransmit([(first + i) & 0xFFFF for i in range(10_000)])
    assert len(resent) == 4 <= NACK_MAX
    assert time.perf_counter() - started < 0.05
    assert stream.retransmit([(first + 100) & 0xFFFF]) == [], "not in history: nothing"


def test_sender_report_carries_counts_and_the_rtt_comes_from_the_receiver_report() -> None:
    tx, rx = sessions()
    stream = RtpStream(PARAMS, tx)
    assert stream.sender_report() is None, "no SR before any packet"
    stream.frame(frame(2), 90_000)
    report = stream.sender_report()
    assert report is not None
    plain = rx.unprotect_rtcp(report)
    version, kind, words, ssrc, ntp, _rtp_ts, packets, octets = struct.unpack(
        "!BBHIQIII", plain[:28])
    assert (version, kind, words, ssrc) == (0x80, 200, 6, PARAMS.ssrc)
    assert (packets, octets) == (2, 1500)
    assert plain[28 + 1] == 202 and b"agent-x" in plain[28:], "SDES CNAME follows"
    assert abs((ntp >> 32) - 2_208_988_800 - time.time()) < 2
    lsr = (ntp >> 16) & 0xFFFFFFFF
    stream.report(fraction_lost=64, packets_lost=7, jitter=900, lsr=lsr, dlsr=0)
    assert stream.stats.fraction_lost == 0.25 and stream.stats.packets_lost == 7
    assert stream.stats.jitter_seconds == 0.01
    assert stream.stats.rtt_seconds is not None and 0 <= stream.stats.rtt_seconds < 1
    stream.report(fraction_lost=0, packets_lost=0, jitter=0, lsr=12345, dlsr=0)
    assert stream.stats.rtt_seconds < 1, "a report about another SR leaves the RTT"


def test_loss_is_judged_over_a_second_not_over_the_few_packets_a_report_covers() -> None:
    """Chromium's reports as the agent got them at 2 % loss (two packets lost in a row): a
    report every ~0.2 s, one with each NACK, and then one 8 ms later whose own fraction
    lost was 170/256 (2 of its 3 packets). Over a second that is 2 lost of 27."""
    stream = RtpStream(PARAMS, sessions()[0])
    reports = [(9.081 + 0.203 * i, 43376 + 6 * i, 4) for i in range(5)]  # up to 43400
    reports += [(10.088, 43405, 4), (10.097, 43408, 6),  # the NACK's report, then 2 of 3
                (10.301, 43408, 6), (10.504, 43414, 6), (10.707, 43420, 6),
                (10.910, 43426, 6), (11.113, 43432, 6)]
    judged = [stream.loss(high, lost, t) for t, high, lost in reports]
    assert [j for j in judged if j is not None] == [0.0, pytest.approx(2 / 27)]
    # Half or more lost over a second is judged so, and only once the second is over.
    stream = RtpStream(PARAMS, sessions()[0])
    assert stream.loss(65_500, 0, 100.0) is None
    assert stream.loss(65_530, 20, 100.5) is None, "half a second: not yet"
    assert stream.loss(65_560 - 65_536 + (1 << 16) * 3, 40, 101.0) == pytest.approx(40 / 60), \
        "across the wrap, libwebrtc's extended number and aiortc's 16-bit one alike"
    assert stream.loss(3, 40, 102.0) is None, "an older report (reordered) is not judged"
    assert stream.loss(30, 40, 102.1) is None, "too few packets to judge yet"
    assert stream.loss(5000, 4000, 102.1 + LOSS_WINDOW_MAX + 1) is None, \
        "reports that stopped for long start a new window"
    assert stream.loss(5100, 4000, 102.1 + LOSS_WINDOW_MAX + 2) == 0.0


def test_a_pli_flood_gets_one_keyframe_per_interval() -> None:
    stream = RtpStream(PARAMS, sessions()[0])
    now = 1000.0
    granted = [stream.keyframe_wanted(now + i * 0.01) for i in range(500)]
    assert sum(granted) == 5, "5 s of requests: one keyframe a second"  # at 0, 1, 2, 3, 4 s
    assert stream.stats.keyframe_requests == 500


def test_gso_runs_are_equal_sizes_with_a_shorter_last_and_respect_the_limits() -> None:
    sizes = [1222] * 5 + [300] + [100, 1222, 1222] + [1222] * 130
    runs = [[len(p) for p in run] for run in gso_batches([b"x" * n for n in sizes])]
    assert runs[0] == [1222] * 5 + [300]
    assert runs[1] == [100]
    for run in runs[2:]:
        assert len(run) <= GSO_MAX_SEGMENTS and sum(run) <= 65000
        assert all(n == run[0] for n in run[:-1]) and run[-1] <= run[0]
    assert sum(map(len, runs)) == len(sizes)


class CountingSocket(socket.socket):
    """A real UDP socket that counts its send calls."""

    calls = 0

    def sendto(self, *args: Any) -> int:
        self.calls += 1
        return super().sendto(*args)

    def sendmsg(self, *args: Any) -> int:
        self.calls += 1
        return super().sendmsg(*args)


def test_udp_gso_sends_a_frame_in_one_syscall_and_the_peer_gets_each_datagram() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    sender = CountingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    out = UdpOut(sender, receiver.getsockname())
    packets = [bytes([i]) * 1222 for i in range(20)] + [b"z" * 400]
    try:
        assert out.send(packets)
        assert sender.calls == 1 and out.gso
        got = [receiver.recv(2000) for _ in packets]
        assert got == packets
    finally:
        out.close()
        receiver.close()


def test_a_frame_protected_in_place_goes_out_in_gso_runs_on_aligned_packets() -> None:
    """A keyframe bigger than the shared buffer: every packet decrypts in order, the runs
    are what one UDP_SEGMENT sendmsg carries, and each packet starts on a 32-bit boundary
    (libsrtp's requirement for the buffer it protects in place)."""
    tx, rx = sessions()
    stream = RtpStream(PARAMS, tx)
    first = stream.seq
    body = memoryview(bytes(range(251)) * 1200)  # 301 kB: more than SCRATCH_BYTES
    payloads = tuple(Payload(b"\x7c\x05", body[i:i + 1198], i + 1198 >= len(body),
                             2 + len(body[i:i + 1198])) for i in range(0, len(body), 1198))
    ffi = srtp_binding.ffi
    runs: list[tuple[list[bytes], int]] = []

    def emit(run: Sequence[memoryview], segment: int) -> bool:
        assert all(int(ffi.cast("uintptr_t", ffi.from_buffer(p))) % 4 == 0 for p in run)
        runs.append(([bytes(p) for p in run], segment))
        return True

    assert len(body) > SCRATCH_BYTES and stream.send_frame(payloads, 0, emit)
    for run, segment in runs:
        assert len(run) <= GSO_MAX_SEGMENTS and sum(map(len, run)) <= 65000
        assert all(len(p) == segment for p in run[:-1]) and len(run[-1]) <= segment
    packets = [rx.unprotect(p) for run, _ in runs for p in run]
    assert len(packets) == len(payloads) and stream.seq == (first + len(payloads)) & 0xFFFF
    for i, packet in enumerate(packets):
        assert struct.unpack("!H", packet[2:4])[0] == (first + i) & 0xFFFF
        assert packet[12:] == payloads[i].prefix + bytes(payloads[i].body)


def test_a_refused_run_ends_the_frame_and_its_sequence_numbers_stay_used() -> None:
    """The socket buffer is full: the rest of the frame is not sent nor counted, and the
    next frame starts after all of this one's numbers (what the history, and so a NACK,
    expects)."""
    tx, rx = sessions()
    stream = RtpStream(PARAMS, tx)
    first = stream.seq
    calls = []

    def full_at_the_second_run(run: Sequence[memoryview], segment: int) -> bool:
        calls.append(len(run))
        return len(calls) == 1

    payloads = (*frame(2), Payload(b"", memoryview(b"A" * 100), False, 100), *frame(2))
    assert not stream.send_frame(payloads, 0, full_at_the_second_run)
    assert calls == [2, 1], "the second run refused, nothing tried after it"
    assert (stream.packets, stream.octets, stream.bytes_sent) == (2, 1500, 1524), \
        "only the run that went out is counted"
    later = stream.frame(frame(1), 3000)
    assert struct.unpack("!H", rx.unprotect(later[0])[2:4])[0] == (first + 5) & 0xFFFF
    resent = stream.retransmit([(first + 3) & 0xFFFF])  # as RTX: the original number first
    assert [struct.unpack("!H", rx.unprotect(p)[12:14])[0] for p in resent] == \
        [(first + 3) & 0xFFFF], "a NACK finds a packet that was not sent"


@pytest.fixture
def restored_lookup() -> Iterator[None]:
    saved = aioice.ice.get_host_addresses
    yield
    aioice.ice.get_host_addresses = saved


async def test_the_selected_pair_is_followed_when_the_controlling_peer_nominates_another(
        restored_lookup: None) -> None:
    """Two aiortc peers on loopback: the offerer (controlling) has host candidates on
    127.0.0.1 and 127.0.0.2, the answerer (the agent's side) on 127.0.0.1. When the offerer
    nominates the pair from its other address, aioice on the answerer selects it and
    SelectedPair sees it once; when the connection closes, no pair is left."""
    install_host_addresses(["127.0.0.1", "127.0.0.2"])
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer.createDataChannel("x")  # a DTLS transport, no media needed
    await viewer.setLocalDescription(await viewer.createOffer())
    install_host_addresses(["127.0.0.1"])
    agent = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await agent.setRemoteDescription(viewer.localDescription)
        await agent.setLocalDescription(await agent.createAnswer())
        await viewer.setRemoteDescription(agent.localDescription)
        await wait_until(lambda: agent.connectionState == viewer.connectionState == "connected")
        assert agent.sctp is not None and viewer.sctp is not None
        selected = internals.SelectedPair(agent.sctp.transport)
        assert selected.moved() and not selected.moved(), "seen once, then unchanged"
        first = selected.udp()
        assert first is not None
        sock, address = first
        agent_addr = sock.getsockname()
        sock.close()  # the duplicate only: aioice's socket stays open
        old, new = await nominate_another_pair(viewer.sctp.transport.transport)
        assert address == old.local_addr != new.local_addr
        await wait_until(selected.moved, timeout=5)
        assert selected.kinds() == ("host", "host")
        second = selected.udp()
        assert second is not None
        sock, address = second
        assert address == new.local_addr and sock.getsockname() == agent_addr
        sock.close()
        assert not selected.moved()
    finally:
        await agent.close()
        await viewer.close()
    assert selected.moved() and selected.pair is None and selected.udp() is None


def test_the_aiortc_internals_the_send_path_relies_on_are_there() -> None:
    internals.check()


def test_the_internals_check_names_what_an_upgrade_removed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiortc import RTCRtpSender

    monkeypatch.delattr(RTCRtpSender, "_send_rtcp")
    with pytest.raises(internals.InternalsChanged, match=r"RTCRtpSender\._send_rtcp is gone"):
        internals.check()


def test_the_internals_check_names_the_codec_table_and_transceiver_codecs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """H.265 relies on aiortc's codec table and a transceiver's negotiated codecs: an
    upgrade that renames either fails here with its name."""
    import aiortc.codecs

    monkeypatch.delattr(aiortc.codecs, "CODECS")
    with pytest.raises(internals.InternalsChanged, match=r"aiortc\.codecs\.CODECS is gone"):
        internals.check()
    with pytest.raises(internals.InternalsChanged, match=r"aiortc\.codecs\.CODECS is gone"):
        internals.register_h265()
    monkeypatch.undo()

    class Renamed:  # a transceiver of a release that calls its codecs something else
        pass

    with pytest.raises(internals.InternalsChanged, match=r"RTCRtpTransceiver\._codecs"):
        internals.set_codecs(Renamed(), [])  # type: ignore[arg-type]


def test_the_internals_check_names_the_replacement_of_the_selected_pair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The send path follows aioice's selected pair because a later nominated pair replaces
    it (Connection.check_complete): a release that stops doing so fails here."""
    def check_complete(self: Any, pair: Any) -> None:  # keeps the first pair forever
        self._nominated.setdefault(pair.component, pair)

    monkeypatch.setattr(aioice.ice.Connection, "check_complete", check_complete)
    with pytest.raises(internals.InternalsChanged, match=r"check_complete"):
        internals.check()


def test_the_internals_check_names_libsrtp_protect_if_its_signature_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame is protected in place by libsrtp 2's srtp_protect (length in and out
    through one int pointer); a pylibsrtp built on libsrtp 3's signature fails here."""
    class Libsrtp3:
        ffi = srtp_binding.ffi

        class lib:  # stands for the cffi library
            srtp_protect = srtp_binding.ffi.cast(
                "int(*)(void *, const uint8_t *, size_t, uint8_t *, size_t *, size_t)", 0)

    monkeypatch.setattr(internals, "srtp_binding", Libsrtp3)
    with pytest.raises(internals.InternalsChanged, match=r"srtp_protect"):
        internals.check()
    monkeypatch.undo()

    class Renamed:  # a pylibsrtp.Session that keeps its context under another name
        pass

    with pytest.raises(internals.InternalsChanged, match=r"pylibsrtp\.Session\._srtp"):
        internals.srtp_in_place(Renamed())


def test_a_payload_whose_tag_would_not_fit_the_buffer_is_refused() -> None:
    """Audio passed through as it arrives has no size limit: one whose SRTP tag would run
    past the shared buffer is refused before libsrtp writes there."""
    tx, _ = sessions()
    stream = RtpStream(PARAMS, tx)
    n = SCRATCH_BYTES - 12 - 4  # fits without the tag, not with it
    with pytest.raises(ValueError, match="too large"):
        stream.send_frame((Payload(b"", memoryview(bytes(n)), True, n),), 0,
                          lambda run, segment: True)


def unprotect_large(rx: pylibsrtp.Session, packet: bytes) -> bytes:
    """Like ``rx.unprotect``, for packets over the 1,500 bytes pylibsrtp's buffer holds."""
    ffi, lib = srtp_binding.ffi, srtp_binding.lib
    buffer = ffi.new("char[]", packet)
    length = ffi.new("int *", len(packet))
    assert lib.srtp_unprotect(rx._srtp[0], buffer, length) == 0
    return bytes(ffi.buffer(buffer, length[0]))


@pytest.mark.parametrize("rtx", [True, False])
def test_a_nack_for_a_packet_larger_than_a_mtu_is_answered(rtx: bool) -> None:
    """Audio is passed through as the camera sends it: a frame may be larger than pylibsrtp's
    own buffer, and its retransmission is protected in place like the first send."""
    tx, rx = sessions()
    params = PARAMS if rtx else StreamParams(ssrc=PARAMS.ssrc, payload_type=0, clock=8000,
                                             cname="agent-x")
    stream = RtpStream(params, tx)
    first = stream.seq
    body = bytes(range(256)) * 16  # 4 kB of G.711: half a second
    stream.frame((Payload(b"", memoryview(body), False, len(body)),), 0)
    (again,) = stream.retransmit([first])
    packet = unprotect_large(rx, again)
    _, b1, seq, _, ssrc = struct.unpack("!BBHII", packet[:12])
    if rtx:
        assert (ssrc, b1, packet[12:14]) == (PARAMS.rtx_ssrc, 103, struct.pack("!H", first))
        assert packet[14:] == body
    else:
        assert (ssrc, b1, seq, packet[12:]) == (PARAMS.ssrc, 0, first, body)


def encoded(count: int) -> list[MediaPacket]:
    """``count`` frames of real 64x64 H.264 (x264, one GOP, no B-frames), which the viewer
    decodes."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width = codec.height = 64
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, 30)
    codec.options = {"bf": "0", "g": "600", "tune": "zerolatency", "preset": "ultrafast"}
    data: list[bytes] = []
    for n in range(count):
        picture = av.VideoFrame(64, 64, "yuv420p")
        for plane in picture.planes:
            plane.update(bytes([n * 20 % 256]) * plane.buffer_size)
        picture.pts = n
        data += [bytes(p) for p in codec.encode(picture)]
    data += [bytes(p) for p in codec.encode(None)]
    return [MediaPacket(True, d, n * 3000, Fraction(1, 90_000), n == 0)
            for n, d in enumerate(data)]


def camera_with_gop(gop: list[MediaPacket]) -> CameraHub:
    """A camera whose packets the test delivers itself (no pull thread), ``gop`` cached."""
    hub = CameraHub("cam", lambda: None,  # type: ignore[arg-type, return-value]
                    idle_grace=60, always_on=False, gop_cache=True, queue_packets=100,
                    reconnect_max=1)
    hub._pulling = True
    hub._epoch = 1
    hub.info = StreamInfo("h264", 64, 64, 30.0, b"")
    for packet in gop:  # the cached GOP every viewer starts with
        hub._deliver(1, packet)
    return hub


async def packets_received(viewer: RTCPeerConnection) -> int:
    stats = await viewer.getStats()
    return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")


@pytest.mark.parametrize("fails", ["replayed", "live"])
async def test_a_viewer_whose_send_fails_stops_alone(
        fails: str, restored_lookup: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two viewers of one camera, aiortc peers on loopback. Protecting one viewer's packets
    fails (libsrtp refuses): in the queued path (the replayed GOP) or in the camera's read
    (live frames). That viewer's session ends, logged, with no exception left on the loop; the
    other one keeps getting every live frame."""
    install_host_addresses(["127.0.0.1"])
    frames = encoded(13)
    hub = camera_with_gop(frames[:3])

    failing = False
    doomed: list[DirectTrack] = []
    real_send = RtpStream.send_frame

    def send_frame(self: RtpStream, payloads: tuple[Payload, ...], ticks: int,
                   emit: Any) -> bool:
        if failing and doomed and self is doomed[0].stream:
            raise pylibsrtp.Error("srtp_protect failed: status 2")
        return real_send(self, payloads, ticks, emit)

    monkeypatch.setattr(RtpStream, "send_frame", send_frame)
    viewers, sessions = [], []
    try:
        for _ in range(2):
            viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            viewer.addTransceiver("video", direction="recvonly")
            await viewer.setLocalDescription(await viewer.createOffer())
            session, _ = await ViewerSession.answer(
                "cam", hub, viewer.localDescription.sdp, RTCConfiguration(iceServers=[]),
                direct=True)
            viewers.append(viewer)
            sessions.append(session)
        track, other = (s.tracks[0] for s in sessions)
        assert isinstance(track, DirectTrack) and isinstance(other, DirectTrack)
        run = track._tasks[0]  # its sending task (DirectTrack._run)
        doomed.append(track)
        failing = fails == "replayed"
        with capture_logs() as logs:
            for viewer, session in zip(viewers, sessions, strict=True):
                await viewer.setRemoteDescription(
                    RTCSessionDescription(session.pc.localDescription.sdp, "answer"))
            gop = sum(len(p.rtp or ()) for _, p in hub._gop)  # the replay: one packet or more
            await wait_until(lambda: other.stream is not None and other.stream.packets >= gop)
            if fails == "live":  # once the whole replay went out: then live frames only
                await wait_until(lambda: track.stream is not None and track.stream.packets >= gop)
                failing = True
            assert other.stream is not None
            replayed = other.stream.packets
            await asyncio.sleep(0.1)
            before = await packets_received(viewers[1])
            live = 0
            for frame_ in map(hub._packetized, frames[3:]):
                live += len(frame_.rtp or ())
                hub._deliver(1, frame_)
                await asyncio.sleep(0.01)
            await wait_until(lambda: track._consumer not in hub._consumers)
            await wait_until(lambda: other.stream is not None
                             and other.stream.packets >= replayed + live)
            await asyncio.sleep(0.1)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["webrtc_send_failed"]
        assert other._consumer in hub._consumers
        assert await packets_received(viewers[1]) - before >= live, "every live packet"
        await wait_until(lambda: sessions[0].closed)  # its player sees the session end
        assert not sessions[1].closed
        assert run.done() and (run.cancelled() or run.exception() is None)
    finally:
        for session in sessions:
            await session.close()
        for viewer in viewers:
            await viewer.close()


def report_loops() -> list[asyncio.Task[Any]]:
    """aiortc's RTCP loops of senders still running (and the agent's replacement of it)."""
    return [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").endswith(
                ("RTCRtpSender._run_rtcp", "no_report_loop"))]


async def test_aiortc_s_report_loop_ends_once_started_and_the_session_still_closes(
        restored_lookup: None) -> None:
    """aiortc's sender would wake the agent about once a second per viewer to build reports
    the agent never sends (it sends its own): that loop ends as soon as it has started, and
    closing the session, whose sender.stop() waits for that loop, still completes."""
    install_host_addresses(["127.0.0.1"])
    hub = camera_with_gop(encoded(3))
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer.addTransceiver("video", direction="recvonly")
    await viewer.setLocalDescription(await viewer.createOffer())
    session, _ = await ViewerSession.answer(
        "cam", hub, viewer.localDescription.sdp, RTCConfiguration(iceServers=[]), direct=True)
    try:
        await viewer.setRemoteDescription(
            RTCSessionDescription(session.pc.localDescription.sdp, "answer"))
        track = session.tracks[0]
        assert isinstance(track, DirectTrack)
        await wait_until(lambda: track.stream is not None and track.stream.packets > 0)
        sender = track.transceiver.sender
        await wait_until(lambda: sender._RTCRtpSender__started)  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert report_loops() == []
        async with asyncio.timeout(5):
            await session.close()
    finally:
        await session.close()
        await viewer.close()


async def _rtcp_lets_cancellation_through(self: Any) -> None:
    self._started.set()
    await asyncio.sleep(1)
    self._exited.set()


async def _rtcp_awaits_before_it_is_started(self: Any) -> None:
    await asyncio.sleep(0)
    self._started.set()
    try:  # noqa: SIM105 (aiortc's own words, which the check reads)
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        pass
    self._exited.set()


@pytest.mark.parametrize(("report_loop", "named"), [
    (_rtcp_lets_cancellation_through, "_run_rtcp ending on cancellation"),
    (_rtcp_awaits_before_it_is_started, "_run_rtcp marking itself started before it awaits"),
])
def test_the_internals_check_names_a_report_loop_the_agent_could_not_end(
        monkeypatch: pytest.MonkeyPatch, report_loop: Any, named: str) -> None:
    """aiortc's report loop is cancelled at its first await; a release whose loop would not
    end then, or would not have marked itself started (sender.stop() waits for both), would
    hang every session's close: the check names it instead."""
    from aiortc import RTCRtpSender

    monkeypatch.setattr(RTCRtpSender, "_run_rtcp", report_loop)
    with pytest.raises(internals.InternalsChanged, match=named):
        internals.check()
