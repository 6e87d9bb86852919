"""The sans-I/O RTSP request parser, URL/auth/transport parsing and the SDP."""

from __future__ import annotations

import base64

from agent.media.stream import AudioInfo, StreamInfo
from agent.rtsp import sdp
from agent.rtsp.protocol import (
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    Interleaved,
    ParseError,
    Parser,
    Request,
    basic_password,
    parse_transport,
    parse_url,
    response,
)

SC = b"\x00\x00\x00\x01"


def events(*chunks: bytes) -> list[object]:
    parser = Parser()
    out: list[object] = []
    for chunk in chunks:
        out += list(parser.feed(chunk))
    return out


def test_pipelined_requests_split_anywhere() -> None:
    wire = (b"OPTIONS rtsp://a/cam RTSP/1.0\r\nCSeq: 1\r\n\r\n"
            b"DESCRIBE rtsp://a/cam RTSP/1.0\r\nCSeq: 2\r\nAccept: application/sdp\r\n\r\n")
    for cut in range(len(wire)):
        got = events(wire[:cut], wire[cut:])
        assert [(r.method, r.cseq) for r in got if isinstance(r, Request)] == [
            ("OPTIONS", "1"), ("DESCRIBE", "2")]


def test_body_and_interleaved_frames_between_requests() -> None:
    wire = (b"SET_PARAMETER rtsp://a/cam RTSP/1.0\r\nCSeq: 3\r\nContent-Length: 4\r\n\r\nab\r\n"
            b"$\x01\x00\x05hello" b"GET_PARAMETER rtsp://a/cam RTSP/1.0\r\nCSeq: 4\r\n\r\n")
    got = events(wire)
    assert isinstance(got[0], Request) and got[0].body == b"ab\r\n"
    assert got[1] == Interleaved(1, 5)
    assert isinstance(got[2], Request) and got[2].method == "GET_PARAMETER"


def test_a_huge_interleaved_frame_is_discarded_as_it_comes() -> None:
    parser = Parser()
    assert list(parser.feed(b"$\x00\xff\xff")) == [Interleaved(0, 65535)]
    for _ in range(65535 // 1000):
        assert list(parser.feed(b"\x00" * 1000)) == []
    assert parser.partial
    assert len(parser._buf) == 0  # nothing held


def test_limits_give_a_status() -> None:
    (line,) = events(b"DESCRIBE rtsp://a/" + b"x" * (MAX_REQUEST_LINE + 10))
    assert isinstance(line, ParseError) and line.status == 414
    many = b"OPTIONS * RTSP/1.0\r\n" + b"X-A: b\r\n" * (MAX_HEADERS + 5)
    (headers,) = events(many)
    assert isinstance(headers, ParseError) and headers.status == 431
    (version,) = events(b"OPTIONS * HTTP/1.1\r\n\r\n")
    assert isinstance(version, ParseError) and version.status == 505
    (garbage,) = events(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
    assert isinstance(garbage, ParseError) and garbage.status == 400
    (body,) = events(b"ANNOUNCE * RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 99999999\r\n\r\n")
    assert isinstance(body, ParseError) and body.status == 413


def test_after_an_error_nothing_more_is_parsed() -> None:
    parser = Parser()
    assert isinstance(next(iter(parser.feed(b"BAD\r\n\r\n"))), ParseError)
    assert list(parser.feed(b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n")) == []


def test_response_echoes_cseq() -> None:
    wire = response(200, "7", {"Public": "OPTIONS"}, b"v=0\r\n")
    assert wire.startswith(b"RTSP/1.0 200 OK\r\nCSeq: 7\r\n")
    assert wire.endswith(b"Content-Length: 5\r\n\r\nv=0\r\n")


def test_url_token_and_track() -> None:
    t = parse_url("rtsp://10.0.0.2:8554/cam1/trackID=1?token=tra_x")
    assert t is not None and (t.camera, t.track, t.token) == ("cam1", "trackID=1", "tra_x")
    assert parse_url("rtsp://h/cam1/") is not None and parse_url("rtsp://h/") is None
    assert parse_url("rtsp://h/a/b/c") is None and parse_url("http://h/cam") is None


def test_basic_password_is_the_token_any_user() -> None:
    def header(text: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(text.encode()).decode()}

    assert basic_password(header("anyone:tra_secret:with:colons")) == "tra_secret:with:colons"
    assert basic_password(header("nouser")) is None
    assert basic_password({"authorization": "Basic !!!"}) is None
    assert basic_password({"authorization": "Digest x"}) is None


def test_transport_choices() -> None:
    tcp = parse_transport("RTP/AVP/TCP;unicast;interleaved=2-3")
    assert tcp is not None and tcp.tcp and tcp.channels == (2, 3)
    udp = parse_transport("RTP/AVP;unicast;client_port=5000-5001")
    assert udp is not None and not udp.tcp and udp.client_ports == (5000, 5001)
    multi = parse_transport("RTP/AVP;multicast;port=5000-5001")
    assert multi is not None and multi.multicast
    fallback = parse_transport("RTP/AVP;multicast,RTP/AVP/TCP;interleaved=0-1")
    assert fallback is not None and fallback.tcp
    assert parse_transport("RAW/RAW/UDP;unicast") is None
    assert parse_transport("RTP/AVP;unicast;client_port=99999-5") is None


def test_sdp_h264_with_parameter_sets_and_pcmu() -> None:
    sps, pps = bytes([0x67, 0x42, 0xC0, 0x1E, 0x9A]), bytes([0x68, 0xCE, 0x3C, 0x80])
    info = StreamInfo("h264", 640, 360, 30.0, SC + sps + SC + pps,
                      AudioInfo("pcm_mulaw", 8000, 1))
    text = sdp.describe(info, b"", "127.0.0.1")
    assert "a=rtpmap:96 H264/90000" in text and "profile-level-id=42c01e" in text
    b64 = base64.b64encode
    assert f"sprop-parameter-sets={b64(sps).decode()},{b64(pps).decode()}" in text
    assert "m=audio 0 RTP/AVP 0" in text and "a=control:trackID=1" in text


def test_sdp_h265_parameter_sets_from_the_keyframe_and_aac_as_opus() -> None:
    vps, sps, pps = bytes([0x40, 1, 9]), bytes([0x42, 1, 8]), bytes([0x44, 1, 7])
    info = StreamInfo("hevc", 640, 360, None, b"", AudioInfo("aac", 48000, 2))
    text = sdp.describe(info, SC + vps + SC + sps + SC + pps + SC + bytes([0x26, 1, 5]), "::1")
    assert "a=rtpmap:96 H265/90000" in text and "IN IP6" in text
    assert f"sprop-vps={base64.b64encode(vps).decode()}" in text
    assert "a=rtpmap:97 opus/48000/2" in text  # the agent transcodes AAC once per camera
