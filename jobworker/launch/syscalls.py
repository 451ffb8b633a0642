"""The few Linux system calls the launcher needs that Python 3.11's os module lacks.

Called through ctypes on the C library already loaded into the interpreter (``syscall``
for mount_setattr, which glibc wraps only from 2.36). Each raises OSError with the
kernel's errno, like the os module does. Imported by the launcher process, which stays
small: no ctypes.util (it imports shutil and subprocess), no platform.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "mount",
    "no_new_privs",
    "rdonly_recursive",
    "set_child_subreaper",
    "setns",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
# mount_setattr(2) has one number on every architecture since it was added (5.12).
SYS_MOUNT_SETATTR = 442

_libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own C library
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.syscall.restype = ctypes.c_long


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype))


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            flags,
            data.encode() or None,
        )
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def rdonly_recursive(path: str) -> None:
    """Make the mount at ``path`` and every mount below it read-only (mount_setattr)."""
    if os.uname().machine not in ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x"):
        raise OSError(38, "mount_setattr is not known on this architecture")
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    _check(
        _libc.syscall(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    )


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0))


def no_new_privs() -> None:
    """No exec from here on can grant privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper() -> None:
    """Orphans of this process's descendants reparent to it (and must be reaped by it)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
