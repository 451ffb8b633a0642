"""A minimal inotify watch (ctypes): wake a Trio task when a cgroup file changes.

cgroup2's memory.events and cgroup.events raise IN_MODIFY when their values change. epoll on
the file itself is no use to Trio: kernfs files always report readable.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

import trio

IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_READ_SIZE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class FileWatch:
    """One inotify instance watching one file for modification.

    Owns a file descriptor: ``close()`` (or ``with``) releases it and wakes a pending
    ``wait()`` with trio.ClosedResourceError. Cancelling ``wait()`` leaves the watch usable.
    """

    def __init__(self, path: Path) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err), str(path))
        self._fd: int | None = fd

    async def wait(self) -> None:
        """Return after the next modification (events since the last wait count)."""
        if self._fd is None:
            raise trio.ClosedResourceError("watch closed")
        await trio.lowlevel.wait_readable(self._fd)
        try:
            while os.read(self._fd, _READ_SIZE):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(RuntimeError):  # outside Trio: nobody can be waiting
                trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
