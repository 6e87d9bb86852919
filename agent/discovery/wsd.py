"""ONVIF WS-Discovery on asyncio: probe for cameras, listen for their Hello and Bye.

The messages themselves (build, parse, limits) are in :mod:`agent.discovery.wsd_xml`; this
module moves datagrams. IPv4 only for now (cameras answer on IPv4; the IPv6 group FF02::C is
left for later). ``probe`` needs no privilege: it binds an ephemeral port per interface.
``WsdListener`` binds UDP 3702 with SO_REUSEADDR/SO_REUSEPORT, so it shares the port with
other well-behaved listeners; it fails with :class:`DiscoveryError` when it cannot.

Hostile LANs: every datagram is size-checked and cheaply pre-filtered before parsing, the
listener parses at most ``rate`` datagrams a second (a flood costs bounded CPU; the excess is
dropped and counted), and every table (seen MessageIDs, endpoints) has a fixed size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import time
import uuid as uuid_module
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from agent.discovery.interfaces import DiscoveryError, multicast_interfaces
from agent.discovery.wsd_xml import (
    MAX_DATAGRAM,
    MAX_LIST,
    NVT,
    Bye,
    Hello,
    ProbeMatches,
    WsdEndpoint,
    WsdMessage,
    build_probe,
    parse_datagram,
)

__all__ = [
    "NVT",
    "AnnouncementFilter",
    "DiscoveryError",
    "ProbeCollector",
    "WsdEndpoint",
    "WsdListener",
    "WsdMessage",
    "build_probe",
    "multicast_interfaces",
    "parse_datagram",
    "probe",
]

log = structlog.get_logger(__name__)

# WS-Discovery 2005/04 §2.4 (and SOAP-over-UDP): IPv4 group and port.
WSD_GROUP = "239.255.255.250"
WSD_PORT = 3702
# SOAP-over-UDP 1.1 Appendix I: repeat a multicast message after a random 50–250 ms delay,
# doubling up to 500 ms. Two repeats: a lost datagram on Wi-Fi is common.
PROBE_REPEAT = 2
UDP_MIN_DELAY, UDP_MAX_DELAY, UDP_UPPER_DELAY = 0.050, 0.250, 0.500

MAX_ENDPOINTS = 1024      # distinct devices one probe keeps
MAX_SEEN_IDS = 2048       # MessageIDs remembered for dedupe
LISTEN_RATE = 200.0       # announcements parsed per second, sustained
LISTEN_BURST = 400        # … and in a burst (a site power-up: every camera says Hello at once)

# Linux <linux/in.h>: without IP_MULTICAST_ALL=0 a socket gets every group any socket joined.
_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)


# -- the sans-I/O bookkeeping -----------------------------------------------------------------


class _RecentIds:
    """A set that remembers only the ``limit`` most recently added keys."""

    def __init__(self, limit: int) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was already there (a duplicate)."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._limit:
            self._keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)


def _dedupe_key(message: WsdMessage, data: bytes) -> str:
    # No MessageID (a sloppy device): the datagram's bytes identify its retransmissions.
    return message.message_id or hashlib.blake2b(data, digest_size=16).hexdigest()


class ProbeCollector:
    """Collects the ProbeMatches that answer one Probe; merges repeats by endpoint uuid."""

    def __init__(self, message_id: str, *, max_endpoints: int = MAX_ENDPOINTS) -> None:
        self.message_id = message_id
        self._needle = message_id.encode()
        self._seen = _RecentIds(MAX_SEEN_IDS)
        self._endpoints: dict[str, WsdEndpoint] = {}
        self._max = max_endpoints
        self.dropped = 0

    def feed(self, data: bytes, source: str) -> bool:
        """Take one datagram; True when it was a new answer to our Probe."""
        # A real answer quotes our MessageID in RelatesTo: skip parsing everything else.
        if len(data) > MAX_DATAGRAM or self._needle not in data:
            self.dropped += 1
            return False
        message = parse_datagram(data, source)
        if not isinstance(message, ProbeMatches) or message.relates_to != self.message_id:
            self.dropped += 1
            return False
        if not self._seen.add(_dedupe_key(message, data)):
            return False
        for endpoint in message.endpoints:
            self._merge(endpoint)
        return True

    def _merge(self, endpoint: WsdEndpoint) -> None:
        known = self._endpoints.get(endpoint.uuid)
        if known is None:
            if len(self._endpoints) >= self._max:
                self.dropped += 1
                return
            self._endpoints[endpoint.uuid] = endpoint
            return
        xaddrs = tuple(dict.fromkeys(known.xaddrs + endpoint.xaddrs))[:MAX_LIST]
        newer = endpoint if endpoint.metadata_version > known.metadata_version else known
        self._endpoints[endpoint.uuid] = replace(newer, xaddrs=xaddrs)

    def endpoints(self) -> list[WsdEndpoint]:
        """Every endpoint found so far, in the order they first answered."""
        return list(self._endpoints.values())


class _RateLimit:
    """Token bucket: ``rate`` events a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens = float(burst)
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass
class ListenerStats:
    """Counters of what the listener received and why it dropped what it dropped."""

    received: int = 0
    hellos: int = 0
    byes: int = 0
    duplicates: int = 0
    oversized: int = 0
    rate_limited: int = 0
    garbage: int = 0
    tracked_ids: int = 0


