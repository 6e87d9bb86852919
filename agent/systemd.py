"""The sd_notify protocol: tell systemd (``Type=notify``) we are ready, alive, stopping.

A datagram to ``$NOTIFY_SOCKET`` (an abstract socket when it starts with ``@``); nothing at
all when the agent is not started by systemd. WATCHDOG=1 is sent every half of
``$WATCHDOG_USEC`` from the event loop, so a stuck loop gets the agent restarted.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

from agent.stopping import cancel_and_wait

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and int(usec) else None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> None:
        """Send ``KEY=value`` lines; never raises (systemd may be gone while we stop)."""
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError as exc:
                log.debug("sd_notify_failed", error=str(exc))

    def start_watchdog(self) -> None:
        if self.enabled and self.watchdog_interval:
            self._task = asyncio.get_running_loop().create_task(self._watchdog())

    async def _watchdog(self) -> None:
        assert self.watchdog_interval is not None
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
