"""Every use of aiortc's and aioice's private attributes, in one place (and nowhere else).

The agent keeps aiortc for SDP, ICE, DTLS and the SRTP keys, and sends the media itself
(agent/webrtc/rtpsend.py). aiortc has no public way to hand over the RTP path, so four of its
internals are used, and two of pylibsrtp's (its SRTP), each through one function here:

- ``RTCDtlsTransport._tx_srtp``: the outgoing ``pylibsrtp.Session`` keyed by the DTLS
  handshake (RFC 5764 §4.2);
- ``pylibsrtp.Session._srtp`` and ``pylibsrtp._binding``: that session's libsrtp context and
  libsrtp's ``srtp_protect`` itself, so that a frame's packets are protected in place in
  one buffer (agent/webrtc/rtpsend.py) instead of each copied in and out of pylibsrtp's;
- ``RTCIceTransport._connection._nominated[1]``: aioice's selected candidate pair, whose
  ``protocol.transport`` is the UDP socket ICE chose and ``remote_addr`` the peer; aioice
  replaces it when the peer nominates another pair, so the send path looks at it once per
  frame (``SelectedPair``);
- ``RTCRtpSender._handle_rtcp_packet``, ``RTCRtpSender._send_rtcp`` and
  ``RTCRtpSender._run_rtcp``: replaced on the one sender instance so that RTCP for the media
  (reports, NACK, PLI) comes to the agent, and aiortc's own report loop (which would wake the
  process about once a second per viewer to build reports with zero counters) ends as soon
  as it has started, the way ``stop()`` ends it;
- ``aiortc.codecs.CODECS`` and ``RTCRtpTransceiver._codecs``: aiortc 1.x knows no H.265, so
  an ``H265/90000`` entry is added to its codec table (so that an offer's H265 formats are
  kept and can be preferred) and the video transceiver's negotiated codecs are set to the
  H265 format chosen for the camera (agent/webrtc/h265.py) before the answer is made; the
  agent, not aiortc, sends the media.

``check()`` verifies they are all there; tests/unit/test_webrtc_internals.py runs it, so an
aiortc, aioice or pylibsrtp upgrade that removes one fails with the attribute's name. The tested
versions are pinned in constraints.txt.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aioice
import aioice.ice
import aiortc
import aiortc.codecs
import pylibsrtp
from aiortc import (
    RTCDtlsTransport,
    RTCRtpCodecParameters,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.rtcrtpparameters import RTCRtcpFeedback
from pylibsrtp import _binding as srtp_binding


class InternalsChanged(RuntimeError):
    """aiortc or aioice no longer has an internal attribute the agent relies on."""


def _missing(owner: str, name: str) -> InternalsChanged:
    return InternalsChanged(
        f"aiortc {aiortc.__version__} / aioice {aioice.__version__}: {owner}.{name} is gone; "
        "the agent's WebRTC send path (agent/webrtc/internals.py) needs it — pin the versions "
        "in constraints.txt or adapt this module")


def srtp_session(dtls: RTCDtlsTransport) -> Any:
    """The outgoing SRTP session (``pylibsrtp.Session``), or None before the handshake."""
    if not hasattr(dtls, "_tx_srtp"):
        raise _missing("RTCDtlsTransport", "_tx_srtp")
    return dtls._tx_srtp


def _ice_connection(dtls: RTCDtlsTransport) -> Any:
    connection = getattr(dtls.transport, "_connection", None)
    if connection is None:
        raise _missing("RTCIceTransport", "_connection")
    if not hasattr(connection, "_nominated"):
        raise _missing("aioice.Connection", "_nominated")
    return connection


class SelectedPair:
    """ICE's selected pair (component 1) of one peer connection, followed. aioice replaces it
    whenever a later nominated pair succeeds (a controlling peer may nominate another one at
    any time, after a network change say), and sends its own traffic there from then on."""

    __slots__ = ("_connection", "pair")

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self._connection = _ice_connection(dtls)
        self.pair: Any = None  # the pair last seen by ``moved``

    def moved(self) -> bool:
        """True when the selected pair is not the one last seen (and it is seen now): on the
        first call if a pair is selected, then after each change. One dict lookup."""
        pair = self._connection._nominated.get(1)
        if pair is self.pair:
            return False
        self.pair = pair
        return True

    def udp(self) -> tuple[socket.socket, tuple[str, int]] | None:
        """A duplicate of the UDP socket of the pair last seen and the peer's address; None
        if no pair is selected or it is not plain UDP (a TURN relay: use ``ice_send``)."""
        pair = self.pair
        if pair is None or type(pair.protocol) is not aioice.ice.StunProtocol:
            return None
        transport = getattr(pair.protocol, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.type != socket.SOCK_DGRAM or sock.fileno() < 0:
            return None
        # A duplicate descriptor of the same socket (non-blocking, shared with aioice): a
        # plain socket object, so sendmsg with UDP_SEGMENT works; closed by its owner.
        dup = socket.socket(sock.family, socket.SOCK_DGRAM, fileno=os.dup(sock.fileno()))
        return dup, pair.remote_addr

    def kinds(self) -> tuple[str, str]:
        """The candidate types (host, srflx, prflx, relay) of the pair last seen, for logs."""
        pair = self.pair
        return ((pair.local_candidate.type, pair.remote_candidate.type) if pair is not None
                else ("", ""))


def ice_send(dtls: RTCDtlsTransport) -> Callable[[bytes], Awaitable[None]]:
    """aioice's own per-datagram send (for pairs that are not plain UDP)."""
    return dtls.transport._connection.send


