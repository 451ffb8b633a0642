"""Who a job runs as: its own uid and gid from a range (the default), one given user, or root.

A dynamic uid is allocated per running job, like systemd's DynamicUser: two jobs running at
once never share one, so neither can signal, ptrace or read the other. Uids are handed out
least recently used first, so a uid comes back only after every other one in the range has
been used (files a job left in its work dir keep their owner; its work dir is hidden from
every other job anyway).

The default range, 1879048192-1879113727 (0x70000000, 65536 ids), lies above systemd's
container ranges (524288-1879048191), below its foreign range (2147352576 up), away from its
dynamic users (61184-65519) and from the subordinate ranges that useradd hands out (100000
up, 65536 per user). At start the range is checked against /etc/passwd, /etc/group,
/etc/subuid and /etc/subgid: an overlap refuses the start.
"""

from __future__ import annotations

import collections
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_UID_RANGE",
    "JobUsers",
    "UsersUnusable",
    "parse_uid_range",
]

DEFAULT_UID_RANGE = "1879048192-1879113727"
ETC = Path("/etc")


class UsersUnusable(ValueError):
    """The job-user settings cannot work here (one line: the server refuses to start)."""


def parse_uid_range(text: str) -> tuple[int, int]:
    """ "START-END" (inclusive) -> (start, end)."""
    try:
        start_text, end_text = text.split("-", 1)
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise UsersUnusable(f"job uid range must be START-END, got {text!r}") from None
    if not 1 <= start <= end < 2**32 - 1:
        raise UsersUnusable(f"job uid range {text!r} is not within 1-4294967294")
    return start, end


@dataclass(frozen=True)
class _Fixed:
    uid: int
    gid: int


class JobUsers:
    """Hands out the (uid, gid) each job runs as; None means "as the server" (root)."""

    def __init__(self, *, fixed: _Fixed | None, uid_range: tuple[int, int] | None) -> None:
        self._fixed = fixed
        self._range = uid_range
        self._free: collections.deque[int] = collections.deque()
        if uid_range is not None:
            self._free.extend(range(uid_range[0], uid_range[1] + 1))
        self._busy: set[int] = set()

    @classmethod
    def from_settings(
        cls, job_user: str | None, uid_range: str = DEFAULT_UID_RANGE, etc: Path = ETC
    ) -> JobUsers:
        """``job_user`` None: dynamic uids from ``uid_range`` (root only; otherwise jobs run
        as the server's user); "root": as root; "NAME" or "UID:GID": as that user.
        Raises UsersUnusable."""
        if job_user is None:
            if os.geteuid() != 0:
                return cls(fixed=None, uid_range=None)
            bounds = parse_uid_range(uid_range)
            _check_range_free(bounds, etc)
            return cls(fixed=None, uid_range=bounds)
        if job_user == "root":
            return cls(fixed=None, uid_range=None)
        if ":" in job_user:
            uid_text, _, gid_text = job_user.partition(":")
            try:
                return cls(fixed=_Fixed(int(uid_text), int(gid_text)), uid_range=None)
            except ValueError:
                raise UsersUnusable(
                    f"job user must be NAME, UID:GID or root, got {job_user!r}"
                ) from None
        try:
            entry = pwd.getpwnam(job_user)
        except KeyError:
            raise UsersUnusable(f"job user {job_user!r} does not exist") from None
        return cls(fixed=_Fixed(entry.pw_uid, entry.pw_gid), uid_range=None)

    @property
    def dynamic(self) -> bool:
        return self._range is not None

    @property
    def unprivileged(self) -> bool:
        """True when jobs do not run as root."""
        return self._range is not None or (self._fixed is not None and self._fixed.uid != 0)

    def describe(self) -> str:
        if self._range is not None:
            return f"jobs run as their own uid from {self._range[0]}-{self._range[1]}"
        if self._fixed is not None:
            return f"jobs run as uid {self._fixed.uid}, gid {self._fixed.gid}"
        return f"jobs run as the server's user (uid {os.geteuid()})"

    def allocate(self) -> tuple[int, int] | None:
        """The (uid, gid) for a new job, or None to keep the server's. A dynamic uid is its
        own gid too. Raises UsersUnusable when every uid of the range is in use."""
        if self._fixed is not None:
            return self._fixed.uid, self._fixed.gid
        if self._range is None:
            return None
        if not self._free:
            raise UsersUnusable("every job uid of the range is in use")
        uid = self._free.popleft()
        self._busy.add(uid)
        return uid, uid

    def release(self, uid: int | None) -> None:
        """The job that ran as ``uid`` has no process left: the uid may be handed out again."""
        if uid is not None and uid in self._busy:
            self._busy.discard(uid)
            self._free.append(uid)

    def may_execute(self, path: str) -> bool:
        """Whether a job's user may execute ``path``, from permission bits alone (decided
        before the job starts, without switching users). True for a root job user."""
        return self._may_search_all(path)

    def may_enter(self, directory: str) -> bool:
        """Whether a job's user may make ``directory`` its cwd (search it and every directory
        above it), from permission bits alone, as ``may_execute``. Whether it may write there
        is the job's business."""
        return self._may_search_all(directory)

    def _may_search_all(self, path: str) -> bool:
        """The x bit for the job's user on ``path`` and on every directory above it."""
        ids = self._fixed or (_Fixed(self._range[0], self._range[0]) if self._range else None)
        if ids is None or ids.uid == 0:
            return True
        try:
            target = os.stat(path)
            parents = [os.stat(p) for p in _parents(os.path.realpath(path))]
        except OSError:
            return False
        groups = {ids.gid}  # no supplementary groups: the launcher drops them
        return _may_search(target, ids.uid, groups) and all(
            _may_search(parent, ids.uid, groups) for parent in parents
        )


def _parents(path: str) -> list[str]:
    found = []
    while True:
        path = os.path.dirname(path)
        found.append(path)
        if path == "/":
            return found


def _may_search(info: os.stat_result, uid: int, groups: set[int]) -> bool:
    """The x bit of the class (owner, group, other) that applies to ``uid``: execute for a
    file, search for a directory."""
    if info.st_uid == uid:
        return bool(info.st_mode & 0o100)
    if info.st_gid in groups:
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def _check_range_free(bounds: tuple[int, int], etc: Path) -> None:
    start, end = bounds
    for name, ids in (("passwd", _id_column(etc / "passwd")), ("group", _id_column(etc / "group"))):
        for ident, entry in ids:
            if start <= ident <= end:
                raise UsersUnusable(
                    f"job uid range {start}-{end} overlaps {etc / name} entry {entry!r} ({ident})"
                )
    for name in ("subuid", "subgid"):
        for first, count, owner in _sub_ranges(etc / name):
            if first <= end and start <= first + count - 1:
                raise UsersUnusable(
                    f"job uid range {start}-{end} overlaps {etc / name} range of {owner!r}"
                )


def _colon_rows(path: Path) -> list[list[str]]:
    """The colon-separated fields of each line of ``path`` (none if it cannot be read)."""
    try:
        return [line.split(":") for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return []


def _id_column(path: Path) -> list[tuple[int, str]]:
    """(id, name) of each passwd/group entry."""
    return [
        (int(fields[2]), fields[0])
        for fields in _colon_rows(path)
        if len(fields) >= 3 and fields[2].isdigit()
    ]


def _sub_ranges(path: Path) -> list[tuple[int, int, str]]:
    """(first, count, owner) of each subuid/subgid range."""
    return [
        (int(fields[1]), int(fields[2]), fields[0])
        for fields in _colon_rows(path)
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit()
    ]