class AnnouncementFilter:
    """Turns datagrams into new Hello / Bye messages: bounded, rate-limited, deduplicated."""

    def __init__(
        self, *, rate: float = LISTEN_RATE, burst: int = LISTEN_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = _RateLimit(rate, burst, clock)
        self._seen = _RecentIds(MAX_SEEN_IDS)
        self.stats = ListenerStats()

    def feed(self, data: bytes, source: str) -> Hello | Bye | None:
        """The announcement in ``data`` if it is a new, valid Hello or Bye."""
        stats = self.stats
        stats.received += 1
        if len(data) > MAX_DATAGRAM:
            stats.oversized += 1
            return None
        if b"Hello" not in data and b"Bye" not in data:
            stats.garbage += 1  # cheap: a Probe or noise never reaches the parser
            return None
        if not self._limit.allow():
            stats.rate_limited += 1
            return None
        message = parse_datagram(data, source)
        if not isinstance(message, Hello | Bye):
            stats.garbage += 1
            return None
        fresh = self._seen.add(_dedupe_key(message, data))
        stats.tracked_ids = len(self._seen)
        if not fresh:
            stats.duplicates += 1
            return None
        if isinstance(message, Hello):
            stats.hellos += 1
        else:
            stats.byes += 1
        return message


# -- asyncio ----------------------------------------------------------------------------------


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, str], object]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._on_datagram(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from a send on one interface; the other interfaces carry on.
        log.debug("wsd.socket_error", error=str(exc))


def _probe_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        # WS-Discovery 2005/04 §2.4: multicast with TTL 1 — the local link only.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.bind((address, 0))  # answers come back unicast to this address and port
    except OSError:
        sock.close()
        raise
    return sock


async def _send_repeated(
    transports: Sequence[asyncio.DatagramTransport], payload: bytes, target: tuple[str, int],
) -> None:
    delay = random.uniform(UDP_MIN_DELAY, UDP_MAX_DELAY)  # noqa: S311 (jitter, not secrets)
    for attempt in range(PROBE_REPEAT + 1):
        if attempt:
            await asyncio.sleep(delay)
            delay = min(delay * 2, UDP_UPPER_DELAY)
        for transport in transports:
            if not transport.is_closing():
                transport.sendto(payload, target)


async def probe(
    timeout: float = 3.0, *, interfaces: Sequence[str] | None = None,
    types: Sequence[str] = (NVT,), port: int = WSD_PORT,
) -> list[WsdEndpoint]:
    """Multicast a Probe on every chosen interface; the devices that answer within ``timeout``.

    One entry per endpoint uuid (XAddrs merged when a device answers on several interfaces).
    Raises :class:`DiscoveryError` when no interface can send.
    """
    addresses = multicast_interfaces(interfaces)
    message_id = f"urn:uuid:{uuid_module.uuid4()}"
    payload = build_probe(message_id, types)
    collector = ProbeCollector(message_id)
    loop = asyncio.get_running_loop()
    transports: list[asyncio.DatagramTransport] = []
    failures: list[str] = []
    try:
        for address in addresses:
            try:
                sock = _probe_socket(address)
            except OSError as exc:
                failures.append(f"{address}: {exc.strerror or exc}")
                continue
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Receiver(collector.feed), sock=sock
            )
            transports.append(transport)
        if not transports:
            raise DiscoveryError(
                "cannot send a WS-Discovery probe on any interface (" + "; ".join(failures) + ")"
            )
        if failures:
            log.warning("wsd.probe_interfaces_skipped", failures=failures)
        sender = asyncio.create_task(_send_repeated(transports, payload, (WSD_GROUP, port)))
        try:
            await asyncio.sleep(timeout)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    finally:
        for transport in transports:
            transport.close()
    found = collector.endpoints()
    log.info("wsd.probe_done", interfaces=addresses, found=len(found), dropped=collector.dropped)
    return found


