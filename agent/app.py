"""Composition root: the one place that builds the agent's objects and wires them together."""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import signal
import ssl
import time
from collections import Counter
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from agent import __version__
from agent.access.model import Scope, ScopeLevel, Status, format_time
from agent.access.policy import FailureLimiter
from agent.access.recorder import AccessRecorder
from agent.access.service import AccessService
from agent.access.sessions import SessionLimits
from agent.access.store import NewToken, TokenStore
from agent.access.tokens import Kind
from agent.beat import until_beat
from agent.config import Config, check_secret_files, load, publisher_token
from agent.discovery.adopted import AdoptedCamera, held_move_text
from agent.discovery.keyframes import CameraKeyframes
from agent.errors import AgentError
from agent.hls.server import HlsServer
from agent.http import server, tls
from agent.http.admin import AdminApi
from agent.http.connections import ConnectionLimits, quiet_accept_errors, raise_open_files
from agent.http.metrics import LoopLag, Metrics
from agent.http.views import Views
from agent.http.whep import WhepEndpoint
from agent.links import certificate_names, rtsp_urls, viewer_urls
from agent.media.cameras import Cameras
from agent.media.snapshot import Snapshotter
from agent.relay.always import AlwaysPublisher
from agent.relay.link import LinkState, RelayLink, camera_inventory
from agent.rtsp.server import RtspServer
from agent.state.db import db_path, file_problem
from agent.stopping import DetachedExecutor, StopBudget, cancel_and_wait
from agent.stores import State, open_state
from agent.systemd import Notifier
from agent.webrtc import stack
from agent.webrtc.ice import host_addresses, ice_servers, to_rtc, with_relay_servers

if TYPE_CHECKING:  # zeroconf and zeep load slowly: imported when discovery starts
    from zeroconf.asyncio import AsyncZeroconf

    from agent.discovery.follow import CameraFollower
    from agent.discovery.mdns import AgentAdvertiser

log = structlog.get_logger(__name__)

QUICK_START_LABEL = "quick-start"
QUICK_START_TTL = timedelta(days=1)
#: Cameras adopted or removed by `therelay-agent cameras` are looked for after each write to
#: the database the token watcher notices, at most this often (seconds).
ADOPTED_POLL = 1.0
#: Seconds between checks that the database file is still the one the daemon opened, and
#: between repeats of the error while it is not.
DB_CHECK_INTERVAL = 5.0
DB_NAG = 60.0
#: SIGTERM to exit: systemd's stop timeout is 5 s; the audit flush and exit take the rest.
STOP_WITHIN = 4.0
REQUEST_GRACE = 1.0
CAMERA_RELEASE = 1.0


def build_access(config: Config, store: TokenStore) -> AccessService:
    fa = config.tokens.failed_attempts
    recorder = AccessRecorder(
        db_path(config.state_dir),
        max_ips=config.tokens.max_ips_per_token,
        flush_interval=config.audit.flush_interval,
        denial_window=config.audit.denial_window,
        max_bytes=config.audit.max_size_mb * 1024 * 1024,
        reserve=True,
    )
    s = config.sessions
    return AccessService(
        store, recorder, FailureLimiter(fa.burst, fa.per_minute, fa.max_ips),
        retention_days=config.audit.retention_days,
        session_limits=SessionLimits(s.max_total, s.max_per_ip, s.max_pending_per_ip,
                                     retry_after_ip=max(1, round(s.handshake_timeout))),
    )



