"""The stop path against the manager's other paths: a stop or a shutdown during the spawn, the
first stop reason against a later shutdown, the pump drained at every job's end, and a job
recorded ended only once nothing of it is left."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import trio

from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager
from jobworker.engine import manager as manager_module
from jobworker.engine import supervision as job_module
from tests.support import pid_alive

from .helpers import py, read_all, sh, wait_output, wait_until
from .test_driver_seam import FakeCgroup, FakeController

# Says when SIGTERM arrives (so a test knows the stop has begun), then ignores it. Raw
# writes: a SIGTERM landing while print() holds stdout's lock would make print() reentrant.
NOTE_TERM = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: os.write(1, b'term\\n'))\n"
    "os.write(1, b'ready\\n')\n"
    "time.sleep(1000)\n"
)


async def _wait_spawning(manager: JobManager, job_id: str) -> None:
    """Return while ``job_id`` is being spawned: its id is taken, its process not yet placed.

    Polled at every scheduling turn (not on a timer): the spawn takes milliseconds and the
    job is visible from the moment its id is taken.
    """
    with trio.fail_after(10):
        while job_id not in manager._jobs:
            await trio.lowlevel.checkpoint()
    assert manager.get(job_id).status is JobStatus.INITIALIZING


async def test_a_stop_during_the_spawn_waits_for_it_and_stops_the_job(manager: JobManager) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.create, JobSpec("sleep", ("1000",)))
        await _wait_spawning(manager, "1")
        with trio.fail_after(5):
            record = await manager.stop("1")
    assert (record.status, record.exit_code, record.reason) == (
        JobStatus.STOPPED,
        143,
        "stopped by request",
    )
    pid = manager._jobs["1"].pid
    assert pid is not None
    assert not pid_alive(pid)


async def test_a_create_racing_shutdown_is_stopped_and_does_not_hold_it(data_dir: Path) -> None:
    started = time.monotonic()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, open_job_manager(data_dir) as manager:
            nursery.start_soon(manager.create, JobSpec("sleep", ("1000",)))
            await _wait_spawning(manager, "1")
            # Leaving: the manager shuts down while job 1 is being spawned.
    assert time.monotonic() - started < 5.0  # not the sleep's 1000 s
    record = manager.get("1")
    assert (record.status, record.reason) == (JobStatus.STOPPED, "worker shutdown")
    pid = manager._jobs["1"].pid
    assert pid is not None
    assert not pid_alive(pid)


async def test_the_first_stop_reason_wins_over_a_later_shutdown(data_dir: Path) -> None:
    with trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            open_job_manager(data_dir, stop_grace=1.0) as manager,
        ):
            await manager.create(py(NOTE_TERM))
            await wait_output(manager, "1", b"ready\n")
            nursery.start_soon(manager.stop, "1")
            await wait_output(manager, "1", b"term\n")  # the stop is in its grace period
            # Leaving: the manager shuts down during the user's stop.
    record = manager.get("1")
    assert (record.status, record.reason, record.exit_code) == (
        JobStatus.STOPPED,
        "stopped by request",
        137,
    )
    stored = json.loads((data_dir / "jobs" / "1" / "job.json").read_text())
    assert stored["reason"] == "stopped by request"


async def test_every_job_keeps_its_output_up_to_its_exit(
    manager: JobManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Each job writes 1 MiB right up to its exit: its end is recorded only once the pump has
    drained the pipe, so no byte is lost and nothing is mistaken for an escaped writer."""
    size = 1024 * 1024
    count = 30
    caplog.set_level(logging.WARNING, logger="jobworker.engine")
    for _ in range(count):
        await manager.create(sh(f"head -c {size} /dev/zero"))
    ids = [str(n) for n in range(1, count + 1)]
    with trio.fail_after(60):
        for job_id in ids:
            await manager._jobs[job_id].ended.wait()
    assert [manager.get(j).output_bytes for j in ids] == [size] * count
    assert [manager.get(j).status for j in ids] == [JobStatus.COMPLETED] * count
    assert len(await read_all(manager, "30")) == size
    assert "still holds its output open" not in caplog.text


class SurvivingCgroup(FakeCgroup):
    """A job cgroup that reports survivors for its first ``survive`` kills (its processes are
    really killed: what cannot be made here is a process that survives SIGKILL)."""

    survive = 0

    async def kill(self, grace: float) -> bool:
        empty = await super().kill(grace)
        return empty and len(self.kills) > self.survive


class SurvivingController(FakeController):
    def __init__(self, survive: int) -> None:
        super().__init__()
        self.survive = survive

    def create(self, job_id: str, limits: object) -> FakeCgroup:
        cgroup = SurvivingCgroup(job_id, self)
        cgroup.survive = self.survive
        self.cgroups[job_id] = cgroup
        return cgroup


async def test_a_job_is_recorded_ended_only_once_its_cgroup_is_empty(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_module, "KILL_RETRY_S", 0.01)
    controller = SurvivingController(survive=3)
    async with open_job_manager(data_dir, controller=controller) as manager:
        await manager.create(JobSpec("sleep", ("1000",)))
        with trio.fail_after(5):
            record = await manager.stop("1")
    assert controller.cgroups["1"].kills == [0.1, 0, 0, 0]  # killed again until empty
    assert (record.status, record.exit_code) == (JobStatus.STOPPED, 143)


async def test_survivors_at_shutdown_leave_the_job_unended_for_the_next_start(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_module, "KILL_RETRY_S", 0.01)
    monkeypatch.setattr(job_module, "CLEANUP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(manager_module, "SURVIVOR_WAIT_S", 0.3)
    controller = SurvivingController(survive=10**9)
    with trio.fail_after(5):
        async with open_job_manager(data_dir, controller=controller) as manager:
            await manager.create(JobSpec("sleep", ("1000",)))
            job = manager._jobs["1"]
            job.request_stop("stopped by request")
            await wait_until(lambda: manager.get("1").reason == job_module.SURVIVORS_REASON)
            assert manager.get("1").status is JobStatus.RUNNING
    stored = json.loads((data_dir / "jobs" / "1" / "job.json").read_text())
    assert (stored["status"], stored["reason"]) == ("RUNNING", job_module.UNENDED_REASON)
    async with open_job_manager(data_dir) as manager:
        record = manager.get("1")
    assert (record.status, record.exit_code) == (JobStatus.LOST, None)


async def test_a_grace_longer_than_the_cleanup_bound_is_honoured(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--stop-grace is the operator's: the bound on the kill comes on top of it."""
    monkeypatch.setattr(job_module, "CLEANUP_TIMEOUT_S", 0.2)
    async with open_job_manager(data_dir, stop_grace=0.6) as manager:
        await manager.create(py(NOTE_TERM))
        await wait_output(manager, "1", b"ready\n")
        started = time.monotonic()
        with trio.fail_after(5):
            record = await manager.stop("1")
        assert time.monotonic() - started >= 0.6  # SIGKILL only once the grace is over
    assert (record.status, record.exit_code) == (JobStatus.STOPPED, 137)
