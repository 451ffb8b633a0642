"""Retention: the policy (which finished jobs are due, by age and by count, against a given
clock), and the manager's sweeper deleting them (never a running job, one log line per sweep,
a failed deletion tried again at the next sweep)."""

from __future__ import annotations

import datetime as dt
import errno
import logging
from pathlib import Path

import pytest

from jobworker.engine import JobManager, JobRecord, JobSpec, JobStatus, Limits, open_job_manager
from jobworker.engine.retention import (
    RetentionPolicy,
    describe_ids,
    format_duration,
    parse_duration,
)
from jobworker.engine.store import JobStore
from jobworker.errors import JobNotFound

from .helpers import sh, wait_ended, wait_until

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SWEEP_S = 0.02  # sweeps this often in these tests: the polls below see them at once


def finished(job_id: int, ended_s_after_t0: float | None) -> JobRecord:
    """A COMPLETED record that started at T0 and ended that many seconds later (None: a LOST
    record without an end)."""
    return JobRecord(
        id=str(job_id),
        command="/bin/true",
        args=(),
        limits=Limits(cpu_percent=100, memory_mb=512, io_bps=0, pids_max=1024),
        status=JobStatus.COMPLETED if ended_s_after_t0 is not None else JobStatus.LOST,
        start_time=T0,
        end_time=None if ended_s_after_t0 is None else T0 + dt.timedelta(seconds=ended_s_after_t0),
    )


def ids(records: list[JobRecord]) -> list[str]:
    return [record.id for record in records]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604_800), ("12h", 43_200), ("30m", 1800), ("90s", 90), ("90", 90), ("1.5", 1.5)],
)
def test_durations_in_each_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds  # what --print-config shows


@pytest.mark.parametrize("text", ["", "d", "7w", "-1h", "0", "inf", "nan"])
def test_bad_durations_are_refused_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("(", r"\(")):
        parse_duration(text)


def test_by_count_the_oldest_ids_beyond_the_newest_n_are_due() -> None:
    records = [finished(n, 10) for n in (1, 2, 4, 7, 9)]
    policy = RetentionPolicy(max_count=2)
    assert ids(policy.due(records, T0)) == ["1", "2", "4"]
    assert RetentionPolicy(max_count=5).due(records, T0) == []
    assert ids(RetentionPolicy(max_count=0).due(records, T0)) == ["1", "2", "4", "7", "9"]


def test_by_age_a_job_is_due_once_it_ended_longer_ago_than_the_limit() -> None:
    """A fake clock: ``now`` is given, so the boundary is exact."""
    records = [finished(1, 0), finished(2, 30), finished(3, 60)]
    policy = RetentionPolicy(max_age=60)
    at = [T0 + dt.timedelta(seconds=s) for s in (60, 60.001, 90.001, 120, 120.001)]
    assert [ids(policy.due(records, now)) for now in at] == [
        [],  # job 1 ended exactly 60 s ago: not yet more than the limit
        ["1"],
        ["1", "2"],
        ["1", "2"],
        ["1", "2", "3"],
    ]


def test_a_lost_job_without_an_end_ages_from_its_start() -> None:
    records = [finished(1, None)]
    assert ids(RetentionPolicy(max_age=10).due(records, T0 + dt.timedelta(seconds=11))) == ["1"]
    assert RetentionPolicy(max_age=10).due(records, T0 + dt.timedelta(seconds=9)) == []


def test_age_and_count_together_delete_what_either_says() -> None:
    records = [finished(1, 100), finished(2, 0), finished(3, 100), finished(4, 100)]
    policy = RetentionPolicy(max_age=60, max_count=3)
    # By count: 1; by age (now = T0 + 100 s): 2. Oldest first, once each.
    assert ids(policy.due(records, T0 + dt.timedelta(seconds=100))) == ["1", "2"]
    assert policy.describe() == "ended over 1m ago or beyond the newest 3"
    assert not RetentionPolicy().enabled
    assert RetentionPolicy().due(records, T0) == []


def test_deleted_ids_are_logged_as_ranges() -> None:
    assert describe_ids(["1", "2", "3", "7", "9", "10"]) == "1-3, 7, 9-10"
    many = [str(n) for n in range(1, 40, 2)]  # 20 lone ids
    assert describe_ids(many) == "1, 3, 5, 7, 9, 11, 13, 15, 17, 19, ..."


