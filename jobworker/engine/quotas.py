"""Quotas on creating jobs: how many may run at once, and the most one job may ask for.

Both are checked by ``JobManager`` before a job gets an id, so a refused create leaves
nothing behind: no id, no file, no process.

- ``RunningLimits``: the running jobs (INITIALIZING or RUNNING) of the whole server, and of
  one owner (the CN of the certificate that created them). ``RunningJobs`` counts them; its
  check and the manager's reservation of the new job happen with no checkpoint between
  them, so concurrent creates cannot overshoot a limit.
- ``RoleCeiling``: the most a job created by one role may ask for (CPU, memory, IO, time
  limit), compared once the defaults are filled in: a job that asks for nothing gets the
  defaults, and those count; where the default is "no limit" (IO, time) the job gets the
  ceiling as its limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jobworker.engine.job import Job
from jobworker.engine.model import JobSpec, Limits
from jobworker.errors import AboveRoleLimit, TooManyRunningJobs

__all__ = ["RoleCeiling", "RunningJobs", "RunningLimits", "check_ceiling"]


@dataclass(frozen=True)
class RunningLimits:
    """The most jobs that may run at once: in all (``total``) and per owner; None: no limit."""

    total: int | None = None
    per_owner: int | None = None


class RunningJobs:
    """The jobs that have not ended, as far as the limits need them counted."""

    def __init__(self, limits: RunningLimits) -> None:
        self._limits = limits
        self._jobs: dict[str, Job] = {}  # id -> job, pruned of ended jobs at each check

    def check(self, owner: str) -> None:
        """Raise TooManyRunningJobs if one more job of ``owner`` would exceed a limit (the
        server's first). Costs one pass over the jobs not yet ended; none without limits."""
        self._jobs = {key: job for key, job in self._jobs.items() if not job.status.is_terminal}
        total, per_owner = self._limits.total, self._limits.per_owner
        if total is not None and len(self._jobs) >= total:
            raise TooManyRunningJobs(len(self._jobs), total)
        if per_owner is not None:
            mine = sum(1 for job in self._jobs.values() if job.record.owner == owner)
            if mine >= per_owner:
                raise TooManyRunningJobs(mine, per_owner, owner)

    def add(self, job: Job) -> None:
        """Count ``job`` from now on (it leaves the count once its status is terminal)."""
        self._jobs[job.id] = job

    def discard(self, job_id: str) -> None:
        """Stop counting a job that was never started."""
        self._jobs.pop(job_id, None)


@dataclass(frozen=True)
class RoleCeiling:
    """The most a job created by ``role`` may ask for; None: no ceiling on that one.
    ``cpu_percent`` in percent of one core, ``memory_mb`` in MB, ``io_bps`` in bytes per
    second, ``timeout_s`` in seconds."""

    role: str
    cpu_percent: int | None = None
    memory_mb: int | None = None
    io_bps: int | None = None
    timeout_s: int | None = None


def check_ceiling(
    ceiling: RoleCeiling, spec: JobSpec, limits: Limits, timeout_s: int
) -> tuple[Limits, int]:
    """Raise AboveRoleLimit if the applied ``limits`` or time limit ``timeout_s`` of a job
    asked for by ``spec`` exceed ``ceiling``; return the limits and time limit the job runs
    under. Where the applied value is "none" (IO 0, time limit 0) the ceiling becomes the
    job's limit: a ceiling that a client could escape by asking for no limit would be none."""
    checks = (
        ("maxCPU", limits.cpu_percent, spec.max_cpu, ceiling.cpu_percent, "%"),
        ("maxMemory", limits.memory_mb, spec.max_memory, ceiling.memory_mb, "MB"),
        ("maxIOBPS", limits.io_bps, spec.max_iobps, ceiling.io_bps, "B/s"),
        ("timeoutSeconds", timeout_s, spec.timeout_seconds, ceiling.timeout_s, "s"),
    )
    for field, value, requested, limit, unit in checks:
        if limit is not None and value > limit:
            raise AboveRoleLimit(field, value, limit, unit, ceiling.role, default=not requested)
    if ceiling.io_bps is not None and not limits.io_bps:
        limits = replace(limits, io_bps=ceiling.io_bps)
    if ceiling.timeout_s is not None and not timeout_s:
        timeout_s = ceiling.timeout_s
    return limits, timeout_s
