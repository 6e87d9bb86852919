"""Tell the daemon when any process writes the state database, without polling its files.

Linux inotify on the database's directory: every commit (the CLI's, the daemon's own) writes
the database's WAL through this host's kernel, which reports it on a file descriptor the
event loop watches; nothing wakes while nothing is written (docs/field-notes.md, "What the
idle agent spends CPU on"). Where inotify is unavailable (another OS, no watch left:
``fs.inotify.max_user_watches``) ``StoreChanges.open`` returns None and the caller polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# <sys/inotify.h>
_IN_MODIFY, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x2, 0x80, 0x100, 0x200
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_MASK = _IN_MODIFY | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class StoreChanges:
    """Calls ``on_change`` on the event loop after the database (or its WAL) was written."""

    def __init__(self, fd: int, path: Path, on_change: Callable[[], None]) -> None:
        self._fd = fd
        self._names = {path.name.encode() + suffix for suffix in (b"", b"-wal", b"-journal")}
        self._on_change = on_change
        #: False once the watch is gone (the directory removed): the caller polls again.
        self.alive = True
        self._listening = True
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._read)

    @classmethod
    def open(cls, path: Path, on_change: Callable[[], None]) -> StoreChanges | None:
        """Watch the database at ``path``; None if this system cannot (the caller polls)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, AttributeError):
            return None
        if fd < 0:
            log.info("store_changes_polled", error=os.strerror(ctypes.get_errno()))
            return None
        if int(libc.inotify_add_watch(fd, bytes(path.parent), _MASK)) < 0:
            log.info("store_changes_polled", error=os.strerror(ctypes.get_errno()),
                     fix="raise fs.inotify.max_user_watches; until then the agent polls")
            os.close(fd)
            return None
        return cls(fd, path, on_change)

    def rearm(self) -> bool:
        """Call before each look at the store: True if it was written since the previous
        look (that look sees those writes). ``on_change`` is called once per look at most:
        under load the agent's own audit commits write the store thousands of times a
        second, and reading each of their events cost a quarter of its grants."""
        if not self.alive:
            return False
        written = self._events()
        if self.alive and not self._listening:
            self._loop.add_reader(self._fd, self._read)
            self._listening = True
        return written

    def _read(self) -> None:
        if self._events():
            self._pause()
            self._on_change()

    def _events(self) -> bool:
        """Read what is queued: True if the database was written (or events were lost)."""
        written = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return written
            except OSError:
                data = b""
            if not data:  # not expected from inotify: stop trusting it
                self.alive = False
                self._pause()
                return True
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if mask & _IN_IGNORED:  # the directory went away: nothing more will come
                    self.alive = False
                    self._pause()
                written = written or bool(mask & (_IN_Q_OVERFLOW | _IN_IGNORED)) \
                    or name in self._names

    def _pause(self) -> None:
        if self._listening:
            self._loop.remove_reader(self._fd)
            self._listening = False

    def close(self) -> None:
        self.alive = False
        self._pause()
        with contextlib.suppress(OSError):
            os.close(self._fd)
