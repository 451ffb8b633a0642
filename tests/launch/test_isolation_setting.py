"""--isolation: its grammar, and one line for a setting the start cannot honour."""

from __future__ import annotations

import pytest

from jobworker.launch.isolation import AUTO, IsolationUnusable, parse_isolation
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
