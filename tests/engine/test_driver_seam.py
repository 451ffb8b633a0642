"""The engine's side of the cgroup seam, with a scriptable driver around the null one:
OOM from the watcher and from the end-of-job counter, usage recorded, a failing driver
contained to its job."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from jobworker.cgroups.base import Limits, Usage
from jobworker.cgroups.null import NullCgroup, NullController
from jobworker.engine import JobSpec, JobStatus, open_job_manager
from jobworker.engine import supervision as job_module
from tests.support import pid_alive

from .helpers import PY, py, sh, wait_ended, wait_output
from .test_stop import IGNORE_TERM


class FakeCgroup(NullCgroup):
    def __init__(self, job_id: str, controller: FakeController) -> None:
        super().__init__(job_id)
        self.controller = controller
        self.oom = trio.Event()
        self.kills: list[float] = []
        self.removed = False

    async def wait_oom(self) -> None:
        await self.oom.wait()

    def oom_kills(self) -> int:
        return self.controller.oom_kills

    def usage(self) -> Usage:
        return Usage(cpu_time_s=1.5, peak_memory_bytes=4096, oom_kills=self.controller.oom_kills)

    async def kill(self, grace: float) -> bool:
        self.kills.append(grace)
        if self.controller.kill_fails:
            raise OSError("simulated driver failure")
        return await super().kill(grace)

    async def remove(self) -> None:
        self.removed = True


class FakeController(NullController):
    def __init__(self) -> None:
        self.cgroups: dict[str, FakeCgroup] = {}
        self.oom_kills = 0
        self.kill_fails = False
        self.swept = False

    def create(self, job_id: str, limits: Limits) -> FakeCgroup:
        cgroup = FakeCgroup(job_id, self)
        self.cgroups[job_id] = cgroup
        return cgroup

    async def sweep(self) -> list[str]:
        self.swept = True
        return ["41"]


async def test_oom_watcher_ends_the_job_at_once(data_dir: Path) -> None:
    controller = FakeController()
    async with open_job_manager(data_dir, controller=controller) as manager:
        assert controller.swept
        await manager.create(py(IGNORE_TERM))
        await manager.create(JobSpec(PY, ("-c", IGNORE_TERM), max_memory=64))
        await wait_output(manager, "2", b"ready\n")
        pid = manager._jobs["2"].pid
        assert pid is not None
        controller.oom_kills = 1
        controller.cgroups["2"].oom.set()
        record = await wait_ended(manager, "2")
        assert (record.status, record.exit_code, record.reason) == (
            JobStatus.FAILED,
            137,
            "out of memory (limit 64 MB)",
        )
        assert controller.cgroups["2"].kills == [0]  # no grace for an OOM'd job
        assert controller.cgroups["2"].removed
        assert record.usage == Usage(cpu_time_s=1.5, peak_memory_bytes=4096, oom_kills=1)
        assert not pid_alive(pid)
        assert manager.get("1").status is JobStatus.RUNNING  # the other job is untouched
        controller.oom_kills = 0


async def test_oom_counter_wins_over_a_wrapper_exiting_zero(data_dir: Path) -> None:
    controller = FakeController()
    controller.oom_kills = 1  # v1 killed the big child; the shell wrapper exits 0
    async with open_job_manager(data_dir, controller=controller) as manager:
        await manager.create(JobSpec("true", max_memory=50))
        record = await wait_ended(manager, "1")
    assert (record.status, record.exit_code, record.reason) == (
        JobStatus.FAILED,
        137,
        "out of memory (limit 50 MB)",
    )


async def test_leftovers_are_killed_without_grace_and_stops_get_it(data_dir: Path) -> None:
    controller = FakeController()
    async with open_job_manager(data_dir, controller=controller, stop_grace=0.25) as manager:
        await manager.create(JobSpec("true"))
        await manager.create(JobSpec("sleep", ("1000",)))
        await wait_ended(manager, "1")
        await manager.stop("2")
    assert controller.cgroups["1"].kills == [0]
    assert controller.cgroups["2"].kills == [0.25]


async def test_a_failing_driver_is_contained_to_its_job(data_dir: Path) -> None:
    controller = FakeController()
    async with open_job_manager(data_dir, controller=controller) as manager:
        await manager.create(JobSpec("sleep", ("1000",)))
        pid = manager._jobs["1"].pid
        assert pid is not None
        controller.kill_fails = True
        record = await manager.stop("1")
        controller.kill_fails = False
        assert record.status is JobStatus.STOPPED
        assert record.exit_code == 137  # the fallback killed its process group
        assert not pid_alive(pid)
        await manager.create(sh("echo still working"))
        assert (await wait_ended(manager, "2")).status is JobStatus.COMPLETED


async def test_a_hung_cleanup_still_ends_the_job_for_its_waiters(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If removing the cgroup hangs past the cleanup bound, stop callers and stream readers
    are released all the same, with the job's real final state."""
    monkeypatch.setattr(job_module, "CLEANUP_TIMEOUT_S", 0.3)

    class HangingRemove(FakeController):
        def create(self, job_id: str, limits: Limits) -> FakeCgroup:
            cgroup = super().create(job_id, limits)

            async def hang() -> None:
                await trio.sleep_forever()

            cgroup.remove = hang  # type: ignore[method-assign]
            return cgroup

    async with open_job_manager(data_dir, controller=HangingRemove()) as manager:
        await manager.create(JobSpec("sleep", ("1000",)))
        async with manager.follow("1") as reader:
            with trio.fail_after(5):
                record = await manager.stop("1")
                assert [chunk async for chunk in reader] == []
    assert (record.status, record.exit_code) == (JobStatus.STOPPED, 143)
