"""The doctor's RTSP client, without I/O: URLs, responses, challenges, Digest, SDP codecs.

Digest vectors come from the RFCs (2617 §3.5, 7616 §3.9.1) and, for the RFC 2069 form
without qop that many cameras use, from Python's own urllib implementation.
"""

from __future__ import annotations

import base64

import pytest

from agent.media import rtsp
from agent.media.rtsp import Challenge

# -- Digest ---------------------------------------------------------------------------------

RFC2617 = ('Digest realm="testrealm@host.com", qop="auth,auth-int", '
           'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"')
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


def rfc7616(algorithm: str) -> str:
    return (f'Digest realm="http-auth@example.org", qop="auth, auth-int", '
            f'algorithm={algorithm}, nonce="{RFC7616_NONCE}", '
            'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')


@pytest.mark.parametrize(("header", "method", "uri", "user", "password", "cnonce", "response"), [
    (RFC2617, "GET", "/dir/index.html", "Mufasa", "Circle Of Life", "0a4f113b",
     "6629fae49393a05397450978507c4ef1"),
    (rfc7616("MD5"), "GET", "/dir/index.html", "Mufasa", "Circle of Life", RFC7616_CNONCE,
     "8ca523f5e9506fed4657c9700eebdbec"),
    (rfc7616("SHA-256"), "GET", "/dir/index.html", "Mufasa", "Circle of Life", RFC7616_CNONCE,
     "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    # No qop (RFC 2069), as most cameras answer; expected value from urllib's digest handler.
    ('Digest realm="cam", nonce="abc123"', "DESCRIBE", "rtsp://10.0.0.5/stream", "admin",
     "s3cret", None, "39279250d8f5bfaf7076caf4ce177f9a"),
])
def test_digest_response(header: str, method: str, uri: str, user: str, password: str,
                         cnonce: str | None, response: str) -> None:
    answer = rtsp.digest_authorization(rtsp.parse_challenge(header), method, uri, user,
                                       password, cnonce=cnonce)
    fields = rtsp.parse_challenge(answer).params
    assert answer.startswith("Digest ")
    assert fields["response"] == response
    assert fields["uri"] == uri and fields["username"] == user
    if "qop" in header:
        assert fields["qop"] == "auth" and fields["nc"] == "00000001"
        assert fields["cnonce"] == cnonce
        assert fields["opaque"] == rtsp.parse_challenge(header).params["opaque"]
    else:
        assert "qop" not in fields and "cnonce" not in fields


@pytest.mark.parametrize(("header", "problem"), [
    ('Digest realm="x"', "no nonce"),
    ('Digest realm="x", nonce="n", algorithm=SHA-512-256', "unsupported Digest algorithm"),
    ('Digest realm="x", nonce="n", qop="auth-int"', "unsupported Digest qop"),
])
def test_digest_refuses_what_it_cannot_answer(header: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        rtsp.digest_authorization(rtsp.parse_challenge(header), "DESCRIBE", "rtsp://h/", "u",
                                  "p")


@pytest.mark.parametrize(("header", "scheme", "params"), [
    ('Basic realm="IP Camera"', "basic", {"realm": "IP Camera"}),
    ('Digest realm="a \\"quoted\\" realm", nonce=abc, stale=FALSE', "digest",
     {"realm": 'a "quoted" realm', "nonce": "abc", "stale": "FALSE"}),
    ('digest REALM="x",NONCE="y"', "digest", {"realm": "x", "nonce": "y"}),
    ("Bearer", "bearer", {}),
])
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert rtsp.parse_challenge(header) == Challenge(scheme, params)


@pytest.mark.parametrize(("headers", "expected"), [
    (['Basic realm="c"', 'Digest realm="c", nonce="n"'], "digest"),  # Digest preferred
    (['Basic realm="c"'], "basic"),
    (['Digest realm="c", nonce="n", algorithm=SHA-512-256', 'Basic realm="c"'], "basic"),
    (['Negotiate'], None),
    ([], None),
])
def test_authorization_prefers_digest(headers: list[str], expected: str | None) -> None:
    answer = rtsp.authorization([rtsp.parse_challenge(h) for h in headers], "DESCRIBE",
                                "rtsp://h/s", "user", "pa:ss")
    if expected is None:
        assert answer is None
    else:
        assert answer is not None and answer.split()[0].lower() == expected
    if expected == "basic":
        assert answer is not None
        assert base64.b64decode(answer.split()[1]) == b"user:pa:ss"


# -- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "user", "password", "expected"), [
    ("rtsp://10.0.0.5/Streaming/Channels/102", None, None,
     rtsp.Target("rtsp", "10.0.0.5", 554, "rtsp://10.0.0.5/Streaming/Channels/102", None, None)),
    ("rtsp://admin:p%40ss@cam.lan:8554/live?ch=1", None, None,
     rtsp.Target("rtsp", "cam.lan", 8554, "rtsp://cam.lan:8554/live?ch=1", "admin", "p@ss")),
    ("rtsp://old:creds@cam.lan/s", "viewer", "new", rtsp.Target(
        "rtsp", "cam.lan", 554, "rtsp://cam.lan/s", "viewer", "new")),
    ("rtsps://[fd00::5]/s", None, None,
     rtsp.Target("rtsps", "fd00::5", 322, "rtsps://[fd00::5]/s", None, None)),
    ("RTSP://cam", None, None, rtsp.Target("rtsp", "cam", 554, "rtsp://cam/", None, None)),
])
def test_target_keeps_credentials_out_of_the_request_url(
        url: str, user: str | None, password: str | None, expected: rtsp.Target) -> None:
    assert rtsp.target(url, user, password) == expected