def take_over_rtcp(sender: RTCRtpSender,
                   handler: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """RTCP packets aiortc routes to ``sender`` go to ``handler``; aiortc's own reports for
    it (SR, SDES) are not made, and none (BYE included) is sent. Called before the sender
    starts (it does once DTLS is connected); later, aiortc's report loop would run on."""
    for name in ("_handle_rtcp_packet", "_send_rtcp", "_run_rtcp"):
        if not callable(getattr(sender, name, None)):
            raise _missing("RTCRtpSender", name)
    sender._handle_rtcp_packet = handler  # type: ignore[method-assign,assignment]

    async def silent(packets: list[Any]) -> None:
        return None

    sender._send_rtcp = silent  # type: ignore[method-assign]
    report_loop = sender._run_rtcp

    async def no_report_loop() -> None:
        # aiortc's loop marks itself started (its stop() waits for that), sleeps, and on
        # cancellation sends a BYE (to ``silent``) and marks itself ended: cancelled at its
        # first sleep, exactly as stop() would cancel it later.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        await report_loop()

    sender._run_rtcp = no_report_loop  # type: ignore[method-assign]


H265_MIME = "video/H265"


def register_h265() -> None:
    """Add H265/90000 (and its RTX) to aiortc's video codec table, once. Transceivers that
    prefer H.264 (every one the agent makes for an H.264 camera) never pick it."""
    if not hasattr(aiortc.codecs, "CODECS") or "video" not in aiortc.codecs.CODECS:
        raise _missing("aiortc.codecs", "CODECS")
    video = aiortc.codecs.CODECS["video"]
    if any(c.mimeType.lower() == H265_MIME.lower() for c in video):
        return
    used = {c.payloadType for kind in aiortc.codecs.CODECS.values() for c in kind}
    free = [pt for pt in range(96, 128) if pt not in used and pt + 1 not in used]
    pt = free[0]
    video += [
        RTCRtpCodecParameters(mimeType=H265_MIME, clockRate=90_000, payloadType=pt,
                              rtcpFeedback=[RTCRtcpFeedback(type="nack"),
                                            RTCRtcpFeedback(type="nack", parameter="pli"),
                                            RTCRtcpFeedback(type="goog-remb")]),
        RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90_000, payloadType=pt + 1,
                              parameters={"apt": pt}),
    ]


def set_codecs(transceiver: RTCRtpTransceiver, codecs: list[RTCRtpCodecParameters]) -> None:
    """The codecs (and so the answer's formats) of a transceiver after
    ``setRemoteDescription`` and before ``createAnswer``."""
    if not hasattr(transceiver, "_codecs"):
        raise _missing("RTCRtpTransceiver", "_codecs")
    transceiver._codecs = codecs


