"""One discovery pass: WS-Discovery probe and mDNS browse side by side, then ONVIF queries.

Used by ``therelay-agent discover`` and by the daemon's periodic probe. Each way of looking
fails on its own: no mDNS does not hide the ONVIF cameras, and a camera that refuses the
credentials is still listed, with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from agent.config import DiscoverySection
from agent.discovery import mdns, wsd
from agent.discovery.catalog import Sighting, host_of, merge
from agent.errors import AgentError

if TYPE_CHECKING:  # zeep, lxml and httpx: loaded by load_onvif() when a camera is asked
    from agent.discovery import onvif

log = structlog.get_logger(__name__)

#: ONVIF queries of one pass run this many cameras at a time (a Pi, a busy NVR).
ONVIF_CONCURRENCY = 8


async def load_onvif() -> None:
    """Import the ONVIF client (zeep, lxml, httpx: ~17 MB and ~0.2 s) in a thread, the first
    time a camera is asked something, not when the daemon starts: an agent only listening
    for announcements never needs it."""
    await asyncio.to_thread(importlib.import_module, "agent.discovery.onvif")


@dataclass
class ScanResult:
    sightings: list[Sighting]
    problems: list[str] = field(default_factory=list)  # a way of looking that failed, and why


def profile_dict(profile: onvif.OnvifProfile, host: str | None) -> dict[str, object]:
    """A profile as listed and stored; the stream URL points at the camera's current address
    (cameras behind NAT or with a stale network setting report another host)."""
    from agent.discovery import onvif  # noqa: PLC0415 (loaded by the query that gave it)

    out = asdict(profile)
    for key in ("stream_uri", "snapshot_uri"):
        if out[key] and host:
            out[key] = onvif.with_host(str(out[key]), host)
    return out


def profile_url(device: onvif.OnvifDevice, xaddr: str, want: str) -> str:
    """The RTSP URL of profile ``want`` of an answered query, at the address asked."""
    from agent.discovery import onvif  # noqa: PLC0415 (loaded by the query that gave it)

    profile = onvif.choose_profile(device, want)
    if not profile.stream_uri:
        raise onvif.OnvifProfileError(f"the camera gave no RTSP stream for profile "
                                      f"{profile.token!r}: choose another with --profile")
    host = host_of(xaddr)
    return onvif.with_host(profile.stream_uri, host) if host else profile.stream_uri


def adopt_choice(sighting_profiles: list[dict[str, Any]], want: str = "main"
                 ) -> tuple[str, str | None] | None:
    """(token, note) of the profile ``cameras adopt`` would take from a listed camera, or
    None if none fits (the adopt command then says why)."""
    from agent.discovery import onvif  # noqa: PLC0415 (the CLI: zeep loads slowly)

    fields = {f.name for f in dataclasses.fields(onvif.OnvifProfile)}
    try:
        values: list[dict[str, Any]] = [{k: p.get(k) for k in fields} for p in sighting_profiles]
        profiles = tuple(onvif.OnvifProfile(**v) for v in values)
    except TypeError:  # a cached sighting from an older version
        return None
    device = onvif.OnvifDevice("", None, None, None, None, None, profiles, 0.0)
    try:
        chosen = onvif.choose_profile(device, want)
    except onvif.OnvifProfileError:
        return None
    return chosen.token, onvif.choice_note(device, want, chosen)


async def ask_onvif(sighting: Sighting, username: str | None, password: str | None,
                    timeout: float) -> None:
    """Fill in model and profiles from the camera's ONVIF services (or the reason it said no)."""
    if not sighting.xaddrs:
        return
    xaddr = sighting.xaddrs[0]
    await load_onvif()
    from agent.discovery import onvif  # noqa: PLC0415 (loaded just now)

    try:
        device = await onvif.query_device(xaddr, username, password, timeout=timeout)
    except AgentError as exc:
        sighting.onvif_error = str(exc)
        return
    sighting.manufacturer = device.manufacturer
    sighting.model = device.model
    sighting.profiles = [profile_dict(p, host_of(xaddr)) for p in device.profiles]
    sighting.onvif_error = None


async def scan(section: DiscoverySection, timeout: float, *, username: str | None = None,
               password: str | None = None, query: bool = True) -> ScanResult:
    """Probe and browse for ``timeout`` seconds; with ``query``, ask each ONVIF camera."""
    interfaces: Sequence[str] | None = section.interfaces or None
    problems: list[str] = []

    async def probe() -> list[wsd.WsdEndpoint]:
        if not section.onvif:
            return []
        try:
            return await wsd.probe(timeout, interfaces=interfaces)
        except (AgentError, OSError) as exc:
            problems.append(f"ONVIF WS-Discovery: {exc}")
            return []

    async def browse() -> list[mdns.MdnsService]:
        if not section.mdns:
            return []
        try:
            return await mdns.browse(section.mdns_types, timeout, interfaces=interfaces)
        except (AgentError, OSError) as exc:
            problems.append(f"mDNS: {exc}")
            return []

    endpoints, services = await asyncio.gather(probe(), browse())
    sightings = merge(endpoints, services)
    if query:
        limit = asyncio.Semaphore(ONVIF_CONCURRENCY)

        async def one(s: Sighting) -> None:
            async with limit:
                await ask_onvif(s, username, password, max(timeout, 5.0))

        await asyncio.gather(*(one(s) for s in sightings if s.xaddrs))
    return ScanResult(sightings, problems)
