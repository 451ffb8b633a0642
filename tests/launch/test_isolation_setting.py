"""--isolation: its grammar and its refusals, and the cgroup mounts a job gets afresh."""

from __future__ import annotations

import pytest

from jobworker.launch.isolation import AUTO, IsolationUnusable, cgroup_mounts, parse_isolation
from jobworker.launch.request import Isolation


@pytest.mark.parametrize(
    ("text", "wanted", "explicit"),
    [
        ("auto", AUTO, False),
        ("none", Isolation(), True),
        ("pid", Isolation(pid=True), True),
        ("pid, net", Isolation(pid=True, net=True), True),
        ("mount,cgroup,pid,net", Isolation(True, True, True, True), True),
    ],
)
def test_isolation_settings(text: str, wanted: Isolation, explicit: bool) -> None:
    setting = parse_isolation(text)
    assert (setting.wanted, setting.explicit) == (wanted, explicit)


@pytest.mark.parametrize("text", ["", "pids", "pid,user", ",", "auto,net"])
def test_unknown_names_are_refused(text: str) -> None:
    with pytest.raises(IsolationUnusable) as refused:
        parse_isolation(text)
    assert str(refused.value) == (
        f"--isolation must be auto, none or a list of pid, mount, cgroup, net; got {text!r}"
    )


def test_auto_is_pid_mount_and_cgroup_without_net() -> None:
    assert AUTO.names == ["pid", "mount", "cgroup"]
    assert AUTO.describe() == "pid, mount, cgroup"
    assert Isolation().describe() == "none"


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
35 27 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 35 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 35 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
39 35 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
40 27 0:40 / /mnt/elsewhere rw,relatime - cgroup cgroup rw,pids
"""


def test_the_hosts_cgroup_mounts_are_listed_to_be_mounted_again() -> None:
    assert cgroup_mounts(MOUNTINFO) == [
        ("/sys/fs/cgroup/cpu", "cgroup", "cpu"),
        ("/sys/fs/cgroup/memory", "cgroup", "memory"),
        ("/sys/fs/cgroup/systemd", "cgroup", "none,name=systemd"),
        ("/sys/fs/cgroup/unified", "cgroup2", ""),
    ]  # a hierarchy mounted outside /sys/fs/cgroup is not part of the job's view
