"""mDNS/DNS-SD (RFC 6762/6763): browse for cameras, and announce the agent as ``_therelay._tcp``.

Everything here runs in the event loop on python-zeroconf's asyncio API (the ``async_``
calls); its synchronous calls block the caller and are never used. A service's *identity* is
its full instance name (``"Cam 1._rtsp._tcp.local."``): it survives an address change.

Memory stays bounded whatever the network sends: at most ``max_services`` services are
tracked or being resolved (extras are dropped with one log line), TXT records are cut to
``MAX_TXT_ENTRIES`` entries of bounded length, and at most ``RESOLVE_CONCURRENCY`` lookups
run at once. (Zeroconf's own record cache is bounded only by record TTLs, not by us.)
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import quote

import structlog
from zeroconf import (  # type: ignore[attr-defined]  # DNSAddress, DNSCache: not in __all__
    BadTypeInNameException,
    DNSAddress,
    DNSCache,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.discovery.interfaces import multicast_interfaces
from agent.errors import ConfigError

log = structlog.get_logger(__name__)

AGENT_TYPE = "_therelay._tcp.local."

MAX_SERVICES = 1024
MAX_TXT_ENTRIES = 32
MAX_TXT_KEY = 64  # RFC 6763 §6.4 recommends ≤ 9 characters; be lenient, but bounded
MAX_TXT_VALUE = 255  # one TXT string is at most 255 bytes on the wire (RFC 6763 §6.1)
RESOLVE_TIMEOUT = 3.0  # seconds for SRV/TXT/A after a PTR was seen
RESOLVE_CONCURRENCY = 16
# When a camera is renumbered (DHCP), its old address leaves the cache in steps. RFC 6762
# §10.2: an address announced with the cache-flush bit flushes the cached addresses of that
# host received more than one second before it; they linger one more second (TTL 1 s). An
# address received within that second (the old responder's last answer, just before it lost
# power) survives the first announcement and is flushed by the next one, at least a second
# later (§8.3; Avahi adds up to 250 ms; 2.2 s measured on a loaded test machine). zeroconf
# reports the new address as an update, but neither the later flush nor the expiry. So a
# resolution waits until the service has been quiet for SETTLE_DELAY (one that never stops
# changing: MAX_SETTLE), an address with at most LEAVING_TTL seconds left (flushed, or a
# goodbye) is not reported, and a flush of a tracked host's address counts as a change of its
# services (resolved again after SETTLE_DELAY), so the stale address never stays.
SETTLE_DELAY = 2.5
MAX_SETTLE = 10.0
LEAVING_TTL = 1.0
_TYPE_A, _TYPE_AAAA, _CLASS_IN = 1, 28, 1  # RFC 1035 §3.2.2-4, RFC 3596 §2.1

# Axis cameras announce their web server as _axis-video._tcp (port 80); their RTSP server
# is on the standard port 554 at this path on every AXIS OS firmware (VAPIX "RTSP API").
# Assumption, not announced: a camera with RTSP moved elsewhere needs its URL by hand.
AXIS_RTSP_PORT = 554
AXIS_RTSP_PATH = "/axis-media/media.amp"
_RTSP_SCHEMES = {"_rtsp._tcp.local.": "rtsp", "_rtsps._tcp.local.": "rtsps"}
_AXIS_TYPE = "_axis-video._tcp.local."

# Instance names are at most 63 bytes (RFC 6763 §4.1.1); leave room for zeroconf's "-2".
_MAX_AGENT_LABEL = 56
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%?"

Change = Literal["added", "updated", "removed"]


@dataclass(frozen=True)
class MdnsService:
    """One DNS-SD service instance as last resolved."""

    instance: str  # full instance name "Cam 1._rtsp._tcp.local." (identity)
    service_type: str  # "_rtsp._tcp.local."
    name: str  # instance label "Cam 1"
    host: str | None  # SRV target "cam1.local." (None when unresolved)
    addresses: tuple[str, ...]  # IPv4 first, then IPv6
    port: int | None
    txt: Mapping[str, str] = field(default_factory=dict, hash=False)  # keys lower-cased
    rtsp_url: str | None = None


# -- pure helpers (unit-tested without a network) --------------------------------------------


def parse_txt(raw: bytes) -> dict[str, str]:
    """Decode a TXT record's wire form into at most ``MAX_TXT_ENTRIES`` key/value strings.

    RFC 6763 §6: length-prefixed strings ``key=value``; keys are case-insensitive printable
    ASCII and only the first occurrence of a key counts (§6.4); a key without ``=`` is a
    boolean attribute (value ""). Control characters are dropped so a value cannot forge
    log lines or terminal output.
    """
    found: dict[str, str] = {}
    i = 0
    while i < len(raw) and len(found) < MAX_TXT_ENTRIES:
        length = raw[i]
        chunk = raw[i + 1 : i + 1 + length]
        i += 1 + length
        if len(chunk) < length:
            break  # truncated record: ignore the partial string
        key_bytes, _, value_bytes = chunk.partition(b"=")
        if not key_bytes or len(key_bytes) > MAX_TXT_KEY:
            continue
        if any(b < 0x20 or b > 0x7E for b in key_bytes):
            continue
        key = key_bytes.decode("ascii").lower()
        if key in found:
            continue
        value = _CONTROL.sub("", value_bytes.decode("utf-8", "replace"))
        found[key] = value[:MAX_TXT_VALUE]
    return found


def order_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Valid addresses, deduplicated, IPv4 first (in the given order), then IPv6."""
    v4: list[str] = []
    v6: list[str] = []
    for text in addresses:
        try:
            parsed = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        target = v4 if parsed.version == 4 else v6
        if text not in target:
            target.append(text)
    return (*v4, *v6)


