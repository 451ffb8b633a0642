"""The data disk: opening files a job may have tampered with, and the room kept for
what must be written when the disk is full. Blocking file work: call from a thread."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DISK_RESERVE_BYTES",
    "DiskReserve",
    "UnsafeFile",
    "check_own_regular_file",
    "is_disk_full",
    "open_safely",
    "run_with_reserve",
]

log = logging.getLogger("jobworker.engine")

# Opening never follows a symlink planted by a job and never blocks on a fifo.
_SAFE_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeFile(Exception):
    """A file in the data dir that is not a regular file of ours (or is too large)."""


def check_own_regular_file(fd: int, *, max_bytes: int | None = None) -> os.stat_result:
    """fstat ``fd`` and raise UnsafeFile unless it is a regular file owned by our euid and,
    with ``max_bytes``, no larger than that."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile("not a regular file")
    if info.st_uid != os.geteuid():
        raise UnsafeFile(f"owned by uid {info.st_uid}, not {os.geteuid()}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UnsafeFile(f"{info.st_size} bytes, more than a record can be ({max_bytes})")
    return info


def open_safely(path: Path) -> int:
    """Open ``path`` for reading without following a symlink or blocking on a fifo.
    Raises OSError (ELOOP for a symlink); the caller checks what it opened."""
    return os.open(path, _SAFE_READ)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Room kept on the data disk for what must be written when it is full: final records (a few
# KiB each, more with long arguments) and loss markers (tens of bytes each).
DISK_RESERVE_BYTES = 4 * 1024 * 1024
RESERVE_NAME = ".reserve"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in DISK_FULL_ERRNOS


class DiskReserve:
    """A file of DISK_RESERVE_BYTES in the data dir, given back to the disk when it is full
    so that final records and loss markers still fit. Blocking: call from a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / RESERVE_NAME
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        """Create the reserve if it is missing; False if the disk has no room for it (or
        refuses it). Raises OSError if the reserve cannot even be looked at (a failing
        disk): the caller decides how loud that is."""
        with self._lock:
            try:
                if os.lstat(self.path).st_size >= DISK_RESERVE_BYTES:
                    return True
            except FileNotFoundError:
                pass
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o600)
                try:
                    os.posix_fallocate(fd, 0, DISK_RESERVE_BYTES)
                finally:
                    os.close(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                return False
            return True

    def release(self) -> bool:
        """Free the reserve; True if there was one to free."""
        with self._lock:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                return False
            log.warning("data disk full: released the %d-byte reserve", DISK_RESERVE_BYTES)
            return True


def run_with_reserve(reserve: DiskReserve | None, write: Callable[[], None]) -> None:
    """``write()``; if it finds the disk full, release the reserve and try once more."""
    try:
        write()
    except OSError as exc:
        if reserve is None or not is_disk_full(exc) or not reserve.release():
            raise
        write()