class WsdListener:
    """Joins the WS-Discovery group and calls back on each new Hello and Bye."""

    def __init__(
        self, on_hello: Callable[[WsdEndpoint], None], on_bye: Callable[[str], None], *,
        interfaces: Sequence[str] | None = None, port: int = WSD_PORT,
        rate: float = LISTEN_RATE, burst: int = LISTEN_BURST,
    ) -> None:
        self._on_hello = on_hello
        self._on_bye = on_bye
        self._interfaces = interfaces
        self._port = port
        self._filter = AnnouncementFilter(rate=rate, burst=burst)
        self._transport: asyncio.DatagramTransport | None = None
        self.joined: list[str] = []

    @property
    def stats(self) -> ListenerStats:
        return self._filter.stats

    async def start(self) -> None:
        """Bind UDP ``port`` and join the group on each chosen interface."""
        if self._transport is not None:
            raise RuntimeError("WsdListener already started")
        addresses = multicast_interfaces(self._interfaces)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            # Bound to the group address, the socket gets only the group's datagrams, not
            # unicast Probes or answers meant for another program sharing the port.
            sock.bind((WSD_GROUP, self._port))
        except OSError as exc:
            sock.close()
            raise DiscoveryError(
                f"cannot listen for camera announcements on UDP port {self._port}: "
                f"{exc.strerror or exc} (another program may hold the port without sharing it)"
            ) from None
        joined, failures = [], []
        for address in addresses:
            request = socket.inet_aton(WSD_GROUP) + socket.inet_aton(address)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
            except OSError as exc:
                failures.append(f"{address}: {exc.strerror or exc}")
                continue
            joined.append(address)
        if not joined:
            sock.close()
            raise DiscoveryError(
                "cannot join the WS-Discovery multicast group on any interface ("
                + "; ".join(failures) + ")"
            )
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self._received), sock=sock
        )
        self.joined = joined
        log.info("wsd.listening", interfaces=joined, skipped=failures, port=self._port)

    async def stop(self) -> None:
        """Leave the group and close the socket; safe to call twice."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
            log.info("wsd.stopped", **vars(self.stats))

    def _received(self, data: bytes, source: str) -> None:
        message = self._filter.feed(data, source)
        if message is None:
            return
        try:
            if isinstance(message, Hello):
                self._on_hello(message.endpoint)
            else:
                self._on_bye(message.uuid)
        except Exception as exc:  # a bad callback must not stop the listener
            log.warning("wsd.callback_failed", error=f"{type(exc).__name__}: {exc}")
