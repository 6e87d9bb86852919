"""Stopping within a bound: systemd sends SIGKILL when a stop outlasts its timeout.

A SIGKILL mid-stop loses the audit tail still in memory and leaves WHIP resources behind at
the relay, so every stop step that waits on a peer (a relay, a viewer, a camera stuck in its
network timeout) gets what is left of one budget, and the audit flush comes last, unbounded
(it is a local SQLite commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import structlog

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel ``tasks`` (None and finished ones are skipped) and wait until they have ended."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class StopBudget:
    """Runs stop steps one after another, each bounded by what remains of ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self._deadline = asyncio.get_running_loop().time() + seconds

    @property
    def remaining(self) -> float:
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def run(self, step: str, work: Awaitable[object], at_most: float | None = None) -> bool:
        """Await ``work`` within the budget (and ``at_most`` seconds); past it, cancel it,
        say so, and go on."""
        bound = self.remaining if at_most is None else min(self.remaining, at_most)
        try:
            # A floor: a step that got nothing left still gets to do its non-waiting part.
            await asyncio.wait_for(work, max(bound, 0.05))
        except TimeoutError:
            log.warning("stop_step_cut_short", step=step)
            return False
        return True


class DetachedExecutor(ThreadPoolExecutor):
    """A default executor for the stop: each call runs in its own daemon thread.

    A thread that waits for something slower than the stop budget (joining a camera's pull
    thread that sits in the camera's network timeout) would otherwise hold the process at
    exit: asyncio.run shuts the default executor down with wait=True, and the interpreter
    joins every pool thread. Steps the stop still awaits finish normally; only abandoned
    waits are left to die with the process.
    """

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine, as a pool does
                future.set_exception(exc)

        threading.Thread(target=call, name="stopping", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: the threads are daemons (see the class docstring)."""
