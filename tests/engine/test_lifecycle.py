"""Job lifecycle with real processes: statuses, exit codes, records, environment."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import trio

from jobworker.engine import JobManager, JobSpec, JobStatus, Limits, open_job_manager
from jobworker.engine.spec import JOB_PATH
from jobworker.errors import JobStartFailed

from .helpers import PY, py, read_all, sh, wait_ended


@pytest.mark.parametrize(
    ("spec", "status", "exit_code", "reason"),
    [
        (JobSpec("true"), JobStatus.COMPLETED, 0, "exited with status 0"),
        (sh("exit 3"), JobStatus.FAILED, 3, "exited with status 3"),
        (sh("kill -9 $$"), JobStatus.FAILED, 137, "killed by signal 9"),
        (sh("kill -TERM $$"), JobStatus.FAILED, 143, "killed by signal 15"),
    ],
    ids=["exit-0", "exit-3", "sigkill-137", "sigterm-143"],
)
async def test_end_status_and_exit_code(
    manager: JobManager,
    data_dir: Path,
    spec: JobSpec,
    status: JobStatus,
    exit_code: int,
    reason: str,
) -> None:
    created = await manager.create(spec)
    assert created.id == "1"
    record = await wait_ended(manager, "1")
    assert (record.status, record.exit_code, record.reason) == (status, exit_code, reason)
    assert record.end_time is not None
    assert record.start_time <= record.end_time
    # The end is persisted before the job counts as ended.
    await manager._jobs["1"].ended.wait()
    stored = json.loads((data_dir / "jobs" / "1" / "job.json").read_text())
    assert stored["status"] == status.value
    assert stored["exit_code"] == exit_code
    assert stored["reason"] == reason


async def test_create_returns_running_then_completes(manager: JobManager) -> None:
    record = await manager.create(sh("sleep 0.3"))
    assert record.status is JobStatus.RUNNING
    assert record.end_time is None
    assert record.exit_code is None
    assert record.limits == Limits(cpu_percent=100, memory_mb=512, io_bps=0)
    assert record.command == "sh"
    assert record.args == ("-c", "sleep 0.3")
    final = await wait_ended(manager, record.id)
    assert final.status is JobStatus.COMPLETED


async def test_ids_are_sequential_and_list_is_numeric(manager: JobManager) -> None:
    ids = [(await manager.create(JobSpec("true"))).id for _ in range(11)]
    assert ids == [str(n) for n in range(1, 12)]
    assert [r.id for r in manager.list()] == ids  # "10" after "9", not after "1"
    for job_id in ids:
        await wait_ended(manager, job_id)


async def test_environment_is_clean(
    manager: JobManager, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv("JOBWORKER_SECRET", "must-not-leak")
    await manager.create(JobSpec("env"))
    await wait_ended(manager, "1")
    lines = sorted((await read_all(manager, "1")).decode().splitlines())
    home = data_dir.resolve() / "jobs" / "1" / "work"  # the job's own work dir
    assert lines == sorted([f"HOME={home}", "LANG=C.UTF-8", f"PATH={JOB_PATH}"])


async def test_cwd_stdin_and_one_pipe_in_order(manager: JobManager, data_dir: Path) -> None:
    # cat must see EOF at once (stdin is /dev/null); stderr lands between stdout lines.
    await manager.create(sh("pwd; cat; echo out1; echo err >&2; echo out2"))
    assert (await wait_ended(manager, "1")).status is JobStatus.COMPLETED
    work = data_dir / "jobs" / "1" / "work"
    assert await read_all(manager, "1") == f"{work}\nout1\nerr\nout2\n".encode()
    assert work.is_dir()


async def test_job_has_its_own_session_and_group(manager: JobManager) -> None:
    code = "import os; print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid())"
    await manager.create(py(code))
    await wait_ended(manager, "1")
    assert await read_all(manager, "1") == b"True True\n"


async def test_command_resolved_with_the_jobs_path_not_the_servers(
    manager: JobManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "true"
    fake.write_text("#!/bin/sh\necho fake\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    await manager.create(JobSpec("true"))
    record = await wait_ended(manager, "1")
    assert (record.status, record.exit_code) == (JobStatus.COMPLETED, 0)
    assert await read_all(manager, "1") == b""


async def test_spawn_failure_is_recorded_and_raised(
    manager: JobManager, tmp_path: Path, data_dir: Path
) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fNOT-AN-ELF\x00\x01\x02")  # executable bit, no format the kernel knows
    bogus.chmod(bogus.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(JobStartFailed) as caught:
        await manager.create(JobSpec(str(bogus)))
    assert str(caught.value) == "job 1 could not start: Exec format error"
    record = manager.get("1")
    assert record.status is JobStatus.FAILED
    assert record.reason == "could not start: Exec format error"
    assert record.exit_code == 126
    assert json.loads((data_dir / "jobs" / "1" / "job.json").read_text())["status"] == "FAILED"
    assert (await manager.create(JobSpec("true"))).id == "2"


async def test_output_size_and_output_bytes(manager: JobManager) -> None:
    await manager.create(py("import sys; sys.stdout.write('x' * 100000)"))
    record = await wait_ended(manager, "1")
    assert record.output_bytes == 100000
    assert manager.output_size("1") == 100000
    assert (await read_all(manager, "1")) == b"x" * 100000


async def test_usage_is_recorded_even_without_cgroups(manager: JobManager) -> None:
    await manager.create(JobSpec("true"))
    record = await wait_ended(manager, "1")
    assert record.usage.oom_kills == 0


async def test_many_jobs_at_once(manager: JobManager) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(manager.create, py(f"print({n})"))
    records = manager.list()
    assert sorted(int(r.id) for r in records) == list(range(1, 21))
    outputs = set()
    for record in records:
        assert (await wait_ended(manager, record.id)).status is JobStatus.COMPLETED
        outputs.add(await read_all(manager, record.id))
    assert outputs == {f"{n}\n".encode() for n in range(20)}


async def test_interpreter_path_with_slash_is_used_as_given(data_dir: Path) -> None:
    async with open_job_manager(data_dir) as manager:
        await manager.create(JobSpec(PY, ("-c", "import sys; print(sys.executable)")))
        await wait_ended(manager, "1")
        out = (await read_all(manager, "1")).decode().strip()
        assert os.path.realpath(out) == os.path.realpath(PY)
