"""Job users: the uid range checked against the host's files, uids handed out one per running
job least recently used first, and the execute check made for the job's user."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from jobworker.launch.users import JobUsers, UsersUnusable, parse_uid_range


def etc(tmp_path: Path, **files: str) -> Path:
    for name in ("passwd", "group", "subuid", "subgid"):
        (tmp_path / name).write_text(files.get(name, ""))
    return tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100", "job uid range must be START-END, got '100'"),
        ("a-b", "job uid range must be START-END, got 'a-b'"),
        ("0-10", "job uid range '0-10' is not within 1-4294967294"),
        ("20-10", "job uid range '20-10' is not within 1-4294967294"),
        ("1-4294967295", "job uid range '1-4294967295' is not within 1-4294967294"),
    ],
)
def test_a_bad_range_is_refused_with_its_text(text: str, message: str) -> None:
    with pytest.raises(UsersUnusable) as refused:
        parse_uid_range(text)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"passwd": "svc:x:5005:5005::/:/bin/false\n"}, "/passwd entry 'svc' (5005)"),
        ({"group": "grp:x:5010:\n"}, "/group entry 'grp' (5010)"),
        ({"subuid": "alice:4000:2000\n"}, "/subuid range of 'alice'"),
        ({"subgid": "bob:5099:1\n"}, "/subgid range of 'bob'"),
    ],
)
def test_a_range_that_overlaps_the_hosts_ids_is_refused(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("dynamic uids are for a root server")
    with pytest.raises(UsersUnusable) as refused:
        JobUsers.from_settings(None, "5000-5099", etc(tmp_path, **files))
    assert str(refused.value).startswith("job uid range 5000-5099 overlaps ")
    assert message in str(refused.value)


def test_ranges_next_to_the_hosts_ids_are_fine(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dynamic uids are for a root server")
    files = etc(
        tmp_path,
        passwd="a:x:4999:4999::/:/bin/false\nb:x:5100:5100::/:/bin/false\n",
        subuid="c:3999:1000\n",  # 3999-4998
        subgid="d:5100:100\n",
    )
    users = JobUsers.from_settings(None, "5000-5099", files)
    assert users.dynamic
    assert users.unprivileged


def test_uids_are_unique_while_running_and_come_back_last(tmp_path: Path) -> None:
    users = JobUsers(fixed=None, uid_range=(7000, 7002))
    first, second, third = users.allocate(), users.allocate(), users.allocate()
    assert [first, second, third] == [(7000, 7000), (7001, 7001), (7002, 7002)]
    with pytest.raises(UsersUnusable, match="every job uid of the range is in use"):
        users.allocate()
    users.release(7001)
    users.release(7001)  # twice: still handed out once
    users.release(7000)
    assert users.allocate() == (7001, 7001)  # least recently used first
    assert users.allocate() == (7000, 7000)
    with pytest.raises(UsersUnusable):
        users.allocate()


def test_a_named_user_and_uid_gid_and_root(tmp_path: Path) -> None:
    assert JobUsers.from_settings("12:34").allocate() == (12, 34)
    assert JobUsers.from_settings("root").allocate() is None
    assert JobUsers.from_settings("root").unprivileged is False
    nobody = JobUsers.from_settings("nobody").allocate()
    assert nobody is not None
    assert nobody[0] > 0
    with pytest.raises(UsersUnusable, match="job user 'no-such-user-x' does not exist"):
        JobUsers.from_settings("no-such-user-x")
    with pytest.raises(UsersUnusable, match="job user must be NAME, UID:GID or root"):
        JobUsers.from_settings("1:x")


def test_may_execute_follows_the_permission_bits_for_the_job_user() -> None:
    users = JobUsers(fixed=None, uid_range=(7000, 7099))
    # Directly under /tmp: pytest's own tmp dirs are 0700, so nothing in them is reachable.
    with tempfile.TemporaryDirectory(dir="/tmp") as name:
        directory = Path(name)
        tool = directory / "tool"
        tool.write_text("#!/bin/sh\n")
        directory.chmod(0o755)
        tool.chmod(0o755)
        assert users.may_execute(str(tool))
        tool.chmod(0o750)  # owner and group only: the job user is neither
        assert not users.may_execute(str(tool))
        tool.chmod(0o755)
        directory.chmod(0o700)  # the file is fine, its directory is not searchable
        assert not users.may_execute(str(tool))
        directory.chmod(0o755)
        assert not users.may_execute(str(directory / "missing"))
        assert JobUsers(fixed=None, uid_range=None).may_execute(str(tool))  # as the server
    assert users.may_execute("/bin/sh")
