"""The launcher, driven directly (no server): start failures as reports, exact exit statuses
through a PID namespace's init, orphans reaped, a killed launcher restarted, and a launcher
process kept small."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import jobworker
from jobworker.launch.launcher import (
    LaunchedProcess,
    Launcher,
    LauncherGone,
    LaunchFailed,
    open_launcher,
)
from jobworker.launch.request import Isolation, LaunchRequest
from tests.support import skip_unless

PID_NS = Isolation(pid=True, mount=True, cgroup=True)


@pytest.fixture
async def launcher() -> AsyncIterator[Launcher]:
    async with trio.open_nursery() as nursery, open_launcher(nursery) as running:
        yield running


def request(work: Path, *argv: str, **fields: object) -> LaunchRequest:
    return LaunchRequest(
        job_id=str(fields.pop("job_id", "1")),
        argv=list(argv),
        env={"PATH": "/usr/bin:/bin"},
        work_dir=str(work),
        **fields,  # type: ignore[arg-type]
    )


async def run(launcher: Launcher, req: LaunchRequest) -> tuple[bytes, int | None]:
    process = await launcher.spawn(req)
    return await drain(process), await process.wait()


async def drain(process: LaunchedProcess) -> bytes:
    data = b""
    while chunk := await process.stdout.receive_some(65536):
        data += chunk
    await process.stdout.aclose()
    return data


async def test_a_command_that_cannot_be_executed_is_reported_not_run(
    launcher: Launcher, tmp_path: Path
) -> None:
    with pytest.raises(LaunchFailed) as failed:
        await launcher.spawn(request(tmp_path, "/no/such/program"))
    assert (failed.value.stage, failed.value.errno) == ("exec", 2)


async def test_a_placement_that_fails_runs_nothing(launcher: Launcher, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    req = request(
        tmp_path, "/bin/touch", str(marker), procs_files=[str(tmp_path / "no" / "cgroup.procs")]
    )
    with pytest.raises(LaunchFailed) as failed:
        await launcher.spawn(req)
    assert failed.value.stage == "place"
    assert failed.value.strerror == "could not place the job in its cgroup"
    assert not marker.exists()


async def test_output_cwd_and_environment(launcher: Launcher, tmp_path: Path) -> None:
    out, code = await run(
        launcher, request(tmp_path, "/bin/sh", "-c", "pwd; echo $PATH; echo e >&2")
    )
    assert (out, code) == (f"{tmp_path}\n/usr/bin:/bin\ne\n".encode(), 0)


async def test_exit_statuses_pass_through_the_init_exactly(
    launcher: Launcher, tmp_path: Path
) -> None:
    skip_unless(os.geteuid() == 0, "namespaces need root")
    work = tmp_path / "work"
    work.mkdir()
    cases = {"exit 3": 3, "kill -TERM $$": -signal.SIGTERM, "kill -KILL $$": -signal.SIGKILL}
    for script, expected in cases.items():
        _, code = await run(launcher, request(work, "/bin/sh", "-c", script, isolation=PID_NS))
        assert code == expected, script
    out, _ = await run(
        launcher,
        request(work, "/bin/sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'", isolation=PID_NS),
    )
    pid, count = out.split()
    assert pid == b"2"  # the init is 1
    assert int(count) <= 4


async def test_signals_reach_the_command_through_its_group_and_sigkill_ends_the_namespace(
    launcher: Launcher, tmp_path: Path
) -> None:
    """A stop signals every process of the job (the group here; the cgroup in the server):
    the command gets it itself, and its exact status comes back through the init. SIGKILL
    to the init ends everything in the namespace."""
    skip_unless(os.geteuid() == 0, "namespaces need root")
    work = tmp_path / "work"
    work.mkdir()
    process = await launcher.spawn(
        request(work, "/bin/sh", "-c", "echo ready; exec sleep 100", isolation=PID_NS)
    )
    assert await process.stdout.receive_some(100) == b"ready\n"
    os.killpg(process.pid, signal.SIGTERM)  # the init leads the job's process group
    with trio.fail_after(5):
        assert await process.wait() == -signal.SIGTERM
    await drain(process)
    script = "sleep 300 & echo ready; wait"
    process = await launcher.spawn(request(work, "/bin/sh", "-c", script, isolation=PID_NS))
    assert await process.stdout.receive_some(100) == b"ready\n"
    os.kill(process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await process.wait() == -signal.SIGKILL
        assert await drain(process) == b""  # EOF: nothing of the namespace holds the pipe


async def test_orphans_of_a_job_are_reaped(launcher: Launcher, tmp_path: Path) -> None:
    out, code = await run(
        launcher, request(tmp_path, "/bin/sh", "-c", "(sleep 0.2 &); echo forked")
    )
    assert (out, code) == (b"forked\n", 0)
    assert launcher.pid is not None
    with trio.fail_after(5):
        while zombies_of(launcher.pid) or children_of(launcher.pid):
            await trio.sleep(0.05)


def children_of(parent: int) -> list[int]:
    return [pid for pid, state in _children(parent) if state != "Z"]


def zombies_of(parent: int) -> list[int]:
    return [pid for pid, state in _children(parent) if state == "Z"]


def _children(parent: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                data = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            fields = data[data.rfind(b")") + 2 :].split()
            if int(fields[1]) == parent:
                found.append((int(entry.name), fields[0].decode()))
    return found


async def test_a_killed_launcher_loses_its_jobs_and_comes_back(
    launcher: Launcher, tmp_path: Path
) -> None:
    process = await launcher.spawn(request(tmp_path, "/bin/sh", "-c", "echo up; exec sleep 100"))
    assert await process.stdout.receive_some(100) == b"up\n"
    assert launcher.pid is not None
    os.kill(launcher.pid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await process.wait() is None
    assert process.lost
    os.kill(process.pid, signal.SIGKILL)  # the test's own cleanup: no cgroup kills it here
    await drain(process)
    with trio.fail_after(10):
        out, code = await run(launcher, request(tmp_path, "/bin/echo", "again", job_id="2"))
    assert (out, code) == (b"again\n", 0)
    assert launcher.restarts == 1


def test_the_launcher_process_loads_no_heavy_module() -> None:
    """A fork costs in proportion to the launcher's memory: it must not grow by accident."""
    root = Path(jobworker.__file__).resolve().parent.parent
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); import jobworker.launch.process; "
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    heavy = {"json", "typing", "dataclasses", "selectors", "socket", "re", "subprocess", "trio"}
    assert loaded & heavy == set()
    assert len(loaded) < 80  # 58 today: the interpreter's own, signal, ctypes and ours


