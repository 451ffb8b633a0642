"""Parsing of mountinfo and /proc/self/cgroup, and device discovery (no cgroups needed)."""

from __future__ import annotations

from pathlib import Path

from jobworker.cgroups.blockdev import writable_block_devices
from jobworker.cgroups.layout import (
    V1_CONTROLLERS,
    parse_mountinfo,
    parse_proc_cgroup,
    v1_hierarchies,
    v2_hierarchy,
)

MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
28 27 8:17 / /srv/data\\040dir rw,relatime - xfs /dev/sdb1 rw
29 27 8:18 / /srv/ro ro,relatime - ext4 /dev/sdb2 ro
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=100k
22 27 0:21 / /proc rw,relatime - proc proc rw
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /kube/pod1 /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
garbage line
"""

PROC_CGROUP = """\
8:pids:/
4:memory:/kube/pod1/app
3:cpuset:/
2:cpu,cpuacct:/svc
0::/user.slice/session-1
"""


def test_mountinfo_fields_and_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 10
    data = next(m for m in mounts if m.fstype == "xfs")
    assert data.mount_point == "/srv/data dir"
    assert (data.major, data.minor) == (8, 17)
    assert data.writable
    assert not next(m for m in mounts if m.mount_point == "/srv/ro").writable


def test_v1_hierarchies_co_mounted_container_root_and_cpuset_skipped() -> None:
    found = v1_hierarchies(
        parse_mountinfo(MOUNTINFO), parse_proc_cgroup(PROC_CGROUP), V1_CONTROLLERS
    )
    assert set(found) == {"cpu", "cpuacct", "memory", "pids"}
    assert found["cpu"] is found["cpuacct"]  # co-mounted: one hierarchy, one directory
    assert found["cpu"].own_dir == Path("/sys/fs/cgroup/cpu,cpuacct/svc")
    # The mount shows /kube/pod1 of the hierarchy: our path is relative to it.
    assert found["memory"].own_dir == Path("/sys/fs/cgroup/memory/app")
    assert found["pids"].own_dir == Path("/sys/fs/cgroup/pids")


def test_v2_hierarchy() -> None:
    unified = v2_hierarchy(parse_mountinfo(MOUNTINFO), parse_proc_cgroup(PROC_CGROUP))
    assert unified is not None
    assert unified.own_dir == Path("/sys/fs/cgroup/unified/user.slice/session-1")
    assert v2_hierarchy(parse_mountinfo(MOUNTINFO), parse_proc_cgroup("1:pids:/\n")) is None


def test_block_devices_whole_disks_only(tmp_path: Path) -> None:
    # A fake /sys: vda is a disk, sdb1/sdb2 partitions of sdb.
    block = tmp_path / "devices" / "block"
    (block / "vda").mkdir(parents=True)
    (block / "vda" / "dev").write_text("254:0\n")
    (block / "sdb" / "sdb1").mkdir(parents=True)
    (block / "sdb" / "dev").write_text("8:16\n")
    (block / "sdb" / "sdb1" / "partition").write_text("1\n")
    (block / "sdb" / "sdb2").mkdir()
    (block / "sdb" / "sdb2" / "partition").write_text("2\n")
    dev_block = tmp_path / "dev_block"
    dev_block.mkdir()
    (dev_block / "254:0").symlink_to(block / "vda")
    (dev_block / "8:17").symlink_to(block / "sdb" / "sdb1")
    (dev_block / "8:18").symlink_to(block / "sdb" / "sdb2")
    devices, skipped = writable_block_devices(parse_mountinfo(MOUNTINFO), dev_block)
    assert devices == ["254:0", "8:16"]  # sdb2 is mounted read-only; proc is not listed
    assert skipped == ["/dev/shm (tmpfs 0:23)"]
