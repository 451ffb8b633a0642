"""A job's time limit, the variables it adds to its environment and its working directory:
validation (exact messages, nothing started), what reaches the process, what is recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from jobworker.engine import JobManager, JobSpec, JobStatus, open_job_manager
from jobworker.engine.spec import (
    EXEC_ARGS_BUDGET,
    JOB_PATH,
    MAX_ENV_BYTES,
    applied_timeout,
    validate_spec,
)
from jobworker.engine.store import record_from_json, record_to_json
from jobworker.errors import CommandNotFound, InvalidJobSpec
from jobworker.launch.users import JobUsers

from .helpers import PY, read_all, wait_ended, wait_until

# The time a stop takes beyond the limit: the grace period, the kill, the reap. Generous:
# the test proves "promptly", not a latency.
STOP_SLACK_S = 5.0


# -- time limit ------------------------------------------------------------------------------


async def test_a_job_past_its_time_is_stopped_and_recorded_failed(manager: JobManager) -> None:
    started = trio.current_time()
    record = await manager.create(JobSpec("sleep", ("100",), timeout_seconds=1))
    assert record.timeout_s == 1
    ended = await wait_ended(manager, record.id, timeout=1 + STOP_SLACK_S)
    assert 1.0 <= trio.current_time() - started < 1 + STOP_SLACK_S
    assert ended.status is JobStatus.FAILED
    assert ended.reason == "timed out after 1 s"
    assert ended.exit_code == 143  # sleep dies of the stop path's SIGTERM


async def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(data_dir: Path) -> None:
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )
    async with open_job_manager(data_dir, stop_grace=0.2) as manager:
        record = await manager.create(JobSpec(PY, ("-c", code), timeout_seconds=1))
        ended = await wait_ended(manager, record.id, timeout=1 + STOP_SLACK_S)
        assert (ended.status, ended.reason, ended.exit_code) == (
            JobStatus.FAILED,
            "timed out after 1 s",
            137,
        )
        assert await read_all(manager, record.id) == b"ready\n"


async def test_a_stop_before_the_limit_is_a_stop_and_the_timer_goes_with_the_job(
    manager: JobManager,
) -> None:
    before = len(manager._nursery.child_tasks)
    record = await manager.create(JobSpec("sleep", ("100",), timeout_seconds=100))
    assert len(manager._nursery.child_tasks) == before + 1  # the job, its timer inside it
    stopped = await manager.stop(record.id)
    assert (stopped.status, stopped.reason) == (JobStatus.STOPPED, "stopped by request")
    quick = await manager.create(JobSpec("true", timeout_seconds=100))
    assert (await wait_ended(manager, quick.id)).status is JobStatus.COMPLETED
    # Nothing of either job is left running: no timer outlives its job.
    await wait_until(lambda: len(manager._nursery.child_tasks) == before)


async def test_the_servers_default_applies_to_a_job_that_asks_for_none(data_dir: Path) -> None:
    async with open_job_manager(data_dir, default_timeout=1, max_timeout=60) as manager:
        record = await manager.create(JobSpec("sleep", ("100",)))
        assert record.timeout_s == 1
        ended = await wait_ended(manager, record.id, timeout=1 + STOP_SLACK_S)
        assert (ended.status, ended.reason) == (JobStatus.FAILED, "timed out after 1 s")
        with pytest.raises(InvalidJobSpec) as caught:
            await manager.create(JobSpec("true", timeout_seconds=61))
        assert str(caught.value) == (
            "timeoutSeconds must be at most 60 (the server's --max-job-timeout), got 61"
        )
        assert [job.id for job in manager.list()] == [record.id]  # no id used


@pytest.mark.parametrize(
    ("requested", "default", "maximum", "applied"),
    [
        (0, None, None, 0),  # no limit unless the server sets one
        (5, None, None, 5),
        (0, 30, None, 30),
        (5, 30, None, 5),  # a job may ask for less (or more) than the default
        (0, None, 60, 60),  # without a default, the maximum: omitting it escapes nothing
        (0, 30, 60, 30),
        (60, 30, 60, 60),
    ],
)
def test_applied_timeout(
    requested: int, default: int | None, maximum: int | None, applied: int
) -> None:
    assert applied_timeout(requested, default=default, maximum=maximum) == applied


def test_a_negative_timeout_is_refused() -> None:
    with pytest.raises(InvalidJobSpec, match=r"^timeoutSeconds must not be negative, got -1$"):
        applied_timeout(-1, default=None, maximum=None)


# -- environment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"": "x"}, "env names must not be empty"),
        ({"A=B": "x"}, "env names must not contain '=': A=B"),
        ({"A\0B": "x"}, "env names must not contain NUL bytes"),
        ({"A": "x\0y"}, "env value of A must not contain NUL bytes"),
        ({"A": "\ud800"}, "env variable A must be valid text"),
        (
            {"BIG": "x" * (MAX_ENV_BYTES - 2)},
            "env must total at most 64 KiB (names and values), got 65537 bytes",
        ),
    ],
)
def test_bad_env_is_refused_saying_which(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        validate_spec(JobSpec("true", env=env))
    assert str(caught.value) == message


def test_env_at_the_limit_is_accepted_and_counts_toward_arg_max() -> None:
    validate_spec(JobSpec("true", env={"BIG": "x" * (MAX_ENV_BYTES - 3)}))
    # Arguments that fit on their own, but not with the environment beside them.
    args = ("x",) * ((EXEC_ARGS_BUDGET - 40_000) // 10)
    validate_spec(JobSpec("echo", args))
    with pytest.raises(InvalidJobSpec) as caught:
        validate_spec(JobSpec("echo", args, env={"BIG": "x" * (MAX_ENV_BYTES - 3)}))
    assert str(caught.value).startswith(
        "args and env exceed the kernel's limit for one exec (ARG_MAX): "
    )
    assert str(caught.value).endswith(
        f" bytes of arguments, environment, NULs and pointers, at most {EXEC_ARGS_BUDGET}"
    )


async def test_env_is_added_to_the_clean_environment(manager: JobManager, data_dir: Path) -> None:
    env = {"GREETING": "hello world", "EMPTY": "", "LANG": "C"}
    record = await manager.create(JobSpec("env", env=env))
    assert record.env == env
    assert (await wait_ended(manager, record.id)).status is JobStatus.COMPLETED
    output = (await read_all(manager, record.id)).decode()
    seen = dict(line.split("=", 1) for line in output.splitlines())
    assert {name: seen[name] for name in env} == env  # LANG overridden
    assert seen["PATH"] == JOB_PATH
    assert seen["HOME"] == str(data_dir / "jobs" / record.id / "work")
    assert set(seen) - {"GREETING", "EMPTY", "LANG", "PATH", "HOME"} == set()


async def test_a_path_of_the_clients_finds_the_command(manager: JobManager, tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    tool = tools / "hello-tool"
    tool.write_text('#!/bin/sh\necho "tool found; PATH=$PATH"\n')
    tool.chmod(0o755)
    with pytest.raises(CommandNotFound):
        await manager.create(JobSpec("hello-tool"))
    path = f"relative:{tools}"  # a relative entry is skipped, not looked up from the server
    record = await manager.create(JobSpec("hello-tool", env={"PATH": path}))
    await wait_ended(manager, record.id)
    assert await read_all(manager, record.id) == f"tool found; PATH={path}\n".encode()
    with pytest.raises(CommandNotFound, match=r"^command not found in PATH: sh$"):
        await manager.create(JobSpec("sh", env={"PATH": str(tools)}))


# -- working directory -----------------------------------------------------------------------


async def test_the_job_runs_in_the_working_dir_it_asked_for(
    manager: JobManager, tmp_path: Path, data_dir: Path
) -> None:
    record = await manager.create(
        JobSpec(
            PY,
            ("-c", "import os; print(os.getcwd(), os.environ['HOME'])"),
            working_dir=str(tmp_path),
        )
    )
    assert record.working_dir == str(tmp_path)
    await wait_ended(manager, record.id)
    home = data_dir / "jobs" / record.id / "work"
    assert await read_all(manager, record.id) == f"{tmp_path} {home}\n".encode()


async def test_bad_working_dirs_are_refused_saying_which(
    manager: JobManager, tmp_path: Path, data_dir: Path
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(data_dir)
    cases = {
        "w": "working directory must be an absolute path: w",
        str(tmp_path / "none"): f"working directory not found: {tmp_path / 'none'}",
        str(tmp_path / "file"): f"working directory is not a directory: {tmp_path / 'file'}",
        str(
            tmp_path / "file" / "x"
        ): f"working directory is not a directory: {tmp_path / 'file' / 'x'}",
        str(data_dir): f"working directory is hidden from jobs: {data_dir}",
        str(tmp_path / "link"): f"working directory is hidden from jobs: {tmp_path / 'link'}",
        str(data_dir / "jobs"): f"working directory is hidden from jobs: {data_dir / 'jobs'}",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidJobSpec) as caught:
            await manager.create(JobSpec("true", working_dir=path))
        assert str(caught.value) == message
    assert manager.list() == []  # nothing started, no id used


async def test_a_working_dir_the_job_user_cannot_enter_is_refused(
    data_dir: Path, tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    if os.stat(private).st_uid == 65534:
        pytest.skip("the test runs as the job user itself")
    users = JobUsers.from_settings("65534:65534")
    async with open_job_manager(data_dir, users=users) as manager:
        with pytest.raises(InvalidJobSpec) as caught:
            await manager.create(JobSpec("true", working_dir=str(private)))
    assert str(caught.value) == f"working directory is not usable by the job user: {private}"


# -- the record ------------------------------------------------------------------------------


async def test_the_options_are_recorded_and_survive_a_restart(
    data_dir: Path, tmp_path: Path
) -> None:
    spec = JobSpec("true", timeout_seconds=7, env={"A": "1"}, working_dir=str(tmp_path))
    async with open_job_manager(data_dir) as manager:
        record = await manager.create(spec)
        await wait_ended(manager, record.id)
    async with open_job_manager(data_dir) as manager:
        again = manager.get(record.id)
    assert (again.timeout_s, again.env, again.working_dir) == (7, {"A": "1"}, str(tmp_path))


def test_a_record_from_before_the_options_reads_as_none_of_them() -> None:
    stored_json = {
        "format": 1,
        "id": "3",
        "command": "true",
        "args": [],
        "limits": {"cpu_percent": 100, "memory_mb": 512, "io_bps": 0, "pids_max": 4096},
        "status": "COMPLETED",
        "start_time": "2026-01-01T00:00:00+00:00",
        "end_time": "2026-01-01T00:00:01+00:00",
        "exit_code": 0,
    }
    old = record_from_json(stored_json)
    assert (old.timeout_s, old.env, old.working_dir) == (0, {}, "")
    stored = record_to_json(old)
    assert (stored["timeout_s"], stored["env"], stored["working_dir"]) == (0, {}, "")
    with pytest.raises(TypeError):
        record_from_json({**stored_json, "env": {"A": 1}})
