"""Where the cgroup hierarchies are and where this process sits in them.

Pure parsing of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``; no writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# v1 hierarchies a job joins. cpuset is left out on purpose: a new cpuset cgroup has no
# cpus/mems and refuses processes (ENOSPC). devices and name=systemd limit nothing we need.
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    major: int
    minor: int
    root: str  # path inside the filesystem that is mounted
    mount_point: str
    options: frozenset[str]  # per-mount options: rw/ro, ...
    fstype: str
    source: str
    super_options: frozenset[str]  # per-superblock options; v1 controllers live here

    @property
    def writable(self) -> bool:
        return "rw" in self.options and "ro" not in self.super_options


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy as seen by this process.

    ``controllers`` is the v1 controller set of the mount (empty for cgroup2); ``own`` is
    this process's cgroup in it, relative to the mount (``/`` when at the mount's root).
    """

    controllers: frozenset[str]
    mount_point: Path
    own: str

    @property
    def own_dir(self) -> Path:
        return self.mount_point / self.own.lstrip("/")

    @property
    def name(self) -> str:
        return ",".join(sorted(self.controllers)) or "unified"


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo (proc(5)); malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            major, minor = (int(x) for x in fields[2].split(":"))
            mounts.append(
                Mount(
                    major=major,
                    minor=minor,
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=frozenset(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def parse_proc_cgroup(text: str) -> dict[frozenset[str], str]:
    """Parse /proc/self/cgroup into {controller set: path}; the v2 entry has the empty set."""
    own: dict[frozenset[str], str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        names = frozenset(n for n in parts[1].split(",") if n)
        own[names] = parts[2]
    return own


def _relative_own(own: str, mount_root: str) -> str:
    """Own path relative to the mount (a container may mount a sub-tree of the hierarchy)."""
    if mount_root in ("", "/"):
        return own
    if own == mount_root:
        return "/"
    if own.startswith(mount_root.rstrip("/") + "/"):
        return own[len(mount_root.rstrip("/")) :]
    return own


def v1_hierarchies(
    mounts: list[Mount], own_paths: dict[frozenset[str], str], wanted: tuple[str, ...]
) -> dict[str, Hierarchy]:
    """Map each wanted v1 controller to its hierarchy (co-mounted ones share a Hierarchy)."""
    found: dict[str, Hierarchy] = {}
    seen_points: set[str] = set()
    for mount in mounts:
        if mount.fstype != "cgroup" or mount.mount_point in seen_points:
            continue
        controllers = frozenset(o for o in mount.super_options if o in V1_CONTROLLERS)
        if not controllers & set(wanted):
            continue
        own = next((p for names, p in own_paths.items() if controllers <= names), None)
        if own is None:
            continue
        seen_points.add(mount.mount_point)
        hierarchy = Hierarchy(
            controllers=controllers,
            mount_point=Path(mount.mount_point),
            own=_relative_own(own, mount.root),
        )
        for controller in controllers:
            found.setdefault(controller, hierarchy)
    return found


def v2_hierarchy(mounts: list[Mount], own_paths: dict[frozenset[str], str]) -> Hierarchy | None:
    """The cgroup2 mount and our place in it, or None."""
    own = own_paths.get(frozenset())
    if own is None:
        return None
    for mount in mounts:
        if mount.fstype == "cgroup2":
            return Hierarchy(frozenset(), Path(mount.mount_point), _relative_own(own, mount.root))
    return None
