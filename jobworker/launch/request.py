"""What the server asks the launcher to start: one job's process, placed and isolated.

Plain data; it reaches the launcher process as a dict of plain values (``to_wire``), in one
frame beside the job's output pipe (a file descriptor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Isolation", "LaunchRequest"]


@dataclass(frozen=True)
class Isolation:
    """The namespaces a job gets of its own."""

    pid: bool = False
    mount: bool = False
    cgroup: bool = False
    net: bool = False

    NAMES = ("pid", "mount", "cgroup", "net")

    @property
    def names(self) -> list[str]:
        return [name for name in self.NAMES if getattr(self, name)]

    def describe(self) -> str:
        return ", ".join(self.names) or "none"


@dataclass(frozen=True)
class LaunchRequest:
    """One job's process: what to exec, where to place it, what it may see, who it runs as."""

    job_id: str
    argv: list[str]  # argv[0] is the resolved absolute path
    env: dict[str, str]
    # The job's HOME, and its cwd unless ``cwd`` is given (a host path, bound at the same
    # place inside).
    work_dir: str
    # A working directory the client asked for (a host path, checked usable by the job's
    # user); empty: the work dir. Bound writable at its own path under mount isolation.
    cwd: str = ""
    procs_files: list[str] = field(default_factory=list)  # cgroup.procs of every hierarchy
    isolation: Isolation = Isolation()
    # Host paths the job must not see (the data dir, the certs dir): covered by an empty,
    # read-only tmpfs when the job has its own mount namespace.
    hidden: list[str] = field(default_factory=list)
    # The host's cgroup mounts, (mount point, fstype, options), mounted afresh inside a job
    # with its own cgroup and mount namespaces: each then shows the job's own cgroup as its
    # root, and nothing of the other jobs'.
    cgroup_mounts: list[tuple[str, str, str]] = field(default_factory=list)
    uid: int | None = None  # None: keep the launcher's own (root stays root)
    gid: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)
