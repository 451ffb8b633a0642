"""The v2 driver against a fake cgroupfs (a plain directory tree): exactly what it writes,
and how it parses what the kernel would show. No root needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from jobworker.cgroups import cgfs
from jobworker.cgroups.base import Limits, Usage
from jobworker.cgroups.layout import Hierarchy
from jobworker.cgroups.v2 import SERVER_LEAF, V2Controller
from jobworker.errors import LimitRefused

MIB = 1024 * 1024
FAKE_SERVER_PIDS = ["4242", "4243"]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every cgfs.write_file call as (path relative to the fake mount, value), in order."""
    log: list[tuple[str, str]] = []
    real = cgfs.write_file

    def recording(path: Path, value: str) -> None:
        log.append((str(path), value))
        real(path, value)

    monkeypatch.setattr(cgfs, "write_file", recording)
    return log


@pytest.fixture
def fake_mount(tmp_path: Path) -> Path:
    mount = tmp_path / "cgroup"
    own = mount / "system.slice" / "jobworker.service"
    own.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.procs").write_text("\n".join(FAKE_SERVER_PIDS) + "\n")
    return mount


def relative(writes: list[tuple[str, str]], mount: Path) -> list[tuple[str, str]]:
    return [(str(Path(p).relative_to(mount)), v) for p, v in writes]


def controller(mount: Path, own: str = "/system.slice/jobworker.service") -> V2Controller:
    return V2Controller(
        Hierarchy(frozenset(), mount, own), root_name="jobworker", io_devices=["254:0", "8:16"]
    )


def test_setup_moves_server_into_leaf_then_enables_controllers(
    fake_mount: Path, writes: list[tuple[str, str]]
) -> None:
    ctl = controller(fake_mount)
    assert ctl.controllers == {"cpu", "io", "memory", "pids"}  # cpuset is never used
    ctl.setup()
    svc = "system.slice/jobworker.service"
    assert relative(writes, fake_mount) == [
        (f"{svc}/{SERVER_LEAF}/cgroup.procs", "4242"),
        (f"{svc}/{SERVER_LEAF}/cgroup.procs", "4243"),
        (f"{svc}/cgroup.subtree_control", "+cpu +io +memory +pids"),
        (f"{svc}/jobworker/cgroup.subtree_control", "+cpu +io +memory +pids"),
    ]
    assert ctl.enforced


def test_restart_inside_the_leaf_uses_its_parent(fake_mount: Path) -> None:
    ctl = controller(fake_mount, f"/system.slice/jobworker.service/{SERVER_LEAF}")
    assert ctl.root == fake_mount / "system.slice" / "jobworker.service" / "jobworker"


def test_tree_root_needs_no_leaf(fake_mount: Path, writes: list[tuple[str, str]]) -> None:
    ctl = controller(fake_mount, "/")
    ctl.setup()
    assert relative(writes, fake_mount) == [
        ("cgroup.subtree_control", "+cpu +io +memory +pids"),
        ("jobworker/cgroup.subtree_control", "+cpu +io +memory +pids"),
    ]


def test_create_writes_each_limit(fake_mount: Path, writes: list[tuple[str, str]]) -> None:
    ctl = controller(fake_mount)
    ctl.setup()
    writes.clear()
    cg = ctl.create("7", Limits(cpu_percent=50, memory_mb=64, io_bps=1_048_576, pids_max=100))
    job = "system.slice/jobworker.service/jobworker/7"
    assert relative(writes, fake_mount) == [
        (f"{job}/cpu.max", "50000 100000"),
        (f"{job}/memory.max", str(64 * MIB)),
        (f"{job}/memory.swap.max", "0"),
        (f"{job}/memory.oom.group", "1"),
        (f"{job}/pids.max", "100"),
        (f"{job}/io.max", "254:0 rbps=1048576 wbps=1048576"),
        (f"{job}/io.max", "8:16 rbps=1048576 wbps=1048576"),
    ]
    assert cg.procs_files() == [fake_mount / job / "cgroup.procs"]


def test_server_pids_max_overrides_limits(fake_mount: Path, writes: list[tuple[str, str]]) -> None:
    ctl = V2Controller(Hierarchy(frozenset(), fake_mount, "/"), root_name="jobworker", pids_max=64)
    ctl.setup()
    ctl.create("1", Limits(pids_max=4096))
    assert ("pids.max", "64") in [(Path(p).name, v) for p, v in writes]


