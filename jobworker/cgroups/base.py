"""The seam between the engine and resource control.

The engine asks a ResourceController for one JobCgroup per job, hands its
``cgroup.procs`` files to the launcher (the job's process joins them itself,
before it execs), tells it the pid once spawned, watches it for OOM, and kills
through it. Drivers:
``v1`` and ``v2`` (real cgroups) and ``null`` (no cgroups: process-group
kill, nothing enforced).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# The spec's defaults for a limit left at 0 ("Resource Limits").
DEFAULT_CPU_PERCENT = 100  # 100% of one core
DEFAULT_MEMORY_MB = 512
DEFAULT_IO_BPS = 0  # unlimited
DEFAULT_PIDS_MAX = 4096  # against fork bombs; configurable on the server


@dataclass(frozen=True)
class Limits:
    """Resource limits with defaults applied (what the job actually runs under)."""

    cpu_percent: int = DEFAULT_CPU_PERCENT  # percent of one core
    memory_mb: int = DEFAULT_MEMORY_MB
    io_bps: int = DEFAULT_IO_BPS  # bytes/s for read and for write; 0 = unlimited
    pids_max: int = DEFAULT_PIDS_MAX


@dataclass(frozen=True)
class Usage:
    """Resources a job used, read from its cgroup at the end (None where not measured)."""

    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = None
    oom_kills: int = 0
    # Block IO that went through the job's cgroup (direct IO and reads; on v1 the page
    # cache's writeback is not charged to the job): None where not measured.
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


class JobCgroup(Protocol):
    """The control group(s) of one job, in every hierarchy the driver uses."""

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` file of each of the job's cgroups: the launcher's child
        writes itself into every one before it execs the command, so anything it forks
        starts inside the limits. Empty when there are no cgroups."""
        ...

    def attach(self, pid: int) -> None:
        """Called once the job's main process runs, placed (its pid is also its pgid)."""
        ...

    def oom_kills(self) -> int:
        """The kernel's OOM-kill counter for this job's cgroup (0 when not measurable)."""
        ...

    async def wait_oom(self) -> None:
        """Return once the OOM-kill counter has risen above 0. Cancellable; must not burn CPU
        (event-driven, or a slow poll of a counter file)."""
        ...

    async def kill(self, grace: float) -> bool:
        """End every process of the job. With grace > 0: SIGTERM to all, wait until they are
        gone or ``grace`` seconds passed (returns early when empty), then lift the job's IO
        throttle (a process in throttled IO cannot die until its IO is dispatched) and SIGKILL
        whatever is left so that nothing can fork away (freezer / cgroup.kill), until empty.
        grace == 0: straight to SIGKILL. Returns True once no process of the job is left, False
        if some survived the bound (already logged). Never raises for processes that are
        already gone. Called from shielded cleanup; must finish in bounded time."""
        ...

    def usage(self) -> Usage:
        """CPU time, peak memory and OOM kills so far (read before remove())."""
        ...

    async def remove(self) -> None:
        """Remove the job's cgroups (retrying while the kernel says EBUSY, bounded).
        Idempotent. Logs, never raises, if a directory cannot be removed in time."""
        ...


class ResourceController(Protocol):
    """Creates job cgroups under the server's own cgroup(s)."""

    @property
    def enforced(self) -> bool:
        """True when limits are really applied (False for the null driver)."""
        ...

    @property
    def description(self) -> str:
        """One line for the startup log: driver and where job cgroups live."""
        ...

    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        """Make the job's cgroup(s) and write its limits. If the kernel refuses a limit, remove
        what was made and raise LimitRefused naming the limit."""
        ...

    async def sweep(self) -> list[str]:
        """Kill and remove job cgroups left by a previous server; return their job ids."""
        ...

    async def remove_roots(self) -> None:
        """Remove this server's (by then empty) job-cgroup root: called at clean shutdown,
        after every job has ended. Bounded; logs, never raises."""
        ...
