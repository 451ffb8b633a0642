"""Stop semantics with real processes: grace, SIGKILL, trees, concurrency, exact errors."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import trio

from jobworker.engine import JobManager, JobRecord, JobSpec, JobStatus, open_job_manager
from jobworker.errors import JobNotFound, JobNotRunning
from tests.support import pid_alive

from .helpers import py, read_all, sh, wait_ended, wait_output, wait_until

IGNORE_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1000)\n"
)
# A parent that dies on SIGTERM, with a child in its group that ignores it; both print pids.
TREE = (
    "import os, signal, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    print('child', os.getpid(), flush=True)\n"
    "    time.sleep(1000)\n"
    "    os._exit(0)\n"
    "print('parent', os.getpid(), flush=True)\n"
    "time.sleep(1000)\n"
)


async def test_stop_job_ignoring_sigterm_is_killed_after_grace(manager: JobManager) -> None:
    await manager.create(py(IGNORE_TERM))
    await wait_output(manager, "1", b"ready\n")
    started = time.monotonic()
    record = await manager.stop("1")
    took = time.monotonic() - started
    print(f"stop of a SIGTERM-ignoring job took {took * 1000:.1f} ms")
    assert (record.status, record.exit_code, record.reason) == (
        JobStatus.STOPPED,
        137,
        "stopped by request",
    )
    assert 0.1 <= took < 1.0
    assert record.end_time is not None


async def test_stop_returns_early_when_the_job_dies_on_sigterm(manager: JobManager) -> None:
    await manager.create(JobSpec("sleep", ("1000",)))
    started = time.monotonic()
    record = await manager.stop("1")
    took = time.monotonic() - started
    print(f"stop of a job dying on SIGTERM took {took * 1000:.1f} ms")
    assert (record.status, record.exit_code) == (JobStatus.STOPPED, 143)
    assert took < 0.1 + 0.5


async def test_stop_uses_the_configured_grace(data_dir: Path) -> None:
    async with open_job_manager(data_dir, stop_grace=0.5) as manager:
        await manager.create(py(IGNORE_TERM))
        await wait_output(manager, "1", b"ready\n")
        started = time.monotonic()
        record = await manager.stop("1")
        assert time.monotonic() - started >= 0.5
        assert record.exit_code == 137


async def test_stop_kills_a_tree_whose_child_ignores_sigterm(manager: JobManager) -> None:
    await manager.create(py(TREE))
    output = await wait_output(manager, "1", b"child ")
    output = await wait_output(manager, "1", b"parent ")
    pids = {line.split()[0]: int(line.split()[1]) for line in output.decode().splitlines()}
    assert pid_alive(pids["child"])
    assert pid_alive(pids["parent"])
    record = await manager.stop("1")
    assert record.status is JobStatus.STOPPED
    assert record.exit_code == 143  # the main process died on SIGTERM
    assert not pid_alive(pids["parent"])
    assert not pid_alive(pids["child"])  # killed after the grace, not left behind


async def test_exit_during_grace_is_still_stopped(manager: JobManager) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.03), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(1000)\n"
    )
    await manager.create(py(code))
    await wait_output(manager, "1", b"ready\n")
    record = await manager.stop("1")
    assert (record.status, record.exit_code, record.reason) == (
        JobStatus.STOPPED,
        0,
        "stopped by request",
    )


async def test_concurrent_stops_return_the_same_final_record(
    manager: JobManager, data_dir: Path
) -> None:
    await manager.create(py(IGNORE_TERM))
    await wait_output(manager, "1", b"ready\n")
    results: list[JobRecord] = []

    async def stop() -> None:
        results.append(await manager.stop("1"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(stop)
    assert len(results) == 5
    assert all(r == results[0] for r in results)
    assert results[0].status is JobStatus.STOPPED
    # Persisted by the time stop returned, and a later stop is refused with the spec's words.
    stored = json.loads((data_dir / "jobs" / "1" / "job.json").read_text())
    assert stored["status"] == "STOPPED"
    assert stored["exit_code"] == 137
    with pytest.raises(JobNotRunning) as caught:
        await manager.stop("1")
    assert str(caught.value) == "job is not running: 1 (current status: STOPPED)"


async def test_stop_of_a_finished_job_is_refused(manager: JobManager) -> None:
    await manager.create(JobSpec("true"))
    await wait_ended(manager, "1")
    with pytest.raises(JobNotRunning) as caught:
        await manager.stop("1")
    assert str(caught.value) == "job is not running: 1 (current status: COMPLETED)"
    assert manager.get("1").status is JobStatus.COMPLETED  # nothing rewrote it


async def test_unknown_id_everywhere(manager: JobManager) -> None:
    for call in (manager.get, manager.output_size):
        with pytest.raises(JobNotFound) as caught:
            call("999")
        assert str(caught.value) == "job not found: 999"
    with pytest.raises(JobNotFound) as caught:
        await manager.stop("999")
    assert str(caught.value) == "job not found: 999"
    with pytest.raises(JobNotFound) as caught:
        async with manager.follow("999"):
            pass
    assert str(caught.value) == "job not found: 999"


async def test_background_child_does_not_hang_the_job(manager: JobManager) -> None:
    # The background sleep holds the pipe open; the job must end with its main process.
    started = time.monotonic()
    await manager.create(sh("sleep 1000 & echo $!"))
    record = await wait_ended(manager, "1", timeout=5)
    assert time.monotonic() - started < 2.0
    assert (record.status, record.exit_code) == (JobStatus.COMPLETED, 0)
    background = int((await read_all(manager, "1")).decode())
    await wait_until(lambda: not pid_alive(background), timeout=2)


async def test_stop_while_output_flows_keeps_the_output(manager: JobManager) -> None:
    code = (
        "import sys, itertools\n"
        "for n in itertools.count():\n"
        "    sys.stdout.write(f'{n}\\n'); sys.stdout.flush()\n"
    )
    await manager.create(py(code))
    await wait_output(manager, "1", b"\n1000\n")
    await manager.stop("1")
    lines = (await read_all(manager, "1")).split(b"\n")
    assert lines[-1] == b"" or lines[-1].isdigit()  # the last line may be cut mid-way
    numbers = [int(x) for x in lines[:-1]]
    assert numbers == list(range(len(numbers)))  # contiguous: nothing lost or reordered
    assert len(numbers) > 1000


async def test_escaped_process_holding_the_pipe_does_not_hang_the_job(manager: JobManager) -> None:
    """Without cgroups a process that leaves the group (setsid) escapes the kill; the job
    still ends (we stop listening to the pipe after a bound) instead of hanging."""
    await manager.create(sh("setsid sleep 1000 & echo $!"))
    escaped = None
    try:
        output = await wait_output(manager, "1", b"\n")
        escaped = int(output)
        record = await wait_ended(manager, "1", timeout=5)
        assert (record.status, record.exit_code) == (JobStatus.COMPLETED, 0)
    finally:
        if escaped is not None and pid_alive(escaped):
            os.kill(escaped, signal.SIGKILL)
