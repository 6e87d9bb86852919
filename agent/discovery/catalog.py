"""What discovery saw, merged: one entry per camera however many ways it was found.

Sans-I/O: plain values in (WS-Discovery matches, mDNS services, ONVIF answers), plain values
out. A camera's *identity* is its ONVIF endpoint UUID when it has one, else its mDNS instance
name: both survive an address change, unlike the IP. An mDNS service at an address an ONVIF
camera answers from is the same camera (many cameras announce both ways).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit


class WsdLike(Protocol):
    """What the catalog needs from a WS-Discovery match (agent.discovery.wsd.WsdEndpoint)."""

    @property
    def uuid(self) -> str: ...
    @property
    def xaddrs(self) -> tuple[str, ...]: ...
    @property
    def name(self) -> str | None: ...
    @property
    def hardware(self) -> str | None: ...
    @property
    def location(self) -> str | None: ...
    @property
    def source(self) -> str: ...


class MdnsLike(Protocol):
    """What the catalog needs from an mDNS service (agent.discovery.mdns.MdnsService)."""

    @property
    def instance(self) -> str: ...
    @property
    def service_type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...
    @property
    def rtsp_url(self) -> str | None: ...


@dataclass
class Sighting:
    """One camera as discovery sees it (stored as JSON in the ``sightings`` table)."""

    identity: str
    methods: list[str] = field(default_factory=list)  # "onvif", "mdns"
    name: str | None = None
    hardware: str | None = None
    location: str | None = None
    addresses: list[str] = field(default_factory=list)
    xaddrs: list[str] = field(default_factory=list)
    mdns: list[str] = field(default_factory=list)  # instance names
    rtsp_urls: list[str] = field(default_factory=list)  # announced over mDNS
    manufacturer: str | None = None
    model: str | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)  # from ONVIF, when asked
    onvif_error: str | None = None  # why the ONVIF queries failed (credentials, timeout…)

    @property
    def short_id(self) -> str:
        return short_id(self.identity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sighting:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def short_id(identity: str) -> str:
    """A name to type on the command line: ``d`` and 7 hex digits of the identity's hash."""
    return "d" + hashlib.sha256(identity.encode()).hexdigest()[:7]


def host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _add(items: list[str], values: Iterable[str | None]) -> None:
    for value in values:
        if value and value not in items:
            items.append(value)


def merge(endpoints: Sequence[WsdLike], services: Sequence[MdnsLike]) -> list[Sighting]:
    """One sighting per camera: ONVIF endpoints by UUID, mDNS services joined by address."""
    by_identity: dict[str, Sighting] = {}
    by_address: dict[str, Sighting] = {}
    for ep in endpoints:
        s = by_identity.setdefault(ep.uuid, Sighting(ep.uuid))
        _add(s.methods, ["onvif"])
        s.name = s.name or ep.name
        s.hardware = s.hardware or ep.hardware
        s.location = s.location or ep.location
        _add(s.xaddrs, ep.xaddrs)
        _add(s.addresses, [ep.source, *(host_of(x) for x in ep.xaddrs)])
        for address in s.addresses:
            by_address.setdefault(address, s)
    # mDNS-only cameras: the smallest instance name among a host's services is the identity
    for svc in sorted(services, key=lambda svc: svc.instance):
        s_or_none = next((by_address[a] for a in svc.addresses if a in by_address), None)
        if s_or_none is None:
            s_or_none = by_identity.setdefault(svc.instance, Sighting(svc.instance))
        s = s_or_none
        _add(s.methods, ["mdns"])
        s.name = s.name or svc.name
        _add(s.mdns, [svc.instance])
        _add(s.addresses, svc.addresses)
        _add(s.rtsp_urls, [svc.rtsp_url])
        for address in svc.addresses:
            by_address.setdefault(address, s)
    return sorted(by_identity.values(), key=lambda s: (s.name or "", s.identity))


def find(sightings: Iterable[Sighting], wanted: str) -> Sighting | None:
    """By short id, identity, mDNS instance or address: what an installer may type."""
    for s in sightings:
        if wanted in (s.short_id, s.identity) or wanted in s.mdns or wanted in s.addresses:
            return s
    return None


def camera_id_for(sighting: Sighting, taken: Iterable[str]) -> str:
    """A readable camera id from the camera's name (``front-door``), unique among ``taken``."""
    used = set(taken)
    base = re.sub(r"[^a-z0-9._-]+", "-", (sighting.name or "").lower()).strip("-._")[:56]
    base = base or f"cam-{sighting.short_id[1:]}"
    candidate, n = base, 2
    while candidate in used:
        candidate, n = f"{base}-{n}", n + 1
    return candidate
