"""JobManager.delete: an ended job's files go for good, a running one is refused, its streams
end first (at a message boundary, or cut off when stuck), and no id is ever given again."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager
from jobworker.engine.manager import DELETE_STREAM_PATIENCE_S, STREAM_CANCEL_WAIT_S
from jobworker.engine.store import DataDirUnusable
from jobworker.errors import JobIsRunning, JobNotFound

from .helpers import read_all, sh, wait_ended, wait_until

BIG = "head -c 3000000 /dev/zero | tr '\\0' x"  # 3 MB of output, written at once


async def ended_job(manager: JobManager, spec: JobSpec) -> str:
    """Create a job and wait until it has ended and its final record is written."""
    job_id = (await manager.create(spec)).id
    await wait_ended(manager, job_id)
    await manager._jobs[job_id].ended.wait()
    return job_id


def listed(manager: JobManager) -> list[str]:
    return [record.id for record in manager.list()]


async def test_delete_removes_an_ended_job_and_everything_of_it(
    manager: JobManager, data_dir: Path
) -> None:
    job_id = await ended_job(manager, sh("echo hello; echo scratch > f"))
    job_dir = data_dir / "jobs" / job_id
    assert (job_dir / "work" / "f").exists()
    record = await manager.delete(job_id)
    assert record.id == job_id
    assert record.status is JobStatus.COMPLETED
    assert not job_dir.exists()
    assert [p.name for p in (data_dir / "jobs").iterdir()] == []  # no leftover, no trash
    assert listed(manager) == []
    for call in (manager.get, manager.output_size, manager.usage):
        with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
            call(job_id)
    with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
        await manager.stop(job_id)
    with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
        await read_all(manager, job_id)
    with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
        await manager.delete(job_id)  # the second delete finds nothing


async def test_a_running_job_is_refused_and_nothing_is_removed(
    manager: JobManager, data_dir: Path
) -> None:
    job = await manager.create(JobSpec("sleep", ("100",)))
    with pytest.raises(JobIsRunning, match=f"^job is running: {job.id}$"):
        await manager.delete(job.id)
    assert manager.get(job.id).status is JobStatus.RUNNING
    assert (data_dir / "jobs" / job.id / "job.json").exists()
    await manager.stop(job.id)
    await manager.delete(job.id)  # stopped: now it may go
    assert not (data_dir / "jobs" / job.id).exists()


async def test_an_unknown_id_is_not_found(manager: JobManager) -> None:
    with pytest.raises(JobNotFound, match=r"^job not found: 999$"):
        await manager.delete("999")


async def test_of_two_concurrent_deletes_one_wins_the_other_finds_nothing(
    manager: JobManager,
) -> None:
    job_id = await ended_job(manager, sh("echo x"))
    outcomes: list[str] = []

    async def delete() -> None:
        try:
            await manager.delete(job_id)
            outcomes.append("deleted")
        except JobNotFound:
            outcomes.append("not found")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        nursery.start_soon(delete)
    assert sorted(outcomes) == ["deleted", "not found"]


async def test_a_stream_in_progress_ends_at_its_next_message_with_not_found(
    manager: JobManager,
) -> None:
    job_id = await ended_job(manager, sh(BIG))
    async with trio.open_nursery() as nursery, manager.follow(job_id, max_chunk=65536) as reader:
        assert await reader.__anext__() == b"x" * 65536
        started = trio.current_time()
        nursery.start_soon(manager.delete, job_id)
        await wait_until(lambda: job_id not in listed(manager))
        with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
            await reader.__anext__()  # the job is being deleted: nothing more
    # It ended at once, without being cut off after the patience.
    assert trio.current_time() - started < DELETE_STREAM_PATIENCE_S


async def test_a_stream_that_had_delivered_everything_ends_normally(
    manager: JobManager, data_dir: Path
) -> None:
    job_id = await ended_job(manager, sh("echo all of it"))
    async with trio.open_nursery() as nursery, manager.follow(job_id) as reader:
        assert await reader.__anext__() == b"all of it\n"
        nursery.start_soon(manager.delete, job_id)
        await wait_until(lambda: job_id not in listed(manager))
        assert [chunk async for chunk in reader] == []  # the end, not an error
    assert not (data_dir / "jobs" / job_id).exists()


async def test_a_stuck_stream_is_cut_off_after_the_patience_and_the_files_go(
    manager: JobManager, data_dir: Path
) -> None:
    job_id = await ended_job(manager, sh(BIG))
    never = trio.Event()
    ended_with: list[BaseException] = []

    async def stuck_reader(task_status: trio.TaskStatus[None]) -> None:
        try:
            async with manager.follow(job_id) as reader:
                await reader.__anext__()
                task_status.started()
                await never.wait()  # a client that stopped reading: held in its send
        except JobNotFound as exc:
            ended_with.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(stuck_reader)
        started = trio.current_time()
        await manager.delete(job_id)
        took = trio.current_time() - started
    assert DELETE_STREAM_PATIENCE_S <= took < DELETE_STREAM_PATIENCE_S + STREAM_CANCEL_WAIT_S
    assert [str(exc) for exc in ended_with] == [f"job not found: {job_id}"]
    assert not (data_dir / "jobs" / job_id).exists()


async def test_the_highest_id_deleted_is_never_given_again_after_restarts(
    data_dir: Path,
) -> None:
    async with open_job_manager(data_dir) as manager:
        await ended_job(manager, sh("true"))
        highest = await ended_job(manager, sh("true"))
        assert highest == "2"
        await manager.delete("2")
        await manager.delete("1")
    assert (data_dir / "next-id").read_text() == "3\n"
    assert list((data_dir / "jobs").iterdir()) == []
    async with open_job_manager(data_dir) as manager:
        assert listed(manager) == []
        assert await ended_job(manager, sh("true")) == "3"
    async with open_job_manager(data_dir) as manager:  # the mark holds with jobs on disk too
        assert await ended_job(manager, sh("true")) == "4"


async def test_a_delete_cut_short_by_a_crash_is_finished_at_the_next_start(
    data_dir: Path,
) -> None:
    async with open_job_manager(data_dir) as manager:
        job_id = await ended_job(manager, sh("echo x > f"))
    # As if the worker died between the rename and the removal.
    trash = data_dir / "jobs" / f".deleted.{job_id}.0123456789abcdef"
    (data_dir / "jobs" / job_id).rename(trash)
    (data_dir / "next-id").write_text("2\n")
    (data_dir / ".next-id.feedfacefeedface.tmp").write_text("garbage")  # a cut-short write
    async with open_job_manager(data_dir) as manager:
        assert listed(manager) == []
        assert not trash.exists()
        assert not (data_dir / ".next-id.feedfacefeedface.tmp").exists()
        assert (await manager.create(sh("true"))).id == "2"


@pytest.mark.parametrize("content", ["", "seven\n", "9" * 40])
async def test_an_unreadable_id_mark_refuses_to_start(data_dir: Path, content: str) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "next-id").write_text(content)
    with pytest.raises(DataDirUnusable, match="next-id"):
        async with open_job_manager(data_dir):
            pass


async def test_a_symlinked_id_mark_is_refused_not_followed(data_dir: Path, tmp_path: Path) -> None:
    data_dir.mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("1000\n")
    (data_dir / "next-id").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataDirUnusable, match="a symbolic link"):
        async with open_job_manager(data_dir):
            pass


async def test_a_failed_rename_leaves_the_job_as_it_was(
    manager: JobManager, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await ended_job(manager, sh("echo kept"))

    def failing_rename(source: object, target: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("jobworker.engine.store.os.rename", failing_rename)
    with pytest.raises(OSError, match="Input/output error"):
        await manager.delete(job_id)
    monkeypatch.undo()
    assert listed(manager) == [job_id]
    assert await read_all(manager, job_id) == b"kept\n"  # its streams work again
    await manager.delete(job_id)
    assert not (data_dir / "jobs" / job_id).exists()


async def test_a_symlink_in_the_work_dir_is_removed_not_followed(
    manager: JobManager, data_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    job_id = await ended_job(manager, sh(f"ln -s {outside} link; ln -s {outside}/precious file"))
    assert (data_dir / "jobs" / job_id / "work" / "link").is_symlink()
    await manager.delete(job_id)
    assert not (data_dir / "jobs" / job_id).exists()
    assert (outside / "precious").read_text() == "keep me"
