"""The output cap: the first N bytes kept, one marker line, the job running on, the reason
saying so, and what the job wrote counted apart from what was kept (also after a restart)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from jobworker.engine import JobRecord, JobStatus, Limits, open_job_manager
from jobworker.engine.output import truncated_marker
from jobworker.engine.store import record_from_json, record_to_json

from .helpers import py, read_all, wait_ended, wait_until

CAP = 1000
# Writes its output in chunks of the given sizes (each flushed: separate pipe writes),
# then exits with status 3: it ran to its end.
WRITER = (
    "import os, sys\n"
    "for size in map(int, sys.argv[1:]):\n"
    "    os.write(1, b'x' * size)\n"
    "sys.exit(3)\n"
)


async def test_output_past_the_cap_is_discarded_after_one_marker(data_dir: Path) -> None:
    async with open_job_manager(data_dir, max_output_bytes=CAP) as manager:
        job_id = (await manager.create(py(WRITER, "600", "300", "500", "100000"))).id
        record = await wait_ended(manager, job_id)
        output = await read_all(manager, job_id)
    assert output == b"x" * CAP + truncated_marker(CAP)
    assert truncated_marker(CAP) == b"\n[jobworker: output truncated at 1000 bytes]\n"
    assert (record.status, record.exit_code) == (JobStatus.FAILED, 3)  # it ran to its end
    assert record.reason == "exited with status 3; output truncated at 1000 bytes"
    assert record.written_bytes == 600 + 300 + 500 + 100000
    assert record.output_bytes == len(output)
    assert (data_dir / "jobs" / job_id / "output.log").read_bytes() == output
    # Persisted: a restarted manager reports the same counts and the same output.
    async with open_job_manager(data_dir) as again:
        loaded = again.get(job_id)
        assert (loaded.written_bytes, loaded.output_bytes) == (101400, len(output))
        assert loaded.reason == record.reason
        assert await read_all(again, job_id) == output


async def test_exactly_the_cap_is_not_truncated(data_dir: Path) -> None:
    async with open_job_manager(data_dir, max_output_bytes=CAP) as manager:
        job_id = (await manager.create(py(WRITER, "400", "600"))).id
        record = await wait_ended(manager, job_id)
        assert await read_all(manager, job_id) == b"x" * CAP
    assert record.reason == "exited with status 3"
    assert record.written_bytes == record.output_bytes == CAP


async def test_a_live_reader_sees_the_kept_bytes_then_the_marker_while_the_job_runs(
    data_dir: Path,
) -> None:
    code = "import os, time\nos.write(1, b'y' * 5000)\ntime.sleep(100)\n"
    async with open_job_manager(data_dir, max_output_bytes=CAP) as manager:
        job_id = (await manager.create(py(code))).id
        expected = b"y" * CAP + truncated_marker(CAP)
        await wait_until(lambda: manager.output_size(job_id) == len(expected))
        running = manager.get(job_id)
        assert running.status is JobStatus.RUNNING  # the cap does not stop it
        assert running.reason == "output truncated at 1000 bytes"
        assert running.written_bytes == 5000
        async with manager.follow(job_id, snapshot=True) as reader:
            assert b"".join([chunk async for chunk in reader]) == expected
        stopped = await manager.stop(job_id)
    assert stopped.reason == "stopped by request; output truncated at 1000 bytes"


async def test_without_a_cap_everything_is_kept(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        job_id = (await manager.create(py(WRITER, "300000"))).id
        record = await wait_ended(manager, job_id)
        assert await read_all(manager, job_id) == b"x" * 300000
    assert record.written_bytes == record.output_bytes == 300000
    assert record.reason == "exited with status 3"


def test_a_record_from_before_the_cap_wrote_what_its_log_holds() -> None:
    record = JobRecord(
        id="1",
        command="/bin/true",
        args=(),
        limits=Limits(cpu_percent=100, memory_mb=512, io_bps=0, pids_max=1024),
        status=JobStatus.COMPLETED,
        start_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        output_bytes=42,
        written_bytes=50,
    )
    data = record_to_json(record)
    assert record_from_json(data).written_bytes == 50
    del data["written_bytes"]
    assert record_from_json(data).written_bytes == 42
