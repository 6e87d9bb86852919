"""``therelay-agent doctor``: check everything the agent needs, and say how to fix it.

``await diagnose(config_path, timeout)`` returns a :class:`Report`. Every check runs
concurrently with the others, each network step bounded by ``timeout``; blocking work runs
in threads. Doctor is safe next to a running daemon: it never binds the HTTP port while the
daemon holds it, opens the database read-only, asks cameras only OPTIONS/DESCRIBE (never
PLAY), and never says ``hello`` to the relay while the daemon's link is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from agent.config import CameraConfig, Config, load
from agent.discovery.adopted import (
    CREDENTIALS_DIR,
    AdoptedCamera,
    camera_config,
    held_move_text,
    read_adopted_cameras,
)
from agent.doctor.model import DEFAULT_TIMEOUT, Report, Result, Status, result
from agent.errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT", "Report", "Result", "Status", "diagnose", "run_checks"]

log = structlog.get_logger(__name__)


async def diagnose(config_path: Path | None, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Load the config (a failure is the report), then run every check."""
    try:
        config = await asyncio.to_thread(load, config_path)
    except ConfigError as exc:
        first, *rest = str(exc).splitlines()
        more = f" (and {len(rest)} more)" if rest else ""
        return Report(str(config_path) if config_path else "embedded defaults", [
            result("agent", "config", Status.FAIL, f"{first}{more}",
                   "fix the config file, then run: therelay-agent config check")],
            config_error=True)
    return await run_checks(config, timeout)


async def _guard(group: str, name: str, timeout: float,
                 work: Callable[[], Awaitable[list[Result]]]) -> list[Result]:
    """Run one check (or chain of steps) with an overall bound; a crash becomes a finding."""
    try:
        return await asyncio.wait_for(work(), timeout)
    except TimeoutError:
        return [result(group, name, Status.FAIL, f"no result within {timeout:g} s",
                       "run doctor again with a larger --timeout")]
    except Exception as exc:  # a bug in a check must not hide the other checks' results
        log.warning("doctor_check_failed", check=f"{group}/{name}", error=repr(exc))
        return [result(group, name, Status.FAIL, f"the check itself failed: "
                       f"{type(exc).__name__}: {exc}", "please report this with the output")]


async def run_checks(config: Config, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Every check for ``config``, concurrently; results in a stable order."""
    # The checks import aiohttp, websockets and the relay link: loaded when doctor runs,
    # not when the CLI starts (agent.cli imports this package for its parser).
    from agent.doctor import local  # noqa: PLC0415
    from agent.doctor.relay import check_relay  # noqa: PLC0415

    cameras_n = len(config.cameras)  # adopted cameras are checked too, listed by id
    relay = config.relay.url or "not configured"
    head = [result("agent", "config", Status.OK,
                   f"valid: {config.origin}, agent {config.agent.id}, {cameras_n} camera(s), "
                   f"relay {relay}")]
    # One long bound for work in threads (database checks on a large file, PyAV probes),
    # several for the sequential network steps of a camera (dns, tcp, rtsp).
    slow = max(timeout * 3, 10.0)
    daemon_task = asyncio.ensure_future(local.probe_daemon(config, timeout))

    def thread(fn: Callable[[], Result]) -> Callable[[], Awaitable[list[Result]]]:
        async def work() -> list[Result]:
            return [await asyncio.to_thread(fn)]
        return work

    async def http() -> list[Result]:
        daemon = await daemon_task
        free = None if daemon.running else await asyncio.to_thread(local.port_free_sync, config)
        return [local.judge_http(config, daemon, free)]

    async def rtsp() -> list[Result]:
        daemon = await daemon_task
        if not config.rtsp.enabled:
            return [local.judge_rtsp(config, daemon, None, None)]
        server = await local.rtsp_server_name(config, timeout) if daemon.running else None
        free = (None if daemon.running else
                await asyncio.to_thread(local.bind_free_sync, *config.rtsp.host_port))
        return [local.judge_rtsp(config, daemon, server, free)]

    async def relay_check() -> list[Result]:
        daemon = await daemon_task
        state = str(daemon.health.get("relay")) if daemon.health else None
        return await check_relay(config, timeout, daemon.running, state)

    jobs: list[Awaitable[list[Result]]] = [
        _guard("agent", "state_dir", slow, thread(lambda: local.state_dir_sync(config))),
        _guard("agent", "database", slow,
               thread(lambda: local.database_sync(config, timeout))),
        _guard("agent", "audit", slow, thread(lambda: local.audit_sync(config, timeout))),
        _guard("agent", "disk", slow, thread(lambda: local.disk_sync(config))),
        _guard("agent", "ice", slow, thread(lambda: local.ice_sync(config))),
        _guard("agent", "tls", slow, thread(lambda: local.tls_sync(config))),
        _guard("agent", "http", timeout * 2, http),
        _guard("agent", "rtsp", timeout * 2, rtsp),
    ]
    configured = set(config.camera_ids)
    rows = [c for c in await asyncio.to_thread(read_adopted_cameras, config.state_dir)
            if c.id not in configured]
    credentials = config.state_dir / CREDENTIALS_DIR
    for camera in [*config.cameras, *(camera_config(c, credentials) for c in rows)]:
        jobs.extend(_camera_jobs(camera, timeout, slow))
    jobs.extend(_held_move(c) for c in rows if c.pending)
    jobs.append(_guard("relay", "token", timeout * 3, relay_check))
    try:
        groups = await asyncio.gather(*jobs)
    finally:
        daemon_task.cancel()
    return Report(config.origin, head + [r for g in groups for r in g])


async def _held_move(camera: AdoptedCamera) -> list[Result]:
    """A move discovery did not make on its own (discovery/trust.py): the installer decides."""
    pending = camera.pending or {}
    return [result(f"camera {camera.id}", "move", Status.WARN,
                   held_move_text(camera.id, pending),
                   "a camera that did not move was announced elsewhere by someone on the LAN: "
                   "find who (the address above); otherwise confirm the move")]


def _camera_jobs(camera: CameraConfig, timeout: float,
                 slow: float) -> list[Awaitable[list[Result]]]:
    from agent.doctor import cameras  # noqa: PLC0415 (aiohttp: loaded when doctor runs)

    g = cameras.group(camera)
    scheme = camera.source.partition("://")[0].lower()
    if scheme == "testsrc":
        return [_guard(g, "source", slow, lambda: asyncio.to_thread(cameras.testsrc_sync,
                                                                    camera))]
    if scheme == "file":
        return [_guard(g, "file", slow, lambda: asyncio.to_thread(cameras.file_sync, camera,
                                                                  timeout))]

    async def onvif() -> list[Result]:
        return [await cameras.check_onvif(camera, timeout)]

    # dns + tcp + rtsp each have their own timeout inside; this only bounds the chain.
    return [_guard(g, "rtsp", timeout * 3 + 1,
                   lambda: cameras.check_rtsp_camera(camera, timeout)),
            _guard(g, "onvif", timeout + 1, onvif)]
