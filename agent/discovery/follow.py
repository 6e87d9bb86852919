"""The daemon's eye on the network: adopted cameras are followed when their address changes.

Three sources of news, all optional (``discovery`` config section): ONVIF Hello/Bye
announcements, mDNS announcements, and a periodic probe for cameras that announce nothing.
When an adopted camera turns up at another address, its stream URL is asked again over
ONVIF (with its stored credentials; the camera may also have changed its port or path) or
taken from the mDNS announcement, and the new URL is written to the state database — the
daemon's camera watcher then reconnects the camera there. Nothing is adopted automatically.

The adopted set is held in memory (refreshed by the daemon on every change), so a flood of
announcements costs a dictionary lookup each, never a database query.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from zeroconf.asyncio import AsyncZeroconf

from agent import logs
from agent.config import DiscoverySection, read_secret
from agent.discovery import mdns, onvif, wsd
from agent.discovery.adopted import AdoptedCamera, AdoptedCameras
from agent.discovery.catalog import Sighting, host_of
from agent.discovery.scan import scan, stream_url
from agent.errors import AgentError
from agent.stopping import cancel_and_wait

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
        if rtsp_url is not None:
            new_source, new_xaddr = rtsp_url, camera.xaddr
        else:
            new_xaddr = xaddrs[0]
            if new_xaddr == camera.xaddr and host_of(camera.source) == host_of(new_xaddr):
                return  # where it was: nothing to ask
            new_source = await self._ask_stream(camera, new_xaddr)
        if new_source == camera.source and new_xaddr == camera.xaddr:
            return
        old, new = host_of(camera.source), host_of(new_source)
        await asyncio.to_thread(self._adopted.moved, camera.id, new_source, new_xaddr,
                                detail={"from": old, "to": new})
        log.info("camera_moved", camera=camera.id, old=old, new=new,
                 source=logs.redact_text(new_source))

    async def _ask_stream(self, camera: AdoptedCamera, xaddr: str) -> str:
        """The stream URL at the camera's new address: asked over ONVIF, else the old URL
        with the new host (when the camera does not answer the question right now)."""
        try:
            password = await asyncio.to_thread(
                read_secret, f"camera-{camera.id}", self._adopted.password_file(camera.id)
                if camera.username else None)
            return await stream_url(xaddr, camera.username, password, camera.profile,
                                    timeout=self._section.probe_timeout + 5)
        except AgentError as exc:
            log.warning("camera_moved_onvif_failed", camera=camera.id, error=str(exc))
        return onvif.with_host(camera.source, host_of(xaddr) or "")
