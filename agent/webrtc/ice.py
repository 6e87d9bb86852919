"""Which local addresses become ICE host candidates, and which STUN/TURN servers are used.

aioice offers no choice of interfaces (docs/field-notes.md): it takes every address but 127.0.0.1
and ::1. Multi-homed NVRs, Docker bridges and VPNs need a choice, so the agent replaces
aioice's address lookup, process-wide, with one that honours ``webrtc.host_addresses`` /
``webrtc.interfaces``. With neither set, aioice's own behaviour is kept.

Reading the configuration (interfaces, TURN credential files) needs neither aiortc nor
aioice: the agent does it at start, and imports the WebRTC stack only when a session needs
it (agent/webrtc/stack.py). The functions that build aiortc objects import it themselves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ifaddr

from agent.config import WebrtcSection, read_secret
from agent.errors import ConfigError

if TYPE_CHECKING:
    from aiortc import RTCConfiguration

#: aioice's own address lookup, kept when the agent first replaces it.
_original_lookup: Callable[[bool, bool], list[str]] | None = None


@dataclass(frozen=True, slots=True)
class IceServer:
    """A STUN/TURN server with its credential read (from the config or the relay)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


def interface_addresses(names: list[str]) -> list[str]:
    """The IPv4 and global IPv6 addresses of the named interfaces."""
    found: list[str] = []
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    for name in names:
        adapter = adapters.get(name)
        if adapter is None:
            raise ConfigError(f"webrtc.interfaces: no interface named {name!r} "
                              f"(this machine has {', '.join(sorted(adapters))})")
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
            elif ip.ip[2] == 0:  # not link-local (no scope id)
                found.append(ip.ip[0])
    return found


def host_addresses(section: WebrtcSection) -> list[str] | None:
    """The configured candidate addresses, or None for aioice's default."""
    if section.host_addresses:
        return list(section.host_addresses)
    if section.interfaces:
        return interface_addresses(section.interfaces)
    return None


def install_host_addresses(addresses: list[str] | None) -> None:
    """Make aioice offer exactly ``addresses`` (loopback allowed), or restore its default."""
    global _original_lookup  # noqa: PLW0603 (aioice's function, saved once per process)
    import aioice.ice  # noqa: PLC0415 (the WebRTC stack loads on demand)

    if _original_lookup is None:
        _original_lookup = aioice.ice.get_host_addresses
    if addresses is None:
        aioice.ice.get_host_addresses = _original_lookup  # type: ignore[assignment]
        return
    chosen = list(addresses)

    def lookup(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen
                if (use_ipv4 and ipaddress.ip_address(a).version == 4)
                or (use_ipv6 and ipaddress.ip_address(a).version == 6)]

    aioice.ice.get_host_addresses = lookup


def ice_servers(section: WebrtcSection) -> list[IceServer]:
    """The configured servers, TURN credentials read from their files (ConfigError if one
    cannot be): done at start, so a bad file is found then, not at the first viewer."""
    servers = []
    for i, server in enumerate(section.ice_servers):
        credential = None
        if server.credential_file is not None:
            credential = read_secret(f"turn-{i}", server.credential_file)
        servers.append(IceServer(tuple(server.urls), server.username, credential))
    return servers


def to_rtc(servers: list[IceServer]) -> RTCConfiguration:
    """aiortc's configuration: always an explicit server list (aiortc falls back to a public
    STUN server otherwise)."""
    from aiortc import RTCConfiguration, RTCIceServer  # noqa: PLC0415 (loaded on demand)

    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in servers])


def rtc_configuration(section: WebrtcSection) -> RTCConfiguration:
    """aiortc's configuration for the configured servers."""
    return to_rtc(ice_servers(section))


def with_relay_servers(base: list[IceServer], servers: list[dict[str, Any]]) -> RTCConfiguration:
    """The configured servers plus those the relay's welcome named (well-formed ones only)."""
    extra = []
    for server in servers:
        urls = server.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
            username, credential = server.get("username"), server.get("credential")
            extra.append(IceServer(
                tuple(urls), username if isinstance(username, str) else None,
                credential if isinstance(credential, str) else None))
    return to_rtc([*base, *extra])