async def ended(manager: JobManager, spec: JobSpec) -> str:
    job_id = (await manager.create(spec)).id
    await wait_ended(manager, job_id)
    return job_id


def present(manager: JobManager) -> list[str]:
    return [record.id for record in manager.list()]


def on_disk(data_dir: Path) -> list[str]:
    """The job directories left in the data dir, in id order (a deletion in flight: gone)."""
    names = [path.name for path in (data_dir / "jobs").iterdir() if path.name.isdecimal()]
    return sorted(names, key=int)


async def test_the_sweeper_keeps_the_newest_finished_jobs_and_never_a_running_one(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.engine")
    policy = RetentionPolicy(max_count=2)
    async with open_job_manager(data_dir, retention=policy, retention_interval=SWEEP_S) as manager:
        running = (await manager.create(JobSpec("sleep", ("100",)))).id
        done = [await ended(manager, sh("echo hi")) for _ in range(5)]
        # Unknown from the first moment of the delete; the files go just after.
        await wait_until(lambda: on_disk(data_dir) == [running, *done[-2:]])
        assert present(manager) == [running, *done[-2:]]
        assert manager.get(running).status is JobStatus.RUNNING
        for job_id in done[:3]:
            with pytest.raises(JobNotFound, match=f"^job not found: {job_id}$"):
                manager.get(job_id)
            assert not (data_dir / "jobs" / job_id).exists()
        # Once it has ended, the formerly running job is the oldest finished one: it goes.
        await manager.stop(running)
        await wait_until(lambda: on_disk(data_dir) == done[-2:])
        assert present(manager) == done[-2:]
    lines = [r.message for r in caplog.records if r.message.startswith("retention: deleted")]
    assert lines, "no sweep logged what it deleted"
    assert all(line.endswith("; beyond the newest 2)") for line in lines)
    assert sum(int(line.split()[2]) for line in lines) == 4  # each deletion logged once
    assert not [r for r in caplog.records if r.message.endswith(" deleted")]  # no per-job line


async def test_a_deletion_the_disk_refuses_is_tried_again_at_the_next_sweep(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.engine")
    real_delete = JobStore.delete
    refusals: list[str] = []

    def delete(store: JobStore, job_id: str, next_id: int) -> bool:
        if not refusals:
            refusals.append(job_id)
            raise OSError(errno.EIO, "Input/output error")
        return real_delete(store, job_id, next_id)

    monkeypatch.setattr(JobStore, "delete", delete)
    policy = RetentionPolicy(max_count=0)
    async with open_job_manager(data_dir, retention=policy, retention_interval=SWEEP_S) as manager:
        job_id = await ended(manager, sh("echo hi"))
        await wait_until(lambda: on_disk(data_dir) == [])
        later = await ended(manager, sh("echo again"))  # the sweeper still runs
        await wait_until(lambda: on_disk(data_dir) == [])
    assert refusals == [job_id]
    messages = [r.message for r in caplog.records]
    assert f"job {job_id}: cannot delete it: Input/output error" in messages
    assert f"retention: deleted 1 finished jobs ({job_id}; beyond the newest 0)" in messages
    assert f"retention: deleted 1 finished jobs ({later}; beyond the newest 0)" in messages
    assert not (data_dir / "jobs" / job_id).exists()


async def test_finished_records_on_disk_are_swept_at_start(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobworker.engine")
    store = JobStore(data_dir)
    for number in range(1, 6):
        store.prepare(str(number))
        store.save(finished(number, 1), durable=False)
        store.output_path(str(number)).touch()
    policy = RetentionPolicy(max_age=3600)  # every record ended in 2026-01-01
    async with open_job_manager(data_dir, retention=policy, retention_interval=3600) as manager:
        await wait_until(lambda: on_disk(data_dir) == [])
        assert present(manager) == []
        new = (await manager.create(sh("true"))).id
    assert new == "6"  # ids of deleted jobs are never given again
    assert "retention: deleted 5 finished jobs (1-5; ended over 1h ago)" in [
        r.message for r in caplog.records
    ]
