"""The server's own cgroup subtree: nothing left by a start that failed, nor by one killed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from jobworker.server.app import instance_name
from tests.support import cgroup_own_dirs, server_command, skip_unless

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

pytestmark = pytest.mark.cgroups

CGROUP_LINE = "job cgroups under"  # the one long line that describes the cgroup driver


@pytest.fixture
def own_dirs() -> list[Path]:
    skip_unless(os.geteuid() == 0, "needs root for cgroups")
    dirs = cgroup_own_dirs()
    skip_unless(bool(dirs), "needs the cgroup v1 hierarchies")
    return dirs


def _instance_dirs(own_dirs: list[Path], data_dir: Path) -> list[Path]:
    name = instance_name(data_dir)
    return [own / name for own in own_dirs if (own / name).is_dir()]


@contextlib.contextmanager
def _port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_start_that_cannot_bind_leaves_no_cgroup_and_logs_the_driver_once(
    own_dirs: list[Path], test_pki: TestPKI, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    with _port_in_use() as port:
        command = server_command(test_pki.dir, data_dir, "--listen", f"127.0.0.1:{port}")
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False
        )
    assert result.returncode == 2, result.stderr  # every start failure is exit 2
    assert result.stderr.splitlines()[-1].endswith("Address already in use")
    assert _instance_dirs(own_dirs, data_dir) == []
    assert result.stderr.count(CGROUP_LINE) <= 1


def test_empty_subtrees_left_by_a_server_killed_during_start_up_are_swept(
    own_dirs: list[Path], server_factory: ServerFactory, tmp_path: Path
) -> None:
    # What a server killed during its start leaves: its empty subtree in every hierarchy.
    killed = tmp_path / "killed-data"
    for own in own_dirs:
        (own / instance_name(killed)).mkdir(parents=True)
    try:
        with server_factory() as srv:
            assert _instance_dirs(own_dirs, killed) == []
            assert _instance_dirs(own_dirs, srv.data_dir) != []  # its own subtree is kept
            swept = [line for line in srv.log_text().splitlines() if "empty job-cgroup" in line]
            assert len(swept) == 1
            assert instance_name(killed).split("/")[-1] in swept[0]
    finally:
        for directory in _instance_dirs(own_dirs, killed):
            directory.rmdir()


def test_the_server_line_is_logged_by_one_layer(server_factory: ServerFactory) -> None:
    with server_factory() as srv:
        assert srv.log_text().count(CGROUP_LINE) == 1
