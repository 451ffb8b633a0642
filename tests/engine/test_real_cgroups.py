"""The engine on real cgroups (v1 here, as in CI) with the orphan reaper: what the null
driver cannot do — OOM from the kernel's counter, and killing processes that left the
job's process group."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from jobworker.cgroups import CgroupsUnavailable, Reaper, detect_controller
from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager
from tests.support import pid_alive, skip_unless

from .helpers import PY, sh, wait_ended, wait_output, wait_until

pytestmark = pytest.mark.cgroups


@pytest.fixture
async def cg_manager(data_dir: Path) -> AsyncIterator[JobManager]:
    skip_unless(os.geteuid() == 0, "needs root for cgroups")
    try:
        controller = detect_controller("require", root_name=f"jobworker-enginetest-{os.getpid()}")
    except CgroupsUnavailable as exc:
        skip_unless(False, f"no usable cgroups: {exc}")
        raise
    reaper = Reaper()
    reaper.enable()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            async with open_job_manager(data_dir, controller=controller, reaper=reaper) as manager:
                yield manager
            nursery.cancel_scope.cancel()
    finally:
        reaper.disable()
        await controller.remove_roots()


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
    """The shim joins the cgroups a moment after it starts: create must report the job started
    only once it is placed, or a stop in that window finds the cgroups empty, misses the job
    and everything it forks (measured before the fix: 5 of 5 stops took 4.5 s and left the
    children running)."""
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
