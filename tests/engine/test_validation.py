"""Spec validation: exact messages, defaults, and nothing consumed or written on refusal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.cgroups.base import Limits
from jobworker.cgroups.null import NullCgroup, NullController
from jobworker.engine import JobManager, JobSpec, open_job_manager
from jobworker.engine.spec import (
    EXEC_ARGS_BUDGET,
    MAX_ARG_STRLEN,
    MAX_ARGS_BYTES,
    host_memory_mb,
    resolve_command,
    validate_spec,
)
from jobworker.errors import (
    CommandNotExecutable,
    CommandNotFound,
    InvalidJobSpec,
    LimitRefused,
)

from .helpers import wait_ended

CPU_MAX = 100 * (os.cpu_count() or 1)
CPU_RULE = f"maxCPU must be between 0 and {CPU_MAX} (percent of one core; 0: the default, 100)"
LONGEST_ARG = "x" * (MAX_ARG_STRLEN - 1)  # its NUL makes the kernel's limit exactly
# as many one-byte arguments as could fit by their pointers and NULs alone (but do not)
MOST_ARGS = EXEC_ARGS_BUDGET // 9
HOST_MB = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec("true", max_cpu=-1), f"{CPU_RULE}, got -1"),
        (JobSpec("true", max_cpu=CPU_MAX + 1), f"{CPU_RULE}, got {CPU_MAX + 1}"),
        (JobSpec("true", max_memory=-5), "maxMemory must not be negative, got -5"),
        (JobSpec("true", max_memory=2), "maxMemory must be at least 4 MB, got 2"),
        (
            JobSpec("true", max_memory=2**31 - 1),
            f"maxMemory must be at most the host's memory ({HOST_MB} MB), got 2147483647",
        ),
        (
            JobSpec("echo", ("ok", "x" * MAX_ARG_STRLEN)),
            f"argument 2 is longer than the kernel allows for one argument (MAX_ARG_STRLEN:"
            f" {MAX_ARG_STRLEN - 1} bytes), got {MAX_ARG_STRLEN} bytes",
        ),
        (
            JobSpec("echo", ("x",) * 300_000),
            "args exceed the kernel's limit for one exec (ARG_MAX): 300000 arguments take at"
            f" least 9 bytes each, at most {EXEC_ARGS_BUDGET} in all",
        ),
        (
            JobSpec("echo", ("x",) * MOST_ARGS),
            "args exceed the kernel's limit for one exec (ARG_MAX):"
            f" {len('echo') + 1 + MOST_ARGS * 2 + 8 * (MOST_ARGS + 2)} bytes of"
            f" arguments, NULs and pointers, at most {EXEC_ARGS_BUDGET}",
        ),
        (JobSpec("true", max_iobps=-1), "maxIOBPS must not be negative, got -1"),
        (JobSpec(""), "command must not be empty"),
        (JobSpec("tr\0ue"), "command must not contain NUL bytes"),
        (JobSpec("echo", ("ok", "b\0ad")), "args must not contain NUL bytes (argument 2)"),
        (
            JobSpec("echo", (LONGEST_ARG,) * 7 + ("é" * 65535, "é" * 5)),
            f"args must total at most 1 MiB, got {7 * len(LONGEST_ARG) + 131080} bytes",
        ),
        (JobSpec("no-such-command-xyz"), "command not found in PATH: no-such-command-xyz"),
        (JobSpec("/nonexistent/tool"), "no such file: /nonexistent/tool"),
        (JobSpec("/etc/passwd/tool"), "no such file: /etc/passwd/tool"),
        (
            JobSpec("./w/x"),
            "relative command paths are not allowed: ./w/x (give an absolute path,"
            " or a bare name to look up in the job's PATH)",
        ),
        (JobSpec("/etc/passwd"), "command is not executable: /etc/passwd (permission denied)"),
        (JobSpec("/tmp"), "command is not executable: /tmp (is a directory)"),
        (JobSpec("x" * 5000), "command must be at most 4096 bytes, got 5000"),
    ],
    ids=[
        "cpu-negative",
        "cpu-too-high",
        "memory-negative",
        "memory-too-low",
        "memory-above-host",
        "arg-too-long",
        "args-too-many",
        "args-over-arg-max",
        "io-negative",
        "command-empty",
        "command-nul",
        "arg-nul",
        "args-too-long-utf8",
        "not-found",
        "no-such-file",
        "not-a-directory",
        "relative",
        "not-executable",
        "directory",
        "command-too-long",
    ],
)
async def test_invalid_spec_is_refused_and_consumes_nothing(
    manager: JobManager, data_dir: Path, spec: JobSpec, message: str
) -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        await manager.create(spec)
    assert str(caught.value) == message
    assert manager.list() == []
    assert not (data_dir / "jobs").exists() or not any((data_dir / "jobs").iterdir())
    assert (await manager.create(JobSpec("true"))).id == "1"
    await wait_ended(manager, "1")


async def test_a_symlink_loop_is_named_as_such(manager: JobManager, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(InvalidJobSpec) as caught:
        await manager.create(JobSpec(str(loop)))
    assert str(caught.value) == f"too many levels of symbolic links: {loop}"
    assert manager.list() == []


def test_host_memory_is_the_physical_memory() -> None:
    meminfo = Path("/proc/meminfo").read_text()
    kib = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal")))
    assert abs(host_memory_mb() - kib // 1024) <= 1  # MemTotal, rounded to whole pages


def test_exec_budget_is_arg_max_less_a_reserve() -> None:
    arg_max = min(os.sysconf("SC_ARG_MAX"), 6 * 2**20)
    assert 0 < EXEC_ARGS_BUDGET < arg_max
    assert arg_max - EXEC_ARGS_BUDGET <= 64 * 1024  # a reserve, not a different limit


def test_error_classes() -> None:
    with pytest.raises(CommandNotFound):
        resolve_command("no-such-command-xyz")
    with pytest.raises(CommandNotExecutable):
        resolve_command("/etc/passwd")


def test_defaults_and_boundaries() -> None:
    assert validate_spec(JobSpec("true")) == Limits(cpu_percent=100, memory_mb=512, io_bps=0)
    explicit = JobSpec("true", (), max_cpu=50, max_memory=4, max_iobps=1000)
    assert validate_spec(explicit) == Limits(cpu_percent=50, memory_mb=4, io_bps=1000)
    assert validate_spec(JobSpec("true", max_cpu=CPU_MAX)).cpu_percent == CPU_MAX
    assert validate_spec(JobSpec("true", max_cpu=0)).cpu_percent == 100
    assert validate_spec(JobSpec("true", max_memory=HOST_MB)).memory_mb == HOST_MB
    assert validate_spec(JobSpec("echo", (LONGEST_ARG,) * 8)).cpu_percent == 100
    assert 8 * len(LONGEST_ARG) <= MAX_ARGS_BYTES
    assert validate_spec(JobSpec("true"), pids_max=77).pids_max == 77


def test_resolution_follows_execvp(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "tool").write_text("#!/bin/sh\n")  # found first but not executable: skipped
    (second / "tool").write_text("#!/bin/sh\n")
    (second / "tool").chmod(0o755)
    assert resolve_command("tool", f"{first}:{second}") == str(second / "tool")
    with pytest.raises(CommandNotExecutable) as caught:
        resolve_command("tool", str(first))
    assert str(caught.value) == f"command is not executable: {first / 'tool'} (permission denied)"
    assert resolve_command("sh") in ("/usr/bin/sh", "/bin/sh")


class RefusingController(NullController):
    """Refuses any memory limit above 1000 MB, like a kernel refusing a value."""

    def create(self, job_id: str, limits: Limits) -> NullCgroup:
        if limits.memory_mb > 1000:
            raise LimitRefused(
                "maxMemory: the kernel refused memory.limit_in_bytes=... (Invalid argument)"
            )
        return super().create(job_id, limits)


async def test_refused_limit_consumes_no_id(data_dir: Path) -> None:
    async with open_job_manager(data_dir, controller=RefusingController()) as manager:
        with pytest.raises(LimitRefused) as caught:
            await manager.create(JobSpec("true", max_memory=2000))
        assert str(caught.value).startswith("maxMemory: the kernel refused")
        assert manager.list() == []
        assert (await manager.create(JobSpec("true"))).id == "1"
        await wait_ended(manager, "1")