def tune_interpreter() -> None:
    """Process-wide interpreter settings for a responsive event loop (docs/field-notes.md,
    "CPython and a big tokens.sync"). Call once, before serving: it blocks for one full
    garbage collection.

    - The garbage collector: collect the start-up garbage, then move every object alive now
      (the imported modules of aiortc, PyAV, aiohttp…, the config) to the collector's
      permanent generation. They live as long as the process, yet each full collection
      walked them all again: ~80,000 objects, 55-130 ms with the event loop stopped.
      Frozen objects are still freed when their last reference goes; only a reference
      cycle among them would stay, and the collect() first leaves none.

    The WebRTC stack and PyAV load later, on demand; agent/webrtc/stack.py freezes what
    they add the same way. (The GIL's switch interval is shortened only while a big relay
    sync is applied: agent/relay/link.py.)
    """
    gc.collect()
    gc.freeze()


def quick_start_token(config: Config, store: TokenStore, now: float) -> NewToken:
    """A fresh 24-hour viewer token for the first camera; earlier quick-start tokens revoked."""
    for old in store.list_tokens(now, kind=Kind.ACCESS, status=Status.ACTIVE):
        if old.label == QUICK_START_LABEL and old.created_by == QUICK_START_LABEL:
            store.revoke(old.id, now, actor=QUICK_START_LABEL)
    return store.create(
        Kind.ACCESS, Scope(ScopeLevel.CAMERA, config.cameras[0].id), now,
        ttl=QUICK_START_TTL.total_seconds(),
        label=QUICK_START_LABEL, created_by=QUICK_START_LABEL,
    )


