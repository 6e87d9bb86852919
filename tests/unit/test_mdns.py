"""mDNS pure helpers: TXT decoding and its bounds, RTSP URL forming, names, addresses."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from zeroconf import (  # type: ignore[attr-defined]  # not in __all__
    DNSAddress,
    DNSCache,
    RecordUpdate,
    current_time_millis,
)

from agent.discovery import mdns


def wire(*strings: bytes) -> bytes:
    """A TXT record's wire form: each string prefixed by its length."""
    return b"".join(bytes([len(s)]) + s for s in strings)


# -- TXT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", {}),
        (b"\x00", {}),  # RFC 6763 §6.1: an empty TXT record is a single zero byte
        (wire(b"path=/stream1"), {"path": "/stream1"}),
        (wire(b"Path=/a", b"PATH=/b"), {"path": "/a"}),  # §6.4: case-insensitive, first wins
        (wire(b"flag"), {"flag": ""}),  # §6.4: a boolean attribute
        (wire(b"k=a=b"), {"k": "a=b"}),  # only the first "=" separates
        (wire(b"=nokey", b"ok=1"), {"ok": "1"}),  # §6.4: an empty key is ignored
        (wire(b"k\xc3\xa9y=1", b"ok=1"), {"ok": "1"}),  # keys are printable ASCII only
        (wire(b"name=caf\xc3\xa9"), {"name": "café"}),
        (wire(b"name=\xff\xfe"), {"name": "\ufffd\ufffd"}),  # bad UTF-8 replaced, not raised
        (wire(b"name=a\nb\x1b[31mc\x00"), {"name": "ab[31mc"}),  # no control characters
        (b"\x0cpath=/str", {}),  # truncated: the length says 12 bytes, 9 follow
        (wire(b"a=1") + b"\x09", {"a": "1"}),  # a dangling length byte ends parsing
    ],
)
def test_parse_txt(raw: bytes, expected: dict[str, str]) -> None:
    assert mdns.parse_txt(raw) == expected


def test_parse_txt_bounds_entries_and_key_length() -> None:
    many = wire(*(f"k{i}={i}".encode() for i in range(500)))
    parsed = mdns.parse_txt(many)
    assert len(parsed) == mdns.MAX_TXT_ENTRIES
    assert parsed["k0"] == "0"
    assert f"k{mdns.MAX_TXT_ENTRIES}" not in parsed
    long_key = b"k" * (mdns.MAX_TXT_KEY + 1) + b"=1"
    assert mdns.parse_txt(wire(long_key, b"ok=1")) == {"ok": "1"}


def test_parse_txt_value_is_bounded() -> None:
    # One TXT string carries at most 255 bytes; a multi-byte value stays under 255 characters.
    value = "é" * 126
    parsed = mdns.parse_txt(wire(b"v=" + value.encode()))
    assert parsed["v"] == value
    assert len(parsed["v"]) <= mdns.MAX_TXT_VALUE


# -- RTSP URLs ---------------------------------------------------------------------------------

RTSP = "_rtsp._tcp.local."


