"""The retry policy every reconnect loop uses (cameras, relay link, WHIP sessions).

A plain generator of delays: exponential backoff with full jitter, capped. Loops log a
repeated failure loudly once, then quietly (see :class:`FailureLog`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any


def backoff(
    initial: float = 1.0, maximum: float = 60.0, factor: float = 2.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Delays before each retry: uniform in [initial/2, min(maximum, initial * factor**n)]."""
    pick = (rng or random.Random()).uniform  # noqa: S311 (jitter, not secrets)
    ceiling = initial
    while True:
        yield pick(initial / 2, ceiling)
        ceiling = min(maximum, ceiling * factor)


class FailureLog:
    """Say a failure loudly the first time (or when it changes), then quietly."""

    def __init__(self, log: Any, event: str, **context: Any) -> None:
        self._log = log
        self._event = event
        self._context = context
        self._last: str | None = None
        self.count = 0

    def failed(self, error: str, **extra: Any) -> None:
        self.count += 1
        loud = error != self._last
        self._last = error
        (self._log.warning if loud else self._log.debug)(
            self._event, error=error, attempt=self.count, **self._context, **extra)

    def recovered(self, event: str, **extra: Any) -> None:
        if self.count:
            self._log.info(event, after_attempts=self.count, **self._context, **extra)
        self.count = 0
        self._last = None
