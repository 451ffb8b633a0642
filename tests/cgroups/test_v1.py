"""The cgroup v1 driver against the real kernel: limits enforced, OOM seen, trees killed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import Limits
from jobworker.cgroups.v1 import V1Controller, V1JobCgroup
from jobworker.errors import LimitRefused
from tests.support import descendants, in_throttled_io, pid_alive, placed_argv, skip_unless

from .conftest import _v1_usable, v1_layout
from .helpers import TEST_ROOT, poll_until, spawn

pytestmark = pytest.mark.cgroups

ALLOC_200MB = [sys.executable, "-c", "x = bytearray(200 * 1024 * 1024); print('survived')"]
MIB = 1024 * 1024
MAX_CPU_SHARES = 262_144  # kernel maximum for cpu.shares


async def test_create_writes_limits_and_remove_cleans_up(v1: V1Controller) -> None:
    cg = v1.create("1", Limits(cpu_percent=30, memory_mb=64, io_bps=2_000_000, pids_max=77))
    dirs = {p.parent.parent.name: p for p in cg.paths}
    assert all(p.parent.name == TEST_ROOT and p.name == "1" for p in cg.paths)
    cpu = next(p for p in cg.paths if "/cpu/" in str(p))
    memory = next(p for p in cg.paths if "/memory/" in str(p))
    pids = next(p for p in cg.paths if "/pids/" in str(p))
    blkio = next(p for p in cg.paths if "/blkio/" in str(p))
    assert dirs  # one directory per hierarchy
    assert cgfs.read_int(cpu / "cpu.cfs_quota_us") == 30_000
    assert cgfs.read_int(cpu / "cpu.cfs_period_us") == 100_000
    assert cgfs.read_int(memory / "memory.limit_in_bytes") == 64 * MIB
    assert cgfs.read_int(memory / "memory.memsw.limit_in_bytes") == 64 * MIB
    assert cgfs.read_int(pids / "pids.max") == 77
    for device in v1.io_devices():
        for name in ("read_bps_device", "write_bps_device"):
            text = cgfs.read_text(blkio / f"blkio.throttle.{name}") or ""
            assert f"{device} 2000000" in text
    assert len(cg.paths) == 6
    await cg.remove()
    assert not any(p.exists() for p in cg.paths)
    await cg.remove()  # idempotent


async def test_refused_limit_names_it_and_leaves_nothing(v1: V1Controller) -> None:
    with pytest.raises(LimitRefused) as info:
        v1.create("2", Limits(cpu_percent=0))
    assert str(info.value) == "maxCPU: the kernel refused cpu.cfs_quota_us=0 (Invalid argument)"
    assert v1.existing_job_ids() == []


async def run_oom_job(v1: V1Controller, job_id: str, argv: list[str]) -> tuple[int, V1JobCgroup]:
    cg = v1.create(job_id, Limits(memory_mb=50))
    try:
        proc = await spawn(placed_argv(cg, argv), stdout=subprocess.DEVNULL)
        with trio.fail_after(10):
            await cg.wait_oom()
            status = await proc.wait()
        return status, cg
    finally:
        usage = cg.usage()
        await cg.kill(0)
        await cg.remove()
        assert usage.oom_kills >= 1


async def test_memory_limit_oom_kills_and_is_counted(v1: V1Controller) -> None:
    status, _cg = await run_oom_job(v1, "3", ALLOC_200MB)
    assert status == -9


async def test_shell_wrapper_does_not_hide_oom(v1: V1Controller) -> None:
    # v1 kills only the largest process: the wrapper survives and exits 0; the counter knows.
    wrapped = ["/bin/sh", "-c", '"$@"; exit 0', "wrapper", *ALLOC_200MB]
    status, _cg = await run_oom_job(v1, "4", wrapped)
    assert status == 0


async def test_usage_reports_peak_memory_and_cpu(v1: V1Controller) -> None:
    cg = v1.create("5", Limits(memory_mb=100))
    # Burn 0.3 s of CPU (not of wall time: the host may be busy).
    script = "import time\nx = bytearray(30 * 1024 * 1024)\nwhile time.process_time() < 0.3: pass"
    proc = await spawn(placed_argv(cg, [sys.executable, "-c", script]))
    with trio.fail_after(10):
        assert await proc.wait() == 0
    usage = cg.usage()
    await cg.remove()
    assert usage.oom_kills == 0
    assert usage.peak_memory_bytes is not None
    assert 30 * MIB <= usage.peak_memory_bytes <= 100 * MIB
    assert usage.cpu_time_s is not None
    assert 0.3 <= usage.cpu_time_s <= 3.0


async def test_wait_oom_stays_quiet_without_oom(v1: V1Controller) -> None:
    cg = v1.create("6", Limits(memory_mb=50))
    proc = await spawn(placed_argv(cg, ["true"]))
    await proc.wait()
    with trio.move_on_after(0.3) as scope:
        await cg.wait_oom()
    await cg.remove()
    assert scope.cancelled_caught


async def test_cpu_quota_50_and_25_percent(v1: V1Controller) -> None:
    """Both measured at once (the test's time is the window): from cpuacct, 3 s of wall."""
    window_s = 3.0
    # The quota is a ceiling; other busy processes on the host (a shared CI box) would pull
    # the jobs below it through fair sharing. Give the test subtree the maximum weight so
    # that what is measured is the quota.
    v1.ensure_roots()
    cpu_root = v1.hierarchies["cpu"].own_dir / v1.root_name
    cgfs.write_file(cpu_root / "cpu.shares", str(MAX_CPU_SHARES))
    busy = ["/bin/sh", "-c", "while :; do :; done"]
    results: dict[int, float] = {}

    async def measure(percent: int) -> None:
        cg = v1.create(f"cpu{percent}", Limits(cpu_percent=percent))
        proc = await spawn(placed_argv(cg, busy))
        try:
            usage_file = next(p for p in cg.paths if "/cpuacct/" in str(p)) / "cpuacct.usage"
            start_ns, start_t = cgfs.read_int(usage_file), trio.current_time()
            await trio.sleep(window_s)  # the measurement window itself, not synchronisation
            end_ns, end_t = cgfs.read_int(usage_file), trio.current_time()
            assert start_ns is not None
            assert end_ns is not None
            results[percent] = (end_ns - start_ns) / 1e9 / (end_t - start_t)
        finally:
            await cg.kill(0)
            await proc.wait()
            await cg.remove()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(measure, 50)
        nursery.start_soon(measure, 25)
    assert 0.45 <= results[50] <= 0.55, results
    assert 0.20 <= results[25] <= 0.30, results


async def timed_dd(v1: V1Controller, job_id: str, io_bps: int, argv: list[str]) -> float:
    cg = v1.create(job_id, Limits(io_bps=io_bps))
    try:
        start = trio.current_time()
        proc = await spawn(placed_argv(cg, argv), stderr=subprocess.DEVNULL)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        return trio.current_time() - start
    finally:
        await cg.kill(0)
        await cg.remove()


async def test_io_limit_throttles_direct_writes(v1: V1Controller, tmp_path: Path) -> None:
    skip_devices = v1.io_devices()
    assert skip_devices, "no block device found behind a writable filesystem"
    target = tmp_path / "dd.out"
    dd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=5", "oflag=direct"]
    unlimited = await timed_dd(v1, "io0", 0, dd)
    limited = await timed_dd(v1, "io1", 1024 * 1024, dd)
    assert 4.0 <= limited <= 6.0, limited
    assert unlimited < 1.0, unlimited


async def test_fork_bomb_is_held_at_pids_max_and_killed(v1: V1Controller) -> None:
    cg = v1.create("bomb", Limits(pids_max=50))
    pids_dir = next(p for p in cg.paths if "/pids/" in str(p))
    bomb = ["/bin/sh", "-c", "b() { b | b & }; b; wait"]
    proc = await spawn(placed_argv(cg, bomb), stderr=subprocess.DEVNULL)
    try:
        await poll_until(
            lambda: cgfs.read_keyed(pids_dir / "pids.events").get("max", 0) > 0, 10, "pids.max hit"
        )
        for _ in range(20):
            current = cgfs.read_int(pids_dir / "pids.current")
            assert current is not None
            assert current <= 50
            await trio.sleep(0.005)
        # The host is unaffected: we can still fork outside the cgroup.
        assert subprocess.run(["true"], check=False).returncode == 0
        start = trio.current_time()
        await cg.kill(0.1)
        assert trio.current_time() - start < 2.0
        assert cg.is_empty()
    finally:
        await cg.kill(0)
        await proc.wait()
        await cg.remove()
    assert not any(p.exists() for p in cg.paths)


def sessions(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            found.add(os.getsid(pid))
        except ProcessLookupError:
            continue
    return found


TREE = r"""
i=0
while [ $i -lt 25 ]; do
  if [ $i -lt 5 ]; then
    setsid sh -c 'trap "" TERM; sleep 60' &
  else
    setsid sleep 60 &
  fi
  if [ $i -lt 3 ]; then (trap "" TERM; sleep 60) & else sleep 60 & fi
  i=$((i + 1))
done
wait
"""


async def test_tree_kill_gets_setsid_and_term_ignoring_processes(v1: V1Controller) -> None:
    cg = v1.create("tree", Limits())
    proc = await spawn(placed_argv(cg, ["/bin/sh", "-c", TREE]))
    # 25 processes in sessions of their own plus the job's: killpg could reach only one.
    await poll_until(
        lambda: len(cg.pids()) >= 51 and len(sessions(cg.pids())) >= 26, 10, "the whole tree"
    )
    pids = cg.pids()
    start = trio.current_time()
    await cg.kill(0.1)
    elapsed = trio.current_time() - start
    assert cg.is_empty()
    assert not [pid for pid in pids if pid_alive(pid)]
    assert elapsed < 1.0, elapsed
    assert await proc.wait() in (-9, -15)
    await cg.remove()
    assert not any(p.exists() for p in cg.paths)


async def test_kill_returns_early_when_all_exit_on_sigterm(v1: V1Controller) -> None:
    cg = v1.create("term", Limits())
    proc = await spawn(placed_argv(cg, ["sleep", "60"]))
    await poll_until(lambda: len(cg.pids()) == 1, 5, "the process in its cgroup")
    start = trio.current_time()
    await cg.kill(5.0)
    assert trio.current_time() - start < 1.0
    assert await proc.wait() == -15
    await cg.remove()


async def test_placement_every_descendant_is_inside(v1: V1Controller) -> None:
    """A job that forks at once: its children must already be in all six cgroups."""
    forks = ["/bin/sh", "-c", "sleep 60 & sleep 60 & exec sleep 60"]
    for run in range(20):
        cg = v1.create(f"place{run}", Limits())
        proc = await spawn(placed_argv(cg, forks))
        try:
            await poll_until(lambda: len(descendants(proc.pid)) >= 2, 5, "two children")  # noqa: B023
            family = {proc.pid} | descendants(proc.pid)
            for pid in family:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                in_job = [ln for ln in lines if ln.endswith(f"/{TEST_ROOT}/place{run}")]
                assert len(in_job) == 6, (pid, lines)
            assert cg.pids() == family
        finally:
            await cg.kill(0)
            await proc.wait()
            await cg.remove()


async def test_sweep_kills_and_removes_leftovers(v1: V1Controller) -> None:
    # A "previous run": a cgroup with a live process, its owner gone.
    old = v1.create("41", Limits())
    leftover = subprocess.Popen(placed_argv(old, ["sleep", "60"]), start_new_session=True)
    try:
        await poll_until(lambda: leftover.pid in old.pids(), 5, "leftover in its cgroup")
        fresh = V1Controller(v1.hierarchies, root_name=v1.root_name)
        assert await fresh.sweep() == ["41"]
        assert leftover.wait(timeout=5) == -9
        assert not any(p.exists() for p in old.paths)
        assert fresh.existing_job_ids() == []
    finally:
        leftover.kill()
        leftover.wait()


async def test_instances_sweep_only_their_own_subtree() -> None:
    """Two servers on one host (one data dir each) have sibling subtrees under the shared
    root; a starting server's sweep must not touch the other's jobs."""
    skip_unless(_v1_usable(), "needs root and the cgroup v1 hierarchies")
    mine = V1Controller(v1_layout(), root_name=f"{TEST_ROOT}/mine")
    theirs = V1Controller(v1_layout(), root_name=f"{TEST_ROOT}/theirs")
    parent = V1Controller(v1_layout(), root_name=TEST_ROOT)
    try:
        mine.probe()
        theirs.probe()
        cg = theirs.create("1", Limits())
        proc = await trio.lowlevel.open_process(placed_argv(cg, ["sleep", "30"]))
        try:
            await poll_until(lambda: bool(cg.pids()), 5, "the job in its cgroup")
            assert await mine.sweep() == []
            assert proc.returncode is None
            assert cg.pids(), "the other server's sweep killed this job"
            assert await theirs.sweep() == ["1"]
            await proc.wait()
        finally:
            proc.kill()
            await proc.wait()
    finally:
        with trio.move_on_after(10, shield=True):
            for ctl in (mine, theirs):
                await ctl.sweep()
                await ctl.remove_roots()
            await parent.remove_roots()


async def test_kill_lifts_the_io_throttle_so_a_process_in_throttled_io_dies(
    v1: V1Controller, tmp_path: Path
) -> None:
    """Direct IO waiting in the throttle holds its process in D state, deaf to SIGKILL, until
    the IO is dispatched (a minute at this limit): kill() sets the throttle to unlimited
    first, so the process dies at once."""
    cg = v1.create("9", Limits(io_bps=1024))
    dd = ["dd", "if=/dev/zero", f"of={tmp_path / 'f'}", "bs=64k", "count=1", "oflag=direct"]
    proc = await spawn(placed_argv(cg, dd), stderr=subprocess.DEVNULL)
    try:
        await poll_until(lambda: in_throttled_io(proc.pid, b"dd"), 5, "dd held by the throttle")
        with trio.fail_after(3):  # a bound on correctness: without the lift, over ten seconds
            assert await cg.kill(0)
            await proc.wait()
        assert not pid_alive(proc.pid)
        blkio = next(p for p in cg.paths if "/blkio/" in str(p))
        for name in ("read_bps_device", "write_bps_device"):
            assert (cgfs.read_text(blkio / f"blkio.throttle.{name}") or "").strip() == ""
    finally:
        cg.lift_io_limits()
        await cg.kill(0)
        await cg.remove()


async def test_sweep_removes_empty_subtrees_of_other_instances_only() -> None:
    """Servers' subtrees are siblings (``jobworker/<instance>``). A server killed during its
    start leaves its empty subtree behind: the next start of any server removes it, while a
    sibling with a job below it (another server's running job) is left alone."""
    skip_unless(_v1_usable(), "needs root and the cgroup v1 hierarchies")
    ours = V1Controller(v1_layout(), root_name=f"{TEST_ROOT}/ours")
    busy = V1Controller(v1_layout(), root_name=f"{TEST_ROOT}/busy")
    killed = V1Controller(v1_layout(), root_name=f"{TEST_ROOT}/killed")
    try:
        for controller in (ours, busy, killed):
            controller.probe()
        running = busy.create("1", Limits())
        assert await ours.sweep() == []
        assert not any(root.exists() for root in killed.roots())
        assert all(p.is_dir() for p in running.paths)
        assert all(root.is_dir() for root in ours.roots())
        # The busy server, once its job is gone and its subtree swept, makes it again.
        await running.remove()
        assert ours.remove_empty_siblings() == 1
        assert not any(root.exists() for root in busy.roots())
        again = busy.create("2", Limits())
        assert all(p.is_dir() for p in again.paths)
        await again.remove()
    finally:
        for controller in (ours, busy, killed):
            await controller.sweep()
            await controller.remove_roots()
        await cgfs.remove_dirs(dict.fromkeys(root.parent for root in ours.roots()))
