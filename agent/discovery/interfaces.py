"""The network interfaces discovery uses: one setting (``discovery.interfaces``), one rule,
shared by WS-Discovery, mDNS and the agent's own announcement. IPv4 only for now."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence

import ifaddr

from agent.errors import AgentError

# Linux <linux/sockios.h>, <net/if.h>: read an interface's flags.
_SIOCGIFFLAGS = 0x8913
_IFF_UP, _IFF_MULTICAST = 0x1, 0x1000


class DiscoveryError(AgentError):
    """Discovery cannot run: no usable interface, or the WS-Discovery port is unavailable."""


def _flags(name: str) -> int | None:
    """The interface's IFF_* flags, or ``None`` when the kernel will not say."""
    request = struct.pack("16sH14x", name.encode()[:15], 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)
    except OSError:
        return None
    flags: int = struct.unpack("16sH14x", answer)[1]
    return flags


def _usable(name: str) -> bool:
    flags = _flags(name)
    # Unknown flags (not Linux?): let the send itself tell.
    return flags is None or (flags & _IFF_UP != 0 and flags & _IFF_MULTICAST != 0)


def multicast_interfaces(names: Sequence[str] | None) -> list[str]:
    """Interface names or IPv4 addresses → IPv4 addresses to send on.

    Default (``None`` or empty): every IPv4 address of an up, multicast-capable, non-loopback
    interface. A name or address that matches nothing raises :class:`DiscoveryError`.
    """
    table = [
        (adapter.name, ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str)
    ]
    chosen: list[str] = []
    if not names:
        chosen = [
            address for name, address in table
            if not ipaddress.IPv4Address(address).is_loopback and _usable(name)
        ]
        if not chosen:
            raise DiscoveryError(
                "no network interface with an IPv4 address is up, so cameras cannot be "
                "discovered; connect this machine to the cameras' network"
            )
        return list(dict.fromkeys(chosen))
    for wanted in names:
        try:
            ipaddress.IPv4Address(wanted)
        except ValueError:
            if ":" in wanted:
                raise DiscoveryError(f"discovery runs on IPv4 here: {wanted!r} is an IPv6 "
                                     "address") from None
            found = [address for name, address in table if name == wanted]
            if not found:
                known = sorted({name for name, _ in table})
                raise DiscoveryError(
                    f"no interface named {wanted!r} with an IPv4 address "
                    f"(interfaces here: {', '.join(known) or 'none'})"
                ) from None
            chosen.extend(found)
            continue
        if wanted not in {address for _, address in table}:
            raise DiscoveryError(f"{wanted} is not an IPv4 address of this machine")
        chosen.append(wanted)
    return list(dict.fromkeys(chosen))