async def test_a_launcher_that_dies_with_requests_unread_fails_them_and_comes_back(
    launcher: Launcher, tmp_path: Path
) -> None:
    """Killed while requests wait in its socket (the peer then reads ECONNRESET, not EOF):
    every pending spawn fails as LauncherGone with nothing left open, and the launcher is
    started again."""
    assert launcher.pid is not None
    os.kill(launcher.pid, signal.SIGSTOP)  # the requests below stay unread
    fds_before = len(os.listdir("/proc/self/fd"))
    failures: list[BaseException] = []

    async def spawn(job_id: str) -> None:
        try:
            await launcher.spawn(request(tmp_path, "/bin/true", job_id=job_id))
        except LauncherGone as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for job_id in ("1", "2"):
            nursery.start_soon(spawn, job_id)
        with trio.fail_after(5):  # both requests registered and sent (the socket takes them)
            while len(launcher._spawns) < 2 or launcher._send_lock.locked():
                await trio.sleep(0.01)
        os.kill(launcher.pid, signal.SIGKILL)
    assert len(failures) == 2
    with trio.fail_after(10):
        out, code = await run(launcher, request(tmp_path, "/bin/echo", "back", job_id="3"))
    assert (out, code) == (b"back\n", 0)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.time_limit(60)
async def test_the_launcher_outlives_the_thread_that_started_it(
    launcher: Launcher, tmp_path: Path
) -> None:
    """trio starts processes from worker threads, which exit after an idle spell: a launcher
    tied to its parent thread's life (a parent-death signal) was killed then, with every job."""
    from trio._core._thread_cache import IDLE_TIMEOUT  # noqa: PLC0415 (trio's own bound)

    pid = launcher.pid
    await trio.sleep(IDLE_TIMEOUT + 2)  # waits out that idle timeout: not a synchronisation
    assert launcher.pid == pid
    assert launcher.restarts == 0
    out, _ = await run(launcher, request(tmp_path, "/bin/echo", "alive"))
    assert out == b"alive\n"
