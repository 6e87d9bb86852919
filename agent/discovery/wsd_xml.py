"""WS-Discovery messages, sans I/O: build a Probe, parse ProbeMatches / Hello / Bye safely.

Datagrams come from anyone on the LAN, so parsing is defensive:

- **stdlib expat, not lxml.** lxml is only in the venv as a dependency of zeep (the project
  does not declare it and it has no type stubs); expat is always there. Expat on its own
  would still read a DTD's internal entity declarations, so the parser refuses any DOCTYPE
  (and any entity or notation declaration) from its handler the moment expat reports it,
  whatever the document's encoding — a byte search for "<!DOCTYPE" would miss UTF-16.
  Without a DTD no entity can be declared: no billion laughs, no external entity, no fetch.
- **Bounds**: at most ``MAX_DATAGRAM`` bytes, ``MAX_DEPTH`` nesting, ``MAX_ELEMENTS``
  elements, ``MAX_MATCHES`` matches per datagram, and caps on every list and string kept.
- Anything malformed gives ``None`` from :func:`parse_datagram`, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

# WS-Discovery 2005/04 (what ONVIF cameras speak) and its WS-Addressing 2004/08.
NS_DISCOVERY_2005 = "http://schemas.xmlsoap.org/ws/2005/04/discovery"
NS_ADDRESSING_2004 = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
# OASIS WS-Discovery 1.1 (2009) and WS-Addressing 1.0: accepted in replies.
NS_DISCOVERY_2009 = "http://docs.oasis-open.org/ws-dd/ns/discovery/2009/01"
NS_ADDRESSING_2005 = "http://www.w3.org/2005/08/addressing"
NS_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
NS_SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
NS_ONVIF_NETWORK = "http://www.onvif.org/ver10/network/wsdl"
NS_ONVIF_DEVICE = "http://www.onvif.org/ver10/device/wsdl"

DISCOVERY_NAMESPACES = frozenset({NS_DISCOVERY_2005, NS_DISCOVERY_2009})
ADDRESSING_NAMESPACES = frozenset({NS_ADDRESSING_2004, NS_ADDRESSING_2005})
SOAP_NAMESPACES = frozenset({NS_SOAP12, NS_SOAP11})

# ONVIF Core §7.3.1: a device announces itself as dn:NetworkVideoTransmitter.
NVT = "dn:NetworkVideoTransmitter"
PREFIXES = {"dn": NS_ONVIF_NETWORK, "tds": NS_ONVIF_DEVICE}

# WS-Discovery 2005/04 §2.4: a Probe goes to this To, replies to the anonymous role.
TO_DISCOVERY = "urn:schemas-xmlsoap-org:ws:2005:04:discovery"
ANONYMOUS = f"{NS_ADDRESSING_2004}/role/anonymous"
ACTION_PROBE = f"{NS_DISCOVERY_2005}/Probe"

MAX_DATAGRAM = 64 * 1024  # a UDP datagram is at most 64 KiB anyway; anything bigger is hostile
MAX_DEPTH = 32            # a ProbeMatch is 6 deep; SOAP extensions may add a few
MAX_ELEMENTS = 4096
MAX_MATCHES = 32          # one per device; a discovery proxy might list several
MAX_LIST = 32             # XAddrs, Types, Scopes kept per endpoint
MAX_TEXT = 2048           # characters kept of one URL, scope or id
MAX_LABEL = 256           # characters kept of a name / hardware / location

_SCOPE_PREFIX = "onvif://www.onvif.org/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class WsdEndpoint:
    """One device as a ProbeMatch or Hello describes it."""

    uuid: str                 # EPR address as sent, e.g. "urn:uuid:…" (the camera's identity)
    xaddrs: tuple[str, ...]   # device service URLs (http://10.0.0.5/onvif/device_service)
    types: tuple[str, ...]
    scopes: tuple[str, ...]
    name: str | None
    hardware: str | None
    location: str | None
    metadata_version: int
    source: str               # IP address the datagram came from


@dataclass(frozen=True)
class ProbeMatches:
    """Answer to a Probe (unicast to the prober); ``relates_to`` is the Probe's MessageID."""

    message_id: str | None
    relates_to: str | None
    endpoints: tuple[WsdEndpoint, ...]


@dataclass(frozen=True)
class Hello:
    """A device joined the network (or changed its metadata)."""

    message_id: str | None
    endpoint: WsdEndpoint