def test_no_io_controller_refuses_io_limit(fake_mount: Path) -> None:
    ctl = V2Controller(
        Hierarchy(frozenset(), fake_mount, "/"), root_name="jobworker", controllers=["memory"]
    )
    ctl.setup()
    with pytest.raises(LimitRefused, match=r"^maxIOBPS: the io controller is not available"):
        ctl.create("1", Limits(io_bps=1000))


def test_parses_memory_events_cgroup_events_and_cpu_stat(fake_mount: Path) -> None:
    ctl = controller(fake_mount)
    ctl.setup()
    cg = ctl.create("9", Limits())
    job = cg.directory
    (job / "memory.events").write_text(
        "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n"
    )
    (job / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (job / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 0\n"
    )
    (job / "memory.peak").write_text("52428800\n")
    assert cg.oom_kills() == 1
    assert not cg.is_empty()
    assert cg.usage() == Usage(cpu_time_s=1.5, peak_memory_bytes=52428800, oom_kills=1)
    (job / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert cg.is_empty()


async def test_wait_oom_wakes_on_memory_events_change(fake_mount: Path) -> None:
    ctl = controller(fake_mount)
    ctl.setup()
    cg = ctl.create("10", Limits())
    events = cg.directory / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    woke = trio.Event()

    async def watcher() -> None:
        await cg.wait_oom()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        await trio.testing.wait_all_tasks_blocked()
        events.write_text("oom 0\nhigh 3\noom_kill 0\n")  # a change that is not an OOM
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        events.write_text("oom 1\noom_kill 1\n")
        with trio.fail_after(5):
            await woke.wait()


def test_nested_root_enables_controllers_at_every_level(
    fake_mount: Path, writes: list[tuple[str, str]]
) -> None:
    """One subtree per server instance ("jobworker/<instance>"): controllers reach it."""
    ctl = V2Controller(Hierarchy(frozenset(), fake_mount, "/"), root_name="jobworker/abc123")
    ctl.setup()
    assert relative(writes, fake_mount) == [
        ("cgroup.subtree_control", "+cpu +io +memory +pids"),
        ("jobworker/cgroup.subtree_control", "+cpu +io +memory +pids"),
        ("jobworker/abc123/cgroup.subtree_control", "+cpu +io +memory +pids"),
    ]
    assert ctl.root == fake_mount / "jobworker" / "abc123"


async def test_a_kill_round_lifts_io_max_before_cgroup_kill(
    fake_mount: Path, writes: list[tuple[str, str]]
) -> None:
    """A process in throttled IO cannot die until its IO is dispatched: every kill round sets
    io.max to unlimited on each device the job is limited on, then writes cgroup.kill."""
    ctl = controller(fake_mount, own="/")
    ctl.setup()
    cg = ctl.create("1", Limits(io_bps=1000))
    limited = "rbps=1000 wbps=1000 riops=max wiops=max"
    (cg.directory / "io.max").write_text(f"254:0 {limited}\n8:16 {limited}\n")  # as the kernel
    writes.clear()
    await cg._kill_round()
    unlimited = "rbps=max wbps=max riops=max wiops=max"
    assert relative(writes, fake_mount) == [
        ("jobworker/1/io.max", f"254:0 {unlimited}"),
        ("jobworker/1/io.max", f"8:16 {unlimited}"),
        ("jobworker/1/cgroup.kill", "1"),
    ]


def test_create_remakes_a_root_another_server_swept(
    fake_mount: Path, writes: list[tuple[str, str]]
) -> None:
    """Another server's start removes our job-cgroup root while it is empty: the next create
    makes it again, controllers enabled, instead of failing."""
    ctl = V2Controller(Hierarchy(frozenset(), fake_mount, "/"), root_name="jobworker/abc123")
    ctl.setup()
    shutil.rmtree(fake_mount / "jobworker" / "abc123")  # the sweep's rmdir, on a plain tree
    writes.clear()
    cg = ctl.create("1", Limits())
    assert cg.directory.is_dir()
    assert ("jobworker/abc123/cgroup.subtree_control", "+cpu +io +memory +pids") in relative(
        writes, fake_mount
    )