def _url_host(addresses: Sequence[str], host: str | None) -> str | None:
    """The URL authority host: first IPv4, else a global IPv6, else the announced name."""
    for text in addresses:
        parsed = ipaddress.ip_address(text.split("%", 1)[0])
        if parsed.version == 4:
            return text
    for text in addresses:
        parsed = ipaddress.ip_address(text.split("%", 1)[0])
        if not parsed.is_link_local:  # a link-local URL would need a zone id ffmpeg may reject
            return f"[{parsed}]"
    if host:
        name = host.rstrip(".")
        if _HOSTNAME.fullmatch(name):
            return name  # needs .local resolution (nss-mdns) on the agent's machine
    return None


def _txt_path(txt: Mapping[str, str]) -> str:
    """The ``path`` TXT key (dns-sd.org convention, as for _http._tcp) as a URL path."""
    path = txt.get("path", "").strip()
    if not path:
        return ""
    if not path.startswith("/"):
        path = "/" + path
    return quote(path, safe=_PATH_SAFE)


def rtsp_url(
    service_type: str,
    addresses: Sequence[str],
    host: str | None,
    port: int | None,
    txt: Mapping[str, str],
) -> str | None:
    """The RTSP URL a service stands for, or None when it cannot be formed.

    ``_rtsp._tcp``/``_rtsps._tcp``: ``rtsp[s]://host:port/<TXT path>`` (empty path without
    one). ``_axis-video._tcp``: ``rtsp://host:554/axis-media/media.amp`` whatever port was
    announced (that is the web server's). Other types: None. No credentials are ever put in
    the URL (a TXT ``u=`` names a user by convention, never the camera's password).
    """
    kind = service_type.lower()
    target = _url_host(order_addresses(addresses), host)
    if target is None:
        return None
    if kind == _AXIS_TYPE:
        return f"rtsp://{target}:{AXIS_RTSP_PORT}{AXIS_RTSP_PATH}"
    scheme = _RTSP_SCHEMES.get(kind)
    if scheme is None or port is None or not 0 < port < 65536:
        return None
    return f"{scheme}://{target}:{port}{_txt_path(txt)}"


def instance_label(name: str, service_type: str) -> str | None:
    """``"Cam 1"`` from ``"Cam 1._rtsp._tcp.local."``, or None when the name is not of the type."""
    suffix = "." + service_type
    if len(name) <= len(suffix) or not name.lower().endswith(suffix.lower()):
        return None
    return name[: -len(suffix)]


def make_service(
    service_type: str,
    name: str,
    host: str | None,
    addresses: Sequence[str],
    port: int | None,
    txt_raw: bytes | None,
) -> MdnsService | None:
    """An ``MdnsService`` from resolved parts; None when ``name`` is not an instance of the type."""
    label = instance_label(name, service_type)
    if label is None:
        return None
    txt = parse_txt(txt_raw or b"")
    ordered = order_addresses(addresses)
    return MdnsService(
        instance=name, service_type=service_type, name=label, host=host,
        addresses=ordered, port=port, txt=MappingProxyType(txt),
        rtsp_url=rtsp_url(service_type, ordered, host, port, txt),
    )


