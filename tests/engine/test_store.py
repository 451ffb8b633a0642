"""The record store: atomic writes, durable final records, crash leftovers, a hostile data dir."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from jobworker.engine import LOST_REASON, JobStatus, open_job_manager
from jobworker.engine.model import JobRecord, Limits, utc_now
from jobworker.engine.store import OUTPUT_MISSING_REASON, JobStore, record_from_json
from jobworker.errors import OutputLost

from .helpers import read_all, sh, wait_ended


def _record(job_id: str = "1", status: JobStatus = JobStatus.RUNNING) -> JobRecord:
    return JobRecord(
        id=job_id,
        command="/bin/true",
        args=("a",),
        limits=Limits(cpu_percent=100, memory_mb=64, io_bps=0, pids_max=64),
        status=status,
        start_time=utc_now(),
    )


def _stored(data_dir: Path, job_id: str = "1") -> JobRecord:
    return record_from_json(json.loads((data_dir / "jobs" / job_id / "job.json").read_text()))


async def test_a_record_left_initializing_by_a_crash_is_marked_lost(data_dir: Path) -> None:
    store = JobStore(data_dir)
    store.prepare("1")
    store.save(_record(status=JobStatus.INITIALIZING), durable=False)
    async with open_job_manager(data_dir) as manager:
        record = manager.get("1")
        assert record.status is JobStatus.LOST
        assert record.reason == LOST_REASON
        assert _stored(data_dir).status is JobStatus.LOST
        with pytest.raises(Exception, match=r"job is not running: 1 \(current status: LOST\)"):
            await manager.stop("1")


def test_a_save_replaces_the_file_instead_of_writing_in_place(data_dir: Path) -> None:
    store = JobStore(data_dir)
    store.prepare("1")
    store.save(_record())
    path = data_dir / "jobs" / "1" / "job.json"
    first = path.stat().st_ino
    store.save(replace(_record(), status=JobStatus.COMPLETED, end_time=utc_now(), exit_code=0))
    assert path.stat().st_ino != first  # a new file renamed over the old one
    assert _stored(data_dir).status is JobStatus.COMPLETED


def test_a_write_that_fails_halfway_leaves_the_old_record_and_no_temp_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(data_dir)
    store.prepare("1")
    store.save(_record())
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    final = replace(_record(), status=JobStatus.COMPLETED, end_time=utc_now(), exit_code=0)
    with pytest.raises(OSError, match="No space left"):
        store.save(final)
    monkeypatch.undo()
    assert _stored(data_dir).status is JobStatus.RUNNING  # the old record, whole
    assert sorted(os.listdir(data_dir / "jobs" / "1")) == ["job.json", "work"]


def _recording_fsync(
    monkeypatch: pytest.MonkeyPatch,
) -> list[os.stat_result]:
    """Record what each os.fsync was called on (the disk's durability cannot be observed)."""
    synced: list[os.stat_result] = []
    real_fsync: Callable[[int], None] = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def test_a_final_record_is_fsynced_file_and_directory(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _recording_fsync(monkeypatch)
    async with open_job_manager(data_dir) as manager:
        await manager.create(sh("exit 3"))
        assert (await wait_ended(manager, "1")).status is JobStatus.FAILED
        await manager._jobs["1"].ended.wait()
    job_dir = data_dir / "jobs" / "1"
    record_ino = (job_dir / "job.json").stat().st_ino
    files = [s for s in synced if stat.S_ISREG(s.st_mode) and s.st_ino == record_ino]
    dirs = [s for s in synced if stat.S_ISDIR(s.st_mode) and s.st_ino == job_dir.stat().st_ino]
    assert files, "the final job.json was not fsynced"
    assert dirs, "the job's directory was not fsynced after the rename"


async def test_a_finished_job_whose_output_log_is_gone_says_so(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        await manager.create(sh("echo hello"))
        await wait_ended(manager, "1")
        await manager._jobs["1"].ended.wait()
    (data_dir / "jobs" / "1" / "output.log").unlink()
    async with open_job_manager(data_dir) as manager:
        record = manager.get("1")
        assert record.status is JobStatus.COMPLETED
        assert record.reason == f"exited with status 0; {OUTPUT_MISSING_REASON}"
        with pytest.raises(OutputLost, match=r"^output of job 1 is missing$"):
            await read_all(manager, "1")


async def test_a_log_replaced_by_a_symlink_after_the_load_is_not_followed(
    data_dir: Path,
) -> None:
    async with open_job_manager(data_dir) as manager:
        await manager.create(sh("echo hello"))
        await wait_ended(manager, "1")
        await manager._jobs["1"].ended.wait()
        log_path = data_dir / "jobs" / "1" / "output.log"
        log_path.unlink()
        log_path.symlink_to("/dev/zero")
        with pytest.raises(OutputLost, match=r"^output of job 1 is missing$"):
            await read_all(manager, "1")


async def test_a_temporary_record_left_by_a_crash_is_removed_at_start(data_dir: Path) -> None:
    store = JobStore(data_dir)
    store.prepare("1")
    store.save(replace(_record(), status=JobStatus.COMPLETED, end_time=utc_now(), exit_code=0))
    leftovers = [data_dir / "jobs" / "1" / name for name in (".job.json.tmp", ".job.json.0f1e.tmp")]
    for leftover in leftovers:  # the name of older saves, and of ours
        leftover.write_bytes(b'{"format": 1, "id"')
    async with open_job_manager(data_dir) as manager:
        assert manager.get("1").status is JobStatus.COMPLETED
    assert sorted(os.listdir(data_dir / "jobs" / "1")) == ["job.json", "work"]


def _plant_directory(path: Path, outside: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("planted\n")


def _plant_fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)  # opened for writing without O_NONBLOCK, it waits for a reader: forever


def _plant_symlink(path: Path, outside: Path) -> None:
    path.symlink_to(outside)  # out of the data dir


PLANTED: dict[str, Callable[[Path, Path], None]] = {
    "directory": _plant_directory,
    "fifo": _plant_fifo,
    "symlink out of the data dir": _plant_symlink,
}
SAVE_S = 5.0  # a save takes milliseconds: this bound only ends one that blocks


@pytest.mark.parametrize("kind", list(PLANTED))
async def test_nothing_planted_at_the_temporary_record_path_blocks_or_breaks_a_save_or_a_start(
    data_dir: Path, tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the server's\n")
    store = JobStore(data_dir)
    store.prepare("1")
    store.save(_record())
    job_dir = data_dir / "jobs" / "1"
    planted = job_dir / ".job.json.tmp"  # the temporary name of older saves: easily guessed
    PLANTED[kind](planted, outside)
    final = replace(_record(), status=JobStatus.COMPLETED, end_time=utc_now(), exit_code=0)
    try:
        with trio.fail_after(SAVE_S):
            await trio.to_thread.run_sync(store.save, final, abandon_on_cancel=True)
    finally:
        if planted.is_fifo():  # release a save blocked on it
            os.close(os.open(planted, os.O_RDONLY | os.O_NONBLOCK))
    assert _stored(data_dir).status is JobStatus.COMPLETED
    async with open_job_manager(data_dir) as manager:
        assert manager.get("1").status is JobStatus.COMPLETED
    assert sorted(os.listdir(job_dir)) == ["job.json", "work"]  # the start removed it
    assert outside.read_bytes() == b"not the server's\n"  # never written through the link