@dataclass(frozen=True)
class Bye:
    """A device is leaving; ``uuid`` is its EPR address."""

    message_id: str | None
    uuid: str
    source: str


WsdMessage = ProbeMatches | Hello | Bye


# -- building ---------------------------------------------------------------------------------


def build_probe(message_id: str, types: Sequence[str] = (NVT,)) -> bytes:
    """A WS-Discovery 2005/04 Probe (SOAP 1.2) for ``types``, as ONVIF cameras expect it.

    A type is ``prefix:Local`` with a prefix from ``PREFIXES`` or ``{namespace}Local``.
    """
    if not message_id or any(c.isspace() for c in message_id):
        raise ValueError("message_id must be a non-empty token such as urn:uuid:…")
    declared: dict[str, str] = {}
    names: list[str] = []
    for qname in types:
        if qname.startswith("{"):
            namespace, _, local = qname[1:].partition("}")
            prefix = next((p for p, ns in PREFIXES.items() if ns == namespace), None)
            prefix = prefix or f"t{len(declared)}"
        else:
            prefix, _, local = qname.partition(":")
            namespace = PREFIXES.get(prefix, "")
        if not namespace or not re.fullmatch(r"[A-Za-z_][\w.-]*", local):
            raise ValueError(f"cannot express type {qname!r} (known prefixes: {list(PREFIXES)})")
        declared[prefix] = namespace
        names.append(f"{prefix}:{local}")
    xmlns = "".join(f" xmlns:{p}={quoteattr(ns)}" for p, ns in declared.items())
    types_xml = f"<d:Types>{' '.join(names)}</d:Types>" if names else ""
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{NS_SOAP12}" xmlns:a="{NS_ADDRESSING_2004}"'
        f' xmlns:d="{NS_DISCOVERY_2005}"{xmlns}>'
        "<s:Header>"
        f'<a:Action s:mustUnderstand="1">{ACTION_PROBE}</a:Action>'
        f"<a:MessageID>{escape(message_id)}</a:MessageID>"
        f"<a:ReplyTo><a:Address>{ANONYMOUS}</a:Address></a:ReplyTo>"
        f'<a:To s:mustUnderstand="1">{TO_DISCOVERY}</a:To>'
        "</s:Header>"
        f"<s:Body><d:Probe>{types_xml}</d:Probe></s:Body>"
        "</s:Envelope>"
    )
    return text.encode("utf-8")


# -- parsing ----------------------------------------------------------------------------------


class _Rejected(Exception):
    """The datagram broke a safety rule (DOCTYPE, entity, depth, size)."""