@pytest.mark.parametrize("url", ["http://cam/s", "rtsp:///nohost"])
def test_target_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError):
        rtsp.target(url)


# -- responses ------------------------------------------------------------------------------


def test_parse_head_keeps_repeated_and_folded_headers() -> None:
    head = (b"RTSP/1.0 401 Unauthorized\r\nCSeq: 2\r\n"
            b'WWW-Authenticate: Digest realm="c",\r\n nonce="n"\r\n'
            b'WWW-Authenticate: Basic realm="c"\r\n\r\n')
    r = rtsp.parse_head(head)
    assert (r.status, r.reason, r.header("cseq")) == (401, "Unauthorized", "2")
    assert r.all("WWW-Authenticate") == ['Digest realm="c", nonce="n"', 'Basic realm="c"']


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
                                  b"RTSP/1.0 abc\r\n\r\n"])
def test_parse_head_refuses_what_is_not_rtsp(head: bytes) -> None:
    with pytest.raises(rtsp.RtspProtocolError):
        rtsp.parse_head(head)


def test_request_has_cseq_and_no_credentials() -> None:
    data = rtsp.request("DESCRIBE", "rtsp://cam/s", 3, {"Accept": "application/sdp"})
    lines = data.decode().split("\r\n")
    assert lines[0] == "DESCRIBE rtsp://cam/s RTSP/1.0"
    assert "CSeq: 3" in lines and "Accept: application/sdp" in lines
    assert data.endswith(b"\r\n\r\n")


# -- SDP ------------------------------------------------------------------------------------

GST_H264 = """v=0
o=- 1188340656180883 1 IN IP4 127.0.0.1
s=Session streamed with GStreamer
t=0 0
m=video 0 RTP/AVP 96
c=IN IP4 0.0.0.0
a=rtpmap:96 H264/90000
a=fmtp:96 packetization-mode=1;sprop-parameter-sets=Z0LAHtkDxWhAAAADAEAAAA8jxYuS,aMuMsg==
a=control:stream=0
m=audio 0 RTP/AVP 0
a=control:stream=1
"""
HIKVISION_H265 = ("v=0\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H265/90000\r\n"
                  "m=audio 0 RTP/AVP 104\r\na=rtpmap:104 mpeg4-generic/16000/1\r\n")


@pytest.mark.parametrize(("sdp", "video", "audio"), [
    (GST_H264, "h264", "pcm_mulaw"),
    (HIKVISION_H265, "hevc", "aac"),
    ("m=video 0 RTP/AVP 26\n", "mjpeg", None),  # static payload type 26 (RFC 3551)
    ("m=video 0 RTP/AVP 97\na=rtpmap:97 JPEG/90000\n", "mjpeg", None),
    ("m=audio 0 RTP/AVP 8\n", None, "pcm_alaw"),  # audio only: no video
    ("m=video 0 RTP/AVP 98\n", "unknown", None),  # dynamic type without rtpmap
    ("m=application 0 RTP/AVP 107\na=rtpmap:107 vnd.onvif.metadata/90000\n"
     "m=video 0 RTP/AVP 96\na=rtpmap:96 h264/90000\n", "h264", None),
])
def test_sdp_codecs(sdp: str, video: str | None, audio: str | None) -> None:
    assert rtsp.video_codec(sdp) == video
    audio_codecs = [m.codec for m in rtsp.sdp_media(sdp) if m.kind == "audio"]
    assert audio_codecs == ([audio] if audio else [])
