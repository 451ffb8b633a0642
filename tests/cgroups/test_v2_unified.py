"""The v2 driver's kill, freeze and populated tracking on the real cgroup2 mount.

On our hybrid hosts ``/sys/fs/cgroup/unified`` has no controllers, but placement,
cgroup.kill, cgroup.freeze and cgroup.events are core cgroup2 features and work there.
"""

from __future__ import annotations

import os

import pytest
import trio

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import Limits
from jobworker.cgroups.v2 import V2Controller
from tests.support import pid_alive, placed_argv, proc_state

from .helpers import poll_until, spawn

pytestmark = pytest.mark.cgroups

TREE = r"""
setsid sh -c 'trap "" TERM; sleep 60' &
(trap "" TERM; sleep 60) &
setsid sleep 60 &
sleep 60 &
wait
"""


async def test_placement_populated_and_kill(unified: V2Controller) -> None:
    assert not unified.enforced
    cg = unified.create("1", Limits(io_bps=0))
    assert cg.is_empty()
    proc = await spawn(placed_argv(cg, ["/bin/sh", "-c", TREE]))
    await poll_until(lambda: len(cg.pids()) >= 5, 5, "five processes in the cgroup")
    assert proc.pid in cg.pids()
    assert cgfs.read_keyed(cg.directory / "cgroup.events")["populated"] == 1
    assert not cg.is_empty()
    pids = cg.pids()
    start = trio.current_time()
    await cg.kill(0.1)
    assert trio.current_time() - start < 1.0
    assert cg.is_empty()
    assert cgfs.read_keyed(cg.directory / "cgroup.events")["populated"] == 0
    assert not [pid for pid in pids if pid_alive(pid)]
    assert await proc.wait() in (-9, -15)
    await cg.remove()
    assert not cg.directory.exists()


async def test_freeze_thaw_and_kill_while_frozen(unified: V2Controller) -> None:
    cg = unified.create("2", Limits())
    # SIGTERM is ignored (inherited by the sleeps): only cgroup.kill can end them.
    ignoring = "trap '' TERM; sleep 60 & sleep 60 & wait"
    proc = await spawn(placed_argv(cg, ["/bin/sh", "-c", ignoring]))
    await poll_until(lambda: len(cg.pids()) >= 3, 5, "three processes")
    await cg.freeze(True)
    assert cgfs.read_keyed(cg.directory / "cgroup.events")["frozen"] == 1
    await cg.freeze(False)
    assert cgfs.read_keyed(cg.directory / "cgroup.events")["frozen"] == 0
    await cg.freeze(True)
    # Frozen and ignoring SIGTERM: the grace passes, then cgroup.kill ends them.
    await cg.kill(0.05)
    assert cg.is_empty()
    assert await proc.wait() == -9
    await cg.remove()
    assert not cg.directory.exists()


async def test_usage_reads_cpu_stat_without_controllers(unified: V2Controller) -> None:
    cg = unified.create("3", Limits())
    proc = await spawn(
        placed_argv(cg, ["/bin/sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
    )
    with trio.fail_after(20):
        assert await proc.wait() == 0
    usage = cg.usage()
    await cg.remove()
    assert usage.cpu_time_s is not None
    assert usage.cpu_time_s > 0.01
    assert usage.oom_kills == 0


async def test_sweep_removes_leftover_with_live_process(unified: V2Controller) -> None:
    old = unified.create("77", Limits())
    proc = await spawn(placed_argv(old, ["sleep", "60"]))
    await poll_until(lambda: proc.pid in old.pids(), 5, "leftover placed")
    assert await unified.sweep() == ["77"]
    assert await proc.wait() == -9
    assert proc_state(proc.pid) is None
    assert not old.directory.exists()
    assert os.path.isdir(unified.root)