def normalise_type(service_type: str) -> str:
    """``"_rtsp._tcp"`` or ``"_rtsp._tcp.local."`` → ``"_rtsp._tcp.local."``."""
    text = service_type.strip().lower().rstrip(".")
    if not text.endswith(".local"):
        text += ".local"
    parts = text.split(".")
    if len(parts) != 3 or not parts[0].startswith("_") or parts[1] not in ("_tcp", "_udp"):
        raise ValueError(f"not a DNS-SD service type: {service_type!r} (like _rtsp._tcp.local.)")
    return text + "."


# -- browsing --------------------------------------------------------------------------------


class MdnsBrowser:
    """Tracks services of ``types``; reports ``added``/``updated``/``removed`` to ``on_change``."""

    def __init__(
        self,
        zc: AsyncZeroconf,
        types: Sequence[str],
        on_change: Callable[[str, MdnsService], None],
        *,
        max_services: int = MAX_SERVICES,
        resolve_timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        if not types:
            raise ValueError("MdnsBrowser needs at least one service type")
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        self._zc = zc
        self._types = sorted({normalise_type(t) for t in types})
        self._on_change = on_change
        self._max = max_services
        self._timeout_ms = int(resolve_timeout * 1000)
        self._table: dict[str, MdnsService] = {}  # lower-cased instance → service
        self._tasks: dict[str, asyncio.Task[None]] = {}  # resolutions under way
        self._dirty: set[str] = set()  # updated while a resolution ran
        self._changed: dict[str, float] = {}  # loop time of the last change, while tracked
        self._flush_watch = _FlushWatch(self._on_flush)
        self._reserved: set[str] = set()  # in the table or being resolved: what the cap counts
        self._limit = asyncio.Semaphore(RESOLVE_CONCURRENCY)
        self._browser: AsyncServiceBrowser | None = None
        self._full = False
        self.dropped = 0  # services ignored because the table was full

    @property
    def services(self) -> dict[str, MdnsService]:
        """The services seen and resolved so far, by instance name."""
        return {svc.instance: svc for svc in self._table.values()}

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self._types)

    async def start(self) -> None:
        if self._browser is not None:
            raise RuntimeError("MdnsBrowser already started")
        self._zc.zeroconf.async_add_listener(self._flush_watch, None)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, self._types, handlers=[self._on_state_change]
        )
        log.info("mdns_browsing", types=self._types)

    async def stop(self) -> None:
        """Stop browsing; the last table stays readable through ``services``."""
        browser, self._browser = self._browser, None
        if browser is not None:
            self._zc.zeroconf.async_remove_listener(self._flush_watch)
            await browser.async_cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._dirty.clear()
        self._changed.clear()
        self._reserved = set(self._table)

    # zeroconf calls this in the event loop, with keyword arguments (its handler protocol).
    def _on_state_change(
        self, *, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            self._forget(key)
            return
        if key in self._tasks or key in self._table:
            self._changed_service(key, service_type, name)
            return
        if instance_label(name, service_type) is None:
            log.debug("mdns_bad_instance_name", service_type=service_type, instance=name[:300])
            return
        if len(self._reserved) >= self._max:
            self.dropped += 1
            if not self._full:
                self._full = True
                log.warning("mdns_table_full", limit=self._max, service_type=service_type,
                            hint="more services than the table holds are being announced; "
                                 "extras are ignored until some go away")
            return
        self._spawn(key, service_type, name, settle=False)

    def _spawn(self, key: str, service_type: str, name: str, *, settle: bool) -> None:
        self._reserved.add(key)
        task = asyncio.get_running_loop().create_task(
            self._track(key, service_type, name, settle), name=f"mdns-resolve {name[:80]}"
        )
        self._tasks[key] = task

    async def _track(self, key: str, service_type: str, name: str, settle: bool) -> None:
        try:
            while True:
                if settle:
                    await self._settle(key)
                self._dirty.discard(key)
                service = await self._resolve(service_type, name)
                if service is not None:
                    self._store(key, service)
                if key not in self._dirty:
                    break
                settle = True
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
                self._dirty.discard(key)
                self._changed.pop(key, None)
                if key not in self._table:
                    self._release(key)

    async def _settle(self, key: str) -> None:
        """Sleep until SETTLE_DELAY after the last change of ``key`` (MAX_SETTLE at most)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + MAX_SETTLE
        while (wake := min(self._changed.get(key, 0.0) + SETTLE_DELAY, give_up)) > loop.time():
            await asyncio.sleep(wake - loop.time())

    def _on_flush(self, host: str) -> None:
        """An address of ``host`` was flushed: its services changed."""
        for key, service in list(self._table.items()):
            if (service.host or "").lower() == host:
                self._changed_service(key, service.service_type, service.instance)

    def _changed_service(self, key: str, service_type: str, name: str) -> None:
        """Resolve a tracked service again once it has been quiet for SETTLE_DELAY."""
        self._changed[key] = asyncio.get_running_loop().time()
        if key in self._tasks:
            self._dirty.add(key)
        else:
            self._spawn(key, service_type, name, settle=True)

    async def _resolve(self, service_type: str, name: str) -> MdnsService | None:
        async with self._limit:
            try:
                info = AsyncServiceInfo(service_type, name)
            except BadTypeInNameException:
                return None
            await info.async_request(self._zc.zeroconf, self._timeout_ms)
        if info.port is None:
            log.debug("mdns_unresolved", instance=name[:300])
            return None
        addresses = info.parsed_scoped_addresses(IPVersion.V4Only) + \
            info.parsed_scoped_addresses(IPVersion.V6Only)
        if info.server:
            leaving = leaving_addresses(self._zc.zeroconf.cache, info.server,
                                        current_time_millis())
            addresses = [a for a in addresses if a.split("%")[0] not in leaving]
        return make_service(service_type, name, info.server, addresses, info.port, info.text)

    def _store(self, key: str, service: MdnsService) -> None:
        old = self._table.get(key)
        if old == service:
            return
        self._table[key] = service
        self._emit("added" if old is None else "updated", service)

    def _forget(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._dirty.discard(key)
        service = self._table.pop(key, None)
        self._release(key)
        if service is not None:
            self._emit("removed", service)

    def _release(self, key: str) -> None:
        self._reserved.discard(key)
        # Re-arm the one log line once the table has clearly drained, not at every removal.
        if self._full and len(self._reserved) < self._max * 9 // 10:
            self._full = False
            log.info("mdns_table_space", limit=self._max, dropped=self.dropped)

    def _emit(self, kind: Change, service: MdnsService) -> None:
        log.info("mdns_service_" + kind, instance=service.instance, addresses=service.addresses,
                 port=service.port)
        try:
            self._on_change(kind, service)
        except Exception:  # a consumer's bug must not stop discovery
            log.exception("mdns_on_change_failed", instance=service.instance)


def leaving_addresses(cache: DNSCache, host: str, now_ms: float) -> set[str]:
    """Addresses of ``host`` in ``cache`` with at most LEAVING_TTL seconds left: flushed by a
    newer announcement or said goodbye to (RFC 6762 §10.1, §10.2), so not to be reported."""
    leaving: set[str] = set()
    for type_ in (_TYPE_A, _TYPE_AAAA):
        for record in cache.async_all_by_details(host, type_, _CLASS_IN):
            if isinstance(record, DNSAddress) and record.get_remaining_ttl(now_ms) <= LEAVING_TTL:
                leaving.add(str(ipaddress.ip_address(record.address)))
    return leaving


class _FlushWatch(RecordUpdateListener):
    """Calls ``on_flush(host)`` when an address announcement leaves another address of
    ``host`` leaving (zeroconf has no event for that; see SETTLE_DELAY)."""

    def __init__(self, on_flush: Callable[[str], None]) -> None:
        super().__init__()
        self._on_flush = on_flush
        self._hosts: set[str] = set()

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if not (isinstance(record, DNSAddress) and record.unique) or \
                    record.get_remaining_ttl(now) <= LEAVING_TTL:
                continue
            new = str(ipaddress.ip_address(record.address))
            if leaving_addresses(zc.cache, record.name, now) - {new}:
                self._hosts.add(record.name.lower())

    def async_update_records_complete(self) -> None:
        hosts, self._hosts = self._hosts, set()
        for host in hosts:
            self._on_flush(host)


async def browse(
    types: Sequence[str], timeout: float, *, interfaces: Sequence[str] | None = None
) -> list[MdnsService]:
    """Browse ``types`` for ``timeout`` seconds; the services seen, by type then name."""
    zc = open_zeroconf(interfaces)
    try:
        browser = MdnsBrowser(zc, types, lambda _kind, _svc: None)
        await browser.start()
        try:
            await asyncio.sleep(timeout)
        finally:
            await browser.stop()
        return sorted(browser.services.values(), key=lambda s: (s.service_type, s.name.lower()))
    finally:
        await zc.async_close()


# -- announcing the agent --------------------------------------------------------------------


def agent_txt(agent_id: str, version: str) -> dict[str, str]:
    """The agent's TXT record: what a LAN client needs to find the viewer, WHEP and the API."""
    txt = {
        "txtvers": "1",  # RFC 6763 §6.7
        "id": agent_id,
        "version": version,
        "path": "/",  # the viewer page (dns-sd.org convention for HTTP paths)
        "whep": "/whep/{camera}",  # agent/http/whep.py: POST an SDP offer here
        "api": "/api/v1",
    }
    for key, value in txt.items():
        if len(key) + 1 + len(value.encode()) > 255:
            raise ValueError(f"TXT entry {key!r} is longer than 255 bytes")
    return txt


def agent_instance_label(agent_id: str) -> str:
    """``"TheRelay Agent <id>"`` cut to fit one DNS label with room for a "-2" suffix."""
    label = _CONTROL.sub("", f"TheRelay Agent {agent_id}")
    return label.encode()[:_MAX_AGENT_LABEL].decode("utf-8", "ignore").rstrip()


def agent_host_name(agent_id: str) -> str:
    """A host name of the agent's own; the machine's name may belong to avahi-daemon, whose
    A records and ours would flush each other (RFC 6762 §10.2) and make it rename itself."""
    slug = re.sub(r"[^a-z0-9-]+", "-", agent_id.lower()).strip("-")[:40] or "agent"
    return f"therelay-{slug}.local."


def advertisable(addresses: Sequence[str]) -> list[str]:
    """The addresses a LAN client could use: never loopback, unspecified or multicast."""
    chosen: list[str] = []
    for text in order_addresses(addresses):
        parsed = ipaddress.ip_address(text.split("%", 1)[0])
        if parsed.is_loopback or parsed.is_unspecified or parsed.is_multicast:
            continue
        chosen.append(str(parsed))
    return chosen


class AgentAdvertiser:
    """Announces the agent as ``_therelay._tcp.local.``; ``stop`` sends goodbye packets."""

    def __init__(
        self, zc: AsyncZeroconf, agent_id: str, version: str, port: int, addresses: Sequence[str]
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not a TCP port")
        self._zc = zc
        self._agent_id = agent_id
        self._port = port
        self._txt = agent_txt(agent_id, version)
        self._addresses = advertisable(addresses)
        self._info: AsyncServiceInfo | None = None

    @property
    def instance(self) -> str | None:
        """The announced instance name (zeroconf may have renamed it), or None when idle."""
        return self._info.name if self._info is not None else None

    async def start(self) -> None:
        if self._info is not None:
            raise RuntimeError("AgentAdvertiser already started")
        if not self._addresses:
            log.warning("mdns_advertise_skipped", reason="no non-loopback address to announce",
                        fix="set the interfaces discovery should use")
            return
        info = AsyncServiceInfo(
            AGENT_TYPE, f"{agent_instance_label(self._agent_id)}.{AGENT_TYPE}",
            port=self._port, properties=self._txt, server=agent_host_name(self._agent_id),
            parsed_addresses=self._addresses,
        )
        try:
            # Probes for the name first (RFC 6762 §8.1), renaming "… -2" on a conflict.
            announced = await self._zc.async_register_service(info, allow_name_change=True)
            await announced
        except NonUniqueNameException as exc:  # only if renaming itself kept conflicting
            raise ConfigError(f"mDNS: no free instance name for {info.name!r}") from exc
        self._info = info
        log.info("mdns_advertising", instance=info.name, port=self._port,
                 addresses=self._addresses)

    async def stop(self) -> None:
        """Withdraw the announcement: goodbye packets (TTL 0, RFC 6762 §10.1), then idle."""
        info, self._info = self._info, None
        if info is None:
            return
        try:
            goodbyes = await self._zc.async_unregister_service(info)
            await goodbyes
        except Exception as exc:  # zeroconf closed first (it sent the goodbyes then)
            log.info("mdns_goodbye_skipped", instance=info.name, reason=str(exc)[:200])
            return
        log.info("mdns_advertising_stopped", instance=info.name)


# -- sockets ---------------------------------------------------------------------------------


def open_zeroconf(interfaces: Sequence[str] | None = None) -> AsyncZeroconf:
    """An IPv4 ``AsyncZeroconf`` on ``interfaces`` (names or addresses), or on all of them.

    Call it from the running event loop. Coexists with avahi-daemon on port 5353 (both
    bind with SO_REUSEADDR/SO_REUSEPORT).
    """
    chosen: InterfaceChoice | list[str | int] = (
        list(multicast_interfaces(interfaces)) if interfaces else InterfaceChoice.All
    )
    try:
        return AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
    except OSError as exc:
        where = ", ".join(interfaces) if interfaces else "all interfaces"
        raise ConfigError(f"mDNS cannot listen on {where}: {exc.strerror or exc}") from exc