#: libsrtp 2's ``srtp_protect``: protects the packet at ``rtp_hdr`` in place, writing the
#: tag after it, and sets ``*len_ptr`` to the protected length (libsrtp 3 changed this).
SRTP_PROTECT_TYPE = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"


def srtp_in_place(session: Any) -> tuple[Any, Any, Callable[..., int]]:
    """``(ffi, context, srtp_protect)`` for a ``pylibsrtp.Session``: the cffi module that
    allocates buffers libsrtp can work in, the session's libsrtp context, and the function
    that protects one packet in such a buffer (0, libsrtp's ``srtp_err_status_ok``, on
    success). The session must outlive their use: it frees the context."""
    if not hasattr(session, "_srtp"):
        raise _missing("pylibsrtp.Session", "_srtp")
    return srtp_binding.ffi, session._srtp[0], srtp_binding.lib.srtp_protect


def check() -> None:
    """Raise InternalsChanged naming the first internal that is missing."""
    if "self._srtp" not in inspect.getsource(pylibsrtp.Session.__init__):
        raise _missing("pylibsrtp.Session", "_srtp")
    protect = getattr(srtp_binding.lib, "srtp_protect", None)
    if protect is None or srtp_binding.ffi.typeof(protect).cname != SRTP_PROTECT_TYPE:
        raise _missing("pylibsrtp._binding.lib", f"srtp_protect as {SRTP_PROTECT_TYPE}")
    init = inspect.getsource(RTCDtlsTransport.__init__)
    if "self._tx_srtp" not in init:
        raise _missing("RTCDtlsTransport", "_tx_srtp")
    if "self._connection" not in inspect.getsource(aiortc.RTCIceTransport):
        raise _missing("RTCIceTransport", "_connection")
    if "self._nominated" not in inspect.getsource(aioice.ice.Connection.__init__):
        raise _missing("aioice.Connection", "_nominated")
    for name in ("remote_addr", "local_candidate", "remote_candidate"):
        if not hasattr(aioice.ice.CandidatePair, name) \
                and f"self.{name}" not in inspect.getsource(aioice.ice.CandidatePair):
            raise _missing("aioice.CandidatePair", name)
    # a later nominated pair replaces the selected one (what SelectedPair follows)
    if "self._nominated[pair.component] = pair" not in inspect.getsource(
            aioice.ice.Connection.check_complete):
        raise _missing("aioice.Connection", "check_complete replacing _nominated[component]")
    if "self.transport" not in inspect.getsource(aioice.ice.StunProtocol):
        raise _missing("aioice.StunProtocol", "transport")
    for name in ("_handle_rtcp_packet", "_send_rtcp", "_run_rtcp"):
        if not callable(getattr(RTCRtpSender, name, None)):
            raise _missing("RTCRtpSender", name)
    send = inspect.getsource(RTCRtpSender.send)
    if "self._run_rtcp()" not in send:
        raise _missing("RTCRtpSender", "send() starting self._run_rtcp()")
    report_loop = inspect.getsource(RTCRtpSender._run_rtcp)
    if "except asyncio.CancelledError" not in report_loop or "exited.set()" not in report_loop:
        raise _missing("RTCRtpSender", "_run_rtcp ending on cancellation")
    # cancelled at its first await: it must have marked itself started before (stop() waits)
    if not 0 <= report_loop.find("started.set()") < report_loop.find("await "):
        raise _missing("RTCRtpSender", "_run_rtcp marking itself started before it awaits")
    if not isinstance(getattr(aiortc.codecs, "CODECS", None), dict):
        raise _missing("aiortc.codecs", "CODECS")
    if "self._codecs" not in inspect.getsource(RTCRtpTransceiver.__init__):
        raise _missing("RTCRtpTransceiver", "_codecs")
    peer = inspect.getsource(aiortc.RTCPeerConnection)
    if "transceiver._codecs" not in peer or "CODECS[media.kind]" not in peer:
        raise _missing("RTCPeerConnection", "transceiver._codecs (answer codecs)")