@pytest.mark.parametrize(
    ("service_type", "addresses", "host", "port", "txt", "expected"),
    [
        (RTSP, ["10.0.0.5"], "cam.local.", 554, {"path": "/stream1"},
         "rtsp://10.0.0.5:554/stream1"),
        (RTSP, ["10.0.0.5"], "cam.local.", 8554, {"path": "live/main"},
         "rtsp://10.0.0.5:8554/live/main"),
        (RTSP, ["10.0.0.5"], None, 554, {}, "rtsp://10.0.0.5:554"),
        (RTSP, ["10.0.0.5"], None, 554, {"path": "  "}, "rtsp://10.0.0.5:554"),
        (RTSP, ["10.0.0.5"], None, 554, {"path": "/a b#c"}, "rtsp://10.0.0.5:554/a%20b%23c"),
        (RTSP, ["10.0.0.5"], None, 554, {"path": "/ch?x=1&y=2"},
         "rtsp://10.0.0.5:554/ch?x=1&y=2"),
        (RTSP, ["10.0.0.5"], None, 554, {"u": "admin"}, "rtsp://10.0.0.5:554"),  # never userinfo
        ("_rtsps._tcp.local.", ["10.0.0.5"], None, 322, {"path": "/s"},
         "rtsps://10.0.0.5:322/s"),
        # IPv4 preferred whatever the order announced
        (RTSP, ["2001:db8::5", "10.0.0.5"], None, 554, {}, "rtsp://10.0.0.5:554"),
        (RTSP, ["2001:db8::5"], None, 554, {}, "rtsp://[2001:db8::5]:554"),
        # link-local IPv6 only: fall back to the host name
        (RTSP, ["fe80::1%2"], "cam-1.local.", 554, {}, "rtsp://cam-1.local:554"),
        (RTSP, [], "cam-1.local.", 554, {}, "rtsp://cam-1.local:554"),
        (RTSP, [], "bad host@x.local.", 554, {}, None),
        (RTSP, [], None, 554, {}, None),
        (RTSP, ["10.0.0.5"], None, None, {}, None),
        (RTSP, ["10.0.0.5"], None, 0, {}, None),
        # Axis: the announced port is the web server's; RTSP is assumed at 554
        ("_axis-video._tcp.local.", ["10.0.0.9"], None, 80, {"path": "/x"},
         "rtsp://10.0.0.9:554/axis-media/media.amp"),
        ("_AXIS-VIDEO._tcp.local.", ["10.0.0.9"], None, 80, {},
         "rtsp://10.0.0.9:554/axis-media/media.amp"),
        ("_http._tcp.local.", ["10.0.0.9"], None, 80, {}, None),
    ],
)
def test_rtsp_url(service_type: str, addresses: list[str], host: str | None, port: int | None,
                  txt: dict[str, str], expected: str | None) -> None:
    assert mdns.rtsp_url(service_type, addresses, host, port, txt) == expected


def test_make_service() -> None:
    raw = wire(b"path=/stream1", b"model=X")
    svc = mdns.make_service(RTSP, "Cam 1._rtsp._tcp.local.", "cam.local.",
                            ["fe80::1%2", "10.0.0.5", "10.0.0.5"], 8554, raw)
    assert svc is not None
    assert svc.instance == "Cam 1._rtsp._tcp.local."
    assert svc.name == "Cam 1"
    assert svc.addresses == ("10.0.0.5", "fe80::1%2")
    assert dict(svc.txt) == {"path": "/stream1", "model": "X"}
    assert svc.rtsp_url == "rtsp://10.0.0.5:8554/stream1"
    same = mdns.make_service(RTSP, "Cam 1._rtsp._tcp.local.", "cam.local.",
                             ["10.0.0.5", "fe80::1%2"], 8554, raw)
    assert same == svc  # equality is what "updated" is decided on
    other = mdns.make_service(RTSP, "Cam 1._rtsp._tcp.local.", "cam.local.",
                              ["10.0.0.5", "fe80::1%2"], 9554, raw)
    assert other is not None and other != svc
    assert mdns.make_service(RTSP, "Cam 1._http._tcp.local.", None, [], 1, None) is None


@pytest.mark.parametrize(
    ("name", "service_type", "label"),
    [
        ("Cam 1._rtsp._tcp.local.", RTSP, "Cam 1"),
        ("Cam.with.dots._rtsp._tcp.local.", RTSP, "Cam.with.dots"),
        ("CAM._RTSP._TCP.LOCAL.", RTSP, "CAM"),
        ("._rtsp._tcp.local.", RTSP, None),
        ("_rtsp._tcp.local.", RTSP, None),
        ("evil.local.", RTSP, None),
    ],
)
def test_instance_label(name: str, service_type: str, label: str | None) -> None:
    assert mdns.instance_label(name, service_type) == label


@pytest.mark.parametrize(
    ("given", "expected"),
    [("_rtsp._tcp", "_rtsp._tcp.local."), ("_RTSP._tcp.local.", "_rtsp._tcp.local."),
     ("_axis-video._tcp.local", "_axis-video._tcp.local.")],
)
def test_normalise_type(given: str, expected: str) -> None:
    assert mdns.normalise_type(given) == expected


