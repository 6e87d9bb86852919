"""Cheap checks of a WHEP offer, before the WebRTC stack (aiortc) is loaded or parses it."""

from __future__ import annotations


class OfferError(ValueError):
    """The client's SDP offer cannot be answered; the message says why."""


#: An offer for one camera has a video and an audio section (a browser may add a data
#: channel); each media section costs aiortc a transceiver and a few ms to parse, 700 of them
#: held the loop for 0.57 s. Candidates: each remote one costs ICE check pairs.
MAX_MEDIA_SECTIONS = 8
MAX_CANDIDATES = 64


def check_offer(sdp: str) -> None:
    """Cheap checks before aiortc parses anything: the shape and the caps above."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("the body is not an SDP offer (it must start with v=0)")
    text = sdp.replace("\r\n", "\n")
    if "\nm=video " not in text:
        raise OfferError("the offer has no video section (m=video): add a recvonly video "
                         "transceiver")
    media = text.count("\nm=")
    if media > MAX_MEDIA_SECTIONS:
        raise OfferError(f"the offer has {media} media sections; at most "
                         f"{MAX_MEDIA_SECTIONS} are accepted")
    candidates = text.count("\na=candidate:")
    if candidates > MAX_CANDIDATES:
        raise OfferError(f"the offer has {candidates} ICE candidates; at most "
                         f"{MAX_CANDIDATES} are accepted")
