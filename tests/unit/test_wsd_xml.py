"""WS-Discovery messages without a network: the Probe we send, replies captured from real
cameras (tests/data/wsd), both namespace generations, and hostile datagrams."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from xml.etree import ElementTree

import pytest

from agent.discovery.wsd_xml import (
    MAX_DATAGRAM,
    MAX_MATCHES,
    NS_ADDRESSING_2004,
    NS_ADDRESSING_2005,
    NS_DISCOVERY_2005,
    NS_DISCOVERY_2009,
    NS_ONVIF_NETWORK,
    NS_SOAP12,
    Bye,
    Hello,
    ProbeMatches,
    build_probe,
    parse_datagram,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "wsd"
SOURCE = "10.203.0.9"


def _match(uuid: str = "urn:uuid:cam-1", scopes: str = "", xaddrs: str = "",
           version: str = "1", types: str = "dn:NetworkVideoTransmitter") -> str:
    return (
        f"<d:ProbeMatch><a:EndpointReference><a:Address>{uuid}</a:Address></a:EndpointReference>"
        f"<d:Types>{types}</d:Types><d:Scopes>{scopes}</d:Scopes><d:XAddrs>{xaddrs}</d:XAddrs>"
        f"<d:MetadataVersion>{version}</d:MetadataVersion></d:ProbeMatch>"
    )


def envelope(body: str, *, relates_to: str = "urn:uuid:probe-1", message_id: str = "urn:uuid:m-1",
             discovery: str = NS_DISCOVERY_2005, addressing: str = NS_ADDRESSING_2004) -> bytes:
    header = f"<a:MessageID>{message_id}</a:MessageID>"
    if relates_to:
        header += f"<a:RelatesTo>{relates_to}</a:RelatesTo>"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{NS_SOAP12}" '
        f'xmlns:a="{addressing}" xmlns:d="{discovery}" xmlns:dn="{NS_ONVIF_NETWORK}">'
        f"<s:Header>{header}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def reply(matches: str, **kw: str) -> bytes:
    return envelope(f"<d:ProbeMatches>{matches}</d:ProbeMatches>", **kw)


# -- the Probe --------------------------------------------------------------------------------


def test_probe_is_a_2005_soap12_probe_for_network_video_transmitters() -> None:
    root = ElementTree.fromstring(build_probe("urn:uuid:abc"))
    ns = {"s": NS_SOAP12, "a": NS_ADDRESSING_2004, "d": NS_DISCOVERY_2005}
    assert root.tag == f"{{{NS_SOAP12}}}Envelope"
    assert root.findtext("s:Header/a:MessageID", namespaces=ns) == "urn:uuid:abc"
    assert root.findtext("s:Header/a:Action", namespaces=ns) == f"{NS_DISCOVERY_2005}/Probe"
    assert root.findtext("s:Header/a:To", namespaces=ns) == (
        "urn:schemas-xmlsoap-org:ws:2005:04:discovery")
    assert root.findtext("s:Header/a:ReplyTo/a:Address", namespaces=ns) == (
        f"{NS_ADDRESSING_2004}/role/anonymous")
    assert root.findtext("s:Body/d:Probe/d:Types", namespaces=ns) == "dn:NetworkVideoTransmitter"
    # The dn prefix of the Types value is declared, so a receiver can resolve the QName.
    assert b'xmlns:dn="http://www.onvif.org/ver10/network/wsdl"' in build_probe("urn:uuid:abc")


@pytest.mark.parametrize(("types", "expected"), [
    (("tds:Device",), "tds:Device"),
    (("{http://www.onvif.org/ver10/network/wsdl}NetworkVideoTransmitter",),
     "dn:NetworkVideoTransmitter"),
    (("{urn:example}Thing",), "t0:Thing"),
    ((), None),
])
def test_probe_types(types: tuple[str, ...], expected: str | None) -> None:
    root = ElementTree.fromstring(build_probe("urn:uuid:x", types))
    ns = {"d": NS_DISCOVERY_2005, "s": NS_SOAP12}
    assert root.findtext("s:Body/d:Probe/d:Types", namespaces=ns) == expected


@pytest.mark.parametrize(("message_id", "types"), [
    ("", ("dn:NetworkVideoTransmitter",)),
    ("urn:uuid:a b", ("dn:NetworkVideoTransmitter",)),
    ("urn:uuid:x", ("zz:Unknown",)),
    ("urn:uuid:x", ("dn:<script>",)),
])
def test_probe_misuse_is_a_value_error(message_id: str, types: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        build_probe(message_id, types)


def test_probe_escapes_the_message_id() -> None:
    root = ElementTree.fromstring(build_probe("urn:x&<y>"))
    ns = {"s": NS_SOAP12, "a": NS_ADDRESSING_2004}
    assert root.findtext("s:Header/a:MessageID", namespaces=ns) == "urn:x&<y>"


def test_our_probe_is_not_mistaken_for_an_answer() -> None:
    assert parse_datagram(build_probe("urn:uuid:abc"), SOURCE) is None


# -- captured replies from real cameras --------------------------------------------------------

CAPTURES = [
    ("hikvision-ds-2cd3955fwd-iws-probematches.xml", {
        "relates_to": "uuid:bfe8bb88-03a2-4e1a-904a-59a7d2882649",
        "uuid": "urn:uuid:18ec6401-3aa0-11b5-83f6-b4a3820fd92d",
        "xaddrs": ("http://192.168.0.218/onvif/device_service",
                   "http://[fe80::b6a3:82ff:fe0f:d92d]/onvif/device_service"),
        "types": ("dn:NetworkVideoTransmitter", "tds:Device"),
        "name": "HIKVISION DS-2CD3955FWD-IWS", "hardware": "DS-2CD3955FWD-IWS",
        "location": "city/hangzhou", "metadata_version": 10, "scopes": 8,
    }),
    ("axis-m2036-le-probematches.xml", {
        "relates_to": "uuid:bd64d03b-c701-4b50-a4bc-18c4048971c3",
        "uuid": "urn:uuid:e83a0086-3fdc-4d87-b8c4-83c0a16ad9f4",
        "xaddrs": ("http://192.168.0.90/onvif/device_service",
                   "https://192.168.0.90/onvif/device_service",
                   "http://169.254.209.66/onvif/device_service",
                   "https://169.254.209.66/onvif/device_service"),
        "types": ("tds:Device", "dn:NetworkVideoTransmitter"),
        "name": "AXIS M2036-LE", "hardware": "M2036-LE",
        "location": None, "metadata_version": 1, "scopes": 7,  # "location/" is empty
    }),
    ("predator-probematches.xml", {
        "relates_to": "urn:uuid:01234567-dead-beef-baad-abcdeffedcba",
        "uuid": "uuid:c9790c3a-701b-464d-a189-0060351c8ada",
        "xaddrs": (),  # the placeholder "SERVICE_URI" is not a URL
        "types": ("dn:NetworkVideoTransmitter", "tds:Device"),
        "name": "PREDATOR", "hardware": "HD_PREDATOR",
        "location": None, "metadata_version": 1, "scopes": 7,
    }),
]


@pytest.mark.parametrize(("filename", "want"), CAPTURES, ids=[c[0] for c in CAPTURES])
def test_captured_probe_matches(filename: str, want: dict[str, object]) -> None:
    message = parse_datagram((DATA / filename).read_bytes(), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert message.relates_to == want["relates_to"]
    (endpoint,) = message.endpoints
    assert endpoint.uuid == want["uuid"]
    assert endpoint.xaddrs == want["xaddrs"]
    assert endpoint.types == want["types"]
    assert (endpoint.name, endpoint.hardware, endpoint.location) == (
        want["name"], want["hardware"], want["location"])
    assert endpoint.metadata_version == want["metadata_version"]
    assert len(endpoint.scopes) == want["scopes"]
    assert endpoint.source == SOURCE


def _as_2009(data: bytes) -> bytes:
    """The same reply in OASIS WS-Discovery 1.1 / WS-Addressing 1.0 namespaces."""
    return (data.replace(NS_DISCOVERY_2005.encode(), NS_DISCOVERY_2009.encode())
            .replace(NS_ADDRESSING_2004.encode(), NS_ADDRESSING_2005.encode()))


@pytest.mark.parametrize("filename", [c[0] for c in CAPTURES])
def test_2009_namespaces_parse_the_same(filename: str) -> None:
    data = (DATA / filename).read_bytes()
    old = parse_datagram(data, SOURCE)
    new = parse_datagram(_as_2009(data), SOURCE)
    assert isinstance(new, ProbeMatches)
    assert _as_2009(data) != data
    assert new == old


def test_unknown_discovery_namespace_is_ignored() -> None:
    data = reply(_match(), discovery="http://example.com/not-discovery")
    assert parse_datagram(data, SOURCE) is None


# -- field by field ----------------------------------------------------------------------------


@pytest.mark.parametrize(("scopes", "name", "hardware", "location"), [
    ("onvif://www.onvif.org/name/Front%20Door onvif://www.onvif.org/hardware/DS%2F2CD",
     "Front Door", "DS/2CD", None),
    ("onvif://www.onvif.org/name/Caf%C3%A9 onvif://www.onvif.org/location/country/fr",
     "Café", None, "country/fr"),
    ("ONVIF://WWW.ONVIF.ORG/name/Upper", "Upper", None, None),  # scheme and host are caseless
    ("onvif://www.onvif.org/name/ onvif://www.onvif.org/name/Second", "Second", None, None),
    ("onvif://www.onvif.org/name/Bad%ZZ%", "Bad%ZZ%", None, None),  # not decodable: kept
    ("onvif://www.onvif.org/name/%FF%FE", "\ufffd\ufffd", None, None),  # not UTF-8: replaced
    ("onvif://www.onvif.org/name/a%0Ab%00c", "abc", None, None),  # control characters dropped
    ("onvif://www.onvif.org/name/" + "x" * 5000, "x" * 256, None, None),  # capped
    ("http://example.com/name/Nope onvif://www.onvif.org/named/Nope", None, None, None),
    ("", None, None, None),
])
def test_scope_labels(scopes: str, name: str | None, hardware: str | None,
                      location: str | None) -> None:
    message = parse_datagram(reply(_match(scopes=scopes)), SOURCE)
    assert isinstance(message, ProbeMatches)
    endpoint = message.endpoints[0]
    assert (endpoint.name, endpoint.hardware, endpoint.location) == (name, hardware, location)


@pytest.mark.parametrize(("xaddrs", "expected"), [
    ("http://10.0.0.5/onvif/device_service", ("http://10.0.0.5/onvif/device_service",)),
    ("  http://a/x\n\thttps://b:8443/y  http://a/x ", ("http://a/x", "https://b:8443/y")),
    ("ftp://a/x file:///etc/passwd javascript:alert(1) http:// http://[::1", ()),
    ("", ()),
])
def test_xaddrs_keep_only_web_urls(xaddrs: str, expected: tuple[str, ...]) -> None:
    message = parse_datagram(reply(_match(xaddrs=xaddrs)), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert message.endpoints[0].xaddrs == expected


@pytest.mark.parametrize(("version", "expected"), [
    ("7", 7), ("", 0), ("-1", 0), ("x", 0), ("99999999999999999999", 0),
])
def test_metadata_version(version: str, expected: int) -> None:
    message = parse_datagram(reply(_match(version=version)), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert message.endpoints[0].metadata_version == expected


def test_minimal_match_missing_optional_fields() -> None:
    body = ("<d:ProbeMatches><d:ProbeMatch><a:EndpointReference><a:Address>urn:uuid:only"
            "</a:Address></a:EndpointReference></d:ProbeMatch></d:ProbeMatches>")
    message = parse_datagram(envelope(body, relates_to="", message_id=""), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert message.message_id is None and message.relates_to is None
    endpoint = message.endpoints[0]
    assert (endpoint.uuid, endpoint.xaddrs, endpoint.types, endpoint.scopes) == (
        "urn:uuid:only", (), (), ())
    assert (endpoint.name, endpoint.metadata_version) == (None, 0)


@pytest.mark.parametrize("address", ["", "   ", "urn:uuid:a b"])
def test_match_without_a_usable_address_is_dropped(address: str) -> None:
    body = (f"<d:ProbeMatches>{_match(uuid=address)}{_match(uuid='urn:uuid:good')}"
            "</d:ProbeMatches>")
    message = parse_datagram(envelope(body), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert [e.uuid for e in message.endpoints] == ["urn:uuid:good"]


def test_hello_and_bye() -> None:
    hello_body = _match(scopes="onvif://www.onvif.org/name/Gate",
                        xaddrs="http://10.0.0.7/onvif/device_service").replace(
        "d:ProbeMatch>", "d:Hello>")
    hello = parse_datagram(envelope(hello_body, relates_to=""), SOURCE)
    assert isinstance(hello, Hello)
    assert hello.message_id == "urn:uuid:m-1"
    assert (hello.endpoint.uuid, hello.endpoint.name) == ("urn:uuid:cam-1", "Gate")
    assert hello.endpoint.xaddrs == ("http://10.0.0.7/onvif/device_service",)
    bye_body = ("<d:Bye><a:EndpointReference><a:Address>urn:uuid:cam-1</a:Address>"
                "</a:EndpointReference></d:Bye>")
    bye = parse_datagram(envelope(bye_body, relates_to="", discovery=NS_DISCOVERY_2009,
                                  addressing=NS_ADDRESSING_2005), SOURCE)
    assert bye == Bye("urn:uuid:m-1", "urn:uuid:cam-1", SOURCE)


@pytest.mark.parametrize("body", [
    "<d:Probe><d:Types>dn:NetworkVideoTransmitter</d:Types></d:Probe>",
    "<d:Resolve/>",
    "<d:Hello/>",
    "<d:Bye><a:EndpointReference/></d:Bye>",
    "",
])
def test_other_messages_are_not_announcements(body: str) -> None:
    assert parse_datagram(envelope(body), SOURCE) is None


# -- hostile input -----------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
""" + reply(_match(scopes="onvif://www.onvif.org/name/&lol9;")).split(b"?>", 1)[1]


