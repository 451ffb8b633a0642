"""The job manager: validates and creates jobs, owns the nursery they run in, answers queries.

``open_job_manager`` loads the data directory, sweeps stale cgroups, and runs
the nursery that owns every job. Leaving it (or cancelling it) stops every
running job through the normal stop path (reason "worker shutdown"), persists
the records and leaves no process behind.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio

from jobworker.cgroups.base import DEFAULT_PIDS_MAX, ResourceController
from jobworker.cgroups.null import NullController
from jobworker.engine.job import SHUTDOWN_REASON, STOP_GRACE_S, STOPPED_REASON, Job
from jobworker.engine.model import JobRecord, JobSpec, JobStatus, Usage, utc_now
from jobworker.engine.output import OutputLog, OutputReader
from jobworker.engine.reaping import Reaper
from jobworker.engine.spec import job_environment, resolve_command, validate_spec
from jobworker.engine.store import JobStore
from jobworker.errors import JobNotFound, JobNotRunning, JobStartFailed

__all__ = ["JobManager", "open_job_manager"]

log = logging.getLogger("jobworker.engine")


class JobManager:
    """Creates, lists, stops and streams jobs. Obtain one from ``open_job_manager``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        store: JobStore,
        controller: ResourceController,
        *,
        stop_grace: float,
        reaper: Reaper | None,
        pids_max: int,
        next_id: int,
    ) -> None:
        self._nursery = nursery
        self._store = store
        self._controller = controller
        self._grace = stop_grace
        self._reaper = reaper
        self._pids_max = pids_max
        self._next_id = next_id
        self._env = job_environment()
        self._jobs: dict[str, Job] = {}
        self._closing = False

    def _add_loaded(self, record: JobRecord, output_length: int) -> None:
        output = OutputLog(self._store.output_path(record.id), length=output_length, ended=True)
        self._jobs[record.id] = Job(record, output, store=self._store)

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def create(self, spec: JobSpec) -> JobRecord:
        """Validate ``spec``, then start the job; return once its process runs.

        Raises InvalidJobSpec (CommandNotFound, CommandNotExecutable, LimitRefused) before
        anything is made: no id is used, nothing is written. Raises JobStartFailed if the
        process could not be spawned (the job is then recorded FAILED under its id).
        The returned snapshot is RUNNING, or already terminal if the job ended that fast.
        Cancelling the caller does not undo a job once spawned: it belongs to the manager.
        """
        if self._closing:
            raise JobStartFailed("the worker is shutting down")
        limits = validate_spec(spec, pids_max=self._pids_max)
        executable = await trio.to_thread.run_sync(resolve_command, spec.command)
        if self._closing:
            raise JobStartFailed("the worker is shutting down")
        # No checkpoint from here to the id increment: the id is ours alone, and a refused
        # limit (raised by create) leaves the counter untouched.
        job_id = str(self._next_id)
        try:
            cgroup = self._controller.create(job_id, limits)
        except OSError:
            log.exception("job %s: cannot create its cgroup", job_id)
            raise JobStartFailed("could not create the job's resource controls") from None
        self._next_id += 1
        record = JobRecord(
            id=job_id,
            command=spec.command,
            args=tuple(spec.args),
            limits=limits,
            status=JobStatus.INITIALIZING,
            start_time=utc_now(),
        )
        job = Job(
            record,
            OutputLog(self._store.output_path(job_id)),
            store=self._store,
            cgroup=cgroup,
            argv=[executable, *spec.args],
            env=self._env,
            grace=self._grace,
            reaper=self._reaper,
        )
        self._jobs[job_id] = job
        log.info(
            "job %s created: %s %s (cpu %d%%, memory %d MB, io %d B/s)",
            job_id,
            executable,
            " ".join(spec.args)[:200],
            limits.cpu_percent,
            limits.memory_mb,
            limits.io_bps,
        )
        await self._nursery.start(job.run)
        return job.record

    def get(self, job_id: str) -> JobRecord:
        """The job's current snapshot. Raises JobNotFound."""
        return self._job(job_id).record

    def list(self) -> list[JobRecord]:
        """Every job, in id order."""
        return [self._jobs[key].record for key in sorted(self._jobs, key=int)]

    async def stop(self, job_id: str) -> JobRecord:
        """Stop a RUNNING job: SIGTERM, grace period, SIGKILL, reap, record STOPPED, persist;
        return the final record. Concurrent stops of one job all wait for the same end and
        return the same record. Raises JobNotFound, or JobNotRunning once it has ended.
        Cancelling the caller does not cancel the stop, only the wait for it."""
        job = self._job(job_id)
        if job.status is not JobStatus.RUNNING:
            raise JobNotRunning(job_id, job.status.value)
        job.request_stop(STOPPED_REASON)
        await job.ended.wait()
        return job.record

    @asynccontextmanager
    async def _follow(
        self, job_id: str, offset: int, max_chunk: int
    ) -> AsyncIterator[OutputReader]:
        output = self._job(job_id).output
        async with output.follow(offset, max_chunk) as reader:
            yield reader

    def follow(
        self, job_id: str, offset: int = 0, max_chunk: int = 65536
    ) -> AbstractAsyncContextManager[OutputReader]:
        """The job's output from ``offset``: history, then live data, ending once the job has
        ended and every byte was delivered. Raises JobNotFound on enter. Leaving the context
        (or cancellation) releases the reader at once."""
        return self._follow(job_id, offset, max_chunk)

    def output_size(self, job_id: str) -> int:
        """Bytes of output the job has written so far. Raises JobNotFound."""
        return self._job(job_id).output.length

    def usage(self, job_id: str) -> Usage | None:
        """A RUNNING job's resource usage, read from its cgroup now (None when the job is not
        running, has no cgroup, or its cgroup just went away). Raises JobNotFound."""
        job = self._job(job_id)
        cgroup = job._cgroup
        if job.status is not JobStatus.RUNNING or cgroup is None:
            return None
        try:
            return cgroup.usage()
        except OSError:  # the job ended meanwhile and its cgroup was removed
            return None

    def _shutdown(self) -> None:
        self._closing = True
        for job in self._jobs.values():
            if not job.ended.is_set():
                job.request_stop(SHUTDOWN_REASON)


