"""The daemon's eye on the network: adopted cameras are followed when their address changes.

Three sources of news, all optional (``discovery`` config section): ONVIF Hello/Bye
announcements, mDNS announcements, and a periodic probe for cameras that announce nothing.
When an adopted camera is announced at another address, that is only a hint (anyone on the
LAN can send one): the camera follows only if the new address lies in the networks it may
move to and the device there proves over ONVIF, with the stored credentials, that it has the
serial number recorded at adoption (discovery/trust.py). Then its stream URL, asked again
there, is written to the state database and the daemon's camera watcher reconnects the camera.
Any other move is held for the installer (`cameras list`, `doctor`, `cameras move`). Nothing
is adopted automatically.

The adopted set is held in memory (refreshed by the daemon on every change), so a flood of
announcements costs a dictionary lookup each, never a database query.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from zeroconf.asyncio import AsyncZeroconf

from agent import logs
from agent.config import DiscoverySection, read_secret
from agent.discovery import mdns, trust, wsd
from agent.discovery.adopted import AdoptedCamera, AdoptedCameras
from agent.discovery.catalog import Sighting, host_of
from agent.discovery.scan import load_onvif, profile_url, scan
from agent.errors import AgentError
from agent.stopping import cancel_and_wait

if TYPE_CHECKING:  # the ONVIF client loads when a camera must prove a move (load_onvif)
    from agent.discovery import onvif

log = structlog.get_logger(__name__)


class CameraFollower:
    """Listens and probes; moves an adopted camera's stream URL to where the camera is now."""

    def __init__(self, section: DiscoverySection, adopted: AdoptedCameras,
                 zc: AsyncZeroconf | None) -> None:
        self._section = section
        self._adopted = adopted
        self._zc = zc
        self._known: dict[str, AdoptedCamera] = {}  # identity → camera
        self._busy: set[str] = set()  # camera ids being followed right now
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: wsd.WsdListener | None = None
        self._browser: mdns.MdnsBrowser | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._onvif_ready = False

    def set_adopted(self, cameras: Sequence[AdoptedCamera]) -> None:
        self._known = {c.identity: c for c in cameras}

    async def start(self) -> None:
        interfaces = self._section.interfaces or None
        if self._section.onvif:
            listener = wsd.WsdListener(self._on_hello, self._on_bye, interfaces=interfaces)
            try:
                await listener.start()
                self._listener = listener
            except (AgentError, OSError) as exc:  # the probe still works without it
                log.warning("onvif_listen_unavailable", error=str(exc))
        if self._section.mdns and self._zc is not None:
            self._browser = mdns.MdnsBrowser(self._zc, self._section.mdns_types,
                                             self._on_mdns)
            await self._browser.start()
        self._periodic = asyncio.create_task(self._probe_every(), name="discovery-probe")

    async def stop(self) -> None:
        await cancel_and_wait(self._periodic, *self._tasks)
        if self._listener is not None:
            await self._listener.stop()
        if self._browser is not None:
            await self._browser.stop()

    # -- news -----------------------------------------------------------------------------

    def _spawn(self, camera: AdoptedCamera, xaddrs: Sequence[str], rtsp_url: str | None) -> None:
        if camera.id in self._busy:
            return
        self._busy.add(camera.id)
        task = asyncio.get_running_loop().create_task(self._follow(camera, xaddrs, rtsp_url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._busy.discard(camera.id))

    def _on_hello(self, endpoint: wsd.WsdEndpoint) -> None:
        camera = self._known.get(endpoint.uuid)
        if camera is not None and camera.method == "onvif" and endpoint.xaddrs:
            self._spawn(camera, endpoint.xaddrs, None)

    def _on_bye(self, uuid: str) -> None:
        camera = self._known.get(uuid)
        if camera is not None:
            log.info("camera_said_bye", camera=camera.id)

    def _on_mdns(self, kind: str, service: mdns.MdnsService) -> None:
        camera = self._known.get(service.instance)
        if camera is not None and kind != "removed" and service.rtsp_url:
            self._spawn(camera, (), service.rtsp_url)

    def probe_now(self) -> None:
        """Probe at once (on SIGHUP) instead of waiting for the next interval."""
        self._wake.set()

    async def _probe_every(self) -> None:
        interval = self._section.interval or None  # 0: only when asked
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                result = await scan(self._section, self._section.probe_timeout, query=False)
            except Exception as exc:  # a failed probe must not end discovery
                log.warning("discovery_probe_failed", error=str(exc))
                continue
            await asyncio.to_thread(self._adopted.remember,
                                    [(s.identity, s.to_dict()) for s in result.sightings])
            for sighting in result.sightings:
                self._seen(sighting)

    def _seen(self, sighting: Sighting) -> None:
        camera = self._known.get(sighting.identity)
        if camera is None:
            camera = next((self._known[i] for i in sighting.mdns if i in self._known), None)
        if camera is None:
            return
        if camera.method == "onvif" and sighting.xaddrs:
            self._spawn(camera, sighting.xaddrs, None)
        elif camera.method == "mdns" and sighting.rtsp_urls:
            self._spawn(camera, (), sighting.rtsp_urls[0])

    # -- following --------------------------------------------------------------------------

    async def _follow(self, camera: AdoptedCamera, xaddrs: Sequence[str],
                      rtsp_url: str | None) -> None:
        """An announcement put ``camera`` elsewhere: a hint, checked before anything is sent
        there (discovery/trust.py); a move that does not prove itself is held."""
        new_xaddr = xaddrs[0] if xaddrs else None
        old = host_of(camera.source)
        new = host_of(rtsp_url) if rtsp_url is not None else host_of(new_xaddr or "")
        if old == new and (rtsp_url is not None or new_xaddr == camera.xaddr):
            return  # where it was (an mDNS URL spelled another way is no move)
        networks = trust.allowed_networks(self._section.follow_networks,
                                          camera.home_network or trust.home_network(old or ""))
        where = {"from": old, "to": _short(new), "xaddr": _short(new_xaddr)}
        if not trust.in_networks(new, networks):
            await self._hold(camera, where, "the new address is outside the networks cameras "
                             "may move to on their own (discovery.follow_networks)")
            return
        if rtsp_url is not None or new_xaddr is None:
            await self._hold(camera, where, "announced over mDNS, which cannot prove it is the "
                             "same camera")
            return
        recorded = camera.identity_record
        if not recorded.known:
            recorded = await self._record_identity(camera)
            if not recorded.known:
                await self._hold(camera, where, "no serial number was recorded for this camera "
                                 "and it does not answer ONVIF at its old address")
                return
        try:
            device = await self._query(camera, new_xaddr)
            new_source = profile_url(device, new_xaddr, camera.profile)
        except AgentError as exc:
            await self._hold(camera, where, f"the device there did not prove it is this "
                             f"camera over ONVIF: {exc}")
            return
        if not trust.same_device(recorded, trust.Identity(device.serial, device.hardware_id)):
            await self._hold(camera, where, "the device there reports another serial number or "
                             "hardware id than this camera")
            return
        new = host_of(new_source)
        await asyncio.to_thread(self._adopted.moved, camera.id, new_source, new_xaddr,
                                detail={"from": old, "to": new, "proof": "onvif"})
        log.info("camera_moved", camera=camera.id, old=old, new=new,
                 source=logs.redact_text(new_source))

    async def _hold(self, camera: AdoptedCamera, where: dict[str, str | None],
                    reason: str) -> None:
        if await asyncio.to_thread(self._adopted.hold_move, camera.id,
                                   {**where, "reason": reason}):
            log.warning("camera_move_held", camera=camera.id, old=where["from"],
                        new=where["to"], reason=reason,
                        fix=f"if the camera really moved: therelay-agent cameras move "
                            f"{camera.id} {where['to']}")

    async def _query(self, camera: AdoptedCamera, xaddr: str) -> onvif.OnvifDevice:
        password = await asyncio.to_thread(
            read_secret, f"camera-{camera.id}", self._adopted.password_file(camera.id)
            if camera.username else None)
        await self._load_onvif()
        from agent.discovery import onvif  # noqa: PLC0415 (loaded just now)

        return await onvif.query_device(xaddr, camera.username, password,
                                        timeout=self._section.probe_timeout + 5)

    async def _load_onvif(self) -> None:
        """The ONVIF client and its parsed WSDLs, the first time a camera is asked (not at
        start: most agents never need them). The parsed WSDLs are a large object graph that
        lives for good; a full garbage collection walking it took 45-99 ms here, so it is
        moved out of the collector's way (``gc.freeze``), as the daemon once did at start."""
        if self._onvif_ready:
            return
        await load_onvif()
        from agent.discovery import onvif  # noqa: PLC0415 (loaded just now)

        await onvif.warm_up()
        gc.freeze()
        self._onvif_ready = True

    async def _record_identity(self, camera: AdoptedCamera) -> trust.Identity:
        """A camera adopted before identities were kept: ask it where it was adopted (an
        address the installer chose), and record what it says."""
        if camera.xaddr is None:
            return trust.Identity(None, None)
        try:
            device = await self._query(camera, camera.xaddr)
        except AgentError as exc:
            log.warning("camera_identity_unknown", camera=camera.id, error=str(exc))
            return trust.Identity(None, None)
        identity = trust.Identity(device.serial, device.hardware_id)
        if identity.known:
            home = trust.home_network(host_of(camera.source) or "")
            await asyncio.to_thread(self._adopted.record_identity, camera.id, identity, home)
        return identity


def _short(text: str | None, limit: int = 200) -> str | None:
    """Announced text kept for the installer, bounded (announcements come from anyone)."""
    return text[:limit] if text else text
