"""The record keeper (the manager's periodic retry of unsaved records and of the disk reserve)
outlives a failing data disk, logs each kind of failure once, and saves once the disk is back.

A disk that fails with EIO on demand is not available here: ``os.statvfs`` and ``os.lstat`` are
replaced (monkeypatch, for the whole process: the engine's modules call them through ``os``)
by versions that fail as a dying disk would, for the data dir and its reserve only, and the
store's ``save`` refuses final records the same way.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobworker.engine import JobRecord, JobStatus, open_job_manager
from jobworker.engine import manager as manager_module
from jobworker.engine.disk import RESERVE_NAME
from jobworker.engine.store import record_from_json

from .helpers import sh, wait_until

TICK_S = 0.01  # RECORD_RETRY_S for this test: many retries in little time
FAILING_TICKS = 5  # retries each failure lasts: a failure logged per retry would show


def _eio(path: object) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), str(path))


async def test_the_record_keeper_outlives_eio_and_saves_once_the_disk_is_back(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.engine")
    monkeypatch.setattr(manager_module, "RECORD_RETRY_S", TICK_S)
    failing: set[str] = set()
    calls = {"statvfs": 0, "lstat": 0}
    real_statvfs: Callable[[Any], os.statvfs_result] = os.statvfs
    real_lstat: Callable[..., os.stat_result] = os.lstat

    def statvfs(path: Any) -> os.statvfs_result:
        if "statvfs" in failing and Path(path) == store_dir:
            calls["statvfs"] += 1
            raise _eio(path)
        return real_statvfs(path)

    def lstat(path: Any, *, dir_fd: int | None = None) -> os.stat_result:
        if "lstat" in failing and Path(path).name == RESERVE_NAME:
            calls["lstat"] += 1
            raise _eio(path)
        return real_lstat(path, dir_fd=dir_fd)

    async with open_job_manager(data_dir, min_free_disk=0) as manager:
        store = manager._store
        store_dir = store.data_dir
        real_save = store.save

        def save(record: JobRecord, *, durable: bool = True) -> None:
            if "save" in failing and record.status.is_terminal:
                raise _eio(store.job_dir(record.id))
            real_save(record, durable=durable)

        monkeypatch.setattr(store, "save", save)
        monkeypatch.setattr(os, "statvfs", statvfs)
        monkeypatch.setattr(os, "lstat", lstat)
        failing.add("save")
        await manager.create(sh("true"))
        await manager._jobs["1"].ended.wait()
        assert store.unsaved == ["1"]  # its final record is kept for the retry
        failing.add("statvfs")  # free_bytes fails
        await wait_until(lambda: calls["statvfs"] >= FAILING_TICKS)
        failing.discard("statvfs")
        failing.add("lstat")  # then the reserve's check
        await wait_until(lambda: calls["lstat"] >= FAILING_TICKS)
        failing.clear()  # the disk is back
        path = data_dir / "jobs" / "1" / "job.json"
        # The retry writes the file in a thread, forgets the record as unsaved, checks the
        # reserve (another thread) and only then says the disk is usable again: wait for all
        # of it (each step can lag the one before by a thread hop).
        await wait_until(
            lambda: (
                not store.unsaved
                and record_from_json(json.loads(path.read_bytes())).status.is_terminal
                and any("usable again" in r.getMessage() for r in caplog.records)
            )
        )
        assert manager.get("1").status is JobStatus.COMPLETED
    disk = [r for r in caplog.records if r.name == "jobworker.engine" and "data disk" in r.message]
    failures = [r.getMessage() for r in disk if r.levelno == logging.WARNING]
    assert len(failures) == 2, failures  # one per kind of failure, not one per retry
    assert failures[0].startswith(f"data disk: [Errno 5] Input/output error: '{store_dir}';")
    assert RESERVE_NAME in failures[1]
    assert [r.getMessage() for r in disk if r.levelno == logging.INFO] == [
        "data disk: usable again"
    ]