@asynccontextmanager
async def open_job_manager(
    data_dir: Path,
    *,
    controller: ResourceController | None = None,
    stop_grace: float = STOP_GRACE_S,
    reaper: Reaper | None = None,
    pids_max: int = DEFAULT_PIDS_MAX,
) -> AsyncIterator[JobManager]:
    """Load the records of ``data_dir`` (INITIALIZING/RUNNING ones become LOST), sweep stale
    cgroups, and run the nursery that owns every job. ``controller`` None means no cgroups
    (NullController); ``reaper`` None means no orphan reaper.

    On exit or cancellation every running job is stopped through the normal stop path
    (status STOPPED, reason "worker shutdown") and persisted; no process is left behind.
    """
    if controller is None:
        controller = NullController()
    store = JobStore(data_dir)
    loaded = await trio.to_thread.run_sync(store.load)
    swept = await controller.sweep()
    if swept:
        log.warning("removed cgroups left by a previous worker: jobs %s", ", ".join(swept))
    log.info(
        "job manager: %d jobs loaded, next id %d; %s",
        len(loaded.records),
        loaded.highest_id + 1,
        controller.description,
    )
    async with trio.open_nursery() as nursery:
        manager = JobManager(
            nursery,
            store,
            controller,
            stop_grace=stop_grace,
            reaper=reaper,
            pids_max=pids_max,
            next_id=loaded.highest_id + 1,
        )
        for record in loaded.records:
            manager._add_loaded(record, loaded.output_lengths[record.id])
        try:
            yield manager
        finally:
            manager._shutdown()