def _with_doctype(doctype: str, name: str) -> bytes:
    body = reply(_match(scopes=f"onvif://www.onvif.org/name/{name}"))
    return b'<?xml version="1.0"?>' + doctype.encode() + body.split(b"?>", 1)[1]


HOSTILE = {
    "billion laughs": BILLION_LAUGHS,
    "external entity": _with_doctype(
        '<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>', "&x;"),
    "external DTD over the network": _with_doctype(
        '<!DOCTYPE s:Envelope SYSTEM "http://192.0.2.1/evil.dtd">', "plain"),
    "parameter entity": _with_doctype(
        '<!DOCTYPE s:Envelope [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>', "plain"),
    "harmless-looking DOCTYPE": _with_doctype("<!DOCTYPE s:Envelope>", "plain"),
    "DOCTYPE in UTF-16": _with_doctype("<!DOCTYPE s:Envelope>", "plain").replace(
        b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>'
    ).decode().encode("utf-16"),
    "oversized datagram": reply(_match(scopes="x" * (MAX_DATAGRAM + 1))),
    "deep nesting": reply(_match()).replace(
        b"<s:Body>", b"<s:Body>" + b"<a:x>" * 5000).replace(b"</s:Body>", b"</a:x>" * 5000
                                                          + b"</s:Body>"),
    "too many elements": reply(_match() + "<a:y/>" * 5000),
    "non-UTF-8 bytes": reply(_match(scopes="onvif://www.onvif.org/name/x")).replace(
        b"name/x", b"name/\xff\xfe\xc3"),
    "truncated": reply(_match())[:-40],
    "empty": b"",
    "not XML": b"\x00\x01\x02 hello bye ProbeMatches",
    "undeclared prefix": reply(_match()).replace(b"<d:Types>", b"<zz:Types>").replace(
        b"</d:Types>", b"</zz:Types>"),
    "not SOAP": b'<Envelope><Body><ProbeMatches/></Body></Envelope>',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_datagrams_are_refused(name: str) -> None:
    assert parse_datagram(HOSTILE[name], SOURCE) is None


def test_the_same_documents_without_their_trick_do_parse() -> None:
    """The hostile cases fail for their trick, not because the base document is broken."""
    assert isinstance(parse_datagram(reply(_match()), SOURCE), ProbeMatches)
    plain = _with_doctype("", "plain")
    assert isinstance(parse_datagram(plain, SOURCE), ProbeMatches)
    utf16 = reply(_match()).replace(b'encoding="UTF-8"', b'encoding="UTF-16"')
    assert isinstance(parse_datagram(utf16.decode().encode("utf-16"), SOURCE), ProbeMatches)


def test_billion_laughs_costs_nothing() -> None:
    tracemalloc.start()
    try:
        assert parse_datagram(BILLION_LAUGHS, SOURCE) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"billion laughs: peak {peak / 1024:.1f} KiB")
    assert peak < 1024 * 1024  # fully expanded it would be 3 GB