class Daemon:
    """Every long-lived part of a running agent, built and wired in one place."""

    def __init__(self, config: Config, state: State, cameras: Cameras,
                 relay_token: str | None, certificate: tls.Certificate | None = None) -> None:
        """``state`` was opened with ``cameras.ids`` as its known cameras (``open_state``):
        tokens may name the cameras of the running set, which reloads change."""
        store = state.tokens
        self._db = state.db
        self.config = config
        self.certificate = certificate
        self.tls_context = tls.server_context(certificate) if certificate else None
        self.store = store
        self.started = time.time()
        self.access = build_access(config, store)
        self.cameras = cameras
        self.adopted = state.adopted
        self._adopted: list[AdoptedCamera] = []
        self.keyframes = CameraKeyframes(self.adopted)
        self._adopted_signature: tuple[object, ...] | None = None
        self._camera_lock = asyncio.Lock()  # reload and adoption apply one at a time
        self._adopted_watch: asyncio.Task[None] | None = None
        self._db_watch: asyncio.Task[None] | None = None
        self.db_problem: str | None = None  # the database file removed or replaced
        self._discovery: asyncio.Task[None] | None = None
        self._zc: AsyncZeroconf | None = None
        self.advertiser: AgentAdvertiser | None = None
        self.follower: CameraFollower | None = None
        self.notifier: Notifier | None = None  # set by run(): STATUS= when cameras change
        self.whep = WhepEndpoint(self.access, self.cameras, config.webrtc,
                                 config.media.camera_timeout,
                                 config.sessions.handshake_timeout)
        self.rtsp = (RtspServer(self.access, self.cameras, config.rtsp,
                                config.media.camera_timeout) if config.rtsp.enabled else None)
        self.hls = (HlsServer(self.access, self.cameras, config.hls,
                              config.media.camera_timeout) if config.hls.enabled else None)
        self.lag = LoopLag()
        self.link: RelayLink | None = None
        self.always: AlwaysPublisher | None = None
        base = ice_servers(config.webrtc)  # TURN credential files are read now
        if config.relay.publish == "always" and relay_token is not None:
            assert config.relay.whip_url_template is not None  # validated
            chosen = config.relay.always_cameras or config.camera_ids
            self.always = AlwaysPublisher(
                [c for c in self.cameras if c.id in chosen], config.relay.whip_url_template,
                config.agent.id, relay_token, lambda: to_rtc(base),
                direct=config.webrtc.send_path == "agent")
        if config.relay.url is not None and relay_token is not None:
            self.link = RelayLink(
                config.relay.url, relay_token, config.agent.id, store, state.outbox, self.access,
                camera_inventory(self.cameras),
                hubs=lambda camera_id: (c.hub if (c := self.cameras.get(camera_id)) else None),
                ice=lambda servers: with_relay_servers(base, servers),
                direct=config.webrtc.send_path == "agent")
        self.app = server.make_app(self.health)
        self.whep.routes(self.app)
        if self.hls is not None:
            self.hls.routes(self.app)
        Views(self.access, self.cameras,
              Snapshotter(config.snapshot.cache_seconds, config.media.camera_timeout + 5),
              store.site, lambda: self.rtsp.port if self.rtsp else None,
              hls=self.hls is not None).routes(self.app)
        AdminApi(self.access, store, self.cameras, self.started,
                 tls=lambda: self.certificate, held_moves=self._held_moves,
                 rtsp_port=lambda: self.rtsp.port if self.rtsp else None,
                 reception=self.whep.reception_of).routes(self.app)
        Metrics(self.access, self.cameras, self.lag, self.link, LinkState,
                reception=self.whep.reception).routes(self.app)
        self._runner: web.AppRunner | None = None

    def health(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": "degraded" if self.db_problem else "ok", "version": __version__,
            "agent_id": self.config.agent.id,
            "uptime_s": round(time.time() - self.started, 1),
            "sessions": len(self.access.sessions),
            # counts only: camera ids are for tokens that may see them (/api/v1/cameras)
            "cameras": dict(Counter(c.hub.status.state for c in self.cameras)),
            "relay": self.link.state if self.link else "not configured"}
        if self.db_problem:
            out["problems"] = [self.db_problem]
        return out

    async def _watch_database(self) -> None:
        """Notice the database file removed or replaced under the running daemon (its
        connection would go on writing a file no one sees) and say so, loudly, until fixed."""
        path, opened = self._db.path, self._db.identity
        said = 0.0
        while True:
            await asyncio.sleep(until_beat(DB_CHECK_INTERVAL))
            problem = await asyncio.to_thread(file_problem, path, opened)
            if problem != self.db_problem or (problem and time.monotonic() - said > DB_NAG):
                if problem:
                    log.error("state_database_lost", problem=problem)
                    said = time.monotonic()
                else:
                    log.info("state_database_back", path=str(path))
            self.db_problem = problem

    async def start(self) -> None:
        tune_interpreter()
        await self.access.start()
        host, port = self.config.http.host_port
        try:
            h = self.config.http
            self._runner = await server.start(self.app, host, port, ConnectionLimits(
                h.max_connections, h.max_connections_per_ip, h.header_timeout), self.tls_context)
        except OSError as exc:
            await self.access.stop()
            raise AgentError(
                f"cannot listen on {self.config.http.listen}: {exc.strerror}. Another program "
                "may use the port: change http.listen."
            ) from None
        await self._start_rtsp()
        if self.hls is not None:
            self.hls.start()
        await self._sync_adopted()
        self.cameras.start()
        self.lag.start()
        if self.link is not None:
            self.link.start()
        if self.always is not None:
            self.always.start()
        self._adopted_watch = asyncio.create_task(self._watch_adopted(), name="adopted-watch")
        self._db_watch = asyncio.create_task(self._watch_database(), name="database-watch")
        # In the background: announcing takes ~1.6 s of mDNS probing, ONVIF warm-up ~0.3 s.
        self._discovery = asyncio.create_task(self._start_discovery(), name="discovery-start")

    async def _start_rtsp(self) -> None:
        """RTSP is served beside HTTP; a port taken by another program (often another media
        server on the same box) is a loud error, not a reason to stop serving WebRTC viewers."""
        if self.rtsp is None:
            return
        try:
            await self.rtsp.start()
        except OSError as exc:
            log.error("rtsp_unavailable", listen=self.config.rtsp.listen, error=exc.strerror,
                      fix="another program may use the port: change rtsp.listen, or set "
                          "rtsp.enabled: false")
            self.rtsp = None

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; apply camera changes only, leaving the viewers
        of unchanged cameras alone. An invalid file keeps the running config."""
        if self.config.origin == "embedded defaults":
            log.info("reload_nothing_to_do", why="running on the embedded defaults")
            return
        try:
            new = await asyncio.to_thread(load, Path(self.config.origin))
        except AgentError as exc:
            log.error("reload_failed", error=str(exc), kept=self.config.origin)
            return
        others = [f.name for f in fields(Config) if f.name not in ("cameras", "origin")
                  and getattr(new, f.name) != getattr(self.config, f.name)]
        await self._reload_certificate()
        self.config = replace(self.config, cameras=new.cameras)
        added, removed, changed = await self._apply_cameras()
        if self.follower is not None:
            self.follower.probe_now()  # `systemctl reload` also looks for moved cameras
        log.info("reloaded", added=added, removed=removed, changed=changed,
                 needs_restart=others or None)

    async def _reload_certificate(self) -> None:
        """Re-read the certificate and key files (a renewed certificate): connections from
        now on present the new one. A bad pair keeps the running one, loudly."""
        if self.tls_context is None or self.config.http.tls.cert_file is None:
            return
        try:
            cert = await asyncio.to_thread(tls.certificate, self.config, [])
            assert cert is not None
            tls.reload(self.tls_context, cert)
        except AgentError as exc:
            log.error("tls_reload_failed", error=str(exc), kept=self.certificate and
                      self.certificate.fingerprint)
            return
        self.certificate = cert
        log.info("tls_reloaded", **cert.log_fields())

    # -- the camera set: config file + adopted -----------------------------------------------

    async def _apply_cameras(self) -> tuple[list[str], list[str], list[str]]:
        """Make the running cameras the config file's plus the adopted ones (the file wins
        an id clash); viewers of unchanged cameras are left alone."""
        async with self._camera_lock:
            configured = set(self.config.camera_ids)
            wanted = [*self.config.cameras,
                      *(self.adopted.config(a) for a in self._adopted if a.id not in configured)]
            added, removed, changed = await self.cameras.apply(wanted, self._end_sessions)
            if self.follower is not None:
                self.follower.set_adopted(self._adopted)
            self.keyframes.set_cameras(a for a in self._adopted if a.id not in configured)
            for camera in self.cameras:  # a viewer's PLI also asks an ONVIF camera for an IDR
                camera.hub.keyframe_source = (
                    functools.partial(self.keyframes.request, camera.id)
                    if self.keyframes.asks(camera.id) else None)
            if self.notifier is not None and (added or removed):
                self.notifier.notify(f"STATUS=serving {len(self.cameras.ids)} camera(s) on "
                                     f"{self.config.http.listen}")
            return added, removed, changed

    async def _end_sessions(self, camera_id: str, why: str) -> None:
        """Every protocol's sessions of a camera that is removed or changed."""
        await self.whep.close_camera(camera_id, why)
        if self.rtsp is not None:
            self.rtsp.close_camera(camera_id, why)
        if self.hls is not None:
            await self.hls.close_camera(camera_id, why)

    def _held_moves(self) -> dict[str, str]:
        return {a.id: held_move_text(a.id, a.pending) for a in self._adopted if a.pending}

    async def _sync_adopted(self) -> bool:
        """Re-read the adopted cameras if the CLI or discovery changed them; apply."""
        signature = await asyncio.to_thread(self.adopted.signature)
        if signature == self._adopted_signature:
            return False
        self._adopted = await asyncio.to_thread(self.adopted.all)
        self._adopted_signature = signature
        added, removed, changed = await self._apply_cameras()
        if added or removed or changed:
            log.info("adopted_cameras_applied", added=added, removed=removed, changed=changed)
        return True

    async def _watch_adopted(self) -> None:
        read = self.access.store_read
        loop = asyncio.get_running_loop()
        last = -ADOPTED_POLL
        while True:
            await read.wait()  # the database was written (or the watcher's periodic look)
            if (gap := last + ADOPTED_POLL - loop.time()) > 0:
                await asyncio.sleep(gap)
            read.clear()
            last = loop.time()
            try:
                await self._sync_adopted()
            except AgentError as exc:  # a busy database: the next look tries again
                log.warning("adopted_cameras_unreadable", error=str(exc))
                read.set()

    async def _start_discovery(self) -> None:
        try:
            await self._start_discovery_parts()
        except Exception as exc:  # discovery is a convenience: viewing goes on without it
            log.error("discovery_unavailable", error=str(exc))

    async def _start_discovery_parts(self) -> None:
        d = self.config.discovery
        if not (d.advertise or d.enabled):
            return
        # zeroconf takes ~0.1 s to import: in a thread, not on the loop
        await asyncio.to_thread(importlib.import_module, "agent.discovery.follow")
        from agent.discovery import mdns  # noqa: PLC0415 (imported above)
        from agent.discovery.follow import CameraFollower  # noqa: PLC0415
        from agent.discovery.interfaces import multicast_interfaces  # noqa: PLC0415

        if d.advertise or (d.enabled and d.mdns):
            try:
                self._zc = mdns.open_zeroconf(d.interfaces or None)
            except (AgentError, OSError) as exc:
                log.warning("mdns_unavailable", error=str(exc))
        if d.advertise and self._zc is not None:
            host, port = self.config.http.host_port
            try:
                # the listen address if it is one, else the discovery interfaces' addresses
                addresses = ([host] if host not in ("0.0.0.0", "::", "")  # noqa: S104
                             else multicast_interfaces(d.interfaces))
                self.advertiser = mdns.AgentAdvertiser(
                    self._zc, self.config.agent.id, __version__, port, addresses)
                await self.advertiser.start()
            except (AgentError, OSError) as exc:
                log.warning("mdns_announce_failed", error=str(exc))
                self.advertiser = None
        if d.enabled:  # the ONVIF client loads when a camera must prove a move
            self.follower = CameraFollower(d, self.adopted, self._zc)
            self.follower.set_adopted(self._adopted)
            await self.follower.start()

    async def _stop_discovery(self) -> None:
        """Withdraw the announcement (goodbye packets) and stop listening."""
        await cancel_and_wait(self._adopted_watch, self._db_watch, self._discovery)
        await self.keyframes.close()
        if self.advertiser is not None:
            await self.advertiser.stop()
        if self.follower is not None:
            await self.follower.stop()
        if self._zc is not None:
            await self._zc.async_close()

    def stopping(self) -> None:
        """Stopping begins: start nothing more. Discovery still starting (announcing,
        listening) is cancelled now, not after the awaits that come before ``stop``."""
        if self._discovery is not None:
            self._discovery.cancel()

    async def stop(self) -> None:
        """Stop accepting, end sessions (audited), DELETE WHIP sessions, release cameras,
        flush the audit: within STOP_WITHIN seconds whatever peers and cameras do."""
        asyncio.get_running_loop().set_default_executor(DetachedExecutor())
        budget = StopBudget(STOP_WITHIN)
        self.lag.stop()
        await budget.run("stop_discovery", self._stop_discovery())
        runner = self._runner
        if runner is not None:
            await budget.run("stop_listening", asyncio.gather(*(s.stop() for s in runner.sites)))
        publishing = [p.stop() for p in (self.link, self.always) if p is not None]
        await budget.run("stop_publishing", asyncio.gather(
            *publishing, self._drain_requests(min(REQUEST_GRACE, budget.remaining / 2))))
        if self.rtsp is not None:
            await budget.run("stop_rtsp", self.rtsp.stop())
        await budget.run("end_sessions", asyncio.gather(
            self.whep.close(), *([self.hls.close()] if self.hls is not None else [])))
        if runner is not None:
            await budget.run("close_http", runner.cleanup())
        # A healthy pull thread ends within a frame; one stuck in a camera's network timeout
        # is a daemon thread and dies with the process: waiting longer buys nothing.
        await budget.run("release_cameras", self.cameras.close(), at_most=CAMERA_RELEASE)
        await self.access.stop()  # unbounded: the audit tail must reach the disk

    async def _drain_requests(self, grace: float) -> None:
        """Requests in flight (a WHEP offer waiting for its camera) get ``grace`` seconds
        in all, then are cancelled; aiohttp's own default would wait a minute."""
        server = self._runner.server if self._runner is not None else None
        if server is not None:
            server.pre_shutdown()
            # aiohttp waits this long for the handler, then as long again after cancelling it
            await server.shutdown(grace / 2)


