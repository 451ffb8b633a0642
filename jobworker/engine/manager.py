"""The job manager: validates and creates jobs, owns the nursery they run in, answers queries.

``open_job_manager`` loads the data directory, sweeps stale cgroups, and runs
the nursery that owns every job. Leaving it (or cancelling it) stops every
running job through the normal stop path (reason "worker shutdown"), persists
the records and leaves no process behind. Records that could not be written
(full or failing disk) are written again every RECORD_RETRY_S and at exit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio

from jobworker import logtext
from jobworker.cgroups.base import DEFAULT_PIDS_MAX, ResourceController
from jobworker.cgroups.null import NullController
from jobworker.engine.idempotency import REQUEST_ID_TTL_S, RequestIds, check_request_id
from jobworker.engine.job import Job
from jobworker.engine.model import JobRecord, JobSpec, JobStatus, Usage, utc_now
from jobworker.engine.output import OutputLog, OutputReader
from jobworker.engine.quotas import RoleCeiling, RunningJobs, RunningLimits, check_ceiling
from jobworker.engine.retention import RETENTION_INTERVAL_S, RetentionPolicy, describe_ids
from jobworker.engine.spec import (
    applied_timeout,
    check_working_dir,
    job_environment,
    job_search_path,
    resolve_command,
    validate_spec,
)
from jobworker.engine.store import JobStore, LoadedJobs
from jobworker.engine.supervision import (
    CLEANUP_TIMEOUT_S,
    SHUTDOWN_REASON,
    STOP_GRACE_S,
    STOPPED_REASON,
    SupervisedJob,
)
from jobworker.errors import (
    CommandNotExecutable,
    DataDiskFull,
    InvalidJobSpec,
    JobIsRunning,
    JobNotFound,
    JobNotRunning,
    JobStartFailed,
    echo,
)
from jobworker.launch.isolation import cgroup_mounts
from jobworker.launch.launcher import Launcher
from jobworker.launch.request import Isolation, LaunchRequest
from jobworker.launch.users import JobUsers, UsersUnusable

__all__ = [
    "DEFAULT_MIN_FREE_DISK_BYTES",
    "MIN_FREE_DISK_FRACTION",
    "JobManager",
    "open_job_manager",
]

log = logging.getLogger("jobworker.engine")

# CreateJob is refused while the data disk has less free space than the larger of these:
# room for the output of the jobs already running and for their final records.
DEFAULT_MIN_FREE_DISK_BYTES = 64 * 1024 * 1024
MIN_FREE_DISK_FRACTION = 0.01
# Records that could not be written are tried again this often (and once more at exit);
# the disk reserve is re-created on the same beat once there is room.
RECORD_RETRY_S = 1.0
FINAL_FLUSH_S = 5.0  # bound on that last try at exit
# Records read per thread hop at start: small enough that a cancellation (SIGTERM during a
# long load) lands at once, large enough that the hops cost little.
LOAD_BATCH = 64


def default_min_free_disk(total_bytes: int) -> int:
    """The free-space floor for a data disk of ``total_bytes`` when none is configured."""
    return max(int(total_bytes * MIN_FREE_DISK_FRACTION), DEFAULT_MIN_FREE_DISK_BYTES)


# At shutdown, how long a job whose processes survive SIGKILL is killed again before the
# manager gives up on it (its record then stays unended and the next start sweeps it).
SURVIVOR_WAIT_S = CLEANUP_TIMEOUT_S
# A delete ends the job's streams at their next message; one still open after this long is
# stuck on a client that does not read, and is cancelled (then waited for at most
# STREAM_CANCEL_WAIT_S: a file read in flight finishes first).
DELETE_STREAM_PATIENCE_S = 1.0
STREAM_CANCEL_WAIT_S = 2.0


class JobManager:
    """Creates, lists, stops and streams jobs. Obtain one from ``open_job_manager``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        store: JobStore,
        controller: ResourceController,
        *,
        stop_grace: float,
        launcher: Launcher,
        isolation: Isolation,
        users: JobUsers,
        hidden: Sequence[Path],
        pids_max: int,
        next_id: int,
        min_free_disk: int,
        retention: RetentionPolicy | None = None,
        max_output_bytes: int | None = None,
        default_timeout: int | None = None,
        max_timeout: int | None = None,
        request_id_ttl: float = REQUEST_ID_TTL_S,
        running_limits: RunningLimits | None = None,
        role_ceilings: Mapping[str, RoleCeiling] | None = None,
    ) -> None:
        self._nursery = nursery
        self._store = store
        self._controller = controller
        self._grace = stop_grace
        self._launcher = launcher
        self._isolation = isolation
        self._users = users
        self._hidden = [str(path) for path in hidden]
        self._cgroup_mounts = cgroup_mounts() if isolation.cgroup and isolation.mount else []
        self._pids_max = pids_max
        self._next_id = next_id
        self._min_free_disk = min_free_disk
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout
        self._retention = retention or RetentionPolicy()
        self._max_output = max_output_bytes
        self._delete_watchers: list[Callable[[JobRecord], None]] = []
        self._env = job_environment()
        self._jobs: dict[str, Job] = {}
        self._requests = RequestIds(request_id_ttl)
        self._running = RunningJobs(running_limits or RunningLimits())
        self._ceilings = dict(role_ceilings or {})
        self._closing = False
        # Jobs this start found recorded as running and marked LOST (their end was never seen).
        self.found_lost: tuple[str, ...] = ()

    def _add_loaded(self, record: JobRecord, output_length: int | None) -> None:
        output = OutputLog(
            self._store.output_path(record.id),
            length=output_length or 0,
            ended=True,
            job_id=record.id,
            missing=output_length is None,
            written=record.written_bytes,
        )
        self._jobs[record.id] = Job(record, output)
        self._requests.bind(record)

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def create(self, spec: JobSpec) -> JobRecord:
        """Start the job of ``spec`` (see ``_start``); or, if its owner sent its
        ``request_id`` in a create within the manager's window (24 h by default, also before
        a restart), return the job that create made, as it is now, and start nothing. A
        create with that key still under way is waited for first (milliseconds: until its
        job runs, or its refusal). Raises InvalidJobSpec for a malformed request id, and
        what ``_start`` raises; a refused create (no job) leaves its key unused. The key is
        bound once the job has an id: a caller cancelled after that has its job found by a
        retry."""
        if not spec.request_id:
            return await self._start(spec)
        check_request_id(spec.request_id)
        claim = self._requests.claim(spec.owner, spec.request_id, self._jobs.__contains__)
        async with claim as job_id:
            if job_id is None:
                return await self._start(spec)
            job = self._jobs[job_id]
        log.info("job %s: returned again, for a repeated request id", job_id)
        await job.spawned.wait()  # at once unless it is being spawned
        return job.record

    async def _start(self, spec: JobSpec) -> JobRecord:
        """Validate ``spec``, then start the job; return once its process runs.

        Raises InvalidJobSpec (CommandNotFound, CommandNotExecutable, LimitRefused, a bad
        env, time limit or working directory, AboveRoleLimit above the ceiling of the
        spec's role) before
        anything is made: no id is used, nothing is written; so do TooManyRunningJobs when
        the running jobs (of the server, or of the spec's owner) reach their limit, and
        DataDiskFull while the
        data disk has less free space than the floor, and when the disk fills up before the
        job's first files are made (what was made is removed; the id is given back unless a
        later create took the next one meanwhile). Raises JobStartFailed if the
        process could not be spawned (the job is then recorded FAILED under its id).
        The returned snapshot is RUNNING, or already terminal if the job ended that fast.
        A caller cancelled (or past its deadline) before the start gets Cancelled, and nothing
        is made. Cancelling the caller does not undo a job once spawned: it belongs to the
        manager.
        """
        if self._closing:
            raise JobStartFailed("the worker is shutting down")
        limits = validate_spec(spec, pids_max=self._pids_max)
        timeout = applied_timeout(
            spec.timeout_seconds, default=self._default_timeout, maximum=self._max_timeout
        )
        ceiling = self._ceilings.get(spec.role)
        if ceiling is not None:
            limits, timeout = check_ceiling(ceiling, spec, limits, timeout)
        # One thread hop for every check that touches the disk: under load a hop costs as
        # much as a process spawn (see docs/benchmarks.md).
        executable, free = await trio.to_thread.run_sync(self._check_paths, spec)
        if free < self._min_free_disk:
            log.warning(
                "create refused: data disk full (%d bytes free, floor %d)",
                free,
                self._min_free_disk,
            )
            raise DataDiskFull()
        # Trio turns a passed deadline into a cancellation only at a schedule point, and the
        # thread hop above is none: a caller whose deadline passed meanwhile would start a
        # job it never hears of (and a retry would start it twice). Take one before the id.
        await trio.lowlevel.checkpoint()
        if self._closing:
            raise JobStartFailed("the worker is shutting down")
        # Counted with no checkpoint before the job joins the count: concurrent creates
        # cannot both take the last place.
        self._running.check(spec.owner)
        # No checkpoint from here to the id increment: the id is ours alone, and a refused
        # limit (raised by create) leaves the counter untouched.
        job_id = str(self._next_id)
        try:
            ids = self._users.allocate()
        except UsersUnusable as exc:
            raise JobStartFailed(str(exc)) from None
        try:
            cgroup = self._controller.create(job_id, limits)
        except BaseException as exc:
            self._users.release(None if ids is None else ids[0])
            if isinstance(exc, OSError):
                log.exception("job %s: cannot create its cgroup", job_id)
                raise JobStartFailed("could not create the job's resource controls") from None
            raise
        self._next_id += 1
        work_dir = str(self._store.work_dir(job_id))
        request = LaunchRequest(
            job_id=job_id,
            argv=[executable, *spec.args],
            # The client's variables last: PATH, HOME and LANG may be overridden too.
            env={**self._env, "HOME": work_dir, **spec.env},
            work_dir=work_dir,
            cwd=spec.working_dir,
            isolation=self._isolation,
            hidden=self._hidden,
            cgroup_mounts=self._cgroup_mounts,
            uid=None if ids is None else ids[0],
            gid=None if ids is None else ids[1],
        )
        now = utc_now()
        record = JobRecord(
            id=job_id,
            command=spec.command,
            args=tuple(spec.args),
            limits=limits,
            status=JobStatus.INITIALIZING,
            start_time=now,
            owner=spec.owner,
            timeout_s=timeout,
            env=dict(spec.env),
            working_dir=spec.working_dir,
            request_id=spec.request_id,
            request_time=now if spec.request_id else None,
        )
        job = SupervisedJob(
            record,
            OutputLog(
                self._store.output_path(job_id),
                job_id=job_id,
                reserve=self._store.reserve,
                cap=self._max_output,
            ),
            store=self._store,
            cgroup=cgroup,
            launcher=self._launcher,
            request=request,
            grace=self._grace,
            on_gone=lambda: self._users.release(request.uid),
        )
        self._jobs[job_id] = job
        self._running.add(job)
        self._requests.bind(record)
        log.info(
            "job %s created: %s (cpu %d%%, memory %d MB, io %d B/s)",
            job_id,
            logtext.words([executable, *spec.args]),
            limits.cpu_percent,
            limits.memory_mb,
            limits.io_bps,
        )
        try:
            await self._nursery.start(job.run)
        except DataDiskFull:
            del self._jobs[job_id]
            self._running.discard(job_id)
            self._requests.forget(record)
            if self._next_id == int(job_id) + 1:
                self._next_id = int(job_id)  # no create took a later id: nothing skips it
            raise
        return job.record

    def _check_paths(self, spec: JobSpec) -> tuple[str, int]:
        """(the command's absolute path, looked up in the job's PATH; free bytes on the data
        disk). Raises InvalidJobSpec for a command that the job's user cannot run, or a
        working directory it cannot use. Blocking: run in a thread."""
        executable = resolve_command(spec.command, job_search_path(spec.env))
        if not self._users.may_execute(executable):
            raise CommandNotExecutable(executable, "permission denied for the job user")
        if spec.working_dir:
            check_working_dir(spec.working_dir, self._hidden)
            if not self._users.may_enter(spec.working_dir):
                raise InvalidJobSpec(
                    f"working directory is not usable by the job user: {echo(spec.working_dir)}"
                )
        free, _ = self._store.free_bytes()
        return executable, free

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
        A job still being spawned (INITIALIZING) is stopped once it runs.
        Cancelling the caller does not cancel the stop, only the wait for it."""
        job = self._job(job_id)
        await job.spawned.wait()  # at once unless the job is being spawned: milliseconds
        if job.status is not JobStatus.RUNNING:
            raise JobNotRunning(job_id, job.status.value)
        job.request_stop(STOPPED_REASON)
        await job.ended.wait()
        return job.record

    @asynccontextmanager
    async def _follow(
        self, job_id: str, offset: int, max_chunk: int, snapshot: bool
    ) -> AsyncIterator[OutputReader]:
        job = self._job(job_id)
        with job.stream_scope() as scope:
            async with job.output.follow(offset, max_chunk, snapshot=snapshot) as reader:
                yield reader
        if scope.cancelled_caught:
            raise JobNotFound(job_id)  # cut off by a delete (Job.end_streams)

    def follow(
        self, job_id: str, offset: int = 0, max_chunk: int = 65536, *, snapshot: bool = False
    ) -> AbstractAsyncContextManager[OutputReader]:
        """The job's output from ``offset``: history, then live data, ending once the job has
        ended and every byte was delivered; with ``snapshot``, ending at the length the output
        had on enter (what is there so far). Raises JobNotFound on enter, OutputLost while
        reading a log that is gone. A delete of the job ends it (see ``delete``): the end if
        every byte had been delivered, else JobNotFound. Leaving the context (or
        cancellation) releases the reader at once."""
        return self._follow(job_id, offset, max_chunk, snapshot)

    async def delete(self, job_id: str) -> JobRecord:
        """Remove an ended job for good: its record, output and work dir; return its last
        record. Raises JobNotFound, or JobIsRunning unless the job has ended (a job whose
        final record is being written is waited for: milliseconds).

        From the first moment the job is unknown (get, stop, follow raise JobNotFound, lists
        leave it out). Its streams end first: each at its next message, the end if it had
        delivered every byte, JobNotFound otherwise; one stuck on a client that does not read
        is cancelled after DELETE_STREAM_PATIENCE_S. Then the files go, off the event loop
        and durably (JobStore.delete), after the id high-water mark is saved: the id is
        never given again, also after a restart. Cancelling the caller does not stop a
        delete once begun. If the disk refuses the mark or the rename (OSError, re-raised),
        the job is back as it was, its files untouched."""
        record = await self._delete(job_id)
        log.info("job %s deleted", job_id)
        return record

    def watch_deletes(self, callback: Callable[[JobRecord], None]) -> None:
        """Call ``callback`` with the last record of each job deleted from now on (by
        ``delete`` or by retention), once its files are gone."""
        self._delete_watchers.append(callback)

    async def _delete(self, job_id: str) -> JobRecord:
        """``delete``, without its log line (retention logs one line per sweep)."""
        job = self._job(job_id)
        if job.status.is_terminal and not job.ended.is_set():
            await job.ended.wait()  # its final record is being written: milliseconds
            job = self._job(job_id)  # a concurrent delete may have taken it meanwhile
        if not (job.status.is_terminal and job.ended.is_set()):
            raise JobIsRunning(job_id)
        # No checkpoint since the lookup: one delete wins, the others get JobNotFound.
        del self._jobs[job_id]
        self._requests.forget(job.record)  # its request id may start a new job from now on
        with trio.CancelScope(shield=True):  # the job is gone from the table: finish the job
            await job.end_streams(DELETE_STREAM_PATIENCE_S, STREAM_CANCEL_WAIT_S)
            try:
                await trio.to_thread.run_sync(self._store.delete, job_id, self._next_id)
            except OSError as exc:
                log.warning("job %s: cannot delete it: %s", job_id, exc.strerror or exc)
                job.output.removed = False
                self._jobs[job_id] = job
                self._requests.bind(job.record)
                raise
        for watcher in self._delete_watchers:
            watcher(job.record)
        return job.record

    def output_size(self, job_id: str) -> int:
        """Bytes of output the job has written so far. Raises JobNotFound."""
        return self._job(job_id).output.length

    async def _keep_records(self) -> None:
        """Write again, every RECORD_RETRY_S, the records a full or failing disk refused;
        re-create the disk reserve once there is room. Runs until cancelled. A failing disk
        (any OSError: EIO from statvfs or lstat) does not end it: each kind of failure is
        logged once, not at every beat, and the work is tried again at the next."""
        failure = ""  # the failure last logged
        while True:
            await trio.sleep(RECORD_RETRY_S)
            try:
                await self._flush_records()
            except OSError as exc:
                if str(exc) != failure:
                    failure = str(exc)
                    log.warning(
                        "data disk: %s; records and the reserve are tried again every %g s",
                        failure,
                        RECORD_RETRY_S,
                    )
            else:
                if failure:
                    log.info("data disk: usable again")
                    failure = ""

    async def _flush_records(self) -> None:
        if self._store.unsaved:
            await trio.to_thread.run_sync(self._store.retry_unsaved)
        free, _ = await trio.to_thread.run_sync(self._store.free_bytes)
        if free >= self._min_free_disk:
            await trio.to_thread.run_sync(self._store.reserve.ensure)

    async def _retain(self, interval: float) -> None:
        """Apply the retention policy at once, then every ``interval`` seconds, until
        cancelled: delete (through the delete path: their streams end first) the finished
        jobs it no longer keeps, with one log line per sweep that deleted any. A job whose
        deletion fails (the disk refuses it) is logged and tried again at the next sweep;
        nothing here ends the manager."""
        while True:
            try:
                await self._sweep()
            except Exception:
                # Retention is housekeeping: a bug in it must not take the jobs down.
                log.exception("retention: the sweep failed; it runs again in %g s", interval)
            await trio.sleep(interval)

    async def _sweep(self) -> None:
        finished = [
            job.record
            for job in self._jobs.values()
            if job.status.is_terminal and job.ended.is_set()
        ]
        finished.sort(key=lambda record: int(record.id))
        deleted: list[str] = []
        for record in self._retention.due(finished, utc_now()):
            if self._closing:
                break  # shutting down: the records just written STOPPED stay for the next start
            try:
                await self._delete(record.id)
            except (JobNotFound, JobIsRunning):
                continue  # deleted by a client meanwhile
            except OSError:
                continue  # logged by _delete; the next sweep tries again
            deleted.append(record.id)
        if deleted:
            log.info(
                "retention: deleted %d finished jobs (%s; %s)",
                len(deleted),
                describe_ids(deleted),
                self._retention.describe(),
            )

    def usage(self, job_id: str) -> Usage | None:
        """A RUNNING job's resource usage, read from its cgroup now (None when the job is not
        running, has no cgroup, or its cgroup just went away). Raises JobNotFound."""
        return self._job(job_id).usage()

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
    launcher: Launcher | None = None,
    isolation: Isolation | None = None,
    users: JobUsers | None = None,
    hidden: Sequence[Path] = (),
    pids_max: int = DEFAULT_PIDS_MAX,
    min_free_disk: int | None = None,
    default_timeout: int | None = None,
    max_timeout: int | None = None,
    retention: RetentionPolicy | None = None,
    retention_interval: float = RETENTION_INTERVAL_S,
    max_output_bytes: int | None = None,
    request_id_ttl: float = REQUEST_ID_TTL_S,
    running_limits: RunningLimits | None = None,
    role_ceilings: Mapping[str, RoleCeiling] | None = None,
) -> AsyncIterator[JobManager]:
    """Load the records of ``data_dir`` (INITIALIZING/RUNNING ones become LOST), sweep stale
    cgroups, and run the nursery that owns every job. ``controller`` None means no cgroups
    (NullController); ``launcher`` None means one of the manager's own (run in its nursery);
    ``isolation`` None means none (jobs share the host's namespaces); ``users`` None means
    jobs run as the server's user; ``hidden`` are the paths a job with its own mount
    namespace must not see (the data dir always is one); ``min_free_disk`` None means
    ``default_min_free_disk`` of the data disk; ``default_timeout`` is the time limit (in
    seconds) of a job that asks for none, ``max_timeout`` the most a job may ask for (None:
    no default, no maximum); ``request_id_ttl`` how long (seconds, wall clock) a create's
    request id returns its job; ``running_limits`` how many jobs may run at once (None: no
    limit), ``role_ceilings`` the most a job of each role may ask for (a role not in it: no
    ceiling); ``retention`` which finished jobs are deleted (None: none), checked at start
    and every ``retention_interval`` seconds; ``max_output_bytes`` caps each job's kept
    output (None: no cap). Raises DataDirUnusable if ``jobs/`` is not a
    usable directory, or if ``next-id`` (the id high-water mark) is unreadable. The load is
    cancellable: it checks for cancellation between batches.

    On exit or cancellation every running job is stopped through the normal stop path
    (status STOPPED, reason "worker shutdown") and persisted; no process is left behind;
    records still unsaved are tried once more.
    """
    if controller is None:
        controller = NullController()
    # Absolute: the data dir's paths reach jobs (their HOME) and the launcher (the work dir
    # to bind, the data dir to hide).
    data_dir = await trio.to_thread.run_sync(data_dir.resolve)
    store = JobStore(data_dir)
    loaded = await _load(store)
    free, total = await trio.to_thread.run_sync(store.free_bytes)
    floor = default_min_free_disk(total) if min_free_disk is None else min_free_disk
    try:
        if free >= floor and not await trio.to_thread.run_sync(store.reserve.ensure):
            log.warning("no room for the data disk reserve in %s", data_dir)
    except OSError as exc:  # made later, once the disk lets us (_keep_records)
        log.warning("data disk: cannot make the reserve: %s", exc)
    swept = await controller.sweep()
    if swept:
        log.warning("removed cgroups left by a previous worker: jobs %s", ", ".join(swept))
    log.info(
        "job manager: %d jobs loaded, next id %d; %s",
        len(loaded.records),
        loaded.highest_id + 1,
        controller.description,
    )
    async with trio.open_nursery() as keeper:
        own_launcher = launcher is None
        if launcher is None:
            launcher = Launcher()
            await keeper.start(launcher.run)
        try:
            async with trio.open_nursery() as nursery:
                manager = JobManager(
                    nursery,
                    store,
                    controller,
                    stop_grace=stop_grace,
                    launcher=launcher,
                    isolation=isolation or Isolation(),
                    users=users or JobUsers(fixed=None, uid_range=None),
                    hidden=[data_dir, *hidden],
                    pids_max=pids_max,
                    next_id=loaded.highest_id + 1,
                    min_free_disk=floor,
                    retention=retention,
                    max_output_bytes=max_output_bytes,
                    default_timeout=default_timeout,
                    max_timeout=max_timeout,
                    request_id_ttl=request_id_ttl,
                    running_limits=running_limits,
                    role_ceilings=role_ceilings,
                )
                for record in loaded.records:
                    manager._add_loaded(record, loaded.output_lengths[record.id])
                manager.found_lost = tuple(loaded.found_lost)
                keeper.start_soon(manager._keep_records)
                if retention is not None and retention.enabled:
                    log.info("retention: deleting finished jobs %s", retention.describe())
                    keeper.start_soon(manager._retain, retention_interval)
                try:
                    yield manager
                finally:
                    manager._shutdown()
                    # Every job's cleanup is shielded and bounded on its own: the deadline only
                    # cuts the re-killing of processes that survived SIGKILL (left for the next
                    # start).
                    nursery.cancel_scope.deadline = trio.current_time() + SURVIVOR_WAIT_S
        finally:
            if own_launcher:
                launcher.close()  # every job has ended: nothing needs it any more
        keeper.cancel_scope.cancel()
        with trio.move_on_after(FINAL_FLUSH_S, shield=True):
            if await trio.to_thread.run_sync(store.retry_unsaved):
                log.error("records still unsaved at exit: jobs %s", ", ".join(store.unsaved))


async def _load(store: JobStore) -> LoadedJobs:
    """Every record of the store, read in batches (a checkpoint between each)."""
    log.info("loading job records from %s", store.jobs_dir)
    names, highest = await trio.to_thread.run_sync(store.scan)
    # Deleted jobs took their directories with them: the saved mark still counts their ids.
    highest = max(highest, await trio.to_thread.run_sync(store.read_next_id) - 1)
    records: list[JobRecord] = []
    lengths: dict[str, int | None] = {}
    found_lost: list[str] = []
    for start in range(0, len(names), LOAD_BATCH):
        batch = await trio.to_thread.run_sync(store.load_some, names[start : start + LOAD_BATCH])
        records += batch.records
        lengths.update(batch.output_lengths)
        found_lost += batch.found_lost
    return LoadedJobs(records, lengths, highest, found_lost)
