"""The no-cgroup driver: process-group kill with grace, early return, zombies count as gone."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import trio
import trio.testing

from jobworker.cgroups.base import JobCgroup, Limits, ResourceController, Usage
from jobworker.cgroups.null import NullCgroup, NullController, live_group_members
from tests.support import pid_alive, placed_argv

from .helpers import PY, wait_until

IGNORE_TERM_CHILDREN = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(1000)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1000)\n"
)


def spawn(argv: list[str], cgroup: NullCgroup) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        placed_argv(cgroup, argv), stdout=subprocess.PIPE, start_new_session=True
    )
    cgroup.attach(process.pid)
    return process


def test_controller_shape() -> None:
    controller: ResourceController = NullController()
    assert controller.enforced is False
    assert "no cgroups" in controller.description
    cgroup: JobCgroup = controller.create("1", Limits())
    assert cgroup.procs_files() == []
    assert cgroup.usage() == Usage()
    assert cgroup.oom_kills() == 0


async def test_sweep_and_remove_are_no_ops() -> None:
    controller = NullController()
    assert await controller.sweep() == []
    cgroup = controller.create("1", Limits())
    await cgroup.remove()
    await cgroup.kill(0.1)  # never attached: nothing to do, no error


async def test_wait_oom_never_returns(autojump_clock: trio.testing.MockClock) -> None:
    cgroup = NullController().create("1", Limits())
    with trio.move_on_after(3600) as scope:
        await cgroup.wait_oom()
    assert scope.cancelled_caught


async def test_kill_returns_early_when_the_group_dies_on_sigterm() -> None:
    cgroup = NullCgroup("1")
    process = spawn(["sleep", "1000"], cgroup)
    started = time.monotonic()
    await cgroup.kill(5.0)
    took = time.monotonic() - started
    assert took < 1.0  # nowhere near the 5 s grace
    assert process.wait(timeout=5) == -signal.SIGTERM
    assert live_group_members(process.pid) == []


async def test_kill_sigkills_the_whole_group_after_grace() -> None:
    cgroup = NullCgroup("1")
    process = spawn([PY, "-c", IGNORE_TERM_CHILDREN], cgroup)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"

    members = live_group_members(process.pid)
    assert len(members) == 4
    started = time.monotonic()
    await cgroup.kill(0.2)
    took = time.monotonic() - started
    assert 0.2 <= took < 1.5
    assert process.wait(timeout=5) == -signal.SIGKILL
    await wait_until(lambda: not any(pid_alive(pid) for pid in members))
    assert live_group_members(process.pid) == []


async def test_kill_without_grace_sends_no_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: open({str(marker)!r}, 'w').close())\n"
        "print('ready', flush=True)\n"
        "time.sleep(1000)\n"
    )
    cgroup = NullCgroup("1")
    process = spawn([PY, "-c", code], cgroup)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    await cgroup.kill(0)
    assert process.wait(timeout=5) == -signal.SIGKILL
    assert not marker.exists()


async def test_a_zombie_counts_as_gone() -> None:
    cgroup = NullCgroup("1")
    process = spawn(["true"], cgroup)
    await wait_until(lambda: not pid_alive(process.pid))  # exited, not yet reaped
    assert live_group_members(process.pid) == []
    started = time.monotonic()
    await cgroup.kill(5.0)
    assert time.monotonic() - started < 1.0
    assert process.wait(timeout=5) == 0
