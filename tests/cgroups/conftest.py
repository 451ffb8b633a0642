"""Fixtures for the cgroup driver tests: real controllers in a per-run test subtree.

Every controller here uses ``root_name = jobworker-test-<pid>`` so a real server's cgroups are
never touched, and each fixture kills and removes whatever its test left, even on failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

from jobworker.cgroups.layout import (
    MOUNTINFO,
    PROC_SELF_CGROUP,
    V1_CONTROLLERS,
    Hierarchy,
    parse_mountinfo,
    parse_proc_cgroup,
    v1_hierarchies,
    v2_hierarchy,
)
from jobworker.cgroups.v1 import V1Controller
from jobworker.cgroups.v2 import V2Controller
from tests.support import skip_unless

from .helpers import TEST_ROOT

CLEANUP_S = 10.0


def v1_layout() -> dict[str, Hierarchy]:
    mounts = parse_mountinfo(MOUNTINFO.read_text())
    return v1_hierarchies(mounts, parse_proc_cgroup(PROC_SELF_CGROUP.read_text()), V1_CONTROLLERS)


def unified_layout() -> Hierarchy | None:
    mounts = parse_mountinfo(MOUNTINFO.read_text())
    return v2_hierarchy(mounts, parse_proc_cgroup(PROC_SELF_CGROUP.read_text()))


def _v1_usable() -> bool:
    if os.geteuid() != 0:
        return False
    layout = v1_layout()
    if not {"cpu", "cpuacct", "memory", "pids", "freezer", "blkio"} <= layout.keys():
        return False
    try:
        V1Controller(layout, root_name=TEST_ROOT).probe()
    except OSError:
        return False
    return True


async def _cleanup(controller: V1Controller | V2Controller) -> None:
    with trio.move_on_after(CLEANUP_S, shield=True):
        await controller.sweep()
        await controller.remove_roots()


@pytest.fixture
async def v1() -> AsyncIterator[V1Controller]:
    """A V1Controller over the real hierarchies, test subtree removed afterwards."""
    skip_unless(_v1_usable(), "needs root and the cgroup v1 hierarchies")
    controller = V1Controller(v1_layout(), root_name=TEST_ROOT)
    try:
        yield controller
    finally:
        await _cleanup(controller)


@pytest.fixture
async def unified() -> AsyncIterator[V2Controller]:
    """A V2Controller in "no controllers" mode on the real cgroup2 mount."""
    hierarchy = unified_layout()
    usable = os.geteuid() == 0 and hierarchy is not None
    skip_unless(usable, "needs root and a cgroup2 mount")
    assert hierarchy is not None
    controller = V2Controller(hierarchy, root_name=TEST_ROOT, controllers=())
    try:
        controller.setup()
        controller.probe()
    except OSError as exc:
        skip_unless(False, f"cgroup2 mount not writable: {exc}")
    try:
        yield controller
    finally:
        await _cleanup(controller)
