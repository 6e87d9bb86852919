"""The WebRTC stack loads when the first WebRTC session needs it, not at start.

aiortc brings aioice, PyAV, pylibsrtp, cryptography and pyOpenSSL: about 40 MB of the
process's memory, more than the rest of an idle agent together (docs/field-notes.md, "What
the idle agent's memory is made of"). An agent whose cameras nobody watches over WebRTC, and
that publishes nothing to the relay, never loads it. The first WHEP offer or relay publish
loads it in a thread (0.3-0.8 s here, once per process; a request for the viewer page starts
it early, so a browser's first offer rarely waits for it), then installs the
agent's process-wide changes to it: the ICE host addresses (agent/webrtc/ice.py) and the
per-packet speedups (agent/webrtc/speedups.py).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys

import structlog

log = structlog.get_logger(__name__)

#: What the first session imports: the modules that import aiortc itself.
MODULES = ("agent.webrtc.session", "agent.webrtc.whip")

_host_addresses: list[str] | None = None
_installed = False
_preloading: asyncio.Task[None] | None = None  # the loop keeps only a weak reference


def configure(host_addresses: list[str] | None) -> None:
    """The ICE host addresses to offer (None: aioice's own choice); installed now if the
    stack is loaded, otherwise when it loads."""
    global _host_addresses  # noqa: PLW0603 (one stack per process, like aioice's own lookup)
    _host_addresses = None if host_addresses is None else list(host_addresses)
    if _installed:
        _install()


async def load() -> None:
    """Import the stack (in a thread: it takes a few tenths of a second) and install the
    agent's changes to it. Cheap once done; concurrent first callers share the import
    (Python's import lock)."""
    global _installed  # noqa: PLW0603
    if _installed:
        return
    if (_preloading is not None and not _preloading.done()
            and _preloading.get_loop() is asyncio.get_running_loop()
            and _preloading is not asyncio.current_task()):
        await asyncio.shield(_preloading)  # the viewer page started it: wait for that one
        return
    started = asyncio.get_running_loop().time()
    if not all(name in sys.modules for name in MODULES):
        await asyncio.to_thread(_import)
    _install()
    _installed = True
    # What the import added (tens of thousands of long-lived objects) leaves the collector's
    # generations, as the daemon's start-up heap did (app.tune_interpreter): full collections
    # would otherwise walk it again each time, with the loop stopped.
    gc.freeze()
    log.info("webrtc_stack_loaded",
             seconds=round(asyncio.get_running_loop().time() - started, 3))


def preload() -> None:
    """Start loading now, in the background: a browser that fetched the viewer page sends
    its offer a moment later, and finds the stack (mostly) loaded."""
    global _preloading  # noqa: PLW0603
    if _installed or (_preloading is not None and not _preloading.done()
                      and _preloading.get_loop() is asyncio.get_running_loop()):
        return
    _preloading = asyncio.get_running_loop().create_task(load(), name="webrtc-stack")


def _import() -> None:
    for name in MODULES:
        importlib.import_module(name)


def _install() -> None:
    from agent.webrtc import speedups  # noqa: PLC0415 (imports aiortc)
    from agent.webrtc.ice import install_host_addresses  # noqa: PLC0415

    install_host_addresses(_host_addresses)
    speedups.install()
