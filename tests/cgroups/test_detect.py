"""Driver selection: auto / require / off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.cgroups import cgfs, detect
from jobworker.cgroups.base import Limits
from jobworker.cgroups.detect import CgroupsUnavailable, detect_controller
from jobworker.cgroups.null import NullController
from jobworker.cgroups.v1 import V1Controller
from jobworker.cgroups.v2 import V2Controller
from tests.support import skip_unless

from .helpers import TEST_ROOT


@pytest.fixture
def no_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "mountinfo"
    empty.write_text("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n")
    monkeypatch.setattr(detect, "MOUNTINFO", empty)


def test_off_is_the_null_driver() -> None:
    assert isinstance(detect_controller("off"), NullController)


@pytest.mark.usefixtures("no_cgroups")
def test_auto_without_cgroups_warns_and_runs_unenforced(caplog: pytest.LogCaptureFixture) -> None:
    controller = detect_controller("auto", root_name=TEST_ROOT)
    assert isinstance(controller, NullController)
    assert not controller.enforced
    assert "RESOURCE LIMITS ARE NOT ENFORCED: no cgroup hierarchy is mounted" in caplog.text


@pytest.mark.usefixtures("no_cgroups")
def test_require_without_cgroups_refuses() -> None:
    with pytest.raises(CgroupsUnavailable, match="no cgroup hierarchy is mounted"):
        detect_controller("require", root_name=TEST_ROOT)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown cgroups mode"):
        detect_controller("sometimes")  # type: ignore[arg-type]


@pytest.mark.cgroups
async def test_require_here_picks_v1() -> None:
    skip_unless(os.geteuid() == 0 and Path("/sys/fs/cgroup/memory").is_dir(), "needs root + v1")
    controller = detect_controller("require", root_name=TEST_ROOT, pids_max=99)
    try:
        assert isinstance(controller, V1Controller)
        assert controller.enforced
        assert TEST_ROOT in controller.description
        cg = controller.create("1", Limits(pids_max=4096))
        pids_dir = next(p for p in cg.paths if "/pids/" in str(p))
        assert cgfs.read_int(pids_dir / "pids.max") == 99  # the server-wide setting wins
        await cg.remove()
    finally:
        if isinstance(controller, V1Controller | V2Controller):
            await controller.sweep()
            await controller.remove_roots()