@dataclass
class _Node:
    ns: str
    name: str
    children: list[_Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def child(self, namespaces: frozenset[str], name: str) -> _Node | None:
        for node in self.children:
            if node.name == name and node.ns in namespaces:
                return node
        return None

    def all(self, namespaces: frozenset[str], name: str) -> list[_Node]:
        return [n for n in self.children if n.name == name and n.ns in namespaces]

    def value(self) -> str:
        return "".join(self.text).strip()


class _TreeBuilder:
    """Builds a small namespace-aware tree from expat events, refusing DTDs and big trees."""

    def __init__(self) -> None:
        self.root: _Node | None = None
        self._stack: list[_Node] = []
        self._count = 0
        self._text_chars = 0

    def start(self, tag: str, _attrs: Any) -> None:
        self._count += 1
        if self._count > MAX_ELEMENTS or len(self._stack) >= MAX_DEPTH:
            raise _Rejected("too many or too deeply nested elements")
        ns, _, name = tag.rpartition(" ")
        node = _Node(ns, name)
        if self._stack:
            self._stack[-1].children.append(node)
        elif self.root is None:
            self.root = node
        self._stack.append(node)

    def end(self, _tag: str) -> None:
        self._stack.pop()

    def data(self, text: str) -> None:
        if self._stack:
            self._text_chars += len(text)
            if self._text_chars > MAX_DATAGRAM:
                raise _Rejected("too much text")
            self._stack[-1].text.append(text)

    @staticmethod
    def refuse(*_args: Any) -> None:
        raise _Rejected("DTDs, entities and notations are not accepted")

    @staticmethod
    def refuse_external(*_args: Any) -> int:
        raise _Rejected("external entities are not accepted")


def _parse_tree(data: bytes) -> _Node | None:
    builder = _TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")
    # Refuse the DTD as soon as it starts, before any declaration inside it is read.
    parser.StartDoctypeDeclHandler = builder.refuse
    parser.EntityDeclHandler = builder.refuse
    parser.UnparsedEntityDeclHandler = builder.refuse
    parser.NotationDeclHandler = builder.refuse
    parser.ExternalEntityRefHandler = builder.refuse_external
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except (expat.ExpatError, _Rejected, ValueError, UnicodeError, RecursionError):
        return None
    return builder.root


def _clean(text: str, limit: int) -> str:
    return _CONTROL.sub("", text)[:limit]


def _tokens(node: _Node | None) -> tuple[str, ...]:
    if node is None:
        return ()
    words = node.value().split()
    return tuple(_clean(w, MAX_TEXT) for w in words[:MAX_LIST])


def _scope_value(scopes: Sequence[str], key: str) -> str | None:
    """The first ``onvif://www.onvif.org/<key>/<value>`` scope's value, percent-decoded."""
    prefix = f"{_SCOPE_PREFIX}{key}/"
    for scope in scopes:
        if scope[: len(prefix)].lower() == prefix.lower():
            value = _clean(unquote(scope[len(prefix):], errors="replace"), MAX_LABEL).strip()
            if value:
                return value
    return None


def _web_urls(words: Sequence[str]) -> tuple[str, ...]:
    """XAddrs that are http(s) URLs with a host; anything else cannot be queried anyway."""
    urls: list[str] = []
    for word in words:
        try:
            parts = urlsplit(word)
            ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if ok and word not in urls:
            urls.append(word)
    return tuple(urls)


def _endpoint(node: _Node, source: str) -> WsdEndpoint | None:
    epr = node.child(ADDRESSING_NAMESPACES, "EndpointReference")
    address = epr.child(ADDRESSING_NAMESPACES, "Address") if epr else None
    uuid = _clean(address.value(), MAX_TEXT) if address else ""
    if not uuid or any(c.isspace() for c in uuid):
        return None
    scopes = _tokens(node.child(DISCOVERY_NAMESPACES, "Scopes"))
    version_node = node.child(DISCOVERY_NAMESPACES, "MetadataVersion")
    version_text = version_node.value() if version_node else ""
    version = int(version_text) if version_text.isdigit() and len(version_text) <= 10 else 0
    return WsdEndpoint(
        uuid=uuid,
        xaddrs=_web_urls(_tokens(node.child(DISCOVERY_NAMESPACES, "XAddrs"))),
        types=_tokens(node.child(DISCOVERY_NAMESPACES, "Types")),
        scopes=scopes,
        name=_scope_value(scopes, "name"),
        hardware=_scope_value(scopes, "hardware"),
        location=_scope_value(scopes, "location"),
        metadata_version=version,
        source=source,
    )


def _header_value(header: _Node | None, name: str) -> str | None:
    node = header.child(ADDRESSING_NAMESPACES, name) if header else None
    value = _clean(node.value(), MAX_TEXT) if node else ""
    return value or None


def parse_datagram(data: bytes, source: str) -> WsdMessage | None:
    """ProbeMatches, Hello or Bye from one datagram; ``None`` for anything else or garbage."""
    if len(data) > MAX_DATAGRAM:
        return None
    root = _parse_tree(data)
    if root is None or root.name != "Envelope" or root.ns not in SOAP_NAMESPACES:
        return None
    soap = frozenset({root.ns})
    header = root.child(soap, "Header")
    body = root.child(soap, "Body")
    if body is None:
        return None
    message_id = _header_value(header, "MessageID")
    matches = body.child(DISCOVERY_NAMESPACES, "ProbeMatches")
    if matches is not None:
        found = (
            _endpoint(m, source)
            for m in matches.all(DISCOVERY_NAMESPACES, "ProbeMatch")[:MAX_MATCHES]
        )
        endpoints = tuple(e for e in found if e is not None)
        return ProbeMatches(message_id, _header_value(header, "RelatesTo"), endpoints)
    hello = body.child(DISCOVERY_NAMESPACES, "Hello")
    if hello is not None:
        endpoint = _endpoint(hello, source)
        return Hello(message_id, endpoint) if endpoint else None
    bye = body.child(DISCOVERY_NAMESPACES, "Bye")
    if bye is not None:
        gone = _endpoint(bye, source)
        return Bye(message_id, gone.uuid, source) if gone else None
    return None