@pytest.mark.parametrize("bad", ["rtsp", "_rtsp", "_rtsp._xyz", "a._rtsp._tcp.local."])
def test_normalise_type_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="service type"):
        mdns.normalise_type(bad)


def test_order_addresses() -> None:
    given = ["2001:db8::1", "10.0.0.2", "junk", "10.0.0.1", "10.0.0.2"]
    assert mdns.order_addresses(given) == ("10.0.0.2", "10.0.0.1", "2001:db8::1")


# -- the agent's own announcement --------------------------------------------------------------


def test_agent_txt() -> None:
    assert mdns.agent_txt("site1", "0.1.0") == {
        "txtvers": "1", "id": "site1", "version": "0.1.0", "path": "/",
        "whep": "/whep/{camera}", "api": "/api/v1",
    }
    with pytest.raises(ValueError, match="255"):
        mdns.agent_txt("x" * 300, "0.1.0")


def test_agent_names() -> None:
    assert mdns.agent_instance_label("site1") == "TheRelay Agent site1"
    long = mdns.agent_instance_label("é" * 100)
    assert len(long.encode()) <= 56 and long.startswith("TheRelay Agent é")
    assert mdns.agent_host_name("Site 1/North") == "therelay-site-1-north.local."
    assert mdns.agent_host_name("***") == "therelay-agent.local."


def test_advertisable_never_loopback() -> None:
    given = ["127.0.0.1", "127.8.9.1", "0.0.0.0", "::1", "224.0.0.251", "192.168.1.20",
             "2001:db8::2"]
    assert mdns.advertisable(given) == ["192.168.1.20", "2001:db8::2"]




# -- an address retired by the network (RFC 6762 §10.2) ---------------------------------------

def _address(text: str, created: float) -> DNSAddress:
    # class IN with the cache-flush bit, as a responder announces its host's address
    return DNSAddress("cam3.local.", 1, 1 | 0x8000, 120, socket.inet_aton(text), created=created)


def test_an_address_flushed_by_a_newer_announcement_is_leaving_and_reported() -> None:
    now = current_time_millis()
    cache = DNSCache()
    old, new = _address("192.0.2.10", now - 5000), _address("192.0.2.11", now)
    cache.async_add_records([old])
    assert mdns.leaving_addresses(cache, "cam3.local.", now) == set()
    flushed: list[str] = []
    watch = mdns._FlushWatch(flushed.append)
    # what zeroconf does with an incoming announcement: flush, tell listeners, then cache it
    cache.async_mark_unique_records_older_than_1s_to_expire(
        {("cam3.local.", 1, 1)}, [new], now)
    zc = SimpleNamespace(cache=cache)  # the one part of Zeroconf the watch reads
    watch.async_update_records(zc, now, [RecordUpdate(new, None)])  # type: ignore[arg-type]
    assert flushed == []  # listeners are told once the whole packet is processed
    watch.async_update_records_complete()
    assert flushed == ["cam3.local."]
    cache.async_add_records([new])
    assert mdns.leaving_addresses(cache, "cam3.local.", now) == {"192.0.2.10"}
    assert mdns.leaving_addresses(cache, "cam3.local.", now + 500) == {"192.0.2.10"}


def test_an_address_received_within_the_second_survives_the_first_announcement() -> None:
    # RFC 6762 §10.2: only records received more than a second earlier are flushed; the
    # old responder's last answer, just before it went away, stays until the next one.
    now = current_time_millis()
    cache = DNSCache()
    old, new = _address("192.0.2.10", now - 400), _address("192.0.2.11", now)
    cache.async_add_records([old])
    cache.async_mark_unique_records_older_than_1s_to_expire(
        {("cam3.local.", 1, 1)}, [new], now)
    flushed: list[str] = []
    watch = mdns._FlushWatch(flushed.append)
    zc = SimpleNamespace(cache=cache)  # the one part of Zeroconf the watch reads
    watch.async_update_records(zc, now, [RecordUpdate(new, None)])  # type: ignore[arg-type]
    watch.async_update_records_complete()
    assert flushed == []
    assert mdns.leaving_addresses(cache, "cam3.local.", now) == set()
