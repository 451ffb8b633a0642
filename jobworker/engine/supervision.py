"""A job being run: launch, supervise (process wait, output pump, OOM watch), stop, record.

A job runs as one task in the manager's nursery, started with
``nursery.start(job.run)``: ``started()`` fires once the launcher reports the command
running (placed in its cgroups, isolated, de-privileged), so start failures reach the
caller. Inside, one nursery holds the output pump
and the supervision (the main process's wait, the OOM watcher and, for a job with a time
limit, its timer). A stop (or OOM, a timeout, or the manager's cancellation) cancels the
supervision scope; the
cleanup that follows always runs, shielded and time-limited: kill through
the cgroup (SIGTERM, grace, IO throttle lifted, SIGKILL) until it is empty,
reap, drain the pipe, read usage, remove the cgroup, record the end and
persist it. A job is recorded ended only once nothing of it is left: processes
that survive the bounded kill are killed again until they are gone (or the
manager gives up at shutdown, leaving the record unended for the next start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import NoReturn

import trio

from jobworker.cgroups.base import JobCgroup
from jobworker.engine.disk import is_disk_full
from jobworker.engine.job import Job
from jobworker.engine.model import JobRecord, JobStatus, Usage, utc_now
from jobworker.engine.output import OutputLog
from jobworker.engine.store import JobStore
from jobworker.errors import DataDiskFull, JobStartFailed
from jobworker.launch.launcher import LaunchedProcess, Launcher, LauncherGone, LaunchFailed
from jobworker.launch.request import LaunchRequest
from jobworker.launch.sandbox import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED

__all__ = [
    "LAUNCHER_DIED_REASON",
    "SHUTDOWN_REASON",
    "STOPPED_REASON",
    "STOP_GRACE_S",
    "TIMED_OUT_PREFIX",
    "SupervisedJob",
    "timed_out_reason",
]

log = logging.getLogger("jobworker.engine")

STOP_GRACE_S = 0.1  # the API promises SIGKILL after 100 ms
STOPPED_REASON = "stopped by request"
SHUTDOWN_REASON = "worker shutdown"
LAUNCHER_DIED_REASON = "the launcher died while the job ran; the job was killed"
TIMED_OUT_PREFIX = "timed out after "
# The output pipe is enlarged to PIPE_BYTES (default capacity: 64 KiB) and read up to that
# much at a time: a job writing fast is copied in 1 MiB appends (one thread hop each, the
# pump's main cost) instead of 64 KiB ones; a job writing slowly still has each write
# forwarded at once. 1 MiB is the kernel's default fs.pipe-max-size.
PIPE_BYTES = 1024 * 1024
PUMP_READ_BYTES = PIPE_BYTES
# Once every process of the job is dead the pipe holds at most its capacity: draining it
# takes milliseconds. A writer still holding it after this long escaped the kill (only
# possible without cgroups, by leaving the process group): we stop listening to it.
PUMP_DRAIN_S = 0.5
# Reaping the main process after the kill: SIGKILL has been sent, death is a matter of
# milliseconds. Past this we SIGKILL the pid directly (a driver that missed it).
REAP_WAIT_S = 2.0
# Upper bound on each shielded cleanup phase, so a stuck kernel call cannot hang shutdown.
CLEANUP_TIMEOUT_S = 10.0
PERSIST_FALLBACK_S = 2.0  # saving the record when cleanup itself timed out
# A job is recorded ended only once nothing of it is left. Processes that survive the kill
# (stuck in the kernel) are killed again this often until they are gone.
KILL_RETRY_S = 1.0
SURVIVORS_REASON = "processes survive SIGKILL: retrying the kill"
UNENDED_REASON = "processes survived SIGKILL: the next start kills them"
OOM_EXIT_CODE = 137  # the kernel's OOM killer sends SIGKILL: 128 + 9


def timed_out_reason(seconds: int) -> str:
    """The reason of a job stopped at its time limit: ``timed out after 30 s``."""
    return f"{TIMED_OUT_PREFIX}{seconds} s"


class SupervisedJob(Job):
    """A job this worker runs: its record and output log, and its process, cgroup and pump."""

    def __init__(
        self,
        record: JobRecord,
        output: OutputLog,
        *,
        store: JobStore,
        cgroup: JobCgroup,
        launcher: Launcher,
        request: LaunchRequest,
        grace: float = STOP_GRACE_S,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(record, output)
        self._store = store
        self._cgroup = cgroup
        self._launcher = launcher
        self._request = request
        self._grace = grace
        self._on_gone = on_gone  # called once no process of the job is left (its uid is free)
        self._lost = False  # the launcher died: the job's exit was never seen
        self._life = trio.CancelScope()  # cancelled by stop, OOM
        self._pump_scope = trio.CancelScope(shield=True)  # ends at EOF, or when we give up
        self._pump_done = trio.Event()
        self._stop_reason: str | None = None
        self._timed_out = False  # the time limit's stop came first: FAILED, not STOPPED
        self._deadline = float("inf")  # trio time at which the time limit stops the job
        self._oom = False
        self._exited_by_itself = False
        self._emptied = False  # True once no process of the job is left
        self._output_seen = ""  # what the record's reason says of the output (loss, cap)

    def request_stop(self, reason: str) -> None:
        """Ask the job to end (first reason wins); its task does the killing and recording."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._life.cancel()

    def usage(self) -> Usage | None:
        """Usage read from the job's cgroup now, while it runs (None once its cgroup went)."""
        if self.status is not JobStatus.RUNNING:
            return None
        try:
            return self._cgroup.usage()
        except OSError:  # the job ended meanwhile and its cgroup was removed
            return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spawn the job, report it started, supervise it until it ends, record the end.

        Raises JobStartFailed before ``started()`` if the process cannot be spawned (the job
        is then recorded FAILED), DataDiskFull if the disk had no room for the job's first
        files (nothing of the job is left: no record, no directory). On cancellation the job
        is stopped like a stop request (reason "worker shutdown"), its processes killed and
        its record persisted.
        """
        with trio.CancelScope(shield=True):  # bounded work that must not be half-done
            process = await self._spawn()
        if self._record.timeout_s:  # counted from the moment the command runs
            self._deadline = trio.current_time() + self._record.timeout_s
        self._record = replace(self._record, status=JobStatus.RUNNING)
        self.spawned.set()
        log.info("job %s started: pid %d", self.id, process.pid)
        task_status.started()
        # Up to 2 MiB of args: the record keeps its own copy.
        self._request = replace(self._request, argv=[], env={})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, process)
                try:
                    # The RUNNING record is not fsynced (two fsyncs, ~24 % of a CreateJob
                    # loop's server time): if the worker crashes, the page cache still holds
                    # it (or the INITIALIZING one before it) and the restart marks the job
                    # LOST; on a power loss its processes are gone too. The final record, the
                    # one a StopJob returns, stays durable (_finalize).
                    await self._persist(durable=False)
                    await self._supervise(process)
                finally:
                    # The grace period is the operator's (--stop-grace): on top of the bound.
                    with trio.move_on_after(self._grace + CLEANUP_TIMEOUT_S, shield=True):
                        await self._end_processes(process)
                    # Cut short, _end_processes may not have released the (shielded) pump:
                    # the nursery would wait for it forever.
                    self._pump_scope.cancel()
            if not self._emptied:
                await self._outlast_survivors(process)
        except Exception:
            # A job is an isolation boundary: a bug or a driver failure in one job must not
            # take the manager (and every other job) down. Its end is still recorded.
            log.exception("job %s: internal error while supervising it", self.id)
        finally:
            with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                await self._finalize(process)
            if not self.ended.is_set():
                # _finalize timed out (a stuck kernel call): stop waiters and stream readers
                # must not wait forever. The record says what happened.
                log.error("job %s: cleanup did not finish in %.0f s", self.id, CLEANUP_TIMEOUT_S)
                if self._emptied and not self._record.status.is_terminal:
                    self._record = replace(
                        self._record,
                        status=JobStatus.FAILED,
                        end_time=utc_now(),
                        reason="internal error: cleanup did not finish",
                    )
                self.output.finish()
                with trio.move_on_after(PERSIST_FALLBACK_S, shield=True):
                    await self._persist()
                self.ended.set()

    async def _spawn(self) -> LaunchedProcess:
        try:
            await trio.to_thread.run_sync(self._prepare_files)
        except DataDiskFull:
            await self._undo_start()
            raise
        except OSError as exc:
            await self._fail_start(exc)
        request = replace(
            self._request, procs_files=[str(path) for path in self._cgroup.procs_files()]
        )
        try:
            process = await self._launcher.spawn(request)
        except OSError as exc:
            await self._fail_start(exc)
        self._cgroup.attach(process.pid)
        self.pid = process.pid
        return process

    def _prepare_files(self) -> None:
        """Make the job's directory, its INITIALIZING record and its output log. Raises
        DataDiskFull if the disk is full (what was made is removed again), else OSError."""
        # The INITIALIZING record exists before the process does: if the worker dies from
        # here on, the restarted worker shows this job as LOST instead of forgetting it.
        uid, gid = self._request.uid, self._request.gid
        try:
            self._store.prepare(self.id, owner=None if uid is None or gid is None else (uid, gid))
            self._store.save(self._record, durable=False)
            self.output.open_append()
        except OSError as exc:
            # Full since the manager's check: refused like a create on a full disk, unless
            # what was made cannot be removed (then it is a failed start, under its id).
            if is_disk_full(exc) and self._store.discard(self.id):
                raise DataDiskFull() from None
            raise

    async def _undo_start(self) -> None:
        """The job's files could not be made and nothing of it is on disk: remove its cgroup,
        free its uid, end it unrecorded (the manager forgets it)."""
        log.warning("job %s could not start: data disk full; nothing of it is kept", self.id)
        await self._cgroup.remove()
        self._record = replace(
            self._record,
            status=JobStatus.FAILED,
            end_time=utc_now(),
            reason=f"could not start: {DataDiskFull()}",
        )
        self.output.finish()
        self._gone()
        self.ended.set()
        self.spawned.set()  # a stop waiting for the spawn sees it FAILED

    async def _fail_start(self, exc: OSError) -> NoReturn:
        """Record the job FAILED ("could not start: ..."), clean up, raise JobStartFailed."""
        why = exc.strerror or str(exc)
        log.warning("job %s could not start: %s", self.id, why)
        emptied = True
        if isinstance(exc, LauncherGone):
            # The launcher died (or gave up) mid-spawn: its child may run all the same.
            try:
                emptied = await self._cgroup.kill(0)
            except Exception:
                log.exception("job %s: cannot kill what its failed start left", self.id)
                emptied = False
        await self._cgroup.remove()
        if isinstance(exc, LaunchFailed | LauncherGone) and getattr(exc, "stage", "") != "exec":
            exit_code = EXIT_SETUP_FAILED
        else:
            exit_code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        self._record = replace(
            self._record,
            status=JobStatus.FAILED,
            end_time=utc_now(),
            exit_code=exit_code,
            reason=f"could not start: {why}",
        )
        self.output.finish()
        if emptied:  # else its uid stays taken: something may still run as it
            self._gone()
        await self._persist()
        self.ended.set()
        self.spawned.set()
        raise JobStartFailed(f"job {self.id} could not start: {why}") from None

    async def _supervise(self, process: LaunchedProcess) -> None:
        with self._life:
            async with trio.open_nursery() as watchers:
                watchers.start_soon(self._watch_oom)
                if self._record.timeout_s:
                    watchers.start_soon(self._watch_time)
                await process.wait()
                watchers.cancel_scope.cancel()

    async def _watch_time(self) -> None:
        """At the job's time limit, stop it through the stop path (SIGTERM, grace, SIGKILL);
        it is recorded FAILED, ``timed out after N s``, unless another stop came first."""
        await trio.sleep_until(self._deadline)
        reason = timed_out_reason(self._record.timeout_s)
        if self._stop_reason is None:
            self._timed_out = True
            log.info("job %s: %s, stopping it", self.id, reason)
        self.request_stop(reason)

    async def _watch_oom(self) -> None:
        try:
            await self._cgroup.wait_oom()
        except Exception:
            log.exception("job %s: OOM watch failed; the end-of-job counter still applies", self.id)
            return
        self._oom = True
        log.warning("job %s: out of memory, ending it", self.id)
        self._life.cancel()

    async def _pump(self, process: LaunchedProcess) -> None:
        """Copy the job's pipe into its output log until EOF. Shielded from the job's and the
        manager's cancellation: it ends at EOF, or when cleanup cancels ``_pump_scope``."""
        stream = process.stdout
        assert stream is not None
        try:
            with self._pump_scope:
                if isinstance(stream, trio.lowlevel.FdStream):
                    _enlarge_pipe(stream.fileno())
                while data := await stream.receive_some(PUMP_READ_BYTES):
                    await self.output.append(bytes(data))
                    summary = self.output.summary
                    if summary != self._output_seen:
                        # A loss or the cap shows in the job's reason while it runs, not only
                        # at its end.
                        self._output_seen = summary
                        self._record = replace(self._record, reason=summary)
        finally:
            self._pump_done.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _end_processes(self, process: LaunchedProcess) -> None:
        """Kill whatever is left of the job, reap its main process, drain the pipe."""
        exited_by_itself = self._exited_by_itself = process.returncode is not None
        self._lost = process.lost
        if self._lost:
            log.error("job %s: %s", self.id, LAUNCHER_DIED_REASON)
        elif self._stop_reason is None and not self._oom and not exited_by_itself:
            self._stop_reason = SHUTDOWN_REASON  # cancelled from outside: the manager is closing
        # A stop gets the grace period; leftovers of a job that ended, or an OOM'd job, do not.
        graceful = (
            self._stop_reason is not None
            and not self._oom
            and not exited_by_itself
            and not self._lost
        )
        empty = await self._kill(process, self._grace if graceful else 0)
        while not empty:  # bounded by the caller's cleanup scope
            await trio.sleep(KILL_RETRY_S)
            empty = await self._kill(process, 0)
        self._emptied = True
        await self._reap(process)
        with trio.move_on_after(PUMP_DRAIN_S):
            await self._pump_done.wait()
        if not self._pump_done.is_set():
            log.warning("job %s: a process outside the job still holds its output open", self.id)
            self._pump_scope.cancel()

    async def _kill(self, process: LaunchedProcess, grace: float) -> bool:
        """Kill through the driver; True once nothing of the job is left. A failing driver is
        replaced by a SIGKILL to the job's process group (then assumed to have worked)."""
        try:
            return await self._cgroup.kill(grace)
        except Exception:
            log.exception(
                "job %s: the driver could not kill it; killing its process group", self.id
            )
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            return True

    async def _outlast_survivors(self, process: LaunchedProcess) -> None:
        """Kill again, every KILL_RETRY_S, until nothing of the job is left; then reap.

        Not shielded: cancelled (the manager closing, or its owner), the job is left unended
        (see _finalize) and the next start's sweep kills what survived.
        """
        log.error("job %s: processes survive SIGKILL; killing them again until gone", self.id)
        self._record = replace(self._record, reason=SURVIVORS_REASON)
        await self._persist()
        # Polled: the kernel offers no event for a process leaving uninterruptible sleep.
        while not await self._kill(process, 0):  # noqa: ASYNC110
            await trio.sleep(KILL_RETRY_S)
        self._emptied = True
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await self._reap(process)

    async def _reap(self, process: LaunchedProcess) -> None:
        """Wait for the launcher's report of the main process's exit (it has been killed)."""
        with trio.move_on_after(REAP_WAIT_S):
            await process.wait()
        if process.returncode is None and not process.lost:
            log.error("job %s: main process %d survived the kill; killing it", self.id, process.pid)
            process.kill()
            await process.wait()

    async def _finalize(self, process: LaunchedProcess) -> None:
        """Read usage, record the final state, end the log, remove the cgroup, persist.

        If processes of the job survive (the kill was cut short), the job is not recorded
        ended: its record keeps its status, says why, and the next start marks it LOST.
        """
        if not self._emptied:
            log.error("job %s: left unended: %s", self.id, UNENDED_REASON)
            self._record = replace(self._record, reason=UNENDED_REASON)
            self.output.finish()
            await self._persist()
            self.ended.set()
            return
        try:
            oom_kills = self._cgroup.oom_kills()
            usage = self._cgroup.usage()
        except Exception:
            log.exception("job %s: cannot read its resource usage", self.id)
            oom_kills, usage = 0, Usage()
        returncode = process.returncode
        exit_code = (
            None if returncode is None else (128 - returncode if returncode < 0 else returncode)
        )
        # A user's stop counts even if the job exited during it; the worker's own shutdown
        # does not relabel a job that had already ended by itself.
        shutdown_after_end = self._stop_reason == SHUTDOWN_REASON and self._exited_by_itself
        if self._lost:
            status, reason = JobStatus.FAILED, LAUNCHER_DIED_REASON
        elif self._stop_reason is not None and not shutdown_after_end:
            status = JobStatus.FAILED if self._timed_out else JobStatus.STOPPED
            reason = self._stop_reason
        elif self._oom or oom_kills > 0:
            # v1 kills only the largest process: a wrapper may survive and exit 0. OOM wins.
            status = JobStatus.FAILED
            reason = f"out of memory (limit {self._record.limits.memory_mb} MB)"
            exit_code = OOM_EXIT_CODE
        elif returncode == 0:
            status, reason = JobStatus.COMPLETED, "exited with status 0"
        elif returncode is None:
            status, reason = JobStatus.FAILED, "exit status unknown"
        elif returncode > 0:
            status, reason = JobStatus.FAILED, f"exited with status {returncode}"
        else:
            status, reason = JobStatus.FAILED, f"killed by signal {-returncode}"
        await self.output.write_owed_marker()
        if self.output.summary:
            reason = f"{reason}; {self.output.summary}"
        end = utc_now()
        self._record = replace(
            self._record,
            status=status,
            end_time=end,
            exit_code=exit_code,
            reason=reason,
            usage=replace(usage, oom_kills=max(usage.oom_kills, oom_kills)),
        )
        self.output.finish()
        log.info(
            "job %s ended: %s, exit code %s (%s) after %.3f s, %d bytes of output",
            self.id,
            status.value,
            exit_code,
            reason,
            (end - self._record.start_time).total_seconds(),
            self.output.length,
        )
        await self._cgroup.remove()
        self._gone()
        await self._persist()
        self.ended.set()

    def _gone(self) -> None:
        """No process of the job is left: what was held for it (its uid) is free again."""
        if self._on_gone is not None:
            on_gone, self._on_gone = self._on_gone, None
            on_gone()

    async def _persist(self, *, durable: bool = True) -> None:
        """Save the current record; a failure is logged (the job itself goes on) and the
        store keeps the record to write it again (JobStore.keep)."""
        try:
            await trio.to_thread.run_sync(partial(self._store.keep, durable=durable), self.record)
        except OSError as exc:
            log.warning(
                "job %s: cannot save its record (%s); it is written again once possible",
                self.id,
                exc.strerror or exc,
            )


def _enlarge_pipe(fd: int) -> None:
    """Raise the pipe's capacity to PIPE_BYTES; keep the default if the kernel refuses."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
