"""The engine's data model: job specs, limits, statuses and job records.

Plain data, no I/O. The server converts these to and from protobuf; the
store writes JobRecord as JSON.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobworker.cgroups.base import (
    DEFAULT_CPU_PERCENT,
    DEFAULT_IO_BPS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PIDS_MAX,
    Limits,
    Usage,
)

__all__ = [
    "DEFAULT_CPU_PERCENT",
    "DEFAULT_IO_BPS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_PIDS_MAX",
    "JobRecord",
    "JobSpec",
    "JobStatus",
    "Limits",
    "Usage",
    "rfc3339",
    "utc_now",
]


class JobStatus(enum.StrEnum):
    """Where a job is in its life. The spec's five, plus LOST (see below)."""

    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"  # exited with status 0
    FAILED = "FAILED"  # exited non-zero, killed by a signal it was not asked to take, OOM
    STOPPED = "STOPPED"  # ended by a stop request
    # The worker restarted while the job was running: its end was not observed.
    LOST = "LOST"

    @property
    def is_terminal(self) -> bool:
        return self not in (JobStatus.INITIALIZING, JobStatus.RUNNING)


@dataclass(frozen=True)
class JobSpec:
    """What a client asks for, and who asks (``owner``: the CN of its certificate). Zero
    limits mean "the default"; validation fills them in. ``timeout_seconds`` 0 means the
    server's default time limit; ``env`` is added to the job's clean environment;
    ``working_dir`` empty means the job's own scratch dir. ``request_id`` is the client's
    idempotency key (empty: none): a create whose owner and request id match a recent one
    returns that job. ``role`` is the creator's role (the OU of its certificate): the
    manager holds it to that role's ceiling, if it has one."""

    command: str
    args: tuple[str, ...] = ()
    max_cpu: int = 0
    max_memory: int = 0
    max_iobps: int = 0
    owner: str = ""
    timeout_seconds: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    request_id: str = ""
    role: str = ""


@dataclass(frozen=True)
class JobRecord:
    """An immutable snapshot of one job, as stored in job.json and returned to callers.

    ``limits`` are the applied values (defaults filled in). ``exit_code`` is the
    process's exit status, or 128 + signal number if a signal ended it; None
    while the job runs (the API shows 0). ``reason`` is for people:
    "exited with status 3", "stopped by request", "killed by signal 9",
    "out of memory (limit 50 MB)", "could not start: ...",
    "worker restarted while the job was running", "worker shutdown",
    "timed out after 30 s". ``output_bytes`` is the length of its output log (what was
    kept, with the engine's marker lines), ``written_bytes`` what the job wrote (more, once
    an output cap discarded some or the disk refused some). ``owner`` is who created it
    (empty for records from before owners were kept). ``timeout_s`` is the applied time
    limit in seconds (0: none), ``env`` the variables the client added (as requested),
    ``working_dir`` the cwd it asked for
    (empty: the job's scratch dir). ``request_id`` is the idempotency key that created it
    (empty: none) and ``request_time`` when that key was used (None without a key).
    """

    id: str
    command: str
    args: tuple[str, ...]
    limits: Limits
    status: JobStatus
    start_time: dt.datetime
    end_time: dt.datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    usage: Usage = field(default_factory=Usage)
    output_bytes: int = 0
    written_bytes: int = 0
    owner: str = ""
    timeout_s: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    request_id: str = ""
    request_time: dt.datetime | None = None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc3339(moment: dt.datetime | None) -> str:
    """RFC 3339 UTC with a Z, second precision as the spec shows ("2024-01-15T10:30:00Z")."""
    if moment is None:
        return ""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
