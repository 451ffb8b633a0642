"""The engine on real cgroups (v1 here, as in CI) with the orphan reaper: what the null
driver cannot do — OOM from the kernel's counter, and killing processes that left the
job's process group."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from jobworker.cgroups import CgroupsUnavailable, detect_controller
from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager
from tests.support import in_throttled_io, pid_alive, skip_unless

from .helpers import PY, py, read_all, sh, wait_ended, wait_output, wait_until
from .test_stop import IGNORE_TERM

pytestmark = pytest.mark.cgroups


@asynccontextmanager
async def real_manager(data_dir: Path) -> AsyncIterator[JobManager]:
    """A job manager on the real cgroups, as the server runs it."""
    skip_unless(os.geteuid() == 0, "needs root for cgroups")
    try:
        controller = detect_controller("require", root_name=f"jobworker-enginetest-{os.getpid()}")
    except CgroupsUnavailable as exc:
        skip_unless(False, f"no usable cgroups: {exc}")
        raise
    try:
        async with open_job_manager(data_dir, controller=controller) as manager:
            yield manager
    finally:
        await controller.remove_roots()


@pytest.fixture
async def cg_manager(data_dir: Path) -> AsyncIterator[JobManager]:
    async with real_manager(data_dir) as manager:
        yield manager


async def test_oom_is_reported_from_the_kernel_counter(cg_manager: JobManager) -> None:
    code = "b = bytearray(200 * 1024 * 1024); print(len(b))"
    await cg_manager.create(JobSpec(PY, ("-c", code), max_memory=50))
    record = await wait_ended(cg_manager, "1")
    assert (record.status, record.exit_code, record.reason) == (
        JobStatus.FAILED,
        137,
        "out of memory (limit 50 MB)",
    )
    assert record.usage.oom_kills >= 1


async def test_stop_kills_processes_that_left_the_group(cg_manager: JobManager) -> None:
    escapee = "setsid sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & sleep 1000"
    await cg_manager.create(sh(escapee))
    pid = int(await wait_output(cg_manager, "1", b"\n"))
    assert os.getsid(pid) == pid  # really in its own session
    started = time.monotonic()
    record = await cg_manager.stop("1")
    assert time.monotonic() - started < 1.0
    assert record.status is JobStatus.STOPPED
    await wait_until(lambda: not pid_alive(pid), timeout=2)


async def test_a_finished_jobs_escaped_child_is_killed(cg_manager: JobManager) -> None:
    await cg_manager.create(sh("setsid sleep 1000 & echo $!"))
    record = await wait_ended(cg_manager, "1", timeout=5)
    assert (record.status, record.exit_code) == (JobStatus.COMPLETED, 0)
    pid = int(await wait_output(cg_manager, "1", b"\n"))
    try:
        await wait_until(lambda: not pid_alive(pid), timeout=2)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_stop_right_after_create_kills_the_whole_job(cg_manager: JobManager) -> None:
    """Create reports the job started only once it is placed, or a stop right after it finds
    the cgroups empty, misses the job and everything it forks (measured with the old launch
    shim before it waited: 5 of 5 stops took 4.5 s and left the children running)."""
    for _ in range(5):
        record = await cg_manager.create(sh("sleep 301.25 & sleep 302.25"))
        started = time.monotonic()
        final = await cg_manager.stop(record.id)
        assert time.monotonic() - started < 1.0
        assert (final.status, final.exit_code) == (JobStatus.STOPPED, 143)
    leftovers = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and _cmdline(int(pid)) in ("sleep\x00301.25\x00", "sleep\x00302.25\x00")
    ]
    assert leftovers == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _live_in(paths: list[Path]) -> set[int]:
    """Live pids still listed in any of the job's cgroups (none once they are gone)."""
    found: set[int] = set()
    for directory in paths:
        try:
            text = (directory / "cgroup.procs").read_text()
        except OSError:
            continue
        found |= {int(pid) for pid in text.split() if pid_alive(int(pid))}
    return found


async def test_a_job_in_throttled_io_is_killed_at_once(cg_manager: JobManager) -> None:
    """A process whose direct IO waits in the throttle sits in D state and cannot die until
    the IO is dispatched (a minute here): the stop lifts the throttle before the kill, so the
    job dies at once and is recorded only once nothing of it is left."""
    dd = ("if=/dev/zero", "of=f", "bs=64k", "count=1", "oflag=direct")
    record = await cg_manager.create(JobSpec("dd", dd, max_iobps=1024))
    job = cg_manager._jobs[record.id]
    pid = job.pid
    assert pid is not None
    await wait_until(lambda: in_throttled_io(pid, b"dd"), timeout=5)  # held by the throttle
    paths = list(job._cgroup.paths)  # type: ignore[attr-defined]
    started = time.monotonic()
    final = await cg_manager.stop(record.id)
    took = time.monotonic() - started
    print(f"stop of a job in throttled IO took {took * 1000:.1f} ms")
    assert took < 3.0  # a correctness bound: without the lift it takes over ten seconds
    assert final.status is JobStatus.STOPPED
    assert final.exit_code in (137, 143)  # dd had SIGTERM pending when the IO returned
    assert not pid_alive(pid)
    assert _live_in(paths) == set()
    assert not any(p.exists() for p in paths)


async def test_a_job_cancelled_outside_the_shutdown_path_still_cleans_up(data_dir: Path) -> None:
    """Cancelling the jobs' nursery without the manager's own shutdown (its owner's scope
    cancelled) still takes every job through the whole stop path: SIGTERM, grace, SIGKILL,
    reap, cgroups removed, the record persisted."""
    async with real_manager(data_dir) as manager:
        record = await manager.create(py(IGNORE_TERM))
        await wait_output(manager, record.id, b"ready\n")
        job = manager._jobs[record.id]
        pid = job.pid
        assert pid is not None
        paths = list(job._cgroup.paths)  # type: ignore[attr-defined]
        manager._nursery.cancel_scope.cancel()
        try:
            with trio.CancelScope(shield=True), trio.fail_after(5):
                await job.ended.wait()
        finally:
            if pid_alive(pid):  # the cleanup failed: end the job, or the manager waits for it
                os.kill(pid, signal.SIGKILL)
        final = manager.get(record.id)
        assert (final.status, final.reason, final.exit_code) == (
            JobStatus.STOPPED,
            "worker shutdown",
            137,
        )
        assert not pid_alive(pid)
        assert not any(p.exists() for p in paths)
        stored = json.loads((data_dir / "jobs" / record.id / "job.json").read_text())
        assert (stored["status"], stored["exit_code"]) == ("STOPPED", 137)
        with trio.CancelScope(shield=True), trio.fail_after(5):
            assert await read_all(manager, record.id) == b"ready\n"