def _quiet_handshakes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that does not trust the certificate (or speaks plain HTTP to the HTTPS port)
    fails its handshake: routine on a LAN, so a debug line, not an error with a traceback
    (asyncio reports these only in its debug mode)."""
    exc = context.get("exception")
    if (str(context.get("message", "")).startswith("Error on transport creation")
            and isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError)):
        log.debug("tls_handshake_failed", error=str(exc))
        return
    loop.default_exception_handler(context)


async def run(config: Config, *, quick_start: bool) -> int:
    """Run the daemon until SIGINT/SIGTERM. Returns the process exit status."""
    check_secret_files(config)  # a secret others can read is refused, with the chmod fix
    relay_token = publisher_token(config)  # fails early on a bad token file
    open_files = raise_open_files()
    quiet_accept_errors(asyncio.get_running_loop())
    stack.configure(host_addresses(config.webrtc))  # installed when WebRTC is first used
    certificate = await asyncio.to_thread(tls.certificate, config, certificate_names(config))
    if certificate is not None:
        log.info("tls_ready", **certificate.log_fields())
        asyncio.get_running_loop().set_exception_handler(_quiet_handshakes)
    cameras = Cameras(config.cameras, config.media)
    state = await asyncio.to_thread(open_state, config, lambda: cameras.ids)
    # From here a SIGINT/SIGTERM stops cleanly, also while starting: the HTTP listener
    # answers (systemd or a test may see /healthz) before start() has returned.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        daemon = Daemon(config, state, cameras, relay_token, certificate)
        if quick_start and config.cameras:
            new = await asyncio.to_thread(quick_start_token, config, state.tokens, time.time())
            camera = config.cameras[0].id
            urls = "\n".join(f"  {url}" for url in viewer_urls(config, new.token))
            print(f"Watch camera '{camera}' in a browser on this network "
                  f"(access token valid until {format_time(new.record.expires_at)}, shown "
                  f"once):\n{urls}", flush=True)
            if rtsp := rtsp_urls(config, camera, new.token):
                print("Or in VLC, ffmpeg or a VMS (RTSP, same token):\n"
                      + "\n".join(f"  {url}" for url in rtsp), flush=True)
        await daemon.start()
        notifier = Notifier()
        daemon.notifier = notifier
        notifier.notify("READY=1", f"STATUS=serving {len(daemon.cameras.ids)} camera(s) on "
                                   f"{config.http.listen}")
        notifier.start_watchdog()
        log.info("agent_started", version=__version__, agent_id=config.agent.id,
                 listen=config.http.listen, state_dir=str(config.state_dir),
                 open_files_limit=open_files,
                 cameras=config.camera_ids, config=config.origin,
                 relay=config.relay.url or "not configured")
        reloading: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(daemon.reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await stop.wait()
        finally:
            log.info("agent_stopping")
            daemon.stopping()
            notifier.notify("STOPPING=1", "STATUS=stopping")
            await notifier.stop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await daemon.stop()
    finally:  # (a start that failed leaves the handlers to the loop's close)
        state.close()
    log.info("agent_stopped")
    return 0
