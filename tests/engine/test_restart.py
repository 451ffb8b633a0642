"""Durable records: restart reloads them (running ones become LOST), ids continue, output
stays streamable; shutting the manager down stops every job and leaves no process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from jobworker.engine import LOST_REASON, JobManager, JobSpec, JobStatus, open_job_manager
from jobworker.engine.store import JobStore, record_from_json
from tests.support import children_of, pid_alive

from .helpers import py, read_all, sh, wait_ended, wait_output, wait_until
from .test_stop import IGNORE_TERM


async def test_restart_reloads_records_marks_running_lost_and_continues_ids(
    data_dir: Path,
) -> None:
    async with open_job_manager(data_dir) as manager:
        await manager.create(sh("echo first; exit 3"))
        await manager.create(sh("echo second"))
        first = await wait_ended(manager, "1")
        second = await wait_ended(manager, "2")
        await manager._jobs["2"].ended.wait()
    # As if the worker died while job 2 ran: its last record still says RUNNING.
    store = JobStore(data_dir)
    store.save(replace(second, status=JobStatus.RUNNING, end_time=None, exit_code=None, reason=""))
    (data_dir / "jobs" / "5").mkdir()  # a job whose record was never written: id 5 is used
    (data_dir / "jobs" / "5" / "job.json").write_text("{ torn")
    async with open_job_manager(data_dir) as manager:
        assert [r.id for r in manager.list()] == ["1", "2"]
        assert manager.get("1") == first
        lost = manager.get("2")
        assert lost.status is JobStatus.LOST
        assert lost.reason == LOST_REASON
        assert lost.command == "sh"
        on_disk = record_from_json(json.loads((data_dir / "jobs" / "2" / "job.json").read_text()))
        assert on_disk.status is JobStatus.LOST  # persisted: never shown RUNNING again
        assert await read_all(manager, "1") == b"first\n"
        assert await read_all(manager, "2") == b"second\n"
        assert (await manager.create(JobSpec("true"))).id == "6"
        await wait_ended(manager, "6")
        with pytest.raises(Exception, match="job is not running: 2 \\(current status: LOST\\)"):
            await manager.stop("2")


async def test_full_precision_timestamps_survive_a_restart(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        await manager.create(JobSpec("true"))
        before = await wait_ended(manager, "1")
        await manager._jobs["1"].ended.wait()
        before = manager.get("1")
    async with open_job_manager(data_dir) as manager:
        assert manager.get("1") == before
        assert before.start_time.microsecond or before.end_time != before.start_time


async def test_shutdown_stops_every_job_and_leaves_no_process(data_dir: Path) -> None:
    tree = "sleep 1000 & echo $!; sleep 1000"
    async with open_job_manager(data_dir) as manager:
        await manager.create(JobSpec("sleep", ("1000",)))
        await manager.create(py(IGNORE_TERM))
        await manager.create(sh(tree))
        await manager.create(JobSpec("true"))
        await wait_ended(manager, "4")
        await wait_output(manager, "2", b"ready\n")
        out3 = await wait_output(manager, "3", b"\n")
        pids = [job_pid(manager, j) for j in ("1", "2", "3")] + [int(out3)]
        assert all(pid_alive(pid) for pid in pids)
    assert not any(pid_alive(pid) for pid in pids)
    assert children_left() == []
    async with open_job_manager(data_dir) as manager:
        records = {r.id: r for r in manager.list()}
    for job_id in ("1", "2", "3"):
        assert records[job_id].status is JobStatus.STOPPED
        assert records[job_id].reason == "worker shutdown"
    assert records["2"].exit_code == 137
    assert records["4"].status is JobStatus.COMPLETED


async def test_cancelling_the_manager_stops_jobs_the_same_way(data_dir: Path) -> None:
    with trio.CancelScope() as scope:
        async with open_job_manager(data_dir) as manager:
            await manager.create(py(IGNORE_TERM))
            await wait_output(manager, "1", b"ready\n")
            pid = job_pid(manager, "1")
            scope.cancel()
            await trio.sleep_forever()
    assert not pid_alive(pid)
    stored = json.loads((data_dir / "jobs" / "1" / "job.json").read_text())
    assert (stored["status"], stored["reason"], stored["exit_code"]) == (
        "STOPPED",
        "worker shutdown",
        137,
    )


def job_pid(manager: JobManager, job_id: str) -> int:
    pid = manager._jobs[job_id].pid
    assert pid is not None
    return pid


def children_left() -> list[int]:
    return children_of(os.getpid())


async def test_worker_killed_with_sigkill_then_restarted(tmp_path: Path, data_dir: Path) -> None:
    """A real crash: the worker process dies by SIGKILL while a job runs."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, trio
            from pathlib import Path
            from jobworker.engine import open_job_manager, JobSpec

            async def main():
                async with open_job_manager(Path({str(data_dir)!r})) as manager:
                    await manager.create(JobSpec("sh", ("-c", "echo hello; exec sleep 1000")))
                    while manager.output_size("1") < 6:
                        await trio.sleep(0.01)
                    print(manager._jobs["1"].pid, flush=True)
                    await trio.sleep_forever()

            trio.run(main)
            """
        )
    )
    worker = await trio.lowlevel.open_process([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        with trio.fail_after(10):
            line = await worker.stdout.receive_some(100)
        orphan = int(line)
    finally:
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        if worker.stdout is not None:
            await worker.stdout.aclose()
    try:
        async with open_job_manager(data_dir) as manager:
            record = manager.get("1")
            assert record.status is JobStatus.LOST
            assert record.reason == LOST_REASON
            assert await read_all(manager, "1") == b"hello\n"
            assert (await manager.create(JobSpec("true"))).id == "2"
            await wait_ended(manager, "2")
    finally:
        # Without cgroups nothing can find the orphan by itself (the cgroup drivers sweep it).
        os.kill(orphan, signal.SIGKILL)
        await wait_until(lambda: not pid_alive(orphan))