def test_external_entity_never_reads_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = open

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    assert parse_datagram(HOSTILE["external entity"], SOURCE) is None
    assert not any("passwd" in name for name in opened)


def test_thousands_of_matches_keep_a_bounded_number() -> None:
    many = "".join(_match(uuid=f"urn:uuid:{i}") for i in range(3000))
    data = envelope(f"<d:ProbeMatches>{many}</d:ProbeMatches>")
    assert len(data) > MAX_DATAGRAM
    assert parse_datagram(data, SOURCE) is None  # over the size cap: refused outright
    fits = "".join(
        f"<d:ProbeMatch><a:EndpointReference><a:Address>urn:uuid:{i}</a:Address>"
        "</a:EndpointReference></d:ProbeMatch>" for i in range(600))
    data = envelope(f"<d:ProbeMatches>{fits}</d:ProbeMatches>")
    assert len(data) <= MAX_DATAGRAM
    started = time.perf_counter()
    message = parse_datagram(data, SOURCE)
    elapsed = time.perf_counter() - started
    print(f"{len(data)} bytes with 600 matches parsed in {elapsed * 1000:.1f} ms")
    assert isinstance(message, ProbeMatches)
    assert [e.uuid for e in message.endpoints] == [f"urn:uuid:{i}" for i in range(MAX_MATCHES)]


def test_long_lists_are_capped() -> None:
    scopes = " ".join(f"onvif://www.onvif.org/type/t{i}" for i in range(500))
    xaddrs = " ".join(f"http://10.0.{i // 256}.{i % 256}/onvif" for i in range(500))
    message = parse_datagram(reply(_match(scopes=scopes, xaddrs=xaddrs)), SOURCE)
    assert isinstance(message, ProbeMatches)
    assert len(message.endpoints[0].scopes) == 32
    assert len(message.endpoints[0].xaddrs) == 32
