"""When an announcement may move an adopted camera: the rules, without I/O.

WS-Discovery and mDNS announcements are unauthenticated multicast: anyone on the LAN can
send a Hello carrying an adopted camera's endpoint UUID and an address of their own. So an
announcement is only a hint. A camera follows it on its own only when both hold:

1. the new address lies in a network the installer allows (``discovery.follow_networks``;
   by default the network the camera was adopted in), checked *before* anything is sent
   there; and
2. the device at the new address answers ONVIF with the stored credentials and reports the
   serial number and hardware id recorded at adoption.

Anything else is kept as a *pending move* for the installer to confirm (``cameras move``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ifaddr

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Without an interface of ours on the camera's network, its "home" is this wide: a /24 is
#: what almost every camera LAN is; a /64 is the IPv6 subnet size (RFC 4291 §2.5.4).
FALLBACK_PREFIX = {4: 24, 6: 64}


def parse_networks(texts: Iterable[str]) -> list[IpNetwork]:
    """CIDR texts → networks (host bits allowed: ``192.168.1.7/24`` is 192.168.1.0/24)."""
    return [ipaddress.ip_network(t.strip(), strict=False) for t in texts if t.strip()]


def home_network(host: str, local: Sequence[IpNetwork] | None = None) -> str | None:
    """The network ``host`` was found in: the network of our own interface that holds it
    (the on-link subnet), else its /24 (IPv4) or /64 (IPv6). None for a name, not an IP."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    for network in local if local is not None else local_networks():
        if address.version == network.version and address in network:
            return str(network)
    wide = ipaddress.ip_network(f"{address}/{FALLBACK_PREFIX[address.version]}", strict=False)
    return str(wide)


def local_networks() -> list[IpNetwork]:
    """The networks of this machine's interfaces (loopback and host routes left out)."""
    out: list[IpNetwork] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                network = ipaddress.ip_network(f"{text}/{ip.network_prefix}", strict=False)
            except ValueError:
                continue
            if not network.is_loopback and network.num_addresses > 1:
                out.append(network)
    return out


def allowed_networks(follow_networks: Sequence[str], home: str | None) -> list[IpNetwork]:
    """Where a camera may move on its own: the configured networks, else its home network."""
    if follow_networks:
        return parse_networks(follow_networks)
    return parse_networks([home]) if home else []


def in_networks(host: str | None, networks: Sequence[IpNetwork]) -> bool:
    """Is ``host`` an IP address inside one of ``networks``? (A name never is: it could
    resolve anywhere.)"""
    try:
        address = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    return any(address.version == n.version and address in n for n in networks)


@dataclass(frozen=True)
class Identity:
    """What a device reported about itself over ONVIF (GetDeviceInformation)."""

    serial: str | None
    hardware_id: str | None

    @property
    def known(self) -> bool:
        return bool(self.serial or self.hardware_id)


def same_device(recorded: Identity, seen: Identity) -> bool:
    """The device at the new address is the adopted one: every identifier recorded at
    adoption is reported again, unchanged (at least one must have been recorded)."""
    if not recorded.known:
        return False
    pairs = [(recorded.serial, seen.serial), (recorded.hardware_id, seen.hardware_id)]
    return all(now == then for then, now in pairs if then)
